"""What IPC operations reach of the agent: one object handed to every operation module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeloop.edge.deployments import Deployments
    from edgeloop.edge.ipc.authz import Authorizer
    from edgeloop.edge.ipc.events import ComponentEvents
    from edgeloop.edge.ipc.pubsub import PubSub
    from edgeloop.edge.settings import AgentSettings
    from edgeloop.edge.shadows import LocalShadows
    from edgeloop.edge.store import HubState, HubStore
    from edgeloop.edge.supervisor import Supervisor


@dataclass
class IpcContext:
    """The agent's parts that IPC operations use."""

    settings: AgentSettings
    authorizer: Authorizer
    pubsub: PubSub
    supervisor: Supervisor
    deployments: Deployments
    hub: HubState
    store: HubStore
    events: ComponentEvents
    shadows: LocalShadows
