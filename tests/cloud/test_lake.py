"""The telemetry lake: ingestion, dedup across batches and crashes, quarantine, compaction,
retention and queries — on a local folder and on S3 (a real moto server), over SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.cloud.db import Database
from edgeloop.cloud.lake import Lake, LakeSettings
from edgeloop.cloud.lake_mqtt import LakeMqttIngest
from edgeloop.cloud.lake_rows import convert, merge_ranges, seen_mask
from edgeloop.cloud.objectstore import LocalObjectStore, ObjectStore, S3ObjectStore
from edgeloop.core.errors import ConflictError, ValidationError
from edgeloop.core.telemetry import (
    Reading,
    Record,
    TelemetryBatch,
    encode_batch,
    parse_reading,
    telemetry_topic,
)

NOW = datetime(2024, 5, 20, 12, 0, tzinfo=UTC)
SENSORS = {"temp_c": 61.25, "current_a": 3.5, "vibration_g": 0.01}


class Clock:
    """A settable clock for the lake."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def reading(seq: int, *, at: datetime = NOW - timedelta(hours=1), **change: Any) -> bytes:
    document = Reading(
        kit=f"kit-{seq % 3}",
        appliance="furnace",
        ts=at.timestamp() + seq * 0.001,
        sensors={**SENSORS, "temp_c": 60 + seq % 7},
        kit_seq=seq,
        label="normal" if seq % 2 else None,
    ).to_json()
    document.update(change)
    return json.dumps(document, separators=(",", ":")).encode()


def batch(
    seqs: Iterator[int] | range | list[int],
    *,
    thing: str = "hub-1",
    stream: str = "readings",
    payload: Callable[[int], bytes] = reading,
) -> TelemetryBatch:
    return TelemetryBatch(
        thing,
        stream,
        tuple(Record(s, int(NOW.timestamp() * 1e6) + s, payload(s)) for s in seqs),
    )


def count(lake: Lake, where: str = "true") -> int:
    return int(lake.rows(f"SELECT count(*) AS n FROM telemetry WHERE {where}")[0]["n"])


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


def _s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3ObjectStore:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    endpoint = request.getfixturevalue("s3_endpoint")
    store = S3ObjectStore(f"lake-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint, prefix="l")
    store.ensure_bucket()
    return store


@pytest.fixture(params=["local+sqlite", "s3+sqlite", "local+postgresql"])
def setup(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Database, ObjectStore, Path]]:
    store_kind, db_kind = request.param.split("+")
    store: ObjectStore = (
        _s3(request, monkeypatch) if store_kind == "s3" else LocalObjectStore(tmp_path / "objects")
    )
    if db_kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'edgeloop.db'}"
        db = Database(url)
        db.migrate()
        yield db, store, tmp_path
        db.dispose()
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"t_{uuid.uuid4().hex[:16]}"
        server.admin(f'CREATE DATABASE "{name}"')
        db = Database(server.url(name))
        db.migrate()
        try:
            yield db, store, tmp_path
        finally:
            db.dispose()
            server.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lake(setup: tuple[Database, ObjectStore, Path], clock: Clock) -> Lake:
    db, store, tmp_path = setup
    return Lake(db, store, cache_dir=tmp_path / "cache", clock=clock)


def _local_lake(tmp_path: Path, clock: Clock | None = None) -> Lake:
    db = Database(f"sqlite:///{tmp_path / 'lake.db'}")
    db.migrate()
    return Lake(db, LocalObjectStore(tmp_path / "objects"), clock=clock or Clock())


# --- ingestion and queries -----------------------------------------------------------------


