"""The job store on SQLite and PostgreSQL: jobs, executions, queues, timeouts, notifications."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from edgeloop.cloud.db import Base, Database
from edgeloop.cloud.jobs import JobChanges, JobStore
from edgeloop.cloud.registry import Registry
from edgeloop.core.errors import ConflictError, NotFoundError, ValidationError
from edgeloop.core.jobstate import (
    ExecutionStatus,
    JobRejection,
    JobStatus,
    RejectCode,
    StartNextRequest,
    UpdateRequest,
)

S = ExecutionStatus
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
JOB_TABLES = {"jobs", "job_executions"}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class Heard:
    """What the store's listeners were told."""

    def __init__(self, store: JobStore) -> None:
        self.changes: list[JobChanges] = []
        store.listeners.append(self.changes.append)

    def queues(self) -> list[tuple[str, bool, bool, list[str]]]:
        """(thing, pending changed, next changed, pending job IDs) of every queue change."""
        out = [
            (q.thing_name, q.pending_changed, q.next_changed, [e.job_id for e in q.pending])
            for c in self.changes
            for q in c.queues
        ]
        self.changes.clear()
        return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(database: Database, clock: Clock) -> JobStore:
    return JobStore(database, clock=clock)


def things(registry: Registry, count: int) -> list[str]:
    names = [f"hub-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    for name in names:
        registry.create_thing(name)
    return names


def test_the_migration_creates_exactly_the_job_tables_the_models_declare(
    database: Database,
) -> None:
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    # Other parts of the cloud own other tables (and other modules their models).
    assert [d for d in diff if _table_of(d) in JOB_TABLES] == []
    assert database.revision() is not None


def _table_of(diff: Any) -> str | None:
    """The table an autogenerate difference is about."""
    if isinstance(diff, list):  # modify_* ops: (op, schema, table, column, ...)
        return str(diff[0][2])
    operation, subject = diff[0], diff[1]
    if operation.endswith("_table"):
        return str(subject.name)
    if operation.endswith(("_index", "_constraint")):
        return str(subject.table.name)
    if operation.endswith("_column"):
        return str(diff[2])
    return None


def test_create_job_queues_one_execution_per_target(store: JobStore, registry: Registry) -> None:
    a, b = things(registry, 2)
    heard = Heard(store)
    job = store.create_job(
        "fw-1", {"op": "update"}, [a, b, a], description="firmware", in_progress_timeout_minutes=30
    )
    assert job.status is JobStatus.IN_PROGRESS and job.target_selection == "SNAPSHOT"
    assert job.counts[S.QUEUED] == 2 and sum(job.counts.values()) == 2
    assert job.in_progress_timeout_minutes == 30 and job.created_at == T0
    assert store.document("fw-1") == {"op": "update"}
    execution = store.job_execution("fw-1", a)
    assert (execution.status, execution.version, execution.execution_number) == (S.QUEUED, 1, 1)
    assert [c.old_status for c in heard.changes[0].executions] == [None, None]
    assert sorted(heard.queues()) == sorted([(a, True, True, ["fw-1"]), (b, True, True, ["fw-1"])])


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"job_id": "bad id"}, "jobId"),
        ({"job_id": "x" * 65}, "jobId"),
        ({"document": []}, "document"),
        ({"document": {"blob": "x" * 40000}}, "document"),
        ({"targets": ["no spaces"]}, "targets[0]"),
        ({"targets": "hub"}, "targets"),
        ({"targets": []}, "targets"),
        ({"in_progress_timeout_minutes": 0}, "timeoutConfig.inProgressTimeoutInMinutes"),
        ({"in_progress_timeout_minutes": 10081}, "timeoutConfig.inProgressTimeoutInMinutes"),
        ({"description": "x" * 3000}, "description"),
        ({"target_selection": "SOMETIMES"}, "targetSelection"),
    ],
)
def test_bad_jobs_are_refused_naming_the_field(
    store: JobStore, registry: Registry, arguments: dict[str, Any], field: str
) -> None:
    (thing,) = things(registry, 1)
    given: dict[str, Any] = {"job_id": "j", "document": {}, "targets": [thing], **arguments}
    with pytest.raises(ValidationError) as refused:
        store.create_job(given.pop("job_id"), given.pop("document"), given.pop("targets"), **given)
    assert refused.value.field == field
    assert store.list_jobs() == []


