"""The hub's side of fleet deployments: AWS IoT Jobs executions applied as local deployments.

A fleet deployment reaches a hub as a job execution whose ``jobDocument`` is a
``edgeloop.core.deployment.JobDocument`` (one target's components and policies). The hub
speaks AWS IoT Jobs' MQTT contract over its cloud link (``$aws/things/{thing}/jobs/...``):

- on every (re)connect, and whenever ``notify-next`` announces a job while it is idle, it
  asks ``start-next``; the execution it gets is IN_PROGRESS. It applies it, reports the
  outcome on ``{jobId}/update``, and asks ``start-next`` again until nothing is left. An
  offline hub needs nothing more: the cloud keeps its QUEUED executions for the next
  connect.
- applying one execution: parse the document (one that does not parse is FAILED with the
  parse error naming the field), wait a random delay in ``[0, jitterSeconds]``, download
  the recipes and artifacts of every component version the hub lacks (signed links from
  ``GET {cloud.api}/api/v1/things/{thing}/components/{name}/versions/{version}/downloads``;
  resumable and digest-checked by ``edgeloop.edge.fetch``), then submit a
  ``DeploymentRequest`` whose ``target`` replaces this target's components. The local
  machinery (``edgeloop.edge.deployments``) recomputes the roots as the union over the
  hub's targets, applies, watches the health window and rolls back by itself on failure.
  SUCCEEDED is reported only after the local deployment SUCCEEDED, that is after the
  health window.

Progress and outcome are told in ``statusDetails`` (AWS: at most 10 string pairs), short:

    IN_PROGRESS  step (waiting | downloading | deploying), deploymentId, target,
                 jitterSeconds, progress ("2/3 com.example.Model 1.2.0")
    SUCCEEDED    deploymentId, target, components ("a 1.0.0, b 2.1.0"), rollbackOf
    FAILED       reason (one line), step (document | download | deploy | agent),
                 deploymentId, target, detailedStatus (the local deployment's),
                 component, version, exitCode or signal, logTail (the component's last
                 3 output lines, " | "-joined)

State kept on the hub, in ``state/fleet-jobs.json`` (atomic writes): the execution being
worked on (``current``: job id, execution number, deployment, local deployment id once
submitted) and the outcome of the last executions (``outcomes``) until they are reported.
The targets' latest successful documents live in ``state/hub.json`` with the roots they
explain (``HubState.targets``), written in one piece by the local deployment.

Crash behaviour. The outcome is saved before it is reported, and an execution whose saved
outcome the cloud still shows IN_PROGRESS gets it reported again. An execution the agent
was working on when it died comes back from ``start-next`` as IN_PROGRESS; the local
deployment's record (after ``Deployments.recover_interrupted``) decides:

- it SUCCEEDED (the agent died before reporting): report SUCCEEDED;
- it was being applied: the hub is already back on its last good state, and the
  execution is reported FAILED ("the agent stopped while the deployment was being
  applied..."). It is not applied again by itself: a deployment that took the agent down
  may do so again, and retrying is the rollout's (or the operator's) decision;
- nothing had been applied yet (waiting, downloading, queued): it is applied again (the
  downloads continue where they stopped), at most ``MAX_RESUMES`` times.

No ``stepTimeoutInMinutes`` is asked for: downloads of a large model have no useful bound
that the hub could name in advance; the job's own ``inProgressTimeoutInMinutes`` applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import secrets
import shutil
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from edgeloop.core.deployment import JobDocument, parse_job_document, thing_target
from edgeloop.core.errors import CloudError, DeploymentError, EdgeloopError, ValidationError
from edgeloop.core.recipe import Recipe, current_platform, parse_recipe
from edgeloop.core.registry_uri import API_PREFIX, parse_registry_uri
from edgeloop.edge.artifacts import ArtifactSpec, ArtifactStore
from edgeloop.edge.deployments import DeploymentRequest, Deployments, TargetDeployment
from edgeloop.edge.ipc.ops_iotcore import CloudMessage, Unsubscribe
from edgeloop.edge.recipes import RecipeStore
from edgeloop.edge.settings import CloudConnection
from edgeloop.edge.store import LOCAL_TARGET, HubState, HubStore, read_json, write_json_atomic

if TYPE_CHECKING:
    import httpx

    from edgeloop.edge.cloud_link import CloudLink
    from edgeloop.edge.fetch import HttpFetcher

__all__ = [
    "MAX_RESUMES",
    "Execution",
    "FleetJobs",
    "Outcome",
    "failure_details",
    "log_tail_text",
    "parse_execution",
    "status_details",
    "success_details",
]

log = logging.getLogger("edgeloop.fleet_jobs")

TOKEN_PREFIX = "edgeloop-jobs-"
REQUEST_TIMEOUT = 10.0  # seconds for the cloud to answer start-next or a final update
RETRY_CAP = 30.0  # cap of the jittered backoff between failed start-next requests
MAX_RESUMES = 3  # restarts of the agent while preparing one execution before it fails
OUTCOMES_KEPT = 20
DETAIL_LIMIT = 480  # characters of one statusDetails value (AWS allows 1024)
TAIL_LINES = 3
TAIL_WIDTH = 150
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_LOG_PREFIX = re.compile(r"^\S+Z \[([a-z]+)\] ?")
_MAX_DETAILS = 10


# -- statusDetails (pure) ------------------------------------------------------------------


def short(text: str, limit: int = DETAIL_LIMIT) -> str:
    """One line of at most ``limit`` characters, without control characters."""
    flat = _CONTROL.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def status_details(**values: object) -> dict[str, str]:
    """A statusDetails map as AWS takes it: string values, short, none empty, at most 10.

    None and empty values are left out; the first ten others are kept, in order.
    """
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        text = short(value if isinstance(value, str) else json.dumps(value))
        if text and len(out) < _MAX_DETAILS:
            out[key] = text
    return out


def log_tail_text(lines: Sequence[str], count: int = TAIL_LINES, width: int = TAIL_WIDTH) -> str:
    """The last ``count`` lines a component wrote, one line, ``" | "``-joined.

    The agent's own lines (``[edgeloop] state A -> B``) are left out and the timestamps
    dropped; stderr lines keep their mark. Each line is cut to ``width`` characters.
    """
    kept: list[str] = []
    for line in lines:
        match = _LOG_PREFIX.match(line)
        stream = match.group(1) if match else ""
        if stream == "edgeloop":
            continue
        text = line[match.end() :] if match else line
        if stream == "stderr":
            text = f"stderr: {text}"
        text = short(text, width)
        if text:
            kept.append(text)
    return " | ".join(kept[-count:])


@dataclass(frozen=True)
class Outcome:
    """How an execution ended on the hub, as it is reported."""

    status: str  # SUCCEEDED | FAILED
    details: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As saved in the hub's fleet-jobs state."""
        return {"status": self.status, "statusDetails": dict(self.details)}


