"""The cloud's component registry: published Greengrass recipes and their artifacts.

Publishing (``ComponentRegistry.publish_dir``, or ``put_blob`` + ``publish`` over HTTP)
validates the recipe with the parser the hub uses (``edgeloop.core.recipe``), stores each
artifact's bytes once in the object store under its SHA-256
(``components/blobs/sha256/<hex>``), and stores the recipe *as published*: every artifact's
``Uri`` rewritten to ``edgeloop://components/<name>/<version>/<file>``, with its
``Digest`` (SHA-256, base64 as Greengrass writes it) and ``Algorithm`` filled in.

Why a URI scheme of our own rather than an https URL. A published version is immutable,
and a URL would freeze the cloud's address (its host, port, scheme) into every recipe:
move the cloud, put it behind a proxy, or switch it to HTTPS, and every published version
would point at the wrong place. Nor can a URL carry the short-lived signature a download
needs. So the recipe names *what* the artifact is (as Greengrass's ``s3://`` URIs do), and
a hub resolves the name at deploy time: against its configured cloud API, or through a
signed URL handed to it with the deployment (``links_for_thing``), the way Greengrass's
data plane hands out pre-signed S3 URLs. ``edgeloop.core.registry_uri`` holds the
contract both ends share.

Invariants:

- Versions are immutable. Publishing a name and version again with identical content is
  a no-op; with different content it is a ConflictError naming the version.
- Nothing half-written is visible. Blobs are stored first, the version's rows last, in one
  transaction. A blob that no version uses (a publish that failed after its upload, or a
  deleted version's) is harmless and is removed by ``collect_garbage`` once it has been
  unused for ``blob_grace``; publishing re-stamps the blobs it uses in the same
  transaction, so garbage collection never takes a blob from under a publish.
- A version in use by an active deployment cannot be deleted: the deployment engine
  registers an ``InUseCheck`` (``add_in_use_check``) that names the deployment using it.

Downloads are signed links (``edgeloop.cloud.signing``): HMAC-SHA256 over the resource,
an expiry and the thing the link was issued to, with a per-install secret. They work over
plain HTTP and without a client certificate.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    String,
    Text,
    delete,
    exists,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from edgeloop.cloud.db import Base, Database, EventRow, utcnow
from edgeloop.cloud.objectstore import ObjectStore
from edgeloop.cloud.signing import (
    DEFAULT_LINK_LIFETIME,
    UrlSigner,
    artifact_resource,
    check_lifetime,
    recipe_resource,
)
from edgeloop.core.errors import (
    ArtifactError,
    ConflictError,
    NotFoundError,
    RecipeError,
    ValidationError,
)
from edgeloop.core.recipe import Recipe, parse_recipe
from edgeloop.core.registry_uri import (
    RegistryRef,
    is_registry_uri,
    parse_registry_uri,
    registry_uri,
    signed_recipe_path,
)
from edgeloop.core.semver import Version

__all__ = [
    "BLOB_PREFIX",
    "ComponentArtifactRow",
    "ComponentBlobRow",
    "ComponentRegistry",
    "ComponentSummary",
    "ComponentVersion",
    "ComponentVersionRow",
    "DownloadLinks",
    "GarbageCollected",
    "InUseCheck",
    "Published",
    "PublishedArtifact",
    "SignedArtifact",
    "StoredBlob",
]

BLOB_PREFIX = "components/blobs/sha256/"
DEFAULT_BLOB_GRACE = timedelta(hours=1)
_PUBLISH_HINT = "publish it with: edgeloop cloud component publish"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_SUFFIXES: dict[str, Literal["json", "yaml"]] = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}

InUseCheck = Callable[[str, str], str | None]
"""``(name, version) -> None``, or the deployment that uses that version (for the error)."""


# --- tables -------------------------------------------------------------------------------


class ComponentVersionRow(Base):
    """A published component version: its recipe as published (artifact URIs rewritten)."""

    __tablename__ = "component_versions"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    publisher: Mapped[str] = mapped_column(Text, default="")
    recipe: Mapped[dict[str, Any]]
    # SHA-256 of the published recipe's canonical JSON: identical content, identical digest
    # (the recipe carries every artifact's digest, so this covers the artifacts too).
    recipe_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class ComponentBlobRow(Base):
    """An artifact's bytes in the object store, by SHA-256; ``stored_at`` guards the GC."""

    __tablename__ = "component_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime]


