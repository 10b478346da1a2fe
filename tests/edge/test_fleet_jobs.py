"""Fleet deployments on the hub: the union over targets, statusDetails, and end to end a real
cloud (``RunningCloud``: API, Mosquitto with mutual TLS, jobs service, component registry)
with real hub agent processes that take AWS IoT Jobs executions and apply them."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeloop.core.config import ConfigurationUpdate
from edgeloop.core.deployment import ComponentTarget, JobDocument, Policies, thing_target
from edgeloop.core.errors import DeploymentError, ValidationError
from edgeloop.core.jobstate import parse_status_details
from edgeloop.edge.deployments import DeploymentRequest, TargetDeployment, next_targets
from edgeloop.edge.fleet_jobs import (
    DETAIL_LIMIT,
    failure_details,
    log_tail_text,
    parse_execution,
    status_details,
    success_details,
)
from edgeloop.edge.settings import parse_api_url
from edgeloop.edge.store import LOCAL_TARGET, HubState
from tests.cloud.test_cloud_up import RunningCloud
from tests.edge.conftest import FAST_RESTARTS
from tests.edge.test_cloud_link import CloudHub, _credentials, eventually


# -- the union over targets (pure) ---------------------------------------------------------
def _fleet(target: str, deployment: str, **components: str) -> DeploymentRequest:
    return DeploymentRequest(target=TargetDeployment(target, deployment, components))


def _local(merge: dict[str, str] | None = None, remove: tuple[str, ...] = ()) -> DeploymentRequest:
    return DeploymentRequest(merge=merge or {}, remove=remove)


def _after(hub: HubState, request: DeploymentRequest, deployment: str = "d") -> HubState:
    targets, roots = next_targets(hub, request, deployment)
    return HubState(deployment_id=deployment, roots=roots, targets=targets)


def test_a_target_replaces_its_own_entry_and_the_roots_are_the_union() -> None:
    hub = _after(HubState(), _fleet("furnaces", "dep-1", A="1.0.0", B="1.0.0"))
    hub = _after(hub, _fleet(thing_target("hub-1"), "dep-2", C="2.0.0", A="1.0.0"))
    assert hub.roots == {"A": "1.0.0", "B": "1.0.0", "C": "2.0.0"}
    # furnaces' next deployment drops B and A; A stays, as the thing's own deployment has it
    hub = _after(hub, _fleet("furnaces", "dep-3", D="1.0.0"))
    assert hub.roots == {"A": "1.0.0", "C": "2.0.0", "D": "1.0.0"}
    assert hub.targets["furnaces"]["deploymentId"] == "dep-3"
    # a rollback to "no previous deployment" empties the target: what only it had goes
    hub = _after(hub, _fleet("furnaces", "dep-3-rollback"))
    assert hub.roots == {"A": "1.0.0", "C": "2.0.0"}


def test_roots_deployed_on_the_hub_are_their_own_target() -> None:
    hub = _after(HubState(), _local({"Local": "1.0.0"}), "local-1")
    hub = _after(hub, _fleet("g", "dep-1", A="1.0.0"))
    hub = _after(hub, _fleet("g", "dep-2", B="1.0.0"))
    assert hub.roots == {"Local": "1.0.0", "B": "1.0.0"}
    assert hub.targets[LOCAL_TARGET]["components"] == {"Local": "1.0.0"}
    # A hub whose state predates targets keeps every root as its own.
    old = HubState(roots={"Old": "1.0.0"})
    assert _after(old, _fleet("g", "dep-1", A="1.0.0")).roots == {"Old": "1.0.0", "A": "1.0.0"}
    # Removing the last local root drops the local target.
    assert LOCAL_TARGET not in _after(hub, _local(remove=("Local",))).targets


def test_two_targets_asking_different_versions_fail_naming_both_deployments() -> None:
    hub = _after(HubState(), _fleet("furnaces", "dep-furnace", A="1.0.0"))
    with pytest.raises(DeploymentError) as err:
        next_targets(hub, _fleet(thing_target("hub-1"), "dep-mine", A="2.0.0"), "x")
    message = str(err.value)
    assert "dep-furnace" in message and "dep-mine" in message
    assert "1.0.0" in message and "2.0.0" in message
    # The same holds against the hub's own deployments.
    with pytest.raises(DeploymentError, match="dep-furnace"):
        next_targets(hub, _local({"A": "1.5.0"}), "local-2")


def test_a_local_removal_of_a_fleet_component_names_its_deployment() -> None:
    hub = _after(HubState(), _fleet("furnaces", "dep-furnace", A="1.0.0"))
    with pytest.raises(DeploymentError, match="fleet deployment dep-furnace"):
        next_targets(hub, _local(remove=("A",)), "local")
    with pytest.raises(DeploymentError, match="not a root component"):
        next_targets(hub, _local(remove=("Nope",)), "local")
    with pytest.raises(DeploymentError, match=LOCAL_TARGET):
        next_targets(hub, _fleet(LOCAL_TARGET, "dep"), "x")


def test_targets_survive_a_round_trip_of_the_hub_document() -> None:
    hub = _after(HubState(), _fleet("g", "dep-1", A="1.0.0"))
    again = HubState.from_json(json.loads(json.dumps(hub.to_json())))
    assert again.targets == hub.targets and again.roots == hub.roots


# -- statusDetails (pure) ------------------------------------------------------------------
def test_status_details_are_what_aws_accepts() -> None:
    details = status_details(
        reason="line one\nline two\ttab" + "x" * 2000,
        exitCode=3,
        empty="",
        missing=None,
        flag=True,
    )
    assert set(details) == {"reason", "exitCode", "flag"}
    assert details["exitCode"] == "3" and details["flag"] == "true"
    assert details["reason"].startswith("line one line two tab")
    assert len(details["reason"]) == DETAIL_LIMIT and details["reason"].endswith("…")
    assert parse_status_details(details) == details
    many = status_details(**{f"k{i}": "v" for i in range(15)})
    assert len(many) == 10 and parse_status_details(many) == many


def test_log_tail_keeps_the_components_last_lines_short() -> None:
    lines = [
        "2026-01-01T00:00:00.000Z [stdout] starting",
        "2026-01-01T00:00:00.100Z [stdout] loading model " + "m" * 400,
        "2026-01-01T00:00:00.200Z [stderr] Traceback: boom",
        "2026-01-01T00:00:00.300Z [stdout] bye",
        "2026-01-01T00:00:00.400Z [edgeloop] state RUNNING -> ERRORED",
    ]
    text = log_tail_text(lines)
    parts = text.split(" | ")
    assert len(parts) == 3
    assert parts[0].startswith("loading model m") and len(parts[0]) <= 150
    assert parts[1:] == ["stderr: Traceback: boom", "bye"]
    assert log_tail_text([]) == ""
    assert log_tail_text(["not a log line"]) == "not a log line"


def _doc(**components: str) -> JobDocument:
    return JobDocument("dep-7", "furnaces", {n: ComponentTarget(v) for n, v in components.items()})


def test_failure_details_name_the_component_its_exit_code_and_log_tail() -> None:
    record = {
        "status": "FAILED",
        "detailedStatus": "FAILED_ROLLBACK_COMPLETE",
        "failureCause": "A 2.0.0 went ERRORED: Run exited with code 3; last log lines:\n  boom",
        "failedComponents": [
            {
                "name": "A",
                "version": "2.0.0",
                "state": "ERRORED",
                "reason": "Run exited with code 3",
                "exitCode": 3,
                "logTail": ["2026-01-01T00:00:00.000Z [stderr] boom"] * 5,
            }
        ],
    }
    details = failure_details(record, _doc(A="2.0.0"))
    assert details["component"] == "A" and details["version"] == "2.0.0"
    assert details["exitCode"] == "3" and details["step"] == "deploy"
    assert details["logTail"] == " | ".join(["stderr: boom"] * 3)
    assert details["reason"] == (
        "A 2.0.0 went ERRORED: Run exited with code 3; "
        "the hub rolled back to its previous deployment"
    )
    assert details["deploymentId"] == "dep-7" and details["target"] == "furnaces"
    assert details["detailedStatus"] == "FAILED_ROLLBACK_COMPLETE"
    assert parse_status_details(details) == details


def test_failure_details_of_a_component_that_never_came_up() -> None:
    record = {
        "status": "FAILED",
        "detailedStatus": "FAILED_ROLLBACK_COMPLETE",
        "failureCause": "timed out after 300 s waiting for A (STARTING)",
        "failedComponents": [
            {
                "name": "A",
                "version": "1.0.0",
                "state": "STARTING",
                "signal": 9,
                "reason": "not RUNNING or FINISHED after 300 s",
                "logTail": [],
            }
        ],
    }
    details = failure_details(record, None)
    assert details["reason"].startswith("A 1.0.0 is STARTING: not RUNNING or FINISHED")
    assert details["signal"] == "9" and "exitCode" not in details and "logTail" not in details


def test_failure_details_without_a_component_keep_the_first_line_of_the_cause() -> None:
    record = {
        "status": "FAILED",
        "detailedStatus": "FAILED_NO_STATE_CHANGE",
        "failureCause": "A is asked for at 1.0.0 by deployment x\nand more",
    }
    details = failure_details(record, None)
    assert details == {
        "reason": "A is asked for at 1.0.0 by deployment x",
        "step": "deploy",
        "detailedStatus": "FAILED_NO_STATE_CHANGE",
    }


def test_success_details_list_the_components() -> None:
    details = success_details(_doc(B="1.0.0", A="2.0.0"))
    assert details == {
        "deploymentId": "dep-7",
        "target": "furnaces",
        "components": "A 2.0.0, B 1.0.0",
    }
    assert success_details(_doc())["components"] == "none"


def test_parse_execution_reads_start_next_answers() -> None:
    assert parse_execution({"timestamp": 1}) is None
    execution = parse_execution(
        {
            "execution": {
                "jobId": "j1",
                "executionNumber": 2,
                "status": "IN_PROGRESS",
                "jobDocument": {"x": 1},
            }
        }
    )
    assert execution is not None
    assert (execution.job_id, execution.execution_number, execution.document) == (
        "j1",
        2,
        {"x": 1},
    )


def test_the_cloud_api_setting_takes_a_base_url() -> None:
    assert parse_api_url("http://127.0.0.1:8440/", source="s") == "http://127.0.0.1:8440"
    assert parse_api_url("https://c.example/api/v1", source="s") == "https://c.example"
    for bad in ("ftp://x", "127.0.0.1:8440", "http://", "http://h:99999", 8440):
        with pytest.raises(ValidationError) as err:
            parse_api_url(bad, source="s")
        assert err.value.field == "cloud.api"


# -- end to end ----------------------------------------------------------------------------
HEALTH_WINDOW = 1.0
# Run prints its lines and either serves forever or exits with the given code.
SCRIPT = """
import sys, time
code = {code!r}
print("{name} {version} starting", flush=True)
if code is not None:
    print("loading failed", file=sys.stderr, flush=True)
    print("boom {version}", flush=True)
    sys.exit(code)