def _job_fields(doc: JobDocument | None) -> dict[str, str | None]:
    if doc is None:
        return {"deploymentId": None, "target": None}
    return {"deploymentId": doc.deployment_id, "target": doc.target}


def failed(reason: str, step: str, doc: JobDocument | None = None, **more: object) -> Outcome:
    """A FAILED outcome with a one-line reason and where it failed."""
    return Outcome("FAILED", status_details(reason=reason, step=step, **_job_fields(doc), **more))


def success_details(doc: JobDocument) -> dict[str, str]:
    """statusDetails of a SUCCEEDED execution."""
    components = ", ".join(f"{n} {c.version}" for n, c in sorted(doc.components.items()))
    return status_details(
        **_job_fields(doc), components=components or "none", rollbackOf=doc.rollback_of
    )


def failure_details(record: Mapping[str, Any], doc: JobDocument | None) -> dict[str, str]:
    """statusDetails of an execution whose local deployment failed (its record)."""
    cause = str(record.get("failureCause") or "no reason recorded")
    first = cause.split("; last log lines:", 1)[0].splitlines()[0] if cause.strip() else cause
    detailed = record.get("detailedStatus")
    components = record.get("failedComponents") or []
    culprit: Mapping[str, Any] = components[0] if components else {}
    reason = first
    if culprit:
        state = culprit.get("state")
        verb = "went" if state in ("ERRORED", "BROKEN") else "is"
        reason = (
            f"{culprit.get('name')} {culprit.get('version') or ''} {verb} "
            f"{state}: {culprit.get('reason')}"
        )
    if detailed == "FAILED_ROLLBACK_COMPLETE" and "back on" not in reason:
        reason += "; the hub rolled back to its previous deployment"
    elif detailed == "FAILED_ROLLBACK_NOT_REQUESTED":
        reason += "; left in place (failure handling DO_NOTHING)"
    exit_code, signal = culprit.get("exitCode"), culprit.get("signal")
    return status_details(
        reason=reason,
        step="deploy",
        **_job_fields(doc),
        detailedStatus=detailed,
        component=culprit.get("name"),
        version=culprit.get("version"),
        exitCode=None if exit_code is None else str(exit_code),
        signal=None if signal is None else str(signal),
        logTail=log_tail_text(culprit.get("logTail") or []) or None,
    )


