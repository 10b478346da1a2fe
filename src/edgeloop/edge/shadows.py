"""The hub's local shadow store: a ShadowBook (``edgeloop.core.shadowbook``) whose storage
is one JSON file per shadow. Layout under the store's folder::

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

import logging
import time
from collections.abc import Callable
from pathlib import Path

from edgeloop.core.errors import ShadowError, ValidationError
from edgeloop.core.names import MAX_SHADOW_NAME, MAX_THING_NAME, NAME_PATTERN
from edgeloop.core.shadowbook import (
    DELETED_VERSION_TTL,
    MAX_PAGE_SIZE,
    ShadowBook,
    ShadowEntry,
    ShadowListener,
    validate_shadow_name,
    validate_thing_name,
)
from edgeloop.edge.store import read_json, write_json_atomic

__all__ = [
    "DELETED_VERSION_TTL",
    "MAX_PAGE_SIZE",
    "MAX_SHADOW_NAME",
    "MAX_THING_NAME",
    "FileShadowStorage",
    "LocalShadows",
    "ShadowListener",
    "validate_shadow_name",
    "validate_thing_name",
]

log = logging.getLogger("edgeloop.shadows")

_CLASSIC_FILE = "classic.json"
_NAMED_DIR = "named"


class FileShadowStorage:
    """Shadow entries as files under one folder, written atomically."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self._fsync = fsync

    def _file(self, thing: str, name: str) -> Path:
        folder = self.path / thing
        return folder / _CLASSIC_FILE if name == "" else folder / _NAMED_DIR / f"{name}.json"

    def save(self, thing: str, name: str, entry: ShadowEntry) -> None:
        """Write one entry; ShadowError 500 when the disk refuses."""
        try:
            write_json_atomic(self._file(thing, name), entry.to_json(), fsync=self._fsync)
        except OSError as err:
            log.error("could not save shadow %r of thing %r: %s", name, thing, err)
            raise ShadowError(
                500, f"Internal service failure: could not save the shadow ({err.strerror})"
            ) from err

    def load(self, thing: str) -> dict[str, ShadowEntry]:
        """Every readable entry of one thing."""
        folder = self.path / thing
        shadows: dict[str, ShadowEntry] = {}
        files = [("", folder / _CLASSIC_FILE)]
        named = folder / _NAMED_DIR
        if named.is_dir():
            files += [(file.stem, file) for file in named.glob("*.json")]
        for name, file in files:
            if name and NAME_PATTERN.fullmatch(name) is None:
                continue
            entry = self._read(file)
            if entry is not None:
                shadows[name] = entry
        return shadows

    def _read(self, file: Path) -> ShadowEntry | None:
        try:
            data = read_json(file, None)
            return None if data is None else ShadowEntry.from_json(data, source=str(file))
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


class LocalShadows(ShadowBook):
    """The hub's shadows, persisted under ``path``."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, fsync: bool = True
    ) -> None:
        super().__init__(FileShadowStorage(path, fsync=fsync), clock=clock)
        self.path = path
