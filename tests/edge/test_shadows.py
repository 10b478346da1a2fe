"""The hub's local shadow store: AWS semantics, durability, names, listing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeloop.core.errors import ShadowError
from edgeloop.core.shadow import UpdateResult
from edgeloop.edge.shadows import DELETED_VERSION_TTL, LocalShadows


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def store(path: Path, clock: Clock | None = None) -> LocalShadows:
    return LocalShadows(path, clock=clock or Clock(), fsync=False)


def reported(**values: Any) -> dict[str, Any]:
    return {"state": {"reported": values}}


def test_update_then_get_with_delta_and_versions(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    first = shadows.update("pump-1", "", {"state": {"desired": {"speed": 3}}})
    assert first.document.version == 1
    assert first.delta is not None and first.delta["state"] == {"speed": 3}
    second = shadows.update("pump-1", "", reported(speed=2))
    assert second.document.version == 2
    got = shadows.get("pump-1", "")
    assert got["state"] == {
        "desired": {"speed": 3},
        "reported": {"speed": 2},
        "delta": {"speed": 3},
    }
    assert got["version"] == 2
    assert got["timestamp"] == 1_700_000_000
    assert got["metadata"]["reported"]["speed"] == {"timestamp": 1_700_000_000}


def test_state_survives_a_new_instance(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.update("pump-1", "", reported(on=True))
    first.update("pump-1", "config", {"state": {"desired": {"rate": 5}}})
    first.update("pump-1", "config", {"state": {"desired": {"rate": 6}}})
    first.update("pump-2", "", reported(on=False))

    again = store(tmp_path)
    assert again.get("pump-1", "")["state"] == {"reported": {"on": True}}
    config = again.get("pump-1", "config")
    assert config["state"]["desired"] == {"rate": 6}
    assert config["version"] == 2
    assert again.list_named("pump-1", 10, None) == (["config"], None)
    assert again.get("pump-2", "")["version"] == 1
    # One file per shadow, readable JSON.
    assert (tmp_path / "pump-1" / "classic.json").is_file()
    data = json.loads((tmp_path / "pump-1" / "named" / "config.json").read_text())
    assert data["document"]["version"] == 2


def test_versions_continue_after_delete_and_restart(tmp_path: Path) -> None:
    clock = Clock()
    shadows = store(tmp_path, clock)
    for i in range(3):
        shadows.update("t", "s", reported(i=i))
    assert shadows.delete("t", "s", None) == {"version": 3, "timestamp": 1_700_000_000}
    with pytest.raises(ShadowError) as err:
        shadows.get("t", "s")
    assert err.value.code == 404
    # Recreated (after a restart too): the version goes on from the deleted one.
    again = store(tmp_path, clock)
    assert again.update("t", "s", reported(i=9)).document.version == 4
    assert again.get("t", "s")["state"] == {"reported": {"i": 9}}


def test_deleted_version_is_forgotten_after_48_hours(tmp_path: Path) -> None:
    clock = Clock()
    shadows = store(tmp_path, clock)
    shadows.update("t", "", reported(a=1))
    shadows.update("t", "", reported(a=2))
    shadows.delete("t", "", None)
    clock.now += DELETED_VERSION_TTL + 1
    assert shadows.update("t", "", reported(a=3)).document.version == 1


def test_version_conflict_changes_nothing(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    shadows.update("t", "", reported(a=1))
    with pytest.raises(ShadowError) as err:
        shadows.update("t", "", {"state": {"reported": {"a": 2}}, "version": 7})
    assert err.value.code == 409
    assert shadows.get("t", "")["state"] == {"reported": {"a": 1}}
    # The right version is accepted.
    assert shadows.update("t", "", {**reported(a=2), "version": 1}).document.version == 2
    with pytest.raises(ShadowError) as err:
        shadows.delete("t", "", {"version": 1})
    assert err.value.code == 409
    assert store(tmp_path).get("t", "")["version"] == 2


def test_missing_shadows_are_404(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    with pytest.raises(ShadowError) as err:
        shadows.get("t", "")
    assert err.value.code == 404
    with pytest.raises(ShadowError) as err:
        shadows.delete("t", "named", None)
    assert err.value.code == 404
    shadows.update("t", "x", reported(a=1))
    shadows.delete("t", "x", None)
    with pytest.raises(ShadowError) as err:
        shadows.delete("t", "x", None)
    assert err.value.code == 404


@pytest.mark.parametrize(
    ("thing", "name", "what"),
    [
        ("", "", "thing name"),
        ("bad thing", "", "thing name"),
        ("../etc", "", "thing name"),
        ("t" * 129, "", "thing name"),
        ("t", "a/b", "shadow name"),
        ("t", "..", "shadow name"),
        ("t", "s" * 65, "shadow name"),
        ("t", "$x", "shadow name"),
    ],
)
def test_invalid_names_are_400(tmp_path: Path, thing: str, name: str, what: str) -> None:
    shadows = store(tmp_path)
    with pytest.raises(ShadowError) as err:
        shadows.update(thing, name, reported(a=1))
    assert err.value.code == 400
    assert what in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_longest_valid_names_are_accepted(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    thing, name = "T:_-9" + "x" * 123, "S:_-9" + "y" * 59
    shadows.update(thing, name, reported(a=1))
    assert store(tmp_path).get(thing, name)["version"] == 1


def test_bad_requests_are_400_and_413(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    with pytest.raises(ShadowError) as err:
        shadows.update("t", "", {"nostate": 1})
    assert err.value.code == 400
    with pytest.raises(ShadowError) as err:
        shadows.update("t", "", reported(blob="x" * 9000))
    assert err.value.code == 413
    assert not (tmp_path / "t" / "classic.json").exists()


def test_listing_is_sorted_paged_and_skips_deleted_and_classic(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    shadows.update("t", "", reported(a=1))
    for name in ["e", "a", "d", "c", "b", "gone"]:
        shadows.update("t", name, reported(a=1))
    shadows.delete("t", "gone", None)
    shadows.update("other", "z", reported(a=1))

    page, token = shadows.list_named("t", 2, None)
    assert page == ["a", "b"] and token is not None
    page, token = shadows.list_named("t", 2, token)
    assert page == ["c", "d"] and token is not None
    # A shadow created between pages is not skipped, nor an earlier one repeated.
    shadows.update("t", "da", reported(a=1))
    page, token = shadows.list_named("t", 2, token)
    assert page == ["da", "e"] and token is None
    assert shadows.list_named("t", 100, None) == (["a", "b", "c", "d", "da", "e"], None)
    assert shadows.list_named("nobody", 25, None) == ([], None)


def test_exactly_full_last_page_has_no_token(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    for name in ["a", "b"]:
        shadows.update("t", name, reported(a=1))
    assert shadows.list_named("t", 2, None) == (["a", "b"], None)


@pytest.mark.parametrize("page_size", [0, 101, -1])
def test_bad_page_size_is_400(tmp_path: Path, page_size: int) -> None:
    with pytest.raises(ShadowError) as err:
        store(tmp_path).list_named("t", page_size, None)
    assert err.value.code == 400


def test_bad_or_foreign_token_is_400(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    for name in ["a", "b", "c"]:
        shadows.update("t", name, reported(a=1))
        shadows.update("u", name, reported(a=1))
    _, token = shadows.list_named("t", 1, None)
    assert token is not None
    for bad in ["not base64!", "e30=", token[:-4]]:
        with pytest.raises(ShadowError) as err:
            shadows.list_named("t", 1, bad)
        assert err.value.code == 400
    with pytest.raises(ShadowError):
        shadows.list_named("u", 1, token)


def test_listeners_hear_accepted_changes_only(tmp_path: Path) -> None:
    shadows = store(tmp_path)
    heard: list[tuple[str, str, UpdateResult | None]] = []
    shadows.listeners.append(lambda thing, name, result: heard.append((thing, name, result)))

    def broken(thing: str, name: str, result: UpdateResult | None) -> None:
        raise RuntimeError("listener bug")

    shadows.listeners.append(broken)
    result = shadows.update("t", "s", reported(a=1))
    with pytest.raises(ShadowError):
        shadows.update("t", "s", {**reported(a=2), "version": 9})
    shadows.delete("t", "s", None)
    assert heard == [("t", "s", result), ("t", "s", None)]


def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    shadows = store(blocker)
    with pytest.raises(ShadowError) as err:
        shadows.update("t", "", reported(a=1))
    assert err.value.code == 500
    with pytest.raises(ShadowError) as err:
        shadows.get("t", "")
    assert err.value.code == 404


def test_a_damaged_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store(tmp_path).update("t", "s", reported(a=1))
    store(tmp_path).update("t", "", reported(a=1))
    (tmp_path / "t" / "named" / "s.json").write_text("{not json")
    shadows = store(tmp_path)
    assert shadows.get("t", "")["version"] == 1
    with pytest.raises(ShadowError) as err:
        shadows.get("t", "s")
    assert err.value.code == 404
    assert (tmp_path / "t" / "named" / "s.json.corrupt").exists()
    assert "unreadable" in caplog.text
    assert shadows.update("t", "s", reported(a=2)).document.version == 1


def test_writes_are_durable_by_default(tmp_path: Path) -> None:
    shadows = LocalShadows(tmp_path)
    shadows.update("t", "", reported(a=1))
    assert LocalShadows(tmp_path).get("t", "")["state"] == {"reported": {"a": 1}}
