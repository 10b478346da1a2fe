"""AWS IoT Jobs' MQTT contract, topic by topic, over a job store (SQLite: the protocol is
what is tested here; the store runs on both databases in test_jobs)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from awsiot import iotjobs

from edgeloop.cloud.db import Database
from edgeloop.cloud.jobs import JobStore
from edgeloop.cloud.jobs_service import (
    REQUEST_FILTERS,
    JobsService,
    is_request_topic,
    parse_request_topic,
)
from edgeloop.cloud.registry import Registry
from edgeloop.core.topics import topic_matches

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


class Wire:
    """A service, what it published, and a way to send it raw requests."""

    def __init__(self, store: JobStore, thing: str) -> None:
        self.store = store
        self.thing = thing
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.service = JobsService(store, lambda t, p: self.sent.append((t, json.loads(p))))

    def ask(self, suffix: str, body: dict[str, Any] | bytes | None = None) -> tuple[str, Any]:
        """Send a request; returns (accepted|rejected, its document)."""
        self.sent.clear()
        payload = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        topic = f"$aws/things/{self.thing}/jobs/{suffix}"
        assert self.service.handle(topic, payload)
        answer_topic, document = self.sent[0]
        assert answer_topic.startswith(topic + "/")
        return answer_topic.rsplit("/", 1)[1], document

    def heard(self, kind: str) -> list[dict[str, Any]]:
        topic = f"$aws/things/{self.thing}/jobs/{kind}"
        return [doc for t, doc in self.sent if t == topic]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[JobStore, Registry]:
    db = Database(f"sqlite:///{tmp_path / 'edgeloop.db'}")
    db.migrate()
    return JobStore(db, clock=lambda: T0), Registry(db)


@pytest.fixture
def wire(setup: tuple[JobStore, Registry]) -> Wire:
    store, registry = setup
    thing = f"hub-{uuid.uuid4().hex[:8]}"
    registry.create_thing(thing)
    return Wire(store, thing)


def test_request_topics_and_filters() -> None:
    requests = {
        "$aws/things/t/jobs/get": ("t", None, "pending"),
        "$aws/things/t/jobs/start-next": ("t", None, "start-next"),
        "$aws/things/t/jobs/j1/get": ("t", "j1", "describe"),
        "$aws/things/t/jobs/$next/get": ("t", "$next", "describe"),
        "$aws/things/t/jobs/j1/update": ("t", "j1", "update"),
    }
    for topic, (thing, job, operation) in requests.items():
        request = parse_request_topic(topic)
        assert request is not None and request.topic == topic
        assert (request.thing, request.job_id, request.operation) == (thing, job, operation)
        assert sum(topic_matches(f, topic) for f in REQUEST_FILTERS) == 1
    answers = [
        "$aws/things/t/jobs/get/accepted",
        "$aws/things/t/jobs/start-next/rejected",
        "$aws/things/t/jobs/j1/update/accepted",
        "$aws/things/t/jobs/j1/get/rejected",
        "$aws/things/t/jobs/notify",
        "$aws/things/t/jobs/notify-next",
        "$aws/things/t/shadow/get",
    ]
    for topic in answers:
        assert not is_request_topic(topic)
        assert not any(topic_matches(f, topic) for f in REQUEST_FILTERS)  # never echoed back


def test_a_job_is_announced_started_and_finished(wire: Wire) -> None:
    store = wire.store
    store.create_job("fw", {"url": "x"}, [wire.thing])
    # (the announcement went out before this wire listened: ask instead)
    kind, pending = wire.ask("get", {"clientToken": "c1"})
    assert kind == "accepted" and pending["clientToken"] == "c1"
    assert [j["jobId"] for j in pending["queuedJobs"]] == ["fw"] and pending["inProgressJobs"] == []
    assert pending["timestamp"] == int(T0.timestamp())
    parsed = iotjobs.GetPendingJobExecutionsResponse.from_payload(pending)
    assert parsed.queued_jobs[0].version_number == 1

    kind, started = wire.ask("start-next", {"stepTimeoutInMinutes": 5, "clientToken": "c2"})
    assert kind == "accepted" and started["clientToken"] == "c2"
    execution = started["execution"]
    assert execution["status"] == "IN_PROGRESS" and execution["jobDocument"] == {"url": "x"}
    assert execution["thingName"] == wire.thing and execution["versionNumber"] == 2
    assert iotjobs.StartNextJobExecutionResponse.from_payload(started).execution.job_id == "fw"

    kind, updated = wire.ask(
        "fw/update",
        {
            "status": "SUCCEEDED",
            "expectedVersion": 2,
            "includeJobExecutionState": True,
            "includeJobDocument": True,
            "clientToken": "c3",
        },
    )
    assert kind == "accepted"
    assert updated["executionState"] == {
        "status": "SUCCEEDED",
        "statusDetails": {},
        "versionNumber": 3,
    }
    assert updated["jobDocument"] == {"url": "x"}
    # The answer comes first, then what the change announced: the list is empty now.
    assert [t.rsplit("/", 1)[1] for t, _ in wire.sent] == ["accepted", "notify", "notify-next"]
    assert wire.heard("notify") == [{"timestamp": int(T0.timestamp()), "jobs": {}}]
    assert wire.heard("notify-next") == [{"timestamp": int(T0.timestamp())}]

    kind, started = wire.ask("start-next", {})
    assert kind == "accepted" and "execution" not in started


def test_an_update_without_extras_answers_the_bare_acceptance(wire: Wire) -> None:
    wire.store.create_job("j", {}, [wire.thing])
    kind, answer = wire.ask("j/update", {"status": "IN_PROGRESS"})
    assert kind == "accepted" and set(answer) == {"timestamp"}


def test_a_new_job_is_announced_to_its_thing(wire: Wire) -> None:
    wire.store.create_job("a", {"n": 1}, [wire.thing])
    (notify,) = wire.heard("notify")
    assert [j["jobId"] for j in notify["jobs"]["QUEUED"]] == ["a"]
    (nxt,) = wire.heard("notify-next")
    assert nxt["execution"]["jobId"] == "a" and nxt["execution"]["jobDocument"] == {"n": 1}
    parsed = iotjobs.NextJobExecutionChangedEvent.from_payload(nxt)
    assert parsed.execution.status == "QUEUED"
    wire.sent.clear()
    wire.store.create_job("b", {}, [wire.thing])
    assert wire.heard("notify-next") == []  # the next job is still "a"
    (notify,) = wire.heard("notify")
    event = iotjobs.JobExecutionsChangedEvent.from_payload(notify)
    assert [j.job_id for j in event.jobs["QUEUED"]] == ["a", "b"]


def test_notify_lists_at_most_ten(wire: Wire) -> None:
    for n in range(12):
        wire.store.create_job(f"j{n:02}", {}, [wire.thing])
    assert len(wire.heard("notify")[-1]["jobs"]["QUEUED"]) == 10
    _, pending = wire.ask("get")
    assert len(pending["queuedJobs"]) == 12  # a get lists them all


def test_describe_an_execution_and_the_next_one(wire: Wire) -> None:
    wire.store.create_job("j", {"d": 1}, [wire.thing])
    kind, described = wire.ask("j/get", {"clientToken": "t"})
    assert kind == "accepted" and described["execution"]["jobDocument"] == {"d": 1}
    kind, bare = wire.ask("j/get", {"includeJobDocument": False, "executionNumber": 1})
    assert "jobDocument" not in bare["execution"]
    kind, nxt = wire.ask("$next/get")
    assert kind == "accepted" and nxt["execution"]["jobId"] == "j"
    wire.ask("j/update", {"status": "REJECTED", "statusDetails": {"why": "busy"}})
    kind, nxt = wire.ask("$next/get")
    assert kind == "accepted" and "execution" not in nxt
    kind, ended = wire.ask("j/get")
    assert ended["execution"]["status"] == "REJECTED"
    assert ended["execution"]["statusDetails"] == {"why": "busy"}


@pytest.mark.parametrize(
    ("suffix", "body", "code"),
    [
        ("j/update", {"status": "SUCCEEDED", "expectedVersion": 5}, "VersionMismatch"),
        ("j/update", {"status": "QUEUED"}, "InvalidRequest"),
        ("j/update", {"status": "SUCCEEDED", "executionNumber": 9}, "ResourceNotFound"),
        ("other/update", {"status": "SUCCEEDED"}, "ResourceNotFound"),
        ("bad$id/update", {"status": "SUCCEEDED"}, "ResourceNotFound"),
        ("other/get", {}, "ResourceNotFound"),
        ("start-next", {"stepTimeoutInMinutes": 0}, "InvalidRequest"),
        ("get", {"clientToken": 5}, "InvalidRequest"),
    ],
)
def test_rejections_carry_awss_code_and_the_client_token(
    wire: Wire, suffix: str, body: dict[str, Any], code: str
) -> None:
    wire.store.create_job("j", {}, [wire.thing])
    token = {"clientToken": "tok"} if "clientToken" not in body else {}
    kind, error = wire.ask(suffix, {**body, **token})
    assert kind == "rejected" and error["code"] == code
    if token:
        assert error["clientToken"] == "tok"
    parsed = iotjobs.RejectedError.from_payload(error)
    assert parsed.code == code and parsed.message
    if code == "VersionMismatch":
        assert error["executionState"]["versionNumber"] == 1


def test_payloads_that_are_not_json_are_invalid_json(wire: Wire) -> None:
    kind, error = wire.ask("get", b"{nope")
    assert kind == "rejected" and error["code"] == "InvalidJson"
    assert wire.ask("get", b"")[0] == "accepted"


def test_a_timed_out_execution_is_refused_and_announced(wire: Wire) -> None:
    store = wire.store
    now = [T0]
    store.clock = lambda: now[0]
    store.create_job("j", {}, [wire.thing])
    store.create_job("k", {}, [wire.thing])
    wire.ask("start-next", {"stepTimeoutInMinutes": 1})
    now[0] = T0 + timedelta(minutes=2)
    kind, error = wire.ask("j/update", {"status": "SUCCEEDED", "clientToken": "late"})
    assert kind == "rejected" and error["code"] == "TerminalStateReached"
    assert error["executionState"]["status"] == "TIMED_OUT" and error["clientToken"] == "late"
    # The timeout changed the list and the next job: announced after the answer.
    (nxt,) = wire.heard("notify-next")
    assert nxt["execution"]["jobId"] == "k"


def test_an_internal_failure_is_an_internal_error_answer(wire: Wire) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database on fire")

    wire.store.pending = broken  # type: ignore[method-assign]
    kind, error = wire.ask("get", {"clientToken": "x"})
    assert kind == "rejected" and error["code"] == "InternalError" and error["clientToken"] == "x"


def test_other_topics_are_not_served(wire: Wire) -> None:
    assert not wire.service.handle(f"$aws/things/{wire.thing}/jobs/notify", b"{}")
    assert not wire.service.handle(f"$aws/things/{wire.thing}/shadow/update", b"{}")
    assert wire.sent == []
