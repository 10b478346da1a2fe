"""The component registry on SQLite and PostgreSQL, over a local folder and S3 (moto)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from edgeloop.cloud import components as components_module
from edgeloop.cloud.components import (
    BLOB_PREFIX,
    ComponentArtifactRow,
    ComponentRegistry,
    ComponentVersionRow,
)
from edgeloop.cloud.db import Base, Database, EventRow
from edgeloop.cloud.objectstore import LocalObjectStore, ObjectInfo, ObjectStore, S3ObjectStore
from edgeloop.cloud.signing import (
    SIGNING_KEY_FILE,
    SignatureError,
    UrlSigner,
    artifact_resource,
    recipe_resource,
)
from edgeloop.core.errors import (
    ArtifactError,
    ConflictError,
    NotFoundError,
    RecipeError,
    ValidationError,
)
from edgeloop.core.recipe import parse_recipe
from edgeloop.core.registry_uri import RegistryRef, parse_registry_uri

from .test_objectstore import s3_endpoint

__all__ = ["s3_endpoint"]

TABLES = ("component_versions", "component_blobs", "component_artifacts")
SECRET = b"k" * 32


def recipe_yaml(name: str, version: str = "1.0.0", *, extra: str = "") -> str:
    """A two-platform recipe sharing app.py, with a model only on Linux."""
    return f"""\
RecipeFormatVersion: '2020-01-25'
ComponentName: {name}
ComponentVersion: '{version}'
ComponentDescription: detects anomalies
ComponentPublisher: edgeloop tests
Manifests:
  - Platform: {{os: linux}}
    Artifacts:
      - URI: s3://bucket/{name}/app.py
        Permission: {{Read: ALL, Execute: OWNER}}
      - Uri: https://models.example.com/model.onnx?version=3
        Unarchive: NONE
{extra}    Lifecycle:
      Run: python3 {{artifacts:path}}/app.py
  - Platform: {{os: darwin}}
    Artifacts:
      - uri: s3://bucket/{name}/app.py
    Lifecycle:
      Run: python3 {{artifacts:path}}/app.py
"""


@dataclass
class Bench:
    """A registry, the folder its inputs live in, and the recipe's artifact files."""

    registry: ComponentRegistry
    tmp: Path
    artifacts: Path
    files: dict[str, bytes] = field(default_factory=dict)

    def write_recipe(self, text: str, name: str = "recipe.yaml") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def add(self, file: str, data: bytes) -> str:
        (self.artifacts / file).write_bytes(data)
        self.files[file] = data
        return hashlib.sha256(data).hexdigest()


def _bench(registry: ComponentRegistry, tmp: Path) -> Bench:
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    bench = Bench(registry, tmp, artifacts)
    bench.add("app.py", b"print('anomaly detector')\n" * 50)
    bench.add("model.onnx", os.urandom(3000))
    return bench


