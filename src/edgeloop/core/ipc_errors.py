"""The modelled errors of Greengrass IPC, shared by the hub's server and edgeloop's client.

    IpcError                          (an EdgeloopError) ``message``, extra ``fields``
    ├── ServiceError                  the runtime could not do it; retrying may help
    ├── UnauthorizedError             no accessControl policy allows the call
    ├── ResourceNotFoundError         fields resourceType / resourceName
    ├── InvalidArgumentsError         the request is malformed or out of range
    ├── ConflictError                 conflicts with the current state (stale version)
    ├── ComponentNotFoundError        the named component is not on the hub
    └── FailedUpdateConditionCheckError   an update lost to a newer one

Each class's ``model`` is its Greengrass model name without ``aws.greengrass#``: the
server sends it as the error's ``service-model-type``, the official SDK raises its class of
the same name, and our client maps it back with ``error_class``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from edgeloop.core.errors import EdgeloopError

PREFIX: Final = "aws.greengrass#"


class IpcError(EdgeloopError):
    """An IPC error; ``message`` says what, ``fields`` holds the shape's other members."""

    model: str = ""

    def __init__(self, message: str, fields: Mapping[str, Any] | None = None, **more: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, Any] = {**(fields or {}), **more}


class ServiceError(IpcError):
    """The runtime could not do what was asked (retrying may help)."""

    model = "ServiceError"


class UnauthorizedError(IpcError):
    """The component's accessControl policies do not allow the call."""

    model = "UnauthorizedError"


class ResourceNotFoundError(IpcError):
    """The named resource does not exist (``fields['resourceType'/'resourceName']``)."""

    model = "ResourceNotFoundError"


class InvalidArgumentsError(IpcError):
    """The request is malformed or its values are out of range."""

    model = "InvalidArgumentsError"


class ConflictError(IpcError):
    """The request conflicts with the current state (e.g. a stale shadow version)."""

    model = "ConflictError"


class ComponentNotFoundError(IpcError):
    """The named component is not on this hub."""

    model = "ComponentNotFoundError"


class FailedUpdateConditionCheckError(IpcError):
    """An update lost to a newer one (UpdateConfiguration's timestamp check)."""

    model = "FailedUpdateConditionCheckError"


MODELLED: Final[tuple[type[IpcError], ...]] = (
    ServiceError,
    UnauthorizedError,
    ResourceNotFoundError,
    InvalidArgumentsError,
    ConflictError,
    ComponentNotFoundError,
    FailedUpdateConditionCheckError,
)
_BY_MODEL: Final = {PREFIX + cls.model: cls for cls in MODELLED}


def error_class(model_type: str) -> type[IpcError] | None:
    """The class of a modelled error's full model name, or None when unknown."""
    return _BY_MODEL.get(model_type)
