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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.core.config import ConfigurationUpdate, apply_update, upgrade_defaults
from edgeloop.core.errors import DeploymentError, EdgeloopError, RecipeError, ValidationError
from edgeloop.core.recipe import Recipe, current_platform, load_recipe_dir
from edgeloop.core.resolver import resolve
from edgeloop.core.semver import Range, Version
from edgeloop.edge.artifacts import ArtifactStore, local_fetch
from edgeloop.edge.ipc.events import ComponentEvents
from edgeloop.edge.lifecycle import State
from edgeloop.edge.recipes import RecipeStore
from edgeloop.edge.settings import BUILTIN_COMPONENTS, AgentSettings
from edgeloop.edge.store import HubState, HubStore, write_json_atomic
from edgeloop.edge.supervisor import ComponentSpec, Supervisor

log = logging.getLogger("edgeloop.deployments")

FAILURE_HANDLING = ("ROLLBACK", "DO_NOTHING")
UPDATE_POLICIES = ("NOTIFY_COMPONENTS", "SKIP_NOTIFY_COMPONENTS")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")


@dataclass(frozen=True)
class DeploymentRequest:
    """What a local deployment asks for (the Greengrass CLI's `deployment create`)."""

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
        }


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

    def _update(self, deployment_id: str, **changes: Any) -> None:
        record = self.get(deployment_id)
        if record is None:
            return
        record.update(changes)
        record["updatedAt"] = time.time()
        self._persist_records()

    def _persist_records(self) -> None:
        self.store.save_deployments(self.records)

    def recover_interrupted(self) -> str | None:
        """Mark a deployment that a crash interrupted as failed; returns its id."""
        inflight = self.store.inflight_path
        if not inflight.exists():
            return None
        doc = json.loads(inflight.read_text(encoding="utf-8"))
        deployment_id = str(doc.get("deploymentId"))
        self._fail(
            deployment_id,
            "FAILED_ROLLBACK_COMPLETE",
            "the agent stopped while the deployment was being applied; "
            "the hub is back on the last successful deployment",
        )
        for record in self.records:
            if record["status"] in ("QUEUED", "IN_PROGRESS"):
                record["status"] = "FAILED"
                record["detailedStatus"] = "FAILED_NO_STATE_CHANGE"
                record["failureCause"] = "the agent stopped before the deployment ran"
        self._persist_records()
        inflight.unlink()
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
        failure = await self._switch_and_watch(plan, request)
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
        self._fail(deployment_id, detailed, failure, components=components)

    def prepare(self, deployment_id: str, request: DeploymentRequest) -> Plan:
        """Validate and resolve a request into a plan; changes nothing on error."""
        new_recipes = load_recipe_dir(request.recipe_dir) if request.recipe_dir else []
        for recipe in new_recipes:
            self.recipes.check_immutable(recipe)
        known = self.recipes.all()
        for recipe in new_recipes:
            known[(recipe.name, str(recipe.version))] = recipe

        roots = dict(self.hub.roots)
        for name in request.remove:
            if name not in roots:
                raise DeploymentError(
                    f"cannot remove {name}: it is not a root component of this hub "
                    f"(roots: {', '.join(sorted(roots)) or 'none'})"
                )
            del roots[name]
        for name, version in request.merge.items():
            try:
                Version.parse(version)
            except ValueError as err:
                raise ValidationError(str(err), field=f"merge {name}={version}") from err
            if (name, version) not in known:
                raise DeploymentError(
                    f"no recipe for {name} {version}: give it in --recipe-dir "
                    f"(versions on this hub: {_versions_of(known, name) or 'none'})"
                )
            roots[name] = version

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

    async def _switch_and_watch(self, plan: Plan, request: DeploymentRequest) -> str | None:
        """Run the new set and watch it; returns why it failed, or None."""
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
                waiting = [
                    f"{n} ({self.supervisor.state_of(n)})"
                    for n in sorted(plan.touched)
                    if self.supervisor.runners[n].state not in (State.RUNNING, State.FINISHED)
                ]
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
