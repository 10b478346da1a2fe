"""Component configuration over IPC: get, update (own only), watch, and validate."""

from __future__ import annotations

import copy
import time
from typing import Any

from edgeloop.core.config import deep_merge
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.events import ConfigSubscription, ValidityReport
from edgeloop.edge.ipc.server import (
    FailedUpdateConditionCheckError,
    InvalidArgumentsError,
    Operation,
    ResourceNotFoundError,
    Stream,
)


def _key_path(body: dict[str, Any], field: str = "keyPath") -> tuple[str, ...]:
    path = body.get(field) or []
    if not isinstance(path, list) or not all(isinstance(k, str) for k in path):
        raise InvalidArgumentsError(f"{field} must be a list of strings")
    return tuple(path)


def _lookup(tree: Any, path: tuple[str, ...], component: str) -> Any:
    node = tree
    for depth, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            where = "/".join(path[: depth + 1])
            raise ResourceNotFoundError(
                f"{component} has no configuration key {where!r}",
                resourceType="Configuration",
                resourceName=where,
            )
        node = node[key]
    return node


def operations(ctx: IpcContext) -> list[Operation]:
    """The configuration operations."""
    stamps: dict[tuple[str, tuple[str, ...]], float] = {}

    def component_of(stream: Stream, body: dict[str, Any]) -> str:
        name = body.get("componentName") or stream.component
        if not isinstance(name, str):
            raise InvalidArgumentsError("componentName must be a string")
        if name not in ctx.hub.configuration and name not in ctx.supervisor.runners:
            raise ResourceNotFoundError(
                f"no component {name!r} on this hub",
                resourceType="Component",
                resourceName=name,
            )
        return name

    async def get_configuration(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        name = component_of(stream, body)
        path = _key_path(body)
        node = _lookup(ctx.hub.configuration.get(name, {}), path, name)
        # Greengrass answers with an object: a leaf comes wrapped under its own key.
        value = node if isinstance(node, dict) or not path else {path[-1]: node}
        return {"componentName": name, "value": copy.deepcopy(value)}

    async def update_configuration(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        name = stream.component
        path = _key_path(body)
        value = body.get("valueToMerge")
        if not isinstance(value, dict):
            raise InvalidArgumentsError("valueToMerge must be a JSON object")
        stamp = body.get("timestamp", time.time())
        if not isinstance(stamp, int | float) or isinstance(stamp, bool):
            raise InvalidArgumentsError("timestamp must be a number of seconds since the epoch")
        key = (name, path)
        if stamp < stamps.get(key, float("-inf")):
            raise FailedUpdateConditionCheckError(
                f"a newer update of {'/'.join(path) or 'the root'} of {name}'s configuration "
                "already happened; re-read it and retry"
            )
        old = ctx.hub.configuration.get(name, {})
        new = copy.deepcopy(old)
        node = new
        for part in path:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        merged = deep_merge(node, value)
        node.clear()
        node.update(merged)
        stamps[key] = float(stamp)
        ctx.hub.configuration[name] = new
        if not ctx.store.inflight_path.exists():
            # During a deployment the live state is not yet the hub's persisted state:
            # the deployment persists it (with this change) when it succeeds.
            ctx.store.save_hub(ctx.hub)
        await ctx.events.configuration_changed(name, old, new)
        return {}

    async def subscribe_to_configuration_update(
        stream: Stream, body: dict[str, Any]
    ) -> dict[str, Any]:
        name = component_of(stream, body)
        sub = ConfigSubscription(stream, name, _key_path(body))
        stream.after_response(lambda: ctx.events.watch_configuration(sub))
        return {}

    async def subscribe_to_validate(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        stream.after_response(lambda: ctx.events.add_validator(stream))
        return {}

    async def send_validity_report(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        report = body.get("configurationValidityReport")
        if not isinstance(report, dict):
            raise InvalidArgumentsError("configurationValidityReport is required")
        status = report.get("status")
        if status not in ("ACCEPTED", "REJECTED"):
            raise InvalidArgumentsError(
                "configurationValidityReport.status must be ACCEPTED or REJECTED"
            )
        deployment_id = str(report.get("deploymentId") or "")
        accepted = ctx.events.report_validity(
            stream.component,
            deployment_id,
            ValidityReport(status == "ACCEPTED", str(report.get("message") or "")),
        )
        if not accepted:
            raise InvalidArgumentsError(
                f"no configuration validation of deployment {deployment_id!r} is waiting for "
                f"{stream.component} (it timed out, or was never asked)"
            )
        return {}

    return [
        Operation("GetConfiguration", get_configuration, inline=True),
        Operation("UpdateConfiguration", update_configuration),
        Operation(
            "SubscribeToConfigurationUpdate", subscribe_to_configuration_update, streaming=True
        ),
        Operation("SubscribeToValidateConfigurationUpdates", subscribe_to_validate, streaming=True),
        Operation("SendConfigurationValidityReport", send_validity_report, inline=True),
    ]
