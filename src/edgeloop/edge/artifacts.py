"""The hub's artifact store: verified, content-addressed, atomically staged component files.

Layout under the store's root::

    blobs/sha256/<hex>                                     every verified file, read-only
    artifacts/<component>/<version>/<file>                 {artifacts:path}
    artifacts-unarchived/<component>/<version>/<stem>/...  {artifacts:decompressedPath}
    manifests/<component>/<version>.json                   what was staged; the commit mark
    tmp/                                                   staging areas, same file system
    tmp/downloads/                                         downloads in progress (fetch.py)

A version is staged in ``tmp/`` and renamed into place; its manifest is written last, so a
version without a manifest is an interrupted stage that the next ``stage`` or ``gc`` clears.
The store has one owner (the agent); its methods block on disk I/O, so call them from a
worker thread (``asyncio.to_thread``) in async code.

Downloads (``edgeloop.edge.fetch``) land in ``tmp/downloads/``, which ``gc`` spares
(except files untouched for ``DOWNLOAD_MAX_AGE``), so an interrupted download survives a
restart of the agent and continues. A fetch function that returns a file there hands it
over: it is hard-linked into the stage rather than copied, and removed once the version
is committed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Literal, Protocol, TypedDict, cast

from edgeloop.core.errors import ArtifactError

__all__ = [
    "DEFAULT_MAX_UNARCHIVED_BYTES",
    "DEFAULT_MAX_UNARCHIVED_ENTRIES",
    "DOWNLOAD_MAX_AGE",
    "ArtifactSpec",
    "ArtifactStore",
    "GcResult",
    "StagedArtifacts",
    "local_fetch",
]

DEFAULT_MAX_UNARCHIVED_BYTES = 1 << 30
DOWNLOAD_MAX_AGE = 7 * 24 * 3600.0  # seconds a download may sit untouched before gc drops it
DEFAULT_MAX_UNARCHIVED_ENTRIES = 100_000

_CHUNK = 1 << 20
_MANIFEST_FORMAT = 1
# Component names and versions become path segments: a leading alphanumeric rules out
# "", "." and "..", and the character set rules out separators.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
# Recipe algorithm names (Greengrass writes "SHA-256") mapped to hashlib names.
_ALGORITHMS = {"SHA-256": "sha256", "SHA-1": "sha1", "SHA-384": "sha384", "SHA-512": "sha512"}
_READ_BITS = {"NONE": 0, "OWNER": stat.S_IRUSR, "ALL": stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH}
_EXEC_BITS = {"NONE": 0, "OWNER": stat.S_IXUSR, "ALL": stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH}
# Folders inside a staged version: traversable and listable by all, writable by nobody,
# so a component cannot change the files another version or component relies on.
_DIR_MODE = 0o555
_BLOB_MODE = 0o444


class ArtifactSpec(Protocol):
    """What the store needs from a recipe's artifact (``edgeloop.core.recipe.Artifact``)."""

    @property
    def uri(self) -> str: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def unarchive(self) -> Literal["NONE", "ZIP"]: ...
    @property
    def read(self) -> Literal["NONE", "OWNER", "ALL"]: ...
    @property
    def execute(self) -> Literal["NONE", "OWNER", "ALL"]: ...
    @property
    def file_name(self) -> str: ...


@dataclass(frozen=True)
class StagedArtifacts:
    """Where a staged version's files are: ``{artifacts:path}`` and its decompressed twin."""

    path: Path
    decompressed_path: Path


@dataclass(frozen=True)
class GcResult:
    """What a garbage collection removed."""

    versions: tuple[tuple[str, str], ...] = ()
    blobs: int = 0
    bytes_freed: int = 0


def local_fetch(artifact_dir: Path, component: str, version: str) -> Callable[[ArtifactSpec], Path]:
    """A fetcher for local deployments: ``<artifact_dir>/<component>/<version>/<file_name>``."""

    def fetch(artifact: ArtifactSpec) -> Path:
        return artifact_dir / component / version / artifact.file_name

    return fetch


class _Entry(TypedDict):
    uri: str
    file: str
    sha256: str
    digests: dict[str, str]
    unarchive: str
    read: str
    execute: str


class _Manifest(TypedDict):
    format: int
    component: str
    version: str
    artifacts: list[_Entry]


