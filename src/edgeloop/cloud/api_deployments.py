"""Fleet deployments' REST routes, under /api/v1: create, list, follow, pause, resume, cancel.

``POST /deployments`` takes Greengrass's CreateDeployment body (``targetArn`` naming a
thing group or a thing, ``components``, ``deploymentPolicies``, ``iotJobConfiguration``);
edgeloop's additions are described in :mod:`edgeloop.core.deployment`. Hubs call
``/things/{thing}/components/{name}/versions/{version}/downloads`` for signed links to a
component version one of their jobs names (a thing may call it itself over mTLS).

Handlers are plain ``def``: the engine is synchronous and thread-safe.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, Field

from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.deployments import STATUSES, Deployment
from edgeloop.core.errors import NotFoundError

__all__ = ["deployments_router"]

API_PREFIX = "/api/v1"
LINK_LIFETIME = 900.0  # seconds a hub's download links stay valid


class DeploymentOut(BaseModel):
    deploymentId: str
    deploymentName: str
    target: str = Field(description="a thing group's name, or thing/NAME")
    status: str = Field(description=" | ".join(STATUSES))
    phase: str = Field(description="canary | rollout | complete | aborted")
    ratePerMinute: float
    targets: int
    released: int = Field(description="targets notified so far")
    canary: list[str]
    executions: dict[str, int] = Field(description="job executions by status")
    reason: str | None = Field(description="why it was aborted or canceled")
    previousDeploymentId: str | None = Field(description="what a fleet rollback returns to")
    rollback: dict[str, int] | None = Field(description="rollback executions by status")
    components: dict[str, str]
    document: dict[str, Any]
    createdAt: str
    updatedAt: str


class DeploymentList(BaseModel):
    deployments: list[DeploymentOut]


class EventOut(BaseModel):
    at: str
    kind: str
    detail: dict[str, Any]


class DeploymentDetail(DeploymentOut):
    events: list[EventOut]


class CancelBody(BaseModel):
    reason: str = Field(default="canceled by an operator", max_length=1024)


class ArtifactLink(BaseModel):
    file: str
    uri: str
    url: str
    sha256: str
    size: int


class DownloadsOut(BaseModel):
    componentName: str
    componentVersion: str
    thingName: str
    expiresAt: str
    recipeUrl: str
    artifacts: list[ArtifactLink]


_EXAMPLE = {
    "targetArn": "thinggroup/furnaces",
    "deploymentName": "detector 2.0",
    "components": {"com.example.Detector": {"componentVersion": "2.0.0"}},
    "deploymentPolicies": {"failureHandlingPolicy": "ROLLBACK", "healthWindowSeconds": 5},
    "iotJobConfiguration": {
        "canary": {"size": 1},
        "jobExecutionsRolloutConfig": {"maximumPerMinute": 600},
        "abortConfig": {
            "criteriaList": [
                {
                    "failureType": "ALL",
                    "action": "CANCEL",
                    "thresholdPercentage": 20,
                    "minNumberOfExecutedThings": 2,
                }
            ]
        },
    },
}


def _out(deployment: Deployment) -> DeploymentOut:
    return DeploymentOut(**deployment.to_json())


def deployments_router(ctx: CloudContext) -> APIRouter:
    """The routes over the install's deployment engine."""
    api = APIRouter(prefix=API_PREFIX, tags=["deployments"])

    @api.post("/deployments", status_code=201)
    def create_deployment(
        body: Annotated[dict[str, Any], Body(openapi_examples={"group": {"value": _EXAMPLE}})],
    ) -> DeploymentOut:
        """Deploy components to a thing group or a thing, in stages (see the rollout)."""
        return _out(ctx.deployments.create(body))

    @api.get("/deployments")
    def list_deployments(
        target: Annotated[str | None, Query(description="a group's name or thing/NAME")] = None,
        status: Annotated[str | None, Query(description=" | ".join(STATUSES))] = None,
    ) -> DeploymentList:
        """Deployments, newest first."""
        found = ctx.deployments.list_deployments(target=target, status=status)
        return DeploymentList(deployments=[_out(d) for d in found])

    @api.get("/deployments/{deploymentId}")
    def describe_deployment(deploymentId: str) -> DeploymentDetail:
        """A deployment with its executions by status and every step it took."""
        deployment = ctx.deployments.get(deploymentId)
        events = [EventOut(**e.to_json()) for e in ctx.deployments.events(deploymentId)]
        return DeploymentDetail(**deployment.to_json(), events=events)

    @api.post("/deployments/{deploymentId}/pause")
    def pause_deployment(deploymentId: str) -> DeploymentOut:
        """Release no more waves until resumed."""
        return _out(ctx.deployments.pause(deploymentId))

    @api.post("/deployments/{deploymentId}/resume")
    def resume_deployment(deploymentId: str) -> DeploymentOut:
        """Release waves again."""
        return _out(ctx.deployments.resume(deploymentId))

    @api.post("/deployments/{deploymentId}/cancel")
    def cancel_deployment(deploymentId: str, body: CancelBody | None = None) -> DeploymentOut:
        """Stop for good: queued executions are canceled; hubs keep what they run."""
        reason = body.reason if body is not None else CancelBody().reason
        return _out(ctx.deployments.cancel(deploymentId, reason))

    @api.get("/things/{thingName}/components/{name}/versions/{version}/downloads")
    def thing_downloads(thingName: str, name: str, version: str, request: Request) -> DownloadsOut:
        """Signed links to a component version that one of the thing's jobs names."""
        ctx.registry.get_thing(thingName)
        if not ctx.deployments.may_download(thingName, name, version):
            raise NotFoundError(
                "component version",
                f"{name}@{version}",
                f"no job of {thingName} names it, so it may not download it",
            )
        links = ctx.components.links_for_thing(
            name,
            version,
            thing=thingName,
            base_url=str(request.base_url),
            lifetime=LINK_LIFETIME,
        )
        return DownloadsOut(
            componentName=links.name,
            componentVersion=links.version,
            thingName=links.thing,
            expiresAt=links.expires_at.isoformat(),
            recipeUrl=links.recipe_url,
            artifacts=[
                ArtifactLink(file=a.file, uri=a.uri, url=a.url, sha256=a.sha256, size=a.size)
                for a in links.artifacts
            ],
        )

    return api
