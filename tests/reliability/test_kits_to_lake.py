"""Kits to lake, end to end, through everything that can go wrong on the way.

Real processes and real brokers: ``cloud up`` (API, Mosquitto, lake; in this process, so it
can be stopped and started again on the same data), a hub agent process with its kits'
broker (Mosquitto), the bridge into spool streams and the exporters, and ``edgeloop sim
kits`` (each kit an MQTT client with its own certificate) producing a known count of
readings. While they run, the test

1. kills the agent with SIGKILL and starts it again (the kits' broker, left running, is
   stopped gracefully by the new agent and started again; the bridge's unacknowledged
   readings are redelivered and some are spooled twice: the lake keeps them once);
2. stops the kits' broker (SIGTERM: Mosquitto saves its queues); the agent restarts it;
3. takes the cloud down, and meanwhile fills two small streams to their limits: one
   ``overwrite-oldest`` (the oldest readings go, counted as "overwritten") and one
   ``reject-new`` (the bridge holds back, the broker keeps the readings, nothing is lost);
   then brings the cloud back on the same data folder.

Afterwards the lake holds, per kit, exactly the readings the policy says it must — every
one once for the unbounded streams and the reject-new one (0 lost, 0 duplicated); for
the overwrite-oldest one every reading but those the hub counted as overwritten — and
``device streams`` accounts for every reading that is missing, with its reason.

``slow`` (in ``make test``): four kits at 60 readings a second each for ~50 s, about 13,000
readings. ``soak`` (in ``make bench``): a million readings, as fast as the hub takes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeloop.sim.certs import kit_identities
from tests.edge.conftest import FAST_RESTARTS
from tests.edge.test_exporter import CloudHub, LakeCloud
from tests.edge.test_hub_broker import make_ca

EDGELOOP = Path(sys.executable).parent / "edgeloop"
MAIN_KITS = {  # kit -> (appliance, stream)
    "furnace-1": ("furnace", "telemetry"),
    "fridge-1": ("fridge", "telemetry"),
    "pump-1": ("pump", "telemetry"),
    "washer-1": ("washer", "events"),
}
OVERWRITE_KIT = ("pump-9", "pump", "capped-overwrite")
REJECT_KIT = ("washer-9", "washer", "capped-reject")
STREAMS = {
    "events": {"priority": 1, "max_bytes": 32 << 20},
    "telemetry": {"priority": 5, "max_bytes": 256 << 20, "segment_bytes": 1 << 20},
    "capped-overwrite": {
        "priority": 6,
        "max_bytes": 16384,
        "full_policy": "overwrite-oldest",
    },
    "capped-reject": {"priority": 7, "max_bytes": 32768, "full_policy": "reject-new"},
}
EXPORT = {
    "events": {"policy": "mqtt"},
    "telemetry": {"policy": "batch", "interval_seconds": 1, "max_records": 5000},
    "capped-overwrite": {"policy": "batch", "interval_seconds": 1},
    "capped-reject": {"policy": "batch", "interval_seconds": 1},
}


@dataclass
class Run:
    """What one run did and found."""

    per_kit: int
    sent: dict[str, int] = field(default_factory=dict)  # kit -> readings acknowledged
    lake: dict[str, dict[str, Any]] = field(default_factory=dict)  # kit -> counts in the lake
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)  # device streams rows
    events: list[tuple[float, str]] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)  # redeliveries since the restart
    seconds: float = 0.0


def _scenario(folder: Path, kits: list[tuple[str, str]], name: str) -> Path:
    """A scenario file: the kits, every one sampling every 10 s of simulated time."""
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "name": name,
                "seed": 7,
                "kits": [{"id": k, "appliance": a, "interval": "10s"} for k, a in kits],
            }
        )
    )
    return path


class Kits:
    """``edgeloop sim kits`` processes against the hub's broker."""

    def __init__(self, hub: CloudHub, ca: Path, ca_key: Path, folder: Path) -> None:
        self.hub, self.ca, self.ca_key, self.folder = hub, ca, ca_key, folder
        self.started: list[subprocess.Popen[str]] = []

    def kill(self) -> None:
        """End the runs still going (a failed story)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def start(
        self, kits: list[tuple[str, str]], name: str, count: int, speed: float
    ) -> subprocess.Popen[str]:
        # Kits' certificates come from the install's CA; they trust the hub's own server CA.
        kit_identities(
            [k for k, _ in kits], self.folder / "kit-certs", ca_cert=self.ca, ca_key=self.ca_key
        )
        wait(lambda: self.hub.call("status")["broker"]["state"] == "RUNNING", 60, "kits' broker")
        broker = self.hub.call("status")["broker"]
        command = [
            str(EDGELOOP),
            "sim",
            "kits",
            "--hub",
            f"127.0.0.1:{broker['port']}",
            "--ca",
            broker["serverCaFile"] or broker["caFile"],
            "--certs",
            str(self.folder / "kit-certs"),
            "--scenario",
            str(_scenario(self.folder, kits, name)),
            "--count",
            str(count),
            "--speed",
            str(speed),
            "--json",
        ]
        env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"} | {"NO_COLOR": "1"}
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=open(self.folder / f"{name}.stderr", "w"),  # noqa: SIM115
            text=True,
            env=env,
        )
        self.started.append(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, int]:
        """Each kit's acknowledged readings; every one sent must have been acknowledged."""
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out
        summary = json.loads(out)
        acked = {}
        for kit in summary["kits"]:
            assert kit["acked"] == kit["sent"] and not kit["refused"], summary
            acked[kit["kit"]] = kit["acked"]
        return acked


