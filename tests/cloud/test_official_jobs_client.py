"""The official AWS IoT Device SDK jobs clients, unmodified, against edgeloop's cloud: the
classic ``IotJobsClient`` and the request-response ``IotJobsClientV2``, each over MQTT 3.1.1
and MQTT 5, with mutual TLS and a thing's certificate."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from awscrt import mqtt, mqtt_request_response
from awsiot import ServiceStreamOptions, V2ServiceException, iotjobs

from edgeloop.cloud.db import utcnow
from edgeloop.cloud.jobs import JobStore
from tests.cloud.test_cloud_up import RunningCloud, _device
from tests.cloud.test_official_shadow_client import _mqtt5, _mqtt311

QOS = mqtt.QoS.AT_LEAST_ONCE
WAIT = 10


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def _store(cloud: RunningCloud) -> JobStore:
    assert cloud.cloud.ctx is not None
    return cloud.cloud.ctx.jobs


def _create(cloud: RunningCloud, thing: str, document: dict[str, Any]) -> str:
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    answer = cloud.api.post(
        "/jobs", json={"jobId": job_id, "document": document, "targets": [thing]}
    )
    assert answer.status_code == 201, answer.text
    return job_id


def _connect(
    cloud: RunningCloud, tmp_path: Path, protocol: str
) -> tuple[str, Any, Callable[[], None]]:
    thing, cert, key = _device(cloud, tmp_path)
    if protocol == "mqtt311":
        link = _mqtt311(cloud, thing, cert, key)
        return thing, link, lambda: link.disconnect().result(WAIT)
    link = _mqtt5(cloud, thing, cert, key)
    return thing, link, link.stop


class Inbox:
    """Messages of one kind, in arrival order, waited for one at a time."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self.items.put(item)

    def take(self, check: Callable[[Any], bool] = lambda _: True) -> Any:
        """The next message that passes ``check`` (earlier ones are dropped)."""
        while True:
            try:
                item = self.items.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError("no such message arrived in time") from None
            if check(item):
                return item


def _next_is(job_id: str | None) -> Callable[[Any], bool]:
    def check(event: Any) -> bool:
        execution = event.execution
        return (execution.job_id if execution is not None else None) == job_id

    return check


