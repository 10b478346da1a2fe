"""Cloud control-plane benchmarks: many simulated hubs on one cloud over mutual TLS.

Simulated hubs (``benchmarks._hubs``: MQTT 5 on the wire as a hub's cloud link speaks it,
thousands per process, spread over a few worker processes) connect to a real cloud
(``Cloud(CloudSettings(...))``, as ``edgeloop cloud up`` runs it, in a process of its own)
with a certificate each. Measured: the connect storm (CONNACK and the retained birth's
PUBACK for every hub, then the registry showing every hub online), one shadow update per
hub, the shadow update round trip of a paced stream with every hub connected, fleet
queries over every thing (in the registry, and through the REST API), and the memory of
the broker and the cloud's process at that load.

Baselines from the same run, same hubs and clients: Mosquitto with edgeloop's exact
configuration but persistence off and no edgeloop services, then with persistence on (as
edgeloop runs it) and still no services. The three storms tell the broker's TLS cost,
persistence's cost, and the services' cost apart.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks._hubs import DRAIN, HubsSpec, serve
from benchmarks._report import Result, SuiteResult, Target, mb
from benchmarks.edge_runtime import PYTHON, BenchmarkError, Workspace, read_memory, terminate

HUBS = 10_000
WORKERS = 2  # client processes; the broker and the cloud get the rest of the machine
CONCURRENCY = 64  # connects (or updates) each worker has in flight at once
KEEPALIVE = 600  # seconds: long enough that PINGREQs play no part in a run
PACED_RATE = 200  # shadow updates per second, from random hubs, for the latency row
PACED_SECONDS = 10.0
QUERY_REPEATS = 20
STORM_BUDGET = 150.0  # seconds a connect storm may take; hubs not connected by then count
UPDATE_BUDGET = 60.0  # the same for the one-update-per-hub phase
ONLINE_WAIT = 30.0  # how long after the last birth the registry may take to show it
TIMEOUT = 300.0  # the longest any worker may take to answer
FD_MARGIN = 256  # descriptors a process needs beyond one per connection

KINDS = ("furnace", "washer", "fridge", "pump")
QUERIES = (
    ("connected furnaces", "connectivity.connected:true AND attributes.kind:furnace"),
    ("range", "attributes.floor:[3 TO 5]"),
    ("prefix wildcard", "thingName:hub-00*"),
    ("shadow value", "shadow.reported.temperature>25"),
)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# The cloud's process: what `edgeloop cloud up` runs, minus the command line. It prints
# the endpoints once up and stops everything it started on SIGTERM or SIGINT.
CLOUD_RUNNER = r"""
import asyncio, json, logging, signal, sys
from pathlib import Path
from edgeloop.cloud.service import Cloud, CloudSettings

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

async def main():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    autosave = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    cloud = Cloud(
        CloudSettings(data_dir=Path(sys.argv[1]), port=int(sys.argv[2]), broker_autosave=autosave)
    )
    try:
        print(json.dumps(await cloud.start()), flush=True)
        await stop.wait()
    finally:
        await cloud.stop()

asyncio.run(main())
"""


# -- the fleet ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Fleet:
    """Things registered in a cloud's data folder, with a certificate file each."""

    data_dir: Path
    things: list[str]
    cert_dir: Path
    key_file: Path
    ca_file: Path
    setup: str  # how long making them took, for the notes


