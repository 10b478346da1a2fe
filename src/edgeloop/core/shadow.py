"""AWS IoT Device Shadow semantics as a pure state machine over JSON documents.

Nothing here does I/O or reads a clock: callers pass ``now`` (epoch seconds, an int, as
AWS writes timestamps) and persist the returned ``ShadowDocument`` themselves.

What AWS documents, and this module does:

- An update request is ``{"state": {"desired": {...}, "reported": {...}}, "version": n,
  "clientToken": "..."}``. Objects merge key by key, recursively; ``null`` deletes a key;
  arrays and scalars replace what was there whole. ``"desired": null`` removes the section,
  ``"state": null`` removes both. Top-level keys other than these three are ignored.
- Every accepted update increments ``version`` by one; a request carrying ``version``
  is refused with 409 "Version conflict" unless it equals the current version.
- ``metadata`` mirrors the state shape with ``{"timestamp": t}`` on every leaf (a scalar
  or a whole array), set to ``now`` on every leaf a request touches.
- The delta holds every ``desired`` key whose value differs from ``reported`` (or that
  ``reported`` lacks), recursing into objects present on both sides and comparing arrays
  whole; its metadata is the desired metadata of those keys.
- ``/update/accepted`` echoes the request's state with timestamps; ``/update/delta`` is
  published only while the delta is non-empty; ``/update/documents`` carries the full
  ``previous`` and ``current`` state, metadata and version.
- clientToken is at most 64 bytes; the stored desired + reported state, serialized as
  compact UTF-8 JSON, at most 8 KiB (metadata does not count); nesting at most 6 levels.

Where AWS is silent, the choices made are:

- Depth: a section object is level 1 and every nested object or array adds one, so
  ``{"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}`` (6 objects) is the deepest accepted.
  (The error text says "maximum is 6"; older quota pages say 5 levels *below* the section,
  which is the same limit counted from the first key.)
- An object left empty after a merge (all its keys deleted, or written as ``{}``) is
  removed, and so is a section; metadata therefore always mirrors the state exactly.
- A null inside an array is refused with 400 "State contains an invalid node", as are
  keys in ``state`` other than ``desired`` and ``reported``.
- JSON numbers compare by value (``1 == 1.0``), but ``true`` is not ``1``.
- A shadow deleted and created again continues its old version (AWS does so for 48 h):
  callers pass the deleted version as ``base_version``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeloop.core.errors import ShadowError, ValidationError

__all__ = [
    "MAX_CLIENT_TOKEN_BYTES",
    "MAX_DEPTH",
    "MAX_STATE_BYTES",
    "DeleteResult",
    "ShadowDocument",
    "UpdateResult",
    "apply_update",
    "compute_delta",
    "delete",
    "get_response",
    "not_found",
    "parse_payload",
]

MAX_CLIENT_TOKEN_BYTES = 64
MAX_STATE_BYTES = 8 * 1024
MAX_DEPTH = 6

_SECTIONS = ("desired", "reported")
_MISSING: Any = object()

JsonObject = dict[str, Any]


# --- the stored document -----------------------------------------------------------------


@dataclass(frozen=True)
class ShadowDocument:
    """One shadow as stored: state sections (``None`` when absent), metadata, version.

    The dicts are owned by the document; treat them as read-only (functions here copy).
    """

    desired: JsonObject | None
    reported: JsonObject | None
    desired_metadata: JsonObject | None
    reported_metadata: JsonObject | None
    version: int
    timestamp: int

    def state(self) -> JsonObject:
        """The ``state`` object: the sections that are present."""
        out: JsonObject = {}
        if self.desired is not None:
            out["desired"] = copy.deepcopy(self.desired)
        if self.reported is not None:
            out["reported"] = copy.deepcopy(self.reported)
        return out

    def metadata(self) -> JsonObject:
        """The ``metadata`` object, mirroring ``state()``."""
        out: JsonObject = {}
        if self.desired_metadata is not None:
            out["desired"] = copy.deepcopy(self.desired_metadata)
        if self.reported_metadata is not None:
            out["reported"] = copy.deepcopy(self.reported_metadata)
        return out

    def to_json(self) -> JsonObject:
        """The document as stored: ``{"state", "metadata", "version", "timestamp"}``."""
        return {
            "state": self.state(),
            "metadata": self.metadata(),
            "version": self.version,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShadowDocument:
        """Read a document written by ``to_json``; ``ValidationError`` names what is wrong."""
        if not isinstance(data, Mapping):
            raise ValidationError("a shadow document must be a JSON object", field="shadow")
        numbers: dict[str, int] = {}
        for name in ("version", "timestamp"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValidationError("must be a non-negative integer", field=name)
            numbers[name] = value
        state = data.get("state", {})
        metadata = data.get("metadata", {})
        for name, value in (("state", state), ("metadata", metadata)):
            if not isinstance(value, Mapping):
                raise ValidationError("must be a JSON object", field=name)
        sections: dict[str, JsonObject | None] = {}
        for name in _SECTIONS:
            section = state.get(name)
            meta = metadata.get(name)
            if section is None:
                sections[name] = sections[name + "_metadata"] = None
                continue
            if not isinstance(section, Mapping):
                raise ValidationError("must be a JSON object", field=f"state.{name}")
            if not isinstance(meta, Mapping):
                raise ValidationError(
                    "must be a JSON object mirroring the state", field=f"metadata.{name}"
                )
            sections[name] = copy.deepcopy(dict(section))
            sections[name + "_metadata"] = copy.deepcopy(dict(meta))
        return cls(
            desired=sections["desired"],
            reported=sections["reported"],
            desired_metadata=sections["desired_metadata"],
            reported_metadata=sections["reported_metadata"],
            version=numbers["version"],
            timestamp=numbers["timestamp"],
        )

    def delta(self) -> tuple[JsonObject, JsonObject]:
        """The delta state and its metadata (both empty when desired matches reported)."""
        if not self.desired:
            return {}, {}
        return compute_delta(self.desired, self.reported or {}, self.desired_metadata or {})

    def _versioned_state(self) -> JsonObject:
        return {"state": self.state(), "metadata": self.metadata(), "version": self.version}


@dataclass(frozen=True)
class UpdateResult:
    """An accepted update: the new document and the three messages AWS publishes."""

    document: ShadowDocument
    accepted: JsonObject
    delta: JsonObject | None
    documents: JsonObject


@dataclass(frozen=True)
class DeleteResult:
    """An accepted delete: the ``/delete/accepted`` message and the version to carry on."""

    accepted: JsonObject
    version: int


# --- requests ----------------------------------------------------------------------------


def parse_payload(payload: bytes | str | None) -> JsonObject:
    """Decode an MQTT or HTTP request body; an empty body is ``{}`` (as /get and /delete send)."""
    if payload is None or payload in (b"", ""):
        return {}
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ShadowError(
                415, "Unsupported documented encoding; supported encoding is UTF-8"
            ) from err
    try:
        data = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise ShadowError(400, "Invalid JSON") from err
    if not isinstance(data, dict):
        raise ShadowError(400, "Invalid JSON")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _client_token(request: Mapping[str, Any]) -> str | None:
    token = request.get("clientToken", _MISSING)
    if token is _MISSING:
        return None
    if (
        not isinstance(token, str)
        or len(token.encode("utf-8", "surrogatepass")) > MAX_CLIENT_TOKEN_BYTES
    ):
        raise ShadowError(400, "Invalid clientToken")
    return token


def _expected_version(request: Mapping[str, Any], token: str | None) -> int | None:
    version = request.get("version", _MISSING)
    if version is _MISSING or version is None:
        return None
    if not _is_int(version) or version < 0:
        raise ShadowError(400, "Invalid version", client_token=token)
    return int(version)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_json(value: Any, depth: int, token: str | None, in_array: bool) -> None:
    """Reject non-JSON values, nulls in arrays and nesting deeper than ``MAX_DEPTH``."""
    if isinstance(value, dict):
        depth += 1
        if depth > MAX_DEPTH:
            raise ShadowError(
                400,
                f"JSON contains too many levels of nesting; maximum is {MAX_DEPTH}",
                client_token=token,
            )
        for key, item in value.items():
            if not isinstance(key, str):
                raise ShadowError(400, "Invalid JSON", client_token=token)
            _check_json(item, depth, token, in_array)
    elif isinstance(value, list):
        depth += 1
        if depth > MAX_DEPTH:
            raise ShadowError(
                400,
                f"JSON contains too many levels of nesting; maximum is {MAX_DEPTH}",
                client_token=token,
            )
        for item in value:
            _check_json(item, depth, token, True)
    elif value is None:
        if in_array:
            raise ShadowError(400, "State contains an invalid node", client_token=token)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ShadowError(400, "Invalid JSON", client_token=token)
    elif not isinstance(value, str | int | bool):
        raise ShadowError(400, "Invalid JSON", client_token=token)


def _validated_state(
    request: Mapping[str, Any], token: str | None
) -> dict[str, JsonObject | None] | None:
    """The request's sections to apply; ``None`` means ``"state": null`` (clear both)."""
    if "state" not in request:
        raise ShadowError(400, "Missing required node: state", client_token=token)
    state = request["state"]
    if state is None:
        return None
    if not isinstance(state, dict):
        raise ShadowError(400, "State node must be an object", client_token=token)
    sections: dict[str, JsonObject | None] = {}
    for key, value in state.items():
        if key not in _SECTIONS:
            raise ShadowError(400, "State contains an invalid node", client_token=token)
        if value is not None and not isinstance(value, dict):
            raise ShadowError(400, f"{key.capitalize()} node must be an object", client_token=token)
        if value is not None:
            _check_json(value, 0, token, False)
        sections[key] = value
    return sections


