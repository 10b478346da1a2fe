"""Fleet rollouts end to end: `cloud up` in the test process, real hub agent processes, and
components published to the registry and deployed to thing groups through the REST API.

- a group of five gets a version canary first, then the rest;
- a version that crashes on some hubs aborts at the threshold: the failed hubs rolled back
  by themselves, those that took it are rolled back by the cloud, queued ones are skipped —
  every hub ends on the previous version;
- a hub offline during a rollout converges when it returns;
- configuration MERGE / RESET from two deployments to overlapping groups.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeloop.edge.control import wait_for_agent
from tests.cloud.test_cloud_up import RunningCloud
from tests.edge.test_cloud_link import CloudHub, eventually
from tests.edge.test_fleet_jobs import cloud, make_hub

__all__ = ["cloud", "make_hub"]  # fixtures shared with the hub's own fleet-job tests

pytestmark = pytest.mark.slow

MakeHub = Callable[..., tuple[CloudHub, str]]
HEALTH_WINDOW = 1.0

# Serves forever, unless its thing is listed in FAIL_ON (then it exits with 3 at once).
SCRIPT = """
import json, os, sys, time
fail_on = {fail_on!r}
print("{name} {version} on", os.environ.get("AWS_IOT_THING_NAME"), flush=True)
if os.environ.get("AWS_IOT_THING_NAME") in fail_on:
    print("cannot start {version} here", file=sys.stderr, flush=True)
    sys.exit(3)
while True:
    time.sleep(1)
