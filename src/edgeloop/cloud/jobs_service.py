"""Jobs over MQTT, on AWS IoT Jobs' topics, so devices written for AWS IoT work as is.

Requests arrive on ``$aws/things/{thing}/jobs/get`` (the pending list), ``.../start-next``,
``.../{jobId}/get`` (describe; ``$next`` is the next pending one) and ``.../{jobId}/update``;
answers go to the same topic plus ``/accepted`` or ``/rejected``, echoing the request's
``clientToken`` (the Device SDK's request-response client matches answers by it).
``jobs/notify`` (the pending list, at most 10) and ``jobs/notify-next`` (the next
execution, with its document; no ``execution`` when none is left) follow every change to a
thing's pending list or next job, whoever made it. This module only maps topics and
payloads onto a ``JobStore``; the MQTT connection that feeds it belongs to the cloud's
services.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeloop.cloud.jobs import JobChanges, JobStore, no_execution
from edgeloop.core import jobstate
from edgeloop.core.jobstate import ExecutionStatus, JobRejection, RejectCode, epoch

__all__ = [
    "REQUEST_FILTERS",
    "JobsRequest",
    "JobsService",
    "is_request_topic",
    "notify_topics",
    "parse_request_topic",
]

log = logging.getLogger("edgeloop.cloud.jobs")

MAX_NOTIFY_LIST = 10  # AWS's ListNotification carries at most 10 pending executions

# Request topics only: the answers and notifications published under the same prefix are
# not served, so they are not subscribed to.
REQUEST_FILTERS = (
    "$aws/things/+/jobs/get",
    "$aws/things/+/jobs/start-next",
    "$aws/things/+/jobs/+/get",
    "$aws/things/+/jobs/+/update",
)
_THING_REQUEST = re.compile(r"^\$aws/things/([^/]+)/jobs/(get|start-next)$")
_JOB_REQUEST = re.compile(r"^\$aws/things/([^/]+)/jobs/([^/]+)/(get|update)$")

Publish = Callable[[str, bytes], None]


@dataclass(frozen=True)
class JobsRequest:
    """A request topic, taken apart."""

    thing: str
    job_id: str | None  # None for get (pending) and start-next
    operation: str  # "pending", "start-next", "describe" or "update"

    @property
    def topic(self) -> str:
        prefix = f"$aws/things/{self.thing}/jobs"
        if self.operation == "pending":
            return f"{prefix}/get"
        if self.operation == "start-next":
            return f"{prefix}/start-next"
        return f"{prefix}/{self.job_id}/{'get' if self.operation == 'describe' else 'update'}"


def parse_request_topic(topic: str) -> JobsRequest | None:
    """The request a topic carries, or None when it is not a jobs request."""
    match = _THING_REQUEST.match(topic)
    if match is not None:
        operation = "pending" if match.group(2) == "get" else "start-next"
        return JobsRequest(match.group(1), None, operation)
    match = _JOB_REQUEST.match(topic)
    if match is not None:
        operation = "describe" if match.group(3) == "get" else "update"
        return JobsRequest(match.group(1), match.group(2), operation)
    return None


def is_request_topic(topic: str) -> bool:
    """Whether ``topic`` is a jobs request this service serves."""
    return parse_request_topic(topic) is not None


def notify_topics(thing: str) -> tuple[str, str]:
    """``jobs/notify`` and ``jobs/notify-next`` of a thing."""
    return f"$aws/things/{thing}/jobs/notify", f"$aws/things/{thing}/jobs/notify-next"


def _dump(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class JobsService:
    """Answers devices' jobs requests and announces their queues, as AWS IoT Jobs does.

    ``handle`` may be called from any thread; it holds the store's lock while it serves a
    request, and the requester hears its answer before the notifications it caused.
    """

    def __init__(self, store: JobStore, publish: Publish) -> None:
        self.store = store
        self.publish = publish
        self._local = threading.local()  # .held: notifications waiting for an answer
        store.listeners.append(self._announce)

    def handle(self, topic: str, payload: bytes) -> bool:
        """Serve one message; False when ``topic`` is not a jobs request."""
        request = parse_request_topic(topic)
        if request is None:
            return False
        held: list[tuple[str, bytes]] = []
        with self.store.lock:
            self._local.held = held
            try:
                suffix, answer = self._serve(request, payload)
            finally:
                self._local.held = None
            self.publish(f"{request.topic}/{suffix}", _dump(answer))
            for out in held:
                self.publish(*out)
        return True

    def _serve(self, request: JobsRequest, payload: bytes) -> tuple[str, dict[str, Any]]:
        store = self.store
        token: str | None = None
        try:
            body = jobstate.parse_payload(payload)
            raw_token = body.get("clientToken")
            token = raw_token if isinstance(raw_token, str) else None
            if request.operation == "pending":
                pending = jobstate.parse_pending(body)
                rows = store.pending(request.thing)
                answer: dict[str, Any] = {
                    "inProgressJobs": [
                        e.summary() for e in rows if e.status is ExecutionStatus.IN_PROGRESS
                    ],
                    "queuedJobs": [e.summary() for e in rows if e.status is ExecutionStatus.QUEUED],
                }
                return "accepted", self._stamp(answer, pending.client_token)
            if request.operation == "start-next":
                start = jobstate.parse_start_next(body)
                started = store.start_next(request.thing, start)
                answer = {} if started is None else {"execution": started[0].data(started[1])}
                return "accepted", self._stamp(answer, start.client_token)
            assert request.job_id is not None
            if request.operation == "describe":
                describe = jobstate.parse_describe(body)
                found = store.describe_execution(request.thing, request.job_id, describe)
                answer = {}
                if found is not None:
                    document = found[1] if describe.include_document else None
                    answer["execution"] = found[0].data(document)
                return "accepted", self._stamp(answer, describe.client_token)
            update = jobstate.parse_update(body)
            if not jobstate.is_job_id(request.job_id):
                raise no_execution(request.job_id, request.thing, None)
            execution, document = store.update_execution(request.thing, request.job_id, update)
            answer = {}
            if update.include_state:
                answer["executionState"] = execution.state_document()
            if update.include_document:
                answer["jobDocument"] = document
            return "accepted", self._stamp(answer, update.client_token)
        except JobRejection as err:
            if err.client_token is None:
                err.client_token = token
            return "rejected", err.to_document(store.clock())
        except Exception:
            log.exception("jobs request on %s failed", request.topic)
            failure = JobRejection(
                RejectCode.INTERNAL_ERROR,
                "the request could not be served; try again later",
                client_token=token,
            )
            return "rejected", failure.to_document(store.clock())

    def _stamp(self, answer: dict[str, Any], token: str | None) -> dict[str, Any]:
        answer["timestamp"] = epoch(self.store.clock())
        if token is not None:
            answer["clientToken"] = token
        return answer

    def _announce(self, changes: JobChanges) -> None:
        now = epoch(self.store.clock())
        out: list[tuple[str, bytes]] = []
        for queue in changes.queues:
            notify, notify_next = notify_topics(queue.thing_name)
            if queue.pending_changed:
                listed = queue.pending[:MAX_NOTIFY_LIST]
                jobs: dict[str, list[dict[str, Any]]] = {}
                for execution in listed:
                    jobs.setdefault(str(execution.status), []).append(execution.summary())
                out.append((notify, _dump({"timestamp": now, "jobs": jobs})))
            if queue.next_changed:
                document: dict[str, Any] = {"timestamp": now}
                if queue.pending:
                    document["execution"] = queue.pending[0].data(queue.next_document)
                out.append((notify_next, _dump(document)))
        held: list[tuple[str, bytes]] | None = getattr(self._local, "held", None)
        if held is not None:
            held.extend(out)
            return
        for topic, payload in out:
            self.publish(topic, payload)
