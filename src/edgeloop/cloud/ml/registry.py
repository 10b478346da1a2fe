"""The model registry: versions of trained models, and aliases with their history.

Tables (migration 0007)::

    ml_model_versions   name, version (1, 2, ... per name), appliance, scope ("kind" or
                        "device"), device ("<thing>/<kit>" for a device's own model),
                        metrics, params, dataset_hash, code_version, artifact_key,
                        artifact_sha256, artifact_size, created_by, created_at
    ml_aliases          name, alias -> version (the alias's current holder)
    ml_alias_history    id, name, alias, from_version, to_version, who, at, reason:
                        append-only, one row per change, never updated or deleted

A version is immutable once registered: its artifact (the model's JSON document, see
:mod:`edgeloop.ml.appliance_model`) is stored in the object store under
``ml/models/<name>/<version>/model.json`` before the version's row is written, and is
checked against its SHA-256 whenever it is read. An alias (``champion``, ``challenger``,
or any name of the same shape) points at one version of a model; moving it writes the
alias row and a history row in one transaction, so the history says who held which alias
when, and why.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, ForeignKeyConstraint, Index, Integer, String, Text, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from edgeloop import __version__
from edgeloop.cloud.db import Base, Database, EventRow, utcnow
from edgeloop.cloud.ml.dataset import DatasetRow
from edgeloop.cloud.objectstore import ObjectStore
from edgeloop.core.errors import ConflictError, NotFoundError, ValidationError

__all__ = [
    "ALIAS",
    "MODEL_NAME",
    "AliasChange",
    "AliasHistoryRow",
    "AliasRow",
    "ModelRegistry",
    "ModelSummary",
    "ModelVersion",
    "ModelVersionRow",
    "code_version",
]

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,95}")
ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,31}")
PREFIX = "ml/models/"
ARTIFACT = "model.json"
SCOPES = ("kind", "device")
_ID = BigInteger().with_variant(Integer(), "sqlite")


class ModelVersionRow(Base):
    """One registered version of a model."""

    __tablename__ = "ml_model_versions"
    __table_args__ = (Index("ix_ml_model_versions_appliance", "appliance"),)

    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    appliance: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    device: Mapped[str | None] = mapped_column(String(256))
    metrics: Mapped[dict[str, Any]]
    params: Mapped[dict[str, Any]]
    dataset_hash: Mapped[str] = mapped_column(String(64))
    code_version: Mapped[str] = mapped_column(String(128))
    artifact_key: Mapped[str] = mapped_column(String(512))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    artifact_size: Mapped[int] = mapped_column(BigInteger)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]


class AliasRow(Base):
    """Which version of a model holds an alias now."""

    __tablename__ = "ml_aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["name", "version"], ["ml_model_versions.name", "ml_model_versions.version"]
        ),
    )

    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class AliasHistoryRow(Base):
    """One change of an alias: append-only."""

    __tablename__ = "ml_alias_history"
    __table_args__ = (Index("ix_ml_alias_history_name_id", "name", "id"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(96))
    alias: Mapped[str] = mapped_column(String(32))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    who: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text, default="")


# --- what the registry returns ------------------------------------------------------------


@dataclass(frozen=True)
class ModelVersion:
    """A registered version of a model."""

    name: str
    version: int
    appliance: str
    scope: str
    device: str | None
    metrics: dict[str, Any]
    params: dict[str, Any]
    dataset_hash: str
    code_version: str
    artifact_key: str
    artifact_sha256: str
    artifact_size: int
    created_by: str
    created_at: datetime
    aliases: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "appliance": self.appliance,
            "scope": self.scope,
            "device": self.device,
            "metrics": self.metrics,
            "params": self.params,
            "datasetHash": self.dataset_hash,
            "codeVersion": self.code_version,
            "artifact": {
                "key": self.artifact_key,
                "sha256": self.artifact_sha256,
                "size": self.artifact_size,
            },
            "createdBy": self.created_by,
            "createdAt": self.created_at.isoformat(),
            "aliases": list(self.aliases),
        }


@dataclass(frozen=True)
class AliasChange:
    """One row of an alias's history."""

    name: str
    alias: str
    from_version: int | None
    to_version: int | None
    who: str
    at: datetime
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alias": self.alias,
            "fromVersion": self.from_version,
            "toVersion": self.to_version,
            "who": self.who,
            "at": self.at.isoformat(),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ModelSummary:
    """A model: its latest version and its aliases."""

    name: str
    appliance: str
    scope: str
    device: str | None
    latest: int
    versions: int
    aliases: dict[str, int]
    latest_metrics: dict[str, Any]
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "appliance": self.appliance,
            "scope": self.scope,
            "device": self.device,
            "latest": self.latest,
            "versions": self.versions,
            "aliases": self.aliases,
            "latestMetrics": self.latest_metrics,
            "updatedAt": self.updated_at.isoformat(),
        }


