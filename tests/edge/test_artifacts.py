"""Tests for the hub's artifact store."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import pytest

from edgeloop.core.errors import ArtifactError
from edgeloop.edge import artifacts as artifacts_module
from edgeloop.edge.artifacts import ArtifactSpec, ArtifactStore, local_fetch

COMPONENT = "com.example.Sensor"


@dataclass(frozen=True)
class Art:
    """Stands in for edgeloop.core.recipe.Artifact."""

    uri: str
    digest: str | None = None
    algorithm: str = "SHA-256"
    unarchive: Literal["NONE", "ZIP"] = "NONE"
    read: Literal["NONE", "OWNER", "ALL"] = "OWNER"
    execute: Literal["NONE", "OWNER", "ALL"] = "NONE"

    @property
    def file_name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


def b64(data: bytes, algorithm: str = "sha256") -> str:
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode()


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicates we write on purpose
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root with its mode and content hash, to prove nothing changed."""
    seen: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            seen[str(path.relative_to(root))] = (st.st_mode, digest)
    return seen


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts-src"
    path.mkdir()
    return path


class Put(Protocol):
    def __call__(self, name: str, data: bytes, version: str = "1.0.0") -> None: ...


@pytest.fixture
def put(artifact_dir: Path) -> Put:
    def put(name: str, data: bytes, version: str = "1.0.0") -> None:
        folder = artifact_dir / COMPONENT / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    return put


def stage(
    store: ArtifactStore, artifact_dir: Path, arts: list[Art], version: str = "1.0.0"
) -> artifacts_module.StagedArtifacts:
    specs: list[ArtifactSpec] = list(arts)
    fetch = local_fetch(artifact_dir, COMPONENT, version)
    return store.stage(COMPONENT, version, specs, fetch, source="recipe.yaml")


# -- digests -------------------------------------------------------------------------------


