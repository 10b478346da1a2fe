"""A registered model version as a component: the model-store pattern.

``package`` publishes model ``NAME`` version ``N`` to the component registry as
``edgeloop.model.NAME`` version ``N.0.0``: a component with no lifecycle, only the model's
JSON document as its artifact ``model.json``, and the model's facts in its default
configuration. The inference component depends on it and reads
``{edgeloop.model.NAME:artifacts:path}/model.json``; so code and model versions move
independently, each through the fleet's deployments and their staged rollouts (a canary
first, then waves), and a hub rolls back to the model it had when a new one is unhealthy.

Packaging is idempotent: publishing the same version again is a no-op (the component
registry keeps versions immutable), and its content is the registered artifact, checked
against the registry's SHA-256 on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeloop.cloud.components import ComponentRegistry, ComponentVersion
from edgeloop.cloud.ml.registry import ARTIFACT, ModelRegistry, ModelVersion

__all__ = ["COMPONENT_PREFIX", "Packaged", "component_name", "package", "recipe_for"]

COMPONENT_PREFIX = "edgeloop.model."


@dataclass(frozen=True)
class Packaged:
    """The component a model version became."""

    model: ModelVersion
    component: ComponentVersion
    created: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model.name, "version": self.model.version},
            "componentName": self.component.name,
            "componentVersion": self.component.version,
            "created": self.created,
            "artifacts": [
                {"file": a.file, "uri": a.uri, "sha256": a.sha256, "size": a.size}
                for a in self.component.artifacts
            ],
            "recipe": self.component.recipe,
        }


def component_name(model: str) -> str:
    """The component a model's versions are published as."""
    return f"{COMPONENT_PREFIX}{model}"


def recipe_for(version: ModelVersion) -> dict[str, Any]:
    """The recipe of a model version's component (artifact URI rewritten on publishing)."""
    name = component_name(version.name)
    metrics = version.metrics
    summary = {k: metrics[k] for k in ("precision", "recall", "f1") if k in metrics}
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": f"{version.version}.0.0",
        "ComponentType": "aws.greengrass.generic",
        "ComponentDescription": (
            f"Anomaly model {version.name} v{version.version} for the {version.appliance} "
            f"appliance kind" + (f" (kit {version.device})" if version.device else "")
        ),
        "ComponentPublisher": "edgeloop",
        "ComponentConfiguration": {
            "DefaultConfiguration": {
                "model": version.name,
                "modelVersion": version.version,
                "appliance": version.appliance,
                "scope": version.scope,
                "device": version.device,
                "file": ARTIFACT,
                "sha256": version.artifact_sha256,
                "datasetHash": version.dataset_hash,
                "codeVersion": version.code_version,
                "metrics": summary,
            }
        },
        "Manifests": [{"Platform": {"os": "*"}, "Artifacts": [{"Uri": f"s3://models/{ARTIFACT}"}]}],
    }


def package(
    models: ModelRegistry, components: ComponentRegistry, name: str, ref: int | str | None
) -> Packaged:
    """Publish model version ``ref`` of ``name`` (a number, an alias, or the latest)."""
    version = models.get(name, ref)
    artifact = models.artifact(name, version.version)  # checked against its SHA-256
    blob = components.put_blob(artifact, expected_sha256=version.artifact_sha256)
    published = components.publish(
        recipe_for(version),
        source=f"model {name}@{version.version}",
        artifacts={ARTIFACT: blob.sha256},
    )
    return Packaged(version, published.version, published.created)
