"""The AWS IoT Jobs state machine: every transition, the timers, and the requests' checks."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core import jobstate
from edgeloop.core.jobstate import (
    DEVICE_STATUSES,
    ENDED_BY_CLOUD,
    PENDING,
    TERMINAL,
    CloudRefusal,
    Execution,
    ExecutionStatus,
    JobRejection,
    RejectCode,
    UpdateRequest,
)

S = ExecutionStatus
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def at(status: ExecutionStatus, version: int = 3, **changes: Any) -> Execution:
    """An execution in ``status`` (started, for the statuses only a start reaches)."""
    started = T0 if status is not S.QUEUED else None
    return replace(
        Execution(
            status=status,
            version=version,
            queued_at=T0,
            last_updated_at=T0,
            status_details={"step": "1"},
            started_at=started,
        ),
        **changes,
    )


# --- the statuses --------------------------------------------------------------------------


def test_the_statuses_are_the_sdks() -> None:
    from awsiot import iotjobs

    sdk = {v for k, v in vars(iotjobs.JobStatus).items() if not k.startswith("_")}
    assert sdk == {str(s) for s in S}
    codes = {v for k, v in vars(iotjobs.RejectedErrorCode).items() if not k.startswith("_")}
    assert codes == {str(c) for c in RejectCode}
    assert set(S) == PENDING | TERMINAL and not PENDING & TERMINAL
    assert {str(s) for s in DEVICE_STATUSES} == {"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"}


# --- device updates: the whole table ---------------------------------------------------------


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("requested", list(S))
def test_every_device_update_transition(
    current: ExecutionStatus, requested: ExecutionStatus
) -> None:
    body = {"status": str(requested), "clientToken": "tok"}
    if requested not in DEVICE_STATUSES:
        with pytest.raises(JobRejection) as refused:
            jobstate.parse_update(body)
        assert refused.value.code is RejectCode.INVALID_REQUEST
        assert "cannot be set by a device" in refused.value.message
        assert refused.value.client_token == "tok"
        return
    request = jobstate.parse_update(body)
    execution = at(current)
    now = T0 + MINUTE
    if current in PENDING:
        after = jobstate.update(execution, request, now, job_timeout=None)
        assert after.status is requested
        assert after.version == execution.version + 1
        assert after.last_updated_at == now
        assert after.status_details == {"step": "1"}  # not given: kept
        if requested is S.IN_PROGRESS:
            assert after.started_at == (execution.started_at or now)
        else:
            assert after.timeout_at is None
        return
    with pytest.raises(JobRejection) as refused:
        jobstate.update(execution, request, now, job_timeout=None)
    expected = (
        RejectCode.TERMINAL_STATE_REACHED
        if current in ENDED_BY_CLOUD
        else RejectCode.INVALID_STATE_TRANSITION
    )
    assert refused.value.code is expected
    assert refused.value.execution_state == {
        "status": str(current),
        "statusDetails": {"step": "1"},
        "versionNumber": 3,
    }


def test_expected_version_must_match() -> None:
    execution = at(S.IN_PROGRESS, version=4)
    stale = jobstate.parse_update({"status": "SUCCEEDED", "expectedVersion": 3})
    with pytest.raises(JobRejection) as refused:
        jobstate.update(execution, stale, T0, job_timeout=None)
    assert refused.value.code is RejectCode.VERSION_MISMATCH
    assert refused.value.execution_state is not None
    assert refused.value.execution_state["versionNumber"] == 4
    current = jobstate.parse_update({"status": "SUCCEEDED", "expectedVersion": 4})
    assert jobstate.update(execution, current, T0, job_timeout=None).version == 5


def test_a_terminal_execution_is_refused_before_its_version_is_compared() -> None:
    request = jobstate.parse_update({"status": "SUCCEEDED", "expectedVersion": 1})
    with pytest.raises(JobRejection) as refused:
        jobstate.update(at(S.SUCCEEDED, version=5), request, T0, job_timeout=None)
    assert refused.value.code is RejectCode.INVALID_STATE_TRANSITION


def test_status_details_replace_the_stored_ones_when_given() -> None:
    request = jobstate.parse_update({"status": "IN_PROGRESS", "statusDetails": {"pct": "50"}})
    after = jobstate.update(at(S.IN_PROGRESS), request, T0, job_timeout=None)
    assert after.status_details == {"pct": "50"}
    failed = jobstate.parse_update({"status": "FAILED", "statusDetails": {"why": "disk"}})
    assert jobstate.update(after, failed, T0, job_timeout=None).status_details == {"why": "disk"}


# --- timers ----------------------------------------------------------------------------------


def test_the_step_timer_starts_with_in_progress_and_is_reset_only_when_given() -> None:
    queued = jobstate.queued(T0)
    started = jobstate.update(
        queued, UpdateRequest(S.IN_PROGRESS, step_timeout=5), T0, job_timeout=None
    )
    assert started.step_deadline == T0 + 5 * MINUTE == started.timeout_at
    later = T0 + 3 * MINUTE
    same = jobstate.update(started, UpdateRequest(S.IN_PROGRESS), later, job_timeout=None)
    assert same.step_deadline == T0 + 5 * MINUTE  # no new value: the timer runs on
    reset = jobstate.update(
        started, UpdateRequest(S.IN_PROGRESS, step_timeout=10), later, job_timeout=None
    )
    assert reset.step_deadline == later + 10 * MINUTE
    assert not jobstate.expired(reset, later + 9 * MINUTE)
    assert jobstate.expired(reset, later + 10 * MINUTE)


def test_the_jobs_in_progress_timer_runs_from_the_first_start_and_is_never_reset() -> None:
    started = jobstate.start(jobstate.queued(T0), T0 + MINUTE, job_timeout=60)
    assert started.run_deadline == T0 + 61 * MINUTE
    again = jobstate.update(
        started, UpdateRequest(S.IN_PROGRESS, step_timeout=600), T0 + 2 * MINUTE, job_timeout=60
    )
    assert again.run_deadline == T0 + 61 * MINUTE
    assert again.timeout_at == T0 + 61 * MINUTE  # the earlier of the two timers
    assert jobstate.expired(again, T0 + 61 * MINUTE)


def test_only_in_progress_executions_time_out() -> None:
    for status in S:
        execution = at(status, step_deadline=T0, run_deadline=T0)
        assert jobstate.expired(execution, T0 + MINUTE) is (status is S.IN_PROGRESS)
    assert not jobstate.expired(at(S.IN_PROGRESS), T0 + 1000 * MINUTE)  # no timers


def test_ending_an_execution_clears_its_timers() -> None:
    running = at(S.IN_PROGRESS, step_deadline=T0 + MINUTE, run_deadline=T0 + MINUTE)
    done = jobstate.update(running, UpdateRequest(S.SUCCEEDED), T0, job_timeout=None)
    assert done.step_deadline is None and done.run_deadline is None and done.timeout_at is None


# --- start-next ------------------------------------------------------------------------------


def test_start_next_starts_a_queued_execution() -> None:
    started = jobstate.start(
        jobstate.queued(T0), T0 + MINUTE, status_details={"a": "b"}, step_timeout=2
    )
    assert started.status is S.IN_PROGRESS and started.version == 2
    assert started.started_at == T0 + MINUTE
    assert started.status_details == {"a": "b"}
    assert started.step_deadline == T0 + 3 * MINUTE


def test_start_next_returns_a_running_execution_as_it_is_unless_given_changes() -> None:
    running = at(S.IN_PROGRESS)
    assert jobstate.start(running, T0 + MINUTE) is running
    touched = jobstate.start(running, T0 + MINUTE, step_timeout=1)
    assert touched.version == running.version + 1 and touched.started_at == T0


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_start_next_refuses_an_ended_execution(status: ExecutionStatus) -> None:
    with pytest.raises(JobRejection):
        jobstate.start(at(status), T0)


# --- the cloud ending executions: the whole table --------------------------------------------


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", sorted(ENDED_BY_CLOUD))
@pytest.mark.parametrize("force", [False, True])
def test_every_cloud_transition(
    current: ExecutionStatus, target: ExecutionStatus, force: bool
) -> None:
    execution = at(current, step_deadline=T0, run_deadline=T0)
    allowed = (
        current is S.IN_PROGRESS
        if target is S.TIMED_OUT
        else current is S.QUEUED or (current is S.IN_PROGRESS and force)
    )
    if not allowed:
        with pytest.raises(CloudRefusal):
            jobstate.end_by_cloud(execution, target, T0 + MINUTE, force=force)
        return
    after = jobstate.end_by_cloud(execution, target, T0 + MINUTE, force=force)
    assert after.status is target and after.version == execution.version + 1
    assert after.timeout_at is None


def test_the_cloud_only_ends_executions_as_canceled_removed_or_timed_out() -> None:
    with pytest.raises(ValueError, match="CANCELED, REMOVED or TIMED_OUT"):
        jobstate.end_by_cloud(at(S.QUEUED), S.SUCCEEDED, T0)


def test_a_running_execution_is_not_canceled_without_force() -> None:
    with pytest.raises(CloudRefusal, match="pass force"):
        jobstate.end_by_cloud(at(S.IN_PROGRESS), S.CANCELED, T0)


# --- ordering --------------------------------------------------------------------------------


def test_pending_lists_put_in_progress_first_then_fifo() -> None:
    rows = [
        ("c", S.QUEUED, T0 + MINUTE, 3),
        ("a", S.QUEUED, T0, 2),
        ("b", S.QUEUED, T0, 1),  # same queue time: creation order decides
        ("d", S.IN_PROGRESS, T0 + 5 * MINUTE, 4),
    ]
    ordered = sorted(rows, key=lambda r: jobstate.pending_order(r[1], r[2], r[3]))
    assert [r[0] for r in ordered] == ["d", "b", "a", "c"]


# --- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "status is required"),
        ({"status": 3}, "cannot be set by a device"),
        ({"status": "QUEUED"}, "cannot be set by a device"),
        ({"status": "SUCCEEDED", "expectedVersion": "1"}, "expectedVersion must be an integer"),
        ({"status": "SUCCEEDED", "expectedVersion": True}, "expectedVersion must be an integer"),
        ({"status": "SUCCEEDED", "executionNumber": 0}, "executionNumber must be at least 1"),
        ({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}, "stepTimeoutInMinutes must be"),
        ({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 10081}, "between 1 and 10080"),
        ({"status": "IN_PROGRESS", "includeJobDocument": "yes"}, "includeJobDocument must be"),
        ({"status": "FAILED", "statusDetails": []}, "statusDetails must be an object"),
        ({"status": "FAILED", "statusDetails": {"a": 1}}, "statusDetails.a must be a string"),
        ({"status": "FAILED", "statusDetails": {"a": ""}}, "statusDetails.a must be 1-1024"),
        ({"status": "FAILED", "statusDetails": {"a b": "x"}}, "statusDetails name 'a b'"),
        ({"status": "FAILED", "statusDetails": {"a": "x\ny"}}, "without control characters"),
        (
            {"status": "FAILED", "statusDetails": {f"k{i}": "v" for i in range(11)}},
            "at most 10",
        ),
        ({"status": "FAILED", "clientToken": "x" * 65}, "clientToken must be a string of 1-64"),
    ],
)
def test_bad_update_requests_name_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(JobRejection) as refused:
        jobstate.parse_update({**body, **({} if "clientToken" in body else {"clientToken": "t"})})
    assert refused.value.code is RejectCode.INVALID_REQUEST
    assert message in refused.value.message
    if "clientToken" not in body:
        assert refused.value.client_token == "t"  # echoed, so the asker can match it


def test_update_requests_parse_every_field() -> None:
    request = jobstate.parse_update(
        {
            "status": "IN_PROGRESS",
            "statusDetails": {"pct": "10"},
            "expectedVersion": 2,
            "executionNumber": 1,
            "includeJobExecutionState": True,
            "includeJobDocument": True,
            "stepTimeoutInMinutes": 5,
            "clientToken": "abc",
        }
    )
    assert request == UpdateRequest(S.IN_PROGRESS, {"pct": "10"}, 2, 1, True, True, 5, "abc")


def test_other_requests_parse() -> None:
    assert jobstate.parse_start_next({"stepTimeoutInMinutes": 3}).step_timeout == 3
    assert jobstate.parse_describe({}).include_document is True
    assert jobstate.parse_describe({"includeJobDocument": False}).include_document is False
    assert jobstate.parse_pending({"clientToken": "x"}).client_token == "x"
    with pytest.raises(JobRejection) as refused:
        jobstate.parse_start_next({"statusDetails": {"a": 1}, "clientToken": "k"})
    assert refused.value.client_token == "k"
    with pytest.raises(JobRejection):
        jobstate.parse_describe({"executionNumber": -1})


@pytest.mark.parametrize("payload", [b"{", b"[1]", b"\xff", b"NaN", b'"x"'])
def test_payloads_that_are_not_json_objects_are_invalid_json(payload: bytes) -> None:
    with pytest.raises(JobRejection) as refused:
        jobstate.parse_payload(payload)
    assert refused.value.code is RejectCode.INVALID_JSON


def test_an_empty_payload_is_an_empty_request() -> None:
    assert jobstate.parse_payload(b"") == {} == jobstate.parse_payload(None)


def test_rejections_render_awss_error_document() -> None:
    error = JobRejection(
        RejectCode.VERSION_MISMATCH,
        "stale",
        execution_state={"status": "QUEUED", "statusDetails": {}, "versionNumber": 1},
        client_token="t",
    )
    document = error.to_document(T0)
    assert document == {
        "code": "VersionMismatch",
        "message": "stale",
        "timestamp": int(T0.timestamp()),
        "clientToken": "t",
        "executionState": {"status": "QUEUED", "statusDetails": {}, "versionNumber": 1},
    }
    from awsiot import iotjobs

    parsed = iotjobs.RejectedError.from_payload(json.loads(json.dumps(document)))
    assert parsed.code == "VersionMismatch" and parsed.execution_state.version_number == 1


@given(st.text(max_size=70))
def test_job_ids_follow_awss_rule(job_id: str) -> None:
    valid = 0 < len(job_id) <= 64 and all(
        c.isascii() and (c.isalnum() or c in "_-") for c in job_id
    )
    assert jobstate.is_job_id(job_id) is valid


# --- any sequence of events ------------------------------------------------------------------

_events = st.lists(
    st.one_of(
        st.tuples(
            st.just("device"),
            st.sampled_from(sorted(DEVICE_STATUSES)),
            st.none() | st.integers(1, 30),
            st.none() | st.integers(0, 12),
        ),
        st.tuples(
            st.just("cloud"),
            st.sampled_from(sorted(ENDED_BY_CLOUD)),
            st.booleans(),
            st.none(),
        ),
        st.tuples(st.just("start"), st.none(), st.none() | st.integers(1, 30), st.none()),
        st.tuples(st.just("wait"), st.none(), st.integers(0, 40), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(_events, st.none() | st.integers(1, 60))
def test_any_sequence_keeps_the_invariants(events: list[Any], job_timeout: int | None) -> None:
    now = T0
    execution = jobstate.queued(now)
    first_start: datetime | None = None
    for kind, status, number, expected in events:
        before = execution
        if kind == "wait":
            now += number * MINUTE
            if jobstate.expired(execution, now):
                execution = jobstate.end_by_cloud(execution, S.TIMED_OUT, now)
            continue
        try:
            if kind == "device":
                request = UpdateRequest(status, step_timeout=number, expected_version=expected)
                execution = jobstate.update(execution, request, now, job_timeout=job_timeout)
            elif kind == "start":
                execution = jobstate.start(
                    execution, now, step_timeout=number, job_timeout=job_timeout
                )
            else:
                execution = jobstate.end_by_cloud(execution, status, now, force=number)
        except (JobRejection, CloudRefusal):
            assert execution is before  # a refusal changes nothing
            continue
        if execution is before:
            continue
        # Every change is one version; nothing leaves a terminal status.
        assert execution.version == before.version + 1
        assert before.status not in TERMINAL
        if execution.status is S.IN_PROGRESS:
            first_start = first_start or now
            assert execution.started_at == first_start
            if job_timeout is not None:
                assert execution.run_deadline == first_start + job_timeout * MINUTE
        else:
            assert execution.timeout_at is None
        # A timer only runs while IN_PROGRESS, and never one that has already run out.
        if execution.timeout_at is not None:
            assert execution.status is S.IN_PROGRESS and execution.timeout_at > now