"""


class Registry:
    """Publishes components and makes groups and deployments through the REST API."""

    def __init__(self, cloud: RunningCloud, folder: Path) -> None:
        self.cloud = cloud
        self.folder = folder
        self.prefix = f"com.rollout.{uuid.uuid4().hex[:6]}"

    def component(self, short: str) -> str:
        return f"{self.prefix}.{short}"

    def publish(
        self,
        name: str,
        version: str,
        *,
        fail_on: tuple[str, ...] = (),
        configuration: dict[str, Any] | None = None,
        dependencies: dict[str, str] | None = None,
    ) -> None:
        folder = self.folder / f"{name}-{version}"
        folder.mkdir(parents=True)
        (folder / "run.py").write_text(SCRIPT.format(name=name, version=version, fail_on=fail_on))
        recipe: dict[str, Any] = {
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
        if configuration is not None:
            recipe["ComponentConfiguration"] = {"DefaultConfiguration": configuration}
        if dependencies:
            recipe["ComponentDependencies"] = {
                dep: {"VersionRequirement": requirement, "DependencyType": "HARD"}
                for dep, requirement in dependencies.items()
            }
        path = folder / "recipe.json"
        path.write_text(json.dumps(recipe))
        ctx = self.cloud.cloud.ctx
        assert ctx is not None
        ctx.components.publish_dir(path, folder)

    def group(self, things: list[str]) -> str:
        group = f"g-{uuid.uuid4().hex[:6]}"
        assert self.cloud.api.post("/groups", json={"thingGroupName": group}).status_code == 201
        for thing in things:
            assert self.cloud.api.put(f"/groups/{group}/things/{thing}").status_code == 200
        return group

    def deploy(self, group: str, components: dict[str, Any], **job: Any) -> str:
        body: dict[str, Any] = {
            "targetArn": f"thinggroup/{group}",
            "deploymentName": ", ".join(components),
            "components": components,
            "deploymentPolicies": {"healthWindowSeconds": HEALTH_WINDOW},
        }
        if job:
            body["iotJobConfiguration"] = job
        created = self.cloud.api.post("/deployments", json=body)
        assert created.status_code == 201, created.text
        return str(created.json()["deploymentId"])

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        answer = self.cloud.api.get(f"/deployments/{deployment_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())


@pytest.fixture
def registry(cloud: RunningCloud, tmp_path: Path) -> Registry:
    return Registry(cloud, tmp_path / "published")


@pytest.fixture
def hubs(make_hub: MakeHub) -> Callable[[int], list[tuple[CloudHub, str]]]:
    def start(count: int) -> list[tuple[CloudHub, str]]:
        made = [make_hub(f"hub{i}") for i in range(count)]
        for hub, _ in made:
            hub.start(wait=False)
        for hub, _ in made:
            assert hub.proc is not None
            wait_for_agent(hub.root, hub.proc)
        return made

    return start


def _version(hub: CloudHub, name: str) -> str | None:
    component = hub.components().get(name)
    if component is None or component["state"] != "RUNNING":
        return None
    return str(component["version"])


def _settled(registry: Registry, deployment_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        d = registry.deployment(deployment_id)
        executions, rollback = d["executions"], d.get("rollback") or {}
        busy = executions.get("QUEUED", 0) + executions.get("IN_PROGRESS", 0)
        if d["status"] == "ABORTED":
            busy = executions.get("IN_PROGRESS", 0) + rollback.get("QUEUED", 0)
            busy += rollback.get("IN_PROGRESS", 0)
        return d if d["status"] in ("COMPLETED", "ABORTED") and not busy else None

    return dict(eventually(done, f"deployment {deployment_id} settles", 90))


def test_canary_first_then_a_crashing_version_aborts_and_every_hub_goes_back(
    registry: Registry, hubs: Callable[[int], list[tuple[CloudHub, str]]]
) -> None:
    fleet = hubs(5)
    things = [thing for _, thing in fleet]
    group = registry.group(things)
    app = registry.component("App")
    registry.publish(app, "1.0.0")
    # 2.0.0 runs on the two hubs picked first (name order) and crashes on the others.
    ordered = sorted(things)
    registry.publish(app, "2.0.0", fail_on=tuple(ordered[2:]))

    first = registry.deploy(group, {app: {"componentVersion": "1.0.0"}}, canary={"size": 1})
    # The canary goes alone: no other hub is notified until it has succeeded.
    d = registry.deployment(first)
    assert d["canary"] == [ordered[0]] and d["released"] == 1 and d["phase"] == "canary"
    d = _settled(registry, first)
    assert d["status"] == "COMPLETED" and d["executions"]["SUCCEEDED"] == 5
    waves = [e["detail"] for e in d["events"] if e["kind"] == "wave"]
    assert waves[0] == {**waves[0], "phase": "canary", "size": 1}
    assert sum(w["size"] for w in waves) == 5
    for hub, _ in fleet:
        assert _version(hub, app) == "1.0.0"

    second = registry.deploy(
        group,
        {app: {"componentVersion": "2.0.0"}},
        jobExecutionsRolloutConfig={"maximumPerMinute": 60},  # one hub a second
        abortConfig={
            "criteriaList": [
                {"failureType": "ALL", "thresholdPercentage": 50, "minNumberOfExecutedThings": 4}
            ]
        },
    )
    d = _settled(registry, second)
    assert d["status"] == "ABORTED", d
    assert "failures reached" in d["reason"] and "threshold 50%" in d["reason"]
    assert d["previousDeploymentId"] == first
    executions = d["executions"]
    assert executions.get("SUCCEEDED", 0) == 2 and executions.get("FAILED", 0) >= 2
    assert d["rollback"].get("SUCCEEDED") == 2  # the two that took 2.0.0 were sent back
    kinds = [e["kind"] for e in d["events"]]
    assert "aborted" in kinds and "rollback" in kinds

    def all_back() -> bool:
        return all(_version(hub, app) == "1.0.0" for hub, _ in fleet)

    eventually(all_back, "every hub runs 1.0.0 again", 60)
    for hub, thing in fleet:
        assert hub.call("status")["targets"][group] == first, thing


def test_a_hub_offline_during_a_rollout_converges_when_it_returns(
    registry: Registry, hubs: Callable[[int], list[tuple[CloudHub, str]]], make_hub: MakeHub
) -> None:
    fleet = hubs(2)
    late, late_thing = make_hub("late")  # made (and registered) but not started
    group = registry.group([thing for _, thing in fleet] + [late_thing])
    app = registry.component("Pump")
    registry.publish(app, "1.0.0")
    deployment_id = registry.deploy(group, {app: {"componentVersion": "1.0.0"}})

    def two_done() -> bool:
        return bool(registry.deployment(deployment_id)["executions"].get("SUCCEEDED") == 2)

    eventually(two_done, "the two online hubs succeed", 60)
    d = registry.deployment(deployment_id)
    assert d["status"] == "ACTIVE" and d["executions"]["QUEUED"] == 1  # waiting for it
    late.start()
    d = _settled(registry, deployment_id)
    assert d["status"] == "COMPLETED" and d["executions"]["SUCCEEDED"] == 3
    assert _version(late, app) == "1.0.0"


def _configuration(hub: CloudHub, name: str) -> dict[str, Any]:
    state = json.loads((hub.root / "state" / "hub.json").read_text())
    return dict(state["configuration"].get(name) or {})


def test_merge_and_reset_from_two_deployments_to_overlapping_groups(
    registry: Registry, hubs: Callable[[int], list[tuple[CloudHub, str]]]
) -> None:
    (one, t1), (both, t2), (other, t3) = hubs(3)
    kitchen = registry.group([t1, t2])
    basement = registry.group([t2, t3])
    lamp = registry.component("Lamp")
    registry.publish(lamp, "1.0.0", configuration={"color": "white", "level": 5, "timer": 60})

    red = registry.deploy(
        kitchen,
        {lamp: {"componentVersion": "1.0.0", "configurationUpdate": {"merge": '{"color": "red"}'}}},
    )
    assert _settled(registry, red)["status"] == "COMPLETED"
    assert _configuration(one, lamp) == {"color": "red", "level": 5, "timer": 60}
    assert _configuration(both, lamp)["color"] == "red"

    # The basement's deployment runs the same version, resets the color to its default and
    # merges a level: the hub in both groups applies it over what it has.
    dim = registry.deploy(
        basement,
        {
            lamp: {
                "componentVersion": "1.0.0",
                "configurationUpdate": {"reset": ["/color"], "merge": {"level": 1}},
            }
        },
    )
    assert _settled(registry, dim)["status"] == "COMPLETED"
    assert _configuration(one, lamp) == {"color": "red", "level": 5, "timer": 60}
    assert _configuration(both, lamp) == {"color": "white", "level": 1, "timer": 60}
    assert _configuration(other, lamp) == {"color": "white", "level": 1, "timer": 60}
    assert both.call("status")["targets"] == {kitchen: red, basement: dim}

    # A version conflict between the two groups fails only the hub in both, naming both.
    registry.publish(lamp, "2.0.0", configuration={"color": "white", "level": 5, "timer": 60})
    newer = registry.deploy(basement, {lamp: {"componentVersion": "2.0.0"}})
    d = _settled(registry, newer)
    assert d["executions"].get("SUCCEEDED") == 1 and d["executions"].get("FAILED") == 1
    assert _version(other, lamp) == "2.0.0" and _version(both, lamp) == "1.0.0"
    ctx = registry.cloud.cloud.ctx
    assert ctx is not None
    failed = ctx.jobs.job_execution(newer, t2)
    assert red in failed.status_details["reason"] and newer in failed.status_details["reason"]


def test_dependencies_come_from_the_registry_with_their_component(
    registry: Registry, hubs: Callable[[int], list[tuple[CloudHub, str]]]
) -> None:
    ((hub, thing),) = hubs(1)
    group = registry.group([thing])
    app, lib = registry.component("App"), registry.component("Lib")
    for version in ("1.0.0", "1.1.0", "2.0.0"):
        registry.publish(lib, version)
    registry.publish(app, "1.0.0", dependencies={lib: "^1.0.0"})
    deployment_id = registry.deploy(group, {app: {"componentVersion": "1.0.0"}})
    assert _settled(registry, deployment_id)["executions"].get("SUCCEEDED") == 1
    assert _version(hub, app) == "1.0.0"
    assert _version(hub, lib) == "1.1.0"  # the newest that ^1.0.0 allows
