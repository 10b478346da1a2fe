"""The hub's agent: one asyncio process that supervises components and applies deployments.

Run it with ``edgeloop device run`` (which execs ``python -m edgeloop.edge.agent`` so the
agent carries none of the CLI's imports: its resident memory is a benchmark target).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeloop import __version__
from edgeloop.core.config import parse_update_config_document
from edgeloop.core.errors import AgentError, ComponentError, EdgeloopError, ValidationError
from edgeloop.edge.artifacts import ArtifactStore
from edgeloop.edge.control import ControlClient, ControlServer, check_socket_path
from edgeloop.edge.deployments import DeploymentRequest, Deployments, specs_for
from edgeloop.edge.ipc import ops_config, ops_iotcore, ops_lifecycle, ops_pubsub, ops_shadow
from edgeloop.edge.ipc.authz import Authorizer
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.events import ComponentEvents
from edgeloop.edge.ipc.pubsub import PubSub
from edgeloop.edge.ipc.server import IpcServer
from edgeloop.edge.process import ProcessGroups
from edgeloop.edge.recipes import RecipeStore
from edgeloop.edge.settings import AgentSettings, Layout, provision_if_needed
from edgeloop.edge.shadows import LocalShadows
from edgeloop.edge.spool import Spool, time_sequence
from edgeloop.edge.store import HubStore
from edgeloop.edge.supervisor import Supervisor

if TYPE_CHECKING:
    from edgeloop.edge.bridge import Bridge
    from edgeloop.edge.cloud_link import CloudLink, ShadowSync
    from edgeloop.edge.exporter import Exporter
    from edgeloop.edge.fleet_jobs import FleetJobs
    from edgeloop.edge.hub_broker import HubBroker

log = logging.getLogger("edgeloop.agent")


class Agent:
    """Everything one hub runs, wired together."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        layout = settings.layout
        for folder in (layout.root, layout.logs, layout.packages, layout.work):
            folder.mkdir(parents=True, exist_ok=True)
        self.store = HubStore(layout.root)
        # Recovers torn tails; a new stream numbers from the time in µs, above any sequence
        # the cloud may hold from a spool this hub lost.
        self.spool = Spool(layout.root / "spool", settings.streams, first_sequence=time_sequence)
        self.recipes = RecipeStore(layout.recipes)
        self.artifacts = ArtifactStore(layout.packages)
        self.groups = ProcessGroups(self.store.state_dir / "process-groups.json")
        self.hub = self.store.load_hub()
        self.supervisor = Supervisor(
            settings, self.store, self.artifacts, self.groups, self._configuration_of
        )
        self.events = ComponentEvents()
        self.deployments = Deployments(
            settings,
            self.store,
            self.recipes,
            self.artifacts,
            self.supervisor,
            self.hub,
            self.events,
        )
        self.pubsub = PubSub()
        self.shadows = LocalShadows(self.store.state_dir / "shadows")
        self.cloud: CloudLink | None = None
        self.shadow_sync: ShadowSync | None = None
        self.fleet_jobs: FleetJobs | None = None
        self.exporter: Exporter | None = None
        if settings.cloud is not None:
            # Imported only here: a hub without a cloud does not load paho.
            from edgeloop.edge.cloud_link import CloudLink, ShadowSync
            from edgeloop.edge.fleet_jobs import FleetJobs

            self.cloud = CloudLink(settings.cloud, settings.thing_name)
            self.shadow_sync = ShadowSync(
                self.cloud,
                self.shadows,
                settings.thing_name,
                self.store.state_dir / "cloud-sync.json",
                interval=settings.cloud.sync_interval,
            )
            self.exporter = _exporter(self.spool, self.cloud, settings)
            self.fleet_jobs = FleetJobs(
                self.cloud,
                settings.thing_name,
                self.deployments,
                self.store,
                self.recipes,
                self.artifacts,
                self.hub,
                settings.cloud,
            )
        self.hub_broker: HubBroker | None = None
        self.bridge: Bridge | None = None
        self._make_broker_and_bridge()
        self.ipc = IpcServer(layout.ipc_socket, self._authenticate)
        self.ipc_authorizer = Authorizer(self._configuration_of, settings.thing_name)
        ipc_context = IpcContext(
            settings=settings,
            authorizer=self.ipc_authorizer,
            pubsub=self.pubsub,
            supervisor=self.supervisor,
            deployments=self.deployments,
            hub=self.hub,
            store=self.store,
            events=self.events,
            shadows=self.shadows,
        )
        self.ipc.register(
            *ops_pubsub.operations(ipc_context),
            *ops_config.operations(ipc_context),
            *ops_lifecycle.operations(ipc_context),
            *ops_shadow.operations(ipc_context),
            *ops_iotcore.operations(ipc_context, self.cloud),
        )
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self.control = ControlServer(
            layout.control_socket,
            {
                "status": self._op_status,
                "components": self._op_components,
                "deploy": self._op_deploy,
                "deployment": self._op_deployment,
                "deployments": self._op_deployments,
                "restart": self._op_restart,
                "stop": self._op_stop,
                "start": self._op_start,
                "shutdown": self._op_shutdown,
                "streams": self._op_streams,
            },
        )

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or a shutdown request, then stop every component."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        for line in self.groups.reap_leftovers():
            log.warning("ended a process left by a previous agent: %s", line)
        interrupted = self.deployments.recover_interrupted()
        if interrupted:
            log.warning("deployment %s was interrupted; back on the last good state", interrupted)
        await self.ipc.start()
        if self.cloud is not None and self.shadow_sync is not None:
            await self.shadow_sync.start()  # first: it hears the first connect
            if self.fleet_jobs is not None:
                await self.fleet_jobs.start()  # after recover_interrupted: it reads the records
            await self.cloud.start()
            if self.exporter is not None:
                await self.exporter.start()
        await self.control.start()
        self.settings.layout.pid_file.write_text(f"{os.getpid()}\n")
        try:
            # Before the components: those that use kits' readings find them flowing.
            if self.hub_broker is not None:
                await self.hub_broker.start()
            if self.bridge is not None:
                await self.bridge.start()
            await self.supervisor.apply(specs_for(self.hub, self.recipes))
            log.info(
                "edgeloop agent %s running for %s at %s with %d component(s)",
                __version__,
                self.settings.thing_name,
                self.settings.root,
                len(self.supervisor.runners),
            )
            async with asyncio.TaskGroup() as tasks:
                worker = tasks.create_task(self.deployments.run(), name="deployments")
                await self._stop.wait()
                worker.cancel()
        finally:
            log.info("stopping components")
            await self.supervisor.stop_all()
            if self.bridge is not None:
                await self.bridge.stop()  # acknowledges what it stored, then disconnects
            if self.hub_broker is not None:
                await self.hub_broker.stop()  # saves the kits' queued readings
            if self.cloud is not None and self.shadow_sync is not None:
                if self.fleet_jobs is not None:
                    await self.fleet_jobs.stop()
                await self.shadow_sync.stop()
                await self.cloud.stop()
            await self.ipc.close()
            await self.control.close()
            if self.exporter is not None:
                await self.exporter.stop()  # a batch in flight goes again at the next start
            await asyncio.to_thread(self.spool.close)  # after the components: they append
            self.settings.layout.pid_file.unlink(missing_ok=True)
            log.info("agent stopped")

    def _make_broker_and_bridge(self) -> None:
        """The kits' broker and the bridge, when agent.json has them (modules loaded only
        then: a hub without kits does not load paho for them)."""
        settings = self.settings
        if settings.broker is not None:
            from edgeloop.edge.bridge_config import stream_bytes
            from edgeloop.edge.hub_broker import HubBroker

            self.hub_broker = HubBroker(
                settings.broker,
                settings.layout.root / "broker",
                stream_bytes=stream_bytes(settings.bridge, settings.streams),
            )
        if settings.bridge is not None:
            from edgeloop.edge.bridge import Bridge

            self.bridge = Bridge(
                settings.bridge,
                spool=self.spool,
                pubsub=self.pubsub,
                cloud=self.cloud,
                broker=self.hub_broker,
                kit_prefix=settings.broker.kit_topic_prefix if settings.broker else None,
                state_dir=settings.layout.root / "broker",
            )

    def _builtin_statuses(self) -> list[dict[str, Any]]:
        """``device components`` rows of the built-in components the agent runs itself."""
        rows = []
        if self.hub_broker is not None:
            rows.append(self.hub_broker.component_status())
        if self.bridge is not None:
            rows.append(self.bridge.component_status())
        return [{**row, "root": False, "configuration": {}} for row in rows]

    def _configuration_of(self, name: str) -> dict[str, Any]:
        """A component's live configuration tree (read on every use: deployments replace it)."""
        tree: dict[str, Any] = self.hub.configuration.get(name, {})
        return tree

    def _authenticate(self, token: str) -> str | None:
        """The component an IPC auth token (its SVCUID) belongs to, or None."""
        for runner in self.supervisor.runners.values():
            if token and secrets.compare_digest(runner.svcuid, token):
                return runner.name
        return None

    # -- control operations -----------------------------------------------------------
    async def _op_status(self, _: dict[str, Any]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for runner in self.supervisor.runners.values():
            counts[runner.state.value] = counts.get(runner.state.value, 0) + 1
        return {
            "version": __version__,
            "pid": os.getpid(),
            "root": str(self.settings.root),
            "thingName": self.settings.thing_name,
            "startedAt": self.started_at,
            "deploymentId": self.hub.deployment_id,
            "roots": self.hub.roots,
            "components": counts,
            "ipc": {
                "connections": len(self.ipc.connections),
                "deniedCalls": self.ipc_authorizer.denied,
                **self.pubsub.stats(),
            },
            "cloud": self.cloud.status() if self.cloud is not None else None,
            "fleet": self.fleet_jobs.status() if self.fleet_jobs is not None else None,
            "broker": self.hub_broker.status() if self.hub_broker is not None else None,
            "bridge": self.bridge.status() if self.bridge is not None else None,
            "targets": {
                name: entry.get("deploymentId") for name, entry in sorted(self.hub.targets.items())
            },
        }

    async def _op_components(self, _: dict[str, Any]) -> list[dict[str, Any]]:
        statuses = self.supervisor.statuses()
        for status in statuses:
            status["root"] = status["name"] in self.hub.roots
            status["configuration"] = self.hub.configuration.get(status["name"], {})
        return sorted([*statuses, *self._builtin_statuses()], key=lambda s: str(s["name"]))

    async def _op_deploy(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.deployments.submit(request_from_json(req))

    async def _op_deployment(self, req: dict[str, Any]) -> dict[str, Any]:
        record = self.deployments.get(str(req.get("id")))
        if record is None:
            raise ValidationError(f"no deployment with id {req.get('id')!r}", field="id")
        return record

    async def _op_deployments(self, _: dict[str, Any]) -> list[dict[str, Any]]:
        return list(reversed(self.deployments.records))

    def _runner(self, req: dict[str, Any]) -> Any:
        name = req.get("name")
        runner = self.supervisor.runners.get(str(name))
        if runner is None:
            known = ", ".join(sorted(self.supervisor.runners)) or "none"
            raise ComponentError(f"no component {name!r} on this hub (components: {known})")
        return runner

    async def _op_restart(self, req: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(req)
        await runner.restart()
        for dependent in self.supervisor.dependents(runner.name, hard_only=True):
            await self.supervisor.runners[dependent].restart()
        return dict(runner.status())

    async def _op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(req)
        await runner.stop()
        return dict(runner.status())

    async def _op_start(self, req: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(req)
        runner.start()
        return dict(runner.status())

    async def _op_shutdown(self, _: dict[str, Any]) -> str:
        self._stop.set()
        return "stopping"

    async def _op_streams(self, _: dict[str, Any]) -> list[dict[str, Any]]:
        rows = [metrics.to_json() for metrics in self.spool.metrics()]
        if self.exporter is not None:
            for row in rows:
                row["export"] = self.exporter.status(row["name"])
        return rows


def _exporter(spool: Spool, cloud: CloudLink, settings: AgentSettings) -> Exporter:
    """The streams' exporters to the cloud: MQTT over the hub's link, HTTPS batches to
    ``cloud.api`` (without one, batch streams wait and say why)."""
    from edgeloop.edge.exporter import Exporter, HttpsTransport, MqttTransport

    conn = settings.cloud
    assert conn is not None
    https = None
    if conn.api is not None:
        https = HttpsTransport(
            conn.api, settings.thing_name, ca=conn.ca, cert=conn.cert, key=conn.key
        )
    return Exporter(
        spool, settings.export, settings.thing_name, mqtt=MqttTransport(cloud), https=https
    )


def request_from_json(req: dict[str, Any]) -> DeploymentRequest:
    """A deployment request from its control-channel form, validated field by field."""
    merge = req.get("merge") or {}
    if not isinstance(merge, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in merge.items()
    ):
        raise ValidationError("must map component names to versions", field="merge")
    remove = req.get("remove") or []
    if not isinstance(remove, list) or not all(isinstance(n, str) for n in remove):
        raise ValidationError("must be a list of component names", field="remove")
    update = req.get("updateConfig")
    updates = parse_update_config_document(update, source="--update-config") if update else {}
    paths: dict[str, Path | None] = {}
    for key in ("recipeDir", "artifactDir"):
        value = req.get(key)
        if value is not None:
            path = Path(value)
            if not path.is_dir():
                raise ValidationError(f"{value} is not a folder", field=key)
            paths[key] = path
        else:
            paths[key] = None
    if not merge and not remove and not updates:
        raise ValidationError("nothing to deploy: give --merge, --remove or --update-config")
    return DeploymentRequest(
        recipe_dir=paths["recipeDir"],
        artifact_dir=paths["artifactDir"],
        merge=merge,
        remove=tuple(remove),
        update_config=updates,
        failure_handling=str(req.get("failureHandling") or "ROLLBACK"),
        health_window=_optional_float(req, "healthWindow"),
        timeout=_optional_float(req, "timeout"),
        component_update_policy=str(req.get("componentUpdatePolicy") or "NOTIFY_COMPONENTS"),
        notify_timeout=_optional_float(req, "notifyTimeout") or 60.0,
        validation_timeout=_optional_float(req, "validationTimeout") or 30.0,
    )


def _optional_float(req: dict[str, Any], key: str) -> float | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValidationError("must be a non-negative number of seconds", field=key)
    return float(value)


def _configure_logging(settings: AgentSettings) -> None:
    settings.layout.logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.handlers.RotatingFileHandler(
        settings.layout.logs / "edgeloop.log",
        maxBytes=settings.log_max_bytes,
        backupCount=settings.log_backups,
    )
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root = logging.getLogger("edgeloop")
    root.setLevel(logging.INFO)
    root.handlers[:] = [file_handler, console]


def _refuse_second_agent(root: Path) -> None:
    if not Layout(root).control_socket.exists():
        return
    status = None
    with contextlib.suppress(AgentError), ControlClient(root, timeout=2.0) as client:
        status = client.call("status")  # a stale socket of a dead agent does not answer
    if status is not None:
        raise AgentError(f"an agent (pid {status.get('pid')}) already runs the hub at {root}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m edgeloop.edge.agent``."""
    parser = argparse.ArgumentParser(prog="edgeloop-agent", description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--thing-name")
    parser.add_argument("--health-window", type=float)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        check_socket_path(Layout(root).control_socket)
        _refuse_second_agent(root)
        _configure_logging(AgentSettings(root=root))  # so provisioning is logged too
        provision_if_needed(root)
        settings = AgentSettings.load(
            root, thing_name=args.thing_name, health_window=args.health_window
        )
        _configure_logging(settings)
        agent = Agent(settings)
        asyncio.run(agent.run())
    except EdgeloopError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _dump_tasks() -> None:
    """On SIGUSR1, print every asyncio task's stack to stderr, to diagnose a stuck hub."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Agent", "main", "request_from_json"]