# --- merging -----------------------------------------------------------------------------


def _merge(state: JsonObject, metadata: JsonObject, patch: Mapping[str, Any], now: int) -> None:
    """Merge ``patch`` into ``state`` and stamp ``metadata``, in place."""
    for key, value in patch.items():
        if value is None:
            state.pop(key, None)
            metadata.pop(key, None)
        elif isinstance(value, dict):
            child = state.get(key)
            child_meta = metadata.get(key)
            if not isinstance(child, dict) or not isinstance(child_meta, dict):
                child, child_meta = {}, {}
            _merge(child, child_meta, value, now)
            if child:
                state[key] = child
                metadata[key] = child_meta
            else:
                state.pop(key, None)
                metadata.pop(key, None)
        else:
            state[key] = copy.deepcopy(value)
            metadata[key] = {"timestamp": now}


def _stamp(value: Any, now: int) -> Any:
    """Metadata for a request fragment: ``{"timestamp": now}`` on every leaf."""
    if isinstance(value, dict):
        return {key: _stamp(item, now) for key, item in value.items()}
    return {"timestamp": now}


def _json_equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    return type(left) is type(right) and left == right


def compute_delta(
    desired: Mapping[str, Any], reported: Mapping[str, Any], desired_metadata: Mapping[str, Any]
) -> tuple[JsonObject, JsonObject]:
    """The delta of ``desired`` over ``reported``, and the desired metadata of its keys."""
    delta: JsonObject = {}
    meta: JsonObject = {}
    for key, want in desired.items():
        have = reported.get(key, _MISSING)
        key_meta = desired_metadata.get(key, {})
        if isinstance(want, dict) and isinstance(have, dict):
            sub, sub_meta = compute_delta(
                want, have, key_meta if isinstance(key_meta, dict) else {}
            )
            if sub:
                delta[key] = sub
                meta[key] = sub_meta
        elif have is _MISSING or not _json_equal(want, have):
            delta[key] = copy.deepcopy(want)
            meta[key] = copy.deepcopy(key_meta)
    return delta, meta


