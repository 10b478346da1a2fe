"""The hub's persistent state: atomic JSON writes, HubState, install markers, and the
process-group records that let a restarted agent end what its predecessor left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeloop.edge.process import ProcessGroups
from edgeloop.edge.store import HubState, HubStore, read_json, write_json_atomic
from tests.edge.conftest import pid_alive


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# -- write_json_atomic ---------------------------------------------------------------
@pytest.mark.parametrize("fsync", [True, False])
def test_write_creates_folders_and_leaves_no_temp_file(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "a" / "b" / "doc.json"
    write_json_atomic(path, {"z": 1, "a": [1, 2]}, fsync=fsync)
    assert json.loads(path.read_text()) == {"z": 1, "a": [1, 2]}
    write_json_atomic(path, {"v": 2}, fsync=fsync)
    assert json.loads(path.read_text()) == {"v": 2}
    assert _siblings(path) == ["doc.json"]


def test_a_failed_dump_keeps_the_old_file_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    write_json_atomic(path, {"version": 1})
    before = path.read_bytes()
    # The set is deep inside, so json.dump has already written part of the document
    # to the temp file when it fails.
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": "x" * 10_000, "b": {"c": [1, 2, {3}]}})
    assert path.read_bytes() == before
    assert _siblings(path) == ["hub.json"]


def test_a_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, object())
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hub.json"
    write_json_atomic(path, {"version": 1})

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("edgeloop.fileio.os.fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"version": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert _siblings(path) == ["hub.json"]


def test_a_concurrent_reader_never_sees_a_torn_document(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    write_json_atomic(path, {"n": 0, "pad": "x" * 50_000}, fsync=False)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[Exception] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads(path.read_text())["n"])
            except Exception as err:
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(1, 150):
            write_json_atomic(path, {"n": n, "pad": "x" * 50_000}, fsync=False)
    finally:
        stop.set()
        thread.join(10)
    assert errors == []
    assert seen and seen == sorted(seen)  # only whole documents, never going back
    assert _siblings(path) == ["hub.json"]


def test_read_json_default_only_when_missing(tmp_path: Path) -> None:
    assert read_json(tmp_path / "missing.json", {"d": 1}) == {"d": 1}
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError):
        read_json(bad, {})


# -- HubState ------------------------------------------------------------------------
def _state() -> HubState:
    return HubState(
        deployment_id="d-1",
        roots={"com.example.App": "1.0.0"},
        versions={"com.example.App": "1.0.0", "com.example.Lib": "2.1.0"},
        configuration={"com.example.App": {"level": 2, "nested": {"list": [1, "two"]}}},
        updated_at=123.5,
    )


def test_hub_state_round_trips_through_json(tmp_path: Path) -> None:
    state = _state()
    doc = json.loads(json.dumps(state.to_json()))
    assert doc["deploymentId"] == "d-1"
    assert HubState.from_json(doc) == state


def test_hub_state_from_an_empty_document_is_empty() -> None:
    assert HubState.from_json({}) == HubState()


def test_hub_state_copy_is_deep() -> None:
    state = _state()
    snapshot = state.copy()
    state.configuration["com.example.App"]["nested"]["list"].append(3)
    state.roots["com.example.New"] = "0.1.0"
    assert snapshot.configuration["com.example.App"]["nested"]["list"] == [1, "two"]
    assert "com.example.New" not in snapshot.roots
    assert snapshot.deployment_id == "d-1"


def test_hub_store_saves_and_loads(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    assert store.load_hub() == HubState()
    state = _state()
    before = time.time()
    store.save_hub(state)
    assert state.updated_at >= before
    again = HubStore(tmp_path).load_hub()
    assert again == state
    assert _siblings(store.hub_path) == ["hub.json", "installed"]


def test_install_markers_are_per_version_and_step(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    assert not store.step_done("com.example.A", "1.0.0", "install")
    store.mark_step_done("com.example.A", "1.0.0", "install")
    assert store.step_done("com.example.A", "1.0.0", "install")
    assert not store.step_done("com.example.A", "1.0.0", "bootstrap")
    assert not store.step_done("com.example.A", "1.0.1", "install")
    assert not store.step_done("com.example.B", "1.0.0", "install")
    # Markers survive a new store on the same folder (an agent restart).
    assert HubStore(tmp_path).step_done("com.example.A", "1.0.0", "install")


def test_forget_version_drops_only_that_version(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    for step in ("install", "bootstrap"):
        store.mark_step_done("com.example.A", "1.0.0", step)
    store.mark_step_done("com.example.A", "2.0.0", "install")
    store.forget_version("com.example.A", "1.0.0")
    store.forget_version("com.example.A", "1.0.0")  # twice is harmless
    assert not store.step_done("com.example.A", "1.0.0", "install")
    assert not store.step_done("com.example.A", "1.0.0", "bootstrap")
    assert store.step_done("com.example.A", "2.0.0", "install")


def test_deployment_history_is_capped(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    assert store.load_deployments() == []
    docs = [{"deploymentId": str(n)} for n in range(HubStore.HISTORY_LIMIT + 25)]
    store.save_deployments(docs)
    kept = store.load_deployments()
    assert len(kept) == HubStore.HISTORY_LIMIT
    assert kept[0]["deploymentId"] == "25"
    assert kept[-1]["deploymentId"] == str(HubStore.HISTORY_LIMIT + 24)


# -- ProcessGroups -------------------------------------------------------------------
@pytest.fixture
def group_leader() -> Iterator[subprocess.Popen[bytes]]:
    """A shell leading its own process group, with a child in the same group."""
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 30 & sleep 30; wait"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            members.append(int(entry.name))
    return members


def _wait_members(pgid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 5
    while len(members := _group_members(pgid)) < count:
        assert time.monotonic() < deadline, f"group {pgid} has {members}"
        time.sleep(0.01)
    return members


def test_reap_leftovers_kills_a_recorded_group(
    tmp_path: Path, group_leader: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "process-groups.json"
    pgid = group_leader.pid
    members = _wait_members(pgid, 3)  # sh and its two sleeps
    ProcessGroups(path).add(pgid, "com.example.Left")  # the agent that then died
    recorded = json.loads(path.read_text())
    assert recorded[str(pgid)]["component"] == "com.example.Left"
    assert recorded[str(pgid)]["start"]

    killed = ProcessGroups(path).reap_leftovers()  # the agent that came back
    assert killed == [f"com.example.Left (process group {pgid})"]
    assert group_leader.wait(5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in members):
        assert time.monotonic() < deadline, "a member of the group survived"
        time.sleep(0.01)
    assert json.loads(path.read_text()) == {}


def test_reap_leftovers_spares_a_reused_pid(
    tmp_path: Path, group_leader: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "process-groups.json"
    pgid = group_leader.pid
    _wait_members(pgid, 1)
    # Same pgid, but the recorded start time is another process's: the pid was reused.
    write_json_atomic(path, {str(pgid): {"component": "com.example.Old", "start": "1"}})
    assert ProcessGroups(path).reap_leftovers() == []
    time.sleep(0.05)
    assert group_leader.poll() is None
    assert json.loads(path.read_text()) == {}  # the stale record is forgotten


def test_reap_leftovers_ignores_a_record_without_a_start_time(
    tmp_path: Path, group_leader: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "process-groups.json"
    write_json_atomic(path, {str(group_leader.pid): {"component": "x", "start": ""}})
    assert ProcessGroups(path).reap_leftovers() == []
    time.sleep(0.05)
    assert group_leader.poll() is None


def test_reap_leftovers_with_nothing_recorded(tmp_path: Path) -> None:
    assert ProcessGroups(tmp_path / "missing.json").reap_leftovers() == []
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    assert ProcessGroups(corrupt).reap_leftovers() == []


def test_reap_leftovers_skips_a_group_that_is_gone(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    path = tmp_path / "process-groups.json"
    groups = ProcessGroups(path)
    groups.add(proc.pid, "com.example.Quick")
    proc.wait(5)
    assert ProcessGroups(path).reap_leftovers() == []


def test_discard_forgets_a_group(tmp_path: Path, group_leader: subprocess.Popen[bytes]) -> None:
    path = tmp_path / "process-groups.json"
    groups = ProcessGroups(path)
    groups.add(group_leader.pid, "com.example.A")
    groups.discard(group_leader.pid)
    groups.discard(group_leader.pid)  # twice is harmless
    assert json.loads(path.read_text()) == {}
    assert ProcessGroups(path).reap_leftovers() == []
    assert group_leader.poll() is None
