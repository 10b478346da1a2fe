"""The deployment engine over a real database (SQLite and PostgreSQL): canary first, waves
at the configured rate, abort at the threshold with the fleet rolled back, superseding,
pause/resume/cancel, newcomers to a group, and what a hub may download.

Hubs are played through the job store's device side (start-next, update), as the MQTT
service would on their behalf; tests/cloud/test_fleet_deployments_e2e.py does it with real
hub processes."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edgeloop.cloud.components import ComponentRegistry
from edgeloop.cloud.db import Database
from edgeloop.cloud.deployments import DeploymentEngine, parse_target_arn
from edgeloop.cloud.jobs import JobStore
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.signing import UrlSigner
from edgeloop.core.deployment import parse_job_document
from edgeloop.core.errors import ConflictError, NotFoundError, ValidationError
from edgeloop.core.jobstate import ExecutionStatus, StartNextRequest, UpdateRequest

COMPONENT = "com.example.Detector"


def recipe(version: str) -> dict[str, Any]:
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": COMPONENT,
        "ComponentVersion": version,
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": "sleep 1000"}}],
    }


class Clock:
    """The engine's clock (seconds) and the job store's (datetimes), moved together."""

    def __init__(self) -> None:
        self.seconds = 1_000_000.0

    def __call__(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.seconds, UTC)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


@dataclass
class Fleet:
    engine: DeploymentEngine
    registry: Registry
    jobs: JobStore
    components: ComponentRegistry
    clock: Clock
    group: str
    things: list[str]

    def deploy(self, version: str, **config: Any) -> str:
        policies = config.pop("policies", None)
        document: dict[str, Any] = {
            "targetArn": f"arn:aws:iot:local:0:thinggroup/{self.group}",
            "deploymentName": f"detector {version}",
            "components": {COMPONENT: {"componentVersion": version}},
        }
        if policies:
            document["deploymentPolicies"] = policies
        if config:
            document["iotJobConfiguration"] = config
        return self.engine.create(document).deployment_id

    def queued(self, job_id: str) -> set[str]:
        return {
            e.thing_name for e in self.jobs.list_executions(job_id, status=ExecutionStatus.QUEUED)
        }

    def hub_runs(self, thing: str, outcome: ExecutionStatus) -> dict[str, Any]:
        """One hub takes its next job and reports ``outcome``; returns the job document."""
        started = self.jobs.start_next(thing, StartNextRequest())
        assert started is not None, f"{thing} has no job"
        execution, document = started
        if outcome != ExecutionStatus.IN_PROGRESS:
            self.jobs.update_execution(thing, execution.job_id, UpdateRequest(status=outcome))
        return document

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        self.engine.tick()


@pytest.fixture
def fleet(database: Database, tmp_path: Path) -> Iterator[Fleet]:
    clock = Clock()
    registry = Registry(database)
    jobs = JobStore(database, clock=clock.now)
    components = ComponentRegistry(
        database, LocalObjectStore(tmp_path / "objects"), UrlSigner(b"s" * 32)
    )
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        components.publish(recipe(version), source="recipe.json", artifacts={})
    engine = DeploymentEngine(database, registry, jobs, components, clock=clock)
    group = f"g-{uuid.uuid4().hex[:6]}"
    registry.create_group(group)
    things = [f"hub-{i}" for i in range(5)]
    for thing in things:
        registry.create_thing(thing)
        registry.add_to_group(group, thing)
    yield Fleet(engine, registry, jobs, components, clock, group, things)


def test_a_canary_goes_first_then_the_rest_and_the_rollout_completes(fleet: Fleet) -> None:
    # hub-3 is online: it is picked as the canary (online hubs first).
    fleet.registry.set_connectivity("hub-3", True, datetime.now(UTC), client_id="hub-3")
    deployment_id = fleet.deploy("1.0.0", canary={"size": 1})
    assert fleet.queued(deployment_id) == {"hub-3"}
    deployment = fleet.engine.get(deployment_id)
    assert (deployment.phase, deployment.canary, deployment.released) == ("canary", ("hub-3",), 1)

    fleet.tick()
    assert fleet.queued(deployment_id) == {"hub-3"}  # nothing more until the canary succeeds
    document = fleet.hub_runs("hub-3", ExecutionStatus.SUCCEEDED)
    job = parse_job_document(document)
    assert (job.deployment_id, job.target) == (deployment_id, fleet.group)
    assert job.components[COMPONENT].version == "1.0.0"

    fleet.tick()
    assert fleet.queued(deployment_id) == {"hub-0", "hub-1", "hub-2", "hub-4"}
    for thing in ("hub-0", "hub-1", "hub-2", "hub-4"):
        fleet.hub_runs(thing, ExecutionStatus.SUCCEEDED)
    fleet.tick()
    deployment = fleet.engine.get(deployment_id)
    assert deployment.status == "COMPLETED"
    assert deployment.counts["SUCCEEDED"] == 5
    kinds = [event.kind for event in fleet.engine.events(deployment_id)]
    assert kinds == ["created", "wave", "wave", "completed"]


def test_a_failed_canary_aborts_before_the_fleet_is_touched(fleet: Fleet) -> None:
    deployment_id = fleet.deploy("1.0.0", canary={"size": 2})
    (first, second) = sorted(fleet.queued(deployment_id))
    fleet.hub_runs(first, ExecutionStatus.SUCCEEDED)
    fleet.hub_runs(second, ExecutionStatus.FAILED)
    fleet.tick()
    deployment = fleet.engine.get(deployment_id)
    assert deployment.status == "ABORTED" and "canary failed" in (deployment.reason or "")
    assert deployment.released == 2  # the other three were never notified
    assert deployment.counts["QUEUED"] == 0


def test_waves_follow_the_rate(fleet: Fleet) -> None:
    for i in range(5, 40):
        fleet.registry.create_thing(f"hub-{i}")
        fleet.registry.add_to_group(fleet.group, f"hub-{i}")
    deployment_id = fleet.deploy(
        "1.0.0",
        jobExecutionsRolloutConfig={
            "maximumPerMinute": 240,
            "exponentialRate": {
                "baseRatePerMinute": 60,
                "incrementFactor": 2,
                "rateIncreaseCriteria": {"numberOfNotifiedThings": 4},
            },
        },
    )
    released = [fleet.engine.get(deployment_id).released]
    for _ in range(10):
        fleet.tick()
        released.append(fleet.engine.get(deployment_id).released)
    steps = [b - a for a, b in itertools.pairwise(released)]
    assert released[0] == 1  # a second's worth of 60/min
    assert steps[:3] == [1, 1, 1]  # 60/min: one a second until 4 were notified
    assert max(steps) <= 4  # never above 240/min
    assert fleet.engine.get(deployment_id).rate_per_minute == 240


def test_crossing_the_threshold_aborts_and_rolls_the_fleet_back(fleet: Fleet) -> None:
    first = fleet.deploy("1.0.0")
    for thing in fleet.things:
        fleet.hub_runs(thing, ExecutionStatus.SUCCEEDED)
    fleet.tick()
    assert fleet.engine.get(first).status == "COMPLETED"

    second = fleet.deploy(
        "2.0.0",
        jobExecutionsRolloutConfig={"maximumPerMinute": 120},  # two a second
        abortConfig={
            "criteriaList": [
                {"failureType": "ALL", "thresholdPercentage": 50, "minNumberOfExecutedThings": 2}
            ]
        },
    )
    assert fleet.engine.get(first).status == "SUPERSEDED"
    assert fleet.engine.get(second).previous_id == first
    fleet.hub_runs("hub-0", ExecutionStatus.SUCCEEDED)
    fleet.hub_runs("hub-1", ExecutionStatus.IN_PROGRESS)
    fleet.tick()  # two more notified
    fleet.hub_runs("hub-2", ExecutionStatus.FAILED)  # 1 of 2 executed failed: 50%
    fleet.tick()
    deployment = fleet.engine.get(second)
    assert deployment.status == "ABORTED"
    assert "failures reached 50.0% of 2 executed hubs" in (deployment.reason or "")
    assert deployment.counts["CANCELED"] >= 1  # hub-3 had been queued, hub-4 never notified
    assert deployment.released <= 4

    # hub-0 took 2.0.0: it gets the previous deployment back; hub-2 rolled back by itself.
    rollback = parse_job_document(fleet.hub_runs("hub-0", ExecutionStatus.SUCCEEDED))
    assert (rollback.deployment_id, rollback.rollback_of) == (first, second)
    assert rollback.components[COMPONENT].version == "1.0.0"
    assert fleet.jobs.pending("hub-2") == []

    # hub-1 was running 2.0.0 when the rollout aborted and succeeds afterwards.
    fleet.jobs.update_execution(hub := "hub-1", second, UpdateRequest(ExecutionStatus.SUCCEEDED))
    fleet.tick()
    late = parse_job_document(fleet.hub_runs(hub, ExecutionStatus.SUCCEEDED))
    assert late.rollback_of == second and late.components[COMPONENT].version == "1.0.0"
    deployment = fleet.engine.get(second)
    assert deployment.rollback_counts == {**deployment.rollback_counts, "SUCCEEDED": 2}
    kinds = [event.kind for event in fleet.engine.events(second)]
    assert kinds.count("rollback") == 2 and "aborted" in kinds


def test_a_rollback_with_nothing_before_it_removes_the_targets_components(fleet: Fleet) -> None:
    deployment_id = fleet.deploy(
        "1.0.0",
        abortConfig={"criteriaList": [{"failureType": "ALL", "thresholdPercentage": 30}]},
    )
    fleet.hub_runs("hub-0", ExecutionStatus.SUCCEEDED)
    fleet.hub_runs("hub-1", ExecutionStatus.SUCCEEDED)
    fleet.hub_runs("hub-2", ExecutionStatus.REJECTED)
    fleet.tick()
    assert fleet.engine.get(deployment_id).status == "ABORTED"
    rollback = parse_job_document(fleet.hub_runs("hub-0", ExecutionStatus.SUCCEEDED))
    assert rollback.components == {} and rollback.rollback_of == deployment_id


def test_a_timed_out_execution_counts_as_a_failure(fleet: Fleet) -> None:
    deployment_id = fleet.deploy(
        "1.0.0",
        timeoutConfig={"inProgressTimeoutInMinutes": 1},
        abortConfig={"criteriaList": [{"failureType": "TIMED_OUT", "thresholdPercentage": 10}]},
    )
    fleet.hub_runs("hub-0", ExecutionStatus.IN_PROGRESS)  # and never heard from again
    fleet.clock.advance(61)
    fleet.jobs.sweep_timeouts()
    fleet.tick()
    deployment = fleet.engine.get(deployment_id)
    assert deployment.status == "ABORTED" and "TIMED_OUT" in (deployment.reason or "")


def test_pause_resume_and_cancel(fleet: Fleet) -> None:
    deployment_id = fleet.deploy("1.0.0", jobExecutionsRolloutConfig={"maximumPerMinute": 60})
    assert fleet.engine.get(deployment_id).released == 1
    fleet.engine.pause(deployment_id)
    fleet.tick(30)
    assert fleet.engine.get(deployment_id).released == 1
    with pytest.raises(ConflictError, match="PAUSED: it can become PAUSED only from ACTIVE"):
        fleet.engine.pause(deployment_id)
    fleet.engine.resume(deployment_id)
    fleet.tick()
    assert fleet.engine.get(deployment_id).released == 2  # no burst for the paused time
    fleet.engine.cancel(deployment_id, "wrong model")
    deployment = fleet.engine.get(deployment_id)
    assert (deployment.status, deployment.reason) == ("CANCELED", "wrong model")
    assert deployment.counts["CANCELED"] == 2
    with pytest.raises(ConflictError):
        fleet.engine.resume(deployment_id)
    kinds = [event.kind for event in fleet.engine.events(deployment_id)]
    assert kinds == ["created", "wave", "paused", "active", "wave", "canceled"]


def test_a_new_deployment_supersedes_the_targets_current_one(fleet: Fleet) -> None:
    first = fleet.deploy("1.0.0", jobExecutionsRolloutConfig={"maximumPerMinute": 60})
    second = fleet.deploy("2.0.0")
    assert fleet.engine.get(first).status == "SUPERSEDED"
    assert fleet.queued(first) == set()
    assert fleet.queued(second) == set(fleet.things)


def test_a_thing_joining_the_group_later_gets_its_deployment(fleet: Fleet) -> None:
    deployment_id = fleet.deploy("1.0.0")
    for thing in fleet.things:
        fleet.hub_runs(thing, ExecutionStatus.SUCCEEDED)
    fleet.tick()
    assert fleet.engine.get(deployment_id).status == "COMPLETED"
    fleet.registry.create_thing("hub-late")
    fleet.registry.add_to_group(fleet.group, "hub-late")
    fleet.tick(fleet.engine.membership_interval)
    assert fleet.queued(deployment_id) == {"hub-late"}


def test_a_deployment_to_one_thing(fleet: Fleet) -> None:
    deployment = fleet.engine.create(
        {"targetArn": "thing/hub-2", "components": {COMPONENT: {"componentVersion": "3.0.0"}}}
    )
    assert deployment.target == "thing/hub-2"
    assert fleet.queued(deployment.deployment_id) == {"hub-2"}


def test_published_versions_a_deployment_needs_cannot_be_deleted(fleet: Fleet) -> None:
    first = fleet.deploy("1.0.0")
    with pytest.raises(ConflictError, match=first):
        fleet.components.delete(COMPONENT, "1.0.0")
    fleet.deploy("2.0.0")  # 1.0.0 is what a rollback of this one would return to
    with pytest.raises(ConflictError, match=first):
        fleet.components.delete(COMPONENT, "1.0.0")
    fleet.components.delete(COMPONENT, "3.0.0")  # used by nothing


def test_only_things_sent_a_version_may_download_it(fleet: Fleet) -> None:
    fleet.deploy("1.0.0", jobExecutionsRolloutConfig={"maximumPerMinute": 60})
    queued = next(iter(fleet.things[:1]))
    assert fleet.engine.may_download(queued, COMPONENT, "1.0.0")
    assert not fleet.engine.may_download(queued, COMPONENT, "2.0.0")
    assert not fleet.engine.may_download("hub-4", COMPONENT, "1.0.0")  # not notified yet


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"targetArn": None}, ValidationError, "targetArn"),
        ({"targetArn": "thinggroup/nope"}, NotFoundError, "nope"),
        ({"targetArn": "thing/nope"}, NotFoundError, "nope"),
        ({"components": {COMPONENT: {"componentVersion": "9.0.0"}}}, NotFoundError, "9.0.0"),
        ({"components": {"x": {}}}, ValidationError, "componentVersion"),
        ({"iotJobConfiguration": {"canary": {"group": "none-of-them"}}}, NotFoundError, "none"),
    ],
)
def test_bad_deployments_are_refused_and_leave_nothing(
    fleet: Fleet, change: dict[str, Any], error: type[Exception], message: str
) -> None:
    document = {
        "targetArn": f"thinggroup/{fleet.group}",
        "components": {COMPONENT: {"componentVersion": "1.0.0"}},
        **change,
    }
    with pytest.raises(error, match=message):
        fleet.engine.create(document)
    assert fleet.engine.list_deployments() == []
    assert fleet.jobs.list_jobs() == []


def test_a_canary_group_must_hold_some_of_the_targets(fleet: Fleet) -> None:
    fleet.registry.create_group("lab")
    fleet.registry.create_thing("bench-1")
    fleet.registry.add_to_group("lab", "bench-1")
    with pytest.raises(ValidationError, match="holds none") as caught:
        fleet.deploy("1.0.0", canary={"group": "lab"})
    assert caught.value.field == "iotJobConfiguration.canary.group"
    fleet.registry.add_to_group("lab", "hub-4")
    deployment_id = fleet.deploy("1.0.0", canary={"group": "lab"})
    assert fleet.queued(deployment_id) == {"hub-4"}


@pytest.mark.parametrize(
    ("arn", "target"),
    [
        ("arn:aws:iot:eu-west-1:123456789012:thinggroup/furnaces", "furnaces"),
        ("thinggroup/furnaces", "furnaces"),
        ("arn:aws:iot:eu-west-1:123456789012:thing/hub-1", "thing/hub-1"),
        ("thing/hub-1", "thing/hub-1"),
    ],
)
def test_target_arns(arn: str, target: str) -> None:
    assert parse_target_arn(arn) == target


def test_dependencies_are_resolved_from_the_registry(fleet: Fleet) -> None:
    def publish(name: str, version: str, deps: dict[str, str]) -> None:
        document = {
            **recipe(version),
            "ComponentName": name,
            "ComponentDependencies": {
                dep: {"VersionRequirement": requirement} for dep, requirement in deps.items()
            },
        }
        fleet.components.publish(document, source=f"{name}.json", artifacts={})

    publish("lib.a", "1.0.0", {})
    publish("lib.a", "1.4.0", {"lib.b": ">=2.0.0"})
    publish("lib.a", "2.0.0", {})
    publish("lib.b", "2.1.0", {})
    publish("app", "1.0.0", {"lib.a": "^1.0.0", "aws.greengrass.Nucleus": ">=2.0.0"})
    deployment = fleet.engine.create(
        {"targetArn": "thing/hub-0", "components": {"app": {"componentVersion": "1.0.0"}}}
    )
    document = parse_job_document(fleet.jobs.document(deployment.deployment_id))
    # The newest lib.a within ^1 and what it needs; the Nucleus is the hub's to provide.
    assert document.dependencies == {"lib.a": "1.4.0", "lib.b": "2.1.0"}
    assert fleet.engine.may_download("hub-0", "lib.b", "2.1.0")

    publish("clash", "1.0.0", {"lib.a": ">=2.0.0", "lib.c": "^1.0.0"})
    publish("lib.c", "1.0.0", {"lib.a": "<2.0.0"})
    with pytest.raises(ValidationError, match="dependencies cannot be satisfied") as caught:
        fleet.engine.create(
            {"targetArn": "thing/hub-0", "components": {"clash": {"componentVersion": "1.0.0"}}}
        )
    assert caught.value.field == "components" and "lib.a" in str(caught.value)
