"""The hub's exporters: each spool stream to the cloud's lake, by its policy (``export_config``).

Two workers, so that an alert never waits behind a bulk upload: one serves the ``mqtt``
streams (a small batch a message, QoS 1, over the hub's ``CloudLink``), the other the
``batch`` streams (gzipped batches POSTed to ``/api/v1/things/{thing}/telemetry`` with an
``Idempotency-Key``). Each worker sends one batch at a time, always from the
highest-priority stream that has one due (``priority`` 1 first, as the spool orders them).

What is committed when (the spool forgets a record only once it is committed):

- a record is committed after the cloud has it: its batch answered ``200`` (the lake has
  stored it, or already held it), or the cloud's broker acknowledged (PUBACK) the message
  holding it — the cloud stores a telemetry message before it takes it off its broker
  session (``edgeloop.cloud.lake_mqtt``). Exporters read only fsynced records, so the
  cloud never holds a record a power cut could take from the hub;
- a crash or restart resumes from the committed cursor: what was in flight is sent again
  (the same batch, read again from the cursor, gets the same ``Idempotency-Key``, and the
  cloud answers it as the first time); the lake keeps each ``(thing, stream, sequence)``
  once either way, and each kit reading once by ``(kit, kit_seq)``.

What is never dropped, only delayed: the cloud away or failing (connection refused, a
timeout, TLS, ``5xx``, ``408``, ``429``, ``409``, the MQTT link down or no PUBACK) makes the
stream wait and retry with capped, jittered backoff (``retry_max_seconds``; a
``Retry-After`` is honoured). Refusals that are about the hub rather than the batch
(``401``, ``403``, ``404``: its certificate, its thing) block the stream the same way, with
the reason in ``edgeloop device streams``: dead-lettering every record for them would
empty the stream for a configuration error. (The spool's own limits still apply while a
stream waits: size with its full policy, and time to live.)

What is dead-lettered, and why: a batch the cloud refuses for its content (``400``, ``413``,
``422``), or that the hub cannot encode (a payload over 64 KiB), is split in halves (at the
record the refusal names, when it names one: ``records[7]``) and each part sent on its
own, down to single records; a record refused on its own goes to the ``dead-letter``
stream with the cloud's reason, and the rest of the batch goes through. One poison record
never blocks its stream. A dead letter is fsynced before the commit passes it (the
spool's promise); when the dead-letter stream is full, the stream waits instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote

from edgeloop.core.errors import EdgeloopError, ValidationError
from edgeloop.core.telemetry import (
    Record,
    TelemetryBatch,
    encode_batch,
    idempotency_key,
    telemetry_topic,
)
from edgeloop.edge.export_config import ExportPolicy, ExportVia, policy_for
from edgeloop.edge.spool import Spool, Stream, StreamFullError
from edgeloop.edge.spool_segment import Record as SpoolRecord

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Exporter",
    "HttpsTransport",
    "MqttTransport",
    "Outcome",
    "RetryLater",
    "StreamExporter",
    "backoff",
    "deliver",
]

log = logging.getLogger("edgeloop.exporter")

API_PREFIX = "/api/v1"
POLL_MQTT = 0.05  # seconds between looks for new records of mqtt streams (an fsync: 50 ms)
POLL_BATCH = 0.5  # seconds between looks at batch streams' thresholds
OFFLINE_WAIT = 1.0  # seconds between looks at a cloud link that is down
PUBACK_TIMEOUT = 30.0
_MIN_BACKOFF = 0.5
# Refusals of a batch's content: bisect. Anything else that is not 2xx: wait and retry.
_CONTENT_REFUSALS = frozenset({400, 413, 422})
_RECORD_FIELD = re.compile(r"^records\[(\d+)\]")


# -- outcomes and bisection (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one attempt to send a batch."""

    kind: Literal["ok", "refused", "retry"]
    reason: str = ""
    index: int | None = None  # the record a refusal names (``records[i]``), if it names one
    retry_after: float | None = None  # seconds the cloud asked the hub to wait
    counts: dict[str, int] = field(default_factory=dict)  # the lake's answer, when given

    @classmethod
    def refused(cls, reason: str, field_name: str | None = None) -> Outcome:
        """A refusal of the batch's content; ``field_name`` may name a record."""
        match = _RECORD_FIELD.match(field_name or "")
        return cls("refused", reason, index=int(match.group(1)) if match else None)


