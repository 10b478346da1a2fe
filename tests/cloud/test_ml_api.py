"""The ML loop over REST and the command line, against a real running cloud: readings
uploaded by hubs, `cloud ml train` following a run to its registered versions, then
models, show, promote (with the alias history) and package, and their REST twins."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from edgeloop.core.telemetry import encode_batch
from tests.cli.test_cloud_cli import cli, json_out, ok, one_error_line, together
from tests.cloud.test_cloud_up import RunningCloud

from .ml_data import batches, kit_payloads


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    faults = [{"fault": "stuck_relay_on", "at": "17h", "until": "19h"}]
    for kit, seed, kit_faults in (("fridge-1", 21, []), ("fridge-2", 22, faults)):
        thing = f"hub-{uuid.uuid4().hex[:8]}"
        assert running.api.post("/things", json={"thingName": thing}).status_code == 201
        payloads = kit_payloads(kit, "fridge", 20, seed=seed, faults=kit_faults)
        for batch in batches(thing, payloads, size=8000):
            answer = running.api.post(f"/things/{thing}/telemetry", content=encode_batch(batch))
            assert answer.status_code == 200, answer.text
    yield running
    running.close()


@pytest.fixture(scope="module")
def trained(cloud: RunningCloud) -> str:
    shown = ok(
        cli(cloud, "ml", "train", "--appliance", "fridge", "--no-per-device", "--workers", "1")
    )
    return shown


def test_train_follows_the_run_and_reports_the_versions(cloud: RunningCloud, trained: str) -> None:
    assert "fridge" in trained and "kind" in trained and "14,400 readings" in trained
    runs = json_out(cli(cloud, "ml", "runs", "--json"))
    assert runs[0]["state"] == "succeeded" and runs[0]["phase"] == "done"
    (registered,) = runs[0]["outcome"]["registered"]
    assert registered["name"] == "fridge" and registered["version"] == 1
    assert registered["metrics"]["faults"]["stuck_relay_on"]["detected"] == 1
    assert cloud.api.get(f"/ml/datasets/{registered['datasetHash']}").json()["rows"] == 14_400


def test_models_show_promote_and_their_rest_twins(cloud: RunningCloud, trained: str) -> None:
    as_json, as_table = together(cloud, ("ml", "models", "--json"), ("ml", "models"))
    models = json_out(as_json)
    assert [(m["name"], m["latest"]) for m in models] == [("fridge", 1)]
    assert cloud.api.get("/ml/models").json() == models
    assert "fridge" in ok(as_table)

    promote = ("ml", "promote", "fridge", "1", "--alias", "champion", "--reason", "first")
    promoted = json_out(cli(cloud, *promote, "--json"))
    assert (promoted["fromVersion"], promoted["toVersion"]) == (None, 1)
    answer = cloud.api.post(
        "/ml/models/fridge/aliases/challenger", json={"version": 1, "by": "bob", "reason": "try"}
    )
    assert answer.status_code == 200 and answer.json()["who"] == "bob"

    model_json, model_table, one_json, one_table = together(
        cloud,
        ("ml", "show", "fridge", "--json"),
        ("ml", "show", "fridge"),
        ("ml", "show", "fridge@champion", "--json"),
        ("ml", "show", "fridge@1"),
    )
    shown = json_out(model_json)
    assert shown["aliases"] == {"challenger": 1, "champion": 1}
    assert [(c["alias"], c["toVersion"], c["reason"]) for c in shown["aliasHistory"]] == [
        ("champion", 1, "first"),
        ("challenger", 1, "try"),
    ]
    table = ok(model_table)
    assert "alias history" in table and "first" in table
    one = json_out(one_json)
    assert one == cloud.api.get("/ml/models/fridge/versions/1").json()
    assert one["aliases"] == ["challenger", "champion"]
    details = ok(one_table)
    assert "stuck_relay_on" in details and "F1" in details
    artifact = cloud.api.get("/ml/models/fridge/versions/latest/artifact")
    assert artifact.status_code == 200 and artifact.json()["format"] == "edgeloop.appliance-model"


def test_package_publishes_a_component(cloud: RunningCloud, trained: str) -> None:
    packaged = json_out(cli(cloud, "ml", "package", "fridge", "champion", "--json"))
    assert (packaged["componentName"], packaged["componentVersion"]) == (
        "edgeloop.model.fridge",
        "1.0.0",
    )
    component = cloud.api.get("/components/edgeloop.model.fridge/versions/1.0.0")
    assert component.status_code == 200, component.text
    assert "already published" in ok(cli(cloud, "ml", "package", "fridge", "1"))


def test_errors_are_one_line(cloud: RunningCloud) -> None:
    unknown, since, cluster, alias = together(
        cloud,
        ("ml", "show", "pump"),
        ("ml", "train", "--since", "last tuesday", "--detach"),
        ("ml", "train", "--cluster", "localhost:8786", "--detach"),
        ("ml", "promote", "fridge", "1", "--alias", "Best!"),
    )
    assert "no model named 'pump'" in one_error_line(unknown)
    assert "--since" in one_error_line(since)
    assert "--cluster" in one_error_line(cluster)
    assert "alias" in one_error_line(alias)
    bad = cloud.api.post("/ml/train", json={"holdout": 2})
    assert bad.status_code == 400 and bad.json()["field"] == "holdout"
