"""The hub's exporters: bisecting refusals and the backoff (pure), the HTTPS transport's
answers from an injected transport, then with the real cloud (API, broker, lake) in this
process, and end to end with a real hub agent process."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeloop.cloud.service import Cloud, CloudSettings
from edgeloop.core.errors import ValidationError
from edgeloop.core.telemetry import (
    Reading,
    Record,
    decode_batch,
    encode_reading,
    idempotency_key,
)
from edgeloop.edge.export_config import ExportPolicy, ExportVia, parse_export
from edgeloop.edge.exporter import (
    Exporter,
    HttpsTransport,
    MqttTransport,
    Outcome,
    RetryLater,
    StreamExporter,
    backoff,
    deliver,
)
from edgeloop.edge.settings import AgentSettings, CloudConnection
from edgeloop.edge.spool import DEAD_LETTER, Spool, StreamConfig
from edgeloop.edge.spool_segment import DeadLetter
from tests.edge.conftest import FAST_RESTARTS, Hub


def reading(kit: str, seq: int) -> bytes:
    return encode_reading(
        Reading(kit, "furnace", time.time(), {"temp_c": 20.0 + seq % 5}, kit_seq=seq)
    )


# -- bisection and backoff (pure) ----------------------------------------------------------


def _records(n: int) -> list[Record]:
    return [Record(i + 1, 1_700_000_000_000_000 + i, b"r%d" % i) for i in range(n)]


def _run_deliver(
    records: list[Record], poison: set[int], *, name_it: bool = False
) -> tuple[Any, list[int], list[tuple[int, str]], list[int]]:
    sent_ok: list[int] = []
    letters: list[tuple[int, str]] = []
    sizes: list[int] = []

    async def send(part: Sequence[Record]) -> Outcome:
        sizes.append(len(part))
        bad = [i for i, r in enumerate(part) if r.sequence in poison]
        if bad:
            field = f"records[{bad[0]}].payload" if name_it else None
            return Outcome.refused(f"poison at {part[bad[0]].sequence}", field)
        sent_ok.extend(r.sequence for r in part)
        return Outcome("ok", counts={"accepted": len(part)})

    async def dead_letter(record: Record, reason: str) -> None:
        letters.append((record.sequence, reason))

    done = asyncio.run(deliver(records, send, dead_letter))
    return done, sent_ok, letters, sizes


def test_one_poison_record_is_found_by_bisection_and_the_rest_delivered() -> None:
    done, sent, letters, sizes = _run_deliver(_records(1000), {617})
    assert letters == [(617, "poison at 617")]
    assert sorted(sent) == [s for s in range(1, 1001) if s != 617]
    assert (done.delivered, done.dead_lettered, done.counts["accepted"]) == (999, 1, 999)
    assert len(sizes) <= 2 * 11  # two sends a level, ten levels
    assert sum(sizes) < 1000 * 12


def test_a_refusal_that_names_the_record_goes_straight_to_it() -> None:
    done, sent, letters, sizes = _run_deliver(_records(1000), {3, 617}, name_it=True)
    assert [s for s, _ in letters] == [3, 617]
    assert len(sent) == 998 and done.sends == len(sizes) <= 8


def test_every_record_refused_is_every_record_dead_lettered() -> None:
    done, sent, letters, _ = _run_deliver(_records(7), set(range(1, 8)))
    assert done.dead_lettered == 7
    assert sent == [] and [s for s, _ in letters] == list(range(1, 8))


def test_a_cloud_that_cannot_take_it_now_stops_the_delivery_for_a_retry() -> None:
    calls: list[int] = []

    async def send(part: Sequence[Record]) -> Outcome:
        calls.append(len(part))
        return Outcome("retry", "HTTP 503", retry_after=7.0)

    async def dead_letter(record: Record, reason: str) -> None:
        raise AssertionError("nothing is dead-lettered for an outage")

    with pytest.raises(RetryLater) as caught:
        asyncio.run(deliver(_records(10), send, dead_letter))
    assert (caught.value.reason, caught.value.retry_after, calls) == ("HTTP 503", 7.0, [10])


def test_backoff_is_capped_and_jittered() -> None:
    assert backoff(1, 60, lambda: 0.0) == 0.25 and backoff(1, 60, lambda: 1.0) == 0.5
    assert backoff(4, 60, lambda: 1.0) == 4.0
    assert backoff(40, 10, lambda: 0.0) == 5.0 and backoff(40, 10, lambda: 1.0) == 10.0


# -- settings ------------------------------------------------------------------------------


def test_export_settings_come_from_agent_json_with_errors_naming_the_field(
    tmp_path: Path,
) -> None:
    doc = {
        "streams": {"alerts": {"priority": 1}, "telemetry": {"priority": 5}},
        "export": {
            "alerts": {"policy": "mqtt"},
            "telemetry": {"policy": "batch", "interval_seconds": 86400, "max_records": 5000},
        },
    }
    settings = AgentSettings(root=tmp_path).with_document(doc, source="agent.json")
    alerts, telemetry = settings.export
    assert (alerts.policy, alerts.records_per_batch, alerts.bytes_per_batch) == (
        ExportVia.MQTT,
        100,
        128 * 1024,
    )
    assert (telemetry.interval_seconds, telemetry.records_per_batch) == (86400, 5000)
    for export, field in (
        ({"telemetry": {"policy": "pigeon"}}, "export.telemetry.policy"),
        ({"telemetry": {"max_records": 0}}, "export.telemetry.max_records"),
        ({"telemetry": {"max_bytes": 1 << 30}}, "export.telemetry.max_bytes"),
        ({"alerts": {"policy": "mqtt", "max_bytes": 1 << 20}}, "export.alerts.max_bytes"),
        ({"telemetry": {"interval": 5}}, "export.telemetry.interval"),
        ({"telemetry": {"retry_max_seconds": 0}}, "export.telemetry.retry_max_seconds"),
        ({"nosuch": {"policy": "batch"}}, "export.nosuch"),
        ({"dead-letter": {"policy": "batch"}}, "export.dead-letter.policy"),
        ({"telemetry": "batch"}, "export.telemetry"),
        (["telemetry"], "export"),
    ):
        with pytest.raises(ValidationError) as caught:
            AgentSettings(root=tmp_path).with_document(
                {**doc, "export": export}, source="agent.json"
            )
        assert caught.value.field == field, export
        assert str(caught.value).startswith(f"agent.json: {field}: ")
    assert parse_export({}, source="x") == ()


# -- the HTTPS transport against an injected server ---------------------------------------


class Clock:
    """A clock the test moves by hand (the spool's wall clock and the backoff's)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    configs = [
        StreamConfig(name="telemetry", priority=5, segment_bytes=256 * 1024),
        StreamConfig(name="alerts", priority=1),
    ]
    with Spool(tmp_path / "spool", configs) as opened:
        yield opened