class RetryLater(Exception):
    """The cloud cannot take the batch now; nothing was dropped."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


Send = Callable[[Sequence[Record]], Awaitable[Outcome]]
DeadLetter = Callable[[Record, str], Awaitable[None]]


@dataclass
class Delivery:
    """What one batch's delivery did."""

    sends: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # the lake's counts, summed


async def deliver(
    records: Sequence[Record], send: Send, dead_letter: DeadLetter, into: Delivery | None = None
) -> Delivery:
    """Deliver ``records``: send them, and when the batch is refused for its content,
    bisect down to the records refused on their own, which ``dead_letter`` takes with the
    reason. Raises ``RetryLater`` as soon as an attempt says the cloud cannot take it now
    (parts delivered before are delivered: sending them again is harmless)."""
    done = into if into is not None else Delivery()
    if not records:
        return done
    outcome = await send(records)
    done.sends += 1
    if outcome.kind == "ok":
        done.delivered += len(records)
        for key, value in outcome.counts.items():
            done.counts[key] = done.counts.get(key, 0) + value
        return done
    if outcome.kind == "retry":
        raise RetryLater(outcome.reason, outcome.retry_after)
    if len(records) == 1:
        await dead_letter(records[0], outcome.reason)
        done.dead_lettered += 1
        return done
    at = outcome.index
    if at is not None and 0 <= at < len(records):
        parts = [records[:at], records[at : at + 1], records[at + 1 :]]
    else:
        half = len(records) // 2
        parts = [records[:half], records[half:]]
    for part in parts:
        await deliver(part, send, dead_letter, done)
    return done


