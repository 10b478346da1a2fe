"""The agent's settings and the folder layout of a hub.

Settings come from ``<root>/agent.json`` when it exists (every key optional), else the
defaults below; ``edgeloop device run`` flags override both. The layout is fixed so that
the CLI can find everything from ``--root`` alone.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgeloop.core.errors import ValidationError
from edgeloop.edge.lifecycle import RestartPolicy

NUCLEUS_VERSION = "2.14.0"
"""The Greengrass nucleus version edgeloop reports itself as, for recipes that ask."""

BUILTIN_COMPONENTS: dict[str, str] = {
    # Components the runtime provides itself: recipes that depend on them still deploy.
    "aws.greengrass.Nucleus": NUCLEUS_VERSION,
    "aws.greengrass.NucleusLite": NUCLEUS_VERSION,
    "aws.greengrass.TokenExchangeService": NUCLEUS_VERSION,
    "aws.greengrass.Cli": NUCLEUS_VERSION,
    "aws.greengrass.ipc.pubsub": NUCLEUS_VERSION,
}


def default_root() -> Path:
    """``$EDGELOOP_ROOT``, else a per-user folder."""
    env = os.environ.get("EDGELOOP_ROOT")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgeloop" / "hub"


@dataclass(frozen=True)
class Layout:
    """Where things live under a hub's root folder."""

    root: Path

    @property
    def control_socket(self) -> Path:
        """The agent's control socket, which the CLI talks to."""
        return self.root / "agent.sock"

    @property
    def ipc_socket(self) -> Path:
        """The Greengrass IPC socket advertised to components."""
        return self.root / "ipc.socket"

    @property
    def logs(self) -> Path:
        """Per-component logs and the agent's own."""
        return self.root / "logs"

    @property
    def packages(self) -> Path:
        """Recipes and artifacts of every component version the hub has."""
        return self.root / "packages"

    @property
    def recipes(self) -> Path:
        """One normalised recipe file per component version."""
        return self.packages / "recipes"

    @property
    def work(self) -> Path:
        """Each component's working folder, ``{work:path}``."""
        return self.root / "work"

    @property
    def pid_file(self) -> Path:
        """The running agent's pid."""
        return self.root / "agent.pid"

    def component_log(self, name: str) -> Path:
        """The log file of one component."""
        return self.logs / f"{name}.log"


@dataclass(frozen=True)
class AgentSettings:
    """Tunables of one hub's agent."""

    root: Path
    thing_name: str = field(default_factory=socket.gethostname)
    region: str = "us-east-1"
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace: float = 5.0  # seconds between SIGTERM and SIGKILL
    health_window: float = 1.0  # default for deployments that do not say
    deployment_timeout: float = 300.0
    log_max_bytes: int = 1024 * 1024
    log_backups: int = 3

    @property
    def layout(self) -> Layout:
        """The folder layout under ``root``."""
        return Layout(self.root)

    @classmethod
    def load(cls, root: Path, **overrides: Any) -> AgentSettings:
        """Defaults, then ``<root>/agent.json``, then ``overrides`` (None means unset)."""
        settings = cls(root=root)
        path = root / "agent.json"
        if path.exists():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise ValidationError(f"not valid JSON ({err})", source=str(path)) from err
            settings = settings.with_document(doc, source=str(path))
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **given) if given else settings

    def with_document(self, doc: Any, *, source: str) -> AgentSettings:
        """These settings updated from a JSON document, validated key by key."""
        if not isinstance(doc, dict):
            raise ValidationError("must be a JSON object", source=source)
        known = {f.name: f for f in fields(self) if f.name != "root"}
        changes: dict[str, Any] = {}
        for key, value in doc.items():
            if key == "restart":
                changes["restart"] = _restart_policy(value, source)
            elif key in known:
                changes[key] = _typed(key, value, type(getattr(self, key)), source)
            else:
                raise ValidationError(
                    f"unknown setting; known: {', '.join(sorted(known))}", source=source, field=key
                )
        return replace(self, **changes)


_MIN_INT = {"log_max_bytes": 4096, "restart.broken_after": 1}


def _typed(key: str, value: Any, kind: type, source: str) -> Any:
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValidationError("must not be negative", source=source, field=key)
        return float(value)
    if isinstance(value, kind) and not isinstance(value, bool):
        if isinstance(value, int) and value < _MIN_INT.get(key, 0):
            raise ValidationError(
                f"must be at least {_MIN_INT.get(key, 0)}", source=source, field=key
            )
        return value
    raise ValidationError(f"must be a {kind.__name__}", source=source, field=key)


def _restart_policy(value: Any, source: str) -> RestartPolicy:
    if not isinstance(value, dict):
        raise ValidationError("must be an object", source=source, field="restart")
    policy = RestartPolicy()
    known = {f.name: f for f in fields(policy)}
    changes: dict[str, Any] = {}
    for key, item in value.items():
        if key not in known:
            raise ValidationError(
                f"unknown key; known: {', '.join(sorted(known))}",
                source=source,
                field=f"restart.{key}",
            )
        changes[key] = _typed(f"restart.{key}", item, type(getattr(policy, key)), source)
    return replace(policy, **changes)
