"""Jobs: remote operations queued for things, on AWS IoT Jobs' MQTT contract.

A job is a JSON document and a set of target things; each target's share of it is a *job
execution*, which its device starts, reports progress on and ends. Fleet deployments are
jobs: each hub's part of a deployment is one execution.

``JobStore`` keeps jobs and executions in the cloud's database and is the control side's
Python API (create, add targets, cancel, describe, count, sweep timeouts); the rules an
execution follows live in ``edgeloop.core.jobstate``. Listeners hear every committed
change: ``edgeloop.cloud.jobs_service`` turns the queue changes into ``jobs/notify`` and
``jobs/notify-next`` messages, and a rollout engine may follow executions' statuses.

Concurrency: every change runs in one database transaction, under the store's reentrant
``lock``; listeners are called after the commit, still under the lock, so the
notifications a thing receives follow the order of the changes. Reads take no lock. On
PostgreSQL the rows a change reads are locked (``FOR UPDATE``) as well.

Job status: a SNAPSHOT job (fixed targets) is COMPLETED once every execution has ended; a
CONTINUOUS job takes targets over time (``add_targets``, as a staged rollout adds waves)
and is COMPLETED only when told to (``complete_job``). Either may be CANCELED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from edgeloop.cloud.db import Base, Database, ThingRow, utcnow
from edgeloop.core import jobstate
from edgeloop.core.errors import ConflictError, NotFoundError, ValidationError
from edgeloop.core.jobstate import (
    PENDING,
    TERMINAL,
    CloudRefusal,
    DescribeRequest,
    Execution,
    ExecutionStatus,
    JobRejection,
    JobStatus,
    RejectCode,
    StartNextRequest,
    UpdateRequest,
    epoch,
)
from edgeloop.core.names import MAX_THING_NAME, is_thing_name

__all__ = [
    "ExecutionChange",
    "Job",
    "JobChanges",
    "JobExecution",
    "JobExecutionRow",
    "JobRow",
    "JobStore",
    "QueueChange",
    "no_execution",
]

log = logging.getLogger("edgeloop.cloud.jobs")

MAX_DOCUMENT_BYTES = 32 * 1024  # AWS's job document limit
MAX_DESCRIPTION = 2028
_CHUNK = 500  # names per IN (...) list
_ALL_STATUSES = ", ".join(f"'{s}'" for s in ExecutionStatus)

TargetSelection = Literal["SNAPSHOT", "CONTINUOUS"]
TARGET_SELECTIONS: tuple[TargetSelection, ...] = ("SNAPSHOT", "CONTINUOUS")

# --- tables ----------------------------------------------------------------------------------

_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


class JobRow(Base):
    """A job: its document, how its targets are chosen, its timeout and its status."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("status IN ('IN_PROGRESS', 'CANCELED', 'COMPLETED')", name="status"),
        CheckConstraint("target_selection IN ('SNAPSHOT', 'CONTINUOUS')", name="target_selection"),
        Index("ix_jobs_status", "status"),
    )

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    document: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    target_selection: Mapped[str] = mapped_column(String(16))
    in_progress_timeout_minutes: Mapped[int | None] = mapped_column(Integer)
    force_canceled: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]


class JobExecutionRow(Base):
    """One execution of a job on one thing; a retry is a new row with the next number.

    ``latest`` marks a thing's newest execution of a job (the one counted); ``timeout_at``
    is the earlier of the step and in-progress deadlines while IN_PROGRESS, else NULL, so
    the timeout sweep reads one small index.
    """

    __tablename__ = "job_executions"
    __table_args__ = (
        UniqueConstraint("job_id", "thing_name", "execution_number"),
        CheckConstraint(f"status IN ({_ALL_STATUSES})", name="status"),
        Index("ix_job_executions_job_id_latest_status", "job_id", "latest", "status"),
        Index("ix_job_executions_thing_name_status", "thing_name", "status"),
        Index("ix_job_executions_timeout_at", "timeout_at"),
    )

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.job_id", ondelete="CASCADE"))
    thing_name: Mapped[str] = mapped_column(
        String(MAX_THING_NAME), ForeignKey("things.name", ondelete="CASCADE")
    )
    execution_number: Mapped[int] = mapped_column(Integer)
    latest: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    version: Mapped[int] = mapped_column(Integer)
    queued_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    last_updated_at: Mapped[datetime]
    step_deadline: Mapped[datetime | None]
    run_deadline: Mapped[datetime | None]
    timeout_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)


# --- what the store returns --------------------------------------------------------------------


