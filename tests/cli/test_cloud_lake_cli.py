"""`edgeloop cloud lake …` against a real running cloud: query, stats, compact, retention."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from edgeloop.core.telemetry import Reading, Record, TelemetryBatch, encode_batch, encode_reading
from tests.cli.test_cloud_cli import cli, json_out, ok, one_error_line
from tests.cloud.test_cloud_up import RunningCloud


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def _upload(cloud: RunningCloud, thing: str, seqs: range) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    batch = TelemetryBatch(
        thing,
        "readings",
        tuple(
            Record(s, 0, encode_reading(Reading("kit-9", "pump", at.timestamp(), {"bar": 2.5})))
            for s in seqs
        ),
    )
    answer = cloud.api.post(f"/things/{thing}/telemetry", content=encode_batch(batch))
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def thing(cloud: RunningCloud) -> str:
    name = f"hub-{uuid.uuid4().hex[:8]}"
    assert cloud.api.post("/things", json={"thingName": name}).status_code == 201
    for start in (0, 10, 20):
        _upload(cloud, name, range(start, start + 10))
    return name


def test_query_prints_a_table_or_json(cloud: RunningCloud, thing: str) -> None:
    sql = (
        "SELECT thing, count(*) AS n, max(sensors['bar']) AS bar FROM telemetry "
        f"WHERE thing = '{thing}' GROUP BY thing"
    )
    shown = ok(cli(cloud, "lake", "query", sql))
    assert thing in shown and "30" in shown and "2.5" in shown and "1 row" in shown
    assert json_out(cli(cloud, "lake", "query", sql, "--json")) == [
        {"thing": thing, "n": 30, "bar": 2.5}
    ]
    limited = ok(cli(cloud, "lake", "query", "SELECT sequence FROM telemetry", "--limit", "2"))
    assert "the first 2 shown" in limited


def test_query_errors_are_one_line_naming_the_sql(cloud: RunningCloud) -> None:
    line = one_error_line(cli(cloud, "lake", "query", "DELETE FROM telemetry"))
    assert line.startswith("error: sql: ") and "SELECT" in line
    line = one_error_line(cli(cloud, "lake", "query", "SELECT nope FROM telemetry"))
    assert "nope" in line


def test_stats_compact_and_retention(cloud: RunningCloud, thing: str) -> None:
    stats = json_out(cli(cloud, "lake", "stats", "--json"))
    assert stats["telemetry"]["rows"] >= 30 and stats["telemetry"]["files"] >= 3
    shown = ok(cli(cloud, "lake", "stats"))
    assert "telemetry" in shown and "quarantine" in shown and "sequence numbers held" in shown
    compacted = ok(cli(cloud, "lake", "compact"))
    assert "merged into 1" in compacted
    after = json.loads(ok(cli(cloud, "lake", "stats", "--json")))
    assert (
        after["telemetry"]["files"] == 1
        and after["telemetry"]["rows"] == stats["telemetry"]["rows"]
    )
    kept = json_out(cli(cloud, "lake", "retention", "--days", "30", "--json"))
    assert kept["files"] == 0
    assert "dropped 0 partitions" in ok(cli(cloud, "lake", "retention", "--days", "30"))
    refused = cli(cloud, "lake", "retention", "--days", "-1")
    assert refused.returncode != 0 and "--days" in refused.stderr
