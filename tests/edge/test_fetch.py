"""Hub downloads from the real cloud API served by uvicorn on loopback.

Interruptions are real: a TCP proxy between the hub and the API cuts a connection after a
number of response bytes, as a dropped Wi-Fi link would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import uvicorn

from edgeloop.cloud.api import create_app
from edgeloop.cloud.components import BLOB_PREFIX, ComponentRegistry, DownloadLinks
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.db import Database
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.signing import UrlSigner
from edgeloop.core.errors import ArtifactError
from edgeloop.core.recipe import Artifact, Recipe, parse_recipe
from edgeloop.core.shadowbook import ShadowBook
from edgeloop.edge.artifacts import ArtifactStore
from edgeloop.edge.fetch import HttpFetcher, backoff, remote_or_local

THING = "hub-fetch"
MODEL_SIZE = 2 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """An ASGI app served by uvicorn in a thread, optionally over (mutual) TLS."""

    def __init__(self, app: Any, **tls: Any) -> None:
        self.port = _free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", **tls
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class CuttingProxy:
    """A TCP proxy that closes its n-th connection after ``cuts[n]`` response bytes."""

    def __init__(self, upstream_port: int, cuts: list[int]) -> None:
        self.upstream_port = upstream_port
        self.cuts = cuts
        self.requests: list[bytes] = []
        self.sent: list[int] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def route(self, url: str) -> str:
        """``url`` through this proxy."""
        parts = urlsplit(url)
        return urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.port}"))

    def ranges(self) -> list[str | None]:
        """The Range header of each connection's request (None: a whole download)."""
        found = []
        for request in self.requests:
            match = re.search(rb"(?im)^range: *(.+?)\r$", request)
            found.append(match.group(1).decode() if match else None)
        return found

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        index = 0
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            limit = self.cuts[index] if index < len(self.cuts) else None
            self.requests.append(b"")
            self.sent.append(0)
            threading.Thread(target=self._serve, args=(client, index, limit), daemon=True).start()
            index += 1

    def _serve(self, client: socket.socket, index: int, limit: int | None) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def requests() -> None:
            try:
                while data := client.recv(65536):
                    self.requests[index] += data
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=requests, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if limit is not None and self.sent[index] + len(data) >= limit:
                    client.sendall(data[: limit - self.sent[index]])
                    self.sent[index] = limit
                    break
                client.sendall(data)
                self.sent[index] += len(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@dataclass
class Cloud:
    ctx: CloudContext
    served: Served
    clock: list[float]

    @property
    def components(self) -> ComponentRegistry:
        return self.ctx.components

    def publish(self, tmp: Path, files: dict[str, bytes]) -> str:
        """Publish a fresh component holding ``files``; returns its name."""
        name = f"com.example.F{uuid.uuid4().hex[:8]}"
        folder = tmp / name
        folder.mkdir()
        artifacts = "".join(
            f"      - URI: s3://bucket/{file}\n        Permission: {{Execute: OWNER}}\n"
            for file in files
        )
        (folder / "recipe.yaml").write_text(
            f"RecipeFormatVersion: '2020-01-25'\nComponentName: {name}\n"
            f"ComponentVersion: '1.0.0'\nManifests:\n  - Artifacts:\n{artifacts}"
            "    Lifecycle:\n      Run: 'true'\n"
        )
        for file, data in files.items():
            (folder / file).write_bytes(data)
        self.components.publish_dir(folder / "recipe.yaml", folder)
        return name

    def links(self, name: str, lifetime: float = 900) -> DownloadLinks:
        return self.components.links_for_thing(
            name, "1.0.0", thing=THING, base_url=self.served.url, lifetime=lifetime
        )


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    tmp = tmp_path_factory.mktemp("cloud")
    db = Database(f"sqlite:///{tmp / 'edgeloop.db'}")
    db.migrate()
    registry = Registry(db)
    ctx = CloudContext(
        data_dir=tmp,
        db=db,
        registry=registry,
        ca=CertificateAuthority.open_or_create(tmp / "ca"),
        shadows=ShadowBook(registry.shadow_storage()),
        objects=LocalObjectStore(tmp / "objects"),
    )
    clock = [time.time()]
    ctx.components = ComponentRegistry(
        db, ctx.objects, UrlSigner.in_data_dir(tmp, clock=lambda: clock[0])
    )
    served = Served(create_app(ctx))
    yield Cloud(ctx, served, clock)
    served.close()
    db.dispose()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "hub" / "artifacts")


@pytest.fixture
def sleeps() -> list[float]:
    return []


def fetcher(store: ArtifactStore, sleeps: list[float], **options: Any) -> HttpFetcher:
    options.setdefault("attempts", 4)
    return HttpFetcher(store.downloads, sleep=sleeps.append, rng=lambda: 1.0, **options)


