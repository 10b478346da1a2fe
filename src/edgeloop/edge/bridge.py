"""The hub's MQTT bridge: moves messages between the kits' broker, local IPC, the cloud and
the durable spool, as Greengrass's ``aws.greengrass.clientdevices.mqtt.Bridge`` does.

Its mappings are ``agent.json``'s ``bridge`` section (``edgeloop.edge.bridge_config``)::

    "bridge": {"mqttTopicMapping": {
      "KitsToStream": {"topic": "kits/+/telemetry", "source": "LocalMqtt",
                       "target": "Stream:telemetry"},
      "KitsToComponents": {"topic": "kits/+/telemetry", "source": "LocalMqtt",
                           "target": "Pubsub", "targetTopicPrefix": "hub/"}}}

What the bridge guarantees, from a kit's PUBACK on (LocalMqtt sources):

- The bridge is an MQTT 5 client of the hub broker's loopback listener with a persistent
  session (clean start 0, a session that never expires) and QoS 1 subscriptions, and it
  acknowledges by hand: a message's PUBACK goes to the broker only once every target has
  it — Pubsub published, IotCore handed to the cloud link (or the message dead-lettered),
  and, for ``Stream:`` targets, the record appended **and fsynced** (group commit, ≤ 50 ms).
  So a reading acknowledged to the broker survives kill -9 of the agent and a power cut;
  one not yet acknowledged is redelivered by the broker after the agent or the broker
  restarts (the broker keeps it in its saved session). Acks go out in arrival order.
- A full stream (``reject-new``) or a failing disk is not a reason to drop: the bridge
  retries the message with backoff and acknowledges nothing after it meanwhile, so the
  broker holds the rest (``device status`` shows the bridge blocked, and why).
- Redeliveries it can see are dropped once: readings carry ``(kit, kit_seq)``, and the
  bridge remembers the last 4,096 ``kit_seq`` of each kit — rebuilt at start from the last
  records of its streams — and counts the repeats as duplicates. What it cannot see (a
  redelivery older than that, or one whose copy the exporter has already committed) is
  stored again; the cloud's lake keeps each ``(thing, kit, kit_seq)`` once, the final
  guard. Streams therefore hold every acknowledged reading at least once, in each kit's
  order of arrival.
- A message a ``Stream:`` target cannot take — not a reading (``edgeloop.core.telemetry``),
  or a reading naming another kit than the one whose topic it came on (``PREFIX/<kit>/…``,
  the ACL's guarantee) — goes to the ``dead-letter`` stream with the reason, the target
  stream's name and sequence 0 (it never had one), and is then acknowledged. So does a
  message the cloud link refuses for an ``IotCore`` target (offline and its queue full).
- Pubsub is best effort, as Greengrass's: a subscriber too slow for its queue loses the
  oldest messages (counted by the IPC router). A redelivery the bridge did not recognise
  reaches IPC subscribers again (at least once). ``IotCore`` targets are as durable as
  the cloud link's in-memory queue: use a ``Stream:`` target for what must reach the cloud.
- Pubsub and IotCore sources have no acknowledgement to hold back: their messages reach
  streams unless the agent dies first; a full stream dead-letters them (reason given).
  Messages the bridge itself published are not bridged back (MQTT 5 no-local; IPC
  "from others"), so LocalMqtt ↔ Pubsub mappings on the same topics do not loop.

Counters per mapping (received, forwarded, invalid, duplicates, dead-lettered) and the
connection's state are in ``edgeloop device status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeloop import __version__
from edgeloop.core.errors import EdgeloopError, ValidationError
from edgeloop.core.telemetry import parse_reading
from edgeloop.core.topics import topic_matches
from edgeloop.edge.bridge_config import BridgeConfig, Endpoint, Mapping
from edgeloop.edge.ipc.pubsub import Published, Subscription
from edgeloop.edge.spool_config import DEAD_LETTER
from edgeloop.edge.spool_segment import DeadLetter
from edgeloop.edge.spool_stream import SpoolError, StreamFullError

if TYPE_CHECKING:
    from edgeloop.edge.hub_broker import HubBroker
    from edgeloop.edge.ipc.ops_iotcore import CloudLink, CloudMessage, Unsubscribe
    from edgeloop.edge.ipc.pubsub import PubSub
    from edgeloop.edge.spool import Spool

__all__ = ["COMPONENT", "Bridge", "SeqWindow"]

log = logging.getLogger("edgeloop.bridge")

COMPONENT = "edgeloop.MqttBridge"
RECEIVE_MAXIMUM = 1000  # messages the broker may have unacknowledged with the bridge
WINDOW = 4096  # kit_seq remembered per kit, to recognise redeliveries
REBUILD_RECORDS = 20_000  # records read back from each stream at start for the window
PUBSUB_QUEUE = 10_000  # messages an IPC source may queue while the bridge is blocked
RETRY_FIRST, RETRY_CAP = 0.2, 5.0  # seconds between attempts to store a blocked message
STOP_DRAIN = 5.0  # seconds a stop waits for pending acknowledgements
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
_ENDING = ("STOPPING", "FINISHED")

# --- recognising redeliveries (pure) --------------------------------------------------------


class SeqWindow:
    """The last ``size`` sequence numbers seen per key, as a bit mask below the highest."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self._full = (1 << size) - 1
        self._marks: dict[str, tuple[int, int]] = {}  # key -> (highest, mask)

    def seen(self, key: str, seq: int) -> bool:
        """Whether ``seq`` was added for ``key`` (False when older than the window)."""
        mark = self._marks.get(key)
        if mark is None:
            return False
        high, mask = mark
        behind = high - seq
        return 0 <= behind < self.size and bool(mask >> behind & 1)

    def add(self, key: str, seq: int) -> None:
        """Remember ``seq`` for ``key``."""
        mark = self._marks.get(key)
        if mark is None:
            self._marks[key] = (seq, 1)
            return
        high, mask = mark
        if seq > high:
            shift = seq - high
            mask = (mask << shift | 1) & self._full if shift < self.size else 1
            self._marks[key] = (seq, mask)
        elif high - seq < self.size:
            self._marks[key] = (high, mask | 1 << (high - seq))

    def __len__(self) -> int:
        return len(self._marks)