def _hub_settings(conn: dict[str, Any], ca: Path) -> dict[str, Any]:
    mappings = {
        f"{kit}ToStream": {
            "topic": f"kits/{kit}/telemetry",
            "source": "LocalMqtt",
            "target": f"Stream:{stream}",
        }
        for kit, (_, stream) in {
            **MAIN_KITS,
            OVERWRITE_KIT[0]: OVERWRITE_KIT[1:],
            REJECT_KIT[0]: REJECT_KIT[1:],
        }.items()
    }
    return {
        "restart": dict(FAST_RESTARTS),
        "stop_grace": 2.0,
        "cloud": conn,
        "broker": {"port": 0, "host": "127.0.0.1", "ca": str(ca)},
        "bridge": {"mqttTopicMapping": mappings},
        "streams": STREAMS,
        "export": EXPORT,
    }


def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.2)


def _streams(hub: CloudHub) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in hub.call("streams")}


def _appended(hub: CloudHub) -> int:
    rows = _streams(hub)
    return int(rows["telemetry"]["appended"] + rows["events"]["appended"])


def run_story(tmp_path: Path, *, per_kit: int, speed: float, capped: int) -> Run:
    """The whole story (see the module docstring); what it found, for the checks."""
    started = time.monotonic()
    run = Run(per_kit=per_kit)

    def note(what: str) -> None:
        run.events.append((round(time.monotonic() - started, 1), what))

    cloud = LakeCloud(tmp_path / "cloud")
    hub: CloudHub | None = None
    kits: Kits | None = None
    try:
        thing, conn = cloud.thing(tmp_path / "certs")
        ca, ca_key = make_ca(tmp_path / "pki", "install-ca")
        hub = CloudHub(tmp_path / "hub", _hub_settings(conn, ca))
        hub.start()
        note("hub up")
        kits = Kits(hub, ca, ca_key, tmp_path)
        total = per_kit * len(MAIN_KITS)
        main = kits.start([(k, a) for k, (a, _) in MAIN_KITS.items()], "main", per_kit, speed)

        wait(lambda: _appended(hub) >= total * 0.15, 120, "the first readings")
        at = _appended(hub)
        hub.kill9()
        note(f"agent killed (SIGKILL) at {at} readings")
        hub.start()
        note("agent restarted")

        wait(lambda: _appended(hub) >= total * 0.35, 120, "readings after the restart")
        note(f"{_appended(hub)} readings appended")
        wait(lambda: hub.call("status")["broker"]["pid"] is not None, 60, "the broker's pid")
        broker = hub.call("status")["broker"]
        os.kill(int(broker["pid"]), signal.SIGTERM)
        wait(
            lambda: (
                hub.call("status")["broker"]["restarts"] > broker["restarts"]
                and hub.call("status")["broker"]["state"] == "RUNNING"
            ),
            60,
            "the kits' broker restarted by the agent",
        )
        note("kits' broker stopped (SIGTERM) and restarted by the agent")

        wait(lambda: _appended(hub) >= total * 0.5, 180, "half the readings")
        cloud.stop()
        note("cloud down")
        overwrite = kits.start([OVERWRITE_KIT[:2]], "overwrite", capped, 0)
        run.sent.update(Kits.finish(overwrite, timeout=120))
        wait(
            lambda: _streams(hub)["capped-overwrite"]["appended"] >= capped,
            60,
            "the overwrite-oldest stream to take every reading",
        )
        note("overwrite-oldest stream filled past its limit")
        reject = kits.start([REJECT_KIT[:2]], "reject", capped, 0)
        wait(
            lambda: _streams(hub)["capped-reject"]["dropped"].get("rejected: full", 0) > 0,
            120,
            "the reject-new stream to refuse",
        )
        note("reject-new stream full: the bridge holds back")
        time.sleep(3)
        cloud.start()
        note("cloud up again")

        run.sent.update(Kits.finish(reject, timeout=300))
        run.sent.update(Kits.finish(main, timeout=900))
        note("kits done")
        expected = {
            "telemetry": sum(run.sent[k] for k, (_, s) in MAIN_KITS.items() if s == "telemetry"),
            "events": sum(run.sent[k] for k, (_, s) in MAIN_KITS.items() if s == "events"),
        }

        def drained() -> bool:
            rows = _streams(hub)
            return (
                all(
                    rows[name]["pending"] == 0 and rows[name]["appended"] >= expected.get(name, 0)
                    for name in STREAMS
                )
                and hub.call("status")["bridge"]["pendingAcks"] == 0
            )

        wait(drained, 600, "every stream exported")
        note("every stream exported")
        run.streams = _streams(hub)
        bridge = hub.call("status")["bridge"]
        run.duplicates = {
            "copies the lake dropped (batches resent, readings spooled twice)": sum(
                row["export"]["duplicates"] for row in run.streams.values()
            ),
            "recognised by the bridge": sum(m["duplicates"] for m in bridge["mappings"]),
        }
        rows = cloud.lake.rows(
            "SELECT stream, kit, count(*) AS n, count(DISTINCT kit_seq) AS distinct_seqs, "
            f"min(kit_seq) AS first, max(kit_seq) AS last FROM telemetry WHERE thing = '{thing}' "
            "GROUP BY stream, kit"
        )
        run.lake = {row["kit"]: row for row in rows}
        run.seconds = time.monotonic() - started
        return run
    finally:
        if kits is not None:
            kits.kill()
        if hub is not None:
            hub.stop()
        cloud.close()


