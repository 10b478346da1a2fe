"""Monitoring kits on the wire: each kit a real MQTT client over mutual TLS to its hub.

Every kit connects with its own certificate (``edgeloop.sim.certs``; its client id is its
kit id), keeps a retained status (online on connect, offline as its last will and when it
stops) and publishes each reading with QoS 1 on its telemetry topic
(``edgeloop.sim.payload``). ``run_kits`` paces a scenario's readings over real time at a
speed factor and hands each to its kit; a kit never has more than ``window`` readings
unacknowledged, so a slow or absent broker slows the run down instead of piling readings
up in memory.

Each kit owns one network thread: it connects, serves the socket, and after a lost
connection reconnects with capped, jittered exponential backoff; readings published
meanwhile are queued by paho and sent (again, with DUP) once the kit is back, so a consumer
sees every sequence number at least once. MQTT 5 by default (a clean start the first time,
then the session resumed for ``SESSION_EXPIRY`` seconds); MQTT 3.1.1 on request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeloop.core.errors import EdgeloopError, PkiError, ValidationError
from edgeloop.sim.generator import HomeSimulator, Pacer, Reading
from edgeloop.sim.payload import (
    DEFAULT_PREFIX,
    check_prefix,
    encode,
    status_payload,
    status_topic,
    telemetry_topic,
)
from edgeloop.sim.scenario import KitSpec, Scenario

log = logging.getLogger(__name__)

DEFAULT_PORT = 8883
SESSION_EXPIRY = 600  # seconds the broker keeps a kit's session across a reconnect
KEEPALIVE = 30
WINDOW = 100  # readings a kit may have unacknowledged
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
Protocol = Literal["5", "3.1.1"]


class KitConnectionError(EdgeloopError):
    """A kit could not connect to its hub's broker; the message says why."""


@dataclass(frozen=True, kw_only=True)
class Broker:
    """The hub broker's address."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_broker(text: str) -> Broker:
    """``host``, ``host:port`` or ``[v6 address]:port``."""
    value = text.strip()
    host, port = value, str(DEFAULT_PORT)
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            host = ""
        port = rest[1:] if rest else port
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(
            f"{text!r} is not HOST:PORT (the hub broker's address, e.g. hub.local:8883)",
            field="--hub",
        )
    return Broker(host=host, port=int(port))


@dataclass(frozen=True, kw_only=True)
class KitTls:
    """What a kit's TLS needs: the CA that signed the broker's certificate, its own pair."""

    ca: Path
    cert: Path
    key: Path
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """A client context that presents the kit's certificate and verifies the broker."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca))
        except (OSError, ssl.SSLError) as err:
            raise PkiError(f"cannot use {self.ca} as the CA: {err}") from err
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as err:
            raise PkiError(f"cannot use {self.cert} with {self.key}: {err}") from err
        ctx.check_hostname = self.check_hostname
        return ctx


@dataclass(frozen=True, kw_only=True)
class KitStatus:
    """A kit's counters at one moment."""

    kit_id: str
    appliance: str
    connected: bool
    sent: int  # readings handed to MQTT
    acked: int  # readings the broker acknowledged (PUBACK) and accepted
    rejected: int  # readings the broker acknowledged with an MQTT 5 failure reason
    rejection: str | None  # the last such reason
    in_flight: int  # sent, not yet acknowledged
    first_seq: int | None
    last_seq: int | None
    label: str
    connects: int
    error: str | None  # why the last connection attempt failed or ended


