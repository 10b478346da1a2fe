"""AWS IoT Jobs semantics as a pure state machine: statuses, transitions, requests, answers.

Nothing here does I/O or reads a clock: callers pass ``now`` (a timezone-aware datetime)
and persist the returned ``Execution`` themselves. The cloud's job store drives this
module; the documents it renders are the ones AWS IoT Jobs publishes on its MQTT topics,
so the official Device SDK jobs clients (``awsiot.iotjobs``) parse them.

A job execution's life (``-d->`` a device's update, ``-c->`` the cloud's doing)::

    QUEUED ──d──> IN_PROGRESS ──d──> IN_PROGRESS   (new statusDetails / step timer)
      │               │
      │──d──> SUCCEEDED | FAILED | REJECTED <──d──│
      │──c──> CANCELED | REMOVED                  │──c (forced)──> CANCELED | REMOVED
                                                  │──c (a timer ran out)──> TIMED_OUT

What AWS documents, and this module does:

- Devices may set IN_PROGRESS, SUCCEEDED, FAILED and REJECTED, from QUEUED or
  IN_PROGRESS; any other status is InvalidRequest. The six other states are terminal:
  nothing changes them again.
- Every accepted update adds one to ``versionNumber`` (a queued execution is version 1);
  an update whose ``expectedVersion`` differs is refused with VersionMismatch, and the
  rejection carries the current ``executionState``.
- ``statusDetails`` (at most 10 string pairs) replaces the stored map when given, and is
  left alone when not.
- ``stepTimeoutInMinutes`` (1-10080), given when a device sets IN_PROGRESS, (re)starts a
  step timer; the job's ``inProgressTimeoutInMinutes`` runs from the first IN_PROGRESS and
  is never reset. When either runs out the execution becomes TIMED_OUT — a failure.
- A thing's pending executions are listed IN_PROGRESS first, then QUEUED, each by queue
  time (FIFO); the first of that list is its next job.

Where AWS is vague, the choices made are:

- An update of an execution the device itself ended (SUCCEEDED, FAILED, REJECTED) is
  InvalidStateTransition; of one the cloud ended (CANCELED, REMOVED, TIMED_OUT) it is
  TerminalStateReached, so a device can tell "you already reported" from "stop working
  on it". Both carry the ``executionState``.
- An execution whose timer has run out is timed out before a device's request is served,
  even when the cloud's periodic sweep has not yet got to it: a late success report is
  refused with TerminalStateReached, never accepted.
- StartNextPendingJobExecution on a thing whose next execution is already IN_PROGRESS
  returns it; given statusDetails or stepTimeoutInMinutes it applies them as an
  IN_PROGRESS update would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from edgeloop.core.errors import EdgeloopError

__all__ = [
    "DEVICE_STATUSES",
    "ENDED_BY_CLOUD",
    "MAX_STATUS_DETAILS",
    "MAX_TIMEOUT_MINUTES",
    "PENDING",
    "TERMINAL",
    "CloudRefusal",
    "DescribeRequest",
    "Execution",
    "ExecutionStatus",
    "JobRejection",
    "JobStatus",
    "PendingRequest",
    "RejectCode",
    "StartNextRequest",
    "UpdateRequest",
    "end_by_cloud",
    "epoch",
    "expired",
    "is_job_id",
    "parse_describe",
    "parse_payload",
    "parse_pending",
    "parse_start_next",
    "parse_status_details",
    "parse_update",
    "pending_order",
    "queued",
    "start",
    "update",
]


class ExecutionStatus(StrEnum):
    """The status of one job execution (AWS's JobExecutionStatus)."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    REJECTED = "REJECTED"
    CANCELED = "CANCELED"
    REMOVED = "REMOVED"


class JobStatus(StrEnum):
    """The status of a job as a whole."""

    IN_PROGRESS = "IN_PROGRESS"
    CANCELED = "CANCELED"
    COMPLETED = "COMPLETED"


class RejectCode(StrEnum):
    """The ``code`` of a rejection document (AWS's RejectedErrorCode)."""

    INVALID_TOPIC = "InvalidTopic"
    INVALID_JSON = "InvalidJson"
    INVALID_REQUEST = "InvalidRequest"
    INVALID_STATE_TRANSITION = "InvalidStateTransition"
    RESOURCE_NOT_FOUND = "ResourceNotFound"
    VERSION_MISMATCH = "VersionMismatch"
    INTERNAL_ERROR = "InternalError"
    REQUEST_THROTTLED = "RequestThrottled"
    TERMINAL_STATE_REACHED = "TerminalStateReached"


S = ExecutionStatus
PENDING: Final = frozenset({S.QUEUED, S.IN_PROGRESS})
TERMINAL: Final = frozenset(set(S) - PENDING)
DEVICE_STATUSES: Final = frozenset({S.IN_PROGRESS, S.SUCCEEDED, S.FAILED, S.REJECTED})
ENDED_BY_CLOUD: Final = frozenset({S.CANCELED, S.REMOVED, S.TIMED_OUT})

MAX_TIMEOUT_MINUTES: Final = 10080  # 7 days, AWS's bound for both timers
MAX_STATUS_DETAILS: Final = 10
MAX_DETAIL_KEY: Final = 128
MAX_DETAIL_VALUE: Final = 1024
MAX_CLIENT_TOKEN: Final = 64
MAX_JOB_ID: Final = 64
_JOB_ID: Final = re.compile(r"[a-zA-Z0-9_-]+")
_DETAIL_KEY: Final = re.compile(r"[a-zA-Z0-9:_-]+")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def is_job_id(job_id: object) -> bool:
    """True when AWS IoT would accept ``job_id`` (1-64 of a-z, A-Z, 0-9, '_', '-')."""
    return (
        isinstance(job_id, str)
        and 0 < len(job_id) <= MAX_JOB_ID
        and _JOB_ID.fullmatch(job_id) is not None
    )


def epoch(when: datetime) -> int:
    """A time as AWS IoT Jobs writes it: whole seconds since the epoch."""
    return int(when.timestamp())


# --- rejections ----------------------------------------------------------------------------


class JobRejection(EdgeloopError):
    """A device's jobs request was refused; ``to_document`` renders AWS's error document."""

    def __init__(
        self,
        code: RejectCode,
        message: str,
        *,
        execution_state: Mapping[str, Any] | None = None,
        client_token: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.execution_state = execution_state
        self.client_token = client_token
        super().__init__(f"{code}: {message}")

    def to_document(self, now: datetime) -> dict[str, Any]:
        """``{code, message, timestamp, clientToken?, executionState?}``."""
        document: dict[str, Any] = {
            "code": str(self.code),
            "message": self.message,
            "timestamp": epoch(now),
        }
        if self.client_token is not None:
            document["clientToken"] = self.client_token
        if self.execution_state is not None:
            document["executionState"] = dict(self.execution_state)
        return document


def _invalid(message: str) -> JobRejection:
    return JobRejection(RejectCode.INVALID_REQUEST, message)


# --- one execution -------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """The changing part of one job execution, as the state machine sees it."""

    status: ExecutionStatus
    version: int
    queued_at: datetime
    last_updated_at: datetime
    status_details: Mapping[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    step_deadline: datetime | None = None  # the device's step timer
    run_deadline: datetime | None = None  # the job's in-progress timer

    @property
    def timeout_at(self) -> datetime | None:
        """When this execution times out if nothing ends it first (None: never)."""
        if self.status is not S.IN_PROGRESS:
            return None
        deadlines = [d for d in (self.step_deadline, self.run_deadline) if d is not None]
        return min(deadlines) if deadlines else None

    def state_document(self) -> dict[str, Any]:
        """AWS's JobExecutionState: ``{status, statusDetails, versionNumber}``."""
        return {
            "status": str(self.status),
            "statusDetails": dict(self.status_details),
            "versionNumber": self.version,
        }


def queued(now: datetime) -> Execution:
    """A new execution, waiting for its device."""
    return Execution(status=S.QUEUED, version=1, queued_at=now, last_updated_at=now)


def expired(execution: Execution, now: datetime) -> bool:
    """Whether a timer of this IN_PROGRESS execution has run out at ``now``."""
    deadline = execution.timeout_at
    return deadline is not None and deadline <= now


def _ended(execution: Execution, status: ExecutionStatus, now: datetime) -> Execution:
    return replace(
        execution,
        status=status,
        version=execution.version + 1,
        last_updated_at=now,
        step_deadline=None,
        run_deadline=None,
    )


def _in_progress(
    execution: Execution,
    now: datetime,
    *,
    status_details: Mapping[str, str] | None,
    step_timeout: int | None,
    job_timeout: int | None,
) -> Execution:
    started_at = execution.started_at or now
    run_deadline = execution.run_deadline
    if execution.status is S.QUEUED and job_timeout is not None:
        run_deadline = started_at + timedelta(minutes=job_timeout)
    step_deadline = execution.step_deadline
    if step_timeout is not None:
        step_deadline = now + timedelta(minutes=step_timeout)
    return replace(
        execution,
        status=S.IN_PROGRESS,
        version=execution.version + 1,
        last_updated_at=now,
        started_at=started_at,
        status_details=dict(status_details)
        if status_details is not None
        else execution.status_details,
        step_deadline=step_deadline,
        run_deadline=run_deadline,
    )


def _refuse_terminal(execution: Execution) -> JobRejection:
    state = execution.state_document()
    if execution.status in ENDED_BY_CLOUD:
        return JobRejection(
            RejectCode.TERMINAL_STATE_REACHED,
            f"the job execution is {execution.status}: the cloud ended it, stop working on it",
            execution_state=state,
        )
    return JobRejection(
        RejectCode.INVALID_STATE_TRANSITION,
        f"the job execution is {execution.status}, a terminal status that cannot change",
        execution_state=state,
    )


# --- transitions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateRequest:
    """A parsed UpdateJobExecution request."""

    status: ExecutionStatus
    status_details: Mapping[str, str] | None = None
    expected_version: int | None = None
    execution_number: int | None = None
    include_state: bool = False
    include_document: bool = False
    step_timeout: int | None = None
    client_token: str | None = None


def update(
    execution: Execution, request: UpdateRequest, now: datetime, *, job_timeout: int | None
) -> Execution:
    """Apply a device's update; JobRejection (nothing changes) when it is refused.

    ``execution`` must already have been timed out if it expired (see ``expired``).
    """
    if execution.status in TERMINAL:
        raise _refuse_terminal(execution)
    if request.expected_version is not None and request.expected_version != execution.version:
        raise JobRejection(
            RejectCode.VERSION_MISMATCH,
            f"expectedVersion {request.expected_version} does not match the job execution's "
            f"version {execution.version}",
            execution_state=execution.state_document(),
        )
    if request.status is S.IN_PROGRESS:
        return _in_progress(
            execution,
            now,
            status_details=request.status_details,
            step_timeout=request.step_timeout,
            job_timeout=job_timeout,
        )
    ended = _ended(execution, request.status, now)
    if request.status_details is not None:
        ended = replace(ended, status_details=dict(request.status_details))
    return ended


def start(
    execution: Execution,
    now: datetime,
    *,
    status_details: Mapping[str, str] | None = None,
    step_timeout: int | None = None,
    job_timeout: int | None = None,
) -> Execution:
    """StartNextPendingJobExecution on the thing's next execution (QUEUED or IN_PROGRESS)."""
    if execution.status is S.IN_PROGRESS and status_details is None and step_timeout is None:
        return execution
    if execution.status not in PENDING:
        raise _refuse_terminal(execution)
    return _in_progress(
        execution,
        now,
        status_details=status_details,
        step_timeout=step_timeout,
        job_timeout=job_timeout,
    )


class CloudRefusal(EdgeloopError):
    """The cloud may not end this execution (it is terminal, or running and not forced)."""


def end_by_cloud(
    execution: Execution, status: ExecutionStatus, now: datetime, *, force: bool = False
) -> Execution:
    """End an execution from the cloud: CANCELED or REMOVED (QUEUED, or IN_PROGRESS with
    ``force``) or TIMED_OUT (IN_PROGRESS only). CloudRefusal says why not."""
    if status not in ENDED_BY_CLOUD:
        raise ValueError(
            f"the cloud ends executions as CANCELED, REMOVED or TIMED_OUT, not {status}"
        )
    if execution.status in TERMINAL:
        raise CloudRefusal(f"it is already {execution.status}")
    if status is S.TIMED_OUT and execution.status is not S.IN_PROGRESS:
        raise CloudRefusal(f"only an IN_PROGRESS execution times out, it is {execution.status}")
    if execution.status is S.IN_PROGRESS and status is not S.TIMED_OUT and not force:
        raise CloudRefusal("it is IN_PROGRESS on its device: pass force to stop it anyway")
    return _ended(execution, status, now)


def pending_order(
    status: ExecutionStatus, queued_at: datetime, sequence: int
) -> tuple[int, datetime, int]:
    """Sort key of a thing's pending list: IN_PROGRESS first, then by queue time (FIFO);
    ``sequence`` (the order executions were created in) breaks ties."""
    return (0 if status is S.IN_PROGRESS else 1, queued_at, sequence)


# --- requests --------------------------------------------------------------------------------


def parse_payload(payload: bytes | str | None) -> dict[str, Any]:
    """A request body as a JSON object; an empty body is ``{}``. InvalidJson otherwise."""
    if payload is None or payload in (b"", ""):
        return {}
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        data = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise JobRejection(
            RejectCode.INVALID_JSON, "the request is not valid UTF-8 encoded JSON"
        ) from err
    if not isinstance(data, dict):
        raise JobRejection(RejectCode.INVALID_JSON, "the request must be a JSON object")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _client_token(body: Mapping[str, Any]) -> str | None:
    token = body.get("clientToken")
    if token is None:
        return None
    if (
        not isinstance(token, str)
        or not 0 < len(token.encode("utf-8", "replace")) <= MAX_CLIENT_TOKEN
    ):
        raise _invalid(f"clientToken must be a string of 1-{MAX_CLIENT_TOKEN} bytes")
    return token


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} must be an integer")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _invalid(f"{name} must be {bound}, not {value}")
    return value


def _boolean(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be true or false")
    return value


def _step_timeout(body: Mapping[str, Any]) -> int | None:
    return _integer(body, "stepTimeoutInMinutes", 1, MAX_TIMEOUT_MINUTES)


def parse_status_details(details: object) -> dict[str, str]:
    """A statusDetails map, checked as AWS checks it; InvalidRequest naming what is wrong."""
    if not isinstance(details, dict):
        raise _invalid("statusDetails must be an object of string names to string values")
    if len(details) > MAX_STATUS_DETAILS:
        raise _invalid(
            f"statusDetails has {len(details)} entries: at most {MAX_STATUS_DETAILS} are allowed"
        )
    for key, value in details.items():
        if len(key) > MAX_DETAIL_KEY or _DETAIL_KEY.fullmatch(key) is None:
            raise _invalid(
                f"statusDetails name {key!r} must be 1-{MAX_DETAIL_KEY} characters from "
                "a-z, A-Z, 0-9, ':', '_' and '-'"
            )
        if not isinstance(value, str):
            raise _invalid(f"statusDetails.{key} must be a string")
        if not 0 < len(value) <= MAX_DETAIL_VALUE or _CONTROL.search(value):
            raise _invalid(
                f"statusDetails.{key} must be 1-{MAX_DETAIL_VALUE} characters without "
                "control characters"
            )
    return dict(details)


def _details(body: Mapping[str, Any]) -> dict[str, str] | None:
    raw = body.get("statusDetails")
    return None if raw is None else parse_status_details(raw)


def parse_update(body: Mapping[str, Any]) -> UpdateRequest:
    """An UpdateJobExecution request; InvalidRequest naming the field when it is not one."""
    token = _client_token(body)
    try:
        raw = body.get("status")
        if raw is None:
            raise _invalid("status is required: IN_PROGRESS, SUCCEEDED, FAILED or REJECTED")
        if not isinstance(raw, str) or raw not in {str(s) for s in DEVICE_STATUSES}:
            raise _invalid(
                f"status {raw!r} cannot be set by a device: use IN_PROGRESS, SUCCEEDED, "
                "FAILED or REJECTED"
            )
        return UpdateRequest(
            status=S(raw),
            status_details=_details(body),
            expected_version=_integer(body, "expectedVersion", 0),
            execution_number=_integer(body, "executionNumber", 1),
            include_state=_boolean(body, "includeJobExecutionState", False),
            include_document=_boolean(body, "includeJobDocument", False),
            step_timeout=_step_timeout(body),
            client_token=token,
        )
    except JobRejection as err:
        err.client_token = token
        raise


@dataclass(frozen=True)
class StartNextRequest:
    """A parsed StartNextPendingJobExecution request."""

    status_details: Mapping[str, str] | None = None
    step_timeout: int | None = None
    client_token: str | None = None


def parse_start_next(body: Mapping[str, Any]) -> StartNextRequest:
    """A StartNextPendingJobExecution request; InvalidRequest naming the field."""
    token = _client_token(body)
    try:
        return StartNextRequest(_details(body), _step_timeout(body), token)
    except JobRejection as err:
        err.client_token = token
        raise


@dataclass(frozen=True)
class DescribeRequest:
    """A parsed DescribeJobExecution request."""

    execution_number: int | None = None
    include_document: bool = True
    client_token: str | None = None


def parse_describe(body: Mapping[str, Any]) -> DescribeRequest:
    """A DescribeJobExecution request; InvalidRequest naming the field."""
    token = _client_token(body)
    try:
        return DescribeRequest(
            _integer(body, "executionNumber", 1),
            _boolean(body, "includeJobDocument", True),
            token,
        )
    except JobRejection as err:
        err.client_token = token
        raise


@dataclass(frozen=True)
class PendingRequest:
    """A parsed GetPendingJobExecutions request."""

    client_token: str | None = None


def parse_pending(body: Mapping[str, Any]) -> PendingRequest:
    """A GetPendingJobExecutions request."""
    return PendingRequest(_client_token(body))
