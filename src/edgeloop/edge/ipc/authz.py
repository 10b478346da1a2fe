"""IPC authorization: each component's ``accessControl`` configuration, as Greengrass reads it.

A component's configuration may hold::

    accessControl:
      aws.greengrass.ipc.pubsub:               # the IPC service
        com.example.Sensor:pubsub:1:           # a policy id, any text
          policyDescription: ...
          operations: [aws.greengrass#PublishToTopic]   # or "*"
          resources: [sensors/+/temperature, "*"]

A call is allowed when one policy of the operation's service lists the operation (or
``*``) and a resource that matches the one asked for. Policies are read from the live
configuration, so they change with deployments. Operations on the component itself
(its configuration, its state, its update deferrals) need no policy, as in Greengrass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from edgeloop.core.topics import resource_matches
from edgeloop.edge.ipc.server import UnauthorizedError

log = logging.getLogger("edgeloop.ipc.authz")

PUBSUB = "aws.greengrass.ipc.pubsub"
MQTT_PROXY = "aws.greengrass.ipc.mqttproxy"
SHADOW = "aws.greengrass.ShadowManager"
LIFECYCLE = "aws.greengrass.ipc.lifecycle"
CLI = "aws.greengrass.Cli"

CACHE_LIMIT = 10_000
# The services whose resources are MQTT topic filters, matched with MQTT wildcards too.
_MQTT_SERVICES = frozenset({MQTT_PROXY})


class Authorizer:
    """Decides IPC calls from the callers' accessControl configuration."""

    def __init__(self, configuration: Callable[[str], Mapping[str, Any]], thing_name: str) -> None:
        self._configuration = configuration
        self._thing_name = thing_name
        self.denied = 0
        self._cache: dict[tuple[str, str, str, str], tuple[Mapping[str, Any], bool]] = {}

    def check(self, component: str, service: str, operation: str, resource: str) -> None:
        """Raise UnauthorizedError unless ``component`` may call ``operation`` on ``resource``."""
        if self.allows(component, service, operation, resource):
            return
        self.denied += 1
        log.warning(
            "IPC denied: %s may not call %s on %r (no %s policy allows it)",
            component,
            operation,
            resource,
            service,
        )
        raise UnauthorizedError(
            f"{component} is not authorized to perform aws.greengrass#{operation} on "
            f"{resource!r}: add a policy under accessControl.{service} in its configuration"
        )

    def allows(self, component: str, service: str, operation: str, resource: str) -> bool:
        """True when one of the component's policies for ``service`` allows the call."""
        tree = self._configuration(component)
        # Decisions are cached per configuration tree: a deployment or an
        # UpdateConfiguration replaces the tree object, which invalidates them.
        key = (component, service, operation, resource)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is tree:
            return cached[1]
        allowed = self._decide(tree, service, operation, resource)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (tree, allowed)
        return allowed

    def _decide(self, tree: Mapping[str, Any], service: str, operation: str, resource: str) -> bool:
        access = _get_ci(tree, "accessControl")
        policies = _get_ci(access, service) if isinstance(access, Mapping) else None
        if not isinstance(policies, Mapping):
            return False
        wanted = f"aws.greengrass#{operation}"
        mqtt = service in _MQTT_SERVICES
        for policy in policies.values():
            if not isinstance(policy, Mapping):
                continue
            operations = _strings(_get_ci(policy, "operations"))
            if "*" not in operations and wanted not in operations:
                continue
            for pattern in _strings(_get_ci(policy, "resources")):
                if resource_matches(
                    pattern, resource, mqtt_wildcards=mqtt, thing_name=self._thing_name
                ):
                    return True
        return False


def _get_ci(tree: Any, key: str) -> Any:
    # Greengrass matches configuration keys of the accessControl block without case.
    if not isinstance(tree, Mapping):
        return None
    if key in tree:
        return tree[key]
    lowered = key.lower()
    for name, value in tree.items():
        if isinstance(name, str) and name.lower() == lowered:
            return value
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []
