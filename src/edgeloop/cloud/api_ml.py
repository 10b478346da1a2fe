"""The ML loop's REST routes, under /api/v1: training runs, the model registry, packaging.

``POST /ml/train`` starts a training run in the cloud's process (202, the run); ``GET
/ml/runs/{id}`` follows it (state, phase, steps done of total, the versions it
registered). ``GET /ml/models`` lists models with their latest version and aliases;
``GET /ml/models/{name}`` shows a model's versions and its alias history;
``GET /ml/models/{name}/versions/{ref}`` one version (``ref``: a number, an alias, or
``latest``), ``.../artifact`` its model document. ``POST /ml/models/{name}/aliases/{alias}``
moves an alias (``champion``, ``challenger``) to a version, with who and why, recorded
in the alias's append-only history. ``POST /ml/models/{name}/versions/{ref}/package``
publishes the version as the component ``edgeloop.model.<name>`` (version ``N.0.0``),
ready for a deployment. ``GET /ml/datasets/{hash}`` describes a stored snapshot.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.ml.dataset import DatasetSpec, parse_since
from edgeloop.cloud.ml.training import TrainingOptions

__all__ = ["ml_router"]

API_PREFIX = "/api/v1"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TrainRequest(_Request):
    appliances: list[str] = Field(default_factory=list, description="kinds (none: all)")
    since: str | None = Field(
        default=None, description="ISO 8601 time, or a span back from now: 90m, 6h, 7d"
    )
    until: str | None = Field(default=None, description="ISO 8601 time, or a span back")
    holdout: float = Field(default=0.3, gt=0, lt=1, description="share held out, per kit")
    perDevice: bool = Field(default=True, description="a kit's own model where it pays")
    cluster: str | None = Field(default=None, description="a Dask scheduler, tcp://host:port")
    workers: int | None = Field(default=None, ge=1, le=256, description="pool processes")
    by: str = Field(default="operator", min_length=1, max_length=128, description="who asks")


class AliasRequest(_Request):
    version: int | str = Field(description="a version number, or an alias that holds one")
    reason: str = Field(default="", max_length=2000)
    by: str = Field(default="operator", min_length=1, max_length=128, description="who moves it")


def ml_router(ctx: CloudContext) -> APIRouter:
    """The ML loop's routes over one running cloud."""
    from edgeloop.cloud.api import ErrorBody  # here: api imports this module

    ml = ctx.ml  # made now, before requests race to make it
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "bad input; `field` names what is wrong"},
        404: {"model": ErrorBody, "description": "no such model, version, alias or run"},
        409: {"model": ErrorBody, "description": "a run is in progress, or a clash"},
    }
    api = APIRouter(prefix=API_PREFIX, tags=["ml"], responses=errors)

    @api.post("/ml/train", status_code=202)
    def start_training(body: TrainRequest) -> dict[str, Any]:
        """Start a training run: snapshot, fit, evaluate, register (follow it by its id)."""
        spec = DatasetSpec(
            appliances=tuple(body.appliances),
            since=parse_since(body.since, field="since"),
            until=parse_since(body.until, field="until"),
        )
        options = TrainingOptions(
            spec=spec,
            holdout=body.holdout,
            per_device=body.perDevice,
            cluster=body.cluster or None,
            workers=body.workers,
            created_by=body.by,
        )
        return ml.start_training(options).to_json()

    @api.get("/ml/runs")
    def list_runs() -> list[dict[str, Any]]:
        """Training runs this cloud has kept, newest first."""
        return [run.to_json() for run in ml.runs()]

    @api.get("/ml/runs/{run_id}")
    def get_run(run_id: str) -> dict[str, Any]:
        """One training run: its state, progress and outcome."""
        return ml.run(run_id).to_json()

    @api.get("/ml/models")
    def list_models() -> list[dict[str, Any]]:
        """Every model: its latest version, its aliases, its latest metrics."""
        return [summary.to_json() for summary in ml.models.list_models()]

    @api.get("/ml/models/{name}")
    def get_model(name: str) -> dict[str, Any]:
        """A model's versions (newest first) and its aliases' history (oldest first)."""
        versions = ml.models.versions(name)
        return {
            "name": name,
            "versions": [v.to_json() for v in versions],
            "aliases": {a: v.version for v in versions for a in v.aliases},
            "aliasHistory": [c.to_json() for c in ml.models.alias_history(name)],
        }

    @api.get("/ml/models/{name}/versions/{ref}")
    def get_version(name: str, ref: str) -> dict[str, Any]:
        """One version, by number, alias or ``latest``."""
        return ml.models.get(name, ref).to_json()

    @api.get(
        "/ml/models/{name}/versions/{ref}/artifact",
        responses={200: {"content": {"application/json": {}}}},
    )
    def get_artifact(name: str, ref: str) -> Response:
        """The version's model document (checked against its SHA-256)."""
        return Response(ml.models.artifact(name, ref), media_type="application/json")

    @api.post("/ml/models/{name}/aliases/{alias}")
    def set_alias(name: str, alias: str, body: AliasRequest) -> dict[str, Any]:
        """Point an alias at a version; the change is added to the alias's history."""
        return ml.models.set_alias(
            name, alias, body.version, who=body.by, reason=body.reason
        ).to_json()

    @api.post("/ml/models/{name}/versions/{ref}/package")
    def package_version(name: str, ref: str) -> dict[str, Any]:
        """Publish the version as the component ``edgeloop.model.<name>``."""
        return ml.package(name, ref).to_json()

    @api.get("/ml/datasets/{digest}")
    def get_dataset(digest: str) -> dict[str, Any]:
        """A stored dataset snapshot."""
        return ml.datasets.get(digest).to_json()

    return api
