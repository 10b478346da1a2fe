"""Fleet deployments: a target's components, rolled out in stages over jobs, with abort.

A deployment names a target — a thing group (static or dynamic) or one thing — and the
components it should run (Greengrass's CreateDeployment document, see
:mod:`edgeloop.core.deployment`). Creating one:

1. validates the document and checks that every component version is published;
2. orders the targets: the canary first (the first N, or the members of a canary group),
   then the hubs online now, then the others, so waves reach hubs that can act at once;
3. supersedes the target's current deployment (its queued executions are canceled: a hub
   runs the latest deployment of each of its targets), remembering the last good one as
   ``previous`` — what a fleet rollback returns to;
4. creates a CONTINUOUS job of the same id whose document is the hub's
   :class:`~edgeloop.core.deployment.JobDocument`; executions are added wave by wave.

The engine's :meth:`DeploymentEngine.tick` (once a second, from `cloud up`) feeds each
active rollout's execution counts to :func:`edgeloop.core.rollout.step` and applies the
decision: release a wave (``add_targets``), complete, or abort. On abort the job is
canceled (queued executions end CANCELED; running ones may finish) and every hub whose
execution SUCCEEDED — now or later — gets a rollback job carrying the previous
deployment's components (or none, when there was no previous one), so the fleet returns
to what it ran before. Hubs whose execution failed rolled back by themselves.

A dynamic or static group's later members get its latest deployment too (looked at every
``membership_interval`` seconds). Every step is recorded as an event of the deployment.

The engine is thread-safe: the API's worker threads and the ticking thread share one lock.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from edgeloop.cloud.components import ComponentRegistry
from edgeloop.cloud.db import Base, Database, utcnow
from edgeloop.cloud.jobs import JobStore
from edgeloop.cloud.registry import Registry
from edgeloop.core.deployment import (
    THING_TARGET_PREFIX,
    FleetDeployment,
    JobDocument,
    parse_deployment,
    thing_target,
)
from edgeloop.core.errors import ConflictError, NotFoundError, ResolutionError, ValidationError
from edgeloop.core.jobstate import ExecutionStatus
from edgeloop.core.recipe import parse_recipe
from edgeloop.core.resolver import Candidate, resolve
from edgeloop.core.rollout import Counts, RolloutConfig, RolloutState, start, step
from edgeloop.core.semver import Range, Version

__all__ = [
    "STATUSES",
    "Deployment",
    "DeploymentEngine",
    "DeploymentEvent",
    "parse_target_arn",
]

log = logging.getLogger("edgeloop.cloud.deployments")

STATUSES = ("ACTIVE", "PAUSED", "COMPLETED", "ABORTED", "CANCELED", "SUPERSEDED")
LIVE = ("ACTIVE", "PAUSED", "COMPLETED")  # the target's current deployment is one of these
_ROLLBACK_SUFFIX = "-rollback"
_ARN = re.compile(r"^(?:arn:aws[\w-]*:iot:[\w-]*:\d*:)?(thinggroup|thing)/([^/]+)$")


class DeploymentRow(Base):
    """A deployment: its document, rollout state, ordered targets and how far it got."""

    __tablename__ = "deployments"
    __table_args__ = (
        CheckConstraint(
            "status IN ('ACTIVE', 'PAUSED', 'COMPLETED', 'ABORTED', 'CANCELED', 'SUPERSEDED')",
            name="status",
        ),
        Index("ix_deployments_status", "status"),
        Index("ix_deployments_target_created_at", "target", "created_at"),
    )

    deployment_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    target: Mapped[str] = mapped_column(String(160))
    document: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    rollout: Mapped[dict[str, Any]]
    targets: Mapped[list[str]] = mapped_column(JSON)
    canary: Mapped[list[str]] = mapped_column(JSON)
    released: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    previous_id: Mapped[str | None] = mapped_column(String(64))
    rolled_back: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class DeploymentEventRow(Base):
    """Something that happened to a deployment: created, a wave, abort, rollback, …"""

    __tablename__ = "deployment_events"
    __table_args__ = (Index("ix_deployment_events_deployment_id", "deployment_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    deployment_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("deployments.deployment_id", ondelete="CASCADE")
    )
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]]


@dataclass(frozen=True)
class DeploymentEvent:
    """One recorded step."""

    at: datetime
    kind: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class Deployment:
    """A deployment as read, with its executions counted by status."""

    deployment_id: str
    name: str
    target: str
    status: str
    document: dict[str, Any]
    phase: str
    rate_per_minute: float
    targets: int
    released: int
    canary: tuple[str, ...]
    counts: Mapping[str, int]
    reason: str | None
    previous_id: str | None
    rollback_counts: Mapping[str, int] | None
    created_at: datetime
    updated_at: datetime

    @property
    def components(self) -> dict[str, str]:
        """Component name → version."""
        return {
            name: str(spec["componentVersion"])
            for name, spec in self.document.get("components", {}).items()
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "deploymentId": self.deployment_id,
            "deploymentName": self.name,
            "target": self.target,
            "status": self.status,
            "phase": self.phase,
            "ratePerMinute": self.rate_per_minute,
            "targets": self.targets,
            "released": self.released,
            "canary": list(self.canary),
            "executions": dict(self.counts),
            "reason": self.reason,
            "previousDeploymentId": self.previous_id,
            "rollback": dict(self.rollback_counts) if self.rollback_counts is not None else None,
            "components": self.components,
            "document": self.document,
            "createdAt": self.created_at.isoformat(),
            "updatedAt": self.updated_at.isoformat(),
        }


def parse_target_arn(arn: object) -> str:
    """The target a ``targetArn`` names: a group's name, or ``thing/<name>``."""
    if not isinstance(arn, str):
        raise ValidationError(
            "is required: arn:aws:iot:REGION:ACCOUNT:thinggroup/NAME (or thing/NAME), or just "
            "thinggroup/NAME or thing/NAME",
            field="targetArn",
        )
    match = _ARN.match(arn)
    if match is None:
        raise ValidationError(
            f"{arn!r} names no thing group or thing (thinggroup/NAME or thing/NAME)",
            field="targetArn",
        )
    kind, name = match.groups()
    return thing_target(name) if kind == "thing" else name


