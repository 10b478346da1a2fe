"""Component lifecycle over IPC: state reports, update deferrals, pause/resume, restart,
stop, details — and the local deployment operations of the Greengrass CLI service."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeloop.core.config import parse_update_config_document
from edgeloop.core.errors import ComponentError, EdgeloopError
from edgeloop.edge.deployments import DeploymentRequest
from edgeloop.edge.ipc.authz import CLI, LIFECYCLE
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.server import (
    Handler,
    InvalidArgumentsError,
    Operation,
    ResourceNotFoundError,
    ServiceError,
    Stream,
)
from edgeloop.edge.supervisor import ComponentRunner

# Lifecycle work started over IPC must outlive the caller's connection: a component that
# restarts itself closes that connection mid-request.
_detached: set[asyncio.Task[Any]] = set()


def _detach(coro: Any, name: str) -> None:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _detached.add(task)
    task.add_done_callback(_detached.discard)


def _name(body: dict[str, Any]) -> str:
    name = body.get("componentName")
    if not isinstance(name, str) or not name:
        raise InvalidArgumentsError("componentName is required")
    return name


def operations(ctx: IpcContext) -> list[Operation]:
    """The lifecycle and local deployment operations."""

    def runner(name: str) -> ComponentRunner:
        found = ctx.supervisor.runners.get(name)
        if found is None:
            raise ResourceNotFoundError(
                f"no component {name!r} on this hub", resourceType="Component", resourceName=name
            )
        return found

    def details(r: ComponentRunner) -> dict[str, Any]:
        return {
            "componentName": r.name,
            "version": r.spec.version,
            "state": r.state.value,
            "configuration": copy.deepcopy(ctx.hub.configuration.get(r.name, {})),
        }

    async def update_state(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        state = body.get("state")
        if state not in ("RUNNING", "ERRORED"):
            raise InvalidArgumentsError("state must be RUNNING or ERRORED")
        runner(stream.component).report_state(state)
        return {}

    async def subscribe_to_component_updates(
        stream: Stream, body: dict[str, Any]
    ) -> dict[str, Any]:
        stream.after_response(lambda: ctx.events.add_update_listener(stream))
        return {}

    async def defer_component_update(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        deployment_id = body.get("deploymentId")
        if not isinstance(deployment_id, str) or not deployment_id:
            raise InvalidArgumentsError("deploymentId is required")
        recheck = body.get("recheckAfterMs") or 0
        if not isinstance(recheck, int) or recheck < 0:
            raise InvalidArgumentsError("recheckAfterMs must be a non-negative integer")
        message = str(body.get("message") or "")
        if not ctx.events.defer(stream.component, deployment_id, recheck, message):
            raise ResourceNotFoundError(
                f"no update of deployment {deployment_id!r} is waiting for {stream.component}",
                resourceType="Deployment",
                resourceName=deployment_id,
            )
        return {}

    def freeze_or_thaw(operation: str, pause_it: bool) -> Handler:
        async def handler(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
            name = _name(body)
            ctx.authorizer.check(stream.component, LIFECYCLE, operation, name)
            target = runner(name)
            try:
                target.pause() if pause_it else target.resume()
            except ComponentError as err:
                raise ServiceError(str(err)) from err
            return {}

        return handler

    pause = freeze_or_thaw("PauseComponent", pause_it=True)
    resume = freeze_or_thaw("ResumeComponent", pause_it=False)

    async def restart(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        ctx.authorizer.check(stream.component, CLI, "RestartComponent", name)
        target = runner(name)

        async def _restart() -> None:
            await target.restart()
            for dependent in ctx.supervisor.dependents(name, hard_only=True):
                await ctx.supervisor.runners[dependent].restart()

        _detach(_restart(), f"ipc-restart:{name}")
        return {"restartStatus": "SUCCEEDED", "message": f"{name} is restarting"}

    async def stop(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        ctx.authorizer.check(stream.component, CLI, "StopComponent", name)
        target = runner(name)
        _detach(target.stop(), f"ipc-stop:{name}")
        return {"stopStatus": "SUCCEEDED", "message": f"{name} is stopping"}

    async def get_component_details(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        name = _name(body)
        ctx.authorizer.check(stream.component, CLI, "GetComponentDetails", name)
        return {"componentDetails": details(runner(name))}

    async def list_components(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        ctx.authorizer.check(stream.component, CLI, "ListComponents", "*")
        runners = ctx.supervisor.runners
        return {"components": [details(runners[n]) for n in sorted(runners)]}

    # -- local deployments ------------------------------------------------------------
    def local_deployment(record: dict[str, Any]) -> dict[str, Any]:
        created = datetime.fromtimestamp(record["createdAt"], UTC).strftime("%m/%d/%Y %H:%M:%S")
        doc: dict[str, Any] = {
            "deploymentId": record["deploymentId"],
            "status": record["status"],
            "createdOn": created,
        }
        if record.get("detailedStatus"):
            cause = record.get("failureCause") or ""
            doc["deploymentStatusDetails"] = {
                "detailedDeploymentStatus": record["detailedStatus"],
                "deploymentErrorStack": [cause.splitlines()[0]] if cause else [],
                "deploymentErrorTypes": [],
                "deploymentFailureCause": cause,
            }
        return doc

    async def create_local_deployment(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        ctx.authorizer.check(stream.component, CLI, "CreateLocalDeployment", "*")
        merge = body.get("rootComponentVersionsToAdd") or {}
        remove = body.get("rootComponentsToRemove") or []
        config = body.get("componentToConfiguration") or {}
        if not isinstance(merge, dict) or not all(isinstance(v, str) for v in merge.values()):
            raise InvalidArgumentsError("rootComponentVersionsToAdd must map names to versions")
        if not isinstance(remove, list) or not all(isinstance(n, str) for n in remove):
            raise InvalidArgumentsError("rootComponentsToRemove must be a list of names")
        if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
            raise InvalidArgumentsError("componentToConfiguration must map names to objects")
        try:
            # Each entry is a Greengrass configuration update: {"MERGE": {...}, "RESET": [...]}.
            updates = parse_update_config_document(config, source="componentToConfiguration")
        except EdgeloopError as err:
            raise InvalidArgumentsError(str(err)) from err
        paths: dict[str, Path | None] = {}
        for field in ("recipeDirectoryPath", "artifactsDirectoryPath"):
            value = body.get(field)
            if value and not Path(value).is_dir():  # noqa: ASYNC240 (one local stat)
                raise InvalidArgumentsError(f"{field} {value!r} is not a folder")
            paths[field] = Path(value) if value else None
        policy = body.get("failureHandlingPolicy") or "ROLLBACK"
        request = DeploymentRequest(
            recipe_dir=paths["recipeDirectoryPath"],
            artifact_dir=paths["artifactsDirectoryPath"],
            merge=merge,
            remove=tuple(remove),
            update_config=updates,
            failure_handling=policy,
        )
        try:
            record = ctx.deployments.submit(request)
        except EdgeloopError as err:
            raise InvalidArgumentsError(str(err)) from err
        return {"deploymentId": record["deploymentId"]}

    async def get_local_deployment_status(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        ctx.authorizer.check(stream.component, CLI, "GetLocalDeploymentStatus", "*")
        deployment_id = str(body.get("deploymentId") or "")
        record = ctx.deployments.get(deployment_id)
        if record is None:
            raise ResourceNotFoundError(
                f"no local deployment {deployment_id!r}",
                resourceType="LocalDeployment",
                resourceName=deployment_id,
            )
        return {"deployment": local_deployment(record)}

    async def list_local_deployments(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        ctx.authorizer.check(stream.component, CLI, "ListLocalDeployments", "*")
        return {"localDeployments": [local_deployment(r) for r in ctx.deployments.records]}

    return [
        Operation("UpdateState", update_state, inline=True),
        Operation("SubscribeToComponentUpdates", subscribe_to_component_updates, streaming=True),
        Operation("DeferComponentUpdate", defer_component_update, inline=True),
        Operation("PauseComponent", pause, inline=True),
        Operation("ResumeComponent", resume, inline=True),
        Operation("RestartComponent", restart),
        Operation("StopComponent", stop),
        Operation("GetComponentDetails", get_component_details, inline=True),
        Operation("ListComponents", list_components, inline=True),
        Operation("CreateLocalDeployment", create_local_deployment),
        Operation("GetLocalDeploymentStatus", get_local_deployment_status, inline=True),
        Operation("ListLocalDeployments", list_local_deployments, inline=True),
    ]