def make_fleet(ws: Workspace, hubs: int) -> Fleet:
    """Register ``hubs`` things and issue each a certificate, the fast way that is still
    the real one: one bulk registration, one EC key shared by every simulated hub (a CSR
    made once), one certificate per thing signed by the install's CA from that CSR, and
    the certificates recorded ACTIVE in one transaction."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from edgeloop.cloud.context import CloudContext

    base = ws.folder()
    data_dir, cert_dir = base / "cloud", base / "certs"
    cert_dir.mkdir()
    things = [f"hub-{index:05d}" for index in range(hubs)]
    started = time.perf_counter()
    ctx = CloudContext.open(data_dir)
    opened = time.perf_counter()
    attributes: dict[str, dict[str, str | int | float | bool]] = {
        thing: {"kind": KINDS[i % len(KINDS)], "floor": i % 10, "site": f"site-{i // 100:03d}"}
        for i, thing in enumerate(things)
    }
    ctx.registry.create_things(attributes)
    registered = time.perf_counter()
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = base / "hub.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    issued: dict[str, bytes] = {}
    for thing in things:
        pem = ctx.ca.issue_device_certificate(thing, csr_pem=csr).certificate_pem
        (cert_dir / f"{thing}.pem").write_bytes(pem)
        issued[thing] = pem
    signed = time.perf_counter()
    ctx.registry.record_certificates(issued)
    recorded = time.perf_counter()
    ctx.db.dispose()
    setup = (
        f"Setup (not measured as a row): {hubs:,} things registered in one create_things "
        f"call ({registered - opened:.1f} s), {hubs:,} certificates signed by the install's "
        f"CA from one CSR whose EC P-256 key every simulated hub shares "
        f"({signed - registered:.1f} s), recorded ACTIVE with one record_certificates call "
        f"({recorded - signed:.1f} s); {recorded - started:.1f} s in all with the CA and "
        "database. The broker checks only the chain and the CRL; the registry knows every "
        "certificate, as if each had been issued through the API."
    )
    return Fleet(
        data_dir=data_dir,
        things=things,
        cert_dir=cert_dir,
        key_file=key_file,
        ca_file=ctx.ca.chain_path,
        setup=setup,
    )


# -- worker processes --------------------------------------------------------------------
class Hubs:
    """The worker processes that simulate the hubs, and the commands they run together."""

    def __init__(
        self, fleet: Fleet, port: int, *, workers: int, main: Callable[..., None] = serve
    ) -> None:
        """Start ``workers`` processes running ``main(pipe, spec)`` (``_hubs.serve``, or
        a module's that speaks the same commands and more)."""
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for index in range(workers):
            spec = HubsSpec(
                things=fleet.things[index::workers],
                host="127.0.0.1",
                port=port,
                server_hostname="localhost",
                ca_file=str(fleet.ca_file),
                key_file=str(fleet.key_file),
                cert_dir=str(fleet.cert_dir),
                keepalive=KEEPALIVE,
                concurrency=CONCURRENCY,
            )
            ours, theirs = context.Pipe()
            proc = context.Process(
                target=main, args=(theirs, spec), name=f"hubs-{index}", daemon=True
            )
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        for conn in self.conns:
            self._recv(conn, 60.0)

    def send(self, command: str, **args: Any) -> None:
        """Ask every worker to run ``command``."""
        for conn in self.conns:
            conn.send((command, args))

    def collect(self, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Every worker's answer to the last command."""
        return [self._recv(conn, timeout) for conn in self.conns]

    def ready(self) -> bool:
        """True when every worker has answered (without reading the answers)."""
        return all(conn.poll() for conn in self.conns)

    def run(self, command: str, **args: Any) -> list[dict[str, Any]]:
        """``send`` then ``collect``."""
        self.send(command, **args)
        return self.collect()

    def _recv(self, conn: Connection, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if any(not proc.is_alive() for proc in self.procs):
                raise BenchmarkError("a hub worker process died (see its traceback above)")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"a hub worker did not answer within {timeout:g} s")
        answer: dict[str, Any] = conn.recv()
        return answer

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [proc.pid for proc in self.procs]

    def close(self) -> None:
        """Ask the workers to exit; end any that do not."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("exit", {}))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()

    def __enter__(self) -> Hubs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- brokers -----------------------------------------------------------------------------
class Server:
    """What the hubs connect to: a bare Mosquitto, or a whole cloud (processes we started)."""

    def __init__(
        self,
        label: str,
        port: int,
        broker_pid: int,
        *,
        cloud_pid: int | None = None,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.label = label
        self.port = port
        self.broker_pid = broker_pid
        self.cloud_pid = cloud_pid
        self.proc = proc  # the process to end when done (the broker, or the cloud)
        self.api = ""


def start_mosquitto(ws: Workspace, fleet: Fleet, *, persistence: bool) -> Server:
    """Mosquitto on edgeloop's own configuration (``render_config``), no edgeloop services;
    with ``persistence`` False the one change is ``persistence false``."""
    from edgeloop.cloud.broker import (
        AclRules,
        BrokerConfig,
        password_line,
        render_acl,
        render_config,
        render_service_acl,
    )
    from edgeloop.cloud.context import CloudContext

    folder = ws.folder()
    ctx = CloudContext.open(fleet.data_dir)
    try:
        issued = ctx.ca.issue_server_certificate(["localhost"], ["127.0.0.1"])
        (folder / "crl.pem").write_bytes(ctx.crl_pem())
    finally:
        ctx.db.dispose()
    assert issued.private_key_pem is not None
    cert, key = folder / "server.pem", folder / "server.key"
    cert.write_bytes(issued.certificate_pem + issued.chain_pem)
    key.write_bytes(issued.private_key_pem)
    key.chmod(0o600)
    device, service = _free_port(), _free_port()
    cfg = BrokerConfig(
        data_dir=folder,
        ca_chain=fleet.ca_file,
        server_cert=cert,
        server_key=key,
        device_port=device,
        service_port=service,
        acl=AclRules(),
        run_as="root" if os.geteuid() == 0 else None,  # as edgeloop's Broker does
    )
    conf = render_config(cfg)
    if not persistence:
        if "persistence true\n" not in conf:
            raise BenchmarkError("edgeloop's broker configuration no longer says persistence")
        conf = conf.replace("persistence true\n", "persistence false\n")
    cfg.conf_path.write_text(conf)
    cfg.device_acl_path.write_text(render_acl(cfg.acl))
    cfg.service_acl_path.write_text(render_service_acl(cfg.service_user))
    cfg.password_path.write_text(password_line(cfg.service_user, secrets.token_urlsafe(16)))
    with cfg.log_path.open("ab") as log:
        proc = ws.popen(
            [MOSQUITTO, "-c", str(cfg.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _wait_listening(device, lambda: proc.poll() is None, cfg.log_path)
    label = "persistence on, as edgeloop runs it" if persistence else "persistence off"
    return Server(f"Mosquitto alone ({label})", device, proc.pid, proc=proc)


def start_cloud(
    ws: Workspace, fleet: Fleet, *, autosave: int = 1
) -> tuple[Server, subprocess.Popen[bytes]]:
    """The whole cloud in a process of its own; returns once its endpoints are written.
    ``autosave``: `cloud up --broker-autosave` (changes between saves of the broker's
    database; 1, the default, saves after every change)."""
    log_path = fleet.data_dir.parent / "cloud.log"
    with log_path.open("ab") as log:
        proc = ws.popen(
            [PYTHON, "-c", CLOUD_RUNNER, str(fleet.data_dir), str(_free_port()), str(autosave)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise BenchmarkError(f"the cloud did not start: {log_path.read_text()[-2000:]}")
    endpoints = json.loads(line)
    broker_pid = int((fleet.data_dir / "broker" / "mosquitto.pid").read_text())
    server = Server(
        "edgeloop cloud",
        int(endpoints["mqtt"]["port"]),
        broker_pid,
        cloud_pid=proc.pid,
        proc=proc,
    )
    server.api = str(endpoints["api"]) + "/api/v1"
    return server, proc


def stop_cloud(proc: subprocess.Popen[bytes], fleet: Fleet) -> None:
    """SIGTERM the cloud (it stops its broker); make sure its Mosquitto is gone too."""
    terminate(proc, grace=20.0)
    pid_file = fleet.data_dir / "broker" / "mosquitto.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if str(fleet.data_dir).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)  # only when the cloud could not stop it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, alive: Any, log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return
        if not alive() or time.monotonic() > deadline:
            raise BenchmarkError(f"mosquitto did not listen: {log.read_text()[-800:]}")
        time.sleep(0.02)


# -- measurements ------------------------------------------------------------------------
def _cpu(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (0 for None)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as err:
        raise BenchmarkError(f"process {pid} (the broker or the cloud) has exited") from err
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def _ms(ns: float) -> str:
    return f"{ns / 1e6:,.1f} ms" if ns < 1e9 else f"{ns / 1e9:,.2f} s"


@dataclass(kw_only=True)
class Storm:
    """One connect storm's numbers."""

    hubs: int
    connected: int
    late: int  # not connected within STORM_BUDGET
    seconds: float  # from the first connect to the last birth PUBACK
    connack_p50: float  # seconds after the start when half had their CONNACK
    broker_cpu: float
    cloud_cpu: float | None  # None: no cloud process (a bare broker)
    client_cpu: float
    broker_rss_kb: int
    errors: list[str] = field(default_factory=list)
    online_seconds: float | None = None  # until the registry showed every hub online
    online: int = 0

    @property
    def rate(self) -> float:
        """Hubs connected (birth acknowledged) per second."""
        return self.connected / self.seconds if self.seconds else 0.0

    @property
    def broker_ms(self) -> float:
        """Mosquitto's CPU time per hub connected, in milliseconds."""
        return self.broker_cpu * 1000 / self.connected if self.connected else float("nan")

    def describe(self) -> str:
        """The measured column."""
        text = (
            f"{self.connected:,}/{self.hubs:,} hubs connected + birth acknowledged in "
            f"{self.seconds:.1f} s = {self.rate:,.0f} hubs/s (half had CONNACK at "
            f"{self.connack_p50:.1f} s); CPU s: Mosquitto {self.broker_cpu:.1f} "
            f"({self.broker_ms:.1f} ms per hub)"
        )
        if self.cloud_cpu is not None:
            text += f", cloud process {self.cloud_cpu:.1f}"
        text += f", hub workers {self.client_cpu:.1f}"
        text += f"; Mosquitto RSS {mb(self.broker_rss_kb):.0f} MB"
        if self.late:
            text += f"; {self.late:,} not connected within the {STORM_BUDGET:g} s limit"
        if self.errors:
            text += f"; {len(self.errors)} error(s), first: {self.errors[0]}"
        return text


def connect_storm(hubs: Hubs, server: Server, n: int, db: Any = None) -> Storm:
    """Every hub connects and publishes its birth; with ``db`` (the cloud's database), also
    the time until its connectivity table shows every acknowledged hub online."""
    broker_cpu, cloud_cpu = _cpu(server.broker_pid), _cpu(server.cloud_pid)
    started = time.monotonic_ns()
    hubs.send("connect", budget=STORM_BUDGET)
    online_at: int | None = None
    online = 0
    while not hubs.ready():
        if db is not None and online_at is None:
            online = _online(db)
            if online >= n:
                online_at = time.monotonic_ns()
        time.sleep(0.1)
    answers = hubs.collect()
    births = sorted(ns for a in answers for ns in a["birth_ns"])
    connacks = sorted(ns for a in answers for ns in a["connack_ns"])
    storm_end_broker_cpu = _cpu(server.broker_pid)
    connected = len(births)
    if db is not None:
        deadline = time.monotonic() + ONLINE_WAIT
        while online_at is None and time.monotonic() < deadline:
            online = _online(db)
            if online >= connected:
                online_at = time.monotonic_ns()
                break
            time.sleep(0.1)
    last = births[-1] if births else started
    storm = Storm(
        hubs=n,
        connected=connected,
        late=sum(a["late"] for a in answers),
        seconds=(last - started) / 1e9,
        connack_p50=(_percentile(connacks, 50) - started) / 1e9 if connacks else float("nan"),
        broker_cpu=storm_end_broker_cpu - broker_cpu,
        cloud_cpu=_cpu(server.cloud_pid) - cloud_cpu if server.cloud_pid else None,
        client_cpu=sum(a["cpu_s"] for a in answers),
        broker_rss_kb=read_memory(server.broker_pid).rss,
        errors=[e for a in answers for e in a["errors"]],
    )
    if db is not None:
        storm.online = online
        storm.online_seconds = (online_at - started) / 1e9 if online_at else None
    return storm


def _online(db: Any) -> int:
    from sqlalchemy import func, select

    from edgeloop.cloud.db import ConnectivityRow

    with db.read() as session:
        count = session.scalar(
            select(func.count()).select_from(ConnectivityRow).where(ConnectivityRow.connected)
        )
    return int(count or 0)


def _latency(values_ns: Sequence[int]) -> str:
    ordered = sorted(values_ns)
    if not ordered:
        return "no answers to time"
    return (
        f"p50 {_ms(_percentile(ordered, 50))}, p99 {_ms(_percentile(ordered, 99))}, "
        f"max {_ms(ordered[-1])}"
    )


# -- the suite ---------------------------------------------------------------------------
def raise_fd_limit(hubs: int) -> str:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (children inherit it); refuse with
    a clear error when even the hard limit cannot hold the broker's connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = hubs + FD_MARGIN  # Mosquitto holds one descriptor per hub
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchmarkError(
            f"{hubs:,} hubs need at least {needed:,} open files in the broker, but this "
            f"process may have at most {hard:,} (hard RLIMIT_NOFILE): raise it (ulimit -Hn, "
            f"/etc/security/limits.conf, or LimitNOFILE= in systemd), or run fewer hubs "
            f"with --hubs {max(hard - FD_MARGIN, 2):,}"
        )
    if soft == hard:
        return f"RLIMIT_NOFILE {soft:,} (already at the hard limit)"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return f"RLIMIT_NOFILE soft {soft:,} raised to the hard {hard:,}"


def run(out: SuiteResult, *, hubs: int = HUBS, workers: int = WORKERS) -> None:
    """Run the cloud benchmarks, adding rows to ``out`` as they complete."""
    if hubs < workers:
        raise BenchmarkError(f"--hubs must be at least {workers}")
    limits = raise_fd_limit(hubs)
    with Workspace() as ws:
        _progress(f"registering {hubs:,} things and issuing their certificates")
        fleet = make_fleet(ws, hubs)
        out.notes.append(fleet.setup)
        baselines: list[Storm] = []
        for persistence in (False, True):
            server = start_mosquitto(ws, fleet, persistence=persistence)
            _progress(f"connect storm: {server.label}")
            try:
                with Hubs(fleet, server.port, workers=workers) as clients:
                    storm = connect_storm(clients, server, hubs)
                    clients.run("disconnect")
            finally:
                assert server.proc is not None
                terminate(server.proc, grace=10.0)
            baselines.append(storm)
            out.results.append(
                Result(
                    benchmark=f"baseline: connect storm, {server.label}, no edgeloop services",
                    measured=storm.describe(),
                )
            )
        bench_cloud(ws, fleet, workers, baselines, out)
    out.notes += _notes(hubs, workers, limits)


def bench_cloud(
    ws: Workspace, fleet: Fleet, workers: int, baselines: list[Storm], out: SuiteResult
) -> None:
    """The connect storm, shadow updates, fleet queries and memory on the whole cloud."""
    from edgeloop.cloud.db import Database

    hubs = len(fleet.things)
    server, proc = start_cloud(ws, fleet)
    db = Database.in_data_dir(fleet.data_dir)
    try:
        with Hubs(fleet, server.port, workers=workers) as clients:
            _progress("connect storm: edgeloop cloud")
            storm = connect_storm(clients, server, hubs, db)
            out.results += _storm_rows(storm, baselines, _dropped(fleet))
            _progress("one shadow update per hub")
            out.results.append(_update_row(clients, server, workers, fleet))
            _progress(f"paced shadow updates, {PACED_RATE}/s for {PACED_SECONDS:g} s")
            out.results.append(_paced_row(clients, server, workers, fleet))
            _progress("fleet queries")
            out.results += _query_rows(server, db, hubs)
            out.results.append(_memory_row(clients, server, fleet, baselines))
            clients.run("disconnect")
    finally:
        db.dispose()
        stop_cloud(proc, fleet)


def _storm_rows(storm: Storm, baselines: list[Storm], dropped: int) -> list[Result]:
    plain, persisted = baselines
    hubs = storm.hubs
    if storm.online_seconds is not None:
        online = f"{storm.online_seconds:.1f} s after the storm began"
    else:
        online = f"not within {ONLINE_WAIT:g} s after the last birth: {storm.online:,} shown online"
    online += _drops(dropped)
    return [
        Result(
            benchmark=f"connect storm: {hubs:,} hubs, mTLS, birth QoS 1 retained",
            measured=storm.describe(),
            value=hubs - storm.connected,
            target=Target(limit=0, unit="hubs not connected"),
            comparison=f"Mosquitto alone: {plain.rate:,.0f} hubs/s with persistence off "
            f"({plain.broker_ms:.1f} ms CPU per hub), {persisted.rate:,.0f} hubs/s on "
            f"({persisted.broker_ms:.1f} ms)",
        ),
        Result(
            benchmark=f"registry shows all {storm.connected:,} connected hubs online",
            measured=f"{online}; the last birth PUBACK came at {storm.seconds:.1f} s; cloud "
            f"process CPU {storm.cloud_cpu or 0:.1f} s",
            value=storm.connected - storm.online if storm.online_seconds is None else 0,
            target=Target(limit=0, unit="hubs not shown online"),
        ),
    ]


def _update_row(clients: Hubs, server: Server, workers: int, fleet: Fleet) -> Result:
    cpu = _cpu(server.broker_pid), _cpu(server.cloud_pid)
    dropped = _dropped(fleet)
    started = time.monotonic_ns()
    answers = clients.run("update", budget=UPDATE_BUDGET)
    answered = sorted(ns for a in answers for ns in a["answered_ns"])
    latencies = [ns for a in answers for ns in a["latencies_ns"]]
    seconds = ((answered[-1] if answered else started) - started) / 1e9
    late = sum(a["late"] for a in answers)
    failed = sum(a["failed"] for a in answers)
    errors = [e for a in answers for e in a["errors"]]
    measured = (
        f"{len(answered):,} hubs subscribed (SUBACK) and had one update accepted in "
        f"{seconds:.1f} s = {len(answered) / seconds if seconds else 0:,.0f} updates/s; round "
        f"trip under this burst {_latency(latencies)}; CPU s: Mosquitto "
        f"{_cpu(server.broker_pid) - cpu[0]:.1f}, cloud process "
        f"{_cpu(server.cloud_pid) - cpu[1]:.1f}, hub workers "
        f"{sum(a['cpu_s'] for a in answers):.1f}"
    )
    if late:
        measured += f"; {late:,} not done within the {UPDATE_BUDGET:g} s limit"
    if failed:
        measured += f"; {failed:,} failed, first: {errors[0] if errors else '?'}"
    measured += _drops(_dropped(fleet) - dropped)
    return Result(
        benchmark=f"shadow: every hub subscribes and updates once ({workers * CONCURRENCY} "
        "hubs at a time)",
        measured=measured,
        value=late + failed,
        target=Target(limit=0, unit="hubs without a shadow"),
    )


def _paced_row(clients: Hubs, server: Server, workers: int, fleet: Fleet) -> Result:
    cpu = _cpu(server.broker_pid), _cpu(server.cloud_pid)
    dropped = _dropped(fleet)
    answers = clients.run("paced", rate=PACED_RATE / workers, seconds=PACED_SECONDS, seed=7)
    latencies = [ns for a in answers for ns in a["latencies_ns"]]
    sent = sum(a["sent"] for a in answers)
    lost = sum(a["unanswered"] + a["rejected"] for a in answers)
    connected = sum(a["connected"] for a in answers)
    return Result(
        benchmark=f"shadow update round trip, {PACED_RATE}/s from random hubs for "
        f"{PACED_SECONDS:g} s, {connected:,} hubs connected",
        measured=f"{len(latencies):,}/{sent:,} accepted; {_latency(latencies)}; {lost:,} "
        f"rejected or unanswered after {DRAIN:g} s; CPU s: Mosquitto "
        f"{_cpu(server.broker_pid) - cpu[0]:.1f}, cloud process "
        f"{_cpu(server.cloud_pid) - cpu[1]:.1f} (in {PACED_SECONDS:g} s and the wait)"
        + _drops(_dropped(fleet) - dropped),
    )


def _query_rows(server: Server, db: Any, hubs: int) -> list[Result]:
    import httpx

    from edgeloop.cloud.registry import Registry

    registry = Registry(db)
    rows = [_query_row("registry.fleet_query, in this process", registry.fleet_query, hubs)]
    with httpx.Client(base_url=server.api, timeout=60) as api:

        def rest(query: str) -> list[str]:
            response = api.get("/fleet/query", params={"q": query})
            response.raise_for_status()
            things: list[str] = response.json()["things"]
            return things

        rows.append(_query_row("REST GET /api/v1/fleet/query", rest, hubs))
    return rows


def _query_row(label: str, query: Any, hubs: int) -> Result:
    """Each query once cold (the first after the fleet changed), then warm, repeated."""
    parts = []
    warm_all: list[float] = []
    for name, text in QUERIES:
        started = time.perf_counter()
        found = query(text)
        cold = time.perf_counter() - started
        warm = []
        for _ in range(QUERY_REPEATS):
            started = time.perf_counter()
            query(text)
            warm.append(time.perf_counter() - started)
        warm.sort()
        warm_all += warm
        parts.append(
            f"{name} ({len(found):,} things): first {cold * 1000:,.0f} ms, then p50 "
            f"{_percentile(warm, 50) * 1000:.1f} ms"
        )
    warm_all.sort()
    return Result(
        benchmark=f"fleet query over {hubs:,} things, {label}",
        measured="; ".join(parts) + f"; every warm query: p99 "
        f"{_percentile(warm_all, 99) * 1000:.1f} ms",
    )


def _memory_row(clients: Hubs, server: Server, fleet: Fleet, baselines: list[Storm]) -> Result:
    plain, persisted = baselines
    connected = sum(a["connected"] for a in clients.run("usage"))
    broker = read_memory(server.broker_pid)
    cloud = read_memory(server.cloud_pid) if server.cloud_pid else None
    workers_rss = sum(read_memory(pid).rss for pid in clients.pids)
    try:
        size = (fleet.data_dir / "broker" / "mosquitto.db").stat().st_size
        saved = f"; Mosquitto's saved database (mosquitto.db) {size / 2**20:.1f} MB"
    except OSError:
        saved = ""
    return Result(
        benchmark=f"memory with {connected:,} hubs connected",
        measured=f"Mosquitto {broker.describe()} (peak {mb(broker.peak_rss):.0f} MB); cloud "
        f"process {cloud.describe() if cloud else 'n/a'}"
        + (f" (peak {mb(cloud.peak_rss):.0f} MB)" if cloud else "")
        + saved,
        comparison=f"Mosquitto alone after its storm: RSS {mb(plain.broker_rss_kb):.0f} MB "
        f"(persistence off), {mb(persisted.broker_rss_kb):.0f} MB (on); the simulated hubs' "
        f"{len(clients.pids)} worker processes: {mb(workers_rss):.0f} MB",
    )


def _drops(count: int) -> str:
    if not count:
        return ""
    return (
        f"; Mosquitto logged 'Outgoing messages are being dropped for client "
        f"edgeloop-cloud-services' {count:,} time(s) (its queue for the services, "
        "max_queued_messages, was full)"
    )


def _dropped(fleet: Fleet) -> int:
    """How often the cloud's Mosquitto logged dropping messages for the cloud's services."""
    try:
        text = (fleet.data_dir / "broker" / "mosquitto.log").read_text(errors="replace")
    except OSError:
        return 0
    return text.count("Outgoing messages are being dropped for client edgeloop-cloud-services")


def _notes(hubs: int, workers: int, limits: str) -> list[str]:
    return [
        f"Simulated hubs: {hubs:,} MQTT 5 clients (benchmarks/_hubs.py, a minimal codec in "
        f"benchmarks/_mqtt.py) in {workers} worker processes, TLS 1.3 over memory BIOs on "
        f"asyncio, each with its own certificate (CN = thing name); as a hub's cloud link: "
        f"clean start 0, a 7-day session expiry, a retained QoS 1 last will and a retained "
        f"QoS 1 birth message on edgeloop/things/<thing>/connectivity; keepalive {KEEPALIVE} s.",
        f"Connect storm: each worker keeps {CONCURRENCY} connects in flight (so "
        f"{workers * CONCURRENCY} at once): TCP connect, TLS handshake (client and server "
        "certificates verified), CONNECT/CONNACK, birth PUBLISH/PUBACK. Rate = hubs with a "
        "birth PUBACK / seconds from the first connect to the last PUBACK. 'Registry shows "
        "online' polls the cloud's connectivity table (a count of connected rows) every 0.1 s. "
        "The hubs' own TLS work runs on the same cores as the broker, so the rate is the "
        "machine's; Mosquitto's CPU per hub is what the broker itself spends.",
        f"Limits that keep a run to minutes: a storm stops after {STORM_BUDGET:g} s, the "
        f"one-update-per-hub phase after {UPDATE_BUDGET:g} s (hubs not done by then count "
        f"against the target), the registry gets {ONLINE_WAIT:g} s after the last birth, and "
        f"answers still due after a shadow phase are waited for {DRAIN:g} s.",
        "Baselines: Mosquitto run directly on edgeloop's rendered configuration (same TLS "
        "listener, CRL, ACL, logging), no edgeloop services subscribed, first with "
        "persistence off, then on (autosave_on_changes, autosave_interval 1, as edgeloop "
        "runs it). The same hubs then connect to the whole cloud; each broker starts empty.",
        "Shadow rows: every hub subscribes to its own update/accepted and update/rejected "
        f"(QoS 1) and publishes one reported-state update (QoS 1, {workers * CONCURRENCY} "
        f"hubs at a time); then {PACED_RATE} updates/s from hubs chosen at random with every "
        "hub connected. Round trip = publish to the /update/accepted carrying its clientToken.",
        f"Fleet queries: each query runs once right after the fleet changed (the registry "
        f"(re)loads its document cache), then {QUERY_REPEATS} times more; REST adds HTTP on "
        "loopback and JSON of the matching names. The registry row runs in the benchmark's "
        "process on the cloud's SQLite file.",
        f"CPU s: user + system seconds from /proc for the phase. Memory: VmRSS; PSS from "
        f"smaps_rollup. {limits}; the broker inherits it.",
    ]


def _progress(what: str) -> None:
    print(f"  cloud: {what} ...", file=sys.stderr, flush=True)


__all__ = ["run"]
