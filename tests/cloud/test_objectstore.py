"""The object store on both backends: a local folder, and S3 served by a real moto server."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeloop.cloud.objectstore import LocalObjectStore, ObjectStore, S3ObjectStore, check_key
from edgeloop.core.errors import NotFoundError, ValidationError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API on loopback (moto's server), for the whole module."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
    }.items():
        monkeypatch.setenv(name, value)
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = S3ObjectStore(f"b-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint, prefix="pre")
    s3.ensure_bucket()
    return s3


def test_put_get_head_list_delete(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40
    assert store.put("components/com.example.A/1.0.0/app.bin", data).size == len(data)
    store.put("components/com.example.A/1.0.1/app.bin", b"v2")
    store.put("lake/part-0.parquet", b"x")
    assert store.get("components/com.example.A/1.0.0/app.bin") == data
    info = store.head("components/com.example.A/1.0.0/app.bin")
    assert info is not None and info.size == len(data)
    assert store.head("components/missing") is None
    keys = [i.key for i in store.list("components/")]
    assert keys == [
        "components/com.example.A/1.0.0/app.bin",
        "components/com.example.A/1.0.1/app.bin",
    ]
    store.delete("lake/part-0.parquet")
    store.delete("lake/part-0.parquet")  # already gone: not an error
    assert store.head("lake/part-0.parquet") is None


def test_ranges_resume_a_download(store: ObjectStore) -> None:
    data = b"0123456789" * 100
    store.put("a/blob", data)
    assert store.get("a/blob", start=995) == data[995:]
    assert store.get("a/blob", start=10, end=20) == data[10:20]
    assert store.get("a/blob", start=len(data)) == b""


def test_overwrite_replaces_whole(store: ObjectStore) -> None:
    store.put("a/b", b"long old content")
    store.put("a/b", b"new")
    assert store.get("a/b") == b"new"


def test_missing_object_names_the_key(store: ObjectStore) -> None:
    with pytest.raises(NotFoundError, match="no object named 'nope/x'"):
        store.get("nope/x")


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "a//b", "a/./b", "trailing/", "sp ace", "back\\slash"]
)
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError):
        check_key(key)


def test_local_store_keeps_objects_inside_its_folder(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ValidationError):
        store.put("../escape", b"x")
    assert not (tmp_path / "escape").exists()