def test_readings_arrive_whole_and_queryable(lake: Lake) -> None:
    result = lake.ingest(batch(range(10)))
    assert (result.received, result.accepted, result.duplicates, result.quarantined) == (
        10,
        10,
        0,
        0,
    )
    rows = lake.rows("SELECT * FROM telemetry ORDER BY sequence")
    assert [r["sequence"] for r in rows] == list(range(10))
    first = rows[1]
    assert first["thing"] == "hub-1" and first["stream"] == "readings"
    assert first["kit"] == "kit-1" and first["appliance"] == "furnace"
    assert first["sensors"] == {**SENSORS, "temp_c": 61.0}
    assert first["kit_seq"] == 1 and first["label"] == "normal" and rows[0]["label"] is None
    expected = NOW - timedelta(hours=1) + timedelta(milliseconds=1)
    assert abs(first["device_time"] - expected) < timedelta(microseconds=2)
    assert first["hub_time"] == datetime.fromtimestamp(NOW.timestamp() + 1e-6, UTC)
    assert first["ingest_time"] == NOW
    assert first["date"] == date(2024, 5, 20)
    by_sensor = lake.rows(
        "SELECT kit, max(sensors['temp_c']) AS hottest FROM telemetry GROUP BY kit ORDER BY kit"
    )
    assert by_sensor == [
        {"kit": "kit-0", "hottest": 66.0},
        {"kit": "kit-1", "hottest": 64.0},
        {"kit": "kit-2", "hottest": 65.0},
    ]
    keys = [f.key for f in lake.live_files()]
    assert len(keys) == 1
    assert keys[0].startswith("telemetry/date=2024-05-20/thing=hub-1/part-")


def test_duplicates_across_batches_and_within_one(lake: Lake) -> None:
    assert lake.ingest(batch(range(0, 100))).accepted == 100
    again = lake.ingest(batch(range(50, 150)))
    assert (again.accepted, again.duplicates) == (50, 50)
    repeated = lake.ingest(batch([150, 151, 150, 151, 152, 0]))
    assert (repeated.accepted, repeated.duplicates) == (3, 3)
    assert lake.ingest(batch(range(0, 153))).accepted == 0  # nothing new: nothing written
    other_stream = lake.ingest(batch(range(0, 10), stream="alerts"))
    other_thing = lake.ingest(batch(range(0, 10), thing="hub-2"))
    assert other_stream.accepted == other_thing.accepted == 10
    assert count(lake) == 173
    distinct = lake.rows("SELECT count(DISTINCT (thing, stream, sequence)) AS n FROM telemetry")[0][
        "n"
    ]
    assert distinct == 173
    assert lake.stats().sequences_held == 173


def test_a_reading_spooled_twice_is_kept_once_by_its_kit_counter(lake: Lake) -> None:
    # A hub's bridge died between spooling kit readings and acknowledging them to its
    # broker: redelivered, they were spooled again under new sequence numbers.
    first = lake.ingest(batch(range(0, 30)))
    redelivered = lake.ingest(
        batch(range(100, 130), payload=lambda s: reading(s - 100 + 20 if s < 110 else s - 70))
    )
    # 100..109 repeat kit_seq 20..29; 110..129 are kit_seq 40..59, new.
    assert (first.accepted, redelivered.accepted, redelivered.duplicates) == (30, 20, 10)
    # Within one batch too, the lowest sequence wins.
    within = lake.ingest(batch([200, 201, 202], payload=lambda s: reading(60)))
    assert (within.accepted, within.duplicates) == (1, 2)
    assert count(lake) == 51
    assert lake.rows(
        "SELECT count(*) AS n, count(DISTINCT (kit, kit_seq)) AS k FROM telemetry"
    ) == [{"n": 51, "k": 51}]
    assert lake.rows("SELECT sequence FROM telemetry WHERE kit_seq = 60") == [{"sequence": 200}]
    # Kit counters are per stream; readings without one are kept once by sequence alone.
    assert lake.ingest(batch(range(0, 30), stream="alerts")).accepted == 30
    no_counter = lake.ingest(batch(range(300, 305), payload=lambda s: reading(7, kit_seq=None)))
    assert no_counter.accepted == 5
    # Repeats by counter still fill the sequence ranges: sent again, they are duplicates.
    again = lake.ingest(batch(range(100, 130), payload=lambda s: reading(s)))
    assert (again.accepted, again.duplicates) == (0, 30)


