"""What the cloud's API and services share: one object built by `cloud up`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop.cloud.db import Database
from edgeloop.cloud.objectstore import ObjectStore
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.registry import Registry
from edgeloop.core.shadowbook import ShadowBook

if TYPE_CHECKING:
    from edgeloop.cloud.components import ComponentRegistry
    from edgeloop.cloud.deployments import DeploymentEngine
    from edgeloop.cloud.jobs import JobStore
    from edgeloop.cloud.lake import Lake
    from edgeloop.cloud.ml.service import MlLoop

log = logging.getLogger("edgeloop.cloud")

# Called after a certificate is revoked, so the broker refuses it from then on.
RevocationHook = Callable[[], Awaitable[None]]


async def _no_broker() -> None:
    log.info("no broker attached: the new CRL takes effect when the broker next starts")


@dataclass
class CloudContext:
    """The parts of a running cloud."""

    data_dir: Path
    db: Database
    registry: Registry
    ca: CertificateAuthority
    shadows: ShadowBook
    objects: ObjectStore
    revoked: RevocationHook = field(default=_no_broker)

    @classmethod
    def open(
        cls, data_dir: Path, *, db_url: str | None = None, objects: ObjectStore | None = None
    ) -> CloudContext:
        """Open (or create) an install: database migrated, CA ready, object store."""
        from edgeloop.cloud.objectstore import open_object_store

        data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(db_url) if db_url else Database.in_data_dir(data_dir)
        db.migrate()
        registry = Registry(db)
        return cls(
            data_dir=data_dir,
            db=db,
            registry=registry,
            ca=CertificateAuthority.open_or_create(data_dir / "ca"),
            shadows=ShadowBook(registry.shadow_storage()),
            objects=objects or open_object_store(data_dir),
        )

    @functools.cached_property
    def components(self) -> ComponentRegistry:
        """The component registry, with the install's URL-signing secret."""
        from edgeloop.cloud.components import ComponentRegistry
        from edgeloop.cloud.signing import UrlSigner

        return ComponentRegistry(self.db, self.objects, UrlSigner.in_data_dir(self.data_dir))

    @functools.cached_property
    def jobs(self) -> JobStore:
        """Jobs and their executions, shared by the API, the MQTT service and rollouts.

        One store per install: its listeners (the MQTT notifications) must hear every
        change, so the cloud's services touch it first, before serving anything.
        """
        from edgeloop.cloud.jobs import JobStore

        return JobStore(self.db)

    @functools.cached_property
    def deployments(self) -> DeploymentEngine:
        """Fleet deployments and their rollouts, over the jobs and the component registry."""
        from edgeloop.cloud.deployments import DeploymentEngine

        return DeploymentEngine(self.db, self.registry, self.jobs, self.components)

    @functools.cached_property
    def lake(self) -> Lake:
        """The telemetry lake: Parquet in the object store, its manifest in the database."""
        from edgeloop.cloud.lake import Lake

        return Lake(self.db, self.objects, cache_dir=self.data_dir / "lake-cache")

    @functools.cached_property
    def ml(self) -> MlLoop:
        """Dataset snapshots, the model registry, training runs and model packaging."""
        from edgeloop.cloud.ml.service import MlLoop

        return MlLoop(self.db, self.objects, self.lake, lambda: self.components)

    def crl_pem(self) -> bytes:
        """The CRL of every certificate revoked so far, signed by the issuing CA."""
        return self.ca.crl_pem(self.registry.revoked_serials())
