"""The jobs REST routes: create, describe, follow, add targets, cancel; errors name the field."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgeloop.cloud.api import API_PREFIX, create_app
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.db import Database
from edgeloop.cloud.objectstore import LocalObjectStore
from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.registry import Registry
from edgeloop.core.jobstate import ExecutionStatus, StartNextRequest
from edgeloop.core.shadowbook import ShadowBook


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


def _things(api: TestClient, count: int) -> list[str]:
    names = sorted(f"hub-{uuid.uuid4().hex[:8]}" for _ in range(count))
    for name in names:
        assert api.post("/things", json={"thingName": name}).status_code == 201
    return names


def _job_id() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def test_create_describe_and_list_a_job(api: TestClient) -> None:
    a, b = _things(api, 2)
    job_id = _job_id()
    created = api.post(
        "/jobs",
        json={
            "jobId": job_id,
            "document": {"operation": "reboot"},
            "targets": [a, b],
            "description": "reboot the pumps",
            "timeoutConfig": {"inProgressTimeoutInMinutes": 15},
        },
    )
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "IN_PROGRESS" and job["targetSelection"] == "SNAPSHOT"
    assert job["counts"]["QUEUED"] == 2 and job["counts"]["SUCCEEDED"] == 0
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 15}
    assert api.get(f"/jobs/{job_id}").json()["document"] == {"operation": "reboot"}
    assert job_id in [j["jobId"] for j in api.get("/jobs").json()["jobs"]]
    assert job_id in [j["jobId"] for j in api.get("/jobs?status=IN_PROGRESS").json()["jobs"]]
    assert job_id not in [j["jobId"] for j in api.get("/jobs?status=CANCELED").json()["jobs"]]

    execution = api.get(f"/jobs/{job_id}/things/{a}").json()
    assert execution["status"] == "QUEUED" and execution["versionNumber"] == 1
    mine = api.get(f"/things/{a}/jobs").json()
    assert [e["jobId"] for e in mine["executions"]] == [job_id]
    assert mine["counts"]["QUEUED"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"document": {}}, "jobId"),
        ({"jobId": "bad id", "document": {}, "targets": ["x"]}, "jobId"),
        ({"jobId": "ok", "document": [], "targets": ["x"]}, "document"),
        ({"jobId": "ok", "document": {}, "targets": ["bad name"]}, "targets[0]"),
        ({"jobId": "ok", "document": {}}, "targets"),
        ({"jobId": "ok", "document": {}, "targets": ["x"], "colour": "red"}, "colour"),
        (
            {"jobId": "ok", "document": {}, "targets": ["x"], "timeoutConfig": {"x": 1}},
            "timeoutConfig.x",
        ),
        (
            {
                "jobId": "ok",
                "document": {},
                "targets": ["x"],
                "timeoutConfig": {"inProgressTimeoutInMinutes": 0},
            },
            "timeoutConfig.inProgressTimeoutInMinutes",
        ),
        (
            {"jobId": "ok", "document": {}, "targets": ["x"], "targetSelection": "ALL"},
            "targetSelection",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    api: TestClient, body: dict[str, Any], field: str
) -> None:
    answer = api.post("/jobs", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "validation"
    assert answer.json()["field"] == field


def test_unknown_and_duplicate_are_404_and_409(api: TestClient) -> None:
    (a,) = _things(api, 1)
    job_id = _job_id()
    answer = api.post("/jobs", json={"jobId": job_id, "document": {}, "targets": [a, "ghost"]})
    assert answer.status_code == 404 and "ghost" in answer.json()["message"]
    assert (
        api.post("/jobs", json={"jobId": job_id, "document": {}, "targets": [a]}).status_code == 201
    )
    again = api.post("/jobs", json={"jobId": job_id, "document": {}, "targets": [a]})
    assert again.status_code == 409 and "already exists" in again.json()["message"]
    assert api.get("/jobs/nope").status_code == 404
    assert api.get(f"/jobs/{job_id}/things/ghost").status_code == 404
    assert api.get("/jobs/nope/executions").status_code == 404


def test_cancel_a_job_and_one_execution(
    cloud: tuple[CloudContext, TestClient], api: TestClient
) -> None:
    ctx = cloud[0]
    a, b, c = _things(api, 3)
    job_id = _job_id()
    api.post("/jobs", json={"jobId": job_id, "document": {}, "targets": [a, b, c]})
    ctx.jobs.start_next(b, StartNextRequest())
    canceled = api.post(f"/jobs/{job_id}/things/{a}/cancel", json={"reason": "not this one"})
    assert canceled.status_code == 200 and canceled.json()["status"] == "CANCELED"
    assert canceled.json()["reason"] == "not this one"
    running = api.post(f"/jobs/{job_id}/things/{b}/cancel")
    assert running.status_code == 409 and "force" in running.json()["message"]
    job = api.post(f"/jobs/{job_id}/cancel", json={"reason": "bad build"}).json()
    assert job["status"] == "CANCELED" and job["reason"] == "bad build"
    assert job["counts"]["CANCELED"] == 2 and job["counts"]["IN_PROGRESS"] == 1
    forced = api.post(f"/jobs/{job_id}/cancel", json={"force": True}).json()
    assert forced["forceCanceled"] and forced["counts"]["CANCELED"] == 3


def test_a_continuous_job_takes_targets_and_pages_its_executions(api: TestClient) -> None:
    names = _things(api, 5)
    job_id = _job_id()
    created = api.post(
        "/jobs", json={"jobId": job_id, "document": {}, "targetSelection": "CONTINUOUS"}
    )
    assert created.status_code == 201 and created.json()["counts"]["QUEUED"] == 0
    queued = api.post(f"/jobs/{job_id}/targets", json={"targets": names[:3]}).json()["queued"]
    assert [e["thingName"] for e in queued] == names[:3]
    queued = api.post(f"/jobs/{job_id}/targets", json={"targets": names}).json()["queued"]
    assert [e["thingName"] for e in queued] == names[3:]
    bad = api.post(f"/jobs/{job_id}/targets", json={"targets": ["ok-name", "bad name"]})
    assert bad.status_code == 400 and bad.json()["field"] == "targets[1]"

    page = api.get(f"/jobs/{job_id}/executions?pageSize=2").json()
    assert [e["thingName"] for e in page["executions"]] == names[:2]
    assert page["counts"]["QUEUED"] == 5
    seen = [e["thingName"] for e in page["executions"]]
    while page["nextToken"]:
        page = api.get(
            f"/jobs/{job_id}/executions", params={"pageSize": 2, "nextToken": page["nextToken"]}
        ).json()
        seen += [e["thingName"] for e in page["executions"]]
    assert seen == names
    removed = api.post(f"/jobs/{job_id}/things/{names[0]}/remove").json()
    assert removed["status"] == ExecutionStatus.REMOVED
    only = api.get(f"/jobs/{job_id}/executions?status=REMOVED").json()["executions"]
    assert [e["thingName"] for e in only] == [names[0]]
    assert api.get(f"/jobs/{job_id}/executions?status=DONE").status_code == 400
    assert api.post(f"/jobs/{job_id}/complete").status_code == 409  # still pending


def test_a_snapshot_job_takes_no_more_targets(api: TestClient) -> None:
    a, b = _things(api, 2)
    job_id = _job_id()
    api.post("/jobs", json={"jobId": job_id, "document": {}, "targets": [a]})
    answer = api.post(f"/jobs/{job_id}/targets", json={"targets": [b]})
    assert answer.status_code == 409 and "CONTINUOUS" in answer.json()["message"]


def test_the_routes_are_described_in_openapi(api: TestClient) -> None:
    schema = api.get("http://testserver/openapi.json").json()
    jobs = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if operations[method]["tags"] == ["jobs"]
    }
    assert jobs == {
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/{jobId}"),
        ("POST", "/api/v1/jobs/{jobId}/targets"),
        ("POST", "/api/v1/jobs/{jobId}/cancel"),
        ("POST", "/api/v1/jobs/{jobId}/complete"),
        ("GET", "/api/v1/jobs/{jobId}/executions"),
        ("GET", "/api/v1/jobs/{jobId}/things/{thingName}"),
        ("POST", "/api/v1/jobs/{jobId}/things/{thingName}/cancel"),
        ("POST", "/api/v1/jobs/{jobId}/things/{thingName}/remove"),
        ("GET", "/api/v1/things/{thingName}/jobs"),
    }
    for path, method in ((p, m.lower()) for m, p in jobs):
        operation = schema["paths"][path][method]
        assert operation.get("summary") and operation.get("description")
        assert "422" not in operation["responses"]
        assert {"400", "404", "409"} <= set(operation["responses"])
