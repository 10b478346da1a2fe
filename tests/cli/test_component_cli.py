"""`edgeloop cloud component …` as a user runs it: the console script against a running cloud."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_cloud_cli import cli, json_out, ok, one_error_line, together
from tests.cloud.test_cloud_up import RunningCloud


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def component(tmp: Path, version: str = "1.0.0", *, model: bytes | None = None) -> tuple[str, Path]:
    """A recipe and its artifacts folder; returns the component's name and the recipe."""
    name = f"com.example.Cli{uuid.uuid4().hex[:8]}"
    folder = tmp / "artifacts"
    folder.mkdir(exist_ok=True)
    (folder / "run.py").write_text("print('hello')\n")
    (folder / "model.bin").write_bytes(model if model is not None else os.urandom(4000))
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(
        f"""\
RecipeFormatVersion: '2020-01-25'
ComponentName: {name}
ComponentVersion: '{version}'
ComponentDescription: a test component
Manifests:
  - Artifacts:
      - URI: s3://bucket/run.py
      - URI: s3://bucket/model.bin
    Lifecycle:
      Run: python3 {{artifacts:path}}/run.py
"""
    )
    return name, recipe


def test_publish_list_show_and_delete(cloud: RunningCloud, tmp_path: Path) -> None:
    name, recipe = component(tmp_path)
    folder = tmp_path / "artifacts"
    first = cli(cloud, "component", "publish", recipe, "--artifacts", folder)
    assert ok(first) == (f"published {name} 1.0.0: 2 artifacts, 4.0 kB (2 uploaded)\n")
    again = json_out(cli(cloud, "component", "publish", recipe, "--artifacts", folder, "--json"))
    assert again["created"] is False and again["uploaded"] == []
    assert ok(cli(cloud, "component", "publish", recipe, "--artifacts", folder)) == (
        f"{name} 1.0.0 is already published with this content\n"
    )
    v2 = recipe.read_text().replace("'1.0.0'", "'1.1.0'")
    (tmp_path / "v2.yaml").write_text(v2)
    published = json_out(
        cli(cloud, "component", "publish", tmp_path / "v2.yaml", "--artifacts", folder, "--json")
    )
    assert published["componentVersion"] == "1.1.0"
    assert published["uploaded"] == []  # the registry had both files already
    uris = [a["uri"] for a in published["artifacts"]]
    assert uris == [
        f"edgeloop://components/{name}/1.1.0/model.bin",
        f"edgeloop://components/{name}/1.1.0/run.py",
    ]

    listed, table, versions, one, detail = together(
        cloud,
        ("component", "list", "--prefix", name, "--json"),
        ("component", "list", "--prefix", name),
        ("component", "show", name),
        ("component", "show", name, "1.0.0"),
        ("component", "show", name, "1.0.0", "--json"),
    )
    assert [(c["componentName"], c["versions"]) for c in json_out(listed)] == [
        (name, ["1.1.0", "1.0.0"])
    ]
    assert name in ok(table) and "a test component" in ok(table)
    assert "1.1.0" in ok(versions) and "4.0 kB" in ok(versions)
    model = (tmp_path / "artifacts" / "model.bin").read_bytes()
    assert hashlib.sha256(model).hexdigest() in ok(one)
    assert f"edgeloop://components/{name}/1.0.0/run.py" in ok(one)
    assert json_out(detail)["recipe"]["ComponentName"] == name

    assert ok(cli(cloud, "component", "delete", name, "1.0.0")) == f"deleted {name} 1.0.0\n"
    line = one_error_line(cli(cloud, "component", "show", name, "1.0.0"))
    assert line == f"error: no version named '1.0.0' (of component {name})"


def test_a_changed_version_and_one_in_use_are_refused(cloud: RunningCloud, tmp_path: Path) -> None:
    name, recipe = component(tmp_path)
    folder = tmp_path / "artifacts"
    ok(cli(cloud, "component", "publish", recipe, "--artifacts", folder))
    (folder / "model.bin").write_bytes(b"retrained")
    line = one_error_line(cli(cloud, "component", "publish", recipe, "--artifacts", folder))
    assert line == (
        f"error: {name} 1.0.0 is already published with different content; component "
        "versions are immutable: publish the change as a new version"
    )

    assert cloud.cloud.ctx is not None
    remove = cloud.cloud.ctx.components.add_in_use_check(
        lambda n, v: "fleet-rollout-3" if (n, v) == (name, "1.0.0") else None
    )
    try:
        line = one_error_line(cli(cloud, "component", "delete", name, "1.0.0"))
        assert line == (
            f"error: {name} 1.0.0 is in use by deployment fleet-rollout-3; cancel or replace "
            "that deployment first"
        )
    finally:
        remove()


def test_bad_input_is_named(cloud: RunningCloud, tmp_path: Path) -> None:
    name, recipe = component(tmp_path)
    (tmp_path / "artifacts" / "model.bin").unlink()
    missing, no_folder, not_folder = together(
        cloud,
        ("component", "publish", recipe, "--artifacts", tmp_path / "artifacts"),
        ("component", "publish", recipe),
        ("component", "publish", recipe, "--artifacts", tmp_path / "nowhere"),
    )
    assert one_error_line(missing) == (
        f"error: {recipe}: Manifests[0].Artifacts[1].Uri: artifact file 'model.bin' is not "
        f"there: put it in {tmp_path / 'artifacts'} (as model.bin, or {name}/1.0.0/model.bin)"
    )
    assert one_error_line(no_folder).endswith("give the folder that holds it with --artifacts DIR")
    assert (
        one_error_line(not_folder) == f"error: --artifacts: {tmp_path / 'nowhere'} is not a folder"
    )

    broken = tmp_path / "broken.yaml"
    broken.write_text(recipe.read_text().replace("'1.0.0'", "1.0"))
    assert one_error_line(cli(cloud, "component", "publish", broken)).startswith(
        f"error: {broken}: ComponentVersion: must be a string such as '1.0.0'"
    )
    unknown = one_error_line(cli(cloud, "component", "show", "com.example.Missing"))
    assert unknown == (
        "error: no component named 'com.example.Missing' (publish it with: edgeloop cloud "
        "component publish)"
    )
    # Nothing of it reached the registry.
    assert json_out(cli(cloud, "component", "list", "--prefix", name, "--json")) == []


def test_artifacts_in_the_nested_layout(cloud: RunningCloud, tmp_path: Path) -> None:
    name, recipe = component(tmp_path)
    nested = tmp_path / "nested" / name / "1.0.0"
    nested.mkdir(parents=True)
    for file in ("run.py", "model.bin"):
        (tmp_path / "artifacts" / file).rename(nested / file)
    out = json_out(
        cli(cloud, "component", "publish", recipe, "--artifacts", tmp_path / "nested", "--json")
    )
    # run.py is the same file as other tests': the registry had it, only the model went.
    assert out["created"] is True and out["uploaded"] == ["model.bin"]