class KitClient:
    """One kit's MQTT connection and its publishing window."""

    def __init__(
        self,
        kit: KitSpec,
        broker: Broker,
        tls: KitTls,
        *,
        prefix: str = DEFAULT_PREFIX,
        protocol: Protocol = "5",
        window: int = WINDOW,
        rng: Callable[[], float] = random.random,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.kit = kit
        self.broker = broker
        self.prefix = check_prefix(prefix)
        self.window = window
        self._rng = rng
        self._v5 = protocol == "5"
        if self._v5:  # MQTT 5 sets clean start per CONNECT instead (see _run)
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=kit.kit_id, protocol=mqtt.MQTTv5
            )
        else:
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=kit.kit_id,
                protocol=mqtt.MQTTv311,
                clean_session=True,
            )
        self._client.tls_set_context(tls.context())
        self._client.max_inflight_messages_set(window)
        self._client.will_set(
            status_topic(kit.kit_id, prefix), status_payload(kit, online=False), 1, True
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_log = self._on_log
        self._client.on_publish = self._on_publish
        # Only the network thread touches the socket: publish() from the runner queues the
        # packet and wakes the thread, instead of writing from a second thread.
        self._client.on_socket_register_write = lambda *_: None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()  # stop now
        self._leaving = threading.Event()  # stop once the DISCONNECT is out
        self._settled = threading.Event()  # the first attempt ended: connected or failed
        self._lock = threading.Lock()
        # Acknowledgements are matched by message id in on_publish, which may run before
        # publish() has returned the id: such early ones wait in _early.
        self._pending: set[int] = set()  # message ids of readings not yet acknowledged
        self._status_mids: set[int] = set()
        self._early: set[int] = set()
        self._rejected = 0
        self._rejection: str | None = None
        self._connected = False
        self._connack = False  # this attempt got a CONNACK
        self._connects = 0
        self._error: str | None = None
        self._last_log_error: str | None = None
        self._sent = 0
        self._acked = 0
        self._first_seq: int | None = None
        self._last_seq: int | None = None
        self._label = ""

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect; KitConnectionError when the first attempt fails or times out."""
        self._thread = threading.Thread(
            target=self._run, name=f"kit-{self.kit.kit_id}", daemon=True
        )
        self._thread.start()
        if not self._settled.wait(timeout):
            self._stop_thread()
            raise KitConnectionError(
                f"kit {self.kit.kit_id}: no answer from {self.broker} within {timeout:g} s"
            )
        if not self._connected:
            reason = self._error or "the connection ended before the broker accepted the kit"
            self._stop_thread()
            raise KitConnectionError(
                f"kit {self.kit.kit_id} could not connect to {self.broker}: {reason}"
            )

    def close(self, timeout: float = 5.0) -> None:
        """Say offline (retained), disconnect, and stop the network thread."""
        if self._thread is None:
            return
        if self._connected:
            mid = self._publish_status(online=False)
            deadline = time.monotonic() + timeout
            while self._connected and time.monotonic() < deadline:
                with self._lock:
                    if mid not in self._status_mids:
                        break  # acknowledged
                time.sleep(0.01)
            self._leaving.set()
            self._client.disconnect()
            # The network thread writes the DISCONNECT, sees the socket close, and ends.
            self._thread.join(min(2.0, timeout))
        self._stop_thread()

    def _stop_thread(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(5.0)

    # --- publishing --------------------------------------------------------------------

    def publish(self, reading: Reading, stop: threading.Event | None = None) -> bool:
        """Send ``reading`` (QoS 1) once fewer than ``window`` are unacknowledged.

        False when ``stop`` was set while waiting for room (the reading was not sent).
        """
        while self.in_flight() >= self.window:
            if stop is not None and stop.wait(0.002):
                return False
            if stop is None:
                time.sleep(0.002)
        info = self._client.publish(
            telemetry_topic(reading.kit_id, self.prefix), encode(reading), qos=1
        )
        # paho keeps a QoS 1 message published while the kit is offline (its rc then says
        # "not connected") and sends it on reconnect; only a full queue would lose one, and
        # the queue is unbounded here.
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)
            self._sent += 1
            if self._first_seq is None:
                self._first_seq = reading.seq
            self._last_seq = reading.seq
            self._label = reading.label
        return True

    def in_flight(self) -> int:
        """Readings sent and not yet acknowledged."""
        with self._lock:
            return len(self._pending)

    def _publish_status(self, *, online: bool) -> int:
        info = self._client.publish(
            status_topic(self.kit.kit_id, self.prefix),
            status_payload(self.kit, online=online),
            qos=1,
            retain=True,
        )
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._status_mids.add(info.mid)
        return int(info.mid)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            if mid in self._status_mids:
                self._status_mids.discard(mid)
                return
            if mid not in self._pending:
                self._early.add(mid)
                return
            self._pending.discard(mid)
            if getattr(reason, "is_failure", False):
                # MQTT 5: the broker answered, and refused the message (an ACL, say).
                self._rejected += 1
                self._rejection = str(reason)
            else:
                self._acked += 1

    def drain(self, timeout: float) -> bool:
        """Wait until every reading sent is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.in_flight():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def status(self) -> KitStatus:
        """The kit's counters now."""
        in_flight = self.in_flight()
        with self._lock:
            return KitStatus(
                kit_id=self.kit.kit_id,
                appliance=self.kit.appliance,
                connected=self._connected,
                sent=self._sent,
                acked=self._acked,
                rejected=self._rejected,
                rejection=self._rejection,
                in_flight=in_flight,
                first_seq=self._first_seq,
                last_seq=self._last_seq,
                label=self._label,
                connects=self._connects,
                error=self._error,
            )

    # --- the network thread ------------------------------------------------------------

    def _run(self) -> None:
        from paho.mqtt.client import MQTT_ERR_SUCCESS
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties: Any = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY
        failures = 0
        first = True
        while not self._closing.is_set():
            self._connack = False
            self._last_log_error = None
            try:
                if self._v5:
                    self._client.connect(
                        self.broker.host,
                        self.broker.port,
                        keepalive=KEEPALIVE,
                        clean_start=first,
                        properties=properties,
                    )
                else:
                    self._client.connect(self.broker.host, self.broker.port, keepalive=KEEPALIVE)
            except (OSError, ValueError) as err:
                self._error = _describe(err)
            else:
                rc = MQTT_ERR_SUCCESS
                while rc == MQTT_ERR_SUCCESS and not self._closing.is_set():
                    try:
                        rc = self._client.loop(timeout=0.2)
                    except (OSError, ValueError) as err:
                        self._error = _describe(err)
                        break
                if not self._connack and self._error is None:
                    self._error = self._last_log_error or (
                        "the broker closed the connection before accepting the kit; does it "
                        "trust the CA that issued the kit's certificate?"
                    )
            if self._connack:
                first = False
                failures = 0
            self._connected = False
            self._settled.set()
            if self._closing.is_set() or self._leaving.is_set():
                break
            failures += 1
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(failures - 1, 10))
            delay *= 0.5 + self._rng()  # jitter: kits that lost the hub together spread out
            log.info("kit %s: reconnecting in %.1f s (%s)", self.kit.kit_id, delay, self._error)
            self._closing.wait(delay)
        with contextlib.suppress(Exception):
            self._client.disconnect()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._error = f"the broker refused the kit: {reason}"
            self._settled.set()
            return
        self._connack = True
        self._connected = True
        self._connects += 1
        self._error = None
        self._publish_status(online=True)
        self._settled.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected = False
        if getattr(reason, "is_failure", False) and self._error is None:
            self._error = f"disconnected: {reason}"

    def _on_log(self, client: Any, userdata: Any, level: int, message: str) -> None:
        from paho.mqtt.enums import LogLevel

        if level == LogLevel.MQTT_LOG_ERR:
            self._last_log_error = message