@dataclass(frozen=True)
class JobExecution:
    """One job execution, as read."""

    job_id: str
    thing_name: str
    execution_number: int
    status: ExecutionStatus
    status_details: Mapping[str, str]
    version: int
    queued_at: datetime
    started_at: datetime | None
    last_updated_at: datetime
    timeout_at: datetime | None
    reason: str | None  # why the cloud ended it (cancel reason, which timer ran out)
    latest: bool = True

    def summary(self) -> dict[str, Any]:
        """AWS's JobExecutionSummary (the pending lists of get and notify)."""
        out: dict[str, Any] = {
            "jobId": self.job_id,
            "queuedAt": epoch(self.queued_at),
            "lastUpdatedAt": epoch(self.last_updated_at),
            "versionNumber": self.version,
            "executionNumber": self.execution_number,
        }
        if self.started_at is not None:
            out["startedAt"] = epoch(self.started_at)
        return out

    def data(self, document: Mapping[str, Any] | None) -> dict[str, Any]:
        """AWS's JobExecutionData, with the job document when one is given."""
        out = self.summary()
        out.update(
            thingName=self.thing_name,
            status=str(self.status),
            statusDetails=dict(self.status_details),
        )
        if document is not None:
            out["jobDocument"] = dict(document)
        return out

    def state_document(self) -> dict[str, Any]:
        """AWS's JobExecutionState."""
        return {
            "status": str(self.status),
            "statusDetails": dict(self.status_details),
            "versionNumber": self.version,
        }


@dataclass(frozen=True)
class Job:
    """A job, with how many of its things' (latest) executions are in each status."""

    job_id: str
    description: str
    document: Mapping[str, Any]
    status: JobStatus
    target_selection: TargetSelection
    in_progress_timeout_minutes: int | None
    force_canceled: bool
    reason: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    counts: Mapping[ExecutionStatus, int]


@dataclass(frozen=True)
class ExecutionChange:
    """An execution was queued (``old_status`` None) or changed (status, details, timer)."""

    job_id: str
    thing_name: str
    execution_number: int
    old_status: ExecutionStatus | None
    status: ExecutionStatus
    version: int
    at: datetime
    reason: str | None = None

    @property
    def ended(self) -> bool:
        """Whether this change made the execution terminal."""
        return self.status in TERMINAL and self.old_status not in TERMINAL


@dataclass(frozen=True)
class QueueChange:
    """A thing's pending list (``pending_changed``) or next job (``next_changed``) changed.

    ``pending`` is the list after the change, in order (the first is the next job), and
    ``next_document`` the next job's document.
    """

    thing_name: str
    pending_changed: bool
    next_changed: bool
    pending: tuple[JobExecution, ...]
    next_document: Mapping[str, Any] | None


@dataclass(frozen=True)
class JobChanges:
    """What one committed operation changed; listeners receive one per operation."""

    executions: tuple[ExecutionChange, ...] = ()
    queues: tuple[QueueChange, ...] = ()
    jobs: tuple[tuple[str, JobStatus], ...] = ()  # jobs whose status changed, and to what

    def __bool__(self) -> bool:
        return bool(self.executions or self.queues or self.jobs)


JobListener = Callable[[JobChanges], None]
Clock = Callable[[], datetime]


# --- helpers -----------------------------------------------------------------------------------


def _chunks(names: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(names), _CHUNK):
        yield names[start : start + _CHUNK]


def _execution(row: JobExecutionRow) -> JobExecution:
    return JobExecution(
        job_id=row.job_id,
        thing_name=row.thing_name,
        execution_number=row.execution_number,
        status=ExecutionStatus(row.status),
        status_details=dict(row.status_details or {}),
        version=row.version,
        queued_at=row.queued_at,
        started_at=row.started_at,
        last_updated_at=row.last_updated_at,
        timeout_at=row.timeout_at,
        reason=row.reason,
        latest=row.latest,
    )


def _state(row: JobExecutionRow) -> Execution:
    return Execution(
        status=ExecutionStatus(row.status),
        version=row.version,
        queued_at=row.queued_at,
        last_updated_at=row.last_updated_at,
        status_details=dict(row.status_details or {}),
        started_at=row.started_at,
        step_deadline=row.step_deadline,
        run_deadline=row.run_deadline,
    )


def _order(row: JobExecutionRow) -> tuple[int, datetime, int]:
    return jobstate.pending_order(ExecutionStatus(row.status), row.queued_at, row.id)


def _check_job_id(job_id: object) -> str:
    if not jobstate.is_job_id(job_id):
        raise ValidationError(
            f"{job_id!r} is not a job ID: use 1-64 characters from a-z, A-Z, 0-9, '_' and '-'",
            field="jobId",
        )
    assert isinstance(job_id, str)
    return job_id