def test_a_retried_upload_is_answered_as_the_first_time(lake: Lake) -> None:
    first = lake.ingest(batch(range(20)), idempotency_key="k-1")
    retry = lake.ingest(batch(range(20)), idempotency_key="k-1")
    assert retry.replayed and not first.replayed
    assert (retry.accepted, retry.duplicates) == (first.accepted, 0)
    assert count(lake) == 20
    with pytest.raises(ConflictError, match="another batch"):
        lake.ingest(batch(range(21)), idempotency_key="k-1")
    # Keys belong to their thing.
    assert not lake.ingest(batch(range(5), thing="hub-2"), idempotency_key="k-1").replayed
    with pytest.raises(ValidationError) as caught:
        lake.ingest(batch(range(1)), idempotency_key="has space")
    assert caught.value.field == "Idempotency-Key"


class Crash(BaseException):
    """The process dies here."""


def test_a_crash_between_file_and_index_loses_and_duplicates_nothing(
    lake: Lake, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake.ingest(batch(range(0, 10)))
    original = Lake._commit

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash

    monkeypatch.setattr(Lake, "_commit", crash)
    monkeypatch.setattr(Lake, "discard", lambda self, written: None)  # no cleanup: died
    with pytest.raises(Crash):
        lake.ingest(batch(range(5, 30), payload=lambda s: reading(s) if s != 17 else b"bad"))
    monkeypatch.setattr(Lake, "_commit", original)
    orphans = [i.key for i in lake.objects.list("telemetry/")] + [
        i.key for i in lake.objects.list("quarantine/")
    ]
    assert len(orphans) == 3  # the first batch's file, and the dead one's two
    assert count(lake) == 10  # files no manifest row names are not in the lake
    assert lake.stats().sequences_held == 10
    # The hub sends the batch again: every new record is taken, once.
    again = lake.ingest(batch(range(5, 30), payload=lambda s: reading(s) if s != 17 else b"bad"))
    assert (again.accepted, again.duplicates, again.quarantined) == (19, 5, 1)
    assert count(lake) == 29
    assert lake.rows("SELECT sequence FROM quarantine") == [{"sequence": 17}]
    # The orphans go once older than the grace period, and nothing else does.
    assert lake.collect_garbage() == 0
    clock.now += timedelta(hours=1)
    assert lake.collect_garbage() == 2
    remaining = {i.key for i in lake.objects.list("")}
    assert remaining == {f.key for f in lake.live_files()} | {
        f.key for f in lake.live_files("quarantine")
    }
    assert count(lake) == 29


def test_a_crash_after_the_commit_makes_the_retry_a_duplicate(lake: Lake) -> None:
    lake.ingest(batch(range(10)))  # committed; the answer never reached the hub
    retry = lake.ingest(batch(range(10)))
    assert (retry.accepted, retry.duplicates) == (0, 10)
    assert count(lake) == 10


def test_bad_readings_are_quarantined_without_poisoning_their_batch(lake: Lake) -> None:
    bad = {
        3: b"not json at all",
        4: reading(4, sensors={"temp_c": None}),
        5: reading(5, ts="yesterday"),
        6: reading(6, extra=1),
        7: reading(7, at=NOW + timedelta(days=3)),  # the device's clock is far ahead
        8: b"",
        9: reading(9, kit=""),
    }
    result = lake.ingest(batch(range(20), payload=lambda s: bad[s] if s in bad else reading(s)))
    assert (result.accepted, result.quarantined) == (13, 7)
    assert count(lake) == 13
    quarantined = lake.rows(
        "SELECT sequence, field, reason, payload, source FROM quarantine ORDER BY sequence"
    )
    assert [(q["sequence"], q["field"]) for q in quarantined] == [
        (3, "payload"),
        (4, "sensors.temp_c"),
        (5, "ts"),
        (6, "extra"),
        (7, "ts"),
        (8, "payload"),
        (9, "kit"),
    ]
    assert quarantined[0]["payload"] == b"not json at all"
    assert "ahead" in quarantined[4]["reason"]
    assert {q["source"] for q in quarantined} == {"https"}
    # Sent again, a quarantined record is a duplicate: it is kept once too.
    again = lake.ingest(batch(range(20), payload=lambda s: bad[s] if s in bad else reading(s)))
    assert (again.duplicates, again.quarantined) == (20, 0)
    stats = lake.stats()
    assert stats.quarantine.rows == 7 and stats.telemetry.rows == 13


def test_a_batch_over_midnight_lands_in_two_partitions(lake: Lake) -> None:
    midnight = datetime(2024, 5, 20, tzinfo=UTC)
    lake.ingest(
        batch(range(4), payload=lambda s: reading(s, at=midnight - timedelta(seconds=2 - s)))
    )
    dates = sorted(f.date for f in lake.live_files())
    assert dates == ["2024-05-19", "2024-05-20"]
    per_day = lake.rows("SELECT date, count(*) AS n FROM telemetry GROUP BY date ORDER BY date")
    assert [r["n"] for r in per_day] == [2, 2]


# --- compaction, retention, garbage --------------------------------------------------------


def test_compaction_merges_small_files_with_no_row_lost_or_repeated(
    lake: Lake, clock: Clock
) -> None:
    for start in range(0, 200, 20):  # ten small batches, each its own file
        lake.ingest(batch(range(start, start + 25)))  # overlapping: dedup before compaction
    lake.ingest(batch(range(3), thing="hub-2"))
    lake.ingest(batch([500], payload=lambda s: b"junk"))
    lake.ingest(batch([501], payload=lambda s: b"junk"))
    before = lake.rows("SELECT thing, stream, sequence, sensors FROM telemetry ORDER BY ALL")
    assert len(before) == 208
    assert lake.stats().telemetry.files == 11

    result = lake.compact()
    assert (result.partitions, result.files_before, result.files_after) == (2, 12, 2)
    assert result.rows == 205 + 2 and result.duplicates_dropped == 0
    stats = lake.stats()
    assert (stats.telemetry.files, stats.quarantine.files) == (2, 1)
    assert stats.retired_files == 12  # readable until the grace period has passed
    after = lake.rows("SELECT thing, stream, sequence, sensors FROM telemetry ORDER BY ALL")
    assert after == before
    assert lake.rows("SELECT count(*) AS n FROM quarantine") == [{"n": 2}]
    assert lake.compact().files_before == 0  # nothing small left to merge
    clock.now += timedelta(hours=1)
    assert lake.collect_garbage() == 12
    assert lake.stats().retired_files == 0
    assert (
        lake.rows("SELECT thing, stream, sequence, sensors FROM telemetry ORDER BY ALL") == before
    )


def test_compaction_gives_way_when_its_files_change_under_it(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    for start in range(0, 30, 10):
        lake.ingest(batch(range(start, start + 10)))
    original = Lake.put_table

    def retention_meanwhile(self: Lake, *args: Any, **kwargs: Any) -> Any:
        written = original(self, *args, **kwargs)
        self.retain(0)  # "today" keeps today's partition: use a day in the future instead
        return written

    lake.clock = Clock(NOW + timedelta(days=2))  # type: ignore[method-assign]
    monkeypatch.setattr(Lake, "put_table", retention_meanwhile)
    result = lake.compact(collect=False)
    assert result.files_after == 0  # it lost the race and kept nothing of its own
    assert lake.stats().telemetry.files == 0
    assert not [
        i.key
        for i in lake.objects.list("telemetry/")
        if i.key not in {f.key for f in lake.live_files()} and "part-2024052212" in i.key
    ]


def test_retention_drops_old_partitions_and_never_takes_their_readings_back(
    lake: Lake, clock: Clock
) -> None:
    for days_ago in (0, 5, 10, 40):
        at = NOW - timedelta(days=days_ago)
        lake.ingest(
            batch(
                range(days_ago * 100, days_ago * 100 + 5),
                payload=lambda s, at=at: reading(s, at=at),
            )
        )
    lake.quarantine_message("hub-1", b"??", reason="unreadable", field="body")
    result = lake.retain(7)
    assert result.cutoff == "2024-05-13"
    assert (result.partitions, result.files, result.rows) == (2, 2, 10)
    assert count(lake) == 10
    assert [r["date"] for r in lake.rows("SELECT DISTINCT date FROM telemetry ORDER BY 1")] == [
        date(2024, 5, 15),
        date(2024, 5, 20),
    ]
    # A late copy of a dropped reading is not taken in again.
    late = lake.ingest(
        batch(range(1000, 1005), payload=lambda s: reading(s, at=NOW - timedelta(days=10)))
    )
    assert late.duplicates == 5
    assert lake.rows("SELECT count(*) AS n FROM quarantine") == [{"n": 1}]
    clock.now += timedelta(days=30)
    assert lake.retain(7).files == 3  # the rest, the quarantine included
    assert lake.stats().telemetry.files == 0
    with pytest.raises(ValidationError) as caught:
        lake.retain(-1)
    assert caught.value.field == "days"


def test_stats(lake: Lake) -> None:
    lake.ingest(batch(range(10)))
    lake.ingest(batch(range(10), stream="alerts", payload=lambda s: reading(s) if s else b"x"))
    stats = lake.stats()
    assert stats.telemetry.rows == 19 and stats.telemetry.files == 2
    assert stats.telemetry.partitions == 1 and stats.telemetry.small_files == 2
    assert stats.quarantine.rows == 1
    assert (stats.things, stats.streams, stats.sequences_held) == (1, 2, 20)
    assert stats.telemetry.first_date == stats.telemetry.last_date == "2024-05-20"
    assert stats.telemetry.bytes > 0
    assert stats.to_json()["telemetry"]["rows"] == 19


# --- queries -----------------------------------------------------------------------------


def test_an_empty_lake_answers_queries(lake: Lake) -> None:
    assert lake.rows("SELECT count(*) AS n FROM telemetry") == [{"n": 0}]
    assert lake.query("SELECT * FROM quarantine").num_rows == 0
    assert "sensors" in lake.query("SELECT * FROM telemetry").column_names


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM telemetry",
        "CREATE TABLE x AS SELECT 1",
        "COPY (SELECT 1) TO '/tmp/x.csv'",
        "ATTACH '/tmp/x.db'",
        "SELECT 1; SELECT 2",
        "SET enable_external_access = true",
        "",
        "SELEC 1",
    ],
)
def test_only_one_select_is_run(tmp_path: Path, sql: str) -> None:
    lake = _local_lake(tmp_path)
    with pytest.raises(ValidationError) as caught:
        lake.query(sql)
    assert caught.value.field == "sql"


