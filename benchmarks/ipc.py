"""IPC pub/sub benchmarks: throughput and latency of local topics, against Mosquitto.

100-byte JSON messages go from one publisher to one subscriber, and from one publisher to
ten, through the hub agent's Greengrass IPC: once with the official AWS IoT Device SDK
client (``GreengrassCoreIPCClientV2``) and once with edgeloop's own ``IpcClient``. Every
publisher and subscriber is a component deployed on a real agent (so it holds a real
SVCUID), in its own process. The yardstick, measured in the same run, is the same traffic
through a Mosquitto broker on loopback with paho-mqtt clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks._report import Result, SuiteResult, Target
from benchmarks.edge_runtime import PYTHON, BenchHub, BenchmarkError, Workspace

MESSAGE_SIZE = 100  # bytes of compact JSON, as the publisher builds it
WARMUP = 500  # messages sent, and not counted, before the measured ones
SETTLE = 0.3  # seconds between the warm-up and the measured messages
WINDOW = 64  # publish requests in flight at once (IPC responses, MQTT QoS 1 PUBACKs)
IDLE = 3.0  # a subscriber that hears nothing this long gives up waiting for the end
TIMEOUT = 60.0  # no single wait in this suite should come near this
RATE_FACTOR = 0.5  # the target: edgeloop delivers at least half of Mosquitto's rate

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PUBSUB_POLICY = {
    "accessControl": {
        "aws.greengrass.ipc.pubsub": {
            "bench:pubsub": {"operations": ["*"], "resources": ["*"]},
        }
    }
}
HUB_SETTINGS = {"health_window": 0.5, "stop_grace": 2.0}


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One row's traffic: which clients, how many subscribers, how many messages."""

    transport: str  # a role prefix of the peer script: "gg", "el" or "mqtt"
    label: str
    subscribers: int
    count: int
    qos: int = 0  # MQTT only
    rate: int = 0  # messages/s the publisher keeps to; 0: as fast as the window allows

    @property
    def baseline(self) -> bool:
        """True for the Mosquitto rows."""
        return self.transport == "mqtt"


def _scenarios(subscribers: int, count: int) -> list[Scenario]:
    return [
        Scenario(
            transport="mqtt",
            label="Mosquitto + paho-mqtt, QoS 0",
            subscribers=subscribers,
            count=count,
        ),
        Scenario(
            transport="mqtt",
            label="Mosquitto + paho-mqtt, QoS 1",
            subscribers=subscribers,
            count=count,
            qos=1,
        ),
        Scenario(
            transport="gg",
            label="edgeloop IPC, official client (GreengrassCoreIPCClientV2)",
            subscribers=subscribers,
            count=count,
        ),
        Scenario(
            transport="el",
            label="edgeloop IPC, edgeloop.sdk.ipc.IpcClient",
            subscribers=subscribers,
            count=count,
        ),
    ]


def _paced(rate: int, count: int) -> list[Scenario]:
    # Latency without a backlog: at full speed it is mostly time spent queued.
    return [
        Scenario(transport=s.transport, label=s.label, subscribers=1, count=count, rate=rate)
        for s in _scenarios(1, count)
        if s.qos == 0
    ]


# Baselines run next to what they are compared with, so both see the same machine.
SCENARIOS = [*_scenarios(1, 20_000), *_scenarios(10, 5_000), *_paced(1_000, 3_000)]

