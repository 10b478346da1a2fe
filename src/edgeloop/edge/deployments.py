"""Local deployments: validate everything first, then apply, watch, and roll back on failure.

A deployment runs in two phases. *Prepare* reads the new recipes, resolves versions over
everything the hub runs, computes each component's configuration and stages artifacts;
any error there fails the deployment with ``FAILED_NO_STATE_CHANGE`` and the hub is as it
was. *Apply* switches the supervisor to the new set and watches every component the
deployment touched: it succeeds only when they are all RUNNING or FINISHED and stay so
through the health window. Otherwise, with failure handling ROLLBACK (the default), the
previous components and configuration come back by themselves. Only a successful
deployment is persisted as the hub's state, so after a crash the hub returns to the last
good one.

Targets. A hub runs the union of the latest deployment of each of its *targets*: every
thing group it belongs to and the thing itself (fleet deployments, applied by
``edgeloop.edge.fleet_jobs``), and ``LOCAL_DEPLOYMENT`` (``edgeloop device deploy`` and
the Greengrass CLI's IPC). A request with a ``target`` replaces that target's components;
one without changes the local target (merge and remove). The roots are recomputed as the
union (``edgeloop.core.deployment.union_roots``): a component two targets ask for at
different versions fails the deployment naming both, and a root no target asks for any
more is removed. The targets are saved in ``hub.json`` with the roots they explain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.core.config import ConfigurationUpdate, apply_update, upgrade_defaults
from edgeloop.core.deployment import union_roots
from edgeloop.core.errors import DeploymentError, EdgeloopError, RecipeError, ValidationError
from edgeloop.core.recipe import Recipe, current_platform, load_recipe_dir
from edgeloop.core.resolver import resolve
from edgeloop.core.semver import Range, Version
from edgeloop.edge.artifacts import ArtifactSpec, ArtifactStore, local_fetch
from edgeloop.edge.ipc.events import ComponentEvents
from edgeloop.edge.lifecycle import State
from edgeloop.edge.logs import tail_lines
from edgeloop.edge.recipes import RecipeStore
from edgeloop.edge.settings import BUILTIN_COMPONENTS, AgentSettings
from edgeloop.edge.store import LOCAL_TARGET, HubState, HubStore, write_json_atomic
from edgeloop.edge.supervisor import LOG_TAIL_LINES, ComponentSpec, Supervisor

log = logging.getLogger("edgeloop.deployments")

FAILURE_HANDLING = ("ROLLBACK", "DO_NOTHING")
UPDATE_POLICIES = ("NOTIFY_COMPONENTS", "SKIP_NOTIFY_COMPONENTS")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")


@dataclass(frozen=True)
class TargetDeployment:
    """The components one target (a thing group, or the thing) now asks this hub to run."""

    target: str
    deployment_id: str
    components: Mapping[str, str]  # name -> exact version
    job_id: str | None = None
    document: Mapping[str, Any] | None = None  # the job document, kept with the target

    def entry(self) -> dict[str, Any]:
        """The target's entry in ``HubState.targets``."""
        entry: dict[str, Any] = {
            "deploymentId": self.deployment_id,
            "components": dict(self.components),
        }
        if self.job_id is not None:
            entry["jobId"] = self.job_id
        if self.document is not None:
            entry["document"] = dict(self.document)
        return entry