def test_queries_read_the_lake_and_nothing_else(tmp_path: Path) -> None:
    lake = _local_lake(tmp_path)
    lake.ingest(batch(range(3)))
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(ValidationError, match=r"disabled|Permission") as caught:
        lake.query(f"SELECT * FROM read_csv('{secret}')")
    assert caught.value.field == "sql"
    assert lake.rows("WITH t AS (SELECT * FROM telemetry) SELECT count(*) AS n FROM t") == [
        {"n": 3}
    ]
    with pytest.raises(ValidationError, match="no_such"):
        lake.query("SELECT no_such FROM telemetry")


def test_concurrent_writers_of_one_stream_keep_each_reading_once(
    setup: tuple[Database, ObjectStore, Path], clock: Clock
) -> None:
    db, store, tmp_path = setup
    # Two lakes on one database and store: two cloud processes, no shared lock.
    lakes = [Lake(db, store, cache_dir=tmp_path / f"cache{i}", clock=clock) for i in range(2)]
    results: list[int] = []
    errors: list[BaseException] = []

    def upload(lake: Lake, start: int) -> None:
        try:
            for offset in range(0, 60, 15):
                results.append(
                    lake.ingest(batch(range(start + offset, start + offset + 30))).accepted
                )
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=upload, args=(lakes[i % 2], start))
        for i, start in enumerate((0, 10, 20, 30))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sum(results) == 105 == count(lakes[0])
    assert lakes[1].rows("SELECT count(DISTINCT sequence) AS n FROM telemetry") == [{"n": 105}]