# The publisher and subscriber processes, one script for every role. It is written to the
# run's folder (for IPC, as a component's artifact) and runs on the benchmark's own
# interpreter. Each process writes its result as JSON to the file named by --out.
PEER = r'''
"""A benchmark peer (written by benchmarks/ipc.py): publishes or subscribes, then reports."""

import argparse
import asyncio
import json
import os
import threading
import time
from collections import deque
from pathlib import Path

END = -1  # the sequence number of the message that ends a run
TIMEOUT = 60.0


def build(seq, size):
    """A JSON object of exactly ``size`` bytes, compact, stamped with the send time."""
    t = time.monotonic_ns()
    # '{"seq":S,"t":T,"pad":"P"}': 22 bytes of syntax and names, then the values.
    pad = size - 22 - len(str(seq)) - len(str(t))
    return {"seq": seq, "t": t, "pad": "x" * max(pad, 0)}


CPU_START = [0.0]  # process CPU time when the measured part of this peer's work began


def write_json(path, data):
    tmp = path + ".tmp"
    data = {**data, "cpu_s": time.process_time() - CPU_START[0]}
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)  # the harness never reads half a file


def wait_for(path, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


class Recorder:
    """What a subscriber heard: latencies of measured messages, and when the last came."""

    def __init__(self, warmup):
        CPU_START[0] = time.process_time()  # subscribed: from here on it only listens
        self.warmup = warmup
        self.latencies = []
        self.last = 0
        self.heard = time.monotonic()
        self.ended = False
        self.done = threading.Event()

    def on(self, now, obj):
        self.heard = time.monotonic()
        seq = obj["seq"]
        if seq == END:
            self.ended = True
            self.done.set()
        elif seq >= self.warmup:
            self.latencies.append(now - obj["t"])
            self.last = now

    def wait(self, idle):
        while not self.done.wait(0.1):
            if time.monotonic() - self.heard > idle:
                return

    def report(self):
        return {"received": len(self.latencies), "latencies_ns": self.latencies,
                "last_recv": self.last, "ended": self.ended}


def delay(first, index, rate):
    """Seconds to wait before the measured message ``index`` to keep to ``rate`` msg/s."""
    return (first + index * 1e9 / rate - time.monotonic_ns()) / 1e9 if rate else 0.0


def publish_all(args, send, flush):
    wait_for(args.go)
    CPU_START[0] = time.process_time()
    for seq in range(args.warmup):
        send(build(seq, args.size))
    flush()
    time.sleep(args.settle)
    first = time.monotonic_ns()
    for index, seq in enumerate(range(args.warmup, args.warmup + args.count)):
        wait = delay(first, index, args.rate)
        if wait > 0:
            time.sleep(wait)
        send(build(seq, args.size))
    flush()
    last = time.monotonic_ns()
    send(build(END, args.size))
    flush()
    write_json(args.out, {"sent": args.count, "first_send": first, "last_send": last})


# -- the official AWS IoT Device SDK client ---------------------------------------------
def gg_pub(args):
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import JsonMessage, PublishMessage

    client = GreengrassCoreIPCClientV2()
    pending = deque()

    def send(obj):
        message = PublishMessage(json_message=JsonMessage(message=obj))
        pending.append(client.publish_to_topic_async(topic=args.topic, publish_message=message))
        if len(pending) >= args.window:
            pending.popleft().result(TIMEOUT)

    def flush():
        while pending:
            pending.popleft().result(TIMEOUT)

    publish_all(args, send, flush)
    client.close()


def gg_sub(args):
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    # No executor: events are handled in order on the SDK's own thread. The default
    # thread pool may run callbacks out of order, and adds a hand-off per message.
    client = GreengrassCoreIPCClientV2(executor=None)
    rec = Recorder(args.warmup)

    def on_event(event):
        now = time.monotonic_ns()
        rec.on(now, event.json_message.message)

    client.subscribe_to_topic(topic=args.topic, on_stream_event=on_event)
    Path(args.ready).touch()
    rec.wait(args.idle)
    write_json(args.out, rec.report())
    client.close()


# -- edgeloop's own client --------------------------------------------------------------
def el_pub(args):
    from edgeloop.sdk.ipc import IpcClient

    async def main():
        client = await IpcClient.connect()
        loop = asyncio.get_running_loop()
        pending = deque()

        async def send(obj):
            pending.append(loop.create_task(client.publish_json(args.topic, obj)))
            if len(pending) >= args.window:
                await pending.popleft()

        async def flush():
            while pending:
                await pending.popleft()

        await loop.run_in_executor(None, wait_for, args.go)
        for seq in range(args.warmup):
            await send(build(seq, args.size))
        await flush()
        await asyncio.sleep(args.settle)
        first = time.monotonic_ns()
        for index, seq in enumerate(range(args.warmup, args.warmup + args.count)):
            wait = delay(first, index, args.rate)
            if wait > 0:
                await asyncio.sleep(wait)
            await send(build(seq, args.size))
        await flush()
        last = time.monotonic_ns()
        await send(build(END, args.size))
        await flush()
        write_json(args.out, {"sent": args.count, "first_send": first, "last_send": last})
        await client.close()

    asyncio.run(main())


def el_sub(args):
    from edgeloop.sdk.ipc import IpcClient

    async def main():
        client = await IpcClient.connect()
        rec = Recorder(args.warmup)
        subscription = await client.subscribe_topic(args.topic)
        Path(args.ready).touch()

        async def consume():
            async for message in subscription:
                rec.on(time.monotonic_ns(), message.payload)
                if rec.ended:
                    return

        task = asyncio.create_task(consume(), name="consume")
        while not task.done():
            await asyncio.wait([task], timeout=0.1)
            if time.monotonic() - rec.heard > args.idle:
                task.cancel()
        report = rec.report()
        report["client_dropped"] = subscription.dropped
        write_json(args.out, report)
        await client.close()

    asyncio.run(main())


# -- Mosquitto with paho-mqtt -----------------------------------------------------------
def mqtt_client(args, name):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
    client.max_inflight_messages_set(args.window)  # only before connecting
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("no CONNACK from the broker")
    return client


def mqtt_pub(args):
    client = mqtt_client(args, "pub")
    last = []

    def send(obj):
        payload = json.dumps(obj, separators=(",", ":")).encode()
        last[:] = [client.publish(args.topic, payload, qos=args.qos)]

    def flush():
        if last:
            last[0].wait_for_publish(TIMEOUT)

    publish_all(args, send, flush)
    client.disconnect()
    client.loop_stop()


def mqtt_sub(args):
    client = mqtt_client(args, "sub")
    rec = Recorder(args.warmup)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, msg: rec.on(time.monotonic_ns(), json.loads(msg.payload))
    client.subscribe(args.topic, qos=args.qos)
    if not subscribed.wait(10):
        raise SystemExit("no SUBACK from the broker")
    Path(args.ready).touch()
    rec.wait(args.idle)
    write_json(args.out, rec.report())
    client.disconnect()
    client.loop_stop()


ROLES = {"gg-pub": gg_pub, "gg-sub": gg_sub, "el-pub": el_pub, "el-sub": el_sub,
         "mqtt-pub": mqtt_pub, "mqtt-sub": mqtt_sub}

parser = argparse.ArgumentParser()
parser.add_argument("role", choices=sorted(ROLES))
parser.add_argument("--topic", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--ready", default="")
parser.add_argument("--go", default="")
parser.add_argument("--count", type=int, default=0)
parser.add_argument("--warmup", type=int, default=0)
parser.add_argument("--size", type=int, default=100)
parser.add_argument("--settle", type=float, default=0.3)
parser.add_argument("--window", type=int, default=64)
parser.add_argument("--idle", type=float, default=3.0)
parser.add_argument("--qos", type=int, default=0)
parser.add_argument("--rate", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parsed = parser.parse_args()
ROLES[parsed.role](parsed)
'''