class ComponentArtifactRow(Base):
    """One file of a published version: which blob it is."""

    __tablename__ = "component_artifacts"
    __table_args__ = (
        ForeignKeyConstraint(
            ["name", "version"],
            ["component_versions.name", "component_versions.version"],
            ondelete="CASCADE",
        ),
        Index("ix_component_artifacts_sha256", "sha256"),
    )

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    file: Mapped[str] = mapped_column(String(255), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), ForeignKey("component_blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)


# --- what the registry returns ------------------------------------------------------------


@dataclass(frozen=True)
class StoredBlob:
    """An artifact's bytes in the registry."""

    sha256: str
    size: int
    created: bool = False  # whether this call stored it (False: it was there already)

    @property
    def key(self) -> str:
        """Its object store key."""
        return BLOB_PREFIX + self.sha256


@dataclass(frozen=True)
class PublishedArtifact:
    """One file of a published version."""

    name: str
    version: str
    file: str
    sha256: str
    size: int

    @property
    def uri(self) -> str:
        """The URI the published recipe gives it."""
        return registry_uri(self.name, self.version, self.file)

    @property
    def ref(self) -> RegistryRef:
        return RegistryRef(self.name, self.version, self.file)

    @property
    def digest(self) -> str:
        """The SHA-256 as the recipe's ``Digest`` (base64)."""
        return base64.b64encode(bytes.fromhex(self.sha256)).decode("ascii")

    @property
    def key(self) -> str:
        """Its blob's object store key."""
        return BLOB_PREFIX + self.sha256


@dataclass(frozen=True)
class ComponentVersion:
    """A published component version."""

    name: str
    version: str
    description: str
    publisher: str
    recipe: dict[str, Any]  # as published: the document a hub receives
    recipe_sha256: str
    created_at: datetime
    artifacts: tuple[PublishedArtifact, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of all its artifacts."""
        return sum(a.size for a in self.artifacts)


@dataclass(frozen=True)
class Published:
    """The outcome of a publish: the version, and whether this call created it."""

    version: ComponentVersion
    created: bool


@dataclass(frozen=True)
class ComponentSummary:
    """A component: its versions (newest first) and the newest one's description."""

    name: str
    versions: tuple[str, ...]
    description: str
    publisher: str
    updated_at: datetime

    @property
    def latest(self) -> str:
        return self.versions[0]


@dataclass(frozen=True)
class SignedArtifact:
    """A signed download link for one artifact."""

    file: str
    uri: str
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class DownloadLinks:
    """What a hub needs to install one version: the recipe and signed links to fetch it."""

    name: str
    version: str
    thing: str
    expires_at: datetime
    recipe: dict[str, Any]
    recipe_url: str
    artifacts: tuple[SignedArtifact, ...]

    def urls(self) -> dict[str, str]:
        """Artifact URI → signed URL, as the hub's fetcher takes them."""
        return {a.uri: a.url for a in self.artifacts}

    def to_json(self) -> dict[str, Any]:
        """The form a job document carries."""
        return {
            "componentName": self.name,
            "componentVersion": self.version,
            "thingName": self.thing,
            "expiresAt": self.expires_at.isoformat(),
            "recipeUrl": self.recipe_url,
            "artifacts": [
                {"file": a.file, "uri": a.uri, "url": a.url, "sha256": a.sha256, "size": a.size}
                for a in self.artifacts
            ],
        }


@dataclass(frozen=True)
class GarbageCollected:
    """What ``collect_garbage`` removed."""

    blobs: int = 0
    bytes_freed: int = 0


# --- the registry -------------------------------------------------------------------------


@dataclass
class _Resolved:
    """A recipe's artifacts mapped to blobs, and the recipe as it will be published."""

    recipe: Recipe
    document: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256


class ComponentRegistry:
    """Published component versions over a migrated ``Database`` and an ``ObjectStore``."""

    def __init__(
        self,
        db: Database,
        objects: ObjectStore,
        signer: UrlSigner,
        *,
        clock: Callable[[], datetime] = utcnow,
        blob_grace: timedelta = DEFAULT_BLOB_GRACE,
    ) -> None:
        self.db = db
        self.objects = objects
        self.signer = signer
        self.clock = clock
        self.blob_grace = blob_grace
        self._in_use: list[InUseCheck] = []
        self._lock = threading.Lock()

    # == in-use checks ====================================================================

    def add_in_use_check(self, check: InUseCheck) -> Callable[[], None]:
        """Register a check that ``delete`` consults; returns a function that removes it."""
        with self._lock:
            self._in_use.append(check)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._in_use.remove(check)

        return remove

    def in_use_by(self, name: str, version: str) -> str | None:
        """The deployment that uses a version, by the first registered check that says so."""
        with self._lock:
            checks = list(self._in_use)
        for check in checks:
            user = check(name, version)
            if user:
                return user
        return None

    # == blobs ============================================================================

    def put_blob(self, data: bytes, *, expected_sha256: str | None = None) -> StoredBlob:
        """Store bytes under their SHA-256 (idempotent); ``expected_sha256`` is checked."""
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise ArtifactError(
                f"the upload's SHA-256 is {sha}, not {expected_sha256}: it was corrupted "
                "or truncated on the way; upload it again",
                field="sha256",
            )
        # The row first, then the object: a fresh stored_at keeps the GC away from the
        # blob until a publish has had time to use it.
        created = self._stamp_blob(sha, len(data))
        key = BLOB_PREFIX + sha
        info = self.objects.head(key)
        if info is None or info.size != len(data):
            self.objects.put(key, data)
            created = True
        return StoredBlob(sha, len(data), created)

    def put_blob_file(self, path: Path, *, source: str | None = None) -> StoredBlob:
        """Store a file's bytes under their SHA-256."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ArtifactError(
                f"cannot read {path}: {err.strerror or err}", source=source or str(path)
            ) from err
        return self.put_blob(data)

    def get_blob(self, sha256: str) -> StoredBlob | None:
        """A stored blob, or None when the registry does not have it (whole)."""
        _check_sha256(sha256)
        with self.db.read() as session:
            row = session.get(ComponentBlobRow, sha256)
            size = None if row is None else row.size
        if size is None:
            return None
        info = self.objects.head(BLOB_PREFIX + sha256)
        if info is None or info.size != size:
            return None
        return StoredBlob(sha256, size)

    def _stamp_blob(self, sha: str, size: int) -> bool:
        now = self._now()
        with self.db.write() as session:
            row = session.get(ComponentBlobRow, sha)
            if row is None:
                session.add(ComponentBlobRow(sha256=sha, size=size, stored_at=now))
                return True
            row.stored_at = now
            return False

    # == publishing =======================================================================

    def publish_dir(self, recipe_path: Path, artifacts_dir: Path | None) -> Published:
        """Publish a recipe file with its artifacts from a folder.

        Each artifact is looked for as ``<dir>/<file>``, then as
        ``<dir>/<name>/<version>/<file>`` (the layout of ``edgeloop device deploy
        --artifact-dir``). An artifact whose URI is already the registry's may be left out.
        """
        source = str(recipe_path)
        fmt = _SUFFIXES.get(recipe_path.suffix.lower())
        if fmt is None:
            raise RecipeError(
                f"unsupported recipe file type {recipe_path.suffix!r}: use .json, .yaml or .yml",
                source=source,
            )
        try:
            data = recipe_path.read_bytes()
        except OSError as err:
            raise RecipeError(f"cannot read it: {err.strerror or err}", source=source) from err
        recipe = parse_recipe(data, source=source, fmt=fmt)
        if artifacts_dir is not None and not artifacts_dir.is_dir():
            raise ArtifactError(f"{artifacts_dir} is not a folder", field="--artifacts")
        uploaded: dict[str, str] = {}
        for path, artifact in _artifact_paths(recipe.raw):
            file = _file_name(artifact)
            if file in uploaded:
                continue
            local = _find_local(artifacts_dir, recipe, file)
            if local is None:
                if _registry_uri(artifact):
                    continue  # published before: publish() finds its blob
                where = (
                    f"put it in {artifacts_dir} (as {file}, or "
                    f"{recipe.name}/{recipe.version}/{file})"
                    if artifacts_dir is not None
                    else "give the folder that holds it (--artifacts DIR)"
                )
                raise ArtifactError(
                    f"artifact file {file!r} is not there: {where}",
                    source=source,
                    field=f"{path}.{_key(artifact, 'Uri')}",
                )
            uploaded[file] = self.put_blob_file(local, source=source).sha256
        return self.publish(data, source=source, artifacts=uploaded, fmt=fmt)

    def publish(
        self,
        recipe: str | bytes | Mapping[str, Any],
        *,
        source: str,
        artifacts: Mapping[str, str],
        fmt: Literal["json", "yaml"] | None = None,
    ) -> Published:
        """Publish a recipe whose artifacts are blobs already stored (``put_blob``).

        ``artifacts`` maps each artifact's file name to its blob's SHA-256; an artifact
        whose URI is already ``edgeloop://components/...`` may instead name a published
        version's file. Raises RecipeError / ArtifactError naming the field, and
        ConflictError when the version exists with different content.
        """
        parsed = parse_recipe(recipe, source=source, fmt=fmt)
        resolved = self._resolve(parsed, artifacts, source)
        try:
            published = json.loads(json.dumps(resolved.document, ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise RecipeError(
                f"the recipe has a value JSON cannot hold ({err})", source=source
            ) from err
        # The rewritten recipe must still be one the hub accepts.
        final = parse_recipe(published, source=source)
        digest = hashlib.sha256(_canonical(published)).hexdigest()
        shas = sorted(set(resolved.files.values()))
        missing = [sha for sha in shas if self.get_blob(sha) is None]
        if missing:
            file = next(f for f, s in resolved.files.items() if s == missing[0])
            raise ArtifactError(
                f"the registry has no blob {missing[0]} for artifact {file!r}: upload it "
                "first (PUT .../components/blobs/<sha256>)",
                source=source,
                field=f"artifacts.{file}",
            )
        name, version = final.name, str(final.version)
        now = self._now()
        try:
            with self.db.write() as session:
                existing = session.get(ComponentVersionRow, (name, version))
                if existing is not None:
                    return Published(self._check_identical(session, existing, digest), False)
                # Re-stamped in this transaction: the GC cannot have taken them meanwhile,
                # and cannot until this version's rows hold them.
                stamped = session.execute(
                    update(ComponentBlobRow)
                    .where(ComponentBlobRow.sha256.in_(shas))
                    .values(stored_at=now)
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                if stamped != len(shas):
                    raise ArtifactError(
                        "an artifact's blob was removed while publishing; publish again",
                        source=source,
                    )
                # (Not dict(result): a Result has keys(), so dict() reads it as a mapping.)
                sizes: dict[str, int] = {
                    sha: size
                    for sha, size in session.execute(
                        select(ComponentBlobRow.sha256, ComponentBlobRow.size).where(
                            ComponentBlobRow.sha256.in_(shas)
                        )
                    )
                }
                row = ComponentVersionRow(
                    name=name,
                    version=version,
                    description=final.description,
                    publisher=final.publisher,
                    recipe=published,
                    recipe_sha256=digest,
                    created_at=now,
                )
                session.add(row)
                session.flush()
                rows = [
                    ComponentArtifactRow(
                        name=name, version=version, file=file, sha256=sha, size=sizes[sha]
                    )
                    for file, sha in sorted(resolved.files.items())
                ]
                session.add_all(rows)
                session.add(
                    EventRow(
                        at=now,
                        kind="component.published",
                        subject=f"component:{name}@{version}",
                        detail={"recipeSha256": digest, "artifacts": dict(resolved.files)},
                    )
                )
                result = _version(row, rows)
        except IntegrityError:
            # Published at the same moment by another request: same content is fine.
            with self.db.read() as session:
                existing = session.get(ComponentVersionRow, (name, version))
                if existing is None:
                    raise
                return Published(self._check_identical(session, existing, digest), False)
        return Published(result, True)

    def _check_identical(
        self, session: Session, existing: ComponentVersionRow, digest: str
    ) -> ComponentVersion:
        if existing.recipe_sha256 != digest:
            raise ConflictError(
                f"{existing.name} {existing.version} is already published with different "
                "content; component versions are immutable: publish the change as a new "
                "version"
            )
        return _version(existing, self._artifact_rows(session, existing.name, existing.version))

    def _resolve(self, recipe: Recipe, uploaded: Mapping[str, str], source: str) -> _Resolved:
        """Map every artifact to a blob, check stated digests, and rewrite the URIs."""
        for file, given in uploaded.items():
            _check_sha256(given, field=f"artifacts.{file}")
        document = copy.deepcopy(dict(recipe.raw))
        resolved = _Resolved(recipe, document)
        name, version = recipe.name, str(recipe.version)
        named: set[str] = set()
        for path, artifact in _artifact_paths(document):
            file = _file_name(artifact)
            named.add(file)
            uri_field = f"{path}.{_key(artifact, 'Uri')}"
            sha = uploaded.get(file) or self._published_blob(artifact, file, source, uri_field)
            if resolved.files.setdefault(file, sha) != sha:
                raise ArtifactError(
                    f"two artifacts named {file!r} refer to different content; one version "
                    "holds one file of each name",
                    source=source,
                    field=uri_field,
                )
            self._check_stated_digest(artifact, file, sha, source, path)
            _set(artifact, "Uri", registry_uri(name, version, file))
            _set(artifact, "Digest", base64.b64encode(bytes.fromhex(sha)).decode("ascii"))
            _set(artifact, "Algorithm", "SHA-256")
        extra = sorted(set(uploaded) - named)
        if extra:
            raise ArtifactError(
                f"{extra[0]!r} was uploaded but the recipe names no artifact of that file name",
                source=source,
                field=f"artifacts.{extra[0]}",
            )
        return resolved

    def _published_blob(
        self, artifact: dict[str, Any], file: str, source: str, uri_field: str
    ) -> str:
        uri = str(_get(artifact, "Uri"))
        if not is_registry_uri(uri):
            raise ArtifactError(
                f"artifact file {file!r} was not uploaded: give it with the recipe "
                "(--artifacts DIR)",
                source=source,
                field=uri_field,
            )
        try:
            ref = parse_registry_uri(uri)
        except ValueError as err:
            raise ArtifactError(str(err), source=source, field=uri_field) from None
        with self.db.read() as session:
            row = session.get(ComponentArtifactRow, (ref.name, ref.version, ref.file))
            sha = None if row is None else row.sha256
        if sha is None:
            raise ArtifactError(
                f"{uri} is not in the registry: publish {ref.name} {ref.version} first, or "
                "give the file with the recipe (--artifacts DIR)",
                source=source,
                field=uri_field,
            )
        return sha

    def _check_stated_digest(
        self, artifact: dict[str, Any], file: str, sha: str, source: str, path: str
    ) -> None:
        stated = _get(artifact, "Digest")
        if stated is None:
            return
        algorithm = str(_get(artifact, "Algorithm") or "SHA-256").upper()
        hash_name = {"SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}.get(
            algorithm, "sha1"
        )
        if hash_name == "sha256":
            actual = bytes.fromhex(sha)
        else:
            hasher = hashlib.new(hash_name)
            hasher.update(self.objects.get(BLOB_PREFIX + sha))
            actual = hasher.digest()
        expected = base64.b64decode(str(stated))  # the parser checked it is base64
        if actual != expected:
            raise ArtifactError(
                f"digest mismatch for {file!r}: the recipe says {algorithm} {stated}, the "
                f"file has {base64.b64encode(actual).decode('ascii')}; the file or the "
                "recipe is out of date",
                source=source,
                field=f"{path}.{_key(artifact, 'Digest')}",
            )

    # == reading ==========================================================================

    def list_components(self, *, prefix: str = "") -> list[ComponentSummary]:
        """Every component, in name order, with its versions newest first."""
        statement = select(
            ComponentVersionRow.name,
            ComponentVersionRow.version,
            ComponentVersionRow.description,
            ComponentVersionRow.publisher,
            ComponentVersionRow.created_at,
        ).order_by(ComponentVersionRow.name)
        if prefix:
            statement = statement.where(
                ComponentVersionRow.name.startswith(prefix, autoescape=True)
            )
        by_name: dict[str, list[tuple[str, str, str, datetime]]] = {}
        with self.db.read() as session:
            for name, version, description, publisher, created in session.execute(statement):
                by_name.setdefault(name, []).append((version, description, publisher, created))
        summaries = []
        for name, rows in by_name.items():
            rows.sort(key=lambda r: _newest_first(r[0]), reverse=True)
            summaries.append(
                ComponentSummary(
                    name=name,
                    versions=tuple(r[0] for r in rows),
                    description=rows[0][1],
                    publisher=rows[0][2],
                    updated_at=max(r[3] for r in rows),
                )
            )
        return summaries

    def versions(self, name: str) -> list[ComponentVersion]:
        """Every published version of a component, newest first; NotFoundError if none."""
        with self.db.read() as session:
            rows = list(
                session.scalars(select(ComponentVersionRow).where(ComponentVersionRow.name == name))
            )
            artifacts = list(
                session.scalars(
                    select(ComponentArtifactRow)
                    .where(ComponentArtifactRow.name == name)
                    .order_by(ComponentArtifactRow.file)
                )
            )
        if not rows:
            raise NotFoundError("component", name, _PUBLISH_HINT)
        files: dict[str, list[ComponentArtifactRow]] = {}
        for artifact in artifacts:
            files.setdefault(artifact.version, []).append(artifact)
        rows.sort(key=lambda r: _newest_first(r.version), reverse=True)
        return [_version(row, files.get(row.version, [])) for row in rows]

    def get(self, name: str, version: str | None = None) -> ComponentVersion:
        """One published version (the newest when ``version`` is None)."""
        if version is None:
            return self.versions(name)[0]
        with self.db.read() as session:
            row = session.get(ComponentVersionRow, (name, version))
            if row is None:
                raise self._not_found(session, name, version)
            return _version(row, self._artifact_rows(session, name, version))

    def artifact(self, name: str, version: str, file: str) -> PublishedArtifact:
        """One file of a published version."""
        with self.db.read() as session:
            row = session.get(ComponentArtifactRow, (name, version, file))
            if row is None:
                if session.get(ComponentVersionRow, (name, version)) is None:
                    raise self._not_found(session, name, version)
                raise NotFoundError("artifact", file, f"of {name} {version}")
            return _artifact(row)

    def read(
        self, artifact: PublishedArtifact, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """The artifact's bytes ``[start, end)`` in chunks, straight from the object store."""
        stop = artifact.size if end is None else min(end, artifact.size)
        position = start
        while position < stop:
            chunk = self.objects.get(artifact.key, start=position, end=min(stop, position + _CHUNK))
            if not chunk:
                raise ArtifactError(
                    f"the object store ended {artifact.key} at {position} of {artifact.size} bytes",
                    field=artifact.file,
                )
            yield chunk
            position += len(chunk)

    def _artifact_rows(
        self, session: Session, name: str, version: str
    ) -> list[ComponentArtifactRow]:
        return list(
            session.scalars(
                select(ComponentArtifactRow)
                .where(ComponentArtifactRow.name == name, ComponentArtifactRow.version == version)
                .order_by(ComponentArtifactRow.file)
            )
        )

    def _not_found(self, session: Session, name: str, version: str) -> NotFoundError:
        known = session.scalar(select(exists().where(ComponentVersionRow.name == name)))
        if known:
            return NotFoundError("version", version, f"of component {name}")
        return NotFoundError("component", name, _PUBLISH_HINT)

    # == deleting =========================================================================

    def delete(self, name: str, version: str) -> ComponentVersion:
        """Delete a version unless a deployment uses it; its unused blobs go after the grace.

        ConflictError names the deployment that uses it. The checks are asked before the
        write transaction opens, because they read the database themselves (and an
        in-memory SQLite database has one connection, which cannot nest transactions); a
        deployment engine that must not race a delete checks the version inside its own
        write, or holds it by a foreign key, which turns this delete into a ConflictError.
        """
        self.get(name, version)  # NotFoundError before asking anyone
        user = self.in_use_by(name, version)
        if user:
            raise ConflictError(
                f"{name} {version} is in use by deployment {user}; cancel or replace that "
                "deployment first"
            )
        try:
            with self.db.write() as session:
                row = session.get(ComponentVersionRow, (name, version), with_for_update=True)
                if row is None:
                    raise self._not_found(session, name, version)
                artifacts = self._artifact_rows(session, name, version)
                removed = _version(row, artifacts)
                session.execute(
                    delete(ComponentArtifactRow).where(
                        ComponentArtifactRow.name == name, ComponentArtifactRow.version == version
                    )
                )
                session.delete(row)
                session.add(
                    EventRow(
                        at=self._now(),
                        kind="component.deleted",
                        subject=f"component:{name}@{version}",
                        detail={"recipeSha256": row.recipe_sha256},
                    )
                )
        except IntegrityError as err:
            raise ConflictError(
                f"{name} {version} is still referenced ({err.orig}); it is in use"
            ) from err
        self.collect_garbage()
        return removed

    def collect_garbage(self, *, grace: timedelta | None = None) -> GarbageCollected:
        """Remove blobs no version uses and nobody stored or published within ``grace``."""
        cutoff = self._now() - (self.blob_grace if grace is None else grace)
        unused = ~exists().where(ComponentArtifactRow.sha256 == ComponentBlobRow.sha256)
        with self.db.write() as session:
            # Locked, so a publish re-stamping one of them waits, then sees it gone.
            rows = list(
                session.scalars(
                    select(ComponentBlobRow)
                    .where(ComponentBlobRow.stored_at < cutoff, unused)
                    .with_for_update()
                )
            )
            # Objects go before the rows commit: a blob stored again from now on gets a
            # new row only after this commit, and its object after that.
            for row in rows:
                self.objects.delete(BLOB_PREFIX + row.sha256)
            if rows:
                session.execute(
                    delete(ComponentBlobRow)
                    .where(ComponentBlobRow.sha256.in_([r.sha256 for r in rows]))
                    .execution_options(synchronize_session=False)
                )
        return GarbageCollected(blobs=len(rows), bytes_freed=sum(r.size for r in rows))

    # == signed links =====================================================================

    def links_for_thing(
        self,
        name: str,
        version: str,
        *,
        thing: str,
        base_url: str,
        lifetime: float = DEFAULT_LINK_LIFETIME,
    ) -> DownloadLinks:
        """Signed links to the recipe and artifacts of a version, for one thing.

        ``base_url`` is the cloud's API as the hub reaches it (``https://cloud:8440``).
        """
        check_lifetime(lifetime)
        published = self.get(name, version)
        base = base_url.rstrip("/")
        recipe_params = self.signer.sign(
            recipe_resource(name, version), thing=thing, lifetime=lifetime
        )
        artifacts = []
        for artifact in published.artifacts:
            params = self.signer.sign(
                artifact_resource(artifact.ref), thing=thing, lifetime=lifetime
            )
            artifacts.append(
                SignedArtifact(
                    file=artifact.file,
                    uri=artifact.uri,
                    url=f"{base}{artifact.ref.signed_path}?{urlencode(params)}",
                    sha256=artifact.sha256,
                    size=artifact.size,
                )
            )
        return DownloadLinks(
            name=name,
            version=version,
            thing=thing,
            expires_at=self.signer.expiry(recipe_params),
            recipe=published.recipe,
            recipe_url=f"{base}{signed_recipe_path(name, version)}?{urlencode(recipe_params)}",
            artifacts=tuple(artifacts),
        )

    # == internals ========================================================================

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise ValueError("the registry's clock must return timezone-aware times")
        return now


# --- recipe documents ---------------------------------------------------------------------


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _keys(mapping: Mapping[str, Any], name: str) -> list[str]:
    return [k for k in mapping if isinstance(k, str) and k.casefold() == name.casefold()]


def _key(mapping: Mapping[str, Any], name: str) -> str:
    """The key for ``name`` as the recipe spells it (recipe keys ignore case)."""
    keys = _keys(mapping, name)
    return keys[0] if keys else name


def _get(mapping: Mapping[str, Any], name: str) -> Any:
    keys = _keys(mapping, name)
    return mapping[keys[0]] if keys else None


def _set(mapping: dict[str, Any], name: str, value: Any) -> None:
    keys = _keys(mapping, name)
    mapping[keys[0] if keys else name] = value


def _artifact_paths(document: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every artifact mapping of a validated recipe, with its field path as spelled."""
    manifests_key = _key(document, "Manifests")
    for i, manifest in enumerate(document.get(manifests_key) or []):
        artifacts_key = _key(manifest, "Artifacts")
        for j, artifact in enumerate(manifest.get(artifacts_key) or []):
            yield f"{manifests_key}[{i}].{artifacts_key}[{j}]", artifact


def _file_name(artifact: Mapping[str, Any]) -> str:
    from edgeloop.core.recipe import Artifact

    return Artifact(uri=str(_get(artifact, "Uri"))).file_name


def _registry_uri(artifact: Mapping[str, Any]) -> bool:
    return is_registry_uri(str(_get(artifact, "Uri")))


def _find_local(folder: Path | None, recipe: Recipe, file: str) -> Path | None:
    if folder is None:
        return None
    for candidate in (folder / file, folder / recipe.name / str(recipe.version) / file):
        if candidate.is_file():
            return candidate
    return None


def _newest_first(version: str) -> tuple[Any, ...]:
    # Build metadata does not order versions; the text breaks the tie, for a stable order.
    return (Version.parse(version).precedence_key(), version)


def _check_sha256(sha: str, *, field: str = "sha256") -> str:
    if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
        raise ValidationError(
            f"{sha!r} is not a SHA-256 digest (64 lower-case hex digits)", field=field
        )
    return sha


def _artifact(row: ComponentArtifactRow) -> PublishedArtifact:
    return PublishedArtifact(row.name, row.version, row.file, row.sha256, row.size)


def _version(
    row: ComponentVersionRow, artifacts: Sequence[ComponentArtifactRow]
) -> ComponentVersion:
    return ComponentVersion(
        name=row.name,
        version=row.version,
        description=row.description,
        publisher=row.publisher,
        recipe=dict(row.recipe),
        recipe_sha256=row.recipe_sha256,
        created_at=row.created_at,
        artifacts=tuple(_artifact(a) for a in artifacts),
    )