def test_unknown_things_and_taken_ids_are_refused(store: JobStore, registry: Registry) -> None:
    (thing,) = things(registry, 1)
    with pytest.raises(NotFoundError, match="ghost"):
        store.create_job("j1", {}, [thing, "ghost"])
    assert store.list_jobs() == []  # nothing half-made
    store.create_job("j1", {}, [thing])
    with pytest.raises(ConflictError, match="already exists"):
        store.create_job("j1", {}, [thing])
    with pytest.raises(NotFoundError):
        store.describe_job("j2")


def test_a_thing_is_served_fifo_with_in_progress_first(
    store: JobStore, registry: Registry, clock: Clock
) -> None:
    (thing,) = things(registry, 1)
    for name in ("first", "second", "third"):  # same instant: creation order decides
        store.create_job(name, {"n": name}, [thing])
    clock.advance(MINUTE)
    assert [e.job_id for e in store.pending(thing)] == ["first", "second", "third"]
    # A device may start a later one by hand; it then comes first.
    store.update_execution(thing, "third", UpdateRequest(S.IN_PROGRESS))
    assert [e.job_id for e in store.pending(thing)] == ["third", "first", "second"]
    started = store.start_next(thing, StartNextRequest())
    assert started is not None and started[0].job_id == "third"  # already running
    store.update_execution(thing, "third", UpdateRequest(S.SUCCEEDED))
    started = store.start_next(thing, StartNextRequest(status_details={"at": "boot"}))
    assert started is not None
    execution, document = started
    assert (execution.job_id, execution.status, execution.version) == ("first", S.IN_PROGRESS, 2)
    assert execution.status_details == {"at": "boot"} and document == {"n": "first"}
    assert execution.started_at == T0 + MINUTE


def test_start_next_with_nothing_pending_is_none(store: JobStore, registry: Registry) -> None:
    (thing,) = things(registry, 1)
    assert store.start_next(thing, StartNextRequest()) is None
    assert store.pending(thing) == []


def test_device_updates_follow_the_state_machine(store: JobStore, registry: Registry) -> None:
    (thing,) = things(registry, 1)
    store.create_job("j", {}, [thing])
    with pytest.raises(JobRejection) as refused:
        store.update_execution(thing, "j", UpdateRequest(S.IN_PROGRESS, expected_version=7))
    assert refused.value.code is RejectCode.VERSION_MISMATCH
    assert refused.value.execution_state == {
        "status": "QUEUED",
        "statusDetails": {},
        "versionNumber": 1,
    }
    running, _ = store.update_execution(
        thing, "j", UpdateRequest(S.IN_PROGRESS, expected_version=1)
    )
    assert running.version == 2
    done, _ = store.update_execution(
        thing, "j", UpdateRequest(S.FAILED, status_details={"exit": "3"}, client_token="t")
    )
    assert (done.status, done.version, done.status_details) == (S.FAILED, 3, {"exit": "3"})
    with pytest.raises(JobRejection) as refused:
        store.update_execution(thing, "j", UpdateRequest(S.SUCCEEDED, client_token="t2"))
    assert refused.value.code is RejectCode.INVALID_STATE_TRANSITION
    assert refused.value.client_token == "t2"
    assert store.job_execution("j", thing).status is S.FAILED  # unchanged


def test_unknown_executions_are_resource_not_found(store: JobStore, registry: Registry) -> None:
    (thing,) = things(registry, 1)
    store.create_job("j", {}, [thing])
    for job_id, number in (("nope", None), ("j", 2)):
        with pytest.raises(JobRejection) as refused:
            store.update_execution(
                thing, job_id, UpdateRequest(S.SUCCEEDED, execution_number=number)
            )
        assert refused.value.code is RejectCode.RESOURCE_NOT_FOUND
    with pytest.raises(NotFoundError):
        store.job_execution("j", "other-thing")


