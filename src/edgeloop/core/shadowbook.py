"""Named shadows of many things with AWS IoT semantics, over storage of the caller's choice.

``edgeloop.core.shadow`` gives one document's semantics; a ``ShadowBook`` adds thing and
shadow names, listing, and the tombstone AWS IoT keeps for a deleted shadow (a shadow
created again within 48 hours continues its version). Where shadows are kept is a
``ShadowStorage``: files on the hub, the database in the cloud. The book keeps every
thing's shadows it has used in memory and writes each change through its storage before
the call returns; its methods never await, so calls from one event loop never interleave.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgeloop.core.errors import ShadowError, ValidationError
from edgeloop.core.names import MAX_SHADOW_NAME, MAX_THING_NAME, NAME_PATTERN, is_thing_name
from edgeloop.core.shadow import (
    ShadowDocument,
    UpdateResult,
    apply_update,
    delete,
    get_response,
    not_found,
)

log = logging.getLogger("edgeloop.shadows")

MAX_PAGE_SIZE = 100


# How long a deleted shadow's version is remembered (AWS IoT: 48 hours).
DELETED_VERSION_TTL = 48 * 3600


# (thing, shadow name, the accepted update or None for a delete)
ShadowListener = Callable[[str, str, UpdateResult | None], None]


def validate_thing_name(thing: str) -> None:
    """Raise ShadowError 400 unless ``thing`` is a valid AWS IoT thing name."""
    if not isinstance(thing, str) or not thing:
        raise ShadowError(400, "Invalid thing name: a thing name is required")
    if not is_thing_name(thing):
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
    if len(name) > MAX_SHADOW_NAME or NAME_PATTERN.fullmatch(name) is None:
        raise ShadowError(
            400,
            f"Invalid shadow name {name!r}: use 1-{MAX_SHADOW_NAME} characters from "
            "a-z, A-Z, 0-9, ':', '_' and '-' (or no name for the classic shadow)",
        )


@dataclass
class ShadowEntry:
    """One shadow as kept in memory: the live document, or a deleted one's version."""

    document: ShadowDocument | None
    deleted_version: int = 0
    deleted_at: int = 0

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> ShadowEntry:
        """An entry as ``to_json`` wrote it; ValidationError naming ``source`` otherwise."""
        if not isinstance(data, dict):
            raise ValidationError("must be a JSON object", source=source)
        raw = data.get("document")
        document = ShadowDocument.from_json(raw) if raw is not None else None
        deleted_version = data.get("deletedVersion", 0)
        deleted_at = data.get("deletedAt", 0)
        if not isinstance(deleted_version, int) or not isinstance(deleted_at, int):
            raise ValidationError(
                "must be integers", source=source, field="deletedVersion/deletedAt"
            )
        return cls(document, deleted_version, deleted_at)

    def to_json(self) -> dict[str, Any]:
        """How storage keeps an entry."""
        return {
            "document": self.document.to_json() if self.document is not None else None,
            "deletedVersion": self.deleted_version,
            "deletedAt": self.deleted_at,
        }


class ShadowStorage(Protocol):
    """Where a ShadowBook keeps its entries."""

    def load(self, thing: str) -> dict[str, ShadowEntry]:
        """Every stored entry of one thing, by shadow name ("" for the classic shadow)."""

    def save(self, thing: str, name: str, entry: ShadowEntry) -> None:
        """Store one entry durably; raise ShadowError 500 when that fails."""


class ShadowBook:
    """Classic and named shadows of any number of things, kept in a ``ShadowStorage``."""

    def __init__(self, storage: ShadowStorage, *, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.clock = clock
        self._things: dict[str, dict[str, ShadowEntry]] = {}
        self.listeners: list[ShadowListener] = []

    # -- reading -------------------------------------------------------------------------

    def document(self, thing: str, name: str = "") -> ShadowDocument | None:
        """The stored document, or None when the shadow does not exist."""
        validate_thing_name(thing)
        validate_shadow_name(name)
        entry = self._shadows(thing).get(name)
        return entry.document if entry is not None else None

    def get(self, thing: str, name: str = "", *, client_token: str | None = None) -> dict[str, Any]:
        """The AWS get response (state with delta, metadata, version, timestamp); 404 if none."""
        document = self.document(thing, name)
        if document is None:
            raise not_found(name or thing, client_token=client_token)
        return get_response(document, self.now(), client_token=client_token)

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
        now = self.now()
        shadows = self._shadows(thing)
        entry = shadows.get(name)
        current = entry.document if entry is not None else None
        result = apply_update(current, request, now, base_version=self._base_version(entry, now))
        self._store(thing, name, ShadowEntry(result.document))
        self._notify(thing, name, result)
        return result

    def delete(
        self, thing: str, name: str = "", request: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Delete a shadow; returns AWS's ``/delete/accepted`` document. 404 when absent."""
        validate_thing_name(thing)
        validate_shadow_name(name)
        now = self.now()
        entry = self._shadows(thing).get(name)
        document = entry.document if entry is not None else None
        result = delete(document, request, now, shadow_name=name or thing)
        self._store(thing, name, ShadowEntry(None, deleted_version=result.version, deleted_at=now))
        self._notify(thing, name, None)
        return result.accepted

    # -- internals -----------------------------------------------------------------------

    def forget(self, thing: str) -> None:
        """Drop what is held in memory of ``thing`` (its storage was changed behind the
        book, e.g. the thing was deleted with its shadows)."""
        self._things.pop(thing, None)

    def now(self) -> int:
        """The clock, in whole seconds as AWS timestamps are."""
        return int(self.clock())

    def _base_version(self, entry: ShadowEntry | None, now: int) -> int:
        if entry is None or entry.document is not None:
            return 0
        if now - entry.deleted_at > DELETED_VERSION_TTL:
            return 0
        return entry.deleted_version

    def _store(self, thing: str, name: str, entry: ShadowEntry) -> None:
        # Storage first: when the write fails, memory still matches what is stored.
        self.storage.save(thing, name, entry)
        self._shadows(thing)[name] = entry

    def _notify(self, thing: str, name: str, result: UpdateResult | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(thing, name, result)
            except Exception:
                # The change is already saved and answered; a listener cannot undo it.
                log.exception("shadow listener failed for %r/%r", thing, name)

    def _shadows(self, thing: str) -> dict[str, ShadowEntry]:
        shadows = self._things.get(thing)
        if shadows is None:
            shadows = self.storage.load(thing)
            self._things[thing] = shadows
        return shadows


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
