"""Appliance simulator benchmarks: how much faster than real time readings are made and sent.

Generation: a simulated day of a home with the four appliance kinds (furnace and fridge
sampled every 10 s, washer and pump every 5 s: 51,840 readings), healthy and with every
fault mode injected, per appliance kind, and the cost of the JSON telemetry payload.
Sending: the same home's kits as MQTT clients with their own certificates, publishing as
fast as the broker acknowledges (QoS 1) to a Mosquitto on loopback that requires client
certificates — the path ``edgeloop sim kits --speed 0`` takes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from benchmarks._report import Result, Samples, SuiteResult, Target
from edgeloop.sim.certs import kit_identities
from edgeloop.sim.generator import HomeSimulator, KitSimulator
from edgeloop.sim.kits import Broker, KitClient, KitTls, run_kits
from edgeloop.sim.models import APPLIANCES, FAULTS
from edgeloop.sim.payload import encode
from edgeloop.sim.scenario import KitSpec, Scenario, home, parse_scenario

DAY_S = 86400.0
RUNS = 3
DAY_TARGET_S = 10.0  # a simulated day of a four-appliance home, made in at most this
SEND_PER_KIT = 2500  # readings per kit in the MQTT row
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _time(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def _all_faults_scenario() -> dict[str, object]:
    kits = []
    for kind in APPLIANCES:
        faults = [
            {"fault": name, "at": "2h", "ramp": "6h", "severity": 0.7}
            for name, mode in FAULTS.items()
            if kind in mode.applies_to
        ]
        kits.append({"id": f"{kind}-1", "appliance": kind, "faults": faults})
    return {"seed": 1, "kits": kits}


def bench_generation(out: SuiteResult) -> None:
    healthy = home(["furnace", "fridge", "washer", "pump"], seed=1)
    readings = sum(round(DAY_S * 1000 / k.interval_ms) for k in healthy.kits)

    def day(scenario: Scenario) -> None:
        for _ in HomeSimulator(scenario).readings(duration_s=DAY_S):
            pass

    samples = Samples(values=[_time(lambda: day(healthy)) for _ in range(RUNS)])
    rate = readings / samples.median
    out.results.append(
        Result(
            benchmark=f"generate a simulated day, 4 appliances ({readings:,} readings)",
            measured=samples.describe(),
            value=samples.max,
            target=Target(limit=DAY_TARGET_S, unit="s"),
            comparison=f"{rate:,.0f} readings/s; {DAY_S / samples.median:,.0f}x real time",
        )
    )
    faulty = parse_scenario(_all_faults_scenario())
    injections = sum(len(k.faults) for k in faulty.kits)
    faulty_samples = Samples(values=[_time(lambda: day(faulty)) for _ in range(RUNS)])
    out.results.append(
        Result(
            benchmark=f"the same day with every fault mode injected ({injections} injections)",
            measured=faulty_samples.describe(),
            comparison=f"{readings / faulty_samples.median:,.0f} readings/s; "
            f"{faulty_samples.median / samples.median:.2f}x the healthy day's time",
        )
    )
    for kit in healthy.kits:
        count = round(DAY_S * 1000 / kit.interval_ms)

        def batch(kit: KitSpec = kit, count: int = count) -> None:
            KitSimulator(kit, seed=1, start_ms=healthy.start_ms).batch(count)

        kind_samples = Samples(values=[_time(batch) for _ in range(RUNS)])
        out.results.append(
            Result(
                benchmark=f"one {kit.appliance} kit, a day as arrays ({count:,} readings)",
                measured=kind_samples.describe(),
                comparison=f"{count / kind_samples.median:,.0f} readings/s",
            )
        )
    sample = list(HomeSimulator(healthy).readings(count=5000))
    encode_s = Samples(values=[_time(lambda: [encode(r) for r in sample]) for _ in range(RUNS)])
    size = sum(len(encode(r)) for r in sample) / len(sample)
    out.results.append(
        Result(
            benchmark="encode a reading as its JSON telemetry payload",
            measured=f"{encode_s.median / len(sample) * 1e6:.1f} µs per reading",
            comparison=f"{size:.0f} bytes on average",
        )
    )


def bench_sending(out: SuiteResult) -> None:
    if not Path(MOSQUITTO).exists():
        out.notes.append("kits over MQTT not measured: mosquitto is not installed (make setup)")
        return
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-sim-") as tmp:
        folder = Path(tmp)
        ca, ca_key = _ca(folder)
        cert, key = _server(folder, ca, ca_key)
        port = _free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    *(["user root"] if os.geteuid() == 0 else []),
                    "persistence false",
                    f"listener {port} 127.0.0.1",
                    f"cafile {ca}",
                    f"certfile {cert}",
                    f"keyfile {key}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "",
                ]
            )
        )
        proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _wait_port(port)
            scenario = home(["furnace", "fridge", "washer", "pump"], seed=1)
            identities = kit_identities(
                [k.kit_id for k in scenario.kits], folder / "certs", ca_cert=ca, ca_key=ca_key
            )
            clients = {
                kit.kit_id: KitClient(
                    kit,
                    Broker(host="127.0.0.1", port=port),
                    KitTls(ca=ca, cert=ident.cert, key=ident.key),
                    prefix="bench/kits",
                )
                for kit, ident in zip(scenario.kits, identities, strict=True)
            }
            for client in clients.values():
                client.start()
            try:
                started = time.perf_counter()
                outcome = run_kits(scenario, clients, speed=0, count=SEND_PER_KIT)
                elapsed = time.perf_counter() - started
            finally:
                for client in clients.values():
                    client.close()
        finally:
            proc.terminate()
            proc.wait(10)
    acked = sum(c.status().acked for c in clients.values())
    out.results.append(
        Result(
            benchmark=f"4 kits over mutual TLS to Mosquitto, QoS 1, as fast as acked "
            f"({acked:,} readings)",
            measured=f"{acked / elapsed:,.0f} readings/s acknowledged",
            comparison=f"{outcome.simulated_s / elapsed:,.0f}x real time for this home "
            f"({'all' if outcome.drained else 'NOT all'} acknowledged)",
        )
    )


def run(out: SuiteResult) -> None:
    """Run the simulator benchmarks, adding rows to ``out``."""
    bench_generation(out)
    bench_sending(out)
    out.notes += [
        f"Generation rows: {RUNS} runs each, in this process; the verdict uses the slowest.",
        "Generation is single-threaded pure Python over numpy random blocks; a kit's cost "
        "is mostly its physics step and the reading's dict.",
        f"The MQTT row sends {SEND_PER_KIT:,} readings per kit with a window of 100 "
        "unacknowledged per kit; generation, TLS and the broker share the machine.",
    ]


# --- a throwaway PKI for the broker ------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "ca.key").write_bytes(_key_pem(key))
    return folder / "ca.pem", folder / "ca.key"


def _server(folder: Path, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    issuer = x509.load_pem_x509_certificate(ca.read_bytes()).subject
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench broker")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(_key_pem(key))
    return folder / "server.pem", folder / "server.key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


__all__ = ["run"]
