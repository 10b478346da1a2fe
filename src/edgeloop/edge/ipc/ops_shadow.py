"""GetThingShadow, UpdateThingShadow, DeleteThingShadow, ListNamedShadowsForThing.

The local shadow service, as Greengrass's ShadowManager serves it over IPC
(aws-greengrass-shadow-manager, ``ipc/*RequestHandler.java``): names are validated
first, then the call is authorized under ``aws.greengrass.ShadowManager`` on the shadow's
topic prefix (``$aws/things/<thing>/shadow`` or ``.../shadow/name/<name>``; listing uses
the classic prefix), then the store does the work. Payloads are the AWS shadow JSON
documents, base64 on the wire; a delete answers with an empty payload, as ShadowManager
does (after AWS's REST DeleteThingShadow). A missing shadow is a ResourceNotFoundError of
resourceType ``shadow``, ShadowManager's ``SHADOW_RESOURCE_TYPE``.
"""

from __future__ import annotations

import base64
import json
from typing import Any, NoReturn

from edgeloop.core.errors import ShadowError
from edgeloop.core.shadow import parse_payload
from edgeloop.edge.ipc import args
from edgeloop.edge.ipc.authz import SHADOW
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.server import (
    ConflictError,
    InvalidArgumentsError,
    Operation,
    ResourceNotFoundError,
    ServiceError,
    Stream,
)
from edgeloop.edge.shadows import validate_shadow_name, validate_thing_name

DEFAULT_PAGE_SIZE = 25
RESOURCE_TYPE = "shadow"


def shadow_resource(thing: str, name: str) -> str:
    """The authorization resource (and MQTT topic prefix) of one shadow."""
    if name:
        return f"$aws/things/{thing}/shadow/name/{name}"
    return f"$aws/things/{thing}/shadow"


def describe(thing: str, name: str) -> str:
    """How messages name a shadow."""
    return (
        f"shadow {name!r} of thing {thing!r}" if name else f"the classic shadow of thing {thing!r}"
    )


def _b64(document: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


def _names(body: dict[str, Any], *, named: bool = True) -> tuple[str, str]:
    thing = body.get("thingName")
    if not isinstance(thing, str) or not thing:
        raise InvalidArgumentsError("thingName is required and must be a non-empty string")
    name = body.get("shadowName") if named else None
    if name is None:
        name = ""
    if not isinstance(name, str):
        raise InvalidArgumentsError("shadowName must be a string (omit it for the classic shadow)")
    try:
        validate_thing_name(thing)
        validate_shadow_name(name)
    except ShadowError as err:
        raise InvalidArgumentsError(err.message) from err
    return thing, name


def _translate(err: ShadowError, operation: str, thing: str, name: str) -> NoReturn:
    """Raise the IPC error ShadowManager sends for a shadow service error."""
    what = describe(thing, name)
    if err.code == 404:
        raise ResourceNotFoundError(
            f"No shadow found: {what} does not exist",
            resourceType=RESOURCE_TYPE,
            resourceName=shadow_resource(thing, name),
        ) from err
    message = f"{operation} on {what} was rejected: {err.message} (code {err.code})"
    if err.code == 409:
        raise ConflictError(message) from err
    if err.code in (400, 413, 415):
        raise InvalidArgumentsError(message) from err
    raise ServiceError(message) from err


def operations(ctx: IpcContext) -> list[Operation]:
    """The local shadow operations."""

    def authorize(stream: Stream, operation: str, thing: str, name: str) -> None:
        ctx.authorizer.check(stream.component, SHADOW, operation, shadow_resource(thing, name))

    async def get(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        thing, name = _names(body)
        authorize(stream, "GetThingShadow", thing, name)
        try:
            document = ctx.shadows.get(thing, name)
        except ShadowError as err:
            _translate(err, "GetThingShadow", thing, name)
        return {"payload": _b64(document)}

    async def update(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        thing, name = _names(body)
        authorize(stream, "UpdateThingShadow", thing, name)
        raw = body.get("payload")
        if not isinstance(raw, str) or not raw:
            raise InvalidArgumentsError(
                f"UpdateThingShadow on {describe(thing, name)}: payload is required "
                '(a JSON update document such as {"state": {"reported": {...}}})'
            )
        payload = args.blob(raw, f"UpdateThingShadow on {describe(thing, name)}: payload")
        try:
            request = parse_payload(payload)
        except ShadowError as err:
            _translate(err, "UpdateThingShadow", thing, name)
        try:
            result = ctx.shadows.update(thing, name, request)
        except ShadowError as err:
            if err.code == 409:
                current = ctx.shadows.document(thing, name)
                version = current.version if current is not None else "none (no shadow)"
                err = ShadowError(
                    409,
                    f"Version conflict: the request's version {request.get('version')} is "
                    f"not the current version {version}; get the shadow and retry",
                )
            _translate(err, "UpdateThingShadow", thing, name)
        return {"payload": _b64(result.accepted)}

    async def delete(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        thing, name = _names(body)
        authorize(stream, "DeleteThingShadow", thing, name)
        try:
            ctx.shadows.delete(thing, name, None)
        except ShadowError as err:
            _translate(err, "DeleteThingShadow", thing, name)
        # ShadowManager answers a delete with an empty payload (AWS's REST delete does too);
        # the /delete/accepted document goes to the listeners.
        return {"payload": ""}

    async def list_named(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        thing, _ = _names(body, named=False)
        authorize(stream, "ListNamedShadowsForThing", thing, "")
        page_size = body.get("pageSize")
        if page_size is None:
            page_size = DEFAULT_PAGE_SIZE
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise InvalidArgumentsError("pageSize must be an integer between 1 and 100")
        token = body.get("nextToken") or None
        if token is not None and not isinstance(token, str):
            raise InvalidArgumentsError("nextToken must be a string from a previous response")
        try:
            names, next_token = ctx.shadows.list_named(thing, page_size, token)
        except ShadowError as err:
            raise InvalidArgumentsError(
                f"ListNamedShadowsForThing for thing {thing!r}: {err.message}"
            ) from err
        response: dict[str, Any] = {"results": names, "timestamp": ctx.shadows.clock()}
        if next_token is not None:
            response["nextToken"] = next_token
        return response

    return [
        Operation("GetThingShadow", get),
        Operation("UpdateThingShadow", update),
        Operation("DeleteThingShadow", delete),
        Operation("ListNamedShadowsForThing", list_named),
    ]