# --- MQTT ---------------------------------------------------------------------------------


def test_mqtt_messages_reach_the_lake_or_its_quarantine(tmp_path: Path) -> None:
    lake = _local_lake(tmp_path)
    mqtt = LakeMqttIngest(lake, tmp_path / "inbox")
    topic = telemetry_topic("hub-1", "alerts")
    assert mqtt.handles(topic) and not mqtt.handles("edgeloop/things/hub-1/connectivity")
    message = encode_batch(batch(range(3), stream="alerts"))
    result = mqtt.handle(topic, message)
    assert result is not None and result.accepted == 3
    redelivered = mqtt.handle(topic, message)  # QoS 1 may deliver twice
    assert redelivered is not None and redelivered.duplicates == 3
    assert mqtt.handle(topic, b"\x00garbage") is None
    assert mqtt.handle(telemetry_topic("hub-2", "alerts"), message) is None  # not its own
    quarantined = lake.rows(
        "SELECT thing, stream, sequence, field, source FROM quarantine ORDER BY field"
    )
    assert quarantined == [
        {"thing": "hub-1", "stream": "alerts", "sequence": None, "field": "body", "source": "mqtt"},
        {
            "thing": "hub-2",
            "stream": "alerts",
            "sequence": None,
            "field": "header.thing",
            "source": "mqtt",
        },
    ]
    assert count(lake) == 3