def hub_recipe(links: DownloadLinks) -> Recipe:
    """The recipe as the hub gets it: through its signed link."""
    answer = httpx.get(links.recipe_url)
    assert answer.status_code == 200
    return parse_recipe(answer.content, source=f"{links.name}@{links.version}", fmt="json")


def spec(recipe: Recipe, file: str) -> Artifact:
    return next(a for a in recipe.manifests[0].artifacts if a.file_name == file)


# -- the whole way ---------------------------------------------------------------------------


def test_a_published_component_is_staged_on_the_hub(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    app, model = b"#!/bin/sh\necho hi\n", os.urandom(300_000)
    name = cloud.publish(tmp_path, {"run.sh": app, "model.bin": model})
    links = cloud.links(name)
    recipe = hub_recipe(links)
    with fetcher(store, sleeps, urls=links.urls()) as fetch:
        staged = store.stage(name, "1.0.0", recipe.manifests[0].artifacts, fetch, source="job")
    assert (staged.path / "run.sh").read_bytes() == app
    assert (staged.path / "model.bin").read_bytes() == model
    assert stat.S_IMODE((staged.path / "run.sh").stat().st_mode) & stat.S_IXUSR
    # The downloads were handed to the store: nothing is left behind, and nothing slept.
    assert list(store.downloads.iterdir()) == []
    assert sleeps == []


def test_an_interrupted_download_continues_where_it_stopped(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    model = os.urandom(MODEL_SIZE)
    name = cloud.publish(tmp_path, {"model.bin": model})
    links = cloud.links(name)
    proxy = CuttingProxy(cloud.served.port, cuts=[700_000])
    try:
        urls = {uri: proxy.route(url) for uri, url in links.urls().items()}
        with fetcher(store, sleeps, urls=urls) as fetch:
            done = fetch(spec(hub_recipe(links), "model.bin"))
        assert done.read_bytes() == model
        first, second = proxy.ranges()
        assert first is None
        assert second is not None
        offset = int(re.fullmatch(r"bytes=(\d+)-", second).group(1))  # type: ignore[union-attr]
        # It asked only for what it did not have: what came through before the cut.
        assert 600_000 < offset < 700_000
        assert re.search(rb"(?im)^if-range: *\"[0-9a-f]{64}\"\r$", proxy.requests[1])
        # Not downloaded twice: the wire carried the file once, plus what was in flight
        # when the connection dropped.
        assert sum(proxy.sent) < MODEL_SIZE + 100_000
        assert sleeps == [1.0]  # one retry, after the first backoff step
    finally:
        proxy.close()


def test_an_agent_restart_continues_the_download(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    model = os.urandom(MODEL_SIZE)
    name = cloud.publish(tmp_path, {"model.bin": model})
    links = cloud.links(name)
    artifact = spec(hub_recipe(links), "model.bin")
    proxy = CuttingProxy(cloud.served.port, cuts=[500_000, 500_000])
    try:
        urls = {uri: proxy.route(url) for uri, url in links.urls().items()}
        # The agent gives up (or is stopped) part-way ...
        with fetcher(store, sleeps, urls=urls, attempts=1) as fetch:
            with pytest.raises(
                ArtifactError, match="bytes downloaded so far are kept, and"
            ) as caught:
                fetch(artifact)
            part, meta, _ = fetch.paths(artifact)
        assert "the download ended at" in str(caught.value) or "peer closed" in str(caught.value)
        assert "signature" not in str(caught.value)  # links stay out of messages
        kept = part.stat().st_size
        assert 400_000 < kept < 500_000
        assert json.loads(meta.read_text())["etag"] == f'"{hashlib.sha256(model).hexdigest()}"'

        # ... and a new one, with a fresh link, continues from the partial file twice over.
        fresh = {uri: proxy.route(url) for uri, url in cloud.links(name).urls().items()}
        with fetcher(store, sleeps, urls=fresh) as fetch:
            done = fetch(artifact)
        assert done.read_bytes() == model
        ranges = proxy.ranges()
        assert ranges[0] is None and ranges[1] == f"bytes={kept}-"
        assert ranges[2] is not None and int(ranges[2][6:-1]) > kept
        assert not part.exists() and not meta.exists()
    finally:
        proxy.close()


def test_a_finished_partial_and_a_stale_one(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    model = os.urandom(50_000)
    name = cloud.publish(tmp_path, {"model.bin": model})
    links = cloud.links(name)
    artifact = spec(hub_recipe(links), "model.bin")
    with fetcher(store, sleeps, urls=links.urls()) as fetch:
        part, meta, done = fetch.paths(artifact)
        # Whole already (the agent stopped just before renaming it): 416 says so.
        part.write_bytes(model)
        assert fetch(artifact).read_bytes() == model
        done.unlink()
        # Longer than the file: thrown away and downloaded again.
        part.write_bytes(model + b"junk")
        assert fetch(artifact).read_bytes() == model
        done.unlink()
        # Of another file (its ETag differs): If-Range makes the server send it whole.
        part.write_bytes(b"x" * 1000)
        meta.write_text(json.dumps({"etag": '"0000"'}))
        assert fetch(artifact).read_bytes() == model
    assert sleeps == []


# -- refusals --------------------------------------------------------------------------------


def test_a_corrupt_artifact_is_refused_and_discarded(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    model = os.urandom(100_000)
    name = cloud.publish(tmp_path, {"model.bin": model})
    links = cloud.links(name)
    recipe = hub_recipe(links)
    artifact = spec(recipe, "model.bin")
    blob = cloud.ctx.objects.root / (BLOB_PREFIX + hashlib.sha256(model).hexdigest())  # type: ignore[attr-defined]
    blob.write_bytes(b"\0" * len(model))  # rotted in storage, same size
    with fetcher(store, sleeps, urls=links.urls()) as fetch:
        with pytest.raises(ArtifactError) as caught:
            store.stage(name, "1.0.0", recipe.manifests[0].artifacts, fetch, source="job-9")
        message = str(caught.value)
        assert caught.value.source == "job-9"
        assert caught.value.field == "Artifacts[0].Digest"
        assert f"digest mismatch for {artifact.uri}" in message
        assert f"expected SHA-256 {artifact.digest}" in message
        zeros = hashlib.sha256(b"\0" * len(model)).digest()
        assert f"downloaded {__import__('base64').b64encode(zeros).decode()}" in message
        assert "the download was discarded" in message
    assert list(store.downloads.iterdir()) == []
    assert not store.is_staged(name, "1.0.0")


def test_an_expired_link_is_refused_or_renewed(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    name = cloud.publish(tmp_path, {"model.bin": os.urandom(10_000)})
    links = cloud.links(name, lifetime=60)
    artifact = spec(hub_recipe(links), "model.bin")
    cloud.clock[0] += 61
    try:
        with (
            fetcher(store, sleeps, urls=links.urls()) as fetch,
            pytest.raises(ArtifactError, match="the link was refused") as caught,
        ):
            fetch(artifact)
        assert "expires: the link expired at" in str(caught.value)
        assert sleeps == []  # refused, not retried

        renewed: list[str] = []

        def renew(uri: str) -> str:
            renewed.append(uri)
            return cloud.links(name).urls()[uri]

        with fetcher(store, sleeps, urls=links.urls(), renew=renew) as fetch:
            assert fetch(artifact).stat().st_size == 10_000
        assert renewed == [artifact.uri]
    finally:
        cloud.clock[0] -= 61


def test_the_registry_uri_resolves_against_the_cloud_api(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    data = os.urandom(20_000)
    name = cloud.publish(tmp_path, {"tool.bin": data})
    artifact = spec(parse_recipe(cloud.components.get(name).recipe, source="r"), "tool.bin")
    with fetcher(store, sleeps, api_url=cloud.served.url + "/") as fetch:
        assert fetch.url_for(artifact.uri) == (
            f"{cloud.served.url}/api/v1/components/{name}/versions/1.0.0/artifacts/tool.bin"
        )
        done = fetch(artifact)
        assert done.read_bytes() == data
    done.unlink()
    with fetcher(store, sleeps, api_url=cloud.served.url + "/api/v1") as fetch:
        assert fetch.url_for(artifact.uri).startswith(
            f"{cloud.served.url}/api/v1/components/"
        )  # else the finished download is simply reused
    with fetcher(store, sleeps) as fetch:
        with pytest.raises(ArtifactError, match="no cloud API is configured"):
            fetch(artifact)
        with pytest.raises(ArtifactError, match="downloads http://, https:// and edgeloop://"):
            fetch(Artifact(uri="s3://bucket/tool.bin"))
        with pytest.raises(ArtifactError, match="must have the form"):
            fetch(Artifact(uri="edgeloop://elsewhere/x"))
    missing = Artifact(
        uri=f"{cloud.served.url}/api/v1/components/{name}/versions/1.0.0/artifacts/no"
    )
    with fetcher(store, sleeps) as fetch, pytest.raises(ArtifactError, match="answered 404"):
        fetch(missing)
    assert sleeps == []


# -- TLS -------------------------------------------------------------------------------------


def test_https_with_the_install_ca_and_the_hubs_certificate(
    cloud: Cloud, store: ArtifactStore, sleeps: list[float], tmp_path: Path
) -> None:
    ca = cloud.ctx.ca
    server = ca.issue_server_certificate(["localhost"], ["127.0.0.1"])
    (tmp_path / "server.pem").write_bytes(server.certificate_pem + server.chain_pem)
    (tmp_path / "server.key").write_bytes(server.private_key_pem or b"")
    device = ca.issue_device_certificate(THING)
    (tmp_path / "hub.pem").write_bytes(device.certificate_pem)
    (tmp_path / "hub.key").write_bytes(device.private_key_pem or b"")
    served = Served(
        create_app(cloud.ctx),
        ssl_certfile=str(tmp_path / "server.pem"),
        ssl_keyfile=str(tmp_path / "server.key"),
        ssl_ca_certs=str(ca.chain_path),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    try:
        data = os.urandom(30_000)
        name = cloud.publish(tmp_path, {"model.bin": data})
        artifact = spec(parse_recipe(cloud.components.get(name).recipe, source="r"), "model.bin")
        tls = {"api_url": served.url, "ca": ca.chain_path}
        with fetcher(
            store, sleeps, **tls, cert=tmp_path / "hub.pem", key=tmp_path / "hub.key"
        ) as fetch:
            fetch(artifact).unlink()
        with (
            fetcher(store, sleeps, attempts=1, **tls) as fetch,
            pytest.raises(ArtifactError, match=r"cannot download .* \(after 1 attempt\)$"),
        ):
            fetch(artifact)  # no client certificate: the server hangs up
        with (
            fetcher(store, sleeps, api_url=served.url) as fetch,
            pytest.raises(ArtifactError, match="the server's certificate is not trusted"),
        ):
            fetch(artifact)  # not the install's CA: refused at once, not retried
        assert sleeps == []
    finally:
        served.close()


# -- retries ---------------------------------------------------------------------------------


def _mock(answers: list[httpx.Response]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    return httpx.MockTransport(handler)


def test_retries_back_off_capped_and_jittered(store: ArtifactStore, sleeps: list[float]) -> None:
    answers = [httpx.Response(503)] * 4 + [httpx.Response(200, content=b"ok")]
    with fetcher(store, sleeps, attempts=5, backoff_cap=2.0, transport=_mock(answers)) as fetch:
        assert fetch(Artifact(uri="https://example.com/a.bin")).read_bytes() == b"ok"
    assert sleeps == [1.0, 2.0, 2.0, 2.0]

    answers = [httpx.Response(429, json={"message": "slow down"})] * 3
    with (
        fetcher(store, sleeps, attempts=3, transport=_mock(answers)) as fetch,
        pytest.raises(ArtifactError, match=r"answered 429 \(slow down\) \(after 3 attempts\)"),
    ):
        fetch(Artifact(uri="https://example.com/b.bin"))

    answers = [httpx.Response(404, json={"message": "no artifact named 'c.bin'"})]
    with (
        fetcher(store, sleeps, transport=_mock(answers)) as fetch,
        pytest.raises(ArtifactError, match=r"answered 404 \(no artifact named 'c\.bin'\)"),
    ):
        fetch(Artifact(uri="https://example.com/c.bin"))


def test_backoff_is_bounded() -> None:
    for failures in range(40):
        for cap in (0.1, 1.0, 30.0):
            for r in (0.0, 0.5, 1.0):
                delay = backoff(failures, cap, lambda r=r: r)
                ceiling = min(max(cap, 0.5), 0.5 * 2.0 ** min(failures, 20))
                assert ceiling / 2 <= delay <= ceiling


def test_remote_or_local_picks_by_scheme(tmp_path: Path) -> None:
    calls: list[str] = []

    def local(artifact: Any) -> Path:
        calls.append(f"local {artifact.uri}")
        return tmp_path

    def remote(artifact: Any) -> Path:
        calls.append(f"remote {artifact.uri}")
        return tmp_path

    fetch: Callable[[Any], Path] = remote_or_local(remote, local)
    for uri in ("s3://b/a", "https://h/a", "edgeloop://components/A/1.0.0/a", "HTTP://h/b"):
        fetch(Artifact(uri=uri))
    assert calls == [
        "local s3://b/a",
        "remote https://h/a",
        "remote edgeloop://components/A/1.0.0/a",
        "remote HTTP://h/b",
    ]
    with pytest.raises(ArtifactError, match="no cloud to download from"):
        remote_or_local(None, local)(Artifact(uri="https://h/a"))
    with pytest.raises(ArtifactError, match="no artifact folder given"):
        remote_or_local(remote, None)(Artifact(uri="s3://b/a"))


def test_gc_keeps_downloads_in_progress_but_not_forever(store: ArtifactStore) -> None:
    fresh = store.downloads / "fresh.part"
    stale = store.downloads / "stale.part"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"y")
    old = time.time() - timedelta(days=8).total_seconds()
    os.utime(stale, (old, old))
    store.gc(set())
    assert fresh.exists() and not stale.exists()
