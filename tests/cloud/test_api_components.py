"""The component registry's REST API: publishing in two steps, ranges, signed links."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient

from edgeloop.cloud.api import create_app
from edgeloop.cloud.api_components import parse_range
from edgeloop.cloud.components import ComponentRegistry
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.db import Database
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.signing import UrlSigner
from edgeloop.core.shadowbook import ShadowBook

V1 = "/api/v1"
APP = b"#!/usr/bin/env python3\nprint('hello')\n"
MODEL = os.urandom(5000)


@dataclass
class Cloud:
    ctx: CloudContext
    client: TestClient
    clock: list[float]


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
    clock = [1_700_000_000.0]
    signer = UrlSigner.in_data_dir(tmp, clock=lambda: clock[0])
    ctx.components = ComponentRegistry(db, ctx.objects, signer)
    with TestClient(create_app(ctx)) as client:
        yield Cloud(ctx, client, clock)
    db.dispose()


@pytest.fixture
def client(cloud: Cloud) -> TestClient:
    return cloud.client


def recipe(name: str, version: str = "1.0.0") -> str:
    return f"""\
RecipeFormatVersion: '2020-01-25'
ComponentName: {name}
ComponentVersion: '{version}'
ComponentDescription: says hello
Manifests:
  - Artifacts:
      - URI: s3://bucket/app.py
        Permission: {{Execute: OWNER}}
      - URI: s3://bucket/model.bin
    Lifecycle:
      Run: python3 {{artifacts:path}}/app.py
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(client: TestClient, data: bytes) -> Any:
    return client.put(f"{V1}/components/blobs/{sha(data)}", content=data)


def publish(client: TestClient, name: str, version: str = "1.0.0") -> Any:
    for data in (APP, MODEL):
        assert upload(client, data).status_code in (200, 201)
    return client.post(
        f"{V1}/components",
        json={
            "recipe": recipe(name, version),
            "artifacts": {"app.py": sha(APP), "model.bin": sha(MODEL)},
            "source": "hello.yaml",
        },
    )


def _name() -> str:
    return f"com.example.A{uuid.uuid4().hex[:8]}"


# -- publishing ------------------------------------------------------------------------------


def test_publish_in_two_steps(client: TestClient) -> None:
    data = os.urandom(1000)
    path = f"{V1}/components/blobs/{sha(data)}"
    assert client.get(path).status_code == 404
    first = client.put(path, content=data)
    assert first.status_code == 201
    assert first.json() == {"sha256": sha(data), "size": 1000, "created": True}
    again = client.put(path, content=data)
    assert again.status_code == 200 and again.json()["created"] is False
    assert client.get(path).json() == {"sha256": sha(data), "size": 1000, "created": False}

    corrupt = client.put(path, content=data[:-1])
    assert corrupt.status_code == 400
    assert corrupt.json()["field"] == "sha256"
    assert "it was corrupted or truncated" in corrupt.json()["message"]
    bad = client.put(f"{V1}/components/blobs/XYZ", content=b"x")
    assert bad.status_code == 400 and bad.json()["field"] == "sha256"

    name = _name()
    created = publish(client, name)
    assert created.status_code == 201, created.json()
    body = created.json()
    assert created.headers["location"] == f"{V1}/components/{name}/versions/1.0.0"
    assert body["created"] is True
    assert body["size"] == len(APP) + len(MODEL)
    assert [(a["file"], a["size"], a["sha256"]) for a in body["artifacts"]] == [
        ("app.py", len(APP), sha(APP)),
        ("model.bin", len(MODEL), sha(MODEL)),
    ]
    artifact = body["recipe"]["Manifests"][0]["Artifacts"][0]
    assert artifact["URI"] == f"edgeloop://components/{name}/1.0.0/app.py"
    assert artifact["Permission"] == {"Execute": "OWNER"}

    same = publish(client, name)
    assert same.status_code == 200 and same.json()["created"] is False
    changed = client.post(
        f"{V1}/components",
        json={
            "recipe": recipe(name).replace("says hello", "says goodbye"),
            "artifacts": {"app.py": sha(APP), "model.bin": sha(MODEL)},
        },
    )
    assert changed.status_code == 409
    assert changed.json()["error"] == "conflict"
    assert "versions are immutable" in changed.json()["message"]


