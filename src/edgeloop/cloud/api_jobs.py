"""The jobs service's REST routes, under /api/v1: create, describe, cancel, follow.

Operators' routes live under ``/jobs``; a thing's own list is ``/things/{thing}/jobs``
(which a thing may call itself over mTLS). Devices run their executions over MQTT, on AWS
IoT Jobs' topics (``edgeloop.cloud.jobs_service``). Errors are the app's: 400 naming the
field, 404 for an unknown job, thing or execution, 409 for a request the job's state
refuses (a taken job ID, targets added to a SNAPSHOT job, a running execution canceled
without ``force``).

Handlers are plain ``def``: the job store is synchronous and thread-safe, so FastAPI runs
them in its thread pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.jobs import Job, JobExecution
from edgeloop.core.errors import ValidationError
from edgeloop.core.jobstate import MAX_TIMEOUT_MINUTES, ExecutionStatus, JobStatus

__all__ = ["jobs_router"]

# The same prefix as edgeloop.cloud.api's (which imports this module, so it is not
# imported from there).
API_PREFIX = "/api/v1"
MAX_PAGE = 1000

StatusFilter = Annotated[
    ExecutionStatus | None, Query(description="only executions in this status")
]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TimeoutConfig(_Request):
    inProgressTimeoutInMinutes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TIMEOUT_MINUTES,
        description="an execution IN_PROGRESS for longer becomes TIMED_OUT",
    )


class CreateJob(_Request):
    jobId: str
    document: dict[str, Any] = Field(description="the job document devices receive (≤ 32 KiB)")
    targets: list[str] = Field(default_factory=list, description="thing names")
    description: str = ""
    targetSelection: Literal["SNAPSHOT", "CONTINUOUS"] = Field(
        default="SNAPSHOT",
        description="SNAPSHOT: fixed targets, COMPLETED when all have ended; CONTINUOUS: "
        "targets may be added later, COMPLETED when told to",
    )
    timeoutConfig: TimeoutConfig | None = None


class AddTargets(_Request):
    targets: list[str] = Field(description="thing names to queue an execution on")
    retry: bool = Field(
        default=False, description="give things whose execution ended a new execution"
    )


class Cancel(_Request):
    force: bool = Field(
        default=False, description="also stop executions already IN_PROGRESS on their device"
    )
    reason: str | None = Field(default=None, max_length=1024)


class ExecutionOut(BaseModel):
    jobId: str
    thingName: str
    executionNumber: int
    status: ExecutionStatus
    statusDetails: dict[str, str]
    versionNumber: int
    queuedAt: datetime
    startedAt: datetime | None
    lastUpdatedAt: datetime
    timeoutAt: datetime | None = Field(description="when it times out if nothing ends it first")
    reason: str | None = Field(description="why the cloud ended it")


class JobOut(BaseModel):
    jobId: str
    description: str
    document: dict[str, Any]
    status: JobStatus
    targetSelection: Literal["SNAPSHOT", "CONTINUOUS"]
    timeoutConfig: dict[str, int | None]
    forceCanceled: bool
    reason: str | None
    createdAt: datetime
    lastUpdatedAt: datetime
    completedAt: datetime | None
    counts: dict[ExecutionStatus, int] = Field(
        description="how many of its things' latest executions are in each status"
    )


class JobList(BaseModel):
    jobs: list[JobOut]


class QueuedOut(BaseModel):
    queued: list[ExecutionOut]


class ExecutionPage(BaseModel):
    executions: list[ExecutionOut]
    counts: dict[ExecutionStatus, int]
    nextToken: str | None = Field(description="pass it as nextToken for the next page")


def _job(job: Job) -> JobOut:
    return JobOut(
        jobId=job.job_id,
        description=job.description,
        document=dict(job.document),
        status=job.status,
        targetSelection=job.target_selection,
        timeoutConfig={"inProgressTimeoutInMinutes": job.in_progress_timeout_minutes},
        forceCanceled=job.force_canceled,
        reason=job.reason,
        createdAt=job.created_at,
        lastUpdatedAt=job.updated_at,
        completedAt=job.completed_at,
        counts=dict(job.counts),
    )


def _execution(execution: JobExecution) -> ExecutionOut:
    return ExecutionOut(
        jobId=execution.job_id,
        thingName=execution.thing_name,
        executionNumber=execution.execution_number,
        status=execution.status,
        statusDetails=dict(execution.status_details),
        versionNumber=execution.version,
        queuedAt=execution.queued_at,
        startedAt=execution.started_at,
        lastUpdatedAt=execution.last_updated_at,
        timeoutAt=execution.timeout_at,
        reason=execution.reason,
    )


@contextmanager
def _as_targets() -> Iterator[None]:
    """The store names add_targets' list ``things``; this API calls it ``targets``."""
    try:
        yield
    except ValidationError as err:
        if err.field is None or not err.field.startswith("things"):
            raise
        field = "targets" + err.field.removeprefix("things")
        raise ValidationError(err.reason, source=err.source, field=field) from err