def test_a_snapshot_job_completes_when_every_execution_has_ended(
    store: JobStore, registry: Registry
) -> None:
    a, b = things(registry, 2)
    store.create_job("j", {}, [a, b])
    heard = Heard(store)
    store.update_execution(a, "j", UpdateRequest(S.SUCCEEDED))
    assert store.describe_job("j").status is JobStatus.IN_PROGRESS
    store.update_execution(b, "j", UpdateRequest(S.REJECTED))
    job = store.describe_job("j")
    assert job.status is JobStatus.COMPLETED and job.completed_at is not None
    assert job.counts[S.SUCCEEDED] == 1 and job.counts[S.REJECTED] == 1
    assert heard.changes[-1].jobs == (("j", JobStatus.COMPLETED),)
    assert [c.ended for c in heard.changes[0].executions] == [True]


def test_cancel_job_cancels_queued_executions_and_running_ones_only_with_force(
    store: JobStore, registry: Registry
) -> None:
    a, b = things(registry, 2)
    store.create_job("j", {}, [a, b])
    store.start_next(a, StartNextRequest())
    heard = Heard(store)
    job = store.cancel_job("j", reason="bad build")
    assert job.status is JobStatus.CANCELED and job.reason == "bad build"
    assert not job.force_canceled
    assert job.counts[S.CANCELED] == 1 and job.counts[S.IN_PROGRESS] == 1
    assert store.job_execution("j", b).reason == "bad build"
    assert heard.queues() == [(b, True, True, [])]
    # The running one may still finish...
    finished, _ = store.update_execution(a, "j", UpdateRequest(S.IN_PROGRESS))
    assert finished.status is S.IN_PROGRESS
    # ...until the job is canceled again with force.
    job = store.cancel_job("j", force=True)
    assert job.force_canceled and job.counts[S.CANCELED] == 2
    with pytest.raises(JobRejection) as refused:
        store.update_execution(a, "j", UpdateRequest(S.SUCCEEDED))
    assert refused.value.code is RejectCode.TERMINAL_STATE_REACHED


def test_a_completed_job_cannot_be_canceled(store: JobStore, registry: Registry) -> None:
    (a,) = things(registry, 1)
    store.create_job("j", {}, [a])
    store.update_execution(a, "j", UpdateRequest(S.SUCCEEDED))
    with pytest.raises(ConflictError, match="COMPLETED"):
        store.cancel_job("j")


def test_cancel_and_remove_one_execution(store: JobStore, registry: Registry) -> None:
    a, b = things(registry, 2)
    store.create_job("j", {}, [a, b], target_selection="CONTINUOUS")
    assert store.cancel_execution("j", a, reason="left the wave").status is S.CANCELED
    with pytest.raises(ConflictError, match="already CANCELED"):
        store.cancel_execution("j", a)
    store.start_next(b, StartNextRequest())
    with pytest.raises(ConflictError, match="pass force"):
        store.remove_execution("j", b)
    removed = store.remove_execution("j", b, force=True, reason="decommissioned")
    assert (removed.status, removed.reason) == (S.REMOVED, "decommissioned")
    with pytest.raises(NotFoundError):
        store.cancel_execution("j", "nobody")


def test_continuous_jobs_take_targets_over_time_and_retry_ended_ones(
    store: JobStore, registry: Registry
) -> None:
    a, b, c = things(registry, 3)
    store.create_job("rollout", {"v": 2}, [], target_selection="CONTINUOUS")
    assert [e.thing_name for e in store.add_targets("rollout", [a, b])] == [a, b]
    store.update_execution(a, "rollout", UpdateRequest(S.FAILED))
    # A pending execution is left alone; an ended one too, unless retried.
    assert [e.thing_name for e in store.add_targets("rollout", [a, b, c])] == [c]
    retried = store.add_targets("rollout", [a, b], retry=True)
    assert [(e.thing_name, e.execution_number) for e in retried] == [(a, 2)]
    counts = store.status_counts("rollout")
    assert counts[S.QUEUED] == 3 and counts[S.FAILED] == 0  # the latest execution counts
    assert store.job_execution("rollout", a, 1).status is S.FAILED
    assert [e.execution_number for e in store.executions_for_thing(a)] == [1, 2]
    assert store.thing_status_counts(a)[S.FAILED] == 1
    with pytest.raises(ValidationError) as refused:
        store.add_targets("rollout", ["bad name"])
    assert refused.value.field == "things[0]"
    # A CONTINUOUS job completes only when told to, and not while executions are pending.
    for thing in (a, b, c):
        store.update_execution(thing, "rollout", UpdateRequest(S.SUCCEEDED))
    assert store.describe_job("rollout").status is JobStatus.IN_PROGRESS
    assert store.complete_job("rollout").status is JobStatus.COMPLETED
    with pytest.raises(ConflictError, match="takes no more targets"):
        store.add_targets("rollout", [a])