def test_mqtt_messages_wait_in_the_inbox_while_the_lake_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = _local_lake(tmp_path)
    mqtt = LakeMqttIngest(lake, tmp_path / "inbox")
    topic = telemetry_topic("hub-1", "events")

    def down(*args: Any, **kwargs: Any) -> Any:
        raise OSError("the store is unreachable")

    monkeypatch.setattr(lake.objects, "put", down)
    assert mqtt.handle(topic, encode_batch(batch(range(2), stream="events"))) is None
    assert mqtt.handle(topic, encode_batch(batch(range(2, 4), stream="events"))) is None
    assert len(list((tmp_path / "inbox").glob("*.msg"))) == 2
    assert count(lake) == 0
    monkeypatch.undo()
    # A restart finds the inbox; the next message replays it first.
    again = LakeMqttIngest(lake, tmp_path / "inbox")
    result = again.handle(topic, encode_batch(batch(range(4, 5), stream="events")))
    assert result is not None and result.accepted == 1
    assert not list((tmp_path / "inbox").glob("*.msg"))
    assert count(lake) == 5


# --- the columnar path agrees with the rules ----------------------------------------------

VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-(2**40), 2**40),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)
NAMES = st.sampled_from(["temp_c", "current_a", "label", "bad name", "x.y", ""])
DOCUMENTS = st.fixed_dictionaries(
    {
        "kit": st.one_of(st.sampled_from(["kit-1", "", "k" * 129]), st.none(), st.integers()),
        "appliance": st.sampled_from(["fridge", "pump"]),
        "ts": st.one_of(
            st.floats(1.7e9, 1.8e9),
            st.sampled_from([0, 5e9, "x", True]),
            st.integers(1_700_000_000, 1_800_000_000),
        ),
        "sensors": st.one_of(st.dictionaries(NAMES, VALUES, max_size=4), st.none(), st.just([])),
    },
    optional={
        "kit_seq": st.one_of(st.integers(-(2**62), 2**62), st.none(), st.floats(0, 1)),
        "label": st.one_of(st.sampled_from(["normal", "x" * 70]), st.none(), st.integers()),
        "extra": st.integers(),
    },
)