@pytest.mark.parametrize("protocol", ["mqtt311", "mqtt5"])
def test_the_classic_jobs_client_runs_jobs(
    cloud: RunningCloud, tmp_path: Path, protocol: str
) -> None:
    thing, link, close = _connect(cloud, tmp_path, protocol)
    client = iotjobs.IotJobsClient(link)
    nexts, lists = Inbox(), Inbox()
    started, updated, update_errors, pending, described = (Inbox() for _ in range(5))
    subscriptions = [
        client.subscribe_to_next_job_execution_changed_events(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), QOS, nexts.put
        ),
        client.subscribe_to_job_executions_changed_events(
            iotjobs.JobExecutionsChangedSubscriptionRequest(thing_name=thing), QOS, lists.put
        ),
        client.subscribe_to_start_next_pending_job_execution_accepted(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing),
            QOS,
            started.put,
        ),
        client.subscribe_to_update_job_execution_accepted(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
            QOS,
            updated.put,
        ),
        client.subscribe_to_update_job_execution_rejected(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
            QOS,
            update_errors.put,
        ),
        client.subscribe_to_get_pending_job_executions_accepted(
            iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing), QOS, pending.put
        ),
        client.subscribe_to_describe_job_execution_accepted(
            iotjobs.DescribeJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"),
            QOS,
            described.put,
        ),
    ]
    for subscribed, _topic in subscriptions:
        subscribed.result(WAIT)

    def start_next(**fields: Any) -> Any:
        request = iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing, **fields)
        client.publish_start_next_pending_job_execution(request, QOS).result(WAIT)
        return started.take(lambda r: r.client_token == fields.get("client_token"))

    def update(job_id: str, status: str, **fields: Any) -> None:
        request = iotjobs.UpdateJobExecutionRequest(
            thing_name=thing, job_id=job_id, status=status, **fields
        )
        client.publish_update_job_execution(request, QOS).result(WAIT)

    def get_pending() -> Any:
        token = uuid.uuid4().hex
        request = iotjobs.GetPendingJobExecutionsRequest(thing_name=thing, client_token=token)
        client.publish_get_pending_job_executions(request, QOS).result(WAIT)
        return pending.take(lambda r: r.client_token == token)

    def describe(job_id: str) -> Any:
        token = uuid.uuid4().hex
        request = iotjobs.DescribeJobExecutionRequest(
            thing_name=thing, job_id=job_id, client_token=token
        )
        client.publish_describe_job_execution(request, QOS).result(WAIT)
        return described.take(lambda r: r.client_token == token).execution

    try:
        # A job queued for the thing is announced on notify-next and notify.
        first = _create(cloud, thing, {"operation": "install", "version": "1.0.1"})
        event = nexts.take(_next_is(first))
        assert event.execution.status == "QUEUED"
        assert event.execution.job_document == {"operation": "install", "version": "1.0.1"}
        assert [j.job_id for j in lists.take().jobs["QUEUED"]] == [first]
        second = _create(cloud, thing, {"operation": "reboot"})
        assert [j.job_id for j in lists.take().jobs["QUEUED"]] == [first, second]
        assert [j.job_id for j in get_pending().queued_jobs] == [first, second]

        # Start it, trip on a stale version, then succeed.
        response = start_next(client_token="s1", status_details={"phase": "download"})
        execution = response.execution
        assert (execution.job_id, execution.status) == (first, "IN_PROGRESS")
        assert execution.version_number == 2 and execution.status_details == {"phase": "download"}
        assert execution.job_document["version"] == "1.0.1"
        update(first, "SUCCEEDED", expected_version=1, client_token="stale")
        error = update_errors.take(lambda e: e.client_token == "stale")
        assert error.code == iotjobs.RejectedErrorCode.VERSION_MISMATCH
        assert error.execution_state.version_number == 2
        update(
            first,
            "SUCCEEDED",
            expected_version=2,
            include_job_execution_state=True,
            client_token="ok",
        )
        accepted = updated.take(lambda r: r.client_token == "ok")
        assert accepted.execution_state.status == "SUCCEEDED"
        assert accepted.execution_state.version_number == 3
        assert nexts.take(_next_is(second)).execution.job_document == {"operation": "reboot"}

        # The second one fails.
        assert start_next(client_token="s2").execution.job_id == second
        update(second, "FAILED", status_details={"exitCode": "3"}, client_token="f")
        assert updated.take(lambda r: r.client_token == "f") is not None
        nexts.take(_next_is(None))
        assert describe(second).status_details == {"exitCode": "3"}
        assert describe(second).status == "FAILED"

        # A step timer runs out: the sweep ends it as TIMED_OUT, and a late report is refused.
        third = _create(cloud, thing, {"operation": "calibrate"})
        nexts.take(_next_is(third))
        assert start_next(client_token="s3", step_timeout_in_minutes=1).execution.job_id == third
        timed_out = _store(cloud).sweep_timeouts(utcnow() + timedelta(minutes=2))
        assert [(c.job_id, c.status) for c in timed_out] == [(third, "TIMED_OUT")]
        nexts.take(_next_is(None))
        assert describe(third).status == "TIMED_OUT"
        update(third, "SUCCEEDED", client_token="late")
        late = update_errors.take(lambda e: e.client_token == "late")
        assert late.code == iotjobs.RejectedErrorCode.TERMINAL_STATE_REACHED
        assert late.execution_state.status == "TIMED_OUT"

        # A job canceled while queued leaves the list; the next one moves up.
        fourth = _create(cloud, thing, {"operation": "a"})
        nexts.take(_next_is(fourth))
        fifth = _create(cloud, thing, {"operation": "b"})
        lists.take(lambda e: [j.job_id for j in e.jobs.get("QUEUED", [])] == [fourth, fifth])
        assert cloud.api.post(f"/jobs/{fourth}/cancel", json={}).json()["status"] == "CANCELED"
        nexts.take(_next_is(fifth))
        lists.take(lambda e: [j.job_id for j in e.jobs.get("QUEUED", [])] == [fifth])
        assert describe(fourth).status == "CANCELED"
        assert [j.job_id for j in get_pending().queued_jobs] == [fifth]

        counts = cloud.api.get(f"/things/{thing}/jobs").json()["counts"]
        assert {k: v for k, v in counts.items() if v} == {
            "SUCCEEDED": 1,
            "FAILED": 1,
            "TIMED_OUT": 1,
            "CANCELED": 1,
            "QUEUED": 1,
        }
    finally:
        close()