@dataclass(frozen=True)
class DeploymentRequest:
    """What a deployment asks for: local (the Greengrass CLI's `deployment create`, which
    merges and removes), or one target's share of a fleet deployment (``target``)."""

    recipe_dir: Path | None = None
    artifact_dir: Path | None = None
    merge: Mapping[str, str] = field(default_factory=dict)  # name -> exact version
    remove: tuple[str, ...] = ()
    update_config: Mapping[str, ConfigurationUpdate] = field(default_factory=dict)
    failure_handling: str = "ROLLBACK"
    health_window: float | None = None
    timeout: float | None = None
    component_update_policy: str = "NOTIFY_COMPONENTS"
    notify_timeout: float = 60.0  # how long components may defer the update, in all
    validation_timeout: float = 30.0  # how long to wait for configuration validity reports
    target: TargetDeployment | None = None  # None: the local target
    # Fetches artifacts that are not staged yet (the fleet's downloads); None: artifact_dir.
    fetch: Callable[[ArtifactSpec], Path] | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """How the request is shown in the deployment's record."""
        return {
            "recipeDir": str(self.recipe_dir) if self.recipe_dir else None,
            "artifactDir": str(self.artifact_dir) if self.artifact_dir else None,
            "merge": dict(self.merge),
            "remove": list(self.remove),
            "updateConfig": {
                name: {"MERGE": u.merge, "RESET": list(u.reset)}
                for name, u in self.update_config.items()
            },
            "failureHandling": self.failure_handling,
            "healthWindow": self.health_window,
            "timeout": self.timeout,
            "componentUpdatePolicy": self.component_update_policy,
            "notifyTimeout": self.notify_timeout,
            "validationTimeout": self.validation_timeout,
            "target": None
            if self.target is None
            else {
                "target": self.target.target,
                "deploymentId": self.target.deployment_id,
                "jobId": self.target.job_id,
                "components": dict(self.target.components),
            },
        }