@dataclass
class _Fetched:
    """One artifact copied into the staging area and hashed."""

    index: int
    spec: ArtifactSpec
    file_name: str
    incoming: Path
    sha256: str
    digests: dict[str, str] = field(default_factory=dict)
    download: Path | None = None  # a finished download to remove once the stage commits


class ArtifactStore:
    """Content-addressed artifact store with atomic, idempotent, immutable version staging."""

    def __init__(
        self,
        root: Path,
        *,
        max_unarchived_bytes: int = DEFAULT_MAX_UNARCHIVED_BYTES,
        max_unarchived_entries: int = DEFAULT_MAX_UNARCHIVED_ENTRIES,
    ) -> None:
        self.root = root
        self.max_unarchived_bytes = max_unarchived_bytes
        self.max_unarchived_entries = max_unarchived_entries
        self._blobs = root / "blobs" / "sha256"
        self._artifacts = root / "artifacts"
        self._unarchived = root / "artifacts-unarchived"
        self._manifests = root / "manifests"
        self._tmp = root / "tmp"
        self.downloads = self._tmp / "downloads"
        for folder in (self._blobs, self._artifacts, self._unarchived, self._manifests, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(exist_ok=True)

    # -- queries -----------------------------------------------------------------------

    def paths_for(self, component: str, version: str) -> StagedArtifacts:
        """Where a version's folders are, staged or not (see ``is_staged``).

        A path computation, so recipe variables can be resolved for components that
        have no artifacts (and so are never staged).
        """
        _check_segments(component, version)
        return self._paths(component, version)

    def is_staged(self, component: str, version: str) -> bool:
        """Whether a version has been staged completely."""
        _check_segments(component, version)
        return self._manifest_path(component, version).is_file()

    def staged(self) -> set[tuple[str, str]]:
        """Every (component, version) staged completely."""
        found: set[tuple[str, str]] = set()
        for comp_dir in _subdirs(self._manifests):
            for manifest in comp_dir.glob("*.json"):
                found.add((comp_dir.name, manifest.name.removesuffix(".json")))
        return found

    # -- staging -----------------------------------------------------------------------

    def stage(
        self,
        component: str,
        version: str,
        artifacts: Sequence[ArtifactSpec],
        fetch: Callable[[ArtifactSpec], Path],
        *,
        source: str,
    ) -> StagedArtifacts:
        """Fetch, verify, store and lay out one component version's artifacts.

        Every digest is checked before anything is written outside ``tmp/``; a failure
        leaves the store as it was. Staging a version again with the same content is a
        no-op; with different content it is an ArtifactError, because versions are immutable.
        """
        _check_segments(component, version, source=source)
        names = _check_names(artifacts, source)
        manifest_path = self._manifest_path(component, version)
        final = self._paths(component, version)
        if manifest_path.is_file() and final.path.is_dir() and final.decompressed_path.is_dir():
            self._check_same(component, version, artifacts, names, fetch, source)
            return final
        # Folders without a manifest are an interrupted stage (and a manifest without
        # folders, folders deleted behind the store's back): stage again from scratch.
        self._remove_folders(component, version)

        work = self._tmp / f"stage-{uuid.uuid4().hex}"
        work.mkdir()
        created: list[Path] = []
        try:
            fetched = [
                self._fetch(i, spec, name, fetch, work, source)
                for i, (spec, name) in enumerate(zip(artifacts, names, strict=True))
            ]
            staged_dir = work / "artifacts"
            unarchived_dir = work / "unarchived"
            staged_dir.mkdir()
            unarchived_dir.mkdir()
            for item in fetched:
                mode = _file_mode(item.spec)
                _copy_file(item.incoming, staged_dir / item.file_name, mode)
                if item.spec.unarchive == "ZIP":
                    _unzip(
                        item.incoming,
                        unarchived_dir / PurePosixPath(item.file_name).stem,
                        mode=mode,
                        max_bytes=self.max_unarchived_bytes,
                        max_entries=self.max_unarchived_entries,
                        uri=item.spec.uri,
                        source=source,
                        field=f"Artifacts[{item.index}].Unarchive",
                    )
            manifest = _manifest(component, version, fetched)

            # Commit: blobs, then the two folders, then the manifest (the commit mark).
            for item in fetched:
                blob = self._blobs / item.sha256
                if not blob.exists():
                    os.chmod(item.incoming, _BLOB_MODE)
                    os.rename(item.incoming, blob)
                    created.append(blob)
            _fsync_dir(self._blobs)
            for src, dst in ((unarchived_dir, final.decompressed_path), (staged_dir, final.path)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.rename(src, dst)
                created.append(dst)
                # Sealed only now: renaming a folder needs write access to it (its "..").
                _seal_tree(dst)
                _fsync_dir(dst.parent)
            manifest_path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
            for item in fetched:
                if item.download is not None:
                    item.download.unlink(missing_ok=True)
            return final
        except BaseException:
            for path in reversed(created):
                _remove_path(path)
            for parent in (final.path.parent, final.decompressed_path.parent, manifest_path.parent):
                _rmdir_if_empty(parent)
            raise
        finally:
            _remove_path(work)

    def _fetch(
        self,
        index: int,
        spec: ArtifactSpec,
        file_name: str,
        fetch: Callable[[ArtifactSpec], Path],
        work: Path,
        source: str,
    ) -> _Fetched:
        """Copy one artifact into ``work`` while hashing it, then check its digest."""
        algorithm = _hash_name(spec, index, source)
        try:
            origin = fetch(spec)
        except OSError as err:
            raise ArtifactError(
                f"cannot fetch {spec.uri}: {err}", source=source, field=f"Artifacts[{index}].Uri"
            ) from err
        except ArtifactError as err:
            if err.source is not None:
                raise
            # A fetcher knows the artifact, not where the recipe names it: say so here.
            raise ArtifactError(
                err.reason, source=source, field=f"Artifacts[{index}].{err.field or 'Uri'}"
            ) from err
        incoming = work / f"incoming-{index}"
        hashers = {"sha256": hashlib.sha256(), algorithm: hashlib.new(algorithm)}
        download = origin if origin.parent == self.downloads else None
        try:
            if download is not None:
                # Same file system: a link, not a copy; the download itself stays until
                # the stage commits, so a failed stage does not cost it.
                os.link(origin, incoming)
                with open(incoming, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        for hasher in hashers.values():
                            hasher.update(chunk)
            else:
                with open(origin, "rb") as src, open(incoming, "xb") as dst:
                    while chunk := src.read(_CHUNK):
                        for hasher in hashers.values():
                            hasher.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise ArtifactError(
                f"artifact file for {spec.uri} not found: expected a file at {origin}; "
                "put it there or fix the artifact's Uri",
                source=source,
                field=f"Artifacts[{index}].Uri",
            ) from err
        except OSError as err:
            raise ArtifactError(
                f"cannot read the artifact file for {spec.uri} at {origin}: {err}",
                source=source,
                field=f"Artifacts[{index}].Uri",
            ) from err
        item = _Fetched(
            index=index,
            spec=spec,
            file_name=file_name,
            incoming=incoming,
            sha256=hashers["sha256"].hexdigest(),
            digests={name: h.hexdigest() for name, h in hashers.items()},
            download=download,
        )
        if spec.digest is not None:
            _verify(spec, item.digests[algorithm], algorithm, index, source)
        return item

    def _check_same(
        self,
        component: str,
        version: str,
        artifacts: Sequence[ArtifactSpec],
        names: list[str],
        fetch: Callable[[ArtifactSpec], Path],
        source: str,
    ) -> None:
        """Raise unless ``artifacts`` describe exactly what is already staged."""
        where = _where(component, version)
        recorded = self._read_manifest(component, version)["artifacts"]
        immutable = "component versions are immutable; publish the change as a new version"
        if sorted(names) != sorted(entry["file"] for entry in recorded):
            raise ArtifactError(
                f"{where} is already staged with different artifacts "
                f"({', '.join(sorted(e['file'] for e in recorded)) or 'none'}); {immutable}",
                source=source,
            )
        by_name = {entry["file"]: entry for entry in recorded}
        for index, (spec, name) in enumerate(zip(artifacts, names, strict=True)):
            entry = by_name[name]
            fld = f"Artifacts[{index}]"
            for key in ("unarchive", "read", "execute"):
                if getattr(spec, key) != entry[key]:
                    raise ArtifactError(
                        f"{where} is already staged with {key} {entry[key]} for {spec.uri}, "
                        f"not {getattr(spec, key)}; {immutable}",
                        source=source,
                        field=fld,
                    )
            algorithm = _hash_name(spec, index, source)
            if spec.digest is not None and algorithm in entry["digests"]:
                expected = _decode_digest(spec, algorithm, index, source).hex()
                actual = entry["digests"][algorithm]
            else:
                # No comparable digest in the recipe: hash the file again to decide.
                with _scratch(self._tmp) as work:
                    item = self._fetch(index, spec, name, fetch, work, source)
                expected, actual = item.sha256, entry["sha256"]
            if expected != actual:
                raise ArtifactError(
                    f"{where} is already staged with different content for {spec.uri}; {immutable}",
                    source=source,
                    field=fld,
                )

    # -- removal -----------------------------------------------------------------------

    def remove(self, component: str, version: str) -> bool:
        """Delete a staged version's folders (its blobs go at the next ``gc``)."""
        _check_segments(component, version)
        manifest = self._manifest_path(component, version)
        existed = manifest.exists()
        # The manifest goes first: a crash part-way leaves an unmarked folder, not a
        # marked version with missing files.
        manifest.unlink(missing_ok=True)
        existed = self._remove_folders(component, version) or existed
        _rmdir_if_empty(manifest.parent)
        return existed

    def gc(self, keep: set[tuple[str, str]]) -> GcResult:
        """Delete every version not in ``keep``, then every blob no staged version uses."""
        removed: list[tuple[str, str]] = []
        for tree in (self._artifacts, self._unarchived, self._manifests):
            for comp_dir in _subdirs(tree):
                for entry in list(comp_dir.iterdir()):
                    version = entry.name
                    if tree is self._manifests:
                        version = version.removesuffix(".json")
                    key = (comp_dir.name, version)
                    if key in keep and self._manifest_path(*key).is_file():
                        continue
                    if _SEGMENT.fullmatch(comp_dir.name) and _SEGMENT.fullmatch(version):
                        if self.remove(*key) and key not in removed:
                            removed.append(key)
                    else:
                        _remove_path(entry)
                _rmdir_if_empty(comp_dir)
        for leftover in list(self._tmp.iterdir()):
            if leftover != self.downloads:
                _remove_path(leftover)
        _drop_stale(self.downloads, DOWNLOAD_MAX_AGE)

        referenced: set[str] = set()
        for component, version in self.staged():
            entries = self._read_manifest(component, version)["artifacts"]
            referenced.update(entry["sha256"] for entry in entries)
        blobs = 0
        freed = 0
        for blob in list(self._blobs.iterdir()):
            if blob.name not in referenced:
                freed += blob.stat().st_size
                blob.unlink()
                blobs += 1
        return GcResult(versions=tuple(sorted(removed)), blobs=blobs, bytes_freed=freed)

    # -- helpers -----------------------------------------------------------------------

    def _paths(self, component: str, version: str) -> StagedArtifacts:
        return StagedArtifacts(
            path=self._artifacts / component / version,
            decompressed_path=self._unarchived / component / version,
        )

    def _manifest_path(self, component: str, version: str) -> Path:
        return self._manifests / component / f"{version}.json"

    def _read_manifest(self, component: str, version: str) -> _Manifest:
        path = self._manifest_path(component, version)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            raise ArtifactError(
                f"the store's record of {_where(component, version)} is unreadable ({err}); "
                "remove the version and deploy it again",
                source=str(path),
            ) from err
        if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT:
            raise ArtifactError(
                f"the store's record of {_where(component, version)} has an unknown format; "
                "remove the version and deploy it again",
                source=str(path),
            )
        return cast(_Manifest, data)

    def _remove_folders(self, component: str, version: str) -> bool:
        paths = self._paths(component, version)
        existed = False
        for folder in (paths.path, paths.decompressed_path):
            if folder.exists() or folder.is_symlink():
                existed = True
                _remove_path(folder)
            _rmdir_if_empty(folder.parent)
        return existed


# -- verification ------------------------------------------------------------------------


def _where(component: str, version: str) -> str:
    return f"{component}@{version}"


def _check_segments(component: str, version: str, *, source: str | None = None) -> None:
    for value, name in ((component, "ComponentName"), (version, "ComponentVersion")):
        if not _SEGMENT.fullmatch(value):
            raise ArtifactError(
                f"{value!r} cannot name a folder: use letters, digits, '.', '_', '+' and '-', "
                "starting with a letter or digit",
                source=source,
                field=name,
            )


def _check_names(artifacts: Sequence[ArtifactSpec], source: str) -> list[str]:
    """File names of the artifacts, each safe as one path segment and unique."""
    names: list[str] = []
    stems: dict[str, str] = {}
    for index, spec in enumerate(artifacts):
        name = spec.file_name
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ArtifactError(
                f"the artifact {spec.uri} has no usable file name ({name!r})",
                source=source,
                field=f"Artifacts[{index}].Uri",
            )
        if name in names:
            raise ArtifactError(
                f"two artifacts are both named {name!r}; they would overwrite each other in "
                "{artifacts:path}",
                source=source,
                field=f"Artifacts[{index}].Uri",
            )
        if spec.unarchive == "ZIP":
            stem = PurePosixPath(name).stem
            if stem in stems:
                raise ArtifactError(
                    f"{spec.uri} and {stems[stem]} would both unarchive into "
                    f"{{artifacts:decompressedPath}}/{stem}",
                    source=source,
                    field=f"Artifacts[{index}].Uri",
                )
            stems[stem] = spec.uri
        names.append(name)
    return names


def _hash_name(spec: ArtifactSpec, index: int, source: str) -> str:
    name = _ALGORITHMS.get(re.sub(r"^SHA-?", "SHA-", spec.algorithm.strip().upper()))
    if name is None:
        raise ArtifactError(
            f"unsupported digest algorithm {spec.algorithm!r} for {spec.uri}; "
            f"use one of {', '.join(_ALGORITHMS)}",
            source=source,
            field=f"Artifacts[{index}].Algorithm",
        )
    return name


def _decode_digest(spec: ArtifactSpec, algorithm: str, index: int, source: str) -> bytes:
    """The recipe's digest as bytes: base64 (as Greengrass writes it) or hex."""
    text = (spec.digest or "").strip()
    size = hashlib.new(algorithm).digest_size
    if len(text) == 2 * size:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    padded = text + "=" * (-len(text) % 4)
    try:
        # Greengrass writes standard base64; accept the URL-safe alphabet too.
        altchars = b"-_" if "-" in text or "_" in text else None
        raw = base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise ArtifactError(
            f"the digest {text!r} of {spec.uri} is neither base64 nor hex of a "
            f"{spec.algorithm} hash ({size} bytes)",
            source=source,
            field=f"Artifacts[{index}].Digest",
        )
    return raw


def _verify(spec: ArtifactSpec, actual_hex: str, algorithm: str, index: int, source: str) -> None:
    expected = _decode_digest(spec, algorithm, index, source)
    actual = bytes.fromhex(actual_hex)
    if expected == actual:
        return
    given = (spec.digest or "").strip()
    shown = actual_hex if len(given) == 2 * len(actual) else base64.b64encode(actual).decode()
    raise ArtifactError(
        f"digest mismatch for {spec.uri}: the recipe says {spec.algorithm} {given}, "
        f"the file has {shown}; the file is corrupt or the recipe is out of date",
        source=source,
        field=f"Artifacts[{index}].Digest",
    )


def _file_mode(spec: ArtifactSpec) -> int:
    return _READ_BITS[spec.read] | _EXEC_BITS[spec.execute]


def _manifest(component: str, version: str, fetched: list[_Fetched]) -> _Manifest:
    return {
        "format": _MANIFEST_FORMAT,
        "component": component,
        "version": version,
        "artifacts": [
            {
                "uri": item.spec.uri,
                "file": item.file_name,
                "sha256": item.sha256,
                "digests": item.digests,
                "unarchive": item.spec.unarchive,
                "read": item.spec.read,
                "execute": item.spec.execute,
            }
            for item in fetched
        ],
    }


# -- unarchiving -------------------------------------------------------------------------


def _unzip(
    archive: Path,
    dest: Path,
    *,
    mode: int,
    max_bytes: int,
    max_entries: int,
    uri: str,
    source: str,
    field: str,
) -> None:
    """Extract a ZIP into ``dest`` (a new folder), refusing anything that could escape it.

    Symlink entries are refused outright rather than checked: whether a link stays inside
    depends on entries extracted before and after it (``a -> ..`` then ``a/x``), and
    Greengrass itself (java.util.zip) never creates links, so no working component needs them.
    """

    def unsafe(reason: str) -> ArtifactError:
        return ArtifactError(f"refusing to unarchive {uri}: {reason}", source=source, field=field)

    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > max_entries:
                raise unsafe(f"it has {len(infos)} entries, more than the cap of {max_entries}")
            plan = _plan_entries(infos, unsafe)
            declared = sum(info.file_size for info, _, is_dir in plan if not is_dir)
            if declared > max_bytes:
                raise unsafe(
                    f"it would unpack to {declared} bytes, more than the cap of {max_bytes}"
                )
            dest.mkdir()
            root = dest.resolve()
            written = 0
            for info, parts, is_dir in plan:
                target = dest.joinpath(*parts)
                if not target.resolve().is_relative_to(root):
                    raise unsafe(f"entry {info.filename!r} resolves outside the folder")
                if is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    written = _copy_capped(src, dst, written, max_bytes, info, unsafe)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.chmod(target, mode)
    except ArtifactError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as err:
        # RuntimeError is how zipfile reports encrypted entries.
        raise ArtifactError(
            f"cannot unarchive {uri}: {err}; is it a valid, unencrypted ZIP file?",
            source=source,
            field=field,
        ) from err


def _plan_entries(
    infos: list[zipfile.ZipInfo], unsafe: Callable[[str], ArtifactError]
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...], bool]]:
    """Check every entry's name and kind before any byte is written."""
    plan: list[tuple[zipfile.ZipInfo, tuple[str, ...], bool]] = []
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for info in infos:
        name = info.filename
        if "\0" in name:
            raise unsafe(f"entry {name!r} has a NUL byte in its name")
        # Backslashes are separators to some unzip tools and not to others; refuse the doubt.
        if "\\" in name:
            raise unsafe(f"entry {name!r} has a backslash in its name")
        if name.startswith("/") or re.match(r"[A-Za-z]:", name):
            raise unsafe(f"entry {name!r} has an absolute path")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise unsafe(f"entry {name!r} has a '..' component")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise unsafe(f"entry {name!r} is a symbolic link; links are not unarchived")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise unsafe(f"entry {name!r} is not a regular file or folder")
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        if not parts:
            if is_dir:
                continue  # "./" names the folder itself
            raise unsafe(f"entry {name!r} has no file name")
        if parts in files or (not is_dir and parts in dirs):
            raise unsafe(f"entry {name!r} appears more than once")
        for depth in range(1, len(parts)):
            if parts[:depth] in files:
                raise unsafe(f"entry {name!r} is inside {'/'.join(parts[:depth])!r}, a file")
            dirs.add(parts[:depth])
        (dirs if is_dir else files).add(parts)
        plan.append((info, parts, is_dir))
    return plan


def _copy_capped(
    src: IO[bytes],
    dst: IO[bytes],
    written: int,
    max_bytes: int,
    info: zipfile.ZipInfo,
    unsafe: Callable[[str], ArtifactError],
) -> int:
    """Copy one entry, counting real output: a ZIP's declared sizes can lie."""
    entry = 0
    while chunk := src.read(_CHUNK):
        entry += len(chunk)
        written += len(chunk)
        if entry > info.file_size:
            raise unsafe(f"entry {info.filename!r} is larger than its declared size")
        if written > max_bytes:
            raise unsafe(f"it unpacks to more than the cap of {max_bytes} bytes")
        dst.write(chunk)
    return written


# -- file system helpers -----------------------------------------------------------------


def _copy_file(src: Path, dst: Path, mode: int) -> None:
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, mode)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_tree(top: Path) -> None:
    """Make every folder under ``top`` (and ``top``) read-only but traversable."""
    for dirpath, _dirnames, _files in os.walk(top, topdown=False):
        os.chmod(dirpath, _DIR_MODE)


def _remove_path(path: Path) -> None:
    """Remove a file or a tree, including the read-only folders the store makes."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    for dirpath, _dirnames, _files in os.walk(path):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(path)


def _drop_stale(folder: Path, max_age: float) -> None:
    """Remove files in ``folder`` not modified for ``max_age`` seconds."""
    cutoff = time.time() - max_age
    for entry in list(folder.iterdir()):
        try:
            if entry.lstat().st_mtime < cutoff:
                _remove_path(entry)
        except FileNotFoundError:
            pass


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _subdirs(path: Path) -> Iterator[Path]:
    return (p for p in sorted(path.iterdir()) if p.is_dir() and not p.is_symlink())


@contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    """A temporary folder under the store's ``tmp/``, removed on exit."""
    path = parent / f"check-{uuid.uuid4().hex}"
    path.mkdir()
    try:
        yield path
    finally:
        _remove_path(path)