def test_snapshot_jobs_keep_their_targets(store: JobStore, registry: Registry) -> None:
    a, b = things(registry, 2)
    store.create_job("j", {}, [a])
    with pytest.raises(ConflictError, match="SNAPSHOT"):
        store.add_targets("j", [b])
    with pytest.raises(ConflictError, match="pending"):
        store.create_job("k", {}, [a], target_selection="CONTINUOUS")
        store.complete_job("k")


def test_listing_executions_pages_by_thing(store: JobStore, registry: Registry) -> None:
    names = sorted(things(registry, 5))
    store.create_job("j", {}, names)
    store.update_execution(names[1], "j", UpdateRequest(S.SUCCEEDED))
    first = store.list_executions("j", limit=2)
    assert [e.thing_name for e in first] == names[:2]
    rest = store.list_executions("j", after=first[-1].thing_name)
    assert [e.thing_name for e in rest] == names[2:]
    assert [e.thing_name for e in store.list_executions("j", status="SUCCEEDED")] == [names[1]]
    with pytest.raises(ValidationError) as refused:
        store.list_executions("j", status="DONE")
    assert refused.value.field == "status"
    assert [j.job_id for j in store.list_jobs(status=JobStatus.IN_PROGRESS)] == ["j"]


def test_step_and_in_progress_timers_time_executions_out(
    store: JobStore, registry: Registry, clock: Clock
) -> None:
    a, b, c = things(registry, 3)
    store.create_job("j", {}, [a, b, c], in_progress_timeout_minutes=10)
    store.start_next(a, StartNextRequest(step_timeout=2))
    store.start_next(b, StartNextRequest())  # only the job's 10 minutes
    store.start_next(c, StartNextRequest(step_timeout=1))
    store.update_execution(c, "j", UpdateRequest(S.SUCCEEDED))
    heard = Heard(store)
    clock.advance(90 * timedelta(seconds=1))
    assert store.sweep_timeouts() == []
    changes = store.sweep_timeouts(T0 + 2 * MINUTE)
    assert [(ch.thing_name, ch.status, ch.reason) for ch in changes] == [
        (a, S.TIMED_OUT, "the step timer ran out")
    ]
    assert heard.queues() == [(a, True, True, [])]
    changes = store.sweep_timeouts(T0 + 10 * MINUTE)
    assert [(ch.thing_name, ch.reason) for ch in changes] == [
        (b, "the job's in-progress timer ran out")
    ]
    job = store.describe_job("j")
    assert job.counts[S.TIMED_OUT] == 2 and job.status is JobStatus.COMPLETED


def test_a_report_after_the_timer_ran_out_is_refused_even_before_a_sweep(
    store: JobStore, registry: Registry, clock: Clock
) -> None:
    (a,) = things(registry, 1)
    store.create_job("j", {}, [a])
    store.start_next(a, StartNextRequest(step_timeout=1))
    clock.advance(2 * MINUTE)
    with pytest.raises(JobRejection) as refused:
        store.update_execution(a, "j", UpdateRequest(S.SUCCEEDED))
    assert refused.value.code is RejectCode.TERMINAL_STATE_REACHED
    assert store.job_execution("j", a).status is S.TIMED_OUT  # kept despite the refusal
    assert store.sweep_timeouts() == []


def test_pending_reads_time_out_what_has_expired(
    store: JobStore, registry: Registry, clock: Clock
) -> None:
    (a,) = things(registry, 1)
    store.create_job("j1", {}, [a])
    store.create_job("j2", {}, [a])
    store.start_next(a, StartNextRequest(step_timeout=1))
    clock.advance(MINUTE)
    assert [e.job_id for e in store.pending(a)] == ["j2"]
    assert store.job_execution("j1", a).status is S.TIMED_OUT


