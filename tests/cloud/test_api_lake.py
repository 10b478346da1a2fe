"""The lake's REST routes: batch uploads (idempotent retries, quarantine, errors naming the
field), read-only SQL, stats, compaction and retention; over mTLS, a hub uploads its own
telemetry and nothing else."""

from __future__ import annotations

import base64
import gzip
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgeloop.cloud.api import API_PREFIX, create_app
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.db import Database
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.registry import Registry
from edgeloop.core.shadowbook import ShadowBook
from edgeloop.core.telemetry import (
    Reading,
    Record,
    TelemetryBatch,
    encode_batch,
    encode_reading,
    idempotency_key,
)

HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CloudContext, TestClient]]:
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
    with TestClient(create_app(ctx), base_url=f"http://testserver{API_PREFIX}") as client:
        yield ctx, client


@pytest.fixture
def api(cloud: tuple[CloudContext, TestClient]) -> TestClient:
    return cloud[1]


@pytest.fixture
def thing(api: TestClient) -> str:
    name = f"hub-{uuid.uuid4().hex[:8]}"
    assert api.post("/things", json={"thingName": name}).status_code == 201
    return name


def readings(thing: str, seqs: range | list[int], *, stream: str = "readings") -> TelemetryBatch:
    return TelemetryBatch(
        thing,
        stream,
        tuple(
            Record(
                s,
                int(HOUR_AGO.timestamp() * 1e6) + s,
                encode_reading(
                    Reading("kit-1", "washer", HOUR_AGO.timestamp() + s, {"rpm": 800.0 + s}, s)
                ),
            )
            for s in seqs
        ),
    )


def upload(
    api: TestClient, batch: TelemetryBatch, *, key: str | None = None, thing: str | None = None
) -> dict[str, object]:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = api.post(
        f"/things/{thing or batch.thing}/telemetry", content=encode_batch(batch), headers=headers
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    body["_replayed_header"] = response.headers.get("Idempotent-Replayed")
    return body


def sql(api: TestClient, query: str, **extra: object) -> dict[str, object]:
    response = api.post("/lake/query", json={"sql": query, **extra})
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def test_an_upload_lands_in_the_lake_and_answers_its_counts(api: TestClient, thing: str) -> None:
    answer = upload(api, readings(thing, range(10)))
    assert answer == {
        "thing": thing,
        "stream": "readings",
        "received": 10,
        "accepted": 10,
        "duplicates": 0,
        "quarantined": 0,
        "replayed": False,
        "_replayed_header": None,
    }
    result = sql(
        api,
        f"SELECT sequence, sensors, device_time, date FROM telemetry WHERE thing = '{thing}' "
        "ORDER BY sequence",
    )
    assert result["rowCount"] == 10 and result["truncated"] is False
    assert [c["name"] for c in result["columns"]] == ["sequence", "sensors", "device_time", "date"]  # type: ignore[attr-defined,index]
    first = result["rows"][0]  # type: ignore[index]
    assert first[0] == 0 and first[1] == {"rpm": 800.0}
    assert datetime.fromisoformat(first[2]) == datetime.fromtimestamp(
        round(HOUR_AGO.timestamp() * 1e6) / 1e6, UTC
    )
    assert first[3] == HOUR_AGO.date().isoformat()


def test_a_retry_with_its_key_is_answered_as_the_first_time(api: TestClient, thing: str) -> None:
    batch = readings(thing, range(20))
    key = idempotency_key(batch)
    first = upload(api, batch, key=key)
    retry = upload(api, batch, key=key)
    assert retry["replayed"] is True and retry["_replayed_header"] == "true"
    assert retry["accepted"] == first["accepted"] == 20
    without_key = upload(api, batch)
    assert (without_key["accepted"], without_key["duplicates"]) == (0, 20)
    reused = api.post(
        f"/things/{thing}/telemetry",
        content=encode_batch(readings(thing, range(21))),
        headers={"Idempotency-Key": key},
    )
    assert reused.status_code == 409 and "another batch" in reused.json()["message"]
    total = sql(api, f"SELECT count(*) FROM telemetry WHERE thing = '{thing}'")
    assert total["rows"] == [[20]]


def test_bad_readings_are_counted_and_kept_in_the_quarantine(api: TestClient, thing: str) -> None:
    batch = readings(thing, range(5))
    records = list(batch.records)
    records[2] = Record(2, 0, b'{"kit": "k", "appliance": "washer", "ts": "noon", "sensors": {}}')
    answer = upload(api, TelemetryBatch(thing, "readings", tuple(records)))
    assert (answer["accepted"], answer["quarantined"]) == (4, 1)
    found = sql(
        api, f"SELECT sequence, field, reason, payload FROM quarantine WHERE thing = '{thing}'"
    )
    [[sequence, field, reason, payload]] = found["rows"]  # type: ignore[misc]
    assert (sequence, field) == (2, "ts") and "number" in reason
    assert base64.b64decode(payload) == records[2].payload


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not a batch", "body"),
        (gzip.compress(b"ELTB\x01garbage"), "header"),
        (encode_batch(readings("someone-else", range(2))), "header.thing"),
        (encode_batch(readings("x", range(3)), compress=False)[:-4], "records[2].payload"),
    ],
)
def test_a_body_that_is_not_a_batch_is_refused_by_name(
    api: TestClient, thing: str, body: bytes, field: str
) -> None:
    response = api.post(f"/things/{thing}/telemetry", content=body)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert sql(api, f"SELECT count(*) FROM quarantine WHERE thing = '{thing}'")["rows"] == [[0]]