def code_version() -> str:
    """edgeloop's version, with ``git describe`` of its source tree when it has one."""
    root = Path(__file__).resolve().parents[4]
    if (root / ".git").exists():
        try:
            described = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.TimeoutExpired):
            return __version__
        if described.returncode == 0 and described.stdout.strip():
            return f"{__version__}+git.{described.stdout.strip()}"
    return __version__


def check_name(name: str, *, field: str = "name") -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ValidationError(
            f"{name!r} is not a model name: 1-96 lowercase letters, digits, '_', '.', '-', "
            "starting with a letter or digit",
            field=field,
        )
    return name


def check_alias(alias: str, *, field: str = "alias") -> str:
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias):
        raise ValidationError(
            f"{alias!r} is not an alias: 1-32 lowercase letters, digits, '_', '-', starting "
            "with a letter (champion, challenger, ...)",
            field=field,
        )
    return alias


class ModelRegistry:
    """Model versions, their artifacts and aliases, over a ``Database`` and an object store."""

    def __init__(self, db: Database, objects: ObjectStore) -> None:
        self.db = db
        self.objects = objects

    # -- versions ------------------------------------------------------------------------

    def register(
        self,
        name: str,
        *,
        artifact: bytes,
        appliance: str,
        scope: str = "kind",
        device: str | None = None,
        metrics: dict[str, Any],
        params: dict[str, Any],
        dataset_hash: str,
        code: str | None = None,
        created_by: str = "edgeloop",
    ) -> ModelVersion:
        """Store the artifact and register it as the model's next version."""
        check_name(name)
        if scope not in SCOPES:
            raise ValidationError(f"must be one of {', '.join(SCOPES)}", field="scope")
        sha = hashlib.sha256(artifact).hexdigest()
        with self.db.read() as session:
            if session.get(DatasetRow, dataset_hash) is None:
                # A version always names a dataset that can be fetched again.
                raise ValidationError(
                    f"no stored dataset has hash {dataset_hash!r}", field="dataset_hash"
                )
        for _ in range(5):  # another writer may take the same number: try the next
            with self.db.read() as session:
                latest = session.scalar(
                    select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name)
                )
            version = (latest or 0) + 1
            key = f"{PREFIX}{name}/{version}/{ARTIFACT}"
            self.objects.put(key, artifact)  # first: a row never names a missing artifact
            now = utcnow()
            row = ModelVersionRow(
                name=name,
                version=version,
                appliance=appliance,
                scope=scope,
                device=device,
                metrics=metrics,
                params=params,
                dataset_hash=dataset_hash,
                code_version=code or code_version(),
                artifact_key=key,
                artifact_sha256=sha,
                artifact_size=len(artifact),
                created_by=created_by,
                created_at=now,
            )
            try:
                with self.db.write() as session:
                    session.add(row)
                    session.add(
                        EventRow(
                            at=now,
                            kind="model.registered",
                            subject=f"model:{name}@{version}",
                            detail={"datasetHash": dataset_hash, "artifactSha256": sha},
                        )
                    )
                    session.flush()
                    return _version(row, ())
            except IntegrityError:
                continue
        raise ConflictError(f"could not number a new version of model {name!r}; try again")

    def list_models(self) -> list[ModelSummary]:
        """Every model, by name."""
        with self.db.read() as session:
            rows = session.scalars(
                select(ModelVersionRow).order_by(ModelVersionRow.name, ModelVersionRow.version)
            ).all()
            aliases = session.scalars(select(AliasRow)).all()
        held: dict[str, dict[str, int]] = {}
        for alias in aliases:
            held.setdefault(alias.name, {})[alias.alias] = alias.version
        by_name: dict[str, list[ModelVersionRow]] = {}
        for row in rows:
            by_name.setdefault(row.name, []).append(row)
        return [
            ModelSummary(
                name=name,
                appliance=versions[-1].appliance,
                scope=versions[-1].scope,
                device=versions[-1].device,
                latest=versions[-1].version,
                versions=len(versions),
                aliases=dict(sorted(held.get(name, {}).items())),
                latest_metrics=dict(versions[-1].metrics),
                updated_at=versions[-1].created_at,
            )
            for name, versions in by_name.items()
        ]

    def versions(self, name: str) -> list[ModelVersion]:
        """The model's versions, newest first (NotFoundError for an unknown model)."""
        check_name(name)
        with self.db.read() as session:
            rows = session.scalars(
                select(ModelVersionRow)
                .where(ModelVersionRow.name == name)
                .order_by(ModelVersionRow.version.desc())
            ).all()
            aliases = session.scalars(select(AliasRow).where(AliasRow.name == name)).all()
        if not rows:
            raise NotFoundError("model", name, "train one with: edgeloop cloud ml train")
        return [_version(row, _held(aliases, row.version)) for row in rows]

    def get(self, name: str, ref: int | str | None = None) -> ModelVersion:
        """A version by number, by alias, or the latest (``ref`` None or ``"latest"``)."""
        check_name(name)
        version = self.resolve(name, ref)
        with self.db.read() as session:
            row = session.get(ModelVersionRow, (name, version))
            if row is None:
                raise NotFoundError("model version", f"{name}@{version}")
            aliases = session.scalars(select(AliasRow).where(AliasRow.name == name)).all()
            return _version(row, _held(aliases, version))

    def resolve(self, name: str, ref: int | str | None) -> int:
        """The version number ``ref`` names: a number, an alias, or latest."""
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            if ref < 1:
                raise ValidationError("a version is a number from 1", field="version")
            return ref
        with self.db.read() as session:
            if ref is None or ref == "latest":
                latest = session.scalar(
                    select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name)
                )
                if latest is None:
                    raise NotFoundError("model", name, "train one with: edgeloop cloud ml train")
                return int(latest)
            check_alias(ref, field="version")
            alias = session.get(AliasRow, (name, ref))
            if alias is None:
                raise NotFoundError(
                    "alias",
                    f"{name}@{ref}",
                    f"promote a version: edgeloop cloud ml promote {name} VERSION --alias {ref}",
                )
            return alias.version

    def artifact(self, name: str, ref: int | str | None = None) -> bytes:
        """A version's artifact, checked against its SHA-256."""
        version = self.get(name, ref)
        data = self.objects.get(version.artifact_key)
        if hashlib.sha256(data).hexdigest() != version.artifact_sha256:
            raise ConflictError(
                f"the artifact of {name}@{version.version} ({version.artifact_key}) does not "
                "match its SHA-256: the object store copy was damaged"
            )
        return data

    # -- aliases -------------------------------------------------------------------------

    def set_alias(
        self, name: str, alias: str, version: int | str, *, who: str, reason: str = ""
    ) -> AliasChange:
        """Point ``alias`` at ``version`` (a number, or another alias's holder)."""
        check_name(name)
        check_alias(alias)
        target = self.get(name, version).version
        now = utcnow()
        with self.db.write() as session:
            current = session.get(AliasRow, (name, alias))
            previous = None if current is None else current.version
            if current is None:
                session.add(AliasRow(name=name, alias=alias, version=target, updated_at=now))
            else:
                current.version = target
                current.updated_at = now
            change = AliasHistoryRow(
                name=name,
                alias=alias,
                from_version=previous,
                to_version=target,
                who=who,
                at=now,
                reason=reason,
            )
            session.add(change)
            session.add(
                EventRow(
                    at=now,
                    kind="model.alias",
                    subject=f"model:{name}",
                    detail={"alias": alias, "from": previous, "to": target, "who": who},
                )
            )
        return AliasChange(name, alias, previous, target, who, now, reason)

    def remove_alias(self, name: str, alias: str, *, who: str, reason: str = "") -> AliasChange:
        """Take ``alias`` away from whichever version holds it."""
        check_name(name)
        check_alias(alias)
        now = utcnow()
        with self.db.write() as session:
            current = session.get(AliasRow, (name, alias))
            if current is None:
                raise NotFoundError("alias", f"{name}@{alias}")
            previous = current.version
            session.delete(current)
            session.add(
                AliasHistoryRow(
                    name=name,
                    alias=alias,
                    from_version=previous,
                    to_version=None,
                    who=who,
                    at=now,
                    reason=reason,
                )
            )
        return AliasChange(name, alias, previous, None, who, now, reason)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasChange]:
        """Every change of the model's aliases (or one alias's), oldest first."""
        check_name(name)
        query = select(AliasHistoryRow).where(AliasHistoryRow.name == name)
        if alias is not None:
            query = query.where(AliasHistoryRow.alias == check_alias(alias))
        with self.db.read() as session:
            rows = session.scalars(query.order_by(AliasHistoryRow.id)).all()
            return [
                AliasChange(
                    r.name, r.alias, r.from_version, r.to_version, r.who, r.at, r.reason or ""
                )
                for r in rows
            ]


def _held(aliases: Any, version: int) -> tuple[str, ...]:
    return tuple(sorted(a.alias for a in aliases if a.version == version))


def _version(row: ModelVersionRow, aliases: tuple[str, ...]) -> ModelVersion:
    return ModelVersion(
        name=row.name,
        version=row.version,
        appliance=row.appliance,
        scope=row.scope,
        device=row.device,
        metrics=dict(row.metrics),
        params=dict(row.params),
        dataset_hash=row.dataset_hash,
        code_version=row.code_version,
        artifact_key=row.artifact_key,
        artifact_sha256=row.artifact_sha256,
        artifact_size=row.artifact_size,
        created_by=row.created_by,
        created_at=row.created_at,
        aliases=aliases,
    )