def test_stage_with_base64_digest(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    put("run.py", b"print('hi')\n")
    staged = stage(store, artifact_dir, [Art("s3://b/run.py", digest=b64(b"print('hi')\n"))])

    assert staged.path == store.root / "artifacts" / COMPONENT / "1.0.0"
    assert staged.decompressed_path == store.root / "artifacts-unarchived" / COMPONENT / "1.0.0"
    assert (staged.path / "run.py").read_bytes() == b"print('hi')\n"
    assert staged.decompressed_path.is_dir()
    blob = store.root / "blobs" / "sha256" / hashlib.sha256(b"print('hi')\n").hexdigest()
    assert blob.read_bytes() == b"print('hi')\n"
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert store.paths_for(COMPONENT, "1.0.0") == staged
    assert store.staged() == {(COMPONENT, "1.0.0")}


@pytest.mark.parametrize(
    ("algorithm", "hashlib_name", "encode"),
    [
        ("SHA-256", "sha256", "hex"),
        ("SHA-1", "sha1", "b64"),
        ("SHA-384", "sha384", "b64"),
        ("SHA-512", "sha512", "hex"),
    ],
)
def test_other_algorithms_and_hex_digests(
    store: ArtifactStore,
    artifact_dir: Path,
    put: Put,
    algorithm: str,
    hashlib_name: str,
    encode: str,
) -> None:
    data = b"payload"
    digest = (
        hashlib.new(hashlib_name, data).hexdigest() if encode == "hex" else b64(data, hashlib_name)
    )
    put("a.bin", data)
    staged = stage(store, artifact_dir, [Art("s3://b/a.bin", digest=digest, algorithm=algorithm)])
    assert (staged.path / "a.bin").read_bytes() == data


def test_digest_mismatch_names_uri_and_both_digests(
    store: ArtifactStore, artifact_dir: Path, put: Put
) -> None:
    put("run.py", b"tampered")
    expected = b64(b"original")
    with pytest.raises(ArtifactError) as info:
        stage(store, artifact_dir, [Art("s3://bucket/run.py", digest=expected)])
    message = str(info.value)
    assert "s3://bucket/run.py" in message
    assert expected in message
    assert b64(b"tampered") in message
    assert info.value.source == "recipe.yaml"
    assert info.value.field == "Artifacts[0].Digest"
    assert not store.is_staged(COMPONENT, "1.0.0")


def test_malformed_digest_and_unknown_algorithm(
    store: ArtifactStore, artifact_dir: Path, put: Put
) -> None:
    put("a.bin", b"x")
    with pytest.raises(ArtifactError, match="neither base64 nor hex"):
        stage(store, artifact_dir, [Art("s3://b/a.bin", digest="not a digest!")])
    with pytest.raises(ArtifactError, match="unsupported digest algorithm 'MD5'"):
        stage(store, artifact_dir, [Art("s3://b/a.bin", digest=b64(b"x"), algorithm="MD5")])


def test_missing_file_names_expected_path(store: ArtifactStore, artifact_dir: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        stage(store, artifact_dir, [Art("s3://b/absent.py")])
    assert str(artifact_dir / COMPONENT / "1.0.0" / "absent.py") in str(info.value)
    assert "s3://b/absent.py" in str(info.value)


def test_bad_names_are_refused(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    with pytest.raises(ArtifactError, match="cannot name a folder"):
        store.stage("../evil", "1.0.0", [], local_fetch(artifact_dir, "x", "y"), source="r")
    put("a.py", b"1")
    with pytest.raises(ArtifactError, match=r"both named 'a\.py'"):
        stage(store, artifact_dir, [Art("s3://x/a.py"), Art("s3://y/a.py")])


# -- unarchiving ---------------------------------------------------------------------------


def test_zip_is_unarchived_into_stem_folder(
    store: ArtifactStore, artifact_dir: Path, put: Put
) -> None:
    put("app.zip", make_zip([("app/main.py", b"main"), ("lib/", b""), ("lib/util.py", b"u")]))
    staged = stage(store, artifact_dir, [Art("s3://b/app.zip", unarchive="ZIP")])
    root = staged.decompressed_path / "app"
    assert (root / "app" / "main.py").read_bytes() == b"main"
    assert (root / "lib" / "util.py").read_bytes() == b"u"
    assert (staged.path / "app.zip").is_file()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("../evil", "'..' component"),
        ("ok/../../evil", "'..' component"),
        ("/etc/evil", "absolute path"),
        ("C:/evil", "absolute path"),
        ("dir\\..\\evil", "backslash"),
    ],
)
def test_unsafe_zip_paths_are_refused(
    store: ArtifactStore, artifact_dir: Path, put: Put, entry: str, reason: str
) -> None:
    put("bad.zip", make_zip([("fine.txt", b"ok"), (zipfile.ZipInfo(entry), b"pwned")]))
    before = snapshot(store.root)
    with pytest.raises(ArtifactError, match=reason) as info:
        stage(store, artifact_dir, [Art("s3://b/bad.zip", unarchive="ZIP")])
    assert "s3://b/bad.zip" in str(info.value)
    assert snapshot(store.root) == before
    assert not list(store.root.parent.rglob("evil"))


def test_symlink_entries_are_refused(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    link = zipfile.ZipInfo("escape")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    put("bad.zip", make_zip([(link, b"../../../../etc"), ("escape/passwd", b"root::0:0")]))
    before = snapshot(store.root)
    with pytest.raises(ArtifactError, match="symbolic link"):
        stage(store, artifact_dir, [Art("s3://b/bad.zip", unarchive="ZIP")])
    assert snapshot(store.root) == before


def test_zip_bomb_is_capped(tmp_path: Path, artifact_dir: Path, put: Put) -> None:
    store = ArtifactStore(tmp_path / "store", max_unarchived_bytes=1 << 20)
    put("bomb.zip", make_zip([(f"z{i}", bytes(600_000)) for i in range(2)]))
    assert (artifact_dir / COMPONENT / "1.0.0" / "bomb.zip").stat().st_size < 10_000
    before = snapshot(store.root)
    with pytest.raises(ArtifactError, match="cap of 1048576"):
        stage(store, artifact_dir, [Art("s3://b/bomb.zip", unarchive="ZIP")])
    assert snapshot(store.root) == before


def test_zip_lying_about_its_size_is_capped(tmp_path: Path, artifact_dir: Path, put: Put) -> None:
    data = bytearray(make_zip([("z", bytes(100_000))]))
    # Rewrite the declared uncompressed size (local header and central directory) to 10 bytes.
    local = data.index(b"PK\x03\x04")
    data[local + 22 : local + 26] = (10).to_bytes(4, "little")
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    put("liar.zip", bytes(data))
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ArtifactError, match=r"liar\.zip"):
        stage(store, artifact_dir, [Art("s3://b/liar.zip", unarchive="ZIP")])
    assert not store.is_staged(COMPONENT, "1.0.0")


def test_too_many_entries_are_capped(tmp_path: Path, artifact_dir: Path, put: Put) -> None:
    store = ArtifactStore(tmp_path / "store", max_unarchived_entries=5)
    put("many.zip", make_zip([(f"f{i}", b"") for i in range(6)]))
    with pytest.raises(ArtifactError, match="6 entries"):
        stage(store, artifact_dir, [Art("s3://b/many.zip", unarchive="ZIP")])


@pytest.mark.parametrize(
    "entries",
    [
        [("a.txt", b"1"), ("a.txt", b"2")],
        [("d/a.txt", b"1"), ("./d//a.txt", b"2")],
        [("a", b"file"), ("a/b", b"inside a file")],
    ],
)
def test_duplicate_entries_are_refused(
    store: ArtifactStore, artifact_dir: Path, put: Put, entries: list[tuple[str, bytes]]
) -> None:
    put("dup.zip", make_zip(list(entries)))
    with pytest.raises(ArtifactError, match=r"more than once|is inside"):
        stage(store, artifact_dir, [Art("s3://b/dup.zip", unarchive="ZIP")])


def test_corrupt_zip_is_an_artifact_error(
    store: ArtifactStore, artifact_dir: Path, put: Put
) -> None:
    put("broken.zip", b"this is not a zip")
    with pytest.raises(ArtifactError, match="valid, unencrypted ZIP"):
        stage(store, artifact_dir, [Art("s3://b/broken.zip", unarchive="ZIP")])


def test_two_zips_with_one_stem_are_refused(
    store: ArtifactStore, artifact_dir: Path, put: Put
) -> None:
    with pytest.raises(ArtifactError, match="both unarchive into"):
        stage(
            store,
            artifact_dir,
            [Art("s3://x/app.zip", unarchive="ZIP"), Art("s3://y/app.ZIP2", unarchive="ZIP")],
        )


# -- permissions ---------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_permissions_are_applied(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    put("default.txt", b"d")
    put("run.sh", b"#!/bin/sh\n")
    put("secret.bin", b"s")
    put("tools.zip", make_zip([("bin/tool", b"#!/bin/sh\n")]))
    staged = stage(
        store,
        artifact_dir,
        [
            Art("s3://b/default.txt"),
            Art("s3://b/run.sh", read="ALL", execute="OWNER"),
            Art("s3://b/secret.bin", read="NONE"),
            Art("s3://b/tools.zip", unarchive="ZIP", read="ALL", execute="ALL"),
        ],
    )
    assert mode(staged.path / "default.txt") == 0o400
    assert mode(staged.path / "run.sh") == 0o544
    assert mode(staged.path / "secret.bin") == 0o000
    assert mode(staged.path / "tools.zip") == 0o555
    assert mode(staged.decompressed_path / "tools" / "bin" / "tool") == 0o555
    # Folders stay traversable (and read-only) whatever the files' permissions are.
    for folder in (staged.path, staged.decompressed_path / "tools" / "bin"):
        assert mode(folder) == 0o555


# -- idempotency, immutability, atomicity ------------------------------------------------


def test_staging_again_is_a_noop(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    put("a.py", b"one")
    arts = [Art("s3://b/a.py", digest=b64(b"one"))]
    first = stage(store, artifact_dir, arts)
    before = snapshot(store.root)

    calls: list[str] = []

    def fetch(spec: ArtifactSpec) -> Path:
        calls.append(spec.uri)
        return artifact_dir / COMPONENT / "1.0.0" / spec.file_name

    again = store.stage(COMPONENT, "1.0.0", list(arts), fetch, source="recipe.yaml")
    assert again == first
    assert calls == []  # the recipe's digest settles it without fetching
    assert snapshot(store.root) == before

    # Without a digest the file is hashed again, and the same content is still a no-op.
    assert stage(store, artifact_dir, [Art("s3://b/a.py")]) == first
    assert snapshot(store.root) == before


def test_versions_are_immutable(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    put("a.py", b"one")
    stage(store, artifact_dir, [Art("s3://b/a.py", digest=b64(b"one"))])
    before = snapshot(store.root)
    put("a.py", b"two")
    with pytest.raises(ArtifactError, match="immutable"):
        stage(store, artifact_dir, [Art("s3://b/a.py", digest=b64(b"two"))])
    with pytest.raises(ArtifactError, match="immutable"):
        stage(store, artifact_dir, [Art("s3://b/a.py")])
    with pytest.raises(ArtifactError, match="immutable"):
        stage(store, artifact_dir, [Art("s3://b/a.py", digest=b64(b"one"), execute="ALL")])
    with pytest.raises(ArtifactError, match="immutable"):
        stage(store, artifact_dir, [Art("s3://b/a.py"), Art("s3://b/b.py")])
    assert snapshot(store.root) == before


def test_failed_stage_leaves_store_unchanged(
    store: ArtifactStore, artifact_dir: Path, put: Put
) -> None:
    put("shared.py", b"shared", version="1.0.0")
    stage(store, artifact_dir, [Art("s3://b/shared.py")], version="1.0.0")
    before = snapshot(store.root)

    put("shared.py", b"shared", version="2.0.0")
    put("new.py", b"brand new", version="2.0.0")
    put("bad.py", b"bad", version="2.0.0")
    arts = [
        Art("s3://b/shared.py"),
        Art("s3://b/new.py", digest=b64(b"brand new")),
        Art("s3://b/bad.py", digest=b64(b"good")),
    ]
    with pytest.raises(ArtifactError, match="digest mismatch"):
        stage(store, artifact_dir, arts, version="2.0.0")
    assert snapshot(store.root) == before


@pytest.mark.parametrize("failing", ["folder", "manifest"])
def test_failure_while_committing_rolls_back(
    store: ArtifactStore,
    artifact_dir: Path,
    put: Put,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    put("new.py", b"brand new")
    before = snapshot(store.root)
    real_rename = os.rename
    version_dir = store.root / "artifacts" / COMPONENT / "1.0.0"

    def flaky_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        hit = Path(dst) == version_dir if failing == "folder" else Path(dst).suffix == ".json"
        if hit:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="No space left"):
        stage(store, artifact_dir, [Art("s3://b/new.py")])
    monkeypatch.undo()
    assert snapshot(store.root) == before

    # The store still works afterwards.
    staged = stage(store, artifact_dir, [Art("s3://b/new.py")])
    assert (staged.path / "new.py").read_bytes() == b"brand new"


def test_interrupted_stage_is_redone(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    put("a.py", b"one")
    leftover = store.root / "artifacts" / COMPONENT / "1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "half-written").write_bytes(b"?")
    staged = stage(store, artifact_dir, [Art("s3://b/a.py")])
    assert sorted(p.name for p in staged.path.iterdir()) == ["a.py"]


# -- removal -------------------------------------------------------------------------------


def test_remove_and_paths_for(store: ArtifactStore, artifact_dir: Path, put: Put) -> None:
    put("a.py", b"one")
    staged = stage(store, artifact_dir, [Art("s3://b/a.py")])
    assert store.remove(COMPONENT, "1.0.0") is True
    assert not staged.path.exists()
    assert not staged.decompressed_path.exists()
    assert store.remove(COMPONENT, "1.0.0") is False
    assert not store.is_staged(COMPONENT, "1.0.0")
    assert store.paths_for(COMPONENT, "1.0.0") == staged  # a path computation
    with pytest.raises(ArtifactError, match="cannot name a folder"):
        store.paths_for(COMPONENT, "../1.0.0")


def test_gc_keeps_what_is_asked_and_shared_blobs(
    store: ArtifactStore, artifact_dir: Path, put: Put
) -> None:
    put("shared.py", b"shared", version="1.0.0")
    put("old.py", b"old only", version="1.0.0")
    put("shared.py", b"shared", version="2.0.0")
    app_zip = make_zip([("x", b"y")])
    put("app.zip", app_zip, version="2.0.0")
    old = stage(store, artifact_dir, [Art("s3://b/shared.py"), Art("s3://b/old.py")], "1.0.0")
    new = stage(
        store,
        artifact_dir,
        [Art("s3://b/shared.py"), Art("s3://b/app.zip", unarchive="ZIP")],
        "2.0.0",
    )
    (store.root / "tmp" / "stage-crashed").mkdir()

    result = store.gc({(COMPONENT, "2.0.0")})

    assert result.versions == ((COMPONENT, "1.0.0"),)
    assert result.blobs == 1
    assert result.bytes_freed == len(b"old only")
    assert not old.path.exists() and not old.decompressed_path.exists()
    assert (new.path / "shared.py").read_bytes() == b"shared"
    assert (new.decompressed_path / "app" / "x").read_bytes() == b"y"
    blobs = {p.name for p in (store.root / "blobs" / "sha256").iterdir()}
    assert blobs == {hashlib.sha256(b"shared").hexdigest(), hashlib.sha256(app_zip).hexdigest()}
    # Stage leftovers go; downloads in progress stay, to continue after a restart.
    assert list((store.root / "tmp").iterdir()) == [store.downloads]
    assert store.staged() == {(COMPONENT, "2.0.0")}

    # Nothing kept: everything goes.
    result = store.gc(set())
    assert result.versions == ((COMPONENT, "2.0.0"),)
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "artifacts").iterdir()) == []