def test_upload_errors(api: TestClient, thing: str) -> None:
    unknown = api.post("/things/nobody/telemetry", content=encode_batch(readings("nobody", [1])))
    assert unknown.status_code == 404 and "nobody" in unknown.json()["message"]
    bad_key = api.post(
        f"/things/{thing}/telemetry",
        content=encode_batch(readings(thing, [1])),
        headers={"Idempotency-Key": "two words"},
    )
    assert bad_key.status_code == 400 and bad_key.json()["field"] == "Idempotency-Key"
    huge = api.post(
        f"/things/{thing}/telemetry",
        content=b"\0" * 10,
        headers={"Content-Length": str(64 << 20)},
    )
    assert huge.status_code == 413 and huge.json()["field"] == "body"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("DROP VIEW telemetry", "DROP"),
        ("INSERT INTO telemetry SELECT * FROM telemetry", "INSERT"),
        ("SELECT 1; SELECT 2", "2 statements"),
        ("SELECT * FROM read_text('/etc/hostname')", ""),
    ],
)
def test_the_query_route_runs_one_select_over_the_lake_only(
    api: TestClient, query: str, words: str
) -> None:
    response = api.post("/lake/query", json={"sql": query})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "sql" and words in response.json()["message"]
    misspelt = api.post("/lake/query", json={"query": "SELECT 1"})
    assert misspelt.status_code == 400 and misspelt.json()["field"] == "sql"


def test_the_query_route_limits_what_it_sends(api: TestClient, thing: str) -> None:
    upload(api, readings(thing, range(30)))
    page = sql(api, f"SELECT sequence FROM telemetry WHERE thing = '{thing}' ORDER BY 1", limit=5)
    assert page["rowCount"] == 30 and page["truncated"] is True
    assert page["rows"] == [[0], [1], [2], [3], [4]]
    values = sql(api, "SELECT 'nan'::DOUBLE AS n, INTERVAL 2 SECOND AS i, [1, 2] AS l")
    assert values["rows"] == [[None, "P0M0DT2S", [1, 2]]]


def test_stats_compaction_and_retention_routes(api: TestClient, thing: str) -> None:
    for start in (0, 10, 20):
        upload(api, readings(thing, range(start, start + 10)))
    stats = api.get("/lake/stats").json()
    assert stats["telemetry"]["rows"] >= 30 and stats["telemetry"]["small_files"] >= 3
    compacted = api.post("/lake/compact").json()
    assert compacted["files_before"] >= 3 and compacted["files_after"] >= 1
    assert sql(api, f"SELECT count(*) FROM telemetry WHERE thing = '{thing}'")["rows"] == [[30]]
    kept = api.post("/lake/retention", json={"days": 3650}).json()
    assert kept["files"] == 0 and kept["cutoff"]
    negative = api.post("/lake/retention", json={"days": -1})
    assert negative.status_code == 400 and negative.json()["field"] == "days"


# --- over mutual TLS, as hubs call it -------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.cloud.test_api_tls import TlsCloud

    running = TlsCloud(tmp_path_factory.mktemp("tls-lake") / "data")
    yield running
    running.close()


@pytest.mark.slow
def test_a_hub_uploads_its_own_telemetry_with_its_certificate(
    tls_cloud: object, tmp_path: Path
) -> None:
    from tests.cloud.test_api_tls import TlsCloud

    assert isinstance(tls_cloud, TlsCloud)
    name, cert, _ = tls_cloud.thing(tmp_path)
    other, _, _ = tls_cloud.thing(tmp_path)
    batch = readings(name, range(3))
    with tls_cloud.client(cert) as hub:
        stored = hub.post(
            f"/things/{name}/telemetry",
            content=encode_batch(batch),
            headers={"Idempotency-Key": idempotency_key(batch), "Content-Encoding": "gzip"},
        )
        assert stored.status_code == 200, stored.text
        assert stored.json()["accepted"] == 3
        for method, path, body in [
            ("POST", f"/things/{other}/telemetry", encode_batch(readings(other, [1]))),
            ("POST", "/lake/query", json.dumps({"sql": "SELECT 1"}).encode()),
            ("GET", "/lake/stats", b""),
        ]:
            refused = hub.request(method, path, content=body)
            assert refused.status_code == 403, (path, refused.text)
    answer = tls_cloud.operator.post(
        "/lake/query", json={"sql": f"SELECT count(*) FROM telemetry WHERE thing = '{name}'"}
    )
    assert answer.json()["rows"] == [[3]]