@pytest.fixture(params=["local", "s3"])
def objects(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = S3ObjectStore(f"c-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint, prefix="cloud")
    s3.ensure_bucket()
    return s3


@pytest.fixture
def bench(database: Database, objects: ObjectStore, tmp_path: Path) -> Bench:
    """Every backend pair: SQLite|PostgreSQL by folder|S3."""
    return _bench(ComponentRegistry(database, objects, UrlSigner(SECRET)), tmp_path)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Bench]:
    """SQLite and a folder: for the many checks that do not depend on the backends."""
    db = Database(f"sqlite:///{tmp_path / 'edgeloop.db'}")
    db.migrate()
    registry = ComponentRegistry(db, LocalObjectStore(tmp_path / "objects"), UrlSigner(SECRET))
    yield _bench(registry, tmp_path)
    db.dispose()


def _name() -> str:
    return f"com.example.C{uuid.uuid4().hex[:8]}"


# -- schema ----------------------------------------------------------------------------------


def test_the_migration_creates_exactly_the_models(database: Database) -> None:
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diffs = [
            diff
            for diff in compare_metadata(context, Base.metadata)
            if any(table in repr(diff) for table in TABLES)
        ]
    assert diffs == []


# -- publishing ------------------------------------------------------------------------------


def test_publish_stores_blobs_and_rewrites_the_recipe(bench: Bench) -> None:
    name = _name()
    recipe = bench.write_recipe(recipe_yaml(name))
    published = bench.registry.publish_dir(recipe, bench.artifacts)
    assert published.created
    version = published.version
    assert (version.name, version.version) == (name, "1.0.0")
    assert version.description == "detects anomalies"
    assert version.publisher == "edgeloop tests"

    # Every artifact now points at the registry, with its SHA-256, in the file's spelling.
    manifests = version.recipe["Manifests"]
    linux, darwin = manifests[0]["Artifacts"], manifests[1]["Artifacts"]
    app_sha = hashlib.sha256(bench.files["app.py"]).digest()
    assert linux[0] == {
        "URI": f"edgeloop://components/{name}/1.0.0/app.py",
        "Digest": base64.b64encode(app_sha).decode(),
        "Algorithm": "SHA-256",
        "Permission": {"Read": "ALL", "Execute": "OWNER"},
    }
    assert linux[1]["Uri"] == f"edgeloop://components/{name}/1.0.0/model.onnx"
    assert linux[1]["Unarchive"] == "NONE"
    assert darwin[0]["uri"] == linux[0]["URI"]

    # The hub's parser takes the published recipe as it is.
    hub_view = parse_recipe(json.dumps(version.recipe), source="published", fmt="json")
    assert [a.file_name for a in hub_view.manifests[0].artifacts] == ["app.py", "model.onnx"]
    assert hub_view.manifests[0].artifacts[0].read == "ALL"

    # One blob per distinct file, content-addressed, in the object store.
    assert {(a.file, a.size) for a in version.artifacts} == {
        ("app.py", len(bench.files["app.py"])),
        ("model.onnx", 3000),
    }
    for artifact in version.artifacts:
        assert (
            bench.registry.objects.get(BLOB_PREFIX + artifact.sha256)
            == (bench.files[artifact.file])
        )
        assert artifact.uri == f"edgeloop://components/{name}/1.0.0/{artifact.file}"
    assert version.size == len(bench.files["app.py"]) + 3000

    # Read back the way the API and the CLI see it.
    assert bench.registry.get(name, "1.0.0") == version
    assert bench.registry.get(name) == version
    (summary,) = bench.registry.list_components(prefix=name)
    assert summary.versions == ("1.0.0",) and summary.latest == "1.0.0"
    model = bench.registry.artifact(name, "1.0.0", "model.onnx")
    assert b"".join(bench.registry.read(model)) == bench.files["model.onnx"]
    assert b"".join(bench.registry.read(model, 100, 250)) == bench.files["model.onnx"][100:250]


def test_versions_are_immutable_and_republishing_is_idempotent(bench: Bench) -> None:
    name = _name()
    recipe = bench.write_recipe(recipe_yaml(name))
    first = bench.registry.publish_dir(recipe, bench.artifacts)
    again = bench.registry.publish_dir(recipe, bench.artifacts)
    assert not again.created
    assert again.version == first.version

    # The published recipe itself publishes as the same version, artifacts from the registry.
    as_published = bench.registry.publish(
        json.dumps(first.version.recipe), source="published.json", artifacts={}
    )
    assert not as_published.created and as_published.version == first.version

    bench.add("model.onnx", b"a retrained model")
    with pytest.raises(ConflictError, match=rf"{name} 1\.0\.0 is already published with diff"):
        bench.registry.publish_dir(recipe, bench.artifacts)
    changed = recipe_yaml(name).replace("detects anomalies", "finds faults")
    with pytest.raises(ConflictError, match="versions are immutable"):
        bench.registry.publish_dir(bench.write_recipe(changed, "v1b.yaml"), bench.artifacts)
    assert bench.registry.get(name, "1.0.0") == first.version

    # A new version is the way: listed newest first, semver order.
    for version in ("1.10.0", "1.2.0", "1.2.0-rc.1"):
        bench.registry.publish_dir(
            bench.write_recipe(recipe_yaml(name, version), f"{version}.yaml"), bench.artifacts
        )
    assert [v.version for v in bench.registry.versions(name)] == [
        "1.10.0",
        "1.2.0",
        "1.2.0-rc.1",
        "1.0.0",
    ]
    assert bench.registry.get(name).version == "1.10.0"


def test_delete_is_refused_while_a_deployment_uses_the_version(bench: Bench) -> None:
    registry = bench.registry
    name = _name()
    v1 = registry.publish_dir(bench.write_recipe(recipe_yaml(name)), bench.artifacts).version
    bench.add("model.onnx", b"model two")
    v2 = registry.publish_dir(
        bench.write_recipe(recipe_yaml(name, "2.0.0"), "v2.yaml"), bench.artifacts
    ).version

    # A deployment table as the deployment engine keeps one: what each active one runs.
    deployments = Deployments()
    deployments.create("rollout-42", {name: "1.0.0"})
    remove = registry.add_in_use_check(deployments.using)
    with pytest.raises(ConflictError, match=rf"{name} 1\.0\.0 is in use by deployment rollout-42"):
        registry.delete(name, "1.0.0")
    assert registry.get(name, "1.0.0") == v1

    deployments.finish("rollout-42")
    deleted = registry.delete(name, "1.0.0")
    assert deleted == v1
    with pytest.raises(NotFoundError, match=r"no version named '1\.0\.0'"):
        registry.get(name, "1.0.0")
    with pytest.raises(NotFoundError, match=r"no version named '1\.0\.0'"):
        registry.delete(name, "1.0.0")
    assert [v.version for v in registry.versions(name)] == ["2.0.0"]

    # Its model blob is unused now, app.py is shared with 2.0.0: only the first may go,
    # and only once it is older than the grace period.
    old_model = next(a for a in v1.artifacts if a.file == "model.onnx")
    assert registry.collect_garbage().blobs == 0
    assert registry.objects.head(old_model.key) is not None
    collected = registry.collect_garbage(grace=timedelta(0))
    assert (collected.blobs, collected.bytes_freed) == (1, old_model.size)
    assert registry.objects.head(old_model.key) is None
    for artifact in v2.artifacts:
        assert registry.objects.head(artifact.key) is not None

    remove()
    deployments.create("rollout-43", {name: "2.0.0"})
    registry.delete(name, "2.0.0")  # the check is gone
    with pytest.raises(NotFoundError, match=f"no component named '{name}'"):
        registry.versions(name)
    kinds = [
        e.kind
        for e in _events(registry.db)
        if e.subject in (f"component:{name}@1.0.0", f"component:{name}@2.0.0")
    ]
    assert kinds == ["component.published"] * 2 + ["component.deleted"] * 2


class Deployments:
    """A stand-in deployment engine's state: it answers the registry's in-use question."""

    def __init__(self) -> None:
        self.active: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()

    def create(self, deployment: str, components: dict[str, str]) -> None:
        with self.lock:
            self.active[deployment] = components

    def finish(self, deployment: str) -> None:
        with self.lock:
            del self.active[deployment]

    def using(self, name: str, version: str) -> str | None:
        with self.lock:
            return next(
                (d for d, comps in sorted(self.active.items()) if comps.get(name) == version),
                None,
            )


def _events(db: Database) -> list[EventRow]:
    with db.read() as session:
        return list(session.scalars(select(EventRow).order_by(EventRow.id)))


# -- publishing: bad input -------------------------------------------------------------------


def test_bad_recipes_and_missing_files_are_named(local: Bench) -> None:
    registry, name = local.registry, _name()
    broken = local.write_recipe(
        recipe_yaml(name).replace("ComponentVersion: '1.0.0'", "ComponentVersion: 1.0"), "b.yaml"
    )
    with pytest.raises(RecipeError, match=r"b\.yaml: ComponentVersion: must be a string"):
        registry.publish_dir(broken, local.artifacts)

    (local.artifacts / "model.onnx").unlink()
    recipe = local.write_recipe(recipe_yaml(name))
    with pytest.raises(ArtifactError) as caught:
        registry.publish_dir(recipe, local.artifacts)
    assert caught.value.source == str(recipe)
    assert caught.value.field == "Manifests[0].Artifacts[1].Uri"
    assert "artifact file 'model.onnx' is not there" in str(caught.value)
    with pytest.raises(ArtifactError, match="--artifacts DIR"):
        registry.publish_dir(recipe, None)
    with pytest.raises(ArtifactError, match="is not a folder"):
        registry.publish_dir(recipe, local.tmp / "nowhere")
    with pytest.raises(RecipeError, match=r"unsupported recipe file type '\.txt'"):
        registry.publish_dir(local.write_recipe("x", "r.txt"), local.artifacts)
    # Nothing of it was published.
    assert registry.list_components(prefix=name) == []


def test_a_stated_digest_is_checked(local: Bench) -> None:
    name = _name()
    good = base64.b64encode(hashlib.sha256(local.files["model.onnx"]).digest()).decode()
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    sha512 = base64.b64encode(hashlib.sha512(local.files["model.onnx"]).digest()).decode()

    def with_digest(digest: str, algorithm: str = "SHA-256") -> Path:
        extra = f"        Digest: {digest}\n        Algorithm: {algorithm}\n"
        return local.write_recipe(recipe_yaml(name, extra=extra), f"{uuid.uuid4().hex}.yaml")

    with pytest.raises(ArtifactError) as caught:
        local.registry.publish_dir(with_digest(wrong), local.artifacts)
    assert caught.value.field == "Manifests[0].Artifacts[1].Digest"
    assert f"the recipe says SHA-256 {wrong}, the file has {good}" in str(caught.value)

    # Another algorithm is checked too; the published recipe carries SHA-256.
    published = local.registry.publish_dir(with_digest(sha512, "SHA-512"), local.artifacts)
    model = published.version.recipe["Manifests"][0]["Artifacts"][1]
    assert (model["Digest"], model["Algorithm"]) == (good, "SHA-256")


def test_registry_uris_reuse_published_artifacts(local: Bench) -> None:
    registry, name = local.registry, _name()
    v1 = registry.publish_dir(local.write_recipe(recipe_yaml(name)), local.artifacts).version
    # 1.1.0 changes only the code: the model is named by its registry URI, not uploaded.
    text = recipe_yaml(name, "1.1.0").replace(
        "https://models.example.com/model.onnx?version=3",
        f"edgeloop://components/{name}/1.0.0/model.onnx",
    )
    empty = local.tmp / "only-code"
    empty.mkdir()
    (empty / "app.py").write_bytes(b"print('v1.1')\n")
    v11 = registry.publish_dir(local.write_recipe(text, "v11.yaml"), empty).version
    model = {a.file: a for a in v11.artifacts}["model.onnx"]
    assert model.sha256 == {a.file: a for a in v1.artifacts}["model.onnx"].sha256
    assert model.uri == f"edgeloop://components/{name}/1.1.0/model.onnx"

    missing = text.replace(f"{name}/1.0.0/model.onnx", f"{name}/0.9.0/model.onnx")
    with pytest.raises(ArtifactError) as caught:
        registry.publish_dir(local.write_recipe(missing.replace("1.1.0", "1.2.0"), "m.yaml"), empty)
    assert caught.value.field == "Manifests[0].Artifacts[1].Uri"
    assert f"edgeloop://components/{name}/0.9.0/model.onnx is not in the registry" in str(
        caught.value
    )


def test_the_nested_artifact_layout_is_found(local: Bench) -> None:
    name = _name()
    nested = local.tmp / "nested" / name / "1.0.0"
    nested.mkdir(parents=True)
    for file, data in local.files.items():
        (nested / file).write_bytes(data)
    published = local.registry.publish_dir(
        local.write_recipe(recipe_yaml(name)), local.tmp / "nested"
    )
    assert {a.file for a in published.version.artifacts} == {"app.py", "model.onnx"}


def test_publish_over_uploaded_blobs_checks_them(local: Bench) -> None:
    registry, name = local.registry, _name()
    text = recipe_yaml(name)
    app = registry.put_blob(local.files["app.py"])
    assert app.created and not registry.put_blob(local.files["app.py"]).created
    with pytest.raises(ArtifactError, match="upload's SHA-256 is") as caught:
        registry.put_blob(b"truncated", expected_sha256=app.sha256)
    assert caught.value.field == "sha256"

    with pytest.raises(ArtifactError) as caught:
        registry.publish(text, source="r.yaml", artifacts={"app.py": app.sha256})
    assert caught.value.field == "Manifests[0].Artifacts[1].Uri"
    assert "'model.onnx' was not uploaded" in str(caught.value)

    unknown = hashlib.sha256(b"never uploaded").hexdigest()
    with pytest.raises(ArtifactError, match=f"no blob {unknown} for artifact 'model.onnx'") as c2:
        registry.publish(
            text, source="r.yaml", artifacts={"app.py": app.sha256, "model.onnx": unknown}
        )
    assert c2.value.field == "artifacts.model.onnx"

    with pytest.raises(ValidationError, match="is not a SHA-256 digest") as c3:
        registry.publish(text, source="r.yaml", artifacts={"app.py": "abc"})
    assert c3.value.field == "artifacts.app.py"

    model = registry.put_blob(local.files["model.onnx"])
    files = {"app.py": app.sha256, "model.onnx": model.sha256, "README.md": app.sha256}
    with pytest.raises(ArtifactError, match=r"'README\.md' was uploaded but the recipe names no"):
        registry.publish(text, source="r.yaml", artifacts=files)
    del files["README.md"]
    assert registry.publish(text, source="r.yaml", artifacts=files).created


class FailingStore:
    """An object store whose puts fail after ``allowed`` of them (a full disk, S3 down)."""

    def __init__(self, inner: ObjectStore, allowed: int) -> None:
        self.inner = inner
        self.allowed = allowed

    def put(self, key: str, data: bytes) -> ObjectInfo:
        if self.allowed <= 0:
            raise OSError(28, "No space left on device")
        self.allowed -= 1
        return self.inner.put(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_failed_publish_leaves_no_version_and_its_blobs_are_collected(local: Bench) -> None:
    registry = local.registry
    failing = ComponentRegistry(
        registry.db,
        FailingStore(registry.objects, allowed=1),
        registry.signer,  # type: ignore[arg-type]
    )
    name = _name()
    recipe = local.write_recipe(recipe_yaml(name))
    with pytest.raises(OSError, match="No space left"):
        failing.publish_dir(recipe, local.artifacts)
    with registry.db.read() as session:
        assert (
            session.scalars(
                select(ComponentVersionRow).where(ComponentVersionRow.name == name)
            ).all()
            == []
        )
        assert (
            session.scalars(
                select(ComponentArtifactRow).where(ComponentArtifactRow.name == name)
            ).all()
            == []
        )
    # The one blob stored is an orphan (and the one that failed, a row without an
    # object): harmless, and collected after the grace period.
    assert len(list(registry.objects.list(BLOB_PREFIX))) == 1
    assert registry.collect_garbage(grace=timedelta(0)).blobs == 2
    assert list(registry.objects.list(BLOB_PREFIX)) == []

    # A publish that fails inside the transaction (here: the clock) leaves nothing either.
    def broken_clock() -> datetime:
        raise RuntimeError("clock failed")

    stored = ComponentRegistry(registry.db, registry.objects, registry.signer)
    for file in local.files:
        stored.put_blob_file(local.artifacts / file)
    stored.clock = broken_clock
    with pytest.raises(RuntimeError, match="clock failed"):
        stored.publish(
            recipe.read_text(),
            source=str(recipe),
            artifacts={f: hashlib.sha256(d).hexdigest() for f, d in local.files.items()},
        )
    assert registry.list_components(prefix=name) == []
    assert registry.publish_dir(recipe, local.artifacts).created


def test_garbage_collection_never_takes_a_blob_a_publish_uses(local: Bench) -> None:
    registry, name = local.registry, _name()
    old = datetime.now(UTC) - timedelta(days=1)
    registry.clock = lambda: old
    for file in local.files:
        registry.put_blob_file(local.artifacts / file)  # stored a day ago, unused since
    registry.clock = lambda: datetime.now(UTC)
    shas = {f: hashlib.sha256(d).hexdigest() for f, d in local.files.items()}
    # Publishing re-stamps them in its transaction: a collection after it keeps them.
    registry.publish(recipe_yaml(name), source="r.yaml", artifacts=shas)
    assert registry.collect_garbage(grace=timedelta(hours=1)).blobs == 0
    assert len(list(registry.objects.list(BLOB_PREFIX))) == 2


def test_links_for_a_thing_are_signed_for_it(local: Bench) -> None:
    name = _name()
    version = local.registry.publish_dir(
        local.write_recipe(recipe_yaml(name)), local.artifacts
    ).version
    links = local.registry.links_for_thing(
        name, "1.0.0", thing="hub-1", base_url="https://cloud.example:8440/", lifetime=60
    )
    assert links.recipe == version.recipe
    assert set(links.urls()) == {a.uri for a in version.artifacts}
    for signed in links.artifacts:
        url = urlsplit(signed.url)
        assert (url.scheme, url.netloc) == ("https", "cloud.example:8440")
        ref = parse_registry_uri(signed.uri)
        assert url.path == ref.signed_path
        params = dict(parse_qsl(url.query))
        assert local.registry.signer.verify(artifact_resource(ref), params) == "hub-1"
        # A link for one artifact opens no other.
        other = RegistryRef(name, "1.0.0", "other.bin")
        with pytest.raises(SignatureError):
            local.registry.signer.verify(artifact_resource(other), params)
    recipe_params = dict(parse_qsl(urlsplit(links.recipe_url).query))
    assert local.registry.signer.verify(recipe_resource(name, "1.0.0"), recipe_params) == "hub-1"
    document = links.to_json()
    assert document["thingName"] == "hub-1" and len(document["artifacts"]) == 2
    with pytest.raises(ValidationError, match="between 1 and 604800 seconds") as caught:
        local.registry.links_for_thing(name, "1.0.0", thing="t", base_url="http://x", lifetime=0)
    assert caught.value.field == "lifetime"


# -- signatures ------------------------------------------------------------------------------


def test_signatures_expire_and_resist_tampering() -> None:
    now = [1_700_000_000.0]
    signer = UrlSigner(SECRET, clock=lambda: now[0])
    params = signer.sign("artifact\nA\n1.0.0\nf", thing="hub-1", lifetime=900)
    assert params["expires"] == str(1_700_000_900)
    assert signer.verify("artifact\nA\n1.0.0\nf", params) == "hub-1"

    for changed in ({"thing": "hub-2"}, {"expires": str(1_800_000_000)}, {"signature": "AAAA"}):
        with pytest.raises(SignatureError, match="does not match") as caught:
            signer.verify("artifact\nA\n1.0.0\nf", {**params, **changed})
        assert caught.value.field == "signature"
    with pytest.raises(SignatureError, match="does not match"):
        UrlSigner(b"x" * 32).verify("artifact\nA\n1.0.0\nf", params)
    for missing in ("signature", "expires", "thing"):
        with pytest.raises(SignatureError, match=f"the link has no {missing}") as caught:
            signer.verify("r", {**params, missing: None})
        assert caught.value.field == missing
    with pytest.raises(SignatureError, match="not a Unix time"):
        signer.verify("r", {**params, "expires": "soon"})

    now[0] += 900
    with pytest.raises(SignatureError, match=r"the link expired at 2023-11-14T22:28:20\+00:00"):
        signer.verify("artifact\nA\n1.0.0\nf", params)


def test_the_install_secret_is_private_and_kept(tmp_path: Path) -> None:
    first = UrlSigner.in_data_dir(tmp_path)
    path = tmp_path / SIGNING_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    params = first.sign("r", thing="t")
    assert UrlSigner.in_data_dir(tmp_path).verify("r", params) == "t"  # a restart keeps it
    path.chmod(0o644)
    UrlSigner.in_data_dir(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    with pytest.raises(ValidationError, match="is not a hex secret"):
        UrlSigner.in_data_dir(tmp_path)


def test_signers_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    signers: list[UrlSigner] = []

    def start() -> None:
        barrier.wait()
        signers.append(UrlSigner.in_data_dir(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    params = signers[0].sign("r", thing="t")
    assert all(s.verify("r", params) == "t" for s in signers)
    assert [p.name for p in tmp_path.iterdir()] == [SIGNING_KEY_FILE]


def test_reading_crosses_chunk_boundaries(local: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(components_module, "_CHUNK", 7)
    name = _name()
    local.registry.publish_dir(local.write_recipe(recipe_yaml(name)), local.artifacts)
    model = local.registry.artifact(name, "1.0.0", "model.onnx")
    data = local.files["model.onnx"]
    assert b"".join(local.registry.read(model)) == data
    assert b"".join(local.registry.read(model, 5, 40)) == data[5:40]
    assert b"".join(local.registry.read(model, 2990, 10_000)) == data[2990:]
    with pytest.raises(NotFoundError, match=r"no artifact named 'nope\.bin'"):
        local.registry.artifact(name, "1.0.0", "nope.bin")
    with pytest.raises(NotFoundError, match=r"no version named '9\.9\.9'"):
        local.registry.artifact(name, "9.9.9", "model.onnx")


def test_in_use_checks_may_read_the_database(tmp_path: Path) -> None:
    # An in-memory database has one connection: a check that reads it while the delete
    # held a transaction open would fail to start its own.
    db = Database("sqlite://")
    db.migrate()
    registry = ComponentRegistry(db, LocalObjectStore(tmp_path / "objects"), UrlSigner(SECRET))
    bench = _bench(registry, tmp_path)
    name = _name()
    registry.publish_dir(bench.write_recipe(recipe_yaml(name)), bench.artifacts)

    def reads(n: str, v: str) -> str | None:
        with db.read() as session:
            found = session.get(ComponentVersionRow, (n, v))
        return "dep-1" if found is not None and v == "9.9.9" else None

    registry.add_in_use_check(reads)
    assert registry.delete(name, "1.0.0").version == "1.0.0"
    db.dispose()