@pytest.mark.parametrize("protocol", ["mqtt311", "mqtt5"])
def test_the_request_response_jobs_client_runs_a_job(
    cloud: RunningCloud, tmp_path: Path, protocol: str
) -> None:
    thing, link, close = _connect(cloud, tmp_path, protocol)
    options = mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=4,
        max_streaming_subscriptions=2,
        operation_timeout_in_seconds=WAIT,
    )
    client = iotjobs.IotJobsClientV2(link, options)
    nexts = Inbox()
    subscribed: Future[None] = Future()

    def on_status(event: Any) -> None:
        established = mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED
        if event.type == established and not subscribed.done():
            subscribed.set_result(None)

    stream = client.create_next_job_execution_changed_stream(
        iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
        ServiceStreamOptions(
            incoming_event_listener=nexts.put, subscription_status_listener=on_status
        ),
    )
    stream.open()
    try:
        subscribed.result(WAIT)
        job_id = _create(cloud, thing, {"operation": "install"})
        assert nexts.take(_next_is(job_id)).execution.job_document == {"operation": "install"}

        response = client.start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing, step_timeout_in_minutes=5)
        ).result(WAIT)
        assert (response.execution.job_id, response.execution.status) == (job_id, "IN_PROGRESS")

        with pytest.raises(V2ServiceException) as refused:
            client.update_job_execution(
                iotjobs.UpdateJobExecutionRequest(
                    thing_name=thing, job_id=job_id, status="SUCCEEDED", expected_version=1
                )
            ).result(WAIT)
        assert refused.value.modeled_error.code == "VersionMismatch"

        done = client.update_job_execution(
            iotjobs.UpdateJobExecutionRequest(
                thing_name=thing,
                job_id=job_id,
                status="SUCCEEDED",
                expected_version=2,
                include_job_execution_state=True,
                include_job_document=True,
            )
        ).result(WAIT)
        assert done.execution_state.status == "SUCCEEDED"
        assert done.job_document == {"operation": "install"}
        nexts.take(_next_is(None))

        pending = client.get_pending_job_executions(
            iotjobs.GetPendingJobExecutionsRequest(thing_name=thing)
        ).result(WAIT)
        assert pending.queued_jobs == [] and pending.in_progress_jobs == []
        described = client.describe_job_execution(
            iotjobs.DescribeJobExecutionRequest(thing_name=thing, job_id=job_id)
        ).result(WAIT)
        assert described.execution.status == "SUCCEEDED"
        assert described.execution.version_number == 3
        with pytest.raises(V2ServiceException) as missing:
            client.describe_job_execution(
                iotjobs.DescribeJobExecutionRequest(thing_name=thing, job_id="no-such-job")
            ).result(WAIT)
        assert missing.value.modeled_error.code == "ResourceNotFound"
    finally:
        del stream, client  # (a stream has no close: it ends with its client)
        close()
