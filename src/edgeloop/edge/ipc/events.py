"""Component-facing events of the runtime: configuration changes, configuration validation
and component updates, with the subscriptions that receive them.

A deployment calls in here: before it changes a component's configuration it asks that
component to validate the new tree (when it subscribed), before it stops components to
update them it tells them and honours deferrals, and after it applies configuration it
tells subscribers which key paths changed. Each wait has a timeout: a component that does
not answer cannot hold a deployment forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeloop.edge.ipc.server import Stream

log = logging.getLogger("edgeloop.ipc.events")


@dataclass(eq=False)
class ConfigSubscription:
    """A SubscribeToConfigurationUpdate stream."""

    stream: Stream
    component: str  # whose configuration is watched
    key_path: tuple[str, ...]


@dataclass
class ValidityReport:
    """A SendConfigurationValidityReport answer."""

    accepted: bool
    message: str


@dataclass
class _PendingValidation:
    components: set[str]
    reports: dict[str, ValidityReport] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _PendingUpdate:
    deferrals: dict[str, tuple[float, str]] = field(default_factory=dict)  # until, message


def changed_paths(old: Any, new: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The smallest key paths where two configuration trees differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        paths: list[tuple[str, ...]] = []
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                paths.append((*prefix, key))
            else:
                paths.extend(changed_paths(old[key], new[key], (*prefix, key)))
        return paths
    return [] if old == new else [prefix]


def _overlaps(a: Sequence[str], b: Sequence[str]) -> bool:
    shorter = min(len(a), len(b))
    return tuple(a[:shorter]) == tuple(b[:shorter])


class ComponentEvents:
    """Subscriptions to runtime events, and the waits deployments make on them."""

    def __init__(self) -> None:
        self.config_subscriptions: list[ConfigSubscription] = []
        self.validators: dict[str, list[Stream]] = {}  # component -> streams
        self.update_listeners: dict[str, list[Stream]] = {}  # component -> streams
        self._validations: dict[str, _PendingValidation] = {}
        self._updates: dict[str, _PendingUpdate] = {}

    # -- subscriptions ----------------------------------------------------------------
    def watch_configuration(self, sub: ConfigSubscription) -> None:
        """Add a SubscribeToConfigurationUpdate stream."""
        self.config_subscriptions.append(sub)
        sub.stream.on_close(lambda: self._drop_config(sub))

    def _drop_config(self, sub: ConfigSubscription) -> None:
        if sub in self.config_subscriptions:
            self.config_subscriptions.remove(sub)

    def add_validator(self, stream: Stream) -> None:
        """Add a SubscribeToValidateConfigurationUpdates stream."""
        self._add(self.validators, stream)

    def add_update_listener(self, stream: Stream) -> None:
        """Add a SubscribeToComponentUpdates stream."""
        self._add(self.update_listeners, stream)

    @staticmethod
    def _add(registry: dict[str, list[Stream]], stream: Stream) -> None:
        registry.setdefault(stream.component, []).append(stream)

        def drop() -> None:
            streams = registry.get(stream.component, [])
            if stream in streams:
                streams.remove(stream)

        stream.on_close(drop)

    # -- configuration changes --------------------------------------------------------
    async def configuration_changed(self, component: str, old: Any, new: Any) -> None:
        """Tell subscribers which key paths of ``component``'s configuration changed."""
        paths = changed_paths(old, new)
        if not paths:
            return
        for sub in list(self.config_subscriptions):
            if sub.component != component:
                continue
            for path in paths:
                if _overlaps(path, sub.key_path):
                    event = {"componentName": component, "keyPath": list(path)}
                    try:
                        await sub.stream.send_event(
                            "ConfigurationUpdateEvents", {"configurationUpdateEvent": event}
                        )
                    except (ConnectionError, OSError):
                        break

    # -- validation -------------------------------------------------------------------
    async def validate(
        self, deployment_id: str, proposed: Mapping[str, Any], timeout: float
    ) -> dict[str, ValidityReport]:
        """Ask each subscribed component to validate its proposed configuration.

        Returns the reports received within ``timeout``; a component that does not answer
        in time is taken to accept, as Greengrass does, and is logged.
        """
        asked = {c for c in proposed if self.validators.get(c)}
        if not asked:
            return {}
        pending = _PendingValidation(set(asked))
        self._validations[deployment_id] = pending
        try:
            for component in asked:
                for stream in list(self.validators.get(component, [])):
                    event = {"configuration": proposed[component], "deploymentId": deployment_id}
                    try:
                        await stream.send_event(
                            "ValidateConfigurationUpdateEvents",
                            {"validateConfigurationUpdateEvent": event},
                        )
                    except (ConnectionError, OSError):
                        continue
            try:
                async with asyncio.timeout(timeout):
                    await pending.done.wait()
            except TimeoutError:
                silent = sorted(asked - set(pending.reports))
                log.warning(
                    "deployment %s: no validity report from %s within %g s; proceeding",
                    deployment_id,
                    ", ".join(silent),
                    timeout,
                )
            return dict(pending.reports)
        finally:
            self._validations.pop(deployment_id, None)

    def report_validity(self, component: str, deployment_id: str, report: ValidityReport) -> bool:
        """Record a component's answer; False when no deployment waits for it."""
        pending = self._validations.get(deployment_id)
        if pending is None or component not in pending.components:
            return False
        pending.reports[component] = report
        if set(pending.reports) >= pending.components:
            pending.done.set()
        return True

    # -- component updates ------------------------------------------------------------
    async def before_update(
        self, deployment_id: str, components: Sequence[str], timeout: float
    ) -> list[str]:
        """Tell subscribed components an update is coming and honour their deferrals.

        Waits while any component defers, re-asking after each deferral's recheck time,
        up to ``timeout`` in all. Returns what was said (for the deployment's record).
        """
        listeners = {c: list(self.update_listeners.get(c, [])) for c in components}
        listeners = {c: s for c, s in listeners.items() if s}
        if not listeners:
            return []
        pending = _PendingUpdate()
        self._updates[deployment_id] = pending
        notes: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                pending.deferrals.clear()
                await self._send_update_event(
                    listeners,
                    {"preUpdateEvent": {"deploymentId": deployment_id, "isGgcRestarting": False}},
                )
                # Give components a moment to answer before deciding nobody defers.
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                if not pending.deferrals:
                    return notes
                until = max(u for u, _ in pending.deferrals.values())
                for component, (_, message) in pending.deferrals.items():
                    notes.append(f"{component} deferred the update: {message or 'no reason given'}")
                if until >= deadline:
                    notes.append(f"deferrals exceeded the {timeout:g} s limit; updating anyway")
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                    return notes
                await asyncio.sleep(max(0.0, until - time.monotonic()))
        finally:
            self._updates.pop(deployment_id, None)

    async def after_update(self, deployment_id: str, components: Sequence[str]) -> None:
        """Tell subscribed components the update is done."""
        listeners = {c: list(self.update_listeners.get(c, [])) for c in components}
        await self._send_update_event(
            listeners, {"postUpdateEvent": {"deploymentId": deployment_id}}
        )

    async def _send_update_event(
        self, listeners: Mapping[str, list[Stream]], event: dict[str, Any]
    ) -> None:
        for streams in listeners.values():
            for stream in streams:
                try:
                    await stream.send_event("ComponentUpdatePolicyEvents", event)
                except (ConnectionError, OSError):
                    continue

    def defer(self, component: str, deployment_id: str, recheck_ms: int, message: str) -> bool:
        """Record a DeferComponentUpdate; False when no such update is pending."""
        pending = self._updates.get(deployment_id)
        if pending is None:
            return False
        if recheck_ms > 0:
            pending.deferrals[component] = (time.monotonic() + recheck_ms / 1000, message)
        else:
            pending.deferrals.pop(component, None)
        return True