def backoff(failures: int, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``failures`` failed attempts in a row: exponential from 0.5 s,
    capped at ``cap``, jittered over its upper half (hubs that lost the cloud together do
    not all return together)."""
    ceiling = min(max(cap, _MIN_BACKOFF), _MIN_BACKOFF * 2.0 ** min(max(failures - 1, 0), 20))
    return ceiling / 2 + rng() * ceiling / 2


def encode(batch: TelemetryBatch) -> tuple[bytes, str]:
    """The batch's gzipped bytes and its idempotency key (CPU work: run it in a thread)."""
    return encode_batch(batch), idempotency_key(batch)


# -- transports ----------------------------------------------------------------------------


class Transport(Protocol):
    """Moves one encoded batch to the cloud."""

    def ready(self) -> str | None:
        """Why nothing can be sent now (the link is down), or None."""

    async def send(self, batch: TelemetryBatch, body: bytes, key: str) -> Outcome:
        """Send one batch; never raises for what the cloud or the network did."""

    async def close(self) -> None:
        """Let go of connections."""


class AckedPublisher(Protocol):
    """What the MQTT transport needs of ``edgeloop.edge.cloud_link.CloudLink``."""

    @property
    def connected(self) -> bool:
        """Whether the broker has the hub's connection now."""

    async def publish_acked(self, topic: str, payload: bytes, *, timeout: float = ...) -> None:
        """QoS 1; returns once the broker acknowledged; ``EdgeloopError`` otherwise."""


class MqttTransport:
    """One batch a message on ``edgeloop/things/{thing}/telemetry/{stream}``, QoS 1."""

    def __init__(self, link: AckedPublisher, *, timeout: float = PUBACK_TIMEOUT) -> None:
        self.link = link
        self.timeout = timeout

    def ready(self) -> str | None:
        return None if self.link.connected else "the hub is offline from the cloud's broker"

    async def send(self, batch: TelemetryBatch, body: bytes, key: str) -> Outcome:
        topic = telemetry_topic(batch.thing, batch.stream)
        try:
            await self.link.publish_acked(topic, body, timeout=self.timeout)
        except EdgeloopError as err:
            return Outcome("retry", str(err))
        return Outcome("ok")

    async def close(self) -> None:
        return None


class HttpsTransport:
    """``POST /api/v1/things/{thing}/telemetry`` with the hub's certificate (over https)."""

    def __init__(
        self,
        api: str,
        thing: str,
        *,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = 120.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        import httpx

        self.url = f"{api.rstrip('/')}{API_PREFIX}/things/{quote(thing, safe='')}/telemetry"
        if client is None:
            verify: ssl.SSLContext | bool = True
            if api.startswith("https:") and ca is not None:
                verify = ssl.create_default_context(cafile=str(ca))
                if cert is not None:
                    verify.load_cert_chain(str(cert), str(key) if key is not None else None)
            client = httpx.AsyncClient(
                verify=verify,
                timeout=httpx.Timeout(timeout, connect=10.0),
                limits=httpx.Limits(max_connections=2),
            )
        self.client = client

    def ready(self) -> str | None:
        return None

    async def send(self, batch: TelemetryBatch, body: bytes, key: str) -> Outcome:
        import httpx

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "gzip",
            "Idempotency-Key": key,
        }
        try:
            answer = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as err:
            return Outcome("retry", f"cannot reach the cloud's API: {_describe(err)}")
        status = answer.status_code
        message, field_name = _error_of(answer)
        if 200 <= status < 300:
            counts = _counts(answer)
            return Outcome("ok", counts=counts)
        if status in _CONTENT_REFUSALS:
            where = f" {field_name}" if field_name else ""
            return Outcome.refused(
                f"the cloud refused it (HTTP {status}{where}): {message}", field_name
            )
        retry_after = _retry_after(answer.headers.get("Retry-After"))
        return Outcome(
            "retry", f"the cloud answered HTTP {status}: {message}", retry_after=retry_after
        )

    async def close(self) -> None:
        await self.client.aclose()


def _error_of(answer: httpx.Response) -> tuple[str, str | None]:
    try:
        body = answer.json()
    except ValueError:
        return answer.reason_phrase or answer.text[:200], None
    if isinstance(body, dict):
        message = body.get("message")
        field_name = body.get("field")
        return (
            str(message) if message is not None else answer.reason_phrase,
            str(field_name) if isinstance(field_name, str) else None,
        )
    return answer.reason_phrase, None


def _counts(answer: httpx.Response) -> dict[str, int]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    return {
        key: int(body[key])
        for key in ("accepted", "duplicates", "quarantined")
        if isinstance(body.get(key), int)
    }


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    return None  # an HTTP date: the backoff decides


def _describe(err: Exception) -> str:
    if _refused(err):
        return "connection refused (is the cloud up?)"
    return str(err) or type(err).__name__


def _refused(err: BaseException | None, depth: int = 0) -> bool:
    """Whether a connection refusal is behind ``err`` (anyio wraps it in a group)."""
    if err is None or depth > 8:
        return False
    if isinstance(err, ConnectionRefusedError):
        return True
    if isinstance(err, BaseExceptionGroup):
        return any(_refused(inner, depth + 1) for inner in err.exceptions)
    return _refused(err.__cause__ or err.__context__, depth + 1)


# -- one stream ----------------------------------------------------------------------------


class StreamExporter:
    """One stream's export: what is due, the batch in flight, failures and counters."""

    def __init__(
        self,
        stream: Stream,
        policy: ExportPolicy,
        thing: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.stream = stream
        self.policy = policy
        self.thing = thing
        self.name = stream.name
        self.priority = stream.config.priority
        self._clock = clock
        self._wall = wall
        self._rng = rng
        self.state = "off" if policy.policy is ExportVia.OFF else "idle"
        self.flushing = False  # a batch stream sends all it has, once due
        self.failures = 0
        self.next_attempt = 0.0
        self.last_error: str | None = None
        self.last_export_at: float | None = None
        self.batches = 0
        self.sends = 0
        self.records = 0
        self.bytes_sent = 0
        self.dead_lettered = 0
        self.duplicates = 0
        self.quarantined = 0

    def due(self, now: float) -> bool:
        """Whether a batch should go now (an mqtt stream: whenever records wait)."""
        if now < self.next_attempt:
            return False
        if self.policy.policy is ExportVia.MQTT or self.flushing:
            return True
        metrics = self.stream.metrics()
        if metrics.pending == 0:
            return False
        policy = self.policy
        age = metrics.oldest_pending_age
        return (
            metrics.pending >= policy.records_per_batch
            or metrics.pending_bytes >= policy.bytes_per_batch
            or (age is not None and age >= policy.interval_seconds)
        )

    async def read(self) -> list[SpoolRecord]:
        """The next batch after the committed cursor (fsynced records only)."""
        size, limit = self.policy.records_per_batch, self.policy.bytes_per_batch
        if self.policy.policy is ExportVia.MQTT:
            return self.stream.read_batch(size, limit)
        return await asyncio.to_thread(self.stream.read_batch, size, limit)

    async def export_one(self, transport: Transport) -> bool:
        """Send the next batch and commit it; whether there was one."""
        try:
            records = await self.read()
        except EdgeloopError as err:
            self._failed(f"cannot read the stream: {err}", None)
            return False
        if not records:
            self.flushing = False
            if self.state in ("sending", "idle"):
                self.state = "idle"
            return False
        self.state = "sending"
        wire = [Record(r.sequence, r.timestamp_ms * 1000, r.payload) for r in records]
        try:
            done = await deliver(wire, self._sender(transport), self._dead_letter)
            self.stream.commit(records[-1].sequence)
        except RetryLater as err:
            self._failed(err.reason, err.retry_after)
            return True
        except (EdgeloopError, OSError) as err:
            self._failed(str(err), None)
            return True
        if self.failures:
            log.info(
                "stream %s: exporting again after %d failed attempt(s)", self.name, self.failures
            )
        self.failures = 0
        self.last_error = None
        self.next_attempt = 0.0
        self.state = "idle"
        self.last_export_at = self._wall()
        self.batches += 1
        self.records += done.delivered
        self.duplicates += done.counts.get("duplicates", 0)
        self.quarantined += done.counts.get("quarantined", 0)
        if self.policy.policy is ExportVia.BATCH:
            # A short batch means the stream is drained: wait for the next trigger.
            full = len(records) >= self.policy.records_per_batch
            self.flushing = full or sum(len(r.payload) for r in records) >= (
                self.policy.bytes_per_batch * 0.9
            )
        return True

    def waiting_for_link(self, reason: str) -> None:
        """The transport is down: nothing can go now (not a failure of this stream)."""
        if self.state != "off":
            self.state = "offline"
            self.last_error = reason

    def _sender(self, transport: Transport) -> Send:
        async def send(records: Sequence[Record]) -> Outcome:
            batch = TelemetryBatch(self.thing, self.name, tuple(records))
            try:
                body, key = await asyncio.to_thread(encode, batch)
            except ValidationError as err:
                return Outcome.refused(
                    f"the hub cannot encode it ({err.field}): {err.reason}", err.field
                )
            self.sends += 1
            outcome = await transport.send(batch, body, key)
            if outcome.kind == "ok":
                self.bytes_sent += len(body)
            return outcome

        return send

    async def _dead_letter(self, record: Record, reason: str) -> None:
        kept = SpoolRecord(record.sequence, record.timestamp_us // 1000, record.payload)
        try:
            await self.stream.adead_letter(kept, reason)
        except StreamFullError as err:
            raise RetryLater(f"a record was refused ({reason}), but {err}") from err
        except ValidationError:
            # Too large for the dead-letter stream's segments: keep its head and say so.
            cut = kept.payload[: 32 * 1024]
            note = f"{reason} (payload cut from {len(kept.payload)} to {len(cut)} bytes)"
            await self.stream.adead_letter(SpoolRecord(kept.sequence, kept.timestamp_ms, cut), note)
        self.dead_lettered += 1
        log.warning("stream %s: record %d dead-lettered: %s", self.name, record.sequence, reason)

    def _failed(self, reason: str, retry_after: float | None) -> None:
        self.failures += 1
        delay = backoff(self.failures, self.policy.retry_max_seconds, self._rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.policy.retry_max_seconds))
        self.next_attempt = self._clock() + delay
        if reason != self.last_error:
            log.warning(
                "stream %s: export failed (%s); retrying in %.1f s, nothing dropped",
                self.name,
                reason,
                delay,
            )
        self.last_error = reason
        self.state = "retrying"

    def status(self) -> dict[str, Any]:
        """For ``edgeloop device streams`` (camelCase, as the agent's other answers)."""
        wait = self.next_attempt - self._clock()
        return {
            "policy": self.policy.policy.value,
            "state": self.state,
            "batches": self.batches,
            "sends": self.sends,
            "records": self.records,
            "bytesSent": self.bytes_sent,
            "deadLettered": self.dead_lettered,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
            "lastExportAt": self.last_export_at,
            "lastError": self.last_error,
            "failures": self.failures,
            "retryIn": round(wait, 1) if wait > 0 and self.state == "retrying" else None,
        }


# -- the exporter --------------------------------------------------------------------------


class Exporter:
    """Every stream of a spool exported by its policy, from two workers (see the module)."""

    def __init__(
        self,
        spool: Spool,
        policies: tuple[ExportPolicy, ...],
        thing: str,
        *,
        mqtt: Transport | None,
        https: Transport | None,
        no_https_reason: str = "the hub has no cloud API address (set cloud.api in agent.json)",
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        poll_mqtt: float = POLL_MQTT,
        poll_batch: float = POLL_BATCH,
    ) -> None:
        self.spool = spool
        self.thing = thing
        self._clock = clock
        self._transports: dict[ExportVia, Transport | None] = {
            ExportVia.MQTT: mqtt,
            ExportVia.BATCH: https,
        }
        self._polls = {ExportVia.MQTT: poll_mqtt, ExportVia.BATCH: poll_batch}
        self.streams: dict[str, StreamExporter] = {}
        for stream in spool.streams:  # export order: priority, then name
            policy = policy_for(policies, stream.name)
            self.streams[stream.name] = StreamExporter(stream, policy, thing, clock=clock, rng=rng)
            if policy.policy is ExportVia.BATCH and https is None:
                self.streams[stream.name].state = "blocked"
                self.streams[stream.name].last_error = no_https_reason
            if policy.policy is ExportVia.MQTT and mqtt is None:
                self.streams[stream.name].state = "blocked"
                self.streams[stream.name].last_error = "the hub has no cloud connection"
        self._tasks: list[asyncio.Task[None]] = []

    def _serving(self, via: ExportVia) -> list[StreamExporter]:
        return [s for s in self.streams.values() if s.policy.policy is via]

    async def start(self) -> None:
        """Start a worker for each policy some stream has and a transport serves."""
        for via in (ExportVia.MQTT, ExportVia.BATCH):
            transport = self._transports[via]
            streams = self._serving(via)
            if transport is not None and streams:
                self._tasks.append(
                    asyncio.create_task(self._work(via, transport, streams), name=f"export-{via}")
                )

    async def stop(self) -> None:
        """Stop the workers (a batch in flight is sent again at the next start) and close
        the transports."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for transport in self._transports.values():
            if transport is not None:
                with contextlib.suppress(Exception):
                    await transport.close()

    async def _work(
        self, via: ExportVia, transport: Transport, streams: list[StreamExporter]
    ) -> None:
        poll = self._polls[via]
        while True:
            try:
                await self._round(transport, streams, poll)
            except asyncio.CancelledError:
                raise
            except Exception:  # the worker must outlive any one failure
                log.exception("the %s exporter failed; going on", via.value)
                await asyncio.sleep(1.0)

    async def _round(
        self, transport: Transport, streams: list[StreamExporter], poll: float
    ) -> None:
        """Send one batch from the first stream (in priority order) with one due, or wait."""
        down = transport.ready()
        if down is not None:
            for stream in streams:
                stream.waiting_for_link(down)
            await asyncio.sleep(OFFLINE_WAIT)
            return
        now = self._clock()
        wake = now + poll
        for stream in streams:
            if stream.state == "offline":
                stream.state, stream.last_error = "idle", None
            if not stream.due(now):
                if stream.next_attempt > now:
                    wake = min(wake, stream.next_attempt)
                continue
            if await stream.export_one(transport):
                return  # sent (or failed): look again from the top, priorities first
        await asyncio.sleep(max(0.0, wake - self._clock()))

    def status(self, stream: str) -> dict[str, Any] | None:
        """One stream's export status, or None for a stream the exporter does not know."""
        exporter = self.streams.get(stream)
        return exporter.status() if exporter is not None else None
