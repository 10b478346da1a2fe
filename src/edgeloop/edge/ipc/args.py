"""Reading request members the way every IPC operation must: typed, validated, and with
an InvalidArgumentsError that names the member when it is wrong."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from edgeloop.core.errors import ValidationError
from edgeloop.core.ipc_errors import InvalidArgumentsError
from edgeloop.core.topics import validate_topic_filter, validate_topic_name


def topic(body: dict[str, Any], field: str, *, is_filter: bool) -> str:
    """An MQTT topic name (or filter, with wildcards) from member ``field``."""
    value = body.get(field)
    if not isinstance(value, str):
        raise InvalidArgumentsError(f"{field} is required and must be a string")
    try:
        (validate_topic_filter if is_filter else validate_topic_name)(value)
    except ValidationError as err:
        raise InvalidArgumentsError(f"{field} {value!r}: {err.reason}") from err
    return value


def blob(value: Any, what: str) -> bytes:
    """Bytes from a base64 member (the SDKs send blobs as base64 text)."""
    if not isinstance(value, str):
        raise InvalidArgumentsError(f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidArgumentsError(f"{what} is not valid base64") from err