# Payloads that could fool checks done on a whole batch at once.
TRICKY = st.sampled_from(
    [
        b"",
        b"{}",
        b"{\n}",
        b'{"kit":"k","appliance":"a","ts":1.8e9,"sensors":{"t":1}}\n{"kit":"k"}',
        b'{"kit":"k","appliance":"a","ts":1.8e9,"sensors":{"t":1}}\r',
        b'{"kit":"k","appliance":"a","ts":1.8e9,"sensors":{"label":null,"t":1}}',
        b'{"kit":"k\\"label\\":null","appliance":"a","ts":1.8e9,"sensors":{"t":null}}',
        b"null",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    documents=st.lists(st.one_of(DOCUMENTS, TRICKY), min_size=1, max_size=12),
    pretty=st.booleans(),
)
def test_columnar_checks_agree_with_the_rules(
    documents: list[dict[str, Any] | bytes], pretty: bool
) -> None:
    separators = (", ", ": ") if pretty else (",", ":")
    payloads = [
        d if isinstance(d, bytes) else json.dumps(d, separators=separators).encode()
        for d in documents
    ]
    converted = convert(
        "t",
        "s",
        np.arange(len(payloads), dtype=np.int64),
        np.zeros(len(payloads), dtype=np.int64),
        payloads,
        ingest_time=datetime(2030, 1, 1, tzinfo=UTC),
        source="https",
        max_future_us=0,
    )
    accepted = set(converted.rows.column("sequence").to_pylist())
    for i, payload in enumerate(payloads):
        try:
            expected = parse_reading(payload)
        except ValidationError:
            assert i not in accepted, payload
            continue
        assert i in accepted, payload
        row = converted.rows.filter(converted.rows.column("sequence").to_numpy() == i).to_pylist()[
            0
        ]
        assert dict(row["sensors"]) == {k: float(v) for k, v in expected.sensors.items()}
        assert (row["kit"], row["label"], row["kit_seq"]) == (
            expected.kit,
            expected.label,
            expected.kit_seq,
        )
    assert len(accepted) + converted.quarantined.num_rows == len(documents)


@settings(max_examples=200, deadline=None)
@given(
    held=st.lists(st.integers(0, 200), max_size=60),
    incoming=st.lists(st.integers(0, 220), max_size=60),
)
def test_sequence_ranges_match_a_set(held: list[int], incoming: list[int]) -> None:
    ranges = merge_ranges([], np.asarray(held, dtype=np.int64))
    assert all(a <= b for a, b in ranges)
    assert all(ranges[i][1] + 1 < ranges[i + 1][0] for i in range(len(ranges) - 1))
    expanded = {s for a, b in ranges for s in range(a, b + 1)}
    assert expanded == set(held)
    mask = seen_mask(ranges, np.asarray(incoming, dtype=np.int64))
    assert mask.tolist() == [s in set(held) for s in incoming]
    merged = merge_ranges(ranges, np.asarray(incoming, dtype=np.int64))
    assert {s for a, b in merged for s in range(a, b + 1)} == set(held) | set(incoming)


def test_settings_are_tunable(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'lake.db'}")
    db.migrate()
    lake = Lake(
        db,
        LocalObjectStore(tmp_path / "objects"),
        clock=Clock(),
        settings=LakeSettings(max_future=timedelta(days=5), max_file_rows=10),
    )
    lake.ingest(batch([1], payload=lambda s: reading(s, at=NOW + timedelta(days=3))))
    for start in range(2, 40, 4):
        lake.ingest(batch(range(start, start + 4)))
    assert count(lake) == 41  # three days ahead is within the five allowed
    lake.compact()
    assert all(f.rows <= 10 for f in lake.live_files())
    assert len(lake.live_files()) == 6  # five merged pairs, and the lone future reading
    assert count(lake) == 41
