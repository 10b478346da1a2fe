"""AgentSettings.load: defaults, agent.json, overrides, and errors that name file and key."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from edgeloop.core.errors import ValidationError
from edgeloop.edge.lifecycle import RestartPolicy
from edgeloop.edge.settings import AgentSettings, Layout, default_root


def _write(root: Path, doc: Any) -> Path:
    path = root / "agent.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_defaults_without_agent_json(tmp_path: Path) -> None:
    settings = AgentSettings.load(tmp_path)
    assert settings.root == tmp_path
    assert settings.thing_name == socket.gethostname()
    assert settings.region == "us-east-1"
    assert settings.restart == RestartPolicy()
    assert settings.stop_grace == 5.0
    assert settings.health_window == 1.0
    assert settings.deployment_timeout == 300.0
    assert settings.log_max_bytes == 1024 * 1024
    assert settings.log_backups == 3


def test_values_from_agent_json(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "thing_name": "kitchen-hub",
            "region": "eu-west-1",
            "stop_grace": 2,
            "health_window": 0.25,
            "log_max_bytes": 4096,
            "log_backups": 0,
            "restart": {"base_delay": 1, "broken_after": 5},
        },
    )
    settings = AgentSettings.load(tmp_path)
    assert settings.thing_name == "kitchen-hub"
    assert settings.region == "eu-west-1"
    assert settings.stop_grace == 2.0
    assert isinstance(settings.stop_grace, float)  # an int in JSON becomes the float asked for
    assert settings.health_window == 0.25
    assert settings.log_max_bytes == 4096
    assert settings.log_backups == 0
    assert settings.restart == RestartPolicy(base_delay=1.0, broken_after=5)
    assert isinstance(settings.restart.base_delay, float)
    assert settings.deployment_timeout == 300.0  # keys not given keep their defaults


def test_empty_object_is_all_defaults(tmp_path: Path) -> None:
    _write(tmp_path, {})
    assert AgentSettings.load(tmp_path) == AgentSettings(root=tmp_path)


def test_overrides_win_over_agent_json(tmp_path: Path) -> None:
    _write(tmp_path, {"thing_name": "from-file", "health_window": 3})
    settings = AgentSettings.load(tmp_path, thing_name="from-flag", health_window=0.5)
    assert settings.thing_name == "from-flag"
    assert settings.health_window == 0.5


def test_none_overrides_mean_unset(tmp_path: Path) -> None:
    _write(tmp_path, {"thing_name": "from-file"})
    settings = AgentSettings.load(tmp_path, thing_name=None, health_window=None)
    assert settings.thing_name == "from-file"
    assert settings.health_window == 1.0


def _error(tmp_path: Path, doc: Any) -> ValidationError:
    path = _write(tmp_path, doc)
    with pytest.raises(ValidationError) as info:
        AgentSettings.load(tmp_path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    return info.value


def test_bad_json_names_the_file(tmp_path: Path) -> None:
    err = _error(tmp_path, '{"thing_name": "x",')
    assert "not valid JSON" in str(err)
    assert isinstance(err.__cause__, ValueError)


@pytest.mark.parametrize("doc", ["[1, 2]", '"hub"', "3", "null"])
def test_a_document_that_is_not_an_object(tmp_path: Path, doc: str) -> None:
    err = _error(tmp_path, doc)
    assert "must be a JSON object" in str(err)


def test_unknown_key_is_named_with_the_known_ones(tmp_path: Path) -> None:
    err = _error(tmp_path, {"thing_name": "a", "stopgrace": 1})
    assert err.field == "stopgrace"
    message = str(err)
    assert "stopgrace" in message
    assert "unknown setting" in message
    for known in ("stop_grace", "health_window", "restart", "thing_name"):
        assert known in message
    assert "root" not in message.split("known:")[1]  # root comes from --root only


def test_root_cannot_be_set_from_the_file(tmp_path: Path) -> None:
    err = _error(tmp_path, {"root": "/elsewhere"})
    assert err.field == "root"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("thing_name", 42, "must be a str"),
        ("region", None, "must be a str"),
        ("stop_grace", "5", "must be a float"),
        ("stop_grace", True, "must be a float"),
        ("health_window", [1], "must be a float"),
        ("log_max_bytes", 1.5, "must be a int"),
        ("log_backups", "3", "must be a int"),
        ("log_backups", False, "must be a int"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    err = _error(tmp_path, {key: value})
    assert err.field == key
    assert f": {key}: " in str(err)
    assert expected in str(err)


@pytest.mark.parametrize("key", ["stop_grace", "health_window", "deployment_timeout"])
def test_negative_seconds_are_refused(tmp_path: Path, key: str) -> None:
    err = _error(tmp_path, {key: -0.5})
    assert err.field == key
    assert "must not be negative" in str(err)


def test_zero_seconds_are_allowed(tmp_path: Path) -> None:
    _write(tmp_path, {"stop_grace": 0})
    assert AgentSettings.load(tmp_path).stop_grace == 0.0


# -- the restart sub-document --------------------------------------------------------
def test_restart_must_be_an_object(tmp_path: Path) -> None:
    err = _error(tmp_path, {"restart": [1, 2]})
    assert err.field == "restart"
    assert "must be an object" in str(err)


def test_restart_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    err = _error(tmp_path, {"restart": {"base_delay": 1, "maxDelay": 3}})
    assert err.field == "restart.maxDelay"
    for known in ("base_delay", "max_delay", "jitter", "broken_after", "cooloff"):
        assert known in str(err)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("base_delay", -1, "must not be negative"),
        ("cooloff", -0.1, "must not be negative"),
        ("jitter", "0.1", "must be a float"),
        ("broken_after", 2.5, "must be a int"),
        ("broken_after", True, "must be a int"),
    ],
)
def test_restart_bad_values_name_the_nested_key(
    tmp_path: Path, key: str, value: Any, expected: str
) -> None:
    err = _error(tmp_path, {"restart": {key: value}})
    assert err.field == f"restart.{key}"
    assert f"restart.{key}" in str(err)
    assert expected in str(err)


def test_restart_document_replaces_only_the_keys_it_gives(tmp_path: Path) -> None:
    _write(tmp_path, {"restart": {"cooloff": 1.5}})
    policy = AgentSettings.load(tmp_path).restart
    assert policy == RestartPolicy(cooloff=1.5)


# -- layout and root -----------------------------------------------------------------
def test_layout_paths(tmp_path: Path) -> None:
    layout = AgentSettings.load(tmp_path).layout
    assert layout == Layout(tmp_path)
    assert layout.control_socket == tmp_path / "agent.sock"
    assert layout.recipes == tmp_path / "packages" / "recipes"
    assert layout.component_log("com.example.A") == tmp_path / "logs" / "com.example.A.log"


def test_default_root_honours_edgeloop_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGELOOP_ROOT", str(tmp_path / "hub"))
    assert default_root() == tmp_path / "hub"


def test_default_root_falls_back_to_xdg_data_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("EDGELOOP_ROOT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_root() == tmp_path / "edgeloop" / "hub"


@pytest.mark.parametrize(
    "doc",
    [{"log_backups": -1}, {"log_max_bytes": -1}, {"restart": {"broken_after": -1}}],
    ids=["log_backups", "log_max_bytes", "restart.broken_after"],
)
def test_negative_integer_settings_are_refused(tmp_path: Path, doc: dict[str, Any]) -> None:
    err = _error(tmp_path, doc)
    assert "must be at least" in str(err)