def outcome_of(record: Mapping[str, Any], doc: JobDocument | None) -> Outcome:
    """The outcome of an execution from its ended local deployment's record."""
    if record.get("status") == "SUCCEEDED" and doc is not None:
        return Outcome("SUCCEEDED", success_details(doc))
    return Outcome("FAILED", failure_details(record, doc))


# -- executions (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """A job execution as ``start-next`` or ``notify-next`` gives it."""

    job_id: str
    execution_number: int
    status: str
    document: Any  # the raw jobDocument (parsed when applied, so a bad one is reported)
    status_details: Mapping[str, str] = field(default_factory=dict)


def parse_execution(answer: Mapping[str, Any]) -> Execution | None:
    """The execution in a start-next answer or notify-next message; None when there is
    none (nothing pending). CloudError when it is not one."""
    data = answer.get("execution")
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("jobId"), str):
        raise CloudError("the cloud sent a job execution without a jobId")
    number = data.get("executionNumber", 1)
    details = data.get("statusDetails")
    return Execution(
        job_id=data["jobId"],
        execution_number=number if isinstance(number, int) else 1,
        status=str(data.get("status", "")),
        document=data.get("jobDocument"),
        status_details=dict(details) if isinstance(details, dict) else {},
    )


# -- downloads (blocking; run in a worker thread) ----------------------------------------


