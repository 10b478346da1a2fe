"""Fixtures for hub tests: a real agent process on a temporary hub folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeloop.edge.control import ControlClient, wait_for_agent

FAST_RESTARTS = {
    "base_delay": 0.05,
    "max_delay": 0.4,
    "jitter": 0.2,
    "broken_after": 3,
    "broken_window": 30.0,
    "cooloff": 1.5,
}


class Hub:
    """A hub folder with a real agent process, and helpers to deploy to it."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = root
        self.recipes = root.parent / "recipes"
        self.artifacts = root.parent / "artifacts"
        self.recipes.mkdir(exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)
        root.mkdir(exist_ok=True)
        (root / "agent.json").write_text(json.dumps(settings))
        self.proc: subprocess.Popen[bytes] | None = None

    # -- the agent process ------------------------------------------------------------
    def start(self, *, wait: bool = True) -> None:
        """Start the agent and wait until it answers."""
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeloop.edge.agent",
                "--root",
                str(self.root),
                "--thing-name",
                "test-hub",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "agent.stderr", "ab"),  # noqa: SIM115
        )
        if wait:
            wait_for_agent(self.root, self.proc)

    def kill9(self) -> None:
        """Kill the agent the hard way."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Stop the agent gracefully."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def call(self, op: str, **args: Any) -> Any:
        """One control request."""
        with ControlClient(self.root, timeout=30) as client:
            return client.call(op, **args)

    # -- components -------------------------------------------------------------------
    def component(
        self,
        name: str,
        version: str = "1.0.0",
        *,
        lifecycle: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        deps: dict[str, Any] | None = None,
        artifacts: dict[str, bytes] | None = None,
    ) -> None:
        """Write a recipe (and artifacts) for one component version."""
        manifest: dict[str, Any] = {"Platform": {"os": "linux"}, "Lifecycle": lifecycle or {}}
        if artifacts:
            folder = self.artifacts / name / version
            folder.mkdir(parents=True, exist_ok=True)
            for file, data in artifacts.items():
                (folder / file).write_bytes(data)
            manifest["Artifacts"] = [
                {"URI": f"s3://bucket/{name}/{version}/{file}"} for file in artifacts
            ]
        recipe: dict[str, Any] = {
            "RecipeFormatVersion": "2020-01-25",
            "ComponentName": name,
            "ComponentVersion": version,
            "Manifests": [manifest],
        }
        if config is not None:
            recipe["ComponentConfiguration"] = {"DefaultConfiguration": config}
        if deps:
            recipe["ComponentDependencies"] = deps
        (self.recipes / f"{name}-{version}.json").write_text(json.dumps(recipe))

    def deploy(self, *, wait: bool = True, **request: Any) -> dict[str, Any]:
        """Submit a deployment with the hub's recipe and artifact folders; wait for it."""
        request.setdefault("recipeDir", str(self.recipes))
        request.setdefault("artifactDir", str(self.artifacts))
        record = self.call("deploy", **request)
        if not wait:
            return dict(record)
        return self.wait_deployment(record["deploymentId"])

    def wait_deployment(self, deployment_id: str, timeout: float = 60) -> dict[str, Any]:
        """Poll a deployment until it ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.call("deployment", id=deployment_id)
            if record["status"] in ("SUCCEEDED", "FAILED", "CANCELED"):
                return dict(record)
            time.sleep(0.05)
        raise AssertionError(f"deployment {deployment_id} did not end within {timeout} s")

    def components(self) -> dict[str, dict[str, Any]]:
        """Component statuses by name."""
        return {c["name"]: c for c in self.call("components")}

    def wait_for(
        self, predicate: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 20
    ) -> dict[str, dict[str, Any]]:
        """Poll component statuses until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        last: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            last = self.components()
            if predicate(last):
                return last
            time.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout} s; components: {last}")

    def log(self, name: str) -> str:
        """A component's log text."""
        path = self.root / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """Make hubs with fast restart settings; every agent is stopped afterwards."""
    hubs: list[Hub] = []

    def make(name: str = "hub", **settings: Any) -> Hub:
        merged: dict[str, Any] = {
            "restart": dict(FAST_RESTARTS),
            "stop_grace": 2.0,
            "health_window": 0.5,
        }
        merged.update(settings)
        hub = Hub(tmp_path / name, merged)
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.stop()


@pytest.fixture
def hub(hub_factory: Callable[..., Hub]) -> Hub:
    """A started hub."""
    h = hub_factory()
    h.start()
    return h


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