def test_notifications_follow_awss_example(store: JobStore, registry: Registry) -> None:
    """The sequence of AWS's jobs-notifications page: which changes announce what."""
    (thing,) = things(registry, 1)
    heard = Heard(store)
    store.create_job("job1", {}, [thing])
    assert heard.queues() == [(thing, True, True, ["job1"])]
    store.create_job("job2", {}, [thing])
    assert heard.queues() == [(thing, True, False, ["job1", "job2"])]
    store.update_execution(thing, "job1", UpdateRequest(S.IN_PROGRESS))
    assert heard.queues() == []  # neither the list nor the next job changed
    store.create_job("job3", {}, [thing])
    assert heard.queues() == [(thing, True, False, ["job1", "job2", "job3"])]
    store.update_execution(thing, "job1", UpdateRequest(S.SUCCEEDED))
    assert heard.queues() == [(thing, True, True, ["job2", "job3"])]
    store.update_execution(thing, "job3", UpdateRequest(S.IN_PROGRESS))
    assert heard.queues() == [(thing, False, True, ["job3", "job2"])]
    store.update_execution(thing, "job2", UpdateRequest(S.REJECTED))
    assert heard.queues() == [(thing, True, False, ["job3"])]
    store.cancel_job("job3", force=True)
    assert heard.queues() == [(thing, True, True, [])]


def test_a_failing_listener_does_not_undo_the_change(store: JobStore, registry: Registry) -> None:
    (thing,) = things(registry, 1)

    def broken(changes: JobChanges) -> None:
        raise RuntimeError("listener bug")

    store.listeners.append(broken)
    heard = Heard(store)
    store.create_job("j", {}, [thing])
    assert store.job_execution("j", thing).status is S.QUEUED
    assert heard.changes  # later listeners still hear it


def test_a_refused_change_tells_nobody(store: JobStore, registry: Registry) -> None:
    (thing,) = things(registry, 1)
    store.create_job("j", {}, [thing])
    heard = Heard(store)
    with pytest.raises(JobRejection):
        store.update_execution(thing, "j", UpdateRequest(S.SUCCEEDED, expected_version=9))
    with pytest.raises(ConflictError):
        store.create_job("j", {}, [thing])
    assert heard.changes == []


def test_deleting_a_thing_deletes_its_executions(store: JobStore, registry: Registry) -> None:
    a, b = things(registry, 2)
    store.create_job("j", {}, [a, b])
    registry.delete_thing(a)
    assert [e.thing_name for e in store.list_executions("j")] == [b]


def test_status_counts_read_an_index(tmp_path: Path) -> None:
    # SQLite shows the plan it would use on any size of table (PostgreSQL's planner picks
    # a sequential scan for a table this small, index or not).
    database = Database(f"sqlite:///{tmp_path / 'plan.db'}")
    database.migrate()
    with database.read() as session:
        plan = session.execute(
            text(
                "EXPLAIN QUERY PLAN SELECT status, count(*) FROM job_executions "
                "WHERE job_id = 'j' AND latest = 1 GROUP BY status"
            )
        ).all()
    database.dispose()
    assert "ix_job_executions_job_id_latest_status" in " ".join(str(row) for row in plan)


def test_two_stores_on_one_database_never_lose_an_update(
    database: Database, registry: Registry
) -> None:
    """Two cloud processes (here: two stores, each with its own lock) racing on one
    execution with expectedVersion: every accepted update is one version."""
    (thing,) = things(registry, 1)
    first, second = JobStore(database), JobStore(database)
    first.create_job("j", {}, [thing])
    first.start_next(thing, StartNextRequest())
    accepted: list[int] = []
    lock = threading.Lock()

    def worker(store: JobStore) -> None:
        for _ in range(15):
            version = store.job_execution("j", thing).version
            try:
                done, _ = store.update_execution(
                    thing, "j", UpdateRequest(S.IN_PROGRESS, expected_version=version)
                )
            except JobRejection as err:
                assert err.code is RejectCode.VERSION_MISMATCH
                continue
            with lock:
                accepted.append(done.version)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(accepted) == list(range(3, 3 + len(accepted)))
    assert store_version(first, thing) == 2 + len(accepted)


def store_version(store: JobStore, thing: str) -> int:
    return store.job_execution("j", thing).version