# -- measurements -----------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one scenario's processes reported, reduced to the table's numbers."""

    sent: int
    received: list[int]  # per subscriber
    rates: list[float]  # per subscriber: received / (its last receive - first send), msg/s
    total_rate: float  # all deliveries / (the last receive anywhere - first send), msg/s
    p50_ms: float
    p99_ms: float
    ended: int  # subscribers that saw the end marker (the others gave up after IDLE)
    client_dropped: int  # edgeloop's client queue only; the agent's drops show as lost
    cpu_publisher: float = 0.0  # CPU seconds while measuring (warm-up included)
    cpu_subscribers: float = 0.0
    cpu_server: float = 0.0  # the agent, or Mosquitto

    @property
    def lost(self) -> int:
        """Messages sent and not delivered, summed over the subscribers."""
        return self.sent * len(self.received) - sum(self.received)

    def describe(self) -> str:
        """Rate, latency and losses, as the measured column shows them."""
        if len(self.rates) == 1:
            rate = f"{self.rates[0]:,.0f} msg/s"
        else:
            rate = (
                f"{self.total_rate:,.0f} deliveries/s in all; per subscriber "
                f"median {_median(self.rates):,.0f} msg/s (min {min(self.rates):,.0f})"
            )
        lost = f"{self.lost} lost" + (
            f" ({self.client_dropped} in the client's own queue)" if self.client_dropped else ""
        )
        cpu = (
            f"CPU s: publisher {self.cpu_publisher:.2f}, subscribers "
            f"{self.cpu_subscribers:.2f}, server {self.cpu_server:.2f}"
        )
        return f"{rate}; latency p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms; {lost}; {cpu}"


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _percentile(ordered: Sequence[int], q: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered) + 0.5))
    return float(ordered[min(rank, len(ordered)) - 1])


