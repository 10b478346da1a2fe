"""The hub's persistent state: what it runs, with which configuration, and its history.

Everything that must survive ``kill -9`` of the agent is written with
``write_json_atomic`` (temp file, fsync, rename, fsync of the folder), so a reader finds
either the old document or the new one, never a torn one. The components, their versions
and their configuration trees live in ONE document, ``state/hub.json``, so a rollback or a
crash can never pair versions with another deployment's configuration. The same document
keeps, per *target* (a thing group, the thing itself, or ``LOCAL_DEPLOYMENT`` for
``edgeloop device deploy``), the latest deployment of that target the hub applied: the
roots are their union, so what explains the roots is saved with them, in the same write.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.fileio import write_bytes_atomic

LOCAL_TARGET = "LOCAL_DEPLOYMENT"
"""The target of deployments made on the hub itself (Greengrass's name for it)."""


def write_json_atomic(path: Path, data: Any, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically; durably when ``fsync``."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode=0o600, fsync=fsync)


def read_json(path: Path, default: Any) -> Any:
    """The JSON document at ``path``, or ``default`` when there is none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


@dataclass
class HubState:
    """What the hub runs: root components, resolved versions and configuration trees."""

    deployment_id: str | None = None
    roots: dict[str, str] = field(default_factory=dict)  # name -> version
    versions: dict[str, str] = field(default_factory=dict)  # every component, resolved
    configuration: dict[str, Any] = field(default_factory=dict)  # name -> tree
    updated_at: float = 0.0
    # target -> {"deploymentId", "components": {name: version}, and for fleet targets
    # "jobId" and "document" (the job document)}: the latest deployment of each target.
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The document persisted in ``state/hub.json``."""
        return {
            "deploymentId": self.deployment_id,
            "roots": self.roots,
            "versions": self.versions,
            "configuration": self.configuration,
            "updatedAt": self.updated_at,
            "targets": self.targets,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> HubState:
        """Read the persisted document back."""
        return cls(
            deployment_id=doc.get("deploymentId"),
            roots=dict(doc.get("roots", {})),
            versions=dict(doc.get("versions", {})),
            configuration=dict(doc.get("configuration", {})),
            updated_at=float(doc.get("updatedAt", 0.0)),
            targets={str(k): dict(v) for k, v in (doc.get("targets") or {}).items()},
        )

    def target_roots(self) -> dict[str, dict[str, Any]]:
        """``targets``, with any root no target names counted as deployed locally.

        A hub whose state predates targets (or whose roots were set without one) keeps
        every root as its own: a fleet deployment never removes what it did not put there.
        """
        targets = {name: dict(entry) for name, entry in self.targets.items()}
        named = {c for entry in targets.values() for c in entry.get("components", {})}
        orphans = {n: v for n, v in self.roots.items() if n not in named}
        if orphans:
            local = targets.setdefault(
                LOCAL_TARGET, {"deploymentId": self.deployment_id, "components": {}}
            )
            local["components"] = {**local.get("components", {}), **orphans}
        return targets

    def copy(self) -> HubState:
        """A deep copy, for snapshots taken before a deployment changes anything."""
        return HubState.from_json(json.loads(json.dumps(self.to_json())))


class HubStore:
    """The files under ``<root>/state``."""

    HISTORY_LIMIT = 200

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.installed_dir = self.state_dir / "installed"
        self.installed_dir.mkdir(exist_ok=True)

    @property
    def hub_path(self) -> Path:
        """The document of the last successful deployment."""
        return self.state_dir / "hub.json"

    def load_hub(self) -> HubState:
        """The last state saved, or an empty hub."""
        return HubState.from_json(read_json(self.hub_path, {}))

    def save_hub(self, state: HubState) -> None:
        """Persist ``state`` atomically and durably."""
        state.updated_at = time.time()
        write_json_atomic(self.hub_path, state.to_json())

    # -- install markers: Install runs once per component version --------------------
    def _marker(self, name: str, version: str, step: str) -> Path:
        return self.installed_dir / f"{name}@{version}.{step}"

    def step_done(self, name: str, version: str, step: str) -> bool:
        """True when ``step`` (install, bootstrap) already succeeded for this version."""
        return self._marker(name, version, step).exists()

    def mark_step_done(self, name: str, version: str, step: str) -> None:
        """Remember that ``step`` succeeded for this version."""
        self._marker(name, version, step).touch()

    def forget_version(self, name: str, version: str) -> None:
        """Drop the markers of a removed component version."""
        for step in ("install", "bootstrap"):
            with contextlib.suppress(FileNotFoundError):
                self._marker(name, version, step).unlink()

    # -- deployments ------------------------------------------------------------------
    @property
    def deployments_path(self) -> Path:
        """The deployment history, newest last."""
        return self.state_dir / "deployments.json"

    def load_deployments(self) -> list[dict[str, Any]]:
        """Every deployment this hub remembers."""
        docs = read_json(self.deployments_path, [])
        return list(docs)

    def save_deployments(self, docs: list[dict[str, Any]]) -> None:
        """Persist the history, keeping the newest ``HISTORY_LIMIT``."""
        write_json_atomic(self.deployments_path, docs[-self.HISTORY_LIMIT :])

    @property
    def fleet_jobs_path(self) -> Path:
        """The fleet job the hub works on and the outcomes of the last ones (fleet_jobs.py)."""
        return self.state_dir / "fleet-jobs.json"

    @property
    def inflight_path(self) -> Path:
        """Present while a deployment is being applied: a crash then means it failed."""
        return self.state_dir / "inflight.json"
