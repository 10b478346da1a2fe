"""Pipeline benchmarks: the kit-to-lake end-to-end rate, and the exporter's HTTPS batches.

Everything real, each part in a process of its own as it is deployed: ``edgeloop cloud up``
(API, Mosquitto, the lake on SQLite and a folder), a hub agent (``python -m
edgeloop.edge.agent``) with its kits' broker (Mosquitto), the bridge into a spool stream and
the exporters, and ``edgeloop sim kits`` (each kit an MQTT 5 client with its own certificate,
QoS 1, as fast as the hub's broker acknowledges).

- **kit-to-lake**: ``EDGELOOP_BENCH_PIPELINE_KITS`` kits (default 4) send
  ``EDGELOOP_BENCH_PIPELINE_READINGS`` readings in all (default 20,000); the rate is the
  readings over the time from the kits' start to the last one queryable in the lake. The
  kits' own rate (acknowledged by the hub's broker) is the comparison: what the hub is
  offered.
- **exporter HTTPS batches**: a spool stream of 200,000 readings exported by the hub's
  exporter (read, encode, gzip, POST with an idempotency key, commit on the 200) in batches
  of 10,000, run in this process against the cloud process. Compared in the same run with
  POSTing the same batches encoded beforehand (the cloud's and the wire's share alone), and
  with encoding them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks._report import Result, SuiteResult
from edgeloop.core.telemetry import (
    Reading,
    Record,
    TelemetryBatch,
    encode_batch,
    encode_reading,
    idempotency_key,
)

KITS = int(os.environ.get("EDGELOOP_BENCH_PIPELINE_KITS", "4"))
READINGS = int(os.environ.get("EDGELOOP_BENCH_PIPELINE_READINGS", "20000"))
EXPORT_READINGS = 200_000
BATCH = 10_000
APPLIANCES = ("furnace", "fridge", "washer", "pump")
EDGELOOP = str(Path(sys.executable).with_name("edgeloop"))


def _progress(message: str) -> None:
    print(f"  pipeline: {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(check: Callable[[], bool], timeout: float, what: str, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)


class CloudProcess:
    """``edgeloop cloud up`` on loopback, and a client of its API."""

    def __init__(self, folder: Path) -> None:
        self.data_dir = folder / "cloud"
        log = open(folder / "cloud.log", "wb")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [
                *(EDGELOOP, "cloud", "up", "--data-dir", str(self.data_dir)),
                *("--port", str(_free_port()), "--json"),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        self.endpoints = self._ready(60)
        self.api = httpx.Client(base_url=self.endpoints["api"] + "/api/v1", timeout=120)

    def _ready(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd, out = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
                with contextlib.suppress(ValueError):
                    return dict(json.loads(out))
        raise RuntimeError(f"edgeloop cloud up did not start: {out.decode()}")

    def thing(self, name: str, folder: Path) -> tuple[Path, Path]:
        """Register a thing (a hub or a kit) and write its certificate and key."""
        answer = self.api.post("/things", json={"thingName": name})
        assert answer.status_code == 201, answer.text
        issued = self.api.post(f"/things/{name}/certificates", json={}).json()
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{name}.cert.pem", folder / f"{name}.key.pem"
        cert.write_text(issued["certificatePem"])
        key.write_text(issued["privateKeyPem"])
        return cert, key

    def count(self, thing: str, stream: str | None = None) -> int:
        where = f"thing = '{thing}'" + (f" AND stream = '{stream}'" if stream else "")
        answer = self.api.post(
            "/lake/query", json={"sql": f"SELECT count(*) AS n FROM telemetry WHERE {where}"}
        )
        answer.raise_for_status()
        return int(answer.json()["rows"][0][0])

    def close(self) -> None:
        self.api.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run(out: SuiteResult) -> None:
    """Both benchmarks, each against a fresh cloud."""
    folder = Path(tempfile.mkdtemp(prefix="elb-pipeline-"))
    try:
        bench_kit_to_lake(folder / "e2e", out)
        bench_https_export(folder / "export", out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out.notes.append(
        "pipeline: every part a real process on this machine (cloud, hub agent with its "
        "Mosquitto, kits), so they share its cores; readings are the simulator's (about 190 "
        "bytes of JSON each), exported in gzipped batches of 10,000."
    )


# -- kit to lake ---------------------------------------------------------------------------


def bench_kit_to_lake(folder: Path, out: SuiteResult) -> None:
    """Kits -> hub broker -> bridge -> spool -> exporter -> cloud API -> lake."""
    folder.mkdir(parents=True)
    cloud = CloudProcess(folder)
    agent: subprocess.Popen[bytes] | None = None
    try:
        thing = f"hub-{uuid.uuid4().hex[:6]}"
        cert, key = cloud.thing(thing, folder / "hub-certs")
        kits = [f"{APPLIANCES[i % 4]}-{i + 1}" for i in range(KITS)]
        for kit in kits:  # kits' certificates from the install's CA, as things of their own
            cloud.thing(kit, folder / "kit-certs")
        root = folder / "hub"
        root.mkdir()
        mq = cloud.endpoints["mqtt"]
        (root / "agent.json").write_text(
            json.dumps(
                {
                    "cloud": {
                        "endpoint": f"{mq['host']}:{mq['port']}",
                        "cert": str(cert),
                        "key": str(key),
                        "ca": cloud.endpoints["caFile"],
                        "api": cloud.endpoints["api"],
                    },
                    "broker": {"port": 0, "host": "127.0.0.1"},
                    "bridge": {
                        "mqttTopicMapping": {
                            "KitsToStream": {
                                "topic": "kits/+/telemetry",
                                "source": "LocalMqtt",
                                "target": "Stream:telemetry",
                            }
                        }
                    },
                    "streams": {"telemetry": {"max_bytes": 512 << 20, "priority": 1}},
                    "export": {
                        "telemetry": {
                            "policy": "batch",
                            "interval_seconds": 1,
                            "max_records": BATCH,
                        }
                    },
                }
            )
        )
        from edgeloop.edge.control import ControlClient, wait_for_agent

        agent = subprocess.Popen(
            [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "agent.log", "wb"),  # noqa: SIM115
        )
        wait_for_agent(root, agent)

        def status() -> dict[str, Any]:
            with ControlClient(root, timeout=30) as client:
                answer: dict[str, Any] = client.call("status")
                return answer

        _wait(lambda: status()["broker"]["state"] == "RUNNING", 60, "the hub's broker")
        broker = status()["broker"]
        scenario = folder / "home.json"
        scenario.write_text(
            json.dumps(
                {
                    "kits": [
                        {"id": kit, "appliance": APPLIANCES[i % 4], "interval": "10s"}
                        for i, kit in enumerate(kits)
                    ]
                }
            )
        )
        per_kit = READINGS // KITS
        total = per_kit * KITS
        _progress(f"kit-to-lake: {KITS} kits, {total:,} readings")
        started = time.monotonic()
        done = subprocess.run(
            [
                *(EDGELOOP, "sim", "kits", "--hub", f"127.0.0.1:{broker['port']}"),
                *("--ca", broker["serverCaFile"] or broker["caFile"]),
                *("--certs", str(folder / "kit-certs"), "--scenario", str(scenario)),
                *("--count", str(per_kit), "--speed", "0", "--json"),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        published = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"edgeloop sim kits failed: {done.stderr[-2000:]}")
        _wait(lambda: cloud.count(thing) >= total, 3600, "every reading in the lake", every=0.5)
        elapsed = time.monotonic() - started
        held = cloud.count(thing)
        out.results.append(
            Result(
                benchmark=f"kit-to-lake end-to-end rate ({KITS} kits)",
                measured=f"{total / elapsed:,.0f} readings/s ({total:,} readings in "
                f"{elapsed:.1f} s; the lake holds {held:,})",
                comparison=f"the kits' own rate, acknowledged by the hub's broker: "
                f"{total / published:,.0f} readings/s; the last reading reached the lake "
                f"{elapsed - published:.1f} s after the kits were done",
            )
        )
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
        cloud.close()


# -- the exporter's HTTPS batches ----------------------------------------------------------


def _payloads(count: int) -> list[bytes]:
    base = time.time() - 3600
    return [
        encode_reading(
            Reading(
                kit=f"kit-{i % 8}",
                appliance="furnace",
                ts=round(base + i * 0.01, 3),
                sensors={"temp_c": 60.0 + i % 7, "current_a": 3.1, "vibration_g": 0.012},
                kit_seq=i,
                label="normal",
            )
        )
        for i in range(count)
    ]


def bench_https_export(folder: Path, out: SuiteResult) -> None:
    """The exporter alone (this process) against the cloud (its own process)."""
    from edgeloop.edge.export_config import ExportPolicy
    from edgeloop.edge.exporter import Exporter, HttpsTransport
    from edgeloop.edge.spool import Spool, StreamConfig

    folder.mkdir(parents=True)
    cloud = CloudProcess(folder)
    try:
        thing = f"hub-{uuid.uuid4().hex[:6]}"
        cloud.thing(thing, folder / "certs")
        api = cloud.endpoints["api"]
        payloads = _payloads(EXPORT_READINGS)
        _progress(f"exporter: {EXPORT_READINGS:,} readings in batches of {BATCH:,}")
        with Spool(folder / "spool", [StreamConfig(name="t", max_bytes=512 << 20)]) as spool:
            stream = spool.stream("t")
            for payload in payloads:
                stream.append(payload)
            spool.flush()
            policy = ExportPolicy(stream="t", interval_seconds=0, max_records=BATCH)

            async def export() -> float:
                exporter = Exporter(
                    spool, (policy,), thing, mqtt=None, https=HttpsTransport(api, thing)
                )
                began = time.monotonic()
                await exporter.start()
                while stream.metrics().pending:  # noqa: ASYNC110 - the spool has no event
                    await asyncio.sleep(0.02)
                took = time.monotonic() - began
                await exporter.stop()
                return took

            exported = asyncio.run(export())
        held = cloud.count(thing, "t")

        # The same batches, encoded beforehand, POSTed one after another.
        batches = [
            TelemetryBatch(
                thing,
                "floor",
                tuple(
                    Record(i + 1, 1_700_000_000_000_000 + i, payloads[i])
                    for i in range(start, start + BATCH)
                ),
            )
            for start in range(0, EXPORT_READINGS, BATCH)
        ]
        began = time.monotonic()
        bodies = [(encode_batch(b), idempotency_key(b)) for b in batches]
        encoding = time.monotonic() - began
        url = f"/things/{thing}/telemetry"
        began = time.monotonic()
        for body, key in bodies:
            answer = cloud.api.post(
                url,
                content=body,
                headers={"Idempotency-Key": key, "Content-Encoding": "gzip"},
            )
            answer.raise_for_status()
        posting = time.monotonic() - began
        wire = sum(len(body) for body, _ in bodies)
        out.results.append(
            Result(
                benchmark="exporter HTTPS batch throughput (batches of 10,000)",
                measured=f"{EXPORT_READINGS / exported:,.0f} readings/s "
                f"({EXPORT_READINGS:,} in {exported:.1f} s, committed after each 200; the "
                f"lake holds {held:,})",
                comparison=f"the same batches encoded beforehand and POSTed: "
                f"{EXPORT_READINGS / posting:,.0f} readings/s (the cloud's share); encoding "
                f"alone {EXPORT_READINGS / encoding:,.0f} readings/s, "
                f"{wire / EXPORT_READINGS:.1f} bytes a reading on the wire",
            )
        )
    finally:
        cloud.close()