def reduce(publisher: dict[str, Any], subscribers: list[dict[str, Any]]) -> Outcome:
    """Combine the publisher's and subscribers' reports."""
    first = publisher["first_send"]
    rates = [
        sub["received"] / ((sub["last_recv"] - first) / 1e9) if sub["received"] else 0.0
        for sub in subscribers
    ]
    last = max(sub["last_recv"] for sub in subscribers)
    delivered = sum(sub["received"] for sub in subscribers)
    latencies = sorted(lat for sub in subscribers for lat in sub["latencies_ns"])
    return Outcome(
        sent=publisher["sent"],
        received=[sub["received"] for sub in subscribers],
        rates=rates,
        total_rate=delivered / ((last - first) / 1e9) if delivered else 0.0,
        p50_ms=_percentile(latencies, 50) / 1e6,
        p99_ms=_percentile(latencies, 99) / 1e6,
        ended=sum(1 for sub in subscribers if sub["ended"]),
        client_dropped=sum(sub.get("client_dropped", 0) for sub in subscribers),
        cpu_publisher=publisher.get("cpu_s", 0.0),
        cpu_subscribers=sum(sub.get("cpu_s", 0.0) for sub in subscribers),
    )


class Run:
    """The files one scenario's processes use to meet: ready, go, and their results."""

    def __init__(self, folder: Path, scenario: Scenario, peer: Path) -> None:
        self.folder = folder
        self.scenario = scenario
        self.peer = peer
        self.topic = f"bench/{folder.name}/{scenario.transport}{scenario.subscribers}"
        self.go = folder / "go"
        self.pub_out = folder / "pub.json"
        self.sub_outs = [folder / f"sub{i}.json" for i in range(scenario.subscribers)]
        self.readies = [folder / f"sub{i}.ready" for i in range(scenario.subscribers)]

    def argv(self, role: str, out: Path, ready: Path | None = None, port: int = 0) -> list[str]:
        """The peer's arguments for one process."""
        s = self.scenario
        args = [
            f"{s.transport}-{role}",
            f"--topic={self.topic}",
            f"--out={out}",
            f"--count={s.count}",
            f"--warmup={WARMUP}",
            f"--size={MESSAGE_SIZE}",
            f"--settle={SETTLE}",
            f"--window={WINDOW}",
            f"--idle={IDLE}",
            f"--qos={s.qos}",
            f"--rate={s.rate}",
            f"--port={port}",
        ]
        if role == "pub":
            args.append(f"--go={self.go}")
        if ready is not None:
            args.append(f"--ready={ready}")
        return args

    def start_and_collect(self, alive: Any, explain: Any, server_pid: int) -> Outcome:
        """Once the peers are started: wait for the subscribers, say go, read the results.

        ``alive()`` raises when a process the run depends on has died; ``explain()`` is
        what to add to an error (logs).
        """
        _wait_files(self.readies, alive, explain, "subscribers ready")
        server_cpu = _cpu_seconds(server_pid)
        self.go.touch()
        _wait_files([self.pub_out, *self.sub_outs], alive, explain, "results")
        server_cpu = _cpu_seconds(server_pid) - server_cpu
        publisher = json.loads(self.pub_out.read_text())
        subscribers = [json.loads(path.read_text()) for path in self.sub_outs]
        return replace(reduce(publisher, subscribers), cpu_server=server_cpu)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_files(paths: list[Path], alive: Any, explain: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(path.exists() for path in paths):
        alive()
        if time.monotonic() > deadline:
            missing = ", ".join(p.name for p in paths if not p.exists())
            raise BenchmarkError(f"{what}: no {missing} within {TIMEOUT:g} s{explain()}")
        time.sleep(0.02)


# -- Mosquitto --------------------------------------------------------------------------
class Broker:
    """A Mosquitto broker on a free loopback port, with no persistence."""

    def __init__(self, ws: Workspace) -> None:
        if not Path(MOSQUITTO).exists():
            raise BenchmarkError(f"no {MOSQUITTO}: run `make system-packages` (apt mosquitto)")
        folder = ws.folder()
        self.port = _free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.log = folder / "mosquitto.log"
        with self.log.open("wb") as log:
            self.proc = ws.popen(
                [MOSQUITTO, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"mosquitto did not listen: {self.log.read_text()[-500:]}")
            time.sleep(0.02)

    def version(self) -> str:
        """``mosquitto version X``, as the broker prints it."""
        done = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).splitlines()[0].strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_mqtt(ws: Workspace, broker: Broker, scenario: Scenario, peer: Path) -> Outcome:
    """The scenario's traffic through Mosquitto; every peer a plain process."""
    run = Run(ws.folder(), scenario, peer)
    logs = run.folder / "peers.log"
    procs: list[subprocess.Popen[bytes]] = []
    with logs.open("ab") as log:

        def start(argv: list[str]) -> None:
            procs.append(
                ws.popen(
                    [PYTHON, str(peer), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            )

        for out, ready in zip(run.sub_outs, run.readies, strict=True):
            start(run.argv("sub", out, ready, port=broker.port))
        start(run.argv("pub", run.pub_out, port=broker.port))

    def alive() -> None:
        for proc in procs:
            if proc.poll() not in (None, 0):
                raise BenchmarkError(f"a peer exited with {proc.returncode}{explain()}")
        if broker.proc.poll() is not None:
            raise BenchmarkError(f"mosquitto exited with {broker.proc.returncode}{explain()}")

    def explain() -> str:
        return "\npeers:\n" + logs.read_text(errors="replace")[-1500:]

    outcome = run.start_and_collect(alive, explain, broker.proc.pid)
    for proc in procs:
        proc.wait(TIMEOUT)
    return outcome


# -- the agent --------------------------------------------------------------------------
def run_ipc(ws: Workspace, scenario: Scenario, peer: Path) -> Outcome:
    """The scenario's traffic through a fresh agent; every peer a deployed component."""
    hub = BenchHub(ws)
    (hub.root / "agent.json").write_text(json.dumps(HUB_SETTINGS))
    run = Run(hub.root.parent / "run", scenario, peer)
    run.folder.mkdir()
    components: dict[str, list[str]] = {}
    for i, (out, ready) in enumerate(zip(run.sub_outs, run.readies, strict=True)):
        components[f"bench.Sub{i}"] = run.argv("sub", out, ready)
    components["bench.Pub"] = run.argv("pub", run.pub_out)
    for name, argv in components.items():
        _ipc_component(hub, name, " ".join([PYTHON, "{artifacts:path}/peer.py", *argv]), peer)
    hub.start()
    hub.wait_answer()
    hub.deploy(list(components))

    def alive() -> None:
        if hub.proc is not None and hub.proc.poll() is not None:
            raise BenchmarkError(f"the agent exited with {hub.proc.returncode}{explain()}")

    def explain() -> str:
        text = [hub._tail()]
        for name in components:
            log = hub.root / "logs" / f"{name}.log"
            if log.exists():
                text.append(f"\n{name}:\n" + log.read_text(errors="replace")[-800:])
        return "".join(text)

    try:
        assert hub.proc is not None
        return run.start_and_collect(alive, explain, hub.proc.pid)
    finally:
        hub.stop()


def _ipc_component(hub: BenchHub, name: str, run: str, peer: Path) -> None:
    """A Run-only component with the peer script as its artifact, allowed to pub/sub."""
    folder = hub.artifacts / name / "1.0.0"
    folder.mkdir(parents=True)
    shutil.copy(peer, folder / "peer.py")
    recipe = {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": "1.0.0",
        "ComponentConfiguration": {"DefaultConfiguration": PUBSUB_POLICY},
        "Manifests": [
            {
                "Platform": {"os": "linux"},
                "Lifecycle": {"Run": "exec " + run},
                "Artifacts": [{"URI": f"s3://bench/{name}/1.0.0/peer.py"}],
            }
        ],
    }
    (hub.recipes / f"{name}-1.0.0.json").write_text(json.dumps(recipe))


# -- the table --------------------------------------------------------------------------
def _row(scenario: Scenario, outcome: Outcome, baseline: Outcome | None) -> Result:
    name = (
        f"{'baseline: ' if scenario.baseline else ''}{scenario.label}, 1→{scenario.subscribers}, "
        f"{scenario.count:,} x {MESSAGE_SIZE} B JSON"
        + (f", paced at {scenario.rate:,} msg/s" if scenario.rate else "")
    )
    us_per_msg = 1e6 / outcome.total_rate if outcome.total_rate else float("inf")
    measured = f"{outcome.describe()} ({us_per_msg:.1f} µs per delivery)"
    if outcome.ended < len(outcome.received):
        measured += f"; {len(outcome.received) - outcome.ended} subscriber(s) missed the end"
    if scenario.baseline or baseline is None:
        return Result(benchmark=name, measured=measured)
    if scenario.rate:
        return Result(
            benchmark=name,
            measured=measured,
            comparison=f"Mosquitto QoS 0 at the same pace: latency p50 {baseline.p50_ms:.2f} ms, "
            f"p99 {baseline.p99_ms:.2f} ms",
        )
    base_us = 1e6 / baseline.total_rate
    return Result(
        benchmark=name,
        measured=measured,
        value=us_per_msg,
        # "at least half of Mosquitto's rate" as an upper bound: at most twice its time.
        target=Target(limit=round(base_us / RATE_FACTOR, 1), unit="µs per delivery"),
        comparison=f"Mosquitto QoS 0, same traffic: {baseline.total_rate:,.0f} deliveries/s "
        f"({base_us:.1f} µs); edgeloop reaches {outcome.total_rate / baseline.total_rate:.2f}x "
        f"its rate (target ≥ {RATE_FACTOR:g}x)",
    )


def run(out: SuiteResult) -> None:
    """Run the IPC benchmarks, adding rows to ``out`` as they complete."""
    with Workspace() as ws:
        peer = ws.folder() / "peer.py"
        peer.write_text(PEER)
        _progress("warming the bytecode cache")
        subprocess.run(
            [PYTHON, "-c", "import awsiot.greengrasscoreipc.clientv2, edgeloop.sdk.ipc, paho"],
            env=ws.env,
            check=True,
        )
        broker = Broker(ws)
        baselines: dict[tuple[int, int], Outcome] = {}
        for scenario in SCENARIOS:
            _progress(f"{scenario.label}, 1→{scenario.subscribers}")
            if scenario.baseline:
                outcome = run_mqtt(ws, broker, scenario, peer)
                if scenario.qos == 0:
                    baselines[scenario.subscribers, scenario.rate] = outcome
            else:
                outcome = run_ipc(ws, scenario, peer)
            baseline = baselines.get((scenario.subscribers, scenario.rate))
            out.results.append(_row(scenario, outcome, baseline))
        version = broker.version()
    out.notes += [
        f"Every message is {MESSAGE_SIZE} bytes of compact JSON carrying the send time "
        "(time.monotonic_ns(), one clock for every process on Linux); latency is receive "
        "time minus send time, pooled over all subscribers. The IPC clients re-encode the "
        "object inside the request, so on the wire the IPC message is a few bytes longer.",
        "Rate: deliveries / (the last receive - the first measured send); per subscriber, "
        "the subscriber's own last receive. "
        f"{WARMUP} warm-up messages and a {SETTLE:g} s pause precede the measured ones; "
        "subscribers are subscribed, and say so in a ready-file, before the publisher starts.",
        f"Publishers pipeline: at most {WINDOW} requests unanswered at once. Official "
        "client: publish_to_topic_async, waiting on the oldest future when the window is "
        "full; its subscribers pass executor=None (events handled in order on the SDK "
        "thread). edgeloop client: one publish_json task per message, same window. paho: "
        f"QoS 1 max_inflight_messages={WINDOW}; QoS 0 is not acknowledged, so not paced.",
        "Lost = sent x subscribers - delivered. The agent drops a subscriber's oldest queued "
        "message when 1024 wait (and edgeloop's client does the same in its own queue); "
        "no pacing beyond the window is applied, so any drop shows here. Mosquitto's "
        "default max_queued_messages (1000) likewise drops QoS 1 messages queued for a "
        "subscriber that falls behind.",
        "Unpaced rows measure throughput; their latency is mostly time spent queued behind "
        "the backlog, and an unpaced QoS 0 publisher builds the longest one. The paced rows "
        "(a fixed rate well under every transport's maximum) measure latency without it.",
        "CPU s: CPU seconds each side used for the measured traffic (warm-up included): "
        "the publisher process, all subscriber processes, and the server (the agent, or "
        "Mosquitto). On this 2-core box, a side near the run's duration is the bottleneck: "
        "the official client's publisher spends far more CPU per message than the agent.",
        f"Each IPC row runs on a fresh agent (publisher and subscribers deployed as "
        f"components); Mosquitto ({version}) runs on loopback with persistence off, its "
        "clients as plain processes on the same interpreter.",
    ]


def _progress(what: str) -> None:
    print(f"  ipc: {what} ...", file=sys.stderr, flush=True)


__all__ = ["run"]