class DeploymentEngine:
    """Creates deployments and drives their rollouts; see the module docstring."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        jobs: JobStore,
        components: ComponentRegistry,
        *,
        clock: Callable[[], float] = time.time,
        membership_interval: float = 10.0,
    ) -> None:
        self.db = db
        self.registry = registry
        self.jobs = jobs
        self.components = components
        self.clock = clock
        self.membership_interval = membership_interval
        self.lock = threading.RLock()
        self._membership_checked = float("-inf")
        # A deployment's document never changes: its rollout is parsed once, not each tick.
        self._configs: dict[str, RolloutConfig] = {}
        self._unregister = components.add_in_use_check(self.in_use)

    # == the control side ==================================================================

    def create(self, document: Mapping[str, Any]) -> Deployment:
        """Create a deployment from a CreateDeployment body (``targetArn`` included).

        ValidationError names a bad field; NotFoundError an unknown target or component
        version. The first wave (or the canary) is released before this returns.
        """
        body = dict(document)
        target = parse_target_arn(body.get("targetArn"))
        deployment = parse_deployment(body)
        for name, component in deployment.components.items():
            self.components.get(name, component.version)  # NotFoundError names it
        dependencies = self._dependencies(deployment)
        things = self._target_things(target)
        if not things:
            raise ValidationError(
                f"target {target!r} has no things to deploy to", field="targetArn"
            )
        canary = self._canary(deployment, target, things)
        ordered = self._ordered(things, canary)
        deployment_id = str(uuid.uuid4())
        now = utcnow()
        with self.lock:
            previous, superseded = self._previous(target)
            state = start(deployment.rollout, len(canary))
            with self.db.write() as session:
                for row in superseded:
                    live = session.get(DeploymentRow, row)
                    if live is not None:
                        live.status = "SUPERSEDED"
                        live.updated_at = now
                        self._event(session, row, "superseded", {"by": deployment_id})
                session.add(
                    DeploymentRow(
                        deployment_id=deployment_id,
                        name=deployment.name,
                        target=target,
                        document=body,
                        status="ACTIVE",
                        rollout=_state_json(state),
                        targets=ordered,
                        canary=canary,
                        released=0,
                        reason=None,
                        previous_id=previous,
                        rolled_back=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                session.flush()  # the row before its events (no ORM relationship orders them)
                self._event(
                    session,
                    deployment_id,
                    "created",
                    {
                        "targets": len(ordered),
                        "canary": canary,
                        "previous": previous,
                        "components": {n: c.version for n, c in deployment.components.items()},
                    },
                )
            for old in superseded:
                self._cancel_job(old, f"superseded by deployment {deployment_id}")
            try:
                self.jobs.create_job(
                    deployment_id,
                    self._job_document(deployment_id, target, deployment, dependencies).to_json(),
                    description=f"deployment {deployment.name or deployment_id} to {target}",
                    in_progress_timeout_minutes=deployment.rollout.execution_timeout_minutes,
                    target_selection="CONTINUOUS",
                )
            except Exception:
                with self.db.write() as session:
                    made = session.get(DeploymentRow, deployment_id)
                    if made is not None:
                        session.delete(made)
                raise
            self._advance(deployment_id)
        return self.get(deployment_id)

    def pause(self, deployment_id: str) -> Deployment:
        """Stop releasing waves; hubs already notified carry on."""
        return self._set_status(deployment_id, "PAUSED", allowed=("ACTIVE",))

    def resume(self, deployment_id: str) -> Deployment:
        """Release waves again."""
        return self._set_status(deployment_id, "ACTIVE", allowed=("PAUSED",))

    def cancel(self, deployment_id: str, reason: str = "canceled by an operator") -> Deployment:
        """Stop the rollout for good: queued executions are canceled, hubs keep what they run."""
        deployment = self._set_status(
            deployment_id, "CANCELED", allowed=("ACTIVE", "PAUSED", "COMPLETED"), reason=reason
        )
        self._cancel_job(deployment_id, reason)
        return deployment

    # == reading ===========================================================================

    def get(self, deployment_id: str) -> Deployment:
        """A deployment with its counts; NotFoundError."""
        with self.db.read() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is None:
                raise NotFoundError("deployment", deployment_id)
            return self._deployment(row)

    def list_deployments(
        self, *, target: str | None = None, status: str | None = None
    ) -> list[Deployment]:
        """Deployments, newest first; only ``target``'s or those in ``status`` when given."""
        if status is not None and status not in STATUSES:
            raise ValidationError(
                f"{status!r} must be one of {', '.join(STATUSES)}", field="status"
            )
        query = select(DeploymentRow).order_by(
            DeploymentRow.created_at.desc(), DeploymentRow.deployment_id
        )
        if target is not None:
            query = query.where(DeploymentRow.target == target)
        if status is not None:
            query = query.where(DeploymentRow.status == status)
        with self.db.read() as session:
            return [self._deployment(row) for row in session.scalars(query)]

    def events(self, deployment_id: str) -> list[DeploymentEvent]:
        """What happened to a deployment, oldest first; NotFoundError."""
        with self.db.read() as session:
            if session.get(DeploymentRow, deployment_id) is None:
                raise NotFoundError("deployment", deployment_id)
            rows = session.scalars(
                select(DeploymentEventRow)
                .where(DeploymentEventRow.deployment_id == deployment_id)
                .order_by(DeploymentEventRow.id)
            )
            return [DeploymentEvent(r.at, r.kind, dict(r.detail)) for r in rows]

    def in_use(self, name: str, version: str) -> str | None:
        """The deployment that needs ``name`` at ``version`` (to run it, or to roll back to
        it), or None: such a version may not be deleted."""
        with self.db.read() as session:
            rows = list(
                session.scalars(
                    select(DeploymentRow).where(
                        DeploymentRow.status.in_([*LIVE, "ABORTED", "SUPERSEDED"])
                    )
                )
            )
        needed = {row.previous_id for row in rows if row.status in (*LIVE, "ABORTED")}
        for row in rows:
            if row.status in LIVE or row.deployment_id in needed:
                spec = row.document.get("components", {}).get(name)
                if isinstance(spec, dict) and spec.get("componentVersion") == version:
                    return row.deployment_id
        return None

    def may_download(self, thing: str, name: str, version: str) -> bool:
        """Whether one of ``thing``'s jobs names ``name`` at ``version``."""
        job_ids = {execution.job_id for execution in self.jobs.executions_for_thing(thing)}
        for job_id in job_ids:
            try:
                document = self.jobs.document(job_id)
            except NotFoundError:
                continue
            spec = document.get("components", {}).get(name)
            if isinstance(spec, dict) and spec.get("componentVersion") == version:
                return True
            if document.get("dependencies", {}).get(name) == version:
                return True
        return False

    # == the engine ========================================================================

    def tick(self) -> list[str]:
        """Advance every rollout that has work; returns the deployments that changed."""
        with self.db.read() as session:
            ids = list(
                session.scalars(
                    select(DeploymentRow.deployment_id).where(
                        DeploymentRow.status.in_(["ACTIVE", "ABORTED"])
                    )
                )
            )
        changed = [deployment_id for deployment_id in ids if self._advance(deployment_id)]
        if self.clock() - self._membership_checked >= self.membership_interval:
            self._membership_checked = self.clock()
            changed += self.follow_membership()
        return changed

    def follow_membership(self) -> list[str]:
        """Give things that joined a group since its deployment was made that deployment."""
        changed = []
        with self.db.read() as session:
            rows = [
                (row.deployment_id, row.target)
                for row in session.scalars(
                    select(DeploymentRow).where(DeploymentRow.status.in_(LIVE))
                )
                if not row.target.startswith(THING_TARGET_PREFIX)
            ]
        for deployment_id, group in rows:
            try:
                members = self.registry.group_members(group)
            except NotFoundError:
                continue
            with self.lock:
                with self.db.write() as session:
                    row = session.get(DeploymentRow, deployment_id)
                    if row is None or row.status not in LIVE:
                        continue
                    known = set(row.targets)
                    joined = [thing for thing in members if thing not in known]
                    if not joined:
                        continue
                    row.targets = [*row.targets, *joined]
                    row.updated_at = utcnow()
                    completed = row.status == "COMPLETED"
                    if completed:
                        row.released = len(row.targets)
                    self._event(session, deployment_id, "members-joined", {"things": joined[:50]})
                if completed:  # the rollout is over: newcomers get it at once
                    self.jobs.add_targets(deployment_id, joined)
                changed.append(deployment_id)
        return changed

    def _advance(self, deployment_id: str) -> bool:
        with self.lock:
            with self.db.read() as session:
                row = session.get(DeploymentRow, deployment_id)
                if row is None:
                    return False
                status, previous_id, row_target = row.status, row.previous_id, row.target
                targets, released = list(row.targets), row.released
                state = _state(row.rollout)
                document = dict(row.document)
            if status == "ABORTED":
                return self._roll_back_finished(deployment_id, previous_id)
            if status != "ACTIVE":
                return False
            config = self._rollout_config(deployment_id, document)
            counts = _counts(self.jobs.status_counts(deployment_id))
            pending = len(targets) - max(released, state.canary_targets)
            decision = step(config, state, counts, pending=pending, now=self.clock())
            wave: list[str] = []
            if decision.release:
                wave = targets[released : released + decision.release]
                if wave:
                    self.jobs.add_targets(deployment_id, wave)
            rolled_back: list[str] = []
            if decision.abort_reason is not None:
                # Queued hubs are skipped and the rollback is on its way before anyone
                # reading the deployment sees it ABORTED.
                log.warning("deployment %s aborted: %s", deployment_id, decision.abort_reason)
                self._cancel_job(deployment_id, decision.abort_reason)
                rolled_back = self._send_back(deployment_id, row_target, previous_id)
            with self.db.write() as session:
                row = session.get(DeploymentRow, deployment_id)
                if row is None:
                    return False
                row.rollout = _state_json(decision.state)
                row.released = released + len(wave)
                if wave:
                    row.updated_at = utcnow()
                    self._event(
                        session,
                        deployment_id,
                        "wave",
                        {
                            "phase": "canary" if decision.state.phase == "canary" else "rollout",
                            "size": len(wave),
                            "released": row.released,
                            "ratePerMinute": decision.state.rate_per_minute,
                        },
                    )
                if decision.abort_reason is not None:
                    row.status = "ABORTED"
                    row.reason = decision.abort_reason
                    row.rolled_back = len(rolled_back)
                    row.updated_at = utcnow()
                    self._event(
                        session,
                        deployment_id,
                        "aborted",
                        {"reason": decision.abort_reason, "executions": asdict(counts)},
                    )
                    self._event(
                        session,
                        deployment_id,
                        "rollback",
                        {"hubs": len(rolled_back), "total": len(rolled_back), "to": previous_id},
                    )
                elif decision.complete:
                    row.status = "COMPLETED"
                    row.updated_at = utcnow()
                    self._event(session, deployment_id, "completed", {"executions": asdict(counts)})
            return bool(wave) or decision.abort_reason is not None or decision.complete

    def _rollout_config(self, deployment_id: str, document: Mapping[str, Any]) -> RolloutConfig:
        config = self._configs.get(deployment_id)
        if config is None:
            config = self._configs[deployment_id] = parse_deployment(document).rollout
        return config

    def _roll_back_finished(self, deployment_id: str, previous_id: str | None) -> bool:
        """Send hubs that took an aborted version since the last look back as well."""
        succeeded = self.jobs.status_counts(deployment_id)[ExecutionStatus.SUCCEEDED]
        with self.db.read() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is None or row.rolled_back >= succeeded:
                return False
            target = row.target
        things = self._send_back(deployment_id, target, previous_id)
        with self.db.write() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is None:
                return False
            newly = len(things) - row.rolled_back
            row.rolled_back = len(things)
            row.updated_at = utcnow()
            self._event(
                session,
                deployment_id,
                "rollback",
                {"hubs": newly, "total": len(things), "to": previous_id},
            )
        return True

    def _send_back(self, deployment_id: str, target: str, previous_id: str | None) -> list[str]:
        """Queue the rollback job on every hub whose execution of ``deployment_id``
        SUCCEEDED (the job is made on first use); returns those hubs."""
        rollback_id = f"{deployment_id}{_ROLLBACK_SUFFIX}"
        try:
            self.jobs.describe_job(rollback_id)
        except NotFoundError:
            self.jobs.create_job(
                rollback_id,
                self._rollback_document(deployment_id, target, previous_id).to_json(),
                description=f"rollback of deployment {deployment_id} on {target}",
                target_selection="CONTINUOUS",
            )
        things = [
            execution.thing_name
            for execution in self.jobs.list_executions(
                deployment_id, status=ExecutionStatus.SUCCEEDED
            )
        ]
        if things:
            self.jobs.add_targets(rollback_id, things)
        return things

    # == internals =========================================================================

    def _target_things(self, target: str) -> list[str]:
        if target.startswith(THING_TARGET_PREFIX):
            thing = target[len(THING_TARGET_PREFIX) :]
            self.registry.get_thing(thing)  # NotFoundError names it
            return [thing]
        return self.registry.group_members(target)  # NotFoundError for an unknown group

    def _canary(self, deployment: FleetDeployment, target: str, things: list[str]) -> list[str]:
        rollout = deployment.rollout
        if rollout.canary_group is not None:
            members = set(self.registry.group_members(rollout.canary_group))
            canary = [thing for thing in things if thing in members]
            if not canary:
                raise ValidationError(
                    f"canary group {rollout.canary_group!r} holds none of target {target!r}'s "
                    "things",
                    field="iotJobConfiguration.canary.group",
                )
            return canary
        if rollout.canary_size:
            return self._ordered(things, [])[: rollout.canary_size]
        return []

    def _ordered(self, things: list[str], canary: list[str]) -> list[str]:
        """The canary, then things online now, then the rest, each in name order."""
        first = set(canary)
        online = set(self.registry.fleet_query("connectivity.connected:true"))
        rest = sorted(thing for thing in things if thing not in first)
        return [
            *canary,
            *(thing for thing in rest if thing in online),
            *(thing for thing in rest if thing not in online),
        ]

    def _previous(self, target: str) -> tuple[str | None, list[str]]:
        """The last good deployment on ``target`` (what a rollback returns to), and the
        live ones a new deployment supersedes."""
        with self.db.read() as session:
            rows = list(
                session.scalars(
                    select(DeploymentRow)
                    .where(DeploymentRow.target == target)
                    .order_by(DeploymentRow.created_at.desc())
                )
            )
        previous = next((row.deployment_id for row in rows if row.status != "ABORTED"), None)
        return previous, [row.deployment_id for row in rows if row.status in LIVE]

    def _job_document(
        self,
        deployment_id: str,
        target: str,
        deployment: FleetDeployment,
        dependencies: Mapping[str, str],
    ) -> JobDocument:
        return JobDocument(
            deployment_id=deployment_id,
            target=target,
            components=deployment.components,
            policies=deployment.policies,
            jitter_seconds=deployment.rollout.jitter_seconds,
            dependencies=dependencies,
        )

    def _dependencies(self, deployment: FleetDeployment) -> dict[str, str]:
        """The versions of the components' (transitive) dependencies, resolved over the
        registry as a hub would; dependencies the registry does not have are left to the
        hub (a component it runs, or provides itself). ValidationError on a clash."""
        available: dict[str, list[Candidate]] = {}
        unpublished: set[str] = set()
        waiting = list(deployment.components)
        while waiting:
            name = waiting.pop()
            if name in available or name in unpublished:
                continue
            try:
                versions = self.components.versions(name)
            except NotFoundError:
                unpublished.add(name)
                continue
            candidates = [
                parse_recipe(v.recipe, source=f"{name} {v.version}").to_candidate()
                for v in versions
            ]
            available[name] = candidates
            waiting.extend(dep for c in candidates for dep in c.dependencies)
        roots = {
            name: Range.exact(Version.parse(c.version)) for name, c in deployment.components.items()
        }
        try:
            resolution = resolve(
                roots, available, builtins={name: Version(0, 0, 0) for name in unpublished}
            )
        except ResolutionError as err:
            raise ValidationError(
                f"the components' dependencies cannot be satisfied from the registry: {err}",
                field="components",
            ) from None
        return {
            name: str(version)
            for name, version in sorted(resolution.versions.items())
            if name not in deployment.components
        }

    def _rollback_document(
        self, deployment_id: str, target: str, previous_id: str | None
    ) -> JobDocument:
        if previous_id is None:
            return JobDocument(
                f"{deployment_id}{_ROLLBACK_SUFFIX}", target, {}, rollback_of=deployment_id
            )
        with self.db.read() as session:
            row = session.get(DeploymentRow, previous_id)
            document = dict(row.document) if row is not None else {"components": {}}
        previous = parse_deployment(document)
        return JobDocument(
            previous_id,
            target,
            previous.components,
            previous.policies,
            previous.rollout.jitter_seconds,
            rollback_of=deployment_id,
        )

    def _cancel_job(self, job_id: str, reason: str) -> None:
        try:
            self.jobs.cancel_job(job_id, reason=reason[:1000])
        except (ConflictError, NotFoundError) as err:
            log.info("job %s not canceled: %s", job_id, err)

    def _set_status(
        self,
        deployment_id: str,
        status: str,
        *,
        allowed: Iterable[str],
        reason: str | None = None,
    ) -> Deployment:
        allowed = tuple(allowed)
        with self.lock, self.db.write() as session:
            row = session.get(DeploymentRow, deployment_id)
            if row is None:
                raise NotFoundError("deployment", deployment_id)
            if row.status not in allowed:
                raise ConflictError(
                    f"deployment {deployment_id} is {row.status}: it can become {status} only "
                    f"from {' or '.join(allowed)}"
                )
            row.status = status
            row.updated_at = utcnow()
            if reason is not None:
                row.reason = reason
            if status == "ACTIVE":  # a resumed rollout accrues from now, not from the pause
                state = _state(row.rollout)
                if state.last_tick is not None:
                    row.rollout = _state_json(
                        RolloutState(**{**asdict(state), "last_tick": self.clock()})
                    )
            self._event(session, deployment_id, status.lower(), {"reason": reason})
        return self.get(deployment_id)

    def _event(self, session: Any, deployment_id: str, kind: str, detail: dict[str, Any]) -> None:
        session.add(
            DeploymentEventRow(deployment_id=deployment_id, at=utcnow(), kind=kind, detail=detail)
        )

    def _deployment(self, row: DeploymentRow) -> Deployment:
        state = _state(row.rollout)
        try:
            counts = {str(k): v for k, v in self.jobs.status_counts(row.deployment_id).items()}
        except NotFoundError:
            counts = {}
        rollback: dict[str, int] | None = None
        if row.status == "ABORTED":
            try:
                rollback = {
                    str(k): v
                    for k, v in self.jobs.status_counts(
                        f"{row.deployment_id}{_ROLLBACK_SUFFIX}"
                    ).items()
                }
            except NotFoundError:
                rollback = {}
        return Deployment(
            deployment_id=row.deployment_id,
            name=row.name,
            target=row.target,
            status=row.status,
            document=dict(row.document),
            phase=state.phase,
            rate_per_minute=state.rate_per_minute,
            targets=len(row.targets),
            released=row.released,
            canary=tuple(row.canary),
            counts=counts,
            reason=row.reason,
            previous_id=row.previous_id,
            rollback_counts=rollback,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


def _counts(by_status: Mapping[ExecutionStatus, int]) -> Counts:
    return Counts(
        queued=by_status.get(ExecutionStatus.QUEUED, 0),
        in_progress=by_status.get(ExecutionStatus.IN_PROGRESS, 0),
        succeeded=by_status.get(ExecutionStatus.SUCCEEDED, 0),
        failed=by_status.get(ExecutionStatus.FAILED, 0),
        rejected=by_status.get(ExecutionStatus.REJECTED, 0),
        timed_out=by_status.get(ExecutionStatus.TIMED_OUT, 0),
        canceled=by_status.get(ExecutionStatus.CANCELED, 0),
        removed=by_status.get(ExecutionStatus.REMOVED, 0),
    )


def _state_json(state: RolloutState) -> dict[str, Any]:
    return asdict(state)


def _state(doc: Mapping[str, Any]) -> RolloutState:
    return RolloutState(**doc)
