"""The hub's local shadow store: AWS IoT Device Shadow semantics, one JSON file per shadow.

The semantics are ``edgeloop.core.shadow``'s; this module adds names, durability and
listing. Layout under the store's folder::

    <thing>/classic.json          the classic (unnamed) shadow
    <thing>/named/<name>.json     a named shadow

Each file holds ``{"document": <ShadowDocument.to_json()> | null, "deletedVersion": n,
"deletedAt": t}``: a deleted shadow leaves a tombstone so that a shadow created again
within 48 hours continues its version, as AWS IoT does. Thing and shadow names are
validated against AWS's patterns before they become file names, so no name can leave the
folder.

Every change is made in memory and written with ``write_json_atomic`` before the call
returns; a thing's files are read the first time the thing is used. The methods are
synchronous and never await, so calls from one event loop never interleave.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeloop.core.errors import ShadowError, ValidationError
from edgeloop.core.shadow import (
    ShadowDocument,
    UpdateResult,
    apply_update,
    delete,
    get_response,
    not_found,
)
from edgeloop.edge.store import read_json, write_json_atomic

__all__ = [
    "DELETED_VERSION_TTL",
    "MAX_PAGE_SIZE",
    "MAX_SHADOW_NAME",
    "MAX_THING_NAME",
    "LocalShadows",
    "ShadowListener",
    "validate_shadow_name",
    "validate_thing_name",
]

log = logging.getLogger("edgeloop.shadows")

MAX_THING_NAME = 128
MAX_SHADOW_NAME = 64
MAX_PAGE_SIZE = 100
# How long a deleted shadow's version is remembered (AWS IoT: 48 hours).
DELETED_VERSION_TTL = 48 * 3600

_NAME = re.compile(r"[a-zA-Z0-9:_-]+")
_CLASSIC_FILE = "classic.json"
_NAMED_DIR = "named"

# (thing, shadow name, the accepted update or None for a delete)
ShadowListener = Callable[[str, str, UpdateResult | None], None]


def validate_thing_name(thing: str) -> None:
    """Raise ShadowError 400 unless ``thing`` is a valid AWS IoT thing name."""
    if not isinstance(thing, str) or not thing:
        raise ShadowError(400, "Invalid thing name: a thing name is required")
    if len(thing) > MAX_THING_NAME or _NAME.fullmatch(thing) is None:
        raise ShadowError(
            400,
            f"Invalid thing name {thing!r}: use 1-{MAX_THING_NAME} characters from "
            "a-z, A-Z, 0-9, ':', '_' and '-'",
        )


def validate_shadow_name(name: str) -> None:
    """Raise ShadowError 400 unless ``name`` is "" (classic) or a valid shadow name."""
    if not isinstance(name, str):
        raise ShadowError(400, "Invalid shadow name: a shadow name must be a string")
    if name == "":
        return
    if len(name) > MAX_SHADOW_NAME or _NAME.fullmatch(name) is None:
        raise ShadowError(
            400,
            f"Invalid shadow name {name!r}: use 1-{MAX_SHADOW_NAME} characters from "
            "a-z, A-Z, 0-9, ':', '_' and '-' (or no name for the classic shadow)",
        )


@dataclass
class _Entry:
    """One shadow as kept in memory: the live document, or a deleted one's version."""

    document: ShadowDocument | None
    deleted_version: int = 0
    deleted_at: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "document": self.document.to_json() if self.document is not None else None,
            "deletedVersion": self.deleted_version,
            "deletedAt": self.deleted_at,
        }


