"""Simulated hubs for the cloud benchmark: thousands of MQTT 5 clients over mutual TLS in
one asyncio process, each with its own certificate, driven by the benchmark over a pipe.

Each hub does on the wire what a hub's cloud link does (``edgeloop.edge.cloud_link``):
client id = thing name, clean start 0 with a session expiry, a retained last will and a
retained QoS 1 birth message on ``edgeloop/things/<thing>/connectivity``, shadow updates
on AWS IoT's topics. Nothing else: no agent, no paho, no thread per client.

TLS runs over memory BIOs on a plain asyncio transport, so that one ``SSLContext`` serves
every hub of a worker: the hub's certificate is loaded into it just before its ``SSLObject``
is made, and OpenSSL copies the certificate into the new connection (``SSL_new``), so the
next hub's load does not touch it. This happens in ``connection_made``, with no await
between the load and the wrap. A context per hub would cost a certificate store each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks import _mqtt as mqtt

TIMEOUT = 60.0  # any one hub's wait for an answer
DRAIN = 15.0  # how long, after a phase, answers still outstanding are waited for


@dataclass(frozen=True, kw_only=True)
class HubsSpec:
    """What one worker process simulates, and where the broker is."""

    things: list[str]
    host: str
    port: int
    server_hostname: str
    ca_file: str
    key_file: str  # one key shared by every simulated hub (each has its own certificate)
    cert_dir: str  # <cert_dir>/<thing>.pem
    keepalive: int = 600
    session_expiry: int = 7 * 24 * 3600
    concurrency: int = 64  # operations (connects, updates) in flight at once per worker


class HubError(RuntimeError):
    """A hub could not do what it was asked (refused, timed out, connection lost)."""


class Hub(asyncio.Protocol):
    """One simulated hub's connection: TLS over memory BIOs, then MQTT 5."""

    def __init__(self, worker: Worker, thing: str) -> None:
        self.worker = worker
        self.thing = thing
        self.transport: asyncio.Transport | None = None
        self.tls: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.decoder = mqtt.Decoder()
        self.handshaken = False
        self.closed = False
        self.next_id = 0
        self.last_sent = 0.0
        self.waiter: asyncio.Future[mqtt.Packet] | None = None
        self.expected = 0  # the packet kind the waiter waits for
        self.expected_id = 0

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.worker.open.add(self)
        spec = self.worker.spec
        context = self.worker.context
        # No await between these two lines: see the module docstring.
        context.load_cert_chain(f"{spec.cert_dir}/{self.thing}.pem", spec.key_file)
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=spec.server_hostname
        )
        self._handshake()

    def data_received(self, data: bytes) -> None:
        assert self.tls is not None
        self.incoming.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return
        packets: list[mqtt.Packet] = []
        try:
            while True:
                chunk = self.tls.read(65536)
                if not chunk:
                    self._fail(HubError("the broker closed the TLS session"))
                    return
                packets += self.decoder.feed(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, mqtt.ProtocolError) as err:
            self._fail(HubError(f"{type(err).__name__}: {err}"))
            return
        self._flush()
        for packet in packets:
            self._dispatch(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.worker.connected.discard(self)
        self.worker.open.discard(self)
        self._wake_error(HubError(f"connection lost: {exc or 'closed by the broker'}"))

    # -- TLS -----------------------------------------------------------------------------
    def _handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as err:
            self._flush()
            self._fail(HubError(f"TLS handshake failed: {err}"))
            return
        self.handshaken = True
        self._flush()
        self._connect()

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out and self.transport is not None and not self.closed:
            self.transport.write(out)

    def send(self, packet: bytes) -> None:
        """Write one MQTT packet."""
        if self.closed or self.tls is None:
            raise HubError("not connected")
        self.tls.write(packet)
        self._flush()
        self.last_sent = time.monotonic()

    def _fail(self, err: HubError) -> None:
        self._wake_error(err)
        self.close()

    def close(self) -> None:
        """Drop the connection (no DISCONNECT: the broker sends the will)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.worker.connected.discard(self)
        self.worker.open.discard(self)

    # -- MQTT ----------------------------------------------------------------------------
    def _connect(self) -> None:
        spec = self.worker.spec
        self.send(
            mqtt.connect(
                self.thing,
                keepalive=spec.keepalive,
                clean_start=False,
                session_expiry=spec.session_expiry,
                will_topic=connectivity_topic(self.thing),
                will_payload=b'{"connected":false}',
                will_qos=1,
                will_retain=True,
            )
        )

    def packet_id(self) -> int:
        """The next packet id (1-65535)."""
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def expect(self, kind: int, packet_id: int = 0) -> asyncio.Future[mqtt.Packet]:
        """A future for the next packet of ``kind`` (with ``packet_id``, when given)."""
        waiter: asyncio.Future[mqtt.Packet] = asyncio.get_running_loop().create_future()
        if self.closed:
            waiter.set_exception(HubError("connection lost"))
            return waiter
        self.waiter = waiter
        self.expected, self.expected_id = kind, packet_id
        return waiter

    def _dispatch(self, packet: mqtt.Packet) -> None:
        if packet.kind == mqtt.PUBLISH:
            if packet.qos:
                self.send(mqtt.puback(packet.packet_id))
            self.worker.on_publish(self, packet)
            return
        waiter = self.waiter
        if (
            waiter is not None
            and packet.kind == self.expected
            and (not self.expected_id or packet.packet_id == self.expected_id)
        ):
            self.waiter = None
            if not waiter.done():
                waiter.set_result(packet)

    def _wake_error(self, err: HubError) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)


def connectivity_topic(thing: str) -> str:
    """Where a hub's birth and will go (edgeloop.cloud.service.connectivity_topic)."""
    return f"edgeloop/things/{thing}/connectivity"


def shadow_topic(thing: str, suffix: str) -> str:
    """``$aws/things/<thing>/shadow/<suffix>``."""
    return f"$aws/things/{thing}/shadow/{suffix}"


@dataclass
class Pending:
    """Shadow updates sent and not yet answered, by client token."""

    sent: dict[str, int] = field(default_factory=dict)  # token -> monotonic_ns at send
    latencies: list[int] = field(default_factory=list)  # ns, publish -> /update/accepted
    rejected: int = 0
    waiters: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    all_answered: asyncio.Event = field(default_factory=asyncio.Event)  # set when sent empties


class Worker:
    """Every hub of one process, and the operations the benchmark asks of them."""

    def __init__(self, spec: HubsSpec) -> None:
        self.spec = spec
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=spec.ca_file)
        self.hubs: dict[str, Hub] = {}
        self.connected: set[Hub] = set()  # CONNACK received, connection open
        self.open: set[Hub] = set()  # every connection open, for teardown
        self.pending = Pending()
        self.tokens = 0
        self.errors: list[str] = []

    # -- connect storm -------------------------------------------------------------------
    async def connect_all(self, budget: float) -> dict[str, Any]:
        """Connect every hub and publish its birth; per hub, the CONNACK and PUBACK times."""
        connack: list[int] = []
        birth: list[int] = []

        async def one(thing: str) -> None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(TIMEOUT):
                _, hub = await loop.create_connection(
                    lambda: Hub(self, thing), self.spec.host, self.spec.port
                )
                ack = await hub.expect(mqtt.CONNACK)
                if ack.reason:
                    hub.close()
                    raise HubError(f"CONNACK reason 0x{ack.reason:02x}")
                connack.append(time.monotonic_ns())
                self.hubs[thing] = hub
                self.connected.add(hub)
                birth_doc = {"connected": True, "at": int(time.time() * 1000), "clientId": thing}
                pid = hub.packet_id()
                waiter = hub.expect(mqtt.PUBACK, pid)
                hub.send(
                    mqtt.publish(
                        connectivity_topic(thing),
                        json.dumps(birth_doc, separators=(",", ":")).encode(),
                        qos=1,
                        retain=True,
                        packet_id=pid,
                    )
                )
                ack = await waiter
                if ack.reason >= 0x80:
                    raise HubError(f"birth PUBACK reason 0x{ack.reason:02x}")
                birth.append(time.monotonic_ns())

        failed, late = await self._each(self.spec.things, one, budget)
        return {"connack_ns": connack, "birth_ns": birth, "failed": failed, "late": late}

    # -- one shadow update per hub -------------------------------------------------------
    async def update_all(self, budget: float) -> dict[str, Any]:
        """Each hub subscribes to its shadow's answers, then updates its reported state."""
        subscribed: list[int] = []
        answered: list[int] = []
        before = len(self.pending.latencies)

        async def one(thing: str) -> None:
            hub = self.hubs[thing]
            async with asyncio.timeout(TIMEOUT):
                pid = hub.packet_id()
                waiter = hub.expect(mqtt.SUBACK, pid)
                hub.send(
                    mqtt.subscribe(
                        pid,
                        [
                            (shadow_topic(thing, "update/accepted"), 1),
                            (shadow_topic(thing, "update/rejected"), 1),
                        ],
                    )
                )
                ack = await waiter
                if any(code >= 0x80 for code in ack.reasons):
                    raise HubError(f"SUBACK reasons {ack.reasons.hex()}")
                subscribed.append(time.monotonic_ns())
                await self.update(hub, wait=True)
                answered.append(time.monotonic_ns())

        failed, late = await self._each(list(self.hubs), one, budget)
        unanswered = await self._drain(DRAIN)
        return {
            "unanswered": unanswered,
            "late": late,
            "subscribed_ns": subscribed,
            "answered_ns": answered,
            "latencies_ns": self.pending.latencies[before:],
            "failed": failed,
        }

    async def update(self, hub: Hub, *, wait: bool) -> None:
        """Publish one reported-state update (QoS 1); with ``wait``, until it is accepted."""
        self.tokens += 1
        token = f"{hub.thing}-{self.tokens}"
        doc = {
            "state": {"reported": {"temperature": round(random.uniform(15, 30), 2), "seq": 1}},
            "clientToken": token,
        }
        waiter: asyncio.Future[None] | None = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            self.pending.waiters[token] = waiter
        self.pending.sent[token] = time.monotonic_ns()
        hub.send(
            mqtt.publish(
                shadow_topic(hub.thing, "update"),
                json.dumps(doc, separators=(",", ":")).encode(),
                qos=1,
                packet_id=hub.packet_id(),
            )
        )
        if waiter is not None:
            try:
                await waiter
            finally:
                self.pending.waiters.pop(token, None)

    def on_publish(self, hub: Hub, packet: mqtt.Packet) -> None:
        """A shadow answer: match it to its update by client token."""
        now = time.monotonic_ns()
        if not packet.topic.startswith("$aws/"):
            return
        try:
            token = json.loads(packet.payload).get("clientToken")
        except ValueError:
            return
        sent = self.pending.sent.pop(token, None) if isinstance(token, str) else None
        if sent is None:
            return
        if not self.pending.sent:
            self.pending.all_answered.set()
        accepted = packet.topic.endswith("/accepted")
        if accepted:
            self.pending.latencies.append(now - sent)
        else:
            self.pending.rejected += 1
            self.errors.append(f"{hub.thing}: rejected {packet.payload[:200]!r}")
        waiter = self.pending.waiters.pop(token, None)
        if waiter is not None and not waiter.done():
            if accepted:
                waiter.set_result(None)
            else:
                waiter.set_exception(HubError("update rejected"))

    # -- paced updates -------------------------------------------------------------------
    async def paced(self, rate: float, seconds: float, seed: int) -> dict[str, Any]:
        """Updates from random hubs at ``rate`` per second for ``seconds``; their latencies."""
        rng = random.Random(seed)
        hubs = [hub for hub in self.hubs.values() if not hub.closed]
        before = len(self.pending.latencies)
        rejected = self.pending.rejected
        count = int(rate * seconds)
        start = time.monotonic()
        for index in range(count):
            wait = start + index / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            hub = rng.choice(hubs)
            with contextlib.suppress(HubError):
                await self.update(hub, wait=False)
        unanswered = await self._drain(DRAIN)
        return {
            "sent": count,
            "latencies_ns": self.pending.latencies[before:],
            "rejected": self.pending.rejected - rejected,
            "unanswered": unanswered,
            "send_seconds": time.monotonic() - start,
        }

    async def _drain(self, seconds: float) -> int:
        """Wait up to ``seconds`` for every update sent to be answered; how many were not
        (those are then forgotten, so a late answer is not counted later)."""
        if self.pending.sent:
            self.pending.all_answered.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.pending.all_answered.wait()
        unanswered = len(self.pending.sent)
        self.pending.sent.clear()
        return unanswered

    # -- keepalive and teardown ----------------------------------------------------------
    async def keepalive(self) -> None:
        """PINGREQ from every hub that has sent nothing for half its keepalive."""
        half = self.spec.keepalive / 2
        while True:
            await asyncio.sleep(min(30.0, half / 2))
            idle = time.monotonic() - half
            for hub in list(self.connected):
                if hub.last_sent < idle:
                    with contextlib.suppress(HubError):
                        hub.send(mqtt.PINGREQ_PACKET)

    async def disconnect_all(self) -> dict[str, Any]:
        """DISCONNECT (normal: the broker drops the will) and close every hub."""
        hubs = list(self.open)
        for hub in hubs:
            if hub.handshaken:
                with contextlib.suppress(HubError):
                    hub.send(mqtt.DISCONNECT_PACKET)
            hub.close()
        await asyncio.sleep(0.2)
        self.hubs.clear()
        return {"closed": len(hubs)}

    async def _each(
        self, things: list[str], one: Callable[[str], Any], budget: float
    ) -> tuple[int, int]:
        """Run ``one(thing)`` for every thing, ``concurrency`` at a time, for at most
        ``budget`` seconds; how many failed, and how many were not done in time."""
        queue = iter(things)
        failed = done = 0

        async def lane() -> None:
            nonlocal failed, done
            for thing in queue:
                try:
                    await one(thing)
                    done += 1
                except (OSError, HubError, TimeoutError) as err:
                    failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(f"{thing}: {type(err).__name__}: {err}")

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget), asyncio.TaskGroup() as group:
                for index in range(min(self.spec.concurrency, len(things))):
                    group.create_task(lane(), name=f"lane-{index}")
        return failed, len(things) - done - failed