def _state_size(desired: JsonObject | None, reported: JsonObject | None) -> int:
    state = {
        name: section
        for name, section in zip(_SECTIONS, (desired, reported), strict=True)
        if section is not None
    }
    return len(json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


# --- operations --------------------------------------------------------------------------


def apply_update(
    current: ShadowDocument | None,
    request: Mapping[str, Any],
    now: int,
    *,
    base_version: int = 0,
) -> UpdateResult:
    """Apply an update request to ``current`` (``None``: no shadow yet) at time ``now``.

    Raises ``ShadowError`` (400, 409 or 413, with AWS's messages and the request's
    clientToken) and changes nothing when the request is refused. ``base_version`` is the
    version a shadow that does not exist continues from (that of a recently deleted one).
    """
    if not isinstance(request, Mapping):
        raise ShadowError(400, "Invalid JSON")
    token = _client_token(request)
    expected = _expected_version(request, token)
    sections = _validated_state(request, token)
    current_version = current.version if current is not None else base_version
    if expected is not None and expected != current_version:
        raise ShadowError(409, "Version conflict", client_token=token)

    if sections is None:
        requested_state: Any = None
        new_sections: dict[str, tuple[JsonObject | None, JsonObject | None]] = {
            name: (None, None) for name in _SECTIONS
        }
    else:
        requested_state = copy.deepcopy(sections)
        new_sections = {}
        for name in _SECTIONS:
            old_state = getattr(current, name) if current is not None else None
            old_meta = getattr(current, name + "_metadata") if current is not None else None
            if name not in sections:
                new_sections[name] = (old_state, old_meta)
                continue
            patch = sections[name]
            if patch is None:
                new_sections[name] = (None, None)
                continue
            state = copy.deepcopy(old_state) if old_state is not None else {}
            meta = copy.deepcopy(old_meta) if old_meta is not None else {}
            _merge(state, meta, patch, now)
            new_sections[name] = (state, meta) if state else (None, None)

    desired, desired_meta = new_sections["desired"]
    reported, reported_meta = new_sections["reported"]
    if _state_size(desired, reported) > MAX_STATE_BYTES:
        raise ShadowError(413, "The payload exceeds the maximum size allowed", client_token=token)

    document = ShadowDocument(
        desired=desired,
        reported=reported,
        desired_metadata=desired_meta,
        reported_metadata=reported_meta,
        version=current_version + 1,
        timestamp=now,
    )
    accepted: JsonObject = {
        "state": requested_state,
        "metadata": _stamp(requested_state, now),
        "version": document.version,
        "timestamp": now,
    }
    _add_token(accepted, token)

    delta_state, delta_meta = document.delta()
    delta: JsonObject | None = None
    if delta_state:
        delta = {
            "state": delta_state,
            "metadata": delta_meta,
            "version": document.version,
            "timestamp": now,
        }
        _add_token(delta, token)

    documents: JsonObject = {}
    if current is not None:
        documents["previous"] = current._versioned_state()
    documents["current"] = document._versioned_state()
    documents["timestamp"] = now
    _add_token(documents, token)
    return UpdateResult(document=document, accepted=accepted, delta=delta, documents=documents)


def get_response(
    document: ShadowDocument, now: int, *, client_token: str | None = None
) -> JsonObject:
    """The ``/get/accepted`` document: state and metadata including the delta."""
    state = document.state()
    metadata = document.metadata()
    delta_state, delta_meta = document.delta()
    if delta_state:
        state["delta"] = delta_state
        metadata["delta"] = delta_meta
    response: JsonObject = {
        "state": state,
        "metadata": metadata,
        "version": document.version,
        "timestamp": now,
    }
    _add_token(response, client_token)
    return response


def delete(
    document: ShadowDocument | None,
    request: Mapping[str, Any] | None,
    now: int,
    *,
    shadow_name: str = "",
) -> DeleteResult:
    """Delete a shadow: check the optional version, answer ``{version, timestamp, clientToken}``.

    ``DeleteResult.version`` is the deleted document's version; keep it as the
    ``base_version`` of the next ``apply_update`` so the version never goes back.
    """
    request = request if request is not None else {}
    if not isinstance(request, Mapping):
        raise ShadowError(400, "Invalid JSON")
    token = _client_token(request)
    expected = _expected_version(request, token)
    if document is None:
        raise not_found(shadow_name, client_token=token)
    if expected is not None and expected != document.version:
        raise ShadowError(409, "Version conflict", client_token=token)
    accepted: JsonObject = {"version": document.version, "timestamp": now}
    _add_token(accepted, token)
    return DeleteResult(accepted=accepted, version=document.version)


def not_found(shadow_name: str, *, client_token: str | None = None) -> ShadowError:
    """AWS's 404 for a get or delete of a shadow that does not exist."""
    return ShadowError(404, f"No shadow exists with name: {shadow_name}", client_token=client_token)


def _add_token(document: JsonObject, token: str | None) -> None:
    if token is not None:
        document["clientToken"] = token
