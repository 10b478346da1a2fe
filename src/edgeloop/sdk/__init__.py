"""The public SDK for edgeloop's own components: the IPC client to the hub agent.

Components import only from here, never from the agent's internals (``edgeloop.edge``).
"""

from edgeloop.sdk.ipc import (
    ComponentNotFoundError,
    ConflictError,
    FailedUpdateConditionCheckError,
    InvalidArgumentsError,
    IpcClient,
    IpcConnectionError,
    IpcError,
    IpcTimeoutError,
    ResourceNotFoundError,
    ServiceError,
    Subscription,
    TopicMessage,
    UnauthorizedError,
)

__all__ = [
    "ComponentNotFoundError",
    "ConflictError",
    "FailedUpdateConditionCheckError",
    "InvalidArgumentsError",
    "IpcClient",
    "IpcConnectionError",
    "IpcError",
    "IpcTimeoutError",
    "ResourceNotFoundError",
    "ServiceError",
    "Subscription",
    "TopicMessage",
    "UnauthorizedError",
]