class FakeLake:
    """An httpx handler that acts as the cloud's upload route, with knobs."""

    def __init__(self) -> None:
        self.held: dict[int, bytes] = {}
        self.keys: list[str] = []
        self.answers: list[int] = []  # statuses to give before behaving (a script)
        self.refuse: set[bytes] = set()  # payloads answered 400, naming the record

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.answers:
            status = self.answers.pop(0)
            return httpx.Response(status, json={"error": "x", "message": f"scripted {status}"})
        batch = decode_batch(request.content)
        self.keys.append(request.headers["Idempotency-Key"])
        assert request.headers["Idempotency-Key"] == idempotency_key(batch)
        for index, record in enumerate(batch.records):
            if record.payload in self.refuse:
                return httpx.Response(
                    400,
                    json={
                        "error": "validation",
                        "field": f"records[{index}].payload",
                        "message": "not a reading the lake can keep",
                    },
                )
        fresh = [r for r in batch.records if r.sequence not in self.held]
        for record in fresh:
            self.held[record.sequence] = record.payload
        n = len(batch.records)
        return httpx.Response(
            200,
            json={
                "received": n,
                "accepted": len(fresh),
                "duplicates": n - len(fresh),
                "quarantined": 0,
            },
        )


def _https(lake: FakeLake) -> HttpsTransport:
    client = httpx.AsyncClient(transport=httpx.MockTransport(lake))
    return HttpsTransport("http://cloud.test", "hub-1", client=client)