def _check_things(things: Iterable[str], field_name: str = "targets") -> list[str]:
    if isinstance(things, str | bytes):
        raise ValidationError("must be a list of thing names, not one string", field=field_name)
    seen: dict[str, None] = {}
    for index, thing in enumerate(things):
        if not is_thing_name(thing):
            raise ValidationError(
                f"{thing!r} is not a thing name: use 1-{MAX_THING_NAME} characters from "
                "a-z, A-Z, 0-9, ':', '_' and '-'",
                field=f"{field_name}[{index}]",
            )
        seen[thing] = None
    return list(seen)


def _check_document(document: object) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise ValidationError("must be a JSON object", field="document")
    try:
        size = len(json.dumps(document, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as err:
        raise ValidationError(f"is not JSON: {err}", field="document") from err
    if size > MAX_DOCUMENT_BYTES:
        raise ValidationError(
            f"is {size} bytes of JSON: a job document is at most {MAX_DOCUMENT_BYTES}",
            field="document",
        )
    return document


def _check_timeout(minutes: object) -> int | None:
    if minutes is None:
        return None
    if isinstance(minutes, bool) or not isinstance(minutes, int):
        raise ValidationError(
            "must be a whole number of minutes", field="timeoutConfig.inProgressTimeoutInMinutes"
        )
    if not 1 <= minutes <= jobstate.MAX_TIMEOUT_MINUTES:
        raise ValidationError(
            f"must be between 1 and {jobstate.MAX_TIMEOUT_MINUTES} minutes, not {minutes}",
            field="timeoutConfig.inProgressTimeoutInMinutes",
        )
    return minutes


def no_execution(
    job_id: str, thing: str, number: int | None, token: str | None = None
) -> JobRejection:
    """The ResourceNotFound rejection of a device's request about an unknown execution."""
    which = f" with executionNumber {number}" if number is not None else ""
    return JobRejection(
        RejectCode.RESOURCE_NOT_FOUND,
        f"thing {thing!r} has no execution of job {job_id!r}{which}",
        client_token=token,
    )


@dataclass
class _Tx:
    """The changes one transaction makes, and its things' pending lists before them."""

    session: Session
    now: datetime
    executions: list[ExecutionChange] = field(default_factory=list)
    jobs: list[tuple[str, JobStatus]] = field(default_factory=list)
    before: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def touched(self) -> list[str]:
        return list(self.before)


# --- the store ---------------------------------------------------------------------------------


class JobStore:
    """Jobs and job executions in the cloud's database; thread-safe (see the module doc)."""

    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self.db = db
        self.clock = clock
        self.lock = threading.RLock()
        self.listeners: list[JobListener] = []

    # == the control side ======================================================================

    def create_job(
        self,
        job_id: str,
        document: Mapping[str, Any],
        targets: Iterable[str] = (),
        *,
        description: str = "",
        in_progress_timeout_minutes: int | None = None,
        target_selection: TargetSelection = "SNAPSHOT",
    ) -> Job:
        """Create a job and queue an execution on every target thing.

        ValidationError names a bad field; NotFoundError an unknown thing; ConflictError a
        taken job ID. A SNAPSHOT job needs at least one target; a CONTINUOUS one may start
        empty and take targets later (``add_targets``).
        """
        _check_job_id(job_id)
        doc = _check_document(document)
        things = _check_things(targets)
        timeout = _check_timeout(in_progress_timeout_minutes)
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise ValidationError(
                f"must be a string of at most {MAX_DESCRIPTION} characters", field="description"
            )
        if target_selection not in TARGET_SELECTIONS:
            raise ValidationError(
                f"{target_selection!r} is not SNAPSHOT or CONTINUOUS", field="targetSelection"
            )
        if target_selection == "SNAPSHOT" and not things:
            raise ValidationError(
                "a SNAPSHOT job needs at least one target thing (a CONTINUOUS job may start "
                "without any)",
                field="targets",
            )
        with self._transaction(things) as tx:
            if tx.session.get(JobRow, job_id) is not None:
                raise ConflictError(f"a job named {job_id!r} already exists")
            self._require_things(tx.session, things)
            tx.session.add(
                JobRow(
                    job_id=job_id,
                    description=description,
                    document=doc,
                    status=JobStatus.IN_PROGRESS,
                    target_selection=target_selection,
                    in_progress_timeout_minutes=timeout,
                    force_canceled=False,
                    reason=None,
                    created_at=tx.now,
                    updated_at=tx.now,
                    completed_at=None,
                )
            )
            tx.session.flush()
            for thing in things:
                self._queue(tx, job_id, thing, 1)
        return self.describe_job(job_id)

    def add_targets(
        self, job_id: str, things: Iterable[str], *, retry: bool = False
    ) -> list[JobExecution]:
        """Queue executions of a CONTINUOUS job on more things; returns those queued.

        A thing with a pending execution of the job is left alone, and so is one whose
        execution has ended, unless ``retry``: then it gets a new execution (the next
        execution number), as AWS's retries do.
        """
        _check_job_id(job_id)
        names = _check_things(things, "things")
        with self._transaction(names) as tx:
            job = self._job_row(tx.session, job_id, lock=True)
            if job.target_selection != "CONTINUOUS":
                raise ConflictError(
                    f"job {job_id!r} is a SNAPSHOT job: its targets are fixed (create it with "
                    "targetSelection CONTINUOUS to add targets over time)"
                )
            if job.status != JobStatus.IN_PROGRESS:
                raise ConflictError(f"job {job_id!r} is {job.status}: it takes no more targets")
            self._require_things(tx.session, names)
            latest = self._latest_rows(tx.session, job_id, names)
            added: list[JobExecutionRow] = []
            for thing in names:
                row = latest.get(thing)
                if row is None:
                    added.append(self._queue(tx, job_id, thing, 1))
                elif retry and ExecutionStatus(row.status) in TERMINAL:
                    row.latest = False
                    tx.session.flush()
                    added.append(self._queue(tx, job_id, thing, row.execution_number + 1))
            job.updated_at = tx.now
            result = [_execution(row) for row in added]
        return result

    def cancel_job(self, job_id: str, *, force: bool = False, reason: str | None = None) -> Job:
        """Cancel a job: QUEUED executions become CANCELED, and IN_PROGRESS ones too when
        ``force`` (otherwise they may still finish). Canceling a canceled job again with
        ``force`` stops its running executions. ConflictError for a COMPLETED job."""
        _check_job_id(job_id)
        with self.lock:
            with self.db.read() as session:
                pending_things = list(
                    session.scalars(
                        select(JobExecutionRow.thing_name).where(
                            JobExecutionRow.job_id == job_id,
                            JobExecutionRow.latest.is_(True),
                            JobExecutionRow.status.in_([str(s) for s in PENDING]),
                        )
                    )
                )
            with self._transaction(pending_things) as tx:
                job = self._job_row(tx.session, job_id, lock=True)
                if job.status == JobStatus.COMPLETED:
                    raise ConflictError(f"job {job_id!r} is COMPLETED: there is nothing to cancel")
                if job.status != JobStatus.CANCELED:
                    job.status = JobStatus.CANCELED
                    tx.jobs.append((job_id, JobStatus.CANCELED))
                job.force_canceled = job.force_canceled or force
                job.reason = reason if reason is not None else job.reason
                job.updated_at = tx.now
                for row in self._pending_of_job(tx.session, job_id):
                    if row.status == ExecutionStatus.QUEUED or force:
                        self._end(tx, row, ExecutionStatus.CANCELED, force=True, reason=reason)
        return self.describe_job(job_id)

    def complete_job(self, job_id: str) -> Job:
        """Mark a CONTINUOUS job COMPLETED (no more targets); ConflictError while any of
        its executions is pending, or when it is not IN_PROGRESS."""
        _check_job_id(job_id)
        with self._transaction([]) as tx:
            job = self._job_row(tx.session, job_id, lock=True)
            if job.status != JobStatus.IN_PROGRESS:
                raise ConflictError(f"job {job_id!r} is {job.status}, not IN_PROGRESS")
            pending = len(self._pending_of_job(tx.session, job_id))
            if pending:
                raise ConflictError(
                    f"job {job_id!r} still has {pending} pending execution(s): wait for them "
                    "or cancel the job"
                )
            job.status = JobStatus.COMPLETED
            job.completed_at = job.updated_at = tx.now
            tx.jobs.append((job_id, JobStatus.COMPLETED))
        return self.describe_job(job_id)

    def cancel_execution(
        self, job_id: str, thing: str, *, force: bool = False, reason: str | None = None
    ) -> JobExecution:
        """Cancel a thing's (latest) execution of a job: a QUEUED one, or an IN_PROGRESS one
        with ``force``. ConflictError says why not; NotFoundError when there is none."""
        return self._end_execution(job_id, thing, ExecutionStatus.CANCELED, force, reason)

    def remove_execution(
        self, job_id: str, thing: str, *, force: bool = False, reason: str | None = None
    ) -> JobExecution:
        """Take a thing out of a job (its execution becomes REMOVED); rules as for cancel."""
        return self._end_execution(job_id, thing, ExecutionStatus.REMOVED, force, reason)

    def sweep_timeouts(self, now: datetime | None = None) -> list[ExecutionChange]:
        """Time out every IN_PROGRESS execution whose step or in-progress timer ran out by
        ``now`` (default: the store's clock); returns the changes. Call it periodically."""
        at = now or self.clock()
        changes: list[ExecutionChange] = []
        while True:
            with self.db.read() as session:
                due = session.execute(
                    select(JobExecutionRow.id, JobExecutionRow.thing_name)
                    .where(
                        JobExecutionRow.timeout_at <= at,
                        JobExecutionRow.status == ExecutionStatus.IN_PROGRESS,
                    )
                    .order_by(JobExecutionRow.timeout_at)
                    .limit(_CHUNK)
                ).all()
            if not due:
                return changes
            things = sorted({thing for _, thing in due})
            with self._transaction(things, now=at) as tx:
                rows = tx.session.scalars(
                    select(JobExecutionRow)
                    .where(JobExecutionRow.id.in_([row_id for row_id, _ in due]))
                    .with_for_update()
                )
                for row in rows:
                    self._time_out_if_due(tx, row)
                changes.extend(tx.executions)
            if len(due) < _CHUNK:
                return changes

    # == reading ===============================================================================

    def describe_job(self, job_id: str) -> Job:
        """A job with its counts per status; NotFoundError when there is none."""
        with self.db.read() as session:
            row = self._job_row(session, job_id)
            return self._job(row, self._counts(session, [job_id]).get(job_id, {}))

    def list_jobs(self, *, status: JobStatus | str | None = None) -> list[Job]:
        """Every job (or those in ``status``), newest first, with their counts."""
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.job_id)
        if status is not None:
            query = query.where(JobRow.status == str(self._job_status(status)))
        with self.db.read() as session:
            rows = list(session.scalars(query))
            counts = self._counts(session, [row.job_id for row in rows])
            return [self._job(row, counts.get(row.job_id, {})) for row in rows]

    def status_counts(self, job_id: str) -> dict[ExecutionStatus, int]:
        """How many of the job's things are in each status (one indexed GROUP BY); every
        status is a key. The rollout engine's poll."""
        with self.db.read() as session:
            self._job_row(session, job_id)
            return self._complete_counts(self._counts(session, [job_id]).get(job_id, {}))

    def job_execution(
        self, job_id: str, thing: str, execution_number: int | None = None
    ) -> JobExecution:
        """A thing's execution of a job (its latest, or the numbered one); NotFoundError."""
        with self.db.read() as session:
            row = self._execution_row(session, job_id, thing, execution_number)
            if row is None:
                number = f" #{execution_number}" if execution_number is not None else ""
                raise NotFoundError("job execution", f"{job_id}{number} on {thing}")
            return _execution(row)

    def list_executions(
        self,
        job_id: str,
        *,
        status: ExecutionStatus | str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[JobExecution]:
        """The job's latest execution on each of its things, by thing name; ``after`` (a
        thing name) and ``limit`` page through them."""
        query = (
            select(JobExecutionRow)
            .where(JobExecutionRow.job_id == job_id, JobExecutionRow.latest.is_(True))
            .order_by(JobExecutionRow.thing_name)
        )
        if status is not None:
            query = query.where(JobExecutionRow.status == str(self._status(status)))
        if after is not None:
            query = query.where(JobExecutionRow.thing_name > after)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as session:
            self._job_row(session, job_id)
            return [_execution(row) for row in session.scalars(query)]

    def executions_for_thing(
        self, thing: str, *, status: ExecutionStatus | str | None = None
    ) -> list[JobExecution]:
        """Every execution a thing has had (retries included), oldest first."""
        query = (
            select(JobExecutionRow)
            .where(JobExecutionRow.thing_name == thing)
            .order_by(JobExecutionRow.queued_at, JobExecutionRow.id)
        )
        if status is not None:
            query = query.where(JobExecutionRow.status == str(self._status(status)))
        with self.db.read() as session:
            return [_execution(row) for row in session.scalars(query)]

    def thing_status_counts(self, thing: str) -> dict[ExecutionStatus, int]:
        """How many of a thing's executions are in each status; every status is a key."""
        with self.db.read() as session:
            rows = session.execute(
                select(JobExecutionRow.status, func.count())
                .where(JobExecutionRow.thing_name == thing)
                .group_by(JobExecutionRow.status)
            ).all()
        return self._complete_counts({ExecutionStatus(s): n for s, n in rows})

    def pending(self, thing: str) -> list[JobExecution]:
        """A thing's pending executions: IN_PROGRESS first, then QUEUED, each FIFO."""
        with self.db.read() as session:
            rows = self._pending_rows(session, [thing]).get(thing, [])
            expired = any(jobstate.expired(_state(row), self.clock()) for row in rows)
            if not expired:
                return [_execution(row) for row in rows]
        self._settle(thing)
        return self.pending(thing)

    def document(self, job_id: str) -> dict[str, Any]:
        """A job's document; NotFoundError."""
        with self.db.read() as session:
            return dict(self._job_row(session, job_id).document)

    # == the device side (AWS IoT Jobs' MQTT API) =============================================

    def start_next(
        self, thing: str, request: StartNextRequest
    ) -> tuple[JobExecution, dict[str, Any]] | None:
        """StartNextPendingJobExecution: the thing's next execution, now IN_PROGRESS, with
        its job document; None when nothing is pending."""
        with self._transaction([thing]) as tx:
            rows = self._settled_pending(tx, thing)
            if not rows:
                return None
            row = rows[0]
            job = self._job_row(tx.session, row.job_id)
            before = _state(row)
            after = jobstate.start(
                before,
                tx.now,
                status_details=request.status_details,
                step_timeout=request.step_timeout,
                job_timeout=job.in_progress_timeout_minutes,
            )
            if after != before:
                self._apply(tx, row, after)
            result = (_execution(row), dict(job.document))
        return result

    def update_execution(
        self, thing: str, job_id: str, request: UpdateRequest
    ) -> tuple[JobExecution, dict[str, Any]]:
        """UpdateJobExecution: apply a device's update; JobRejection when refused (any
        timeout found on the way is kept)."""
        rejection: JobRejection | None = None
        with self._transaction([thing]) as tx:
            self._settled_pending(tx, thing)
            row = self._execution_row(tx.session, job_id, thing, request.execution_number)
            if row is None:
                rejection = no_execution(job_id, thing, request.execution_number)
            else:
                job = self._job_row(tx.session, job_id)
                try:
                    after = jobstate.update(
                        _state(row), request, tx.now, job_timeout=job.in_progress_timeout_minutes
                    )
                except JobRejection as err:
                    rejection = err
                else:
                    self._apply(tx, row, after)
                result = (_execution(row), dict(job.document))
        if rejection is not None:
            rejection.client_token = request.client_token
            raise rejection
        return result

    def describe_execution(
        self, thing: str, job_id: str, request: DescribeRequest
    ) -> tuple[JobExecution, dict[str, Any]] | None:
        """DescribeJobExecution; ``job_id`` ``$next`` is the thing's next pending execution
        (None when there is none). JobRejection ResourceNotFound for an unknown one."""
        if job_id == "$next":
            rows = self.pending(thing)
            if not rows:
                return None
            return rows[0], self.document(rows[0].job_id)
        if not jobstate.is_job_id(job_id):
            raise no_execution(job_id, thing, request.execution_number, request.client_token)
        self.pending(thing)  # times out what has expired first
        with self.db.read() as session:
            row = self._execution_row(session, job_id, thing, request.execution_number)
            if row is None:
                raise no_execution(job_id, thing, request.execution_number, request.client_token)
            return _execution(row), dict(self._job_row(session, job_id).document)

    # == internals =============================================================================

    def _transaction(self, things: Sequence[str], *, now: datetime | None = None) -> _Scope:
        return _Scope(self, things, now or self.clock())

    def _emit(self, changes: JobChanges) -> None:
        if not changes:
            return
        for listener in list(self.listeners):
            try:
                listener(changes)
            except Exception:
                # The change is committed; a listener cannot undo it.
                log.exception("job listener failed")

    def _settle(self, thing: str) -> None:
        with self._transaction([thing]) as tx:
            self._settled_pending(tx, thing)

    def _settled_pending(self, tx: _Tx, thing: str) -> list[JobExecutionRow]:
        """The thing's pending rows (locked), after timing out those whose timer ran out."""
        rows = self._pending_rows(tx.session, [thing], lock=True).get(thing, [])
        for row in rows:
            self._time_out_if_due(tx, row)
        return [row for row in rows if ExecutionStatus(row.status) in PENDING]

    def _time_out_if_due(self, tx: _Tx, row: JobExecutionRow) -> None:
        state = _state(row)
        if not jobstate.expired(state, tx.now):
            return
        step = state.step_deadline is not None and state.step_deadline <= tx.now
        reason = "the step timer ran out" if step else "the job's in-progress timer ran out"
        after = jobstate.end_by_cloud(state, ExecutionStatus.TIMED_OUT, tx.now)
        self._apply(tx, row, after, reason=reason)

    def _end(
        self,
        tx: _Tx,
        row: JobExecutionRow,
        status: ExecutionStatus,
        *,
        force: bool,
        reason: str | None,
    ) -> None:
        after = jobstate.end_by_cloud(_state(row), status, tx.now, force=force)
        self._apply(tx, row, after, reason=reason)

    def _end_execution(
        self,
        job_id: str,
        thing: str,
        status: ExecutionStatus,
        force: bool,
        reason: str | None,
    ) -> JobExecution:
        with self._transaction([thing]) as tx:
            self._settled_pending(tx, thing)
            row = self._execution_row(tx.session, job_id, thing, None, lock=True)
            if row is None:
                raise NotFoundError("job execution", f"{job_id} on {thing}")
            verb = "canceled" if status is ExecutionStatus.CANCELED else "removed"
            try:
                self._end(tx, row, status, force=force, reason=reason)
            except CloudRefusal as err:
                raise ConflictError(
                    f"the execution of job {job_id!r} on {thing!r} cannot be {verb}: {err}"
                ) from err
            result = _execution(row)
        return result

    def _apply(
        self, tx: _Tx, row: JobExecutionRow, state: Execution, *, reason: str | None = None
    ) -> None:
        old = ExecutionStatus(row.status)
        row.status = str(state.status)
        row.version = state.version
        row.status_details = dict(state.status_details)
        row.started_at = state.started_at
        row.last_updated_at = state.last_updated_at
        row.step_deadline = state.step_deadline
        row.run_deadline = state.run_deadline
        row.timeout_at = state.timeout_at
        if reason is not None:
            row.reason = reason
        tx.executions.append(
            ExecutionChange(
                row.job_id,
                row.thing_name,
                row.execution_number,
                old,
                state.status,
                state.version,
                tx.now,
                reason,
            )
        )

    def _queue(self, tx: _Tx, job_id: str, thing: str, number: int) -> JobExecutionRow:
        state = jobstate.queued(tx.now)
        row = JobExecutionRow(
            job_id=job_id,
            thing_name=thing,
            execution_number=number,
            latest=True,
            status=str(state.status),
            status_details={},
            version=state.version,
            queued_at=state.queued_at,
            started_at=None,
            last_updated_at=state.last_updated_at,
            step_deadline=None,
            run_deadline=None,
            timeout_at=None,
            reason=None,
        )
        tx.session.add(row)
        tx.executions.append(
            ExecutionChange(job_id, thing, number, None, state.status, state.version, tx.now)
        )
        return row

    def _pending_rows(
        self, session: Session, things: Sequence[str], *, lock: bool = False
    ) -> dict[str, list[JobExecutionRow]]:
        found: dict[str, list[JobExecutionRow]] = defaultdict(list)
        for chunk in _chunks(things):
            query = select(JobExecutionRow).where(
                JobExecutionRow.thing_name.in_(chunk),
                JobExecutionRow.status.in_([str(s) for s in PENDING]),
            )
            if lock:
                query = query.with_for_update()
            for row in session.scalars(query):
                found[row.thing_name].append(row)
        for rows in found.values():
            rows.sort(key=_order)
        return found

    def _pending_of_job(self, session: Session, job_id: str) -> list[JobExecutionRow]:
        return list(
            session.scalars(
                select(JobExecutionRow)
                .where(
                    JobExecutionRow.job_id == job_id,
                    JobExecutionRow.latest.is_(True),
                    JobExecutionRow.status.in_([str(s) for s in PENDING]),
                )
                .with_for_update()
            )
        )

    def _latest_rows(
        self, session: Session, job_id: str, things: Sequence[str]
    ) -> dict[str, JobExecutionRow]:
        found: dict[str, JobExecutionRow] = {}
        for chunk in _chunks(things):
            query = (
                select(JobExecutionRow)
                .where(
                    JobExecutionRow.job_id == job_id,
                    JobExecutionRow.thing_name.in_(chunk),
                    JobExecutionRow.latest.is_(True),
                )
                .with_for_update()
            )
            found.update((row.thing_name, row) for row in session.scalars(query))
        return found

    def _execution_row(
        self,
        session: Session,
        job_id: str,
        thing: str,
        execution_number: int | None,
        *,
        lock: bool = False,
    ) -> JobExecutionRow | None:
        query = select(JobExecutionRow).where(
            JobExecutionRow.job_id == job_id, JobExecutionRow.thing_name == thing
        )
        if execution_number is None:
            query = query.where(JobExecutionRow.latest.is_(True))
        else:
            query = query.where(JobExecutionRow.execution_number == execution_number)
        if lock:
            query = query.with_for_update()
        return session.scalars(query).first()

    def _job_row(self, session: Session, job_id: str, *, lock: bool = False) -> JobRow:
        row = session.get(JobRow, job_id, with_for_update=lock or None)
        if row is None:
            raise NotFoundError("job", job_id)
        return row

    def _require_things(self, session: Session, things: Sequence[str]) -> None:
        known: set[str] = set()
        for chunk in _chunks(things):
            known.update(session.scalars(select(ThingRow.name).where(ThingRow.name.in_(chunk))))
        missing = [thing for thing in things if thing not in known]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NotFoundError("thing", missing[0], f"register it first{more}")

    def _counts(
        self, session: Session, job_ids: Sequence[str]
    ) -> dict[str, dict[ExecutionStatus, int]]:
        found: dict[str, dict[ExecutionStatus, int]] = defaultdict(dict)
        for chunk in _chunks(job_ids):
            rows = session.execute(
                select(JobExecutionRow.job_id, JobExecutionRow.status, func.count())
                .where(JobExecutionRow.job_id.in_(chunk), JobExecutionRow.latest.is_(True))
                .group_by(JobExecutionRow.job_id, JobExecutionRow.status)
            ).all()
            for job_id, status, count in rows:
                found[job_id][ExecutionStatus(status)] = count
        return found

    @staticmethod
    def _complete_counts(counts: Mapping[ExecutionStatus, int]) -> dict[ExecutionStatus, int]:
        return {status: counts.get(status, 0) for status in ExecutionStatus}

    def _job(self, row: JobRow, counts: Mapping[ExecutionStatus, int]) -> Job:
        selection: TargetSelection = (
            "CONTINUOUS" if row.target_selection == "CONTINUOUS" else "SNAPSHOT"
        )
        return Job(
            job_id=row.job_id,
            description=row.description,
            document=dict(row.document),
            status=JobStatus(row.status),
            target_selection=selection,
            in_progress_timeout_minutes=row.in_progress_timeout_minutes,
            force_canceled=row.force_canceled,
            reason=row.reason,
            created_at=row.created_at,
            updated_at=row.updated_at,
            completed_at=row.completed_at,
            counts=self._complete_counts(counts),
        )

    @staticmethod
    def _status(status: ExecutionStatus | str) -> ExecutionStatus:
        try:
            return ExecutionStatus(status)
        except ValueError as err:
            raise ValidationError(
                f"{status!r} is not one of {', '.join(ExecutionStatus)}", field="status"
            ) from err

    @staticmethod
    def _job_status(status: JobStatus | str) -> JobStatus:
        try:
            return JobStatus(status)
        except ValueError as err:
            raise ValidationError(
                f"{status!r} is not one of {', '.join(JobStatus)}", field="status"
            ) from err

    def _finish(self, tx: _Tx) -> JobChanges:
        """Complete SNAPSHOT jobs left without pending executions; work out queue changes."""
        session = tx.session
        session.flush()
        ended_jobs = sorted({c.job_id for c in tx.executions if c.ended})
        for job_id in ended_jobs:
            job = session.get(JobRow, job_id)
            if (
                job is not None
                and job.status == JobStatus.IN_PROGRESS
                and job.target_selection == "SNAPSHOT"
                and not self._pending_of_job(session, job_id)
            ):
                job.status = JobStatus.COMPLETED
                job.completed_at = job.updated_at = tx.now
                tx.jobs.append((job_id, JobStatus.COMPLETED))
        changed_things = {c.thing_name for c in tx.executions}
        things = [thing for thing in tx.touched() if thing in changed_things]
        after = self._pending_rows(session, things)
        queues: list[QueueChange] = []
        next_jobs = {rows[0].job_id for rows in after.values() if rows}
        documents = {
            row.job_id: dict(row.document)
            for chunk in _chunks(sorted(next_jobs))
            for row in session.scalars(select(JobRow).where(JobRow.job_id.in_(chunk)))
        }
        for thing in things:
            rows = after.get(thing, [])
            keys = [(row.job_id, row.execution_number) for row in rows]
            before = tx.before.get(thing, [])
            pending_changed = set(keys) != set(before)
            next_changed = (keys[:1]) != (before[:1])
            if pending_changed or next_changed:
                queues.append(
                    QueueChange(
                        thing,
                        pending_changed,
                        next_changed,
                        tuple(_execution(row) for row in rows),
                        documents.get(rows[0].job_id) if rows else None,
                    )
                )
        return JobChanges(tuple(tx.executions), tuple(queues), tuple(tx.jobs))


class _Scope:
    """``with store._transaction(things) as tx``: the lock, a write transaction that first
    reads ``things``' pending lists, and the listeners told after the commit."""

    def __init__(self, store: JobStore, things: Sequence[str], now: datetime) -> None:
        self.store = store
        self.things = list(dict.fromkeys(things))
        self.now = now
        self._write: Any = None
        self._tx: _Tx | None = None

    def __enter__(self) -> _Tx:
        self.store.lock.acquire()
        try:
            self._write = self.store.db.write()
            session = self._write.__enter__()
            tx = _Tx(session, self.now)
            pending = self.store._pending_rows(session, self.things, lock=True)
            tx.before = {
                thing: [(r.job_id, r.execution_number) for r in pending.get(thing, [])]
                for thing in self.things
            }
            self._tx = tx
            return tx
        except BaseException as err:
            if self._write is not None:
                with contextlib.suppress(BaseException):
                    self._write.__exit__(type(err), err, err.__traceback__)
            self.store.lock.release()
            raise

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        try:
            changes = JobChanges()
            if error is None and self._tx is not None:
                try:
                    changes = self.store._finish(self._tx)
                except BaseException as err:
                    self._write.__exit__(type(err), err, err.__traceback__)
                    raise
            self._write.__exit__(kind, error, trace)
            if error is None:
                self.store._emit(changes)
        finally:
            self.store.lock.release()