def test_bad_publishes_name_the_field(client: TestClient) -> None:
    name = _name()
    upload(client, APP)
    broken = client.post(
        f"{V1}/components",
        json={"recipe": recipe(name).replace("'1.0.0'", "1.0"), "source": "hello.yaml"},
    )
    assert broken.status_code == 400
    assert broken.json()["field"] == "ComponentVersion"
    assert broken.json()["message"].startswith("hello.yaml: ComponentVersion: must be a string")

    missing = client.post(
        f"{V1}/components", json={"recipe": recipe(name), "artifacts": {"app.py": sha(APP)}}
    )
    assert missing.status_code == 400
    assert missing.json()["field"] == "Manifests[0].Artifacts[1].URI"
    assert "'model.bin' was not uploaded" in missing.json()["message"]

    typo = client.post(f"{V1}/components", json={"recipe": recipe(name), "artifact": {}})
    assert typo.status_code == 400 and typo.json()["field"] == "artifact"
    assert client.get(f"{V1}/components/{name}").status_code == 404


# -- reading ---------------------------------------------------------------------------------


def test_list_describe_and_the_recipe(client: TestClient) -> None:
    name = _name()
    publish(client, name)
    publish(client, name, "1.1.0")
    listed = client.get(f"{V1}/components", params={"prefix": name}).json()["components"]
    assert [(c["componentName"], c["latestVersion"], c["versions"]) for c in listed] == [
        (name, "1.1.0", ["1.1.0", "1.0.0"])
    ]
    detail = client.get(f"{V1}/components/{name}").json()
    assert [v["componentVersion"] for v in detail["versions"]] == ["1.1.0", "1.0.0"]
    one = client.get(f"{V1}/components/{name}/versions/1.0.0").json()
    model = one["artifacts"][1]
    assert model["downloadPath"] == f"{V1}/components/{name}/versions/1.0.0/artifacts/model.bin"
    assert model["algorithm"] == "SHA-256" and model["digest"]
    assert client.get(f"{V1}/components/{name}/versions/1.0.0/recipe").json() == one["recipe"]

    gone = client.get(f"{V1}/components/{name}/versions/9.0.0")
    assert gone.status_code == 404
    assert gone.json()["message"] == f"no version named '9.0.0' (of component {name})"
    assert client.get(f"{V1}/components/com.example.Nothing").status_code == 404