def test_a_batch_is_committed_after_the_clouds_200_and_only_then(spool: Spool) -> None:
    stream = spool.stream("telemetry")
    for i in range(250):
        stream.append(reading("kit-1", i))
    spool.flush()
    lake = FakeLake()
    policy = ExportPolicy(stream="telemetry", max_records=100)
    exporter = StreamExporter(stream, policy, "hub-1", rng=lambda: 0.5)
    transport = _https(lake)
    lake.answers = [503]
    assert asyncio.run(exporter.export_one(transport))
    assert stream.metrics().exported == 0 and exporter.state == "retrying"
    assert exporter.last_error == "the cloud answered HTTP 503: scripted 503"
    exporter.next_attempt = 0
    for _ in range(3):
        assert asyncio.run(exporter.export_one(transport))
    assert not asyncio.run(exporter.export_one(transport))  # drained
    assert sorted(lake.held) == list(range(1, 251))
    metrics = stream.metrics()
    assert (metrics.exported, metrics.pending) == (250, 0)
    status = exporter.status()
    assert (status["batches"], status["records"], status["failures"]) == (3, 250, 0)
    assert status["lastError"] is None and status["bytesSent"] > 0


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (None, "cannot reach the cloud's API"),
        (401, "HTTP 401"),
        (404, "HTTP 404"),
        (409, "HTTP 409"),
        (429, "HTTP 429"),
        (500, "HTTP 500"),
    ],
)
def test_an_unreachable_or_unwilling_cloud_drops_nothing(
    spool: Spool, answer: int | None, why: str
) -> None:
    stream = spool.stream("telemetry")
    for i in range(20):
        stream.append(reading("kit-1", i))
    spool.flush()

    def handler(request: httpx.Request) -> httpx.Response:
        if answer is None:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return httpx.Response(answer, json={"error": "x", "message": "no"})

    transport = HttpsTransport(
        "http://cloud.test",
        "hub-1",
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    clock = Clock(100.0)
    exporter = StreamExporter(
        stream,
        ExportPolicy(stream="telemetry", retry_max_seconds=8),
        "hub-1",
        clock=clock,
        rng=lambda: 1.0,
    )
    delays = []
    for _ in range(6):
        exporter.next_attempt = 0
        asyncio.run(exporter.export_one(transport))
        delays.append(exporter.next_attempt - clock.now)
    assert why in (exporter.last_error or "")
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]  # capped
    metrics = stream.metrics()
    assert (metrics.pending, metrics.exported, metrics.dead_lettered) == (20, 0, 0)
    assert spool.stream(DEAD_LETTER).metrics().appended == 0


def test_poison_records_are_dead_lettered_with_the_clouds_reason_and_the_rest_goes(
    spool: Spool,
) -> None:
    stream = spool.stream("telemetry")
    poison = {b'{"poison": 1}', b'{"poison": 2}'}
    payloads = [reading("kit-1", i) for i in range(300)]
    payloads[10], payloads[222] = sorted(poison)
    sequences = [stream.append(p) for p in payloads]
    stream.append(b"x" * 70_000)  # over a payload's 64 KiB: the hub's encoder refuses it
    spool.flush()
    lake = FakeLake()
    lake.refuse = poison
    exporter = StreamExporter(stream, ExportPolicy(stream="telemetry"), "hub-1")
    assert asyncio.run(exporter.export_one(_https(lake)))
    assert sorted(lake.held) == [s for i, s in enumerate(sequences) if i not in (10, 222)]
    metrics = stream.metrics()
    assert (metrics.exported, metrics.dead_lettered, metrics.pending) == (298, 3, 0)
    letters = [DeadLetter.decode(r.payload) for r in spool.stream(DEAD_LETTER).read_batch(10)]
    assert [(d.sequence, d.payload) for d in letters] == [
        (sequences[10], payloads[10]),
        (sequences[222], payloads[222]),
        (sequences[-1] + 1, b"x" * 70_000),
    ]
    assert letters[0].reason == (
        "the cloud refused it (HTTP 400 records[0].payload): not a reading the lake can keep"
    )
    assert letters[2].reason.startswith("the hub cannot encode it (records[0].payload): 70000")
    assert exporter.status()["deadLettered"] == 3