def _describe(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return (
            f"the broker's certificate is not trusted: {err.verify_message} "
            "(is --ca the CA that signed it, and does it name the host in --hub?)"
        )
    if isinstance(err, ssl.SSLError):
        return f"TLS failed: {err.reason or err} (does the broker trust the kit's CA?)"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the hub's broker listening there?)"
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err) or type(err).__name__


# --- running a scenario ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunOutcome:
    """How a run ended."""

    stopped: bool  # stopped early (Ctrl-C) rather than at the end of the readings
    simulated_s: float  # simulated time covered, from the scenario's start
    drained: bool  # every reading sent was acknowledged


def run_kits(
    scenario: Scenario,
    clients: Mapping[str, KitClient],
    *,
    speed: float,
    duration_s: float | None = None,
    count: int | None = None,
    stop: threading.Event | None = None,
    tick: Callable[[float], None] | None = None,
    tick_every: float = 0.25,
    drain_timeout: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> RunOutcome:
    """Send the scenario's readings through their kits at ``speed`` * real time.

    Stops after ``duration_s`` simulated seconds or ``count`` readings per kit (never, with
    neither) or when ``stop`` is set; then waits up to ``drain_timeout`` for the acks.
    ``tick(simulated seconds)`` is called about every ``tick_every`` real seconds.
    """
    stop = stop or threading.Event()
    pacer = Pacer(speed, clock=clock)
    home = HomeSimulator(scenario)
    next_tick = clock()
    simulated = 0.0
    stopped = False
    for reading in home.readings(duration_s=duration_s, count=count):
        due_s = (reading.ts_ms - scenario.start_ms) / 1000
        wait = pacer.delay(due_s)
        while wait > 0:
            if stop.wait(min(wait, tick_every)):
                break
            if tick is not None and clock() >= next_tick:
                tick(simulated)
                next_tick = clock() + tick_every
            wait = pacer.delay(due_s)
        if stop.is_set() or not clients[reading.kit_id].publish(reading, stop):
            stopped = True
            break
        simulated = due_s
        if tick is not None and clock() >= next_tick:
            tick(simulated)
            next_tick = clock() + tick_every
    deadline = clock() + drain_timeout
    drained = True
    for client in clients.values():
        drained = client.drain(max(0.0, deadline - clock())) and drained
    if tick is not None:
        tick(simulated)
    return RunOutcome(stopped=stopped, simulated_s=simulated, drained=drained)
