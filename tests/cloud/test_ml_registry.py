"""The model registry on SQLite and PostgreSQL: numbered versions with their provenance and
checked artifacts, aliases with an append-only history, and packaging a version as a
component the component registry serves."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeloop.cloud.components import ComponentRegistry
from edgeloop.cloud.db import Database
from edgeloop.cloud.ml.dataset import DatasetRow
from edgeloop.cloud.ml.packaging import package
from edgeloop.cloud.ml.registry import ModelRegistry
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.cloud.signing import UrlSigner
from edgeloop.core.errors import ConflictError, NotFoundError, ValidationError
from edgeloop.core.recipe import parse_recipe

DATASET = "ab" * 32


@pytest.fixture
def models(database: Database, tmp_path: Path) -> ModelRegistry:
    with database.write() as session:
        session.add(
            DatasetRow(
                hash=DATASET,
                spec={},
                rows=1,
                appliances={},
                key="ml/datasets/x",
                size=1,
                created_at=datetime.now(UTC),
            )
        )
    return ModelRegistry(database, LocalObjectStore(tmp_path / "objects"))


def _register(models: ModelRegistry, name: str = "fridge", artifact: bytes = b"{}") -> int:
    return models.register(
        name,
        artifact=artifact,
        appliance="fridge",
        metrics={"f1": 0.9, "precision": 1.0, "recall": 0.8},
        params={"components": 8},
        dataset_hash=DATASET,
        code="0.1.0+git.abc",
        created_by="alice",
    ).version


def test_versions_are_numbered_and_keep_their_provenance(models: ModelRegistry) -> None:
    assert [_register(models, artifact=f"v{i}".encode()) for i in range(3)] == [1, 2, 3]
    assert _register(models, "pump") == 1
    second = models.get("fridge", 2)
    assert second.dataset_hash == DATASET and second.code_version == "0.1.0+git.abc"
    assert second.metrics["f1"] == 0.9 and second.params == {"components": 8}
    assert second.artifact_sha256 == hashlib.sha256(b"v1").hexdigest()
    assert models.artifact("fridge", 2) == b"v1"
    assert models.get("fridge").version == models.get("fridge", "latest").version == 3
    assert [v.version for v in models.versions("fridge")] == [3, 2, 1]
    summary = {m.name: m for m in models.list_models()}
    assert summary["fridge"].latest == 3 and summary["fridge"].versions == 3
    assert summary["pump"].latest_metrics["f1"] == 0.9


def test_concurrent_registrations_get_distinct_numbers(models: ModelRegistry) -> None:
    got: list[int] = []
    threads = [
        threading.Thread(target=lambda: got.append(_register(models, "washer"))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == [1, 2, 3, 4]


def test_aliases_move_and_their_history_is_kept(models: ModelRegistry) -> None:
    for _ in range(3):
        _register(models)
    models.set_alias("fridge", "champion", 1, who="alice", reason="first model")
    models.set_alias("fridge", "challenger", 2, who="bob")
    change = models.set_alias("fridge", "champion", "challenger", who="carol", reason="beat v1")
    assert (change.from_version, change.to_version) == (1, 2)
    assert models.get("fridge", "champion").version == 2
    assert models.get("fridge", 2).aliases == ("challenger", "champion")
    models.set_alias("fridge", "champion", 3, who="dave", reason="v3 wins")
    models.remove_alias("fridge", "challenger", who="erin", reason="done")
    history = [
        (c.alias, c.from_version, c.to_version, c.who, c.reason)
        for c in models.alias_history("fridge")
    ]
    assert history == [
        ("champion", None, 1, "alice", "first model"),
        ("challenger", None, 2, "bob", ""),
        ("champion", 1, 2, "carol", "beat v1"),
        ("champion", 2, 3, "dave", "v3 wins"),
        ("challenger", 2, None, "erin", "done"),
    ]
    assert [c.to_version for c in models.alias_history("fridge", "champion")] == [1, 2, 3]
    assert {m.name: m.aliases for m in models.list_models()} == {"fridge": {"champion": 3}}


def test_bad_names_unknown_versions_and_damaged_artifacts(
    models: ModelRegistry, tmp_path: Path
) -> None:
    _register(models)
    with pytest.raises(ValidationError, match="model name"):
        _register(models, "Fridge Model")
    with pytest.raises(ValidationError, match="alias"):
        models.set_alias("fridge", "Champion!", 1, who="x")
    with pytest.raises(NotFoundError, match="model version"):
        models.get("fridge", 9)
    with pytest.raises(NotFoundError, match="alias"):
        models.get("fridge", "champion")
    with pytest.raises(NotFoundError, match="model"):
        models.versions("nothing")
    with pytest.raises(ValidationError, match="dataset"):
        models.register(
            "fridge",
            artifact=b"{}",
            appliance="fridge",
            metrics={},
            params={},
            dataset_hash="cd" * 32,
        )
    (tmp_path / "objects" / "ml" / "models" / "fridge" / "1" / "model.json").write_bytes(b"[]")
    with pytest.raises(ConflictError, match="SHA-256"):
        models.artifact("fridge", 1)


def test_a_version_packaged_is_a_component_the_registry_serves(
    models: ModelRegistry, database: Database, tmp_path: Path
) -> None:
    _register(models, artifact=b'{"format": "model one"}')
    _register(models, artifact=b'{"format": "model two"}')
    models.set_alias("fridge", "champion", 2, who="alice")
    components = ComponentRegistry(
        database, LocalObjectStore(tmp_path / "objects"), UrlSigner(b"s" * 32)
    )
    packaged = package(models, components, "fridge", "champion")
    assert packaged.created
    assert (packaged.component.name, packaged.component.version) == (
        "edgeloop.model.fridge",
        "2.0.0",
    )
    served = components.get("edgeloop.model.fridge", "2.0.0")
    (artifact,) = served.artifacts
    assert artifact.file == "model.json"
    assert b"".join(components.read(artifact)) == b'{"format": "model two"}'
    recipe = parse_recipe(served.recipe, source="published")
    assert recipe.name == "edgeloop.model.fridge"
    configuration = served.recipe["ComponentConfiguration"]["DefaultConfiguration"]
    assert configuration["modelVersion"] == 2 and configuration["datasetHash"] == DATASET
    assert configuration["metrics"] == {"precision": 1.0, "recall": 0.8, "f1": 0.9}
    # Packaging again is a no-op; another version is another component version.
    assert not package(models, components, "fridge", 2).created
    assert package(models, components, "fridge", 1).component.version == "1.0.0"