def test_ranges(client: TestClient) -> None:
    name = _name()
    publish(client, name)
    path = f"{V1}/components/{name}/versions/1.0.0/artifacts/model.bin"
    whole = client.get(path)
    assert whole.status_code == 200 and whole.content == MODEL
    assert whole.headers["accept-ranges"] == "bytes"
    etag = whole.headers["etag"]
    assert etag == f'"{sha(MODEL)}"'

    for header, first, last in (
        ("bytes=0-99", 0, 99),
        ("bytes=4990-", 4990, 4999),
        ("bytes=4990-999999", 4990, 4999),
        ("bytes=-10", 4990, 4999),
        ("bytes=-99999", 0, 4999),
    ):
        part = client.get(path, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == MODEL[first : last + 1], header
        assert part.headers["content-range"] == f"bytes {first}-{last}/5000"
        assert part.headers["content-length"] == str(last - first + 1)

    resumed = client.get(path, headers={"Range": "bytes=100-", "If-Range": etag})
    assert resumed.status_code == 206 and resumed.content == MODEL[100:]
    stale = client.get(path, headers={"Range": "bytes=100-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == MODEL
    several = client.get(path, headers={"Range": "bytes=0-1,5-6"})
    assert several.status_code == 200 and several.content == MODEL
    other_unit = client.get(path, headers={"Range": "items=0-1"})
    assert other_unit.status_code == 200

    for header in ("bytes=5000-", "bytes=9-3", "bytes=a-b", "bytes=-0", "bytes=-"):
        refused = client.get(path, headers={"Range": header})
        assert refused.status_code == 416, header
        assert refused.headers["content-range"] == "bytes */5000"
        assert refused.json()["field"] == "Range"

    missing = client.get(f"{V1}/components/{name}/versions/1.0.0/artifacts/nope.bin")
    assert missing.status_code == 404


def test_parse_range_edges() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range(" bytes = 2 - 4 ", 10) == (2, 4)
    assert parse_range("BYTES=9-", 10) == (9, 9)
    with pytest.raises(Exception, match="asks for no bytes of a 0-byte file"):
        parse_range("bytes=-5", 0)
    with pytest.raises(Exception, match="starts at or past the end"):
        parse_range("bytes=0-", 0)


# -- signed links ----------------------------------------------------------------------------


def _thing(cloud: Cloud) -> str:
    thing = f"hub-{uuid.uuid4().hex[:8]}"
    cloud.ctx.registry.create_thing(thing)
    return thing


def test_signed_links(cloud: Cloud) -> None:
    client, name, thing = cloud.client, _name(), _thing(cloud)
    publish(client, name)
    issued = client.post(
        f"{V1}/components/{name}/versions/1.0.0/downloads",
        json={"thingName": thing, "lifetime": 300},
    )
    assert issued.status_code == 200, issued.json()
    links = issued.json()
    assert links["thingName"] == thing
    assert links["expiresAt"] == "2023-11-14T22:18:20Z"  # the fake clock + 300 s
    assert [a["file"] for a in links["artifacts"]] == ["app.py", "model.bin"]
    model = links["artifacts"][1]
    assert model["url"].startswith(f"http://testserver{V1}/downloads/components/{name}/1.0.0/")

    fetched = client.get(model["url"])
    assert fetched.status_code == 200 and fetched.content == MODEL
    ranged = client.get(model["url"], headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == MODEL[10:20]
    assert client.get(links["recipeUrl"]).json()["ComponentName"] == name

    url = urlsplit(model["url"])
    params = dict(parse_qsl(url.query))
    for changed, field in (
        ({"thing": "someone-else"}, "signature"),
        ({"expires": str(int(params["expires"]) + 3600)}, "signature"),
        ({"signature": params["signature"][:-2] + "AA"}, "signature"),
        ({"signature": ""}, "signature"),
    ):
        query = urlencode({**params, **changed})
        refused = client.get(f"{url.path}?{query}")
        assert refused.status_code == 403, changed
        assert refused.json()["error"] == "forbidden"
        assert refused.json()["field"] == field
    # A link for one file does not open another.
    other = url.path.replace("model.bin", "app.py")
    assert client.get(f"{other}?{url.query}").status_code == 403
    unsigned = client.get(url.path)
    assert unsigned.status_code == 403 and "the link has no signature" in unsigned.json()["message"]

    cloud.clock[0] += 301
    try:
        expired = client.get(model["url"])
        assert expired.status_code == 403
        assert expired.json()["field"] == "expires"
        assert "the link expired at 2023-11-14T22:18:20+00:00" in expired.json()["message"]
        assert client.get(links["recipeUrl"]).status_code == 403
    finally:
        cloud.clock[0] -= 301


def test_signed_links_need_a_known_thing_and_a_sane_lifetime(cloud: Cloud) -> None:
    client, name = cloud.client, _name()
    publish(client, name)
    path = f"{V1}/components/{name}/versions/1.0.0/downloads"
    unknown = client.post(path, json={"thingName": "no-such-hub"})
    assert unknown.status_code == 404 and "no-such-hub" in unknown.json()["message"]
    long = client.post(path, json={"thingName": _thing(cloud), "lifetime": 10**7})
    assert long.status_code == 400 and long.json()["field"] == "lifetime"
    missing = client.post(
        f"{V1}/components/{name}/versions/7.0.0/downloads", json={"thingName": _thing(cloud)}
    )
    assert missing.status_code == 404


# -- deleting --------------------------------------------------------------------------------


def test_delete_is_refused_while_in_use(cloud: Cloud) -> None:
    client, name = cloud.client, _name()
    publish(client, name)
    active = {"dep-7": (name, "1.0.0")}
    remove = cloud.ctx.components.add_in_use_check(
        lambda n, v: next((d for d, used in active.items() if used == (n, v)), None)
    )
    try:
        refused = client.delete(f"{V1}/components/{name}/versions/1.0.0")
        assert refused.status_code == 409
        assert refused.json()["message"] == (
            f"{name} 1.0.0 is in use by deployment dep-7; cancel or replace that deployment first"
        )
        active.clear()
        assert client.delete(f"{V1}/components/{name}/versions/1.0.0").status_code == 204
        assert client.delete(f"{V1}/components/{name}/versions/1.0.0").status_code == 404
    finally:
        remove()


def test_every_route_is_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        f"{V1}/components",
        f"{V1}/components/blobs/{{sha256}}",
        f"{V1}/components/{{name}}",
        f"{V1}/components/{{name}}/versions/{{version}}",
        f"{V1}/components/{{name}}/versions/{{version}}/recipe",
        f"{V1}/components/{{name}}/versions/{{version}}/artifacts/{{file}}",
        f"{V1}/components/{{name}}/versions/{{version}}/downloads",
        f"{V1}/downloads/components/{{name}}/{{version}}/artifacts/{{file}}",
        f"{V1}/downloads/components/{{name}}/{{version}}/recipe",
    ):
        assert path in paths, path
    assert "422" not in paths[f"{V1}/components"]["post"]["responses"]


def test_the_data_folder_holds_the_signing_secret(cloud: Cloud) -> None:
    assert (cloud.ctx.data_dir / "url-signing.key").stat().st_mode & 0o077 == 0