class LocalShadows:
    """Classic and named shadows of any number of things, persisted under ``path``."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        fsync: bool = True,
    ) -> None:
        self.path = path
        self.clock = clock
        self._fsync = fsync
        self._things: dict[str, dict[str, _Entry]] = {}
        self.listeners: list[ShadowListener] = []

    # -- reading -------------------------------------------------------------------------

    def document(self, thing: str, name: str = "") -> ShadowDocument | None:
        """The stored document, or None when the shadow does not exist."""
        validate_thing_name(thing)
        validate_shadow_name(name)
        entry = self._shadows(thing).get(name)
        return entry.document if entry is not None else None

    def get(self, thing: str, name: str = "") -> dict[str, Any]:
        """The AWS get response (state with delta, metadata, version, timestamp); 404 if none."""
        document = self.document(thing, name)
        if document is None:
            raise not_found(name or thing)
        return get_response(document, self._now())

    def list_named(
        self, thing: str, page_size: int = 25, next_token: str | None = None
    ) -> tuple[list[str], str | None]:
        """One page of the thing's named shadows, in name order, and the next page's token.

        The token is opaque to callers; it names the last shadow returned, so a page is
        neither skipped nor repeated when shadows are created or deleted between calls.
        It is None when no shadows follow.
        """
        validate_thing_name(thing)
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise ShadowError(400, "Invalid pageSize: it must be an integer")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ShadowError(
                400, f"Invalid pageSize {page_size}: it must be between 1 and {MAX_PAGE_SIZE}"
            )
        after = _decode_token(next_token, thing) if next_token else ""
        names = sorted(
            name
            for name, entry in self._shadows(thing).items()
            if name and entry.document is not None and name > after
        )
        page = names[:page_size]
        token = _encode_token(thing, page[-1]) if len(names) > page_size else None
        return page, token

    # -- changing ------------------------------------------------------------------------

    def update(self, thing: str, name: str, request: dict[str, Any]) -> UpdateResult:
        """Apply an update request; ShadowError 400/409/413 (nothing changes) when refused."""
        validate_thing_name(thing)
        validate_shadow_name(name)
        now = self._now()
        shadows = self._shadows(thing)
        entry = shadows.get(name)
        current = entry.document if entry is not None else None
        result = apply_update(current, request, now, base_version=self._base_version(entry, now))
        self._store(thing, name, _Entry(result.document))
        self._notify(thing, name, result)
        return result

    def delete(
        self, thing: str, name: str = "", request: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Delete a shadow; returns AWS's ``/delete/accepted`` document. 404 when absent."""
        validate_thing_name(thing)
        validate_shadow_name(name)
        now = self._now()
        entry = self._shadows(thing).get(name)
        document = entry.document if entry is not None else None
        result = delete(document, request, now, shadow_name=name or thing)
        self._store(thing, name, _Entry(None, deleted_version=result.version, deleted_at=now))
        self._notify(thing, name, None)
        return result.accepted

    # -- internals -----------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _base_version(self, entry: _Entry | None, now: int) -> int:
        if entry is None or entry.document is not None:
            return 0
        if now - entry.deleted_at > DELETED_VERSION_TTL:
            return 0
        return entry.deleted_version

    def _file(self, thing: str, name: str) -> Path:
        folder = self.path / thing
        return folder / _CLASSIC_FILE if name == "" else folder / _NAMED_DIR / f"{name}.json"

    def _store(self, thing: str, name: str, entry: _Entry) -> None:
        # Disk first: when the write fails, memory still matches what a restart would load.
        try:
            write_json_atomic(self._file(thing, name), entry.to_json(), fsync=self._fsync)
        except OSError as err:
            log.error("could not save shadow %r of thing %r: %s", name, thing, err)
            raise ShadowError(
                500, f"Internal service failure: could not save the shadow ({err.strerror})"
            ) from err
        self._shadows(thing)[name] = entry

    def _notify(self, thing: str, name: str, result: UpdateResult | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(thing, name, result)
            except Exception:
                # The change is already saved and answered; a listener cannot undo it.
                log.exception("shadow listener failed for %r/%r", thing, name)

    def _shadows(self, thing: str) -> dict[str, _Entry]:
        shadows = self._things.get(thing)
        if shadows is None:
            shadows = self._load(thing)
            self._things[thing] = shadows
        return shadows

    def _load(self, thing: str) -> dict[str, _Entry]:
        folder = self.path / thing
        shadows: dict[str, _Entry] = {}
        files = [("", folder / _CLASSIC_FILE)]
        named = folder / _NAMED_DIR
        if named.is_dir():
            files += [(file.stem, file) for file in named.glob("*.json")]
        for name, file in files:
            if name and _NAME.fullmatch(name) is None:
                continue
            entry = self._read(file)
            if entry is not None:
                shadows[name] = entry
        return shadows

    def _read(self, file: Path) -> _Entry | None:
        try:
            data = read_json(file, None)
            if data is None:
                return None
            if not isinstance(data, dict):
                raise ValidationError("must be a JSON object", source=str(file))
            raw = data.get("document")
            document = ShadowDocument.from_json(raw) if raw is not None else None
            deleted_version = data.get("deletedVersion", 0)
            deleted_at = data.get("deletedAt", 0)
            if not isinstance(deleted_version, int) or not isinstance(deleted_at, int):
                raise ValidationError("must be integers", source=str(file), field="deleted*")
            return _Entry(document, deleted_version, deleted_at)
        except (OSError, ValueError, ValidationError) as err:
            # A file write_json_atomic wrote is never partial, so this is outside damage.
            # Set it aside rather than fail every call on this thing, and say so loudly.
            aside = file.with_name(file.name + ".corrupt")
            log.error("shadow file %s is unreadable (%s); moved to %s", file, err, aside)
            try:
                file.replace(aside)
            except OSError:
                log.exception("could not move %s aside", file)
            return None


def _encode_token(thing: str, last: str) -> str:
    raw = json.dumps({"thing": thing, "after": last}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_token(token: str, thing: str) -> str:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeEncodeError, binascii.Error) as err:
        raise ShadowError(400, "Invalid nextToken: use the token of the previous page") from err
    if (
        not isinstance(data, dict)
        or data.get("thing") != thing
        or not isinstance(data.get("after"), str)
    ):
        raise ShadowError(400, "Invalid nextToken: use the token of the previous page")
    after: str = data["after"]
    return after