class Downloads:
    """Gets the recipes and artifacts of the component versions a job needs.

    ``prepare`` downloads every artifact into the artifact store's ``downloads`` folder
    (resumable) and writes the recipes into a folder of their own; it returns the fetch
    function that hands those files to ``ArtifactStore.stage`` during the deployment.
    """

    def __init__(
        self,
        cloud: CloudConnection,
        thing: str,
        recipes: RecipeStore,
        artifacts: ArtifactStore,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.cloud = cloud
        self.thing = thing
        self.recipes = recipes
        self.artifacts = artifacts
        self.timeout = timeout

    def needed(self, doc: JobDocument) -> list[tuple[str, str]]:
        """The (name, version) pairs of the document — its components and the dependencies
        the cloud resolved for them — the hub lacks a recipe or artifacts of."""
        os_name, arch = current_platform()
        wanted = {name: target.version for name, target in doc.components.items()}
        for name, version in doc.dependencies.items():
            wanted.setdefault(name, version)
        missing = []
        for name, version in sorted(wanted.items()):
            recipe = self.recipes.get(name, version)
            if recipe is not None:
                manifest = recipe.select_manifest(os_name, arch)
                if manifest is None or not manifest.artifacts:
                    continue
                if self.artifacts.is_staged(name, version):
                    continue
            missing.append((name, version))
        return missing

    def prepare(
        self,
        wanted: Sequence[tuple[str, str]],
        recipe_dir: Path,
        progress: Callable[[int, str, str], None],
    ) -> tuple[Callable[[ArtifactSpec], Path], HttpFetcher]:
        """Download what ``wanted`` lists; the fetch function for staging, and the fetcher
        (close it once the deployment has staged its artifacts)."""
        from edgeloop.edge.fetch import HttpFetcher, remote_or_local

        if self.cloud.api is None:
            names = ", ".join(f"{n} {v}" for n, v in wanted)
            raise CloudError(
                f"cannot download {names}: the hub has no cloud API address (set cloud.api "
                "in agent.json, e.g. https://cloud.example.com:8440)"
            )
        recipe_dir.mkdir(parents=True, exist_ok=True)
        ca, cert, key = self._tls()
        with self._client() as client:
            fetcher = HttpFetcher(
                self.artifacts.downloads,
                api_url=self.cloud.api + API_PREFIX,
                ca=ca,
                cert=cert,
                key=key,
                renew=lambda uri: self._renew(fetcher, uri),
            )
            try:
                for index, (name, version) in enumerate(wanted):
                    progress(index, name, version)
                    links = self._links(client, name, version)
                    for artifact in links.get("artifacts") or []:
                        fetcher.urls[str(artifact["uri"])] = str(artifact["url"])
                    recipe = self.recipes.get(name, version)
                    if recipe is None:
                        recipe = self._recipe(client, links, name, version, recipe_dir)
                    manifest = recipe.select_manifest(*current_platform())
                    if manifest is None:
                        raise DeploymentError(
                            f"{name} {version} has no manifest for this hub's platform "
                            f"({' '.join(current_platform())})"
                        )
                    for spec in manifest.artifacts:
                        fetcher(spec)
            except BaseException:
                fetcher.close()
                raise
        return remote_or_local(fetcher, None), fetcher

    def _tls(self) -> tuple[Path | None, Path | None, Path | None]:
        if self.cloud.api is not None and self.cloud.api.startswith("https:"):
            return self.cloud.ca, self.cloud.cert, self.cloud.key
        return None, None, None

    def _client(self) -> httpx.Client:
        import httpx

        ca, cert, key = self._tls()
        verify: ssl.SSLContext | bool = True
        if ca is not None:
            verify = ssl.create_default_context(cafile=str(ca))
            if cert is not None:
                verify.load_cert_chain(str(cert), str(key) if key is not None else None)
        return httpx.Client(verify=verify, timeout=self.timeout, follow_redirects=True)

    def _links(self, client: httpx.Client, name: str, version: str) -> dict[str, Any]:
        """The signed links to one version's recipe and artifacts, for this hub."""
        import httpx

        assert self.cloud.api is not None
        url = (
            f"{self.cloud.api}{API_PREFIX}/things/{quote(self.thing, safe='')}/components/"
            f"{quote(name, safe='')}/versions/{quote(version, safe='')}/downloads"
        )
        what = f"the download links of {name} {version}"
        for attempt in range(4):
            try:
                answer = client.get(url)
            except httpx.TransportError as err:
                if attempt == 3:
                    raise CloudError(f"cannot get {what} from {self.cloud.api}: {err}") from None
                time.sleep(0.5 * 2**attempt * (0.5 + random.random() / 2))
                continue
            if answer.status_code in (429, 500, 502, 503, 504) and attempt < 3:
                time.sleep(0.5 * 2**attempt * (0.5 + random.random() / 2))
                continue
            break
        if answer.status_code != 200:
            raise CloudError(f"the cloud refused {what}: {answer.status_code} {_message(answer)}")
        body = answer.json()
        if not isinstance(body, dict) or not isinstance(body.get("recipeUrl"), str):
            raise CloudError(f"the cloud's answer with {what} lacks recipeUrl")
        return body

    def _recipe(
        self,
        client: httpx.Client,
        links: Mapping[str, Any],
        name: str,
        version: str,
        recipe_dir: Path,
    ) -> Recipe:
        answer = client.get(str(links["recipeUrl"]))
        if answer.status_code != 200:
            raise CloudError(
                f"cannot download the recipe of {name} {version}: {answer.status_code} "
                f"{_message(answer)}"
            )
        document = answer.json()
        path = recipe_dir / f"{name}@{version}.json"
        recipe = parse_recipe(document, source=f"the cloud's recipe of {name} {version}")
        if recipe.name != name or str(recipe.version) != version:
            raise CloudError(
                f"the cloud sent the recipe of {recipe.name} {recipe.version} when asked "
                f"for {name} {version}"
            )
        write_json_atomic(path, document)
        return recipe

    def _renew(self, fetcher: HttpFetcher, uri: str) -> str:
        """A fresh signed link for an artifact whose link expired."""
        ref = parse_registry_uri(uri)
        with self._client() as client:
            links = self._links(client, ref.name, ref.version)
        for artifact in links.get("artifacts") or []:
            fetcher.urls[str(artifact["uri"])] = str(artifact["url"])
        url = fetcher.urls.get(uri)
        if url is None:
            raise CloudError(f"the cloud no longer lists {uri} among its version's artifacts")
        return url


def _message(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return answer.reason_phrase


# -- the jobs client -----------------------------------------------------------------------


class _Canceled(Exception):
    """The cloud ended the execution (canceled, removed, timed out) before it was applied."""


class FleetJobs:
    """Takes the hub's job executions one at a time and applies them (module docstring)."""

    def __init__(
        self,
        link: CloudLink,
        thing: str,
        deployments: Deployments,
        store: HubStore,
        recipes: RecipeStore,
        artifacts: ArtifactStore,
        hub: HubState,
        cloud: CloudConnection,
        *,
        rng: Callable[[], float] = random.random,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.link = link
        self.thing = thing
        self.deployments = deployments
        self.store = store
        self.hub = hub
        self.downloads = Downloads(cloud, thing, recipes, artifacts)
        self.prefix = f"$aws/things/{thing}/jobs"
        self.rng = rng
        self.request_timeout = request_timeout
        state = read_json(store.fleet_jobs_path, {})
        self._state: dict[str, Any] = state if isinstance(state, dict) else {}
        self._state.setdefault("outcomes", {})
        self._wake = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = {}
        self._active: str | None = None
        self._ended_by_cloud: str | None = None  # why the active execution ended, if it did
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Unsubscribe | None = None
        self._report_failures = 0
        self.step = "idle"
        self.step_since = time.time()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe (made again on every connect) and start the worker."""
        self.link.on_online.append(self._wake.set)
        # noLocal: the hub's own requests on these topics are not echoed back to it.
        self._unsubscribe = await self.link.subscribe(
            f"{self.prefix}/#", 1, self._on_message, no_local=True
        )
        self._task = asyncio.create_task(self._run(), name="fleet-jobs")
        if self.link.connected:
            self._wake.set()

    async def stop(self) -> None:
        """Stop the worker; a job in progress is picked up again on the next start."""
        with contextlib.suppress(ValueError):
            self.link.on_online.remove(self._wake.set)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._unsubscribe is not None:
            await self._unsubscribe()

    def status(self) -> dict[str, Any]:
        """For ``device status``: the current job and step, the last outcome, the targets."""
        current = self._state.get("current")
        return {
            "step": self.step,
            "since": self.step_since,
            "current": dict(current) if current else None,
            "last": self._state.get("last"),
            "targets": {
                name: {
                    "deploymentId": entry.get("deploymentId"),
                    "jobId": entry.get("jobId"),
                    "components": entry.get("components", {}),
                }
                for name, entry in sorted(self.hub.targets.items())
            },
        }

    # -- messages from the cloud ---------------------------------------------------------
    def _on_message(self, message: CloudMessage) -> None:
        rest = message.topic.removeprefix(self.prefix + "/")
        try:
            doc = json.loads(message.payload) if message.payload else {}
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if rest == "notify-next":
            if doc.get("execution") and self._active is None:
                self._wake.set()
            return
        kind = rest.rpartition("/")[2]
        if kind not in ("accepted", "rejected"):
            return
        token = doc.get("clientToken")
        future = self._waiting.get(token) if isinstance(token, str) else None
        if future is not None and not future.done():
            future.set_result((kind, doc))
        parts = rest.split("/")
        if (
            kind == "rejected"
            and len(parts) == 3
            and parts[0] == self._active
            and doc.get("code") == "TerminalStateReached"
        ):
            state = (doc.get("executionState") or {}).get("status", "ended")
            self._ended_by_cloud = f"the cloud ended the execution ({state})"

    async def _request(self, topic: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Publish a request and wait for its accepted or rejected answer."""
        token = f"{TOKEN_PREFIX}{secrets.token_hex(12)}"
        future: asyncio.Future[tuple[str, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[token] = future
        try:
            await self.link.publish(
                topic, json.dumps({**body, "clientToken": token}).encode(), 1, False
            )
            async with asyncio.timeout(self.request_timeout):
                return await future
        except TimeoutError:
            raise CloudError(
                f"the cloud did not answer {topic.rpartition('/jobs/')[2]} within "
                f"{self.request_timeout:g} s"
            ) from None
        finally:
            self._waiting.pop(token, None)

    # -- the worker ------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.link.connected:
                try:
                    kind, answer = await self._request(f"{self.prefix}/start-next", {})
                    if kind == "rejected":
                        raise CloudError(
                            f"start-next was refused: {answer.get('code')} {answer.get('message')}"
                        )
                    execution = parse_execution(answer)
                except CloudError as err:
                    failures += 1
                    delay = _backoff(failures, self.rng)
                    log.warning("cannot ask the cloud for jobs: %s; again in %.1f s", err, delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                if execution is None:
                    self._forget_current()
                    break
                await self._handle(execution)
            self._set_step("idle")

    async def _handle(self, execution: Execution) -> None:
        """Apply one execution (or report it again), then report how it ended."""
        outcomes: dict[str, Any] = self._state["outcomes"]
        saved = outcomes.get(execution.job_id)
        if (
            saved is not None
            and saved.get("executionNumber") == execution.execution_number
            and saved.get("status") in ("SUCCEEDED", "FAILED")
        ):
            # Applied already; its report did not reach the cloud (offline, or a crash).
            await self._report_final(execution, Outcome(saved["status"], saved["statusDetails"]))
            return
        current = self._state.get("current")
        resumed = bool(
            current
            and current.get("jobId") == execution.job_id
            and current.get("executionNumber") == execution.execution_number
        )
        if not resumed or current is None:
            current = {
                "jobId": execution.job_id,
                "executionNumber": execution.execution_number,
                "startedAt": time.time(),
                "resumes": 0,
            }
        else:
            current["resumes"] = int(current.get("resumes", 0)) + 1
        self._state["current"] = current
        self._save()
        self._active, self._ended_by_cloud = execution.job_id, None
        log.info(
            "job %s (execution %d)%s",
            execution.job_id,
            execution.execution_number,
            " resumed after a restart of the agent" if resumed else "",
        )
        try:
            outcome = await self._apply(execution, current, resumed=resumed)
        except _Canceled as err:
            log.warning("job %s: %s; not applied", execution.job_id, err)
            self._finish(execution, Outcome("CANCELED", status_details(reason=str(err))))
            return
        except Exception as err:  # one job must never block the queue
            log.exception("job %s failed inside the hub", execution.job_id)
            outcome = failed(f"internal error on the hub: {err}", "agent")
        finally:
            self._active = None
        self._finish(execution, outcome)
        await self._report_final(execution, outcome)

    async def _apply(
        self, execution: Execution, current: dict[str, Any], *, resumed: bool
    ) -> Outcome:
        try:
            doc = parse_job_document(execution.document)
        except ValidationError as err:
            return failed(
                f"the job document is not a deployment this hub can apply: {err}", "document"
            )
        problem = self._check_target(doc)
        if problem is not None:
            return failed(problem, "document", doc)
        current.update(deploymentId=doc.deployment_id, target=doc.target)
        self._save()
        local_id = current.get("localDeploymentId")
        if resumed and local_id:
            record = self.deployments.get(str(local_id))
            if record is not None and not (
                record.get("interrupted")
                and record.get("detailedStatus") == "FAILED_NO_STATE_CHANGE"
            ):
                self._set_step("deploying")
                return outcome_of(await self.deployments.wait(str(local_id)), doc)
        if resumed and int(current.get("resumes", 0)) > MAX_RESUMES:
            return failed(
                f"the agent restarted {current['resumes']} times before this deployment could "
                "be applied; the hub is on its last successful deployment",
                "agent",
                doc,
            )
        return await self._deploy(execution, doc, current)

    def _check_target(self, doc: JobDocument) -> str | None:
        if doc.target == LOCAL_TARGET:
            return f"target {LOCAL_TARGET} is the hub's own; a fleet deployment cannot use it"
        mine = thing_target(self.thing)
        if doc.target.startswith("thing/") and doc.target != mine:
            return f"the job is for target {doc.target}, and this hub is {mine}"
        return None

    async def _deploy(
        self, execution: Execution, doc: JobDocument, current: dict[str, Any]
    ) -> Outcome:
        fields = _job_fields(doc)
        delay = self.rng() * doc.jitter_seconds
        if delay > 0:
            self._set_step("waiting")
            await self._progress(execution, step="waiting", jitterSeconds=f"{delay:.1f}", **fields)
            await asyncio.sleep(delay)
        self._check_ended()
        recipe_dir = self.store.state_dir / "fleet-jobs" / execution.job_id
        shutil.rmtree(recipe_dir, ignore_errors=True)
        fetcher: HttpFetcher | None = None
        try:
            wanted = self.downloads.needed(doc)
            fetch = None
            if wanted:
                self._set_step("downloading")
                loop = asyncio.get_running_loop()

                def progress(index: int, name: str, version: str) -> None:
                    # In the download thread: the report is made on the event loop.
                    text = f"{index + 1}/{len(wanted)} {name} {version}"
                    asyncio.run_coroutine_threadsafe(
                        self._progress(execution, step="downloading", progress=text, **fields),
                        loop,
                    )

                try:
                    fetch, fetcher = await asyncio.to_thread(
                        self.downloads.prepare, wanted, recipe_dir, progress
                    )
                except EdgeloopError as err:
                    return failed(f"download failed: {err}", "download", doc)
            self._check_ended()
            self._set_step("deploying")
            await self._progress(execution, step="deploying", **fields)
            request = DeploymentRequest(
                recipe_dir=recipe_dir if recipe_dir.is_dir() else None,
                target=TargetDeployment(
                    target=doc.target,
                    deployment_id=doc.deployment_id,
                    components={n: c.version for n, c in doc.components.items()},
                    job_id=execution.job_id,
                    document=doc.to_json(),
                ),
                update_config={n: c.update for n, c in doc.components.items() if c.update},
                failure_handling=doc.policies.failure_handling,
                health_window=doc.policies.health_window,
                component_update_policy=doc.policies.update_action,
                notify_timeout=doc.policies.notify_timeout,
                validation_timeout=doc.policies.validation_timeout,
                fetch=fetch,
            )
            try:
                record = self.deployments.submit(request)
            except EdgeloopError as err:
                return failed(f"the hub refused the deployment: {err}", "deploy", doc)
            current["localDeploymentId"] = record["deploymentId"]
            self._save()
            return outcome_of(await self.deployments.wait(record["deploymentId"]), doc)
        finally:
            if fetcher is not None:
                fetcher.close()
            shutil.rmtree(recipe_dir, ignore_errors=True)

    def _check_ended(self) -> None:
        if self._ended_by_cloud is not None:
            raise _Canceled(self._ended_by_cloud)

    # -- reports ---------------------------------------------------------------------------
    async def _progress(self, execution: Execution, **details: object) -> None:
        """Report IN_PROGRESS with ``details``. The answer is not waited for (offline, the
        report waits in the link's queue); a refusal that says the cloud ended the
        execution is noted by ``_on_message``."""
        body = {
            "status": "IN_PROGRESS",
            "statusDetails": status_details(**details),
            "executionNumber": execution.execution_number,
            "clientToken": f"{TOKEN_PREFIX}{secrets.token_hex(12)}",
        }
        try:
            await self.link.publish(
                f"{self.prefix}/{execution.job_id}/update", json.dumps(body).encode(), 1, False
            )
        except CloudError as err:
            log.info("progress of job %s not reported: %s", execution.job_id, err)

    def _finish(self, execution: Execution, outcome: Outcome) -> None:
        """Save the outcome before reporting it, so a crash cannot lose it."""
        outcomes: dict[str, Any] = self._state["outcomes"]
        outcomes[execution.job_id] = {
            "executionNumber": execution.execution_number,
            "at": time.time(),
            **outcome.to_json(),
        }
        while len(outcomes) > OUTCOMES_KEPT:
            outcomes.pop(next(iter(outcomes)))
        current = self._state.get("current") or {}
        self._state["last"] = {
            "jobId": execution.job_id,
            "deploymentId": current.get("deploymentId"),
            "target": current.get("target"),
            "status": outcome.status,
            "reason": outcome.details.get("reason"),
            "at": time.time(),
        }
        self._state["current"] = None
        self._save()
        log.info(
            "job %s %s%s",
            execution.job_id,
            outcome.status,
            f": {outcome.details['reason']}" if "reason" in outcome.details else "",
        )

    async def _report_final(self, execution: Execution, outcome: Outcome) -> None:
        if outcome.status not in ("SUCCEEDED", "FAILED"):
            return  # ended by the cloud: nothing to tell it
        self._set_step("reporting")
        body = {
            "status": outcome.status,
            "statusDetails": dict(outcome.details),
            "executionNumber": execution.execution_number,
        }
        try:
            kind, answer = await self._request(f"{self.prefix}/{execution.job_id}/update", body)
        except CloudError as err:
            # Kept as the saved outcome: sent again when start-next returns this execution.
            self._report_failures += 1
            log.warning("the outcome of job %s is not reported yet: %s", execution.job_id, err)
            await asyncio.sleep(_backoff(self._report_failures, self.rng))
            return
        self._report_failures = 0
        if kind == "rejected":
            log.warning(
                "the cloud refused the outcome of job %s: %s %s",
                execution.job_id,
                answer.get("code"),
                answer.get("message"),
            )

    # -- state ---------------------------------------------------------------------------
    def _forget_current(self) -> None:
        """Nothing is pending: an execution still recorded as in hand was ended by the
        cloud (canceled, removed, timed out) while the agent was away."""
        current = self._state.get("current")
        if not current:
            return
        log.warning(
            "job %s is no longer pending in the cloud; the hub is on its last successful "
            "deployment",
            current.get("jobId"),
        )
        self._state["last"] = {
            "jobId": current.get("jobId"),
            "deploymentId": current.get("deploymentId"),
            "target": current.get("target"),
            "status": "ENDED_BY_CLOUD",
            "reason": "the cloud ended it while the agent was stopped",
            "at": time.time(),
        }
        self._state["current"] = None
        self._save()

    def _set_step(self, step: str) -> None:
        if step != self.step:
            self.step, self.step_since = step, time.time()

    def _save(self) -> None:
        write_json_atomic(self.store.fleet_jobs_path, self._state)


def _backoff(failures: int, rng: Callable[[], float]) -> float:
    ceiling = min(RETRY_CAP, 0.5 * 2.0 ** min(failures, 10))
    return ceiling / 2 + rng() * ceiling / 2