def check(run: Run) -> None:
    """The lake holds what each stream's policy says; every missing reading is counted."""
    report = json.dumps({"events": run.events, "sent": run.sent, "lake": run.lake}, default=str)
    for kit, (_, stream) in [*MAIN_KITS.items(), (REJECT_KIT[0], REJECT_KIT[1:])]:
        sent = run.sent[kit]
        assert sent == run.per_kit or kit == REJECT_KIT[0], report
        got = run.lake.get(kit)
        assert got is not None and got["stream"] == stream, report
        # Every reading once: kit_seq 0..sent-1, each in one row.
        assert (got["n"], got["distinct_seqs"], got["first"], got["last"]) == (
            sent,
            sent,
            0,
            sent - 1,
        ), report
    for name in ("events", "telemetry", "capped-reject"):
        row = run.streams[name]
        assert row["deadLettered"] == 0 and row["pending"] == 0, row
        lost = {k: v for k, v in row["dropped"].items() if k != "rejected: full"}
        assert lost == {}, row  # "rejected: full" counts refused appends: never accepted
    assert run.streams["capped-reject"]["dropped"]["rejected: full"] > 0
    # overwrite-oldest: each reading in the lake once; those that are not were counted.
    kit = OVERWRITE_KIT[0]
    got = run.lake[kit]
    row = run.streams["capped-overwrite"]
    overwritten = row["dropped"].get("overwritten", 0)
    assert got["n"] == got["distinct_seqs"], report
    assert overwritten > 0, row
    assert got["n"] + overwritten == run.sent[kit], (row, report)
    assert set(row["dropped"]) == {"overwritten"}, row


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kits_to_lake_through_kills_restarts_an_outage_and_full_streams(tmp_path: Path) -> None:
    run = run_story(tmp_path, per_kit=3000, speed=600, capped=300)
    check(run)
    print(
        f"\nkits to lake: {sum(run.sent.values())} readings in {run.seconds:.0f} s: "
        f"{run.events}; duplicates: {run.duplicates}"
    )


@pytest.mark.soak
@pytest.mark.timeout(6 * 3600)
def test_a_million_readings_kits_to_lake(tmp_path: Path) -> None:
    run = run_story(tmp_path, per_kit=250_000, speed=0, capped=300)
    check(run)
    report = os.environ.get("EDGELOOP_SOAK_REPORT")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "readings": sum(run.sent.values()),
                    "seconds": run.seconds,
                    "events": run.events,
                    "overwritten": run.streams["capped-overwrite"]["dropped"].get("overwritten"),
                    "duplicates": run.duplicates,
                }
            )
        )