def _usage() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "rss_kb": float(rss)}


def serve(conn: Connection, spec: HubsSpec) -> None:
    """A worker process's main: run the commands the benchmark sends until "exit"."""
    asyncio.run(_serve(conn, spec))


async def _serve(conn: Connection, spec: HubsSpec) -> None:
    worker = Worker(spec)
    pinger = asyncio.create_task(worker.keepalive(), name="keepalive")
    try:
        conn.send({"ready": True, **_usage()})
        while True:
            command, args = await asyncio.to_thread(conn.recv)
            if command == "exit":
                return
            before = _usage()
            worker.errors.clear()
            if command == "connect":
                result = await worker.connect_all(**args)
            elif command == "update":
                result = await worker.update_all(**args)
            elif command == "paced":
                result = await worker.paced(**args)
            elif command == "disconnect":
                result = await worker.disconnect_all()
            elif command == "usage":
                result = {}
            else:
                raise ValueError(f"unknown command {command!r}")
            after = _usage()
            result.update(
                cpu_s=after["cpu_s"] - before["cpu_s"],
                rss_kb=after["rss_kb"],
                errors=list(worker.errors[:20]),
                connected=len(worker.connected),
            )
            conn.send(result)
    finally:
        pinger.cancel()
        for hub in list(worker.open):
            hub.close()


__all__ = ["Hub", "HubError", "HubsSpec", "Worker", "serve"]