def next_targets(
    hub: HubState, request: DeploymentRequest, deployment_id: str
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The hub's targets after ``request``, and the roots they make (their union).

    DeploymentError when a removal names what the local target does not run, or when two
    targets ask for different versions of a component (naming both deployments).
    """
    targets = hub.target_roots()
    if request.target is not None:
        if request.target.target == LOCAL_TARGET:
            raise DeploymentError(f"{LOCAL_TARGET} is the hub's own target, not a fleet one")
        targets[request.target.target] = request.target.entry()
    else:
        local = dict(targets.get(LOCAL_TARGET, {}).get("components", {}))
        for name in request.remove:
            if name in local:
                del local[name]
                continue
            owner = next(
                (t for t, e in sorted(targets.items()) if name in e.get("components", {})), None
            )
            if owner is not None:
                raise DeploymentError(
                    f"cannot remove {name}: fleet deployment "
                    f"{targets[owner].get('deploymentId')} (target {owner}) runs it on this "
                    "hub; remove it from that deployment in the cloud"
                )
            raise DeploymentError(
                f"cannot remove {name}: it is not a root component of this hub "
                f"(roots: {', '.join(sorted(hub.roots)) or 'none'})"
            )
        local.update(request.merge)
        targets[LOCAL_TARGET] = {"deploymentId": deployment_id, "components": local}
    targets = {
        name: entry
        for name, entry in targets.items()
        if entry.get("components") or name != LOCAL_TARGET
    }
    roots = union_roots(
        {
            name: (str(entry.get("deploymentId") or name), dict(entry.get("components", {})))
            for name, entry in targets.items()
        }
    )
    return targets, roots


@dataclass
class Plan:
    """The outcome of the prepare phase: the hub's next state and what it touches."""

    state: HubState
    specs: dict[str, ComponentSpec]
    touched: set[str]
    restart: set[str]
    new_recipes: list[Recipe]


class Deployments:
    """The hub's deployment queue and engine."""

    def __init__(
        self,
        settings: AgentSettings,
        store: HubStore,
        recipes: RecipeStore,
        artifacts: ArtifactStore,
        supervisor: Supervisor,
        hub: HubState,
        events: ComponentEvents | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.recipes = recipes
        self.artifacts = artifacts
        self.supervisor = supervisor
        self.hub = hub  # the live state; runners read configuration from it
        self.events = events
        self.records: list[dict[str, Any]] = store.load_deployments()
        self._queue: asyncio.Queue[tuple[str, DeploymentRequest]] = asyncio.Queue()
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}

    # -- queue ------------------------------------------------------------------------
    def submit(self, request: DeploymentRequest) -> dict[str, Any]:
        """Queue a deployment and return its record."""
        if request.failure_handling not in FAILURE_HANDLING:
            raise ValidationError(
                f"must be one of {', '.join(FAILURE_HANDLING)}", field="failureHandling"
            )
        if request.component_update_policy not in UPDATE_POLICIES:
            raise ValidationError(
                f"must be one of {', '.join(UPDATE_POLICIES)}", field="componentUpdatePolicy"
            )
        deployment_id = str(uuid.uuid4())
        now = time.time()
        record: dict[str, Any] = {
            "deploymentId": deployment_id,
            "status": "QUEUED",
            "detailedStatus": None,
            "createdAt": now,
            "updatedAt": now,
            "request": request.to_json(),
            "failureCause": None,
            "components": [],
        }
        self.records.append(record)
        self._persist_records()
        self._queue.put_nowait((deployment_id, request))
        return record

    def get(self, deployment_id: str) -> dict[str, Any] | None:
        """One deployment's record."""
        found: dict[str, Any] | None = next(
            (rec for rec in reversed(self.records) if rec["deploymentId"] == deployment_id), None
        )
        return found

    async def wait(self, deployment_id: str) -> dict[str, Any]:
        """The deployment's record once it has ended."""
        record = self.get(deployment_id)
        if record is None:
            raise ValidationError(f"no deployment with id {deployment_id!r}", field="id")
        if record["status"] in TERMINAL:
            return record
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(deployment_id, []).append(future)
        return await future

    def _update(self, deployment_id: str, **changes: Any) -> None:
        record = self.get(deployment_id)
        if record is None:
            return
        record.update(changes)
        record["updatedAt"] = time.time()
        self._persist_records()
        if record["status"] in TERMINAL:
            for future in self._waiters.pop(deployment_id, []):
                if not future.done():
                    future.set_result(record)

    def _persist_records(self) -> None:
        self.store.save_deployments(self.records)

    def recover_interrupted(self) -> str | None:
        """Mark the deployments a crash interrupted as failed (``interrupted`` set in their
        records); returns the id of the one that was being applied, if one was."""
        inflight = self.store.inflight_path
        deployment_id = None
        if inflight.exists():
            doc = json.loads(inflight.read_text(encoding="utf-8"))
            deployment_id = str(doc.get("deploymentId"))
            self._fail(
                deployment_id,
                "FAILED_ROLLBACK_COMPLETE",
                "the agent stopped while the deployment was being applied; "
                "the hub is back on the last successful deployment",
                interrupted=True,
            )
        # Queued, or still preparing (nothing on the hub changed yet).
        pending = [r for r in self.records if r["status"] in ("QUEUED", "IN_PROGRESS")]
        for record in pending:
            record["status"] = "FAILED"
            record["detailedStatus"] = "FAILED_NO_STATE_CHANGE"
            record["failureCause"] = "the agent stopped before the deployment ran"
            record["interrupted"] = True
        if pending:
            self._persist_records()
        inflight.unlink(missing_ok=True)
        return deployment_id

    async def run(self) -> None:
        """Apply queued deployments one at a time, forever."""
        while True:
            deployment_id, request = await self._queue.get()
            try:
                await self._execute(deployment_id, request)
            except Exception as err:  # the queue must survive anything one deployment does
                log.exception("deployment %s crashed", deployment_id)
                self._fail(deployment_id, "FAILED_NO_STATE_CHANGE", f"internal error: {err}")

    def _fail(self, deployment_id: str, detailed: str, cause: str, **more: Any) -> None:
        self._update(
            deployment_id, status="FAILED", detailedStatus=detailed, failureCause=cause, **more
        )

    # -- one deployment ---------------------------------------------------------------
    async def _execute(self, deployment_id: str, request: DeploymentRequest) -> None:
        self._update(deployment_id, status="IN_PROGRESS")
        try:
            # Reading recipes and staging artifacts block on disk: keep the loop free.
            plan = await asyncio.to_thread(self.prepare, deployment_id, request)
        except EdgeloopError as err:
            self._fail(deployment_id, "FAILED_NO_STATE_CHANGE", str(err))
            return
        for name, runner in self.supervisor.runners.items():
            if name in plan.specs and runner.state is State.BROKEN:
                plan.restart.add(name)  # a deployment retries what is broken
                plan.touched.add(name)
        if self.events is not None:
            refusal = await self._ask_components(deployment_id, plan, request)
            if refusal:
                self._fail(deployment_id, "FAILED_NO_STATE_CHANGE", refusal)
                return
        previous = self.hub.copy()
        write_json_atomic(
            self.store.inflight_path,
            {"deploymentId": deployment_id, "previous": previous.to_json()},
        )
        failed: list[dict[str, Any]] = []
        failure = await self._switch_and_watch(plan, request, failed)
        if failure is None:
            self.store.save_hub(self.hub)
            self.store.inflight_path.unlink(missing_ok=True)
            self._update(
                deployment_id,
                status="SUCCEEDED",
                detailedStatus="SUCCESSFUL",
                components=self.supervisor.statuses(),
            )
            self._collect_garbage(previous)
            return
        components = self.supervisor.statuses()
        if request.failure_handling == "ROLLBACK":
            log.warning("deployment %s failed (%s); rolling back", deployment_id, failure)
            await self._rollback(previous, plan)
            detailed = "FAILED_ROLLBACK_COMPLETE"
        else:
            detailed = "FAILED_ROLLBACK_NOT_REQUESTED"
        self.store.inflight_path.unlink(missing_ok=True)
        self._fail(deployment_id, detailed, failure, components=components, failedComponents=failed)

    def prepare(self, deployment_id: str, request: DeploymentRequest) -> Plan:
        """Validate and resolve a request into a plan; changes nothing on error."""
        new_recipes = load_recipe_dir(request.recipe_dir) if request.recipe_dir else []
        for recipe in new_recipes:
            self.recipes.check_immutable(recipe)
        known = self.recipes.all()
        for recipe in new_recipes:
            known[(recipe.name, str(recipe.version))] = recipe

        asked = dict(request.target.components) if request.target else dict(request.merge)
        for name, version in asked.items():
            try:
                Version.parse(version)
            except ValueError as err:
                raise ValidationError(str(err), field=f"merge {name}={version}") from err
            if (name, version) not in known:
                raise DeploymentError(
                    f"no recipe for {name} {version}: give it in --recipe-dir "
                    f"(versions on this hub: {_versions_of(known, name) or 'none'})"
                )
        targets, roots = next_targets(self.hub, request, deployment_id)

        available: dict[str, list[Any]] = {}
        for recipe in known.values():
            available.setdefault(recipe.name, []).append(recipe.to_candidate())
        resolution = resolve(
            {name: Range.exact(Version.parse(v)) for name, v in roots.items()},
            available,
            preferred={n: Version.parse(v) for n, v in self.hub.versions.items()},
            builtins={n: Version.parse(v) for n, v in BUILTIN_COMPONENTS.items()},
        )
        for warning in resolution.warnings:
            log.warning("deployment %s: %s", deployment_id, warning)
        versions = {name: str(v) for name, v in resolution.versions.items()}

        for name in request.update_config:
            if name not in versions:
                raise ValidationError(
                    "configuration update for a component this deployment does not run",
                    field=f"updateConfig.{name}",
                )

        os_name, arch = current_platform()
        specs: dict[str, ComponentSpec] = {}
        configuration: dict[str, Any] = {}
        for name, version in versions.items():
            recipe = known[(name, version)]
            specs[name] = _spec(recipe, os_name, arch)
            defaults = dict(recipe.default_configuration)
            old_version = self.hub.versions.get(name)
            if name in self.hub.configuration and old_version is not None:
                tree = self.hub.configuration[name]
                if old_version != version:
                    old = known.get((name, old_version))
                    old_defaults = dict(old.default_configuration) if old else {}
                    tree = upgrade_defaults(tree, old_defaults, defaults)
            else:
                tree = defaults
            update = request.update_config.get(name)
            if update is not None:
                tree = apply_update(tree, defaults, update)
            configuration[name] = tree

        self._stage_artifacts(specs, request, versions)
        for recipe in new_recipes:
            self.recipes.save(recipe)

        state = HubState(
            deployment_id=deployment_id,
            roots=roots,
            versions=versions,
            configuration=configuration,
            targets=targets,
        )
        touched = {
            name
            for name in versions
            if self.hub.versions.get(name) != versions[name]
            or self.hub.configuration.get(name) != configuration[name]
            or name in request.merge
        }
        restart = {
            name
            for name in touched
            if name in self.hub.versions
            and self.hub.versions[name] == versions[name]
            and _uses_configuration(specs[name])
        }
        # A HARD dependent restarts when what it depends on changes, as in Greengrass.
        changed_versions = {n for n in versions if self.hub.versions.get(n) != versions[n]}
        for name, spec in specs.items():
            if set(spec.hard_deps) & (changed_versions | restart):
                restart.add(name)
                touched.add(name)
        return Plan(state, specs, touched, restart, new_recipes)

    def _stage_artifacts(
        self,
        specs: Mapping[str, ComponentSpec],
        request: DeploymentRequest,
        versions: Mapping[str, str],
    ) -> None:
        staged: list[tuple[str, str]] = []
        try:
            for name, spec in specs.items():
                version = versions[name]
                if self.artifacts.is_staged(name, version):
                    continue
                artifacts = spec.artifacts
                if not artifacts:
                    continue
                base = request.artifact_dir
                if request.fetch is not None:
                    self.artifacts.stage(
                        name, version, artifacts, request.fetch, source=spec.recipe.source
                    )
                    staged.append((name, version))
                    continue
                if base is None:
                    raise RecipeError(
                        f"{len(artifacts)} artifact(s) to fetch but no artifact folder given "
                        "(--artifact-dir)",
                        source=spec.recipe.source,
                        field="Manifests.Artifacts",
                    )

                fetch = local_fetch(base, name, version)
                self.artifacts.stage(name, version, artifacts, fetch, source=spec.recipe.source)
                staged.append((name, version))
        except EdgeloopError:
            for name, version in staged:  # nothing on the hub changes on a failed prepare
                self.artifacts.remove(name, version)
            raise

    async def _ask_components(
        self, deployment_id: str, plan: Plan, request: DeploymentRequest
    ) -> str | None:
        """Configuration validation, then update notices; returns why it must not go on."""
        assert self.events is not None
        proposed = {
            name: tree
            for name, tree in plan.state.configuration.items()
            if name in self.hub.configuration and self.hub.configuration[name] != tree
        }
        reports = await self.events.validate(deployment_id, proposed, request.validation_timeout)
        rejected = [
            f"{n} rejected its new configuration: {r.message or 'no reason given'}"
            for n, r in sorted(reports.items())
            if not r.accepted
        ]
        if rejected:
            return "\n".join(rejected)
        if request.component_update_policy == "NOTIFY_COMPONENTS":
            affected = [
                name
                for name, version in self.hub.versions.items()
                if plan.state.versions.get(name) != version or name in plan.restart
            ]
            for note in await self.events.before_update(
                deployment_id, affected, request.notify_timeout
            ):
                log.info("deployment %s: %s", deployment_id, note)
        return None

    async def _announce_configuration(self, old: HubState, new: HubState) -> None:
        if self.events is None:
            return
        for name, tree in new.configuration.items():
            if name in old.configuration and old.configuration[name] != tree:
                await self.events.configuration_changed(name, old.configuration[name], tree)

    async def _switch_and_watch(
        self, plan: Plan, request: DeploymentRequest, failed: list[dict[str, Any]]
    ) -> str | None:
        """Run the new set and watch it; returns why it failed, or None. ``failed`` gets
        each failing component: name, version, state, reason, exit code, last log lines."""
        failures: list[str] = []

        def on_change(name: str, old: State, new: State) -> None:
            if name in plan.touched and new in (State.ERRORED, State.BROKEN):
                runner = self.supervisor.runners.get(name)
                error = runner.last_error if runner else None
                detail = error.reason if error else new.value
                tail = "\n  ".join(error.log_tail) if error and error.log_tail else "(no output)"
                failures.append(
                    f"{name} {runner.spec.version if runner else ''} went {new.value}: "
                    f"{detail}; last log lines:\n  {tail}"
                )
                failed.append(
                    {
                        "name": name,
                        "version": runner.spec.version if runner else None,
                        "state": new.value,
                        "reason": detail,
                        "exitCode": error.exit_code if error else None,
                        "signal": error.signal if error else None,
                        "logTail": list(error.log_tail) if error else [],
                    }
                )

        before = self.hub.copy()
        self._adopt(plan.state)
        await self._announce_configuration(before, plan.state)
        self.supervisor.listeners.append(on_change)
        try:
            await self.supervisor.apply(plan.specs, plan.restart)
            if self.events is not None:
                await self.events.after_update(plan.state.deployment_id or "", list(plan.specs))
            timeout = request.timeout or self.settings.deployment_timeout
            window = (
                request.health_window
                if request.health_window is not None
                else self.settings.health_window
            )

            def settled() -> bool:
                return bool(failures) or all(
                    self.supervisor.runners[n].state in (State.RUNNING, State.FINISHED)
                    for n in plan.touched
                )

            if not await self.supervisor.wait_until(settled, timeout):
                stuck = [
                    self.supervisor.runners[n]
                    for n in sorted(plan.touched)
                    if self.supervisor.runners[n].state not in (State.RUNNING, State.FINISHED)
                ]
                for runner in stuck:
                    failed.append(
                        {
                            "name": runner.name,
                            "version": runner.spec.version,
                            "state": runner.state.value,
                            "reason": f"not RUNNING or FINISHED after {timeout:g} s",
                            "exitCode": None,
                            "signal": None,
                            "logTail": tail_lines(runner.log.path, LOG_TAIL_LINES),
                        }
                    )
                waiting = [f"{r.name} ({self.supervisor.state_of(r.name)})" for r in stuck]
                return f"timed out after {timeout:g} s waiting for {', '.join(waiting)}"
            if not failures:
                await self.supervisor.wait_until(lambda: bool(failures), window)
            return "\n".join(failures) if failures else None
        finally:
            self.supervisor.listeners.remove(on_change)

    async def _rollback(self, previous: HubState, plan: Plan) -> None:
        specs = specs_for(previous, self.recipes)
        failed = self.hub.copy()
        self._adopt(previous)
        await self._announce_configuration(failed, previous)
        restart = {n for n in plan.touched if n in specs}
        await self.supervisor.apply(specs, restart)
        await self.supervisor.wait_until(
            lambda: all(
                r.state in (State.RUNNING, State.FINISHED, State.ERRORED, State.BROKEN)
                for r in self.supervisor.runners.values()
            ),
            self.settings.deployment_timeout,
        )

    def _adopt(self, state: HubState) -> None:
        # The live HubState object is shared with the supervisor's configuration lookups.
        self.hub.deployment_id = state.deployment_id
        self.hub.roots = dict(state.roots)
        self.hub.versions = dict(state.versions)
        self.hub.configuration = dict(state.configuration)
        self.hub.targets = {name: dict(entry) for name, entry in state.targets.items()}

    def _collect_garbage(self, previous: HubState) -> None:
        # Keep the versions now running and the ones just replaced (for a manual rollback).
        keep = {*self.hub.versions.items(), *previous.versions.items()}
        try:
            self.artifacts.gc(keep)
        except OSError as err:
            log.warning("artifact clean-up failed: %s", err)


def specs_for(state: HubState, recipes: RecipeStore) -> dict[str, ComponentSpec]:
    """The component specs of a persisted hub state (at start-up and on rollback)."""
    os_name, arch = current_platform()
    specs = {}
    for name, version in state.versions.items():
        recipe = recipes.get(name, version)
        if recipe is None:
            log.error("the recipe of %s %s is missing from the hub's store", name, version)
            continue
        specs[name] = _spec(recipe, os_name, arch)
    return specs


def _spec(recipe: Recipe, os_name: str, arch: str) -> ComponentSpec:
    # The parser guarantees at least one manifest; none may fit this hub, though.
    manifest = recipe.select_manifest(os_name, arch)
    if manifest is None:
        raise RecipeError(
            f"no manifest matches this hub's platform (os {os_name}, architecture {arch})",
            source=recipe.source,
            field="Manifests",
        )
    lifecycle, artifacts = manifest.lifecycle, manifest.artifacts
    hard = tuple(n for n, d in recipe.dependencies.items() if d.hard)
    soft = tuple(n for n, d in recipe.dependencies.items() if not d.hard)
    return ComponentSpec(
        recipe=recipe, lifecycle=lifecycle, hard_deps=hard, soft_deps=soft, artifacts=artifacts
    )


def _uses_configuration(spec: ComponentSpec) -> bool:
    # Scripts that interpolate configuration must restart to see a new value; others
    # read configuration over IPC and are told of changes there.
    texts = list(spec.lifecycle.setenv.values())
    for step in spec.lifecycle.steps.values():
        texts += [step.script, *step.setenv.values()]
    return any(":configuration:" in text for text in texts)


def _versions_of(known: Mapping[tuple[str, str], Recipe], name: str) -> str:
    return ", ".join(sorted(v for (n, v) in known if n == name))