while True:
    time.sleep(1)
"""


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


class Fleet:
    """Publishes components and queues jobs on a running cloud, as its deployments do."""

    def __init__(self, cloud: RunningCloud, folder: Path) -> None:
        self.cloud = cloud
        assert cloud.cloud.ctx is not None
        self.ctx = cloud.cloud.ctx
        self.folder = folder
        self.prefix = f"com.test.{uuid.uuid4().hex[:6]}"

    def name(self, short: str) -> str:
        """A component name unique to this test."""
        return f"{self.prefix}.{short}"

    def publish(self, name: str, version: str, *, exit_code: int | None = None) -> None:
        """Publish a component version whose Run serves, or fails with ``exit_code``."""
        folder = self.folder / f"{name}-{version}"
        folder.mkdir(parents=True)
        script = SCRIPT.format(name=name, version=version, code=exit_code)
        (folder / "run.py").write_text(script)
        recipe = {
            "RecipeFormatVersion": "2020-01-25",
            "ComponentName": name,
            "ComponentVersion": version,
            "Manifests": [
                {
                    "Platform": {"os": "linux"},
                    "Lifecycle": {"Run": f"{sys.executable} -u {{artifacts:path}}/run.py"},
                    "Artifacts": [{"URI": f"s3://bucket/{name}/{version}/run.py"}],
                }
            ],
        }
        path = folder / "recipe.json"
        path.write_text(json.dumps(recipe))
        self.ctx.components.publish_dir(path, folder)

    def job(
        self,
        thing: str,
        components: dict[str, str],
        *,
        target: str | None = None,
        deployment: str | None = None,
        document: dict[str, Any] | None = None,
        **policies: Any,
    ) -> str:
        """Queue a job whose document is a JobDocument for ``thing``; its id."""
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        if document is None:
            document = JobDocument(
                deployment_id=deployment or f"dep-{uuid.uuid4().hex[:8]}",
                target=target or thing_target(thing),
                components={n: ComponentTarget(v) for n, v in components.items()},
                policies=Policies(health_window=HEALTH_WINDOW, **policies),
            ).to_json()
        self.ctx.jobs.create_job(job_id, document, targets=[thing])
        return job_id

    def execution(self, job_id: str, thing: str) -> Any:
        return self.ctx.jobs.job_execution(job_id, thing)

    def ended(self, job_id: str, thing: str, timeout: float = 30) -> Any:
        """The execution once it has ended."""
        return eventually(
            lambda: (
                (e := self.execution(job_id, thing)).status
                in ("SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED")
                and e
            ),
            f"job {job_id} ends on {thing}",
            timeout,
        )


@pytest.fixture
def fleet(cloud: RunningCloud, tmp_path: Path) -> Fleet:
    return Fleet(cloud, tmp_path / "published")


@pytest.fixture
def make_hub(cloud: RunningCloud, tmp_path: Path) -> Iterator[Callable[..., tuple[CloudHub, str]]]:
    hubs: list[CloudHub] = []

    def make(name: str = "hub") -> tuple[CloudHub, str]:
        folder = tmp_path / name
        folder.mkdir()
        thing, conn = _credentials(cloud, folder)
        conn.update(reconnect_max=1, keepalive=5, api=cloud.endpoints["api"])
        settings = {
            "restart": dict(FAST_RESTARTS),
            "stop_grace": 2.0,
            "health_window": 0.3,
            "cloud": conn,
        }
        hub = CloudHub(folder / "root", settings)
        hubs.append(hub)
        return hub, thing

    yield make
    for hub in hubs:
        hub.stop()


def _running(hub: CloudHub, name: str, version: str) -> bool:
    component = hub.components().get(name)
    return bool(component and component["version"] == version and component["state"] == "RUNNING")


def test_a_hub_downloads_runs_and_reports_success_after_the_health_window(
    fleet: Fleet, make_hub: Callable[..., tuple[CloudHub, str]]
) -> None:
    hub, thing = make_hub()
    app = fleet.name("App")
    fleet.publish(app, "1.0.0")
    hub.start()
    eventually(lambda: hub.call("status")["cloud"]["connected"], "the hub is online")
    # A job queued while the hub is online and idle reaches it through notify-next.
    job = fleet.job(thing, {app: "1.0.0"})
    execution = fleet.ended(job, thing)
    assert execution.status == "SUCCEEDED", execution.status_details
    assert execution.status_details["components"] == f"{app} 1.0.0"
    assert _running(hub, app, "1.0.0")
    record = hub.call("deployments")[0]
    assert record["status"] == "SUCCEEDED" and record["request"]["target"]["jobId"] == job
    # The success was decided after the component had been up for the whole window.
    running_since = hub.components()[app]["since"]
    assert record["updatedAt"] - running_since >= HEALTH_WINDOW - 0.05
    status = hub.call("status")
    assert status["fleet"]["last"]["status"] == "SUCCEEDED"
    assert status["fleet"]["last"]["jobId"] == job and status["fleet"]["current"] is None
    assert status["targets"] == {thing_target(thing): execution.status_details["deploymentId"]}
    assert f"{app} 1.0.0 starting" in hub.log(app)


def test_a_crashing_component_fails_with_why_and_the_hub_goes_back(
    fleet: Fleet, make_hub: Callable[..., tuple[CloudHub, str]]
) -> None:
    hub, thing = make_hub()
    app = fleet.name("App")
    fleet.publish(app, "1.0.0")
    fleet.publish(app, "2.0.0", exit_code=3)
    bad = fleet.job(thing, {"": "1.0.0"})  # a document that does not parse
    good = fleet.job(thing, {app: "1.0.0"})
    crash = fleet.job(thing, {app: "2.0.0"})
    hub.start()  # three jobs wait for it: taken one after the other
    rejected = fleet.ended(bad, thing)
    assert rejected.status == "FAILED"
    assert rejected.status_details["step"] == "document"
    assert "components." in rejected.status_details["reason"]
    assert fleet.ended(good, thing).status == "SUCCEEDED"
    failed = fleet.ended(crash, thing)
    assert failed.status == "FAILED"
    details = failed.status_details
    assert details["component"] == app and details["version"] == "2.0.0"
    assert details["exitCode"] == "3"
    assert "boom 2.0.0" in details["logTail"] and "stderr: loading failed" in details["logTail"]
    assert details["detailedStatus"] == "FAILED_ROLLBACK_COMPLETE"
    assert "rolled back" in details["reason"]
    assert parse_status_details(details) == details
    eventually(lambda: _running(hub, app, "1.0.0"), "the hub runs the previous version again")
    assert hub.call("status")["fleet"]["last"]["status"] == "FAILED"


def test_two_targets_asking_different_versions_fail_naming_both(
    fleet: Fleet, make_hub: Callable[..., tuple[CloudHub, str]]
) -> None:
    hub, thing = make_hub()
    app, other = fleet.name("App"), fleet.name("Other")
    fleet.publish(app, "1.0.0")
    fleet.publish(app, "2.0.0")
    fleet.publish(other, "1.0.0")
    # Something deployed on the hub itself, which no fleet deployment may take away.
    hub.component("com.test.Local", lifecycle={"Run": "sleep 600"})
    group = f"furnaces-{uuid.uuid4().hex[:6]}"
    to_group = fleet.job(thing, {app: "1.0.0"}, target=group, deployment="dep-group")
    to_thing = fleet.job(thing, {app: "2.0.0"}, deployment="dep-thing")
    hub.start()
    assert hub.deploy(merge={"com.test.Local": "1.0.0"})["status"] == "SUCCEEDED"
    assert fleet.ended(to_group, thing).status == "SUCCEEDED"
    clash = fleet.ended(to_thing, thing)
    assert clash.status == "FAILED"
    reason = clash.status_details["reason"]
    assert "dep-group" in reason and "dep-thing" in reason, reason
    assert clash.status_details["detailedStatus"] == "FAILED_NO_STATE_CHANGE"
    assert _running(hub, app, "1.0.0")
    # The group's next deployment replaces its own components only.
    moved = fleet.job(thing, {other: "1.0.0"}, target=group, deployment="dep-group-2")
    assert fleet.ended(moved, thing).status == "SUCCEEDED"
    components = hub.components()
    assert app not in components
    assert components[other]["state"] == "RUNNING"
    assert components["com.test.Local"]["state"] == "RUNNING"
    assert set(hub.call("status")["targets"]) == {group, LOCAL_TARGET}


def test_an_offline_hub_gets_its_job_when_it_comes_back(
    fleet: Fleet, make_hub: Callable[..., tuple[CloudHub, str]]
) -> None:
    hub, thing = make_hub()
    app = fleet.name("App")
    fleet.publish(app, "1.0.0")
    fleet.publish(app, "1.1.0")
    hub.start()
    first = fleet.job(thing, {app: "1.0.0"})
    assert fleet.ended(first, thing).status == "SUCCEEDED"
    hub.stop()
    update = fleet.job(
        thing,
        {app: "1.1.0"},
        document=JobDocument(
            "dep-update",
            thing_target(thing),
            {app: ComponentTarget("1.1.0", ConfigurationUpdate(merge={"level": 2}))},
            Policies(health_window=HEALTH_WINDOW),
            jitter_seconds=0.5,
        ).to_json(),
    )
    time.sleep(0.5)
    assert fleet.execution(update, thing).status == "QUEUED"
    hub.start()
    assert fleet.ended(update, thing).status == "SUCCEEDED"
    assert _running(hub, app, "1.1.0")
    assert hub.components()[app]["configuration"] == {"level": 2}


def test_an_agent_killed_mid_deployment_reports_failure_not_success(
    fleet: Fleet, make_hub: Callable[..., tuple[CloudHub, str]]
) -> None:
    hub, thing = make_hub()
    app = fleet.name("App")
    fleet.publish(app, "1.0.0")
    fleet.publish(app, "2.0.0")
    hub.start()
    assert fleet.ended(fleet.job(thing, {app: "1.0.0"}), thing).status == "SUCCEEDED"
    long = fleet.job(
        thing,
        {app: "2.0.0"},
        document=JobDocument(
            "dep-long",
            thing_target(thing),
            {app: ComponentTarget("2.0.0")},
            Policies(health_window=60.0),
        ).to_json(),
    )
    eventually(lambda: _running(hub, app, "2.0.0"), "the new version runs in its health window")
    assert fleet.execution(long, thing).status_details.get("step") == "deploying"
    hub.kill9()
    hub.start()
    execution = fleet.ended(long, thing)
    assert execution.status == "FAILED"
    assert (
        "agent stopped while the deployment was being applied"
        in (execution.status_details["reason"])
    )
    assert _running(hub, app, "1.0.0")


def test_a_group_deployment_made_through_the_cloud_api_reaches_the_hub(
    cloud: RunningCloud, fleet: Fleet, make_hub: Callable[..., tuple[CloudHub, str]]
) -> None:
    hub, thing = make_hub()
    app = fleet.name("App")
    fleet.publish(app, "1.0.0")
    group = f"pumps-{uuid.uuid4().hex[:6]}"
    assert cloud.api.post("/groups", json={"thingGroupName": group}).status_code == 201
    assert cloud.api.put(f"/groups/{group}/things/{thing}").status_code == 200
    hub.start()
    created = cloud.api.post(
        "/deployments",
        json={
            "targetArn": f"thinggroup/{group}",
            "deploymentName": "pump app",
            "components": {app: {"componentVersion": "1.0.0"}},
            "deploymentPolicies": {"healthWindowSeconds": HEALTH_WINDOW},
        },
    )
    assert created.status_code == 201, created.text
    deployment = created.json()["deploymentId"]

    def succeeded() -> bool:
        answer = cloud.api.get(f"/deployments/{deployment}").json()
        return bool(answer["executions"].get("SUCCEEDED") == 1)

    eventually(succeeded, "the deployment's execution on the hub SUCCEEDED", 30)
    assert _running(hub, app, "1.0.0")
    assert hub.call("status")["targets"] == {group: deployment}


def test_an_agent_killed_before_applying_a_job_applies_it_after_restarting(
    fleet: Fleet, make_hub: Callable[..., tuple[CloudHub, str]]
) -> None:
    hub, thing = make_hub()
    app = fleet.name("App")
    fleet.publish(app, "1.0.0")
    hub.component("com.test.Local", lifecycle={"Run": "sleep 600"})
    hub.start()
    # A long local deployment holds the queue, so the job's deployment waits behind it.
    hub.deploy(merge={"com.test.Local": "1.0.0"}, healthWindow=60, wait=False)
    job = fleet.job(thing, {app: "1.0.0"})
    eventually(
        lambda: (hub.call("status")["fleet"]["current"] or {}).get("localDeploymentId"),
        "the job's deployment is queued on the hub",
    )
    hub.kill9()
    hub.start()
    execution = fleet.ended(job, thing)
    assert execution.status == "SUCCEEDED", execution.status_details
    assert _running(hub, app, "1.0.0")
    assert "com.test.Local" not in hub.components()  # interrupted: rolled back


def test_device_status_tells_the_job_in_hand_and_the_last_outcome() -> None:
    from edgeloop.cli.device import fleet_lines

    assert fleet_lines(None) == []
    lines = fleet_lines(
        {
            "step": "downloading",
            "since": time.time() - 5,
            "current": {"jobId": "j2", "deploymentId": "d2", "target": "pumps"},
            "last": {"jobId": "j1", "status": "FAILED", "reason": "A [x] went ERRORED", "at": 1},
            "targets": {"pumps": {"deploymentId": "d1", "components": {"A": "1.0.0"}}},
        }
    )
    assert lines[0].startswith("fleet: job j2 (deployment d2, target pumps): downloading since")
    assert "last job j1 [red]FAILED[/red]" in lines[1] and r"A \[x] went ERRORED" in lines[1]
    assert lines[2] == "  target pumps: deployment d1 (A 1.0.0)"
    assert fleet_lines({"step": "idle", "current": None})[0] == "fleet: idle, no job in hand"