def test_a_batch_stream_waits_for_its_interval_or_its_size(tmp_path: Path) -> None:
    clock = Clock()
    with Spool(tmp_path / "s", [StreamConfig(name="t")], clock=clock) as spool:
        stream = spool.stream("t")
        policy = ExportPolicy(stream="t", interval_seconds=3600, max_records=50)
        exporter = StreamExporter(stream, policy, "hub-1", clock=clock)
        assert not exporter.due(clock.now)  # nothing waits
        for i in range(10):
            stream.append(reading("k", i))
        assert not exporter.due(clock.now)
        clock.now += 3600
        assert exporter.due(clock.now)  # the oldest waited an interval
        clock.now -= 3600
        for i in range(40):
            stream.append(reading("k", 10 + i))
        assert exporter.due(clock.now)  # a full batch waits


# -- with the real cloud, in this process --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LakeCloud:
    """``cloud up`` in this process, that can be stopped and started again on the same data
    folder and ports (a cloud that goes away for a while)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cloud: Cloud | None = None
        self.endpoints: dict[str, Any] = {}
        self.start()
        self.api = httpx.Client(base_url=self.endpoints["api"] + "/api/v1", timeout=60)

    def _run(self, coro: Any, timeout: float = 90) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.cloud = Cloud(CloudSettings(data_dir=self.data_dir, port=self.port))
        self.endpoints = self._run(self.cloud.start())

    def stop(self) -> None:
        if self.cloud is not None:
            self._run(self.cloud.stop())
            self.cloud = None

    def close(self) -> None:
        self.api.close()
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def lake(self) -> Any:
        assert self.cloud is not None and self.cloud.ctx is not None
        return self.cloud.ctx.lake

    def thing(self, folder: Path) -> tuple[str, dict[str, Any]]:
        """A new thing with a certificate; its ``cloud`` section of agent.json."""
        thing = f"hub-{uuid.uuid4().hex[:8]}"
        assert self.api.post("/things", json={"thingName": thing}).status_code == 201
        issued = self.api.post(f"/things/{thing}/certificates", json={}).json()
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{thing}.pem", folder / f"{thing}.key"
        cert.write_text(issued["certificatePem"])
        key.write_text(issued["privateKeyPem"])
        mq = self.endpoints["mqtt"]
        return thing, {
            "endpoint": f"{mq['host']}:{mq['port']}",
            "cert": str(cert),
            "key": str(key),
            "ca": self.endpoints["caFile"],
            "api": self.endpoints["api"],
            "keepalive": 5,
            "reconnect_max": 1.0,
        }

    def rows(self, sql: str) -> list[dict[str, Any]]:
        answer = self.api.post("/lake/query", json={"sql": sql, "limit": 100_000})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        names = [c["name"] for c in body["columns"]]
        return [dict(zip(names, row, strict=True)) for row in body["rows"]]

    def count(self, thing: str, stream: str) -> int:
        rows = self.rows(
            f"SELECT count(*) AS n FROM telemetry WHERE thing = '{thing}' AND stream = '{stream}'"
        )
        return int(rows[0]["n"])


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LakeCloud]:
    running = LakeCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def eventually(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.1)


def _connection(conn: dict[str, Any]) -> CloudConnection:
    host, port = conn["endpoint"].rsplit(":", 1)
    return CloudConnection(
        host=host,
        port=int(port),
        cert=Path(conn["cert"]),
        key=Path(conn["key"]),
        ca=Path(conn["ca"]),
        keepalive=5,
        reconnect_max=1.0,
        api=conn["api"],
    )


def test_streams_reach_the_lake_once_over_https_and_mqtt_across_a_cloud_outage(
    cloud: LakeCloud, tmp_path: Path
) -> None:
    from edgeloop.edge.cloud_link import CloudLink

    thing, conn = cloud.thing(tmp_path)
    configs = [
        StreamConfig(name="alerts", priority=1),
        StreamConfig(name="telemetry", priority=5, segment_bytes=256 * 1024),
    ]
    policies = (
        ExportPolicy(stream="alerts", policy=ExportVia.MQTT, max_records=10),
        ExportPolicy(stream="telemetry", interval_seconds=0, max_records=500),
    )

    async def scenario() -> dict[str, Any]:
        with Spool(tmp_path / "spool", configs) as spool:
            link = CloudLink(_connection(conn), thing)
            await link.start()
            api = conn["api"]
            exporter = Exporter(
                spool,
                policies,
                thing,
                mqtt=MqttTransport(link),
                https=HttpsTransport(api, thing),
                poll_batch=0.1,
            )
            await exporter.start()
            telemetry, alerts = spool.stream("telemetry"), spool.stream("alerts")
            for i in range(2000):
                telemetry.append(reading("kit-1", i))
            for i in range(30):
                alerts.append(reading("kit-alarm", i))
            telemetry.append(b"y" * 70_000)  # poison: over a payload's 64 KiB
            await _until(lambda: telemetry.metrics().pending == 0 and alerts.metrics().pending == 0)
            # The cloud goes away; what the kits send meanwhile waits, and then goes.
            await asyncio.to_thread(cloud.stop)
            for i in range(2000, 3000):
                telemetry.append(reading("kit-1", i))
            alerts.append(reading("kit-alarm", 30))
            await _until(lambda: exporter.streams["telemetry"].failures >= 2)
            assert telemetry.metrics().pending == 1000
            down = exporter.status("telemetry")
            await asyncio.to_thread(cloud.start)
            await _until(
                lambda: telemetry.metrics().pending == 0 and alerts.metrics().pending == 0,
                timeout=60,
            )
            result = {
                "down": down,
                "telemetry": exporter.status("telemetry"),
                "alerts": exporter.status("alerts"),
                "metrics": {m.name: m for m in spool.metrics()},
                "letters": [
                    DeadLetter.decode(r.payload) for r in spool.stream(DEAD_LETTER).read_batch(10)
                ],
            }
            await exporter.stop()
            await link.stop()
            return result

    result = asyncio.run(scenario())
    assert "connection refused" in result["down"]["lastError"]
    assert result["down"]["state"] == "retrying"
    assert cloud.count(thing, "telemetry") == 3000
    assert cloud.count(thing, "alerts") == 31
    held = cloud.rows(
        f"SELECT count(DISTINCT kit_seq) AS k, count(*) AS n FROM telemetry WHERE thing = '{thing}'"
    )
    assert held == [{"k": 3000, "n": 3031}]  # kit-alarm's 0..30 are among kit-1's numbers
    metrics = result["metrics"]
    assert (metrics["telemetry"].exported, metrics["telemetry"].dead_lettered) == (3000, 1)
    assert metrics["alerts"].exported == 31
    (letter,) = result["letters"]
    assert letter.stream == "telemetry" and letter.payload == b"y" * 70_000
    assert "70000 bytes; a payload holds at most 65536" in letter.reason
    assert result["alerts"]["policy"] == "mqtt" and result["alerts"]["batches"] >= 4


async def _until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- end to end with a hub agent process ---------------------------------------------------


class CloudHub(Hub):
    """A hub whose thing name comes from its certificate (no ``--thing-name``)."""

    def start(self, *, wait: bool = True) -> None:
        import subprocess
        import sys

        from edgeloop.edge.control import wait_for_agent

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "agent.stderr", "ab"),  # noqa: SIM115
        )
        if wait:
            wait_for_agent(self.root, self.proc)


@pytest.mark.slow
def test_a_hub_agent_exports_what_its_spool_holds_after_kill_9_and_says_so(
    cloud: LakeCloud, tmp_path: Path
) -> None:
    thing, conn = cloud.thing(tmp_path / "certs")
    streams = {
        "telemetry": {"priority": 5, "segment_bytes": 262144},
        "alerts": {"priority": 1},
    }
    settings = {
        "restart": dict(FAST_RESTARTS),
        "stop_grace": 2.0,
        "cloud": conn,
        "streams": streams,
        "export": {
            "alerts": {"policy": "mqtt"},
            "telemetry": {"policy": "batch", "interval_seconds": 0.5, "max_records": 400},
        },
    }
    hub = CloudHub(tmp_path / "hub", settings)
    configs = AgentSettings.load(hub.root).streams

    def fill(start: int, count: int, poison: bool = False) -> None:
        with Spool(hub.root / "spool", configs) as spool:  # what the hub took while down
            for i in range(start, start + count):
                spool.stream("telemetry").append(reading("kit-1", i))
            if poison:
                spool.stream("telemetry").append(b"z" * 66_000)
            spool.stream("alerts").append(reading("kit-alarm", start))

    fill(0, 1500, poison=True)
    hub.start()
    try:
        eventually(lambda: cloud.count(thing, "telemetry") == 1500, what="first backlog")
        eventually(lambda: cloud.count(thing, "alerts") == 1, what="the alert")
        rows = {row["name"]: row for row in hub.call("streams")}
        assert rows["telemetry"]["export"]["policy"] == "batch"
        assert rows["telemetry"]["deadLettered"] == 1
        assert rows["telemetry"]["export"]["deadLettered"] == 1
        assert rows["alerts"]["export"]["policy"] == "mqtt"
        assert rows["dead-letter"]["export"]["state"] == "off"
        hub.kill9()
        fill(1500, 1500)
        hub.start()
        eventually(lambda: cloud.count(thing, "telemetry") == 3000, what="after kill -9")
        eventually(lambda: cloud.count(thing, "alerts") == 2, what="second alert")
        rows = {row["name"]: row for row in hub.call("streams")}
        assert (rows["telemetry"]["pending"], rows["telemetry"]["exported"]) == (0, 3000)
        from tests.edge.test_spool_agent import _cli

        shown = _cli("device", "streams", "--root", hub.root)
        assert shown.returncode == 0, shown.stderr
        assert "batch idle" in shown.stdout and "mqtt idle" in shown.stdout
    finally:
        hub.stop()
    distinct = cloud.rows(
        f"SELECT count(DISTINCT (stream, sequence)) AS n FROM telemetry WHERE thing = '{thing}'"
    )
    assert distinct == [{"n": 3002}]


def test_settings_without_an_api_leave_batch_streams_waiting_with_the_reason(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path / "spool", [StreamConfig(name="t")]) as spool:
        exporter = Exporter(spool, (), "hub-1", mqtt=None, https=None)
        status = exporter.status("t")
        assert status is not None and status["state"] == "blocked"
        assert "cloud.api" in status["lastError"]
        assert exporter.status(DEAD_LETTER)["state"] == "off"  # type: ignore[index]


def test_random_refusals_never_lose_or_repeat_a_record(spool: Spool) -> None:
    rng = random.Random(7)
    stream = spool.stream("telemetry")
    payloads = [reading("kit-1", i) for i in range(500)]
    poison = set(rng.sample(payloads, 12))
    for p in payloads:
        stream.append(p)
    spool.flush()
    lake = FakeLake()
    lake.refuse = poison
    exporter = StreamExporter(stream, ExportPolicy(stream="telemetry", max_records=128), "hub-1")
    transport = _https(lake)
    while asyncio.run(exporter.export_one(transport)):
        lake.answers = [503] if rng.random() < 0.3 else []
        exporter.next_attempt = 0
    assert sorted(lake.held.values()) == sorted(p for p in payloads if p not in poison)
    letters = spool.stream(DEAD_LETTER).read_batch(100)
    assert sorted(DeadLetter.decode(r.payload).payload for r in letters) == sorted(poison)
    assert json.dumps(exporter.status())  # plain JSON for the control channel


def test_a_stream_numbered_from_the_time_counts_only_what_was_appended(tmp_path: Path) -> None:
    from edgeloop.edge.spool import time_sequence

    before = time_sequence()
    with Spool(tmp_path / "s", [StreamConfig(name="t")], first_sequence=time_sequence) as spool:
        first = spool.stream("t").append(b"one")
        spool.stream("t").append(b"two")
        assert first >= before and spool.stream("t").metrics().appended == 2
    with Spool(tmp_path / "s", [StreamConfig(name="t")], first_sequence=time_sequence) as spool:
        metrics = spool.stream("t").metrics()
        assert (metrics.appended, metrics.last_sequence) == (2, first + 1)
        assert spool.stream("t").append(b"three") == first + 2