# --- counters ----------------------------------------------------------------------------------


@dataclass
class MappingCounters:
    """What one mapping has done."""

    received: int = 0
    forwarded: int = 0
    invalid: int = 0
    duplicates: int = 0
    dead_lettered: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "received": self.received,
            "forwarded": self.forwarded,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "deadLettered": self.dead_lettered,
        }


@dataclass
class _Message:
    """One message on its way through the bridge."""

    topic: str
    payload: bytes
    routes: list[Mapping]
    generation: int = 0  # the LocalMqtt connection it came on; 0: no ack owed
    mid: int = 0
    done: set[str] = field(default_factory=set)  # mappings already served (after a retry)
    durable: list[Future[None]] = field(default_factory=list)
    _parsed: tuple[Any, str | None] | None = None

    def reading(self) -> tuple[Any, str | None]:
        """``(Reading, None)`` or ``(None, why it is not one)``, worked out once."""
        if self._parsed is None:
            try:
                self._parsed = (parse_reading(self.payload), None)
            except ValidationError as err:
                self._parsed = (None, str(err))
        return self._parsed


class _Blocked(Exception):
    """A target cannot take a message now (a full stream, a failing disk): retry later."""


# --- the LocalMqtt connection ------------------------------------------------------------------


class _LocalMqtt:
    """The bridge's paho client on the hub broker's loopback listener.

    paho's network thread (``loop_start``) owns the socket; every callback hands over to the
    event loop with ``call_soon_threadsafe``. ``generation`` counts CONNACKs: an ack owed on
    an older connection is not sent (the broker redelivers that message instead).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        filters: list[str],
        on_message: Callable[[_Message, list[int]], None],
        on_state: Callable[[bool, str | None], None],
        state_file: Path,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from edgeloop.edge.hub_broker import BRIDGE_CLIENT_ID

        self._loop = loop
        self.filters = filters
        self._on_message_cb = on_message
        self._on_state = on_state
        self._state_file = state_file
        self.generation = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=BRIDGE_CLIENT_ID,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._lock = threading.Lock()

    def start(self, host: str, port: int, username: str, password: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_NEVER_EXPIRES
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.username_pw_set(username, password)
        # clean_start=False on every CONNECT: Mosquitto saves only such sessions.
        self.client.connect_async(host, port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()  # a normal DISCONNECT: the session and its queue stay
        self.client.loop_stop()

    def ack(self, generation: int, mid: int) -> bool:
        """PUBACK ``mid`` if it came on the current connection."""
        with self._lock:
            if generation != self.generation:
                return False
            self.client.ack(mid, 1)
            return True

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    # -- paho's thread ---------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._loop.call_soon_threadsafe(self._on_state, False, f"refused: {reason}")
            return
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        from paho.mqtt.subscribeoptions import SubscribeOptions

        with self._lock:
            self.generation += 1
        old = set(self._old_filters()) - set(self.filters)
        if old:
            client.unsubscribe(sorted(old))
        for index, topic_filter in enumerate(self.filters, 1):
            sub = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
            sub.SubscriptionIdentifier = index
            options = SubscribeOptions(
                qos=1,
                noLocal=True,
                retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
            )
            client.subscribe(topic_filter, options=options, properties=sub)
        with contextlib.suppress(OSError):
            self._state_file.write_text(json.dumps({"filters": self.filters}))
        self._loop.call_soon_threadsafe(self._on_state, True, None)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._loop.call_soon_threadsafe(self._on_state, False, str(reason))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        props = message.properties
        ids = getattr(props, "SubscriptionIdentifier", None) or []
        item = _Message(
            topic=message.topic,
            payload=bytes(message.payload),
            routes=[],
            generation=self.generation,
            mid=message.mid,
        )
        self._loop.call_soon_threadsafe(self._on_message_cb, item, list(ids))

    def _old_filters(self) -> list[str]:
        try:
            filters = json.loads(self._state_file.read_text())["filters"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [f for f in filters if isinstance(f, str)]


# --- the bridge -----------------------------------------------------------------------------------


class Bridge:
    """Runs the topic mappings; see the module docstring for what it guarantees."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        spool: Spool,
        pubsub: PubSub,
        cloud: CloudLink | None = None,
        broker: HubBroker | None = None,
        kit_prefix: str | None = None,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.spool = spool
        self.pubsub = pubsub
        self.cloud = cloud
        self.broker = broker
        self.kit_prefix = kit_prefix
        self.state_dir = state_dir
        self._clock = clock
        self.counters = {m.name: MappingCounters() for m in config.mappings}
        self.window = SeqWindow()
        local = [m for m in config.mappings if m.source is Endpoint.LOCAL_MQTT]
        self._filters = sorted({m.topic for m in local})
        self._by_filter = {f: [m for m in local if m.topic == f] for f in self._filters}
        self._needs_local = config.uses(Endpoint.LOCAL_MQTT)
        self._local: _LocalMqtt | None = None
        self._inbox: asyncio.Queue[_Message] = asyncio.Queue()
        self._acks: deque[_Message] = deque()
        self._ack_ready = asyncio.Event()
        self._acks_drained = asyncio.Event()  # set while no acknowledgement is owed
        self._acks_drained.set()
        self._cloud_inbox: asyncio.Queue[_Message] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions: list[Subscription] = []
        self._cloud_unsubscribes: list[Unsubscribe] = []
        self.connected = False
        self.since = clock()
        self.error: str | None = None
        self.connects = 0
        self.acked = 0
        self.stale = 0  # messages of an ended connection, left for the broker to redeliver
        self.unrouted = 0
        self.lost = 0  # Pubsub/IotCore-sourced messages no target nor dead letter could take
        self.blocked: str | None = None
        self.state = "NEW"

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the redelivery window, subscribe to the sources, start moving messages."""
        loop = asyncio.get_running_loop()
        self.state = "STARTING"
        await asyncio.to_thread(self._rebuild_window)
        for mapping in self.config.mappings:
            if mapping.source is Endpoint.PUBSUB:
                self._subscriptions.append(
                    self.pubsub.subscribe(
                        Subscription(
                            mapping.topic,
                            COMPONENT,
                            self._pubsub_deliver(mapping),
                            from_others_only=True,
                            limit=PUBSUB_QUEUE,
                        )
                    )
                )
            elif mapping.source is Endpoint.IOT_CORE and self.cloud is not None:
                self._cloud_unsubscribes.append(
                    await self.cloud.subscribe(mapping.topic, 1, self._cloud_callback(mapping))
                )
        self._tasks.append(loop.create_task(self._run_cloud_inbox(), name="bridge-iotcore"))
        if self._needs_local:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._local = _LocalMqtt(
                loop,
                self._filters,
                self._on_local_message,
                self._on_local_state,
                self.state_dir / "bridge-subscriptions.json",
            )
            self._tasks.append(loop.create_task(self._run_inbox(), name="bridge-local"))
            self._tasks.append(loop.create_task(self._run_acks(), name="bridge-acks"))
            self._tasks.append(loop.create_task(self._connect(), name="bridge-connect"))
        else:
            self.state = "RUNNING"

    async def stop(self) -> None:
        """Stop taking messages, send the acknowledgements owed, and disconnect."""
        for subscription in self._subscriptions:
            await self.pubsub.unsubscribe(subscription)
        self._subscriptions.clear()
        for unsubscribe in self._cloud_unsubscribes:
            with contextlib.suppress(Exception):
                await unsubscribe()
        self._cloud_unsubscribes.clear()
        acks = [t for t in self._tasks if t.get_name() == "bridge-acks"]
        for task in self._tasks:
            if task not in acks:
                await _cancel(task)
        if acks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_DRAIN):
                    await self._acks_drained.wait()
            await _cancel(acks[0])
        self._tasks.clear()
        self.state = "STOPPING"
        if self._local is not None:
            await asyncio.to_thread(self._local.stop)
            self._local = None
        self.state = "FINISHED"

    async def _connect(self) -> None:
        """Connect once the hub broker runs (paho reconnects by itself afterwards)."""
        assert self._local is not None
        broker = self.broker
        if broker is None:
            self.error = "no hub broker (agent.json has no broker section)"
            return
        while not await broker.wait_running(5.0):
            self.error = "waiting for the hub broker to start"
        login = broker.login
        self._local.start(login.host, login.port, login.username, login.password)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For ``device status``: the connection, acks, and each mapping's counters."""
        return {
            "name": COMPONENT,
            "state": self._state(),
            "connected": self.connected,
            "since": self.since,
            "error": self.error,
            "connects": self.connects,
            "blocked": self.blocked,
            "acked": self.acked,
            "pendingAcks": len(self._acks),
            "inbox": self._inbox.qsize(),
            "stale": self.stale,
            "unrouted": self.unrouted,
            "lost": self.lost,
            "ipcDropped": sum(s.dropped for s in self._subscriptions),
            "kitsTracked": len(self.window),
            "mappings": [
                {"name": m.name, **m.to_json(), **self.counters[m.name].to_json()}
                for m in self.config.mappings
            ],
        }

    def component_status(self) -> dict[str, Any]:
        """A row of ``device components``, shaped as a component runner's."""
        notes = []
        if self._needs_local:
            notes.append("connected to the hub broker" if self.connected else "not connected")
        if self.blocked:
            notes.append(f"blocked: {self.blocked}")
        return {
            "name": COMPONENT,
            "version": __version__,
            "state": self._state(),
            "since": self.since,
            "pid": None,
            "restarts": max(0, self.connects - 1),
            "note": "; ".join(notes) or None,
            "paused": False,
            "lastError": None if self.error is None else {"reason": self.error},
            "builtin": True,
        }

    def _state(self) -> str:
        if self.state != "RUNNING" or not self._needs_local:
            return self.state
        return "RUNNING" if self.connected else "ERRORED"

    # -- LocalMqtt ---------------------------------------------------------------------------

    def _on_local_state(self, connected: bool, reason: str | None) -> None:
        if connected:
            self.connects += 1
            self.error = None
            if self.state not in _ENDING:
                self.state = "RUNNING"
        elif self.state not in _ENDING and (self.connected or reason != self.error):
            log.warning("bridge lost the hub broker: %s", reason)
            self.error = reason
        if connected != self.connected:
            self.since = self._clock()
        self.connected = connected

    def _on_local_message(self, item: _Message, ids: list[int]) -> None:
        # Mosquitto sends a message once per matching subscription, each copy with its
        # subscription identifier (filter i has id i): a copy goes to its filter's mappings.
        filters = self._filters
        chosen = {filters[i - 1] for i in ids if 0 < i <= len(filters)}
        chosen = {f for f in chosen if topic_matches(f, item.topic)}
        if not chosen:  # no identifier, or one from an older configuration: by topic
            chosen = {f for f in filters if topic_matches(f, item.topic)}
        item.routes = [m for f in filters if f in chosen for m in self._by_filter[f]]
        self._inbox.put_nowait(item)

    async def _run_inbox(self) -> None:
        local = self._local
        assert local is not None
        while True:
            item = await self._inbox.get()
            if item.generation != local.generation:
                self.stale += 1  # the broker sends it again on the new connection
                continue
            if not item.routes:
                self.unrouted += 1
            else:
                await self._deliver_until_stored(item)
            self._acks.append(item)
            self._acks_drained.clear()
            self._ack_ready.set()

    async def _run_acks(self) -> None:
        local = self._local
        assert local is not None
        while True:
            await self._ack_ready.wait()
            while self._acks:
                item = self._acks[0]
                try:
                    for future in item.durable:
                        await asyncio.wrap_future(future)
                except EdgeloopError as err:
                    # The disk failed under a stored record: leave it unacknowledged, so the
                    # broker keeps it; the next connection redelivers it.
                    log.error("not acknowledging %s: %s", item.topic, err)
                    self.blocked = str(err)
                    self._acks.popleft()
                    continue
                self._acks.popleft()
                if local.ack(item.generation, item.mid):
                    self.acked += 1
                else:
                    self.stale += 1
            self._ack_ready.clear()
            self._acks_drained.set()

    async def _deliver_until_stored(self, item: _Message) -> None:
        local = self._local
        assert local is not None
        delay = RETRY_FIRST
        while item.generation == local.generation:  # else the broker sends it again
            try:
                await self._deliver(item, dedupe=True)
            except Exception as err:  # _Blocked, or a fault: never drop, retry
                if not isinstance(err, _Blocked):
                    log.exception("bridge failed on a message on %s", item.topic)
                if self.blocked != str(err):
                    log.warning("bridge blocked, retrying: %s", err)
                self.blocked = str(err)
                await asyncio.sleep(delay)
                delay = min(RETRY_CAP, delay * 2)
                continue
            if self.blocked is not None:
                log.info("bridge unblocked")
                self.blocked = None
            return

    # -- Pubsub and IotCore sources -------------------------------------------------------------

    def _pubsub_deliver(self, mapping: Mapping) -> Callable[[Published], Awaitable[None]]:
        async def deliver(message: Published) -> None:
            payload = message.payload
            if not message.binary:
                payload = json.dumps(payload, separators=(",", ":")).encode()
            item = _Message(topic=message.topic, payload=bytes(payload), routes=[mapping])
            await self._deliver_once(item)

        return deliver

    def _cloud_callback(self, mapping: Mapping) -> Callable[[CloudMessage], None]:
        def callback(message: CloudMessage) -> None:
            item = _Message(topic=message.topic, payload=message.payload, routes=[mapping])
            self._cloud_inbox.put_nowait(item)

        return callback

    async def _run_cloud_inbox(self) -> None:
        while True:
            item = await self._cloud_inbox.get()
            await self._deliver_once(item)

    async def _deliver_once(self, item: _Message) -> None:
        """Deliver a message nobody waits an ack for: a target that cannot take it now gets
        it dead-lettered, with the reason."""
        try:
            await self._deliver(item, dedupe=False)
        except Exception as err:  # _Blocked, or a fault: dead-letter rather than drop
            if not isinstance(err, _Blocked):
                log.exception("bridge failed on a message on %s", item.topic)
            for mapping in item.routes:
                if mapping.name in item.done:
                    continue
                try:
                    self._dead_letter(item, mapping, f"could not store it: {err}")
                except _Blocked as again:
                    self.lost += 1
                    log.error(
                        "LOST a message on %s (mapping %s): %s; and the dead-letter stream "
                        "refused it: %s",
                        item.topic,
                        mapping.name,
                        err,
                        again,
                    )

    # -- routing -------------------------------------------------------------------------------

    async def _deliver(self, item: _Message, *, dedupe: bool) -> None:
        """Hand ``item`` to each of its routes not yet served; _Blocked when one cannot
        take it now (those served stay served: a retry does not repeat them)."""
        key = self._dedupe_key(item) if dedupe else None
        if key is not None and self.window.seen(*key):
            for mapping in item.routes:
                self.counters[mapping.name].received += 1
                self.counters[mapping.name].duplicates += 1
            return
        for mapping in item.routes:
            if mapping.name in item.done:
                continue
            counters = self.counters[mapping.name]
            target = mapping.target
            if target is Endpoint.STREAM:
                self._to_stream(item, mapping)
            elif target is Endpoint.PUBSUB:
                topic = mapping.target_topic_prefix + item.topic
                self.pubsub.publish(Published(topic, item.payload, True, COMPONENT))
                counters.forwarded += 1
            elif target is Endpoint.IOT_CORE:
                await self._to_cloud(item, mapping)
            elif target is Endpoint.LOCAL_MQTT:
                if self._local is None:
                    raise _Blocked("no connection to the hub broker")
                self._local.publish(mapping.target_topic_prefix + item.topic, item.payload)
                counters.forwarded += 1
            counters.received += 1
            item.done.add(mapping.name)
        if key is not None:
            self.window.add(*key)

    def _dedupe_key(self, item: _Message) -> tuple[str, int] | None:
        reading, _ = item.reading()
        if reading is None or reading.kit_seq is None:
            return None
        return (self._topic_kit(item.topic) or reading.kit, reading.kit_seq)

    def _topic_kit(self, topic: str) -> str | None:
        """The kit whose ``PREFIX/<kit>/...`` topic this is (the broker's ACL vouches for it)."""
        prefix = self.kit_prefix
        if prefix is None or not topic.startswith(prefix + "/"):
            return None
        kit = topic[len(prefix) + 1 :].split("/", 1)[0]
        return kit or None

    def _to_stream(self, item: _Message, mapping: Mapping) -> None:
        assert mapping.stream is not None
        reading, why = item.reading()
        kit = self._topic_kit(item.topic)
        if reading is not None and kit is not None and reading.kit != kit:
            why = (
                f"kit: {reading.kit!r} is not the kit that published it ({kit!r}, on {item.topic})"
            )
        if why is not None:
            self.counters[mapping.name].invalid += 1
            self._dead_letter(item, mapping, f"not a reading ({item.topic}): {why}")
            return
        try:
            stream = self.spool.stream(mapping.stream)
            sequence = stream.append(item.payload)
        except (StreamFullError, SpoolError) as err:
            raise _Blocked(str(err)) from err
        except ValidationError as err:  # too large for the stream's segments
            self.counters[mapping.name].invalid += 1
            self._dead_letter(item, mapping, f"{item.topic}: {err}")
            return
        item.durable.append(stream.durable_future(sequence, kick=False))
        self.counters[mapping.name].forwarded += 1

    async def _to_cloud(self, item: _Message, mapping: Mapping) -> None:
        topic = mapping.target_topic_prefix + item.topic
        try:
            if self.cloud is None:
                raise EdgeloopError("the hub has no cloud connection")
            await self.cloud.publish(topic, item.payload, 1, False)
        except EdgeloopError as err:
            self._dead_letter(item, mapping, f"IotCore refused {topic}: {err}")
            return
        self.counters[mapping.name].forwarded += 1

    def _dead_letter(self, item: _Message, mapping: Mapping, reason: str) -> None:
        letter = DeadLetter(
            stream=mapping.stream or f"bridge.{mapping.name}",
            sequence=0,
            timestamp_ms=int(self._clock() * 1000),
            reason=reason,
            payload=item.payload,
        )
        stream = self.spool.stream(DEAD_LETTER)
        try:
            sequence = stream.append(letter.encode())
        except (SpoolError, ValidationError) as err:
            raise _Blocked(f"the dead-letter stream cannot take a message: {err}") from err
        item.durable.append(stream.durable_future(sequence, kick=False))
        self.counters[mapping.name].dead_lettered += 1
        log.warning("dead-lettered a message (mapping %s): %s", mapping.name, reason)

    # -- the window -----------------------------------------------------------------------------

    def _rebuild_window(self) -> None:
        """Remember the readings at the end of the LocalMqtt mappings' streams: the ones a
        crash may have left unacknowledged, which the broker will deliver again."""
        names = {m.stream for m in self.config.mappings if m.source is Endpoint.LOCAL_MQTT}
        for name in sorted(n for n in names if n is not None):
            stream = self.spool.stream(name)
            metrics = stream.metrics()
            after = max(metrics.committed_sequence, metrics.last_sequence - REBUILD_RECORDS)
            found = 0
            while True:
                batch = stream.read_batch(1000, 4 << 20, after=after)
                if not batch:
                    break
                for record in batch:
                    self._remember(record.payload)
                after = batch[-1].sequence
                found += len(batch)
            if found:
                log.info("bridge: %d recent reading(s) of stream %s remembered", found, name)

    def _remember(self, payload: bytes) -> None:
        try:
            document = json.loads(payload)
            kit, seq = document["kit"], document.get("kit_seq")
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(kit, str) and isinstance(seq, int):
            self.window.add(kit, seq)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