def jobs_router(ctx: CloudContext) -> APIRouter:
    """The routes over one cloud's job store."""
    from edgeloop.cloud.api import ErrorBody  # here: api imports this module

    store = ctx.jobs  # created here, before any request thread can race for it
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "bad input; `field` names what is wrong"},
        404: {"model": ErrorBody, "description": "no such job, thing or execution"},
        409: {"model": ErrorBody, "description": "the job's or execution's state refuses it"},
    }
    api = APIRouter(prefix=API_PREFIX, tags=["jobs"], responses=errors)

    @api.post("/jobs", status_code=201)
    def create_job(body: CreateJob) -> JobOut:
        """Create a job and queue an execution on each target (409 when the ID is taken)."""
        timeout = body.timeoutConfig.inProgressTimeoutInMinutes if body.timeoutConfig else None
        job = store.create_job(
            body.jobId,
            body.document,
            body.targets,
            description=body.description,
            in_progress_timeout_minutes=timeout,
            target_selection=body.targetSelection,
        )
        return _job(job)

    @api.get("/jobs")
    def list_jobs(
        status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    ) -> JobList:
        """Every job, newest first, with its counts per execution status."""
        return JobList(jobs=[_job(job) for job in store.list_jobs(status=status)])

    @api.get("/jobs/{jobId}")
    def describe_job(jobId: str) -> JobOut:
        """A job, with how many of its things are in each execution status."""
        return _job(store.describe_job(jobId))

    @api.post("/jobs/{jobId}/targets")
    def add_targets(jobId: str, body: AddTargets) -> QueuedOut:
        """Queue a CONTINUOUS job on more things; answers the executions queued."""
        with _as_targets():
            queued = store.add_targets(jobId, body.targets, retry=body.retry)
        return QueuedOut(queued=[_execution(e) for e in queued])

    @api.post("/jobs/{jobId}/cancel")
    def cancel_job(jobId: str, body: Cancel | None = None) -> JobOut:
        """Cancel a job: QUEUED executions end as CANCELED, IN_PROGRESS ones too with force."""
        body = body or Cancel()
        return _job(store.cancel_job(jobId, force=body.force, reason=body.reason))

    @api.post("/jobs/{jobId}/complete")
    def complete_job(jobId: str) -> JobOut:
        """Mark a CONTINUOUS job COMPLETED (409 while executions are pending)."""
        return _job(store.complete_job(jobId))

    @api.get("/jobs/{jobId}/executions")
    def list_executions(
        jobId: str,
        status: StatusFilter = None,
        pageSize: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 250,
        nextToken: str | None = None,
    ) -> ExecutionPage:
        """The job's latest execution on each thing, by thing name, a page at a time."""
        found = store.list_executions(jobId, status=status, after=nextToken, limit=pageSize + 1)
        page = found[:pageSize]
        token = page[-1].thing_name if len(found) > pageSize else None
        return ExecutionPage(
            executions=[_execution(e) for e in page],
            counts=dict(store.status_counts(jobId)),
            nextToken=token,
        )

    @api.get("/jobs/{jobId}/things/{thingName}")
    def describe_execution(
        jobId: str,
        thingName: str,
        executionNumber: Annotated[int | None, Query(ge=1)] = None,
    ) -> ExecutionOut:
        """A thing's execution of a job (its latest, or the numbered one)."""
        return _execution(store.job_execution(jobId, thingName, executionNumber))

    @api.post("/jobs/{jobId}/things/{thingName}/cancel")
    def cancel_execution(jobId: str, thingName: str, body: Cancel | None = None) -> ExecutionOut:
        """Cancel a thing's execution: a QUEUED one, or an IN_PROGRESS one with force."""
        body = body or Cancel()
        execution = store.cancel_execution(jobId, thingName, force=body.force, reason=body.reason)
        return _execution(execution)

    @api.post("/jobs/{jobId}/things/{thingName}/remove")
    def remove_execution(jobId: str, thingName: str, body: Cancel | None = None) -> ExecutionOut:
        """Take a thing out of a job: its execution ends as REMOVED (rules as for cancel)."""
        body = body or Cancel()
        execution = store.remove_execution(jobId, thingName, force=body.force, reason=body.reason)
        return _execution(execution)

    @api.get("/things/{thingName}/jobs")
    def thing_executions(thingName: str, status: StatusFilter = None) -> ExecutionPage:
        """Every execution a thing has had, oldest first, with its counts per status."""
        executions = store.executions_for_thing(thingName, status=status)
        return ExecutionPage(
            executions=[_execution(e) for e in executions],
            counts=dict(store.thing_status_counts(thingName)),
            nextToken=None,
        )

    return api
