"""The hub's MQTT connection to its cloud: connectivity, IoT Core traffic, shadow sync.

``CloudLink`` (the class) implements the protocol of ``edgeloop.edge.ipc.ops_iotcore``
that PublishToIoTCore / SubscribeToIoTCore use, over paho-mqtt (MQTT 5, mutual TLS):

- client id = the thing name; clean start 0 with a session expiry, so the broker keeps
  the hub's subscriptions and QoS 1 messages while it is away (and across its restarts);
- a retained last will ``{"connected": false, "connection": C}`` on
  ``edgeloop/things/{thing}/connectivity`` and a retained birth ``{"connected": true,
  "at": C, "connection": C, "clientId": ...}`` on every connect, C being when that
  connection was attempted (ms): a will that reaches the cloud late (queued while its
  services were away) names a connection older than the live one, and is ignored;
  a graceful stop publishes ``{"connected": false}`` itself, as a normal DISCONNECT
  discards the will;
- reconnects with capped, jittered exponential backoff, and says why an attempt failed
  (in the log once per distinct reason, and in ``status()["error"]``): with TLS 1.3 a
  broker that refuses the hub's certificate (revoked, say) closes the connection after
  the handshake, and only paho's own error log tells what the alert said;
- while offline, publishes wait in a bounded in-memory queue and go out, in order, on the
  next connect; when it is full a publish is refused with an error (never dropped).

Threads: paho's network loop runs in a thread of its own that this module drives (paho's
``loop_start`` would reconnect without jitter). Everything else (the online flag the
publishers see, the offline queue, subscriptions) lives on the agent's event loop, with
no locks: paho callbacks hand their work over with ``call_soon_threadsafe``, and going
online (resubscribe, flush the queue) happens there, in order with every publish.
Publishing from the event loop only queues the packet; a no-op
``on_socket_register_write`` keeps paho from writing to the socket outside the network
thread.

``ShadowSync`` keeps the hub's own shadows (classic and named) in step with the cloud's,
on AWS IoT's shadow topics. Every local change marks its shadow dirty (persisted in
``<state>/cloud-sync.json``, so a restart does not forget), and a dirty shadow is
*reconciled*: ``/get`` the cloud's copy, then patch each side. The rule (``reconcile``):

- reported: the hub's wins. The cloud's reported becomes the hub's (changed keys set,
  keys the hub no longer has deleted).
- desired: the cloud's wins. Desired changes made on the hub are pushed only if the
  cloud's shadow has not changed since the hub last synced it (same version); otherwise
  they are discarded (logged) and the hub takes the cloud's desired.
- a shadow only one side has is copied to the other whole; a shadow deleted on the hub
  is deleted in the cloud, and a delete announced by the cloud over MQTT deletes the
  hub's copy.

Reconciliation runs for the changed shadow on each local change, for every known shadow
(classic, the hub's named shadows, and those synced before) on each connect and every
``sync_interval`` seconds, and for a shadow whose ``/update/documents`` the cloud
announces. Updates the hub applies from the cloud carry a ``clientToken`` starting with
``SYNC_TOKEN``, which the local listener ignores, so they are never pushed back.

``provision_by_claim`` turns a factory claim into the hub's own identity, before the
link starts: with the claim it asks CreateCertificateFromCsr (the key never leaves the
hub) and the template's provision, which names its thing; the certificate it gets has a
provisional CN (``cert:<hex>``), so it reconnects with it only to trade it, on
``edgeloop/certificates/<CN>/rotate``, for a certificate named after the thing (a second
key made here). Answers on a shared broker reach every claim connected at that moment,
so each request carries MQTT 5 correlation data and the hub takes only its own answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import logging
import os
import queue
import random
import re
import secrets
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.core.errors import CloudError, EdgeloopError
from edgeloop.core.shadow import UpdateResult
from edgeloop.core.topics import topic_matches
from edgeloop.edge.ipc.ops_iotcore import CloudMessage, MqttProperties, Unsubscribe
from edgeloop.edge.settings import CloudConnection
from edgeloop.edge.shadows import LocalShadows
from edgeloop.edge.store import read_json, write_json_atomic

__all__ = [
    "SYNC_TOKEN",
    "CloudLink",
    "Reconciliation",
    "ShadowSync",
    "apply_patch",
    "backoff",
    "connectivity_topic",
    "provision_by_claim",
    "reconcile",
    "state_patch",
]

log = logging.getLogger("edgeloop.cloud_link")

SYNC_TOKEN = "edgeloop-sync-"
"""The clientToken prefix of every shadow request the sync makes (cloud and local)."""

REQUEST_TIMEOUT = 5.0  # seconds for the cloud to answer one request (retried after)
RETRY_DELAY = 2.0  # seconds before a failed reconciliation is tried again
CLAIM_ATTEMPTS = 8  # tries of the claim's exchange, when other hubs take its connection
PROVISIONING_TIMEOUT = 20.0  # seconds one provisioning request may take (hooks: up to 5)
STOP_TIMEOUT = 3.0  # seconds a graceful stop waits for the offline message to be taken
_MIN_BACKOFF = 0.5
_SHADOW_TOPIC = re.compile(
    r"^\$aws/things/([^/]+)/shadow(?:/name/([^/]+))?/(get|update|delete)/"
    r"(accepted|rejected|documents|delta)$"
)
JsonObject = dict[str, Any]


def connectivity_topic(thing: str) -> str:
    """Where a hub publishes its retained birth message and sets its last will."""
    # The cloud's services read it (edgeloop.cloud.service); the topic is the wire contract.
    return f"edgeloop/things/{thing}/connectivity"


def backoff(failures: int, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``failures`` failed attempts: exponential, capped, jittered
    over its upper half (so a fleet that lost the broker together does not return together)."""
    ceiling = min(max(cap, _MIN_BACKOFF), _MIN_BACKOFF * 2.0 ** min(failures, 20))
    return ceiling / 2 + rng() * ceiling / 2


# -- shadow reconciliation (pure) ----------------------------------------------------------

_MISSING = object()


def state_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> JsonObject:
    """The shadow update fragment that turns state ``old`` into ``new`` (``null`` deletes)."""
    patch: JsonObject = {}
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = state_patch(before, value)
            if inner:
                patch[key] = inner
        elif before is _MISSING or before != value:
            patch[key] = copy.deepcopy(value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def apply_patch(state: Mapping[str, Any], patch: Mapping[str, Any]) -> JsonObject:
    """``state`` with an update fragment applied, as the shadow service merges it."""
    out = copy.deepcopy(dict(state))
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_patch(out[key], value)
        elif isinstance(value, dict):
            out[key] = apply_patch({}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_patches(first: Mapping[str, Any], then: Mapping[str, Any]) -> JsonObject:
    """One fragment with the effect of ``first`` followed by ``then`` (``null``s kept)."""
    out = copy.deepcopy(dict(first))
    for key, value in then.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_patches(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Reconciliation:
    """What to change on each side so that a hub's shadow and the cloud's agree."""

    to_cloud: JsonObject = field(default_factory=dict)  # a ``state`` for a cloud update
    to_local: JsonObject = field(default_factory=dict)  # a ``state`` for a local update
    discarded: JsonObject | None = None  # hub desired changes the cloud's overrode


def reconcile(
    local: Mapping[str, Any] | None,
    cloud: Mapping[str, Any] | None,
    *,
    pending_desired: Mapping[str, Any] | None = None,
    cloud_changed: bool = True,
) -> Reconciliation:
    """Decide one shadow's sync (the rule is in the module docstring).

    ``local`` and ``cloud`` are ``state`` objects (``{"desired": .., "reported": ..}``) or
    None when that side has no shadow; ``pending_desired`` is the fragment of desired
    changes made on the hub since the last sync; ``cloud_changed`` says whether the cloud's
    version moved since then.
    """
    if local is None and cloud is None:
        return Reconciliation()
    sections = ("desired", "reported")
    if cloud is None:
        assert local is not None
        return Reconciliation(to_cloud={s: dict(local[s]) for s in sections if local.get(s)})
    if local is None:
        return Reconciliation(to_local={s: dict(cloud[s]) for s in sections if cloud.get(s)})
    to_cloud: JsonObject = {}
    to_local: JsonObject = {}
    reported = state_patch(cloud.get("reported") or {}, local.get("reported") or {})
    if reported:
        to_cloud["reported"] = reported
    target = dict(cloud.get("desired") or {})
    discarded = None
    if pending_desired:
        if cloud_changed:
            discarded = dict(pending_desired)
        else:
            to_cloud["desired"] = dict(pending_desired)
            target = apply_patch(target, pending_desired)
    desired = state_patch(local.get("desired") or {}, target)
    if desired:
        to_local["desired"] = desired
    return Reconciliation(to_cloud=to_cloud, to_local=to_local, discarded=discarded)


# -- the connection ------------------------------------------------------------------------


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: MqttProperties | None


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    callback: Callable[[CloudMessage], None]


@dataclass
class _Filter:
    """One filter as subscribed at the broker, shared by the subscriptions that use it."""

    identifier: int  # MQTT 5 subscription identifier: which subscription a message matched
    qos: int
    no_local: bool
    users: set[int] = field(default_factory=set)


class CloudLink:
    """The hub's MQTT 5 connection to its cloud (see the module docstring)."""

    def __init__(
        self,
        settings: CloudConnection,
        thing: str,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, LogLevel

        self.settings = settings
        self.thing = thing
        self._clock = clock
        self._log_err = LogLevel.MQTT_LOG_ERR
        self._rng = rng
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=thing, protocol=mqtt.MQTTv5
        )
        try:
            self._client.tls_set(
                ca_certs=str(settings.ca), certfile=str(settings.cert), keyfile=str(settings.key)
            )
        except (OSError, ValueError) as err:
            raise CloudError(
                f"cannot use the hub's cloud credentials ({settings.cert}, {settings.key}, "
                f"{settings.ca}): {err}"
            ) from err
        self._connection = 0  # ms when the current connection was attempted (its id)
        self._client.max_queued_messages_set(settings.queue_limit)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_socket_register_write = lambda *_: None  # see the module docstring
        self._client.on_log = self._on_log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._connected = False  # owned by the event loop
        self._since: float | None = None
        self._error: str | None = None  # why the last attempt failed; owned by the event loop
        self._attempt_error: str | None = None  # network thread: paho's error in this attempt
        self._logged_error: str | None = None  # network thread: the reason last logged
        self._backlog: deque[_Outgoing] = deque()
        self._subscriptions: dict[int, _Subscription] = {}
        self._filters: dict[str, _Filter] = {}
        self._ids = itertools.count(1)
        self._subacks: dict[int, asyncio.Future[list[Any]]] = {}
        self._pubacks: dict[int, asyncio.Future[Any]] = {}
        self.on_online: list[Callable[[], None]] = []  # called on the event loop
        self.connects = 0

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the connection (and not lost it since)."""
        return self._connected

    def status(self) -> dict[str, Any]:
        """For ``device status``: where, whether connected, since when, how much waits, and
        why the last attempt to connect failed (None once connected)."""
        return {
            "endpoint": self.settings.endpoint,
            "thingName": self.thing,
            "connected": self._connected,
            "since": self._since,
            "error": self._error,
            "queued": len(self._backlog),
            "connects": self.connects,
        }

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start connecting in the background; returns at once (the hub is offline-first)."""
        self._loop = asyncio.get_running_loop()
        self._since = self._clock()
        self._thread = threading.Thread(target=self._run, name="cloud-link", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Say the hub goes offline, disconnect, and end the network thread."""
        if self._connected:
            info = self._client.publish(
                connectivity_topic(self.thing),
                json.dumps({"connected": False, "reason": "hub stopped"}),
                qos=1,
                retain=True,
            )
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.to_thread(info.wait_for_publish, STOP_TIMEOUT)
        self._client.disconnect()
        self._closing.set()  # after the DISCONNECT is queued: the thread writes it first
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._connected = False

    def _run(self) -> None:
        """The network thread: connect, serve, and reconnect after jittered backoff."""
        from paho.mqtt.client import MQTT_ERR_SUCCESS, error_string
        from paho.mqtt.packettypes import PacketTypes

        properties = _paho_properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.session_expiry
        failures = 0
        s = self.settings
        while not self._closing.is_set():
            connects = self.connects
            self._attempt_error = None
            # This connection's id: the will and the birth name it, so that the cloud can
            # tell a late will of an earlier connection from one of the live connection.
            self._connection = int(self._clock() * 1000)
            self._client.will_set(
                connectivity_topic(self.thing),
                json.dumps({"connected": False, "connection": self._connection}),
                1,
                True,
            )
            try:
                self._client.connect(
                    s.host, s.port, keepalive=s.keepalive, clean_start=False, properties=properties
                )
            except (OSError, ssl.SSLError, ValueError) as err:
                self._attempt_failed(f"cannot reach it: {err}")
            else:
                rc = MQTT_ERR_SUCCESS
                while rc == MQTT_ERR_SUCCESS and not self._closing.is_set():
                    rc = self._client.loop(timeout=1.0)
                if self._closing.is_set():
                    # Let the DISCONNECT (sent by stop) out before the socket closes.
                    with contextlib.suppress(Exception):
                        self._client.loop_write()
                    break
                if self.connects == connects:
                    self._attempt_failed(
                        self._attempt_error
                        or f"it closed the connection before accepting the hub ({error_string(rc)})"
                    )
            if self.connects > connects:
                failures = 0  # it was up: start the backoff over
            failures += 1
            self._closing.wait(backoff(failures, s.reconnect_max, self._rng))

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _attempt_failed(self, reason: str) -> None:
        """Say why an attempt to connect failed: logged once per distinct reason (a refused
        hub retries every few seconds), and kept for ``status()``."""
        if reason != self._logged_error:
            self._logged_error = reason
            log.warning(
                "no connection to the cloud at %s: %s; retrying", self.settings.endpoint, reason
            )
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._set_error, reason)

    def _set_error(self, reason: str | None) -> None:
        self._error = reason

    def _on_log(self, client: Any, userdata: Any, level: int, message: str) -> None:
        if level == self._log_err and self._attempt_error is None:
            # e.g. "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] ..."
            self._attempt_error = message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._attempt_error = f"it refused the hub: {reason}"
            return
        self._logged_error = None
        birth = {
            "connected": True,
            "at": self._connection,
            "connection": self._connection,
            "clientId": self.thing,
        }
        client.publish(connectivity_topic(self.thing), json.dumps(birth), qos=1, retain=True)
        self.connects += 1
        log.info(
            "connected to the cloud at %s as %s (session %s)",
            self.settings.endpoint,
            self.thing,
            "resumed" if flags.session_present else "new",
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._went_online)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._went_offline, reason)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        props = getattr(message, "properties", None)
        ids = getattr(props, "SubscriptionIdentifier", None) if props is not None else None
        cloud_message = CloudMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            retain=bool(message.retain),
            properties=_properties_in(props),
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, cloud_message, ids)

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[Any], props: Any
    ) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._suback, mid, reasons)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # Always handed over: a PUBACK may come before publish_acked has its future in
        # place, which happens on the loop before _puback can run there.
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._puback, mid, reason)

    # -- publish -------------------------------------------------------------------------
    async def publish_acked(self, topic: str, payload: bytes, *, timeout: float = 30.0) -> None:
        """Publish with QoS 1 and return once the broker has acknowledged it (PUBACK), for
        callers that must not forget a message before the cloud has it; CloudError when
        the hub is offline, the broker refuses it (an MQTT 5 reason), or no PUBACK came
        within ``timeout`` seconds (then it may still arrive: send again, idempotently)."""
        if not self._connected:
            raise CloudError(f"the hub is offline from the cloud at {self.settings.endpoint}")
        from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS

        info = self._client.publish(topic, payload, 1, False)
        if info.rc not in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):  # NO_CONN: kept, sent later
            raise CloudError(f"the MQTT client refused the message (error {info.rc})")
        # paho acknowledges on its network thread; _puback runs on this loop after this
        # coroutine yields, so the future is in place before any acknowledgement lands.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pubacks[info.mid] = future
        try:
            async with asyncio.timeout(timeout):
                reason = await future
        except TimeoutError:
            raise CloudError(
                f"the cloud at {self.settings.endpoint} did not acknowledge the message "
                f"within {timeout:g} s"
            ) from None
        finally:
            self._pubacks.pop(info.mid, None)
        if getattr(reason, "is_failure", False):
            raise CloudError(f"the cloud's broker refused the message: {reason}")

    def _puback(self, mid: int, reason: Any) -> None:
        future = self._pubacks.get(mid)
        if future is not None and not future.done():
            future.set_result(reason)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        *,
        properties: MqttProperties | None = None,
    ) -> None:
        """Send (QoS 0/1), or queue while offline; CloudError when the queue is full."""
        message = _Outgoing(topic, payload, qos, retain, properties)
        if self._connected and self._send(message):
            return
        if len(self._backlog) >= self.settings.queue_limit:
            raise CloudError(
                f"the hub is offline from the cloud at {self.settings.endpoint} and "
                f"{len(self._backlog)} messages already wait to be sent (cloud.queue_limit); "
                "this one was NOT accepted: retry later"
            )
        self._backlog.append(message)

    def _send(self, message: _Outgoing) -> bool:
        """Hand a message to paho; False when it must wait for the next connection."""
        from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_QUEUE_SIZE, MQTT_ERR_SUCCESS

        info = self._client.publish(
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            properties=_properties_out(message.properties),
        )
        if info.rc == MQTT_ERR_SUCCESS:
            return True
        if info.rc == MQTT_ERR_NO_CONN:
            # paho keeps a QoS 1 message and sends it again on reconnect; QoS 0 it drops.
            return message.qos > 0
        if info.rc == MQTT_ERR_QUEUE_SIZE:
            raise CloudError(
                f"{self.settings.queue_limit} messages to the cloud at {self.settings.endpoint} "
                "await acknowledgement (cloud.queue_limit); this one was NOT accepted: retry later"
            )
        raise CloudError(f"the MQTT client refused the message (error {info.rc})")

    # -- subscribe -----------------------------------------------------------------------
    async def subscribe(
        self,
        topic_filter: str,
        qos: int,
        callback: Callable[[CloudMessage], None],
        *,
        no_local: bool = False,
    ) -> Unsubscribe:
        """Subscribe; waits for the broker's SUBACK when online. Offline, the subscription
        is made on the next connect (and kept across reconnects either way)."""
        key = next(self._ids)
        self._subscriptions[key] = _Subscription(topic_filter, qos, callback)
        f = self._filters.get(topic_filter)
        fresh = f is None or f.qos < qos or f.no_local != no_local
        if f is None:
            f = self._filters[topic_filter] = _Filter(next(self._ids), qos, no_local)
        f.qos, f.no_local = max(f.qos, qos), no_local
        f.users.add(key)
        if fresh and self._connected:
            mid = self._send_subscribe(topic_filter, f)
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._subacks[mid] = future
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    reasons = await future
            except BaseException:
                self._drop(key)
                raise
            finally:
                self._subacks.pop(mid, None)
            failed = [r for r in reasons if r.is_failure]
            if failed:
                self._drop(key)
                raise CloudError(f"the cloud refused the subscription to {topic_filter!r}")

        async def unsubscribe() -> None:
            self._drop(key)

        return unsubscribe

    def _send_subscribe(self, topic_filter: str, f: _Filter) -> int:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.subscribeoptions import SubscribeOptions

        properties = _paho_properties(PacketTypes.SUBSCRIBE)
        properties.SubscriptionIdentifier = f.identifier
        _, mid = self._client.subscribe(
            topic_filter,
            options=SubscribeOptions(qos=f.qos, noLocal=f.no_local),
            properties=properties,
        )
        return int(mid or 0)

    def _drop(self, key: int) -> None:
        subscription = self._subscriptions.pop(key, None)
        if subscription is None:
            return
        f = self._filters.get(subscription.topic_filter)
        if f is None:
            return
        f.users.discard(key)
        if not f.users:
            del self._filters[subscription.topic_filter]
            if self._connected:
                self._client.unsubscribe(subscription.topic_filter)

    # -- event loop side -----------------------------------------------------------------
    def _suback(self, mid: int, reasons: list[Any]) -> None:
        future = self._subacks.get(mid)
        if future is not None and not future.done():
            future.set_result(reasons)

    def _went_online(self) -> None:
        # The session may be new (first connect, or expired): subscribe everything again.
        for topic_filter, f in self._filters.items():
            self._send_subscribe(topic_filter, f)
        self._connected = True
        self._since = self._clock()
        self._error = None
        while self._backlog:
            if not self._send(self._backlog[0]):
                self._connected = False  # lost again already; the rest waits
                return
            self._backlog.popleft()
        for callback in list(self.on_online):
            try:
                callback()
            except Exception:
                log.exception("a cloud-online callback failed")

    def _went_offline(self, reason: Any) -> None:
        if self._connected:
            log.warning("lost the cloud connection to %s: %s", self.settings.endpoint, reason)
            self._connected = False
            self._since = self._clock()

    def _dispatch(self, message: CloudMessage, ids: Any) -> None:
        wanted = set(ids if isinstance(ids, list) else [ids]) if ids else None
        for subscription in list(self._subscriptions.values()):
            f = self._filters.get(subscription.topic_filter)
            if f is None:
                continue
            # A message matching overlapping filters may arrive once per filter; each copy
            # names the subscription(s) it is for, so no subscriber gets it twice.
            if wanted is not None and f.identifier not in wanted:
                continue
            if wanted is None and not topic_matches(subscription.topic_filter, message.topic):
                continue
            try:
                subscription.callback(message)
            except Exception:
                log.exception("a subscriber to %s failed", subscription.topic_filter)


def _paho_properties(packet_type: int) -> Any:
    from paho.mqtt.properties import Properties

    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _properties_out(props: MqttProperties | None) -> Any:
    if props is None:
        return None
    from paho.mqtt.packettypes import PacketTypes

    out = _paho_properties(PacketTypes.PUBLISH)
    if props.user_properties:
        out.UserProperty = list(props.user_properties)
    if props.message_expiry_interval_seconds is not None:
        out.MessageExpiryInterval = props.message_expiry_interval_seconds
    if props.correlation_data is not None:
        out.CorrelationData = props.correlation_data
    if props.response_topic is not None:
        out.ResponseTopic = props.response_topic
    if props.payload_format_utf8 is not None:
        out.PayloadFormatIndicator = int(props.payload_format_utf8)
    if props.content_type is not None:
        out.ContentType = props.content_type
    return out


def _properties_in(props: Any) -> MqttProperties | None:
    if props is None:
        return None
    fmt = getattr(props, "PayloadFormatIndicator", None)
    result = MqttProperties(
        user_properties=tuple(getattr(props, "UserProperty", None) or ()),
        message_expiry_interval_seconds=getattr(props, "MessageExpiryInterval", None),
        correlation_data=getattr(props, "CorrelationData", None),
        response_topic=getattr(props, "ResponseTopic", None),
        payload_format_utf8=None if fmt is None else bool(fmt),
        content_type=getattr(props, "ContentType", None),
    )
    return result if result != MqttProperties() else None


# -- shadow sync ---------------------------------------------------------------------------


class ShadowSync:
    """Keeps the hub's own shadows and the cloud's in step (see the module docstring)."""

    def __init__(
        self,
        link: CloudLink,
        shadows: LocalShadows,
        thing: str,
        state_file: Path,
        *,
        interval: float = 300.0,
    ) -> None:
        self.link = link
        self.shadows = shadows
        self.thing = thing
        self.state_file = state_file
        self.interval = interval
        # Per shadow name: {"dirty", "desired" (pending fragment), "deleted", "version"}.
        records = read_json(state_file, {})
        self._records: dict[str, JsonObject] = records if isinstance(records, dict) else {}
        self._due: set[str] = {name for name, r in self._records.items() if r.get("dirty")}
        self._wake = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[tuple[str, JsonObject]]] = {}
        self._quiet = False  # set while the sync itself changes a local shadow
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Unsubscribe | None = None
        self.reconciled = 0

    async def start(self) -> None:
        """Listen to local changes and the cloud's shadow topics; start the worker."""
        self.shadows.listeners.append(self._on_local_change)
        self.link.on_online.append(self._on_online)
        # noLocal: the hub's own requests are not echoed back to it.
        self._unsubscribe = await self.link.subscribe(
            f"$aws/things/{self.thing}/shadow/#", 1, self._on_cloud_message, no_local=True
        )
        self._task = asyncio.create_task(self._run(), name="shadow-sync")

    async def stop(self) -> None:
        """Stop the worker; dirty shadows stay recorded for the next run."""
        with contextlib.suppress(ValueError):
            self.shadows.listeners.remove(self._on_local_change)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- local side ----------------------------------------------------------------------
    def _on_local_change(self, thing: str, name: str, result: UpdateResult | None) -> None:
        if thing != self.thing or self._quiet:
            return
        record = self._records.setdefault(name, {})
        if result is None:
            record.update(dirty=True, deleted=True)
            record.pop("desired", None)
        else:
            token = result.accepted.get("clientToken")
            if isinstance(token, str) and token.startswith(SYNC_TOKEN):
                return  # applied from the cloud: not a change to push back
            previous = (result.documents.get("previous") or {}).get("state") or {}
            desired = state_patch(previous.get("desired") or {}, result.document.desired or {})
            if desired:
                record["desired"] = _merge_patches(record.get("desired") or {}, desired)
            elif record.get("dirty") and not record.get("deleted"):
                record["generation"] = record.get("generation", 0) + 1
                self._mark(name)
                return  # already recorded as dirty: spare the disk a write
            record["dirty"] = True
            record.pop("deleted", None)
        record["generation"] = record.get("generation", 0) + 1
        self._save()
        self._mark(name)

    def _mark(self, name: str) -> None:
        self._due.add(name)
        self._wake.set()

    def _on_online(self) -> None:
        self._due |= self._known()
        self._wake.set()

    def _known(self) -> set[str]:
        names = {"", *self._records}
        token: str | None = None
        while True:
            page, token = self.shadows.list_named(self.thing, 100, token)
            names.update(page)
            if token is None:
                return names

    def _save(self) -> None:
        try:
            write_json_atomic(self.state_file, self._records)
        except OSError as err:
            log.error("could not record the shadows to sync in %s: %s", self.state_file, err)

    # -- cloud side ----------------------------------------------------------------------
    def _on_cloud_message(self, message: CloudMessage) -> None:
        match = _SHADOW_TOPIC.match(message.topic)
        if match is None or match.group(1) != self.thing:
            return
        name, operation, kind = match.group(2) or "", match.group(3), match.group(4)
        try:
            doc = json.loads(message.payload) if message.payload else {}
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        token = doc.get("clientToken")
        ours = isinstance(token, str) and token.startswith(SYNC_TOKEN)
        if kind in ("accepted", "rejected") and isinstance(token, str):
            future = self._waiting.get(token)
            if future is not None and not future.done():
                future.set_result((kind, doc))
        if ours:
            return
        if operation == "update" and kind == "documents":
            self._mark(name)  # someone changed the cloud's copy
        elif operation == "delete" and kind == "accepted":
            self._delete_local(name)

    def _delete_local(self, name: str) -> None:
        if self.shadows.document(self.thing, name) is not None:
            self._quiet = True
            try:
                self.shadows.delete(self.thing, name)
            except EdgeloopError as err:
                log.warning("could not delete the hub's shadow %r as the cloud did: %s", name, err)
            finally:
                self._quiet = False
        if self._records.pop(name, None) is not None:
            self._save()

    async def _request(self, name: str, operation: str, body: JsonObject) -> JsonObject | None:
        """One shadow request to the cloud; the accepted document, None for a 404."""
        token = f"{SYNC_TOKEN}{secrets.token_hex(8)}"
        future: asyncio.Future[tuple[str, JsonObject]] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        named = f"/name/{name}" if name else ""
        topic = f"$aws/things/{self.thing}/shadow{named}/{operation}"
        try:
            await self.link.publish(
                topic, json.dumps({**body, "clientToken": token}).encode(), 1, False
            )
            async with asyncio.timeout(REQUEST_TIMEOUT):
                kind, doc = await future
        except TimeoutError as err:
            raise CloudError(
                f"the cloud did not answer {operation} of shadow {name or '(classic)'} within "
                f"{REQUEST_TIMEOUT:g} s"
            ) from err
        finally:
            self._waiting.pop(token, None)
        if kind == "accepted":
            return doc
        if doc.get("code") == 404 and operation in ("get", "delete"):
            return None
        raise CloudError(
            f"the cloud rejected {operation} of shadow {name or '(classic)'}: "
            f"{doc.get('code')} {doc.get('message')}"
        )

    # -- the worker ----------------------------------------------------------------------
    async def _run(self) -> None:
        next_full = time.monotonic() + self.interval
        while True:
            timeout = max(0.0, next_full - time.monotonic()) if self.interval > 0 else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                next_full = time.monotonic() + self.interval
                self._due |= self._known()
            self._wake.clear()
            while self._due and self.link.connected:
                name = min(self._due)
                self._due.discard(name)
                try:
                    await self._reconcile(name)
                except (EdgeloopError, TimeoutError) as err:
                    log.warning("shadow %r not synced yet: %s", name or "(classic)", err)
                    self._due.add(name)
                    await asyncio.sleep(RETRY_DELAY)

    async def _reconcile(self, name: str) -> None:
        record = dict(self._records.get(name) or {})
        generation = record.get("generation", 0)
        local_doc = self.shadows.document(self.thing, name)
        if record.get("deleted") and local_doc is None:
            await self._request(name, "delete", {})
            self._settle(name, generation, None)
            return
        cloud = await self._request(name, "get", {})
        local_doc = self.shadows.document(self.thing, name)  # it may have changed meanwhile
        version = cloud.get("version") if cloud is not None else None
        plan = reconcile(
            local_doc.state() if local_doc is not None else None,
            cloud.get("state") if cloud is not None else None,
            pending_desired=record.get("desired"),
            cloud_changed=version != record.get("version"),
        )
        if plan.discarded:
            log.warning(
                "desired changes made on the hub to shadow %r were overridden by the cloud's "
                "(it changed too): %s",
                name or "(classic)",
                plan.discarded,
            )
        if plan.to_local:
            token = f"{SYNC_TOKEN}{secrets.token_hex(8)}"
            self.shadows.update(self.thing, name, {"state": plan.to_local, "clientToken": token})
        if plan.to_cloud:
            accepted = await self._request(name, "update", {"state": plan.to_cloud})
            version = accepted.get("version") if accepted else version
        self.reconciled += 1
        self._settle(name, generation, version)

    def _settle(self, name: str, generation: int, version: Any) -> None:
        record = self._records.get(name) or {}
        if record.get("generation", 0) != generation:
            # Changed again while syncing: keep it dirty (pushing a change twice is harmless).
            record["version"] = version
            self._due.add(name)
        elif version is None:
            self._records.pop(name, None)
        else:
            self._records[name] = {"version": version}
        self._save()


# -- provisioning by claim -------------------------------------------------------------
# The topics are the cloud's contract (AWS IoT fleet provisioning, plus edgeloop's
# rotation); the edge does not import the cloud's code, so they are spelled out here.
_CREATE_FROM_CSR = "$aws/certificates/create-from-csr/json"
_PRIVATE_REPLIES = "edgeloop/replies"  # + /<client id>/...: readable by that client alone


def _provision_topic(template: str) -> str:
    return f"$aws/provisioning-templates/{template}/provision/json"


def _rotate_topic(common_name: str) -> str:
    return f"edgeloop/certificates/{common_name}/rotate"


def _new_key_and_csr() -> tuple[bytes, str]:
    """A new EC P-256 key (PEM) and a CSR for it; the cloud sets the subject itself."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeloop-hub")]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _common_name(certificate_pem: str) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as err:
        raise CloudError(f"the cloud sent a certificate that is not PEM ({err})") from err
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CloudError("the cloud sent a certificate without a subject CN")
    return str(names[0].value)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


class _Dropped(CloudError):
    """The cloud closed a provisioning connection (another holder of the claim took it)."""


class _Exchange:
    """One short MQTT 5 connection that sends requests and waits for their answers."""

    def __init__(
        self, settings: CloudConnection, cert: Path, key: Path, client_id: str, who: str
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.settings = settings
        self.who = who
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        try:
            self._client.tls_set(ca_certs=str(settings.ca), certfile=str(cert), keyfile=str(key))
        except (OSError, ValueError) as err:
            raise CloudError(f"cannot use {who} ({cert}, {key}, {settings.ca}): {err}") from err
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._correlation = b""
        # The broker makes the certificate's CN the client id (so that no certificate can
        # take another's session): answers come to a reply topic under that name.
        self._client_id = client_id

    def __enter__(self) -> _Exchange:
        s = self.settings
        try:
            self._client.connect(s.host, s.port, keepalive=s.keepalive)
        except (OSError, ssl.SSLError, ValueError) as err:
            raise CloudError(
                f"cannot reach the cloud at {s.endpoint} with {self.who}: {err}"
            ) from err
        self._client.loop_start()
        try:
            _, reason = self._next("connect", PROVISIONING_TIMEOUT)
            if reason.is_failure:
                raise CloudError(f"the cloud at {s.endpoint} refused {self.who}: {reason}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def request(self, topic: str, body: JsonObject, what: str) -> JsonObject:
        """Publish ``body`` on ``topic``; the accepted answer, or CloudError with the reason."""
        from paho.mqtt.packettypes import PacketTypes

        # Answers come to a reply topic that only this client id may read: on AWS's shared
        # .../accepted topic they would reach every claim holder connected at the time.
        reply = f"{_PRIVATE_REPLIES}/{self._client_id}/{secrets.token_hex(4)}"
        self._client.subscribe([(f"{reply}/accepted", 1), (f"{reply}/rejected", 1)])
        self._next("subscribe", PROVISIONING_TIMEOUT)
        self._correlation = secrets.token_bytes(16)
        properties = _paho_properties(PacketTypes.PUBLISH)
        properties.CorrelationData = self._correlation
        properties.ResponseTopic = reply
        payload = json.dumps(body)
        # A template the cloud made a moment ago reaches its broker's ACL within about a
        # second: a publish refused as not authorized is tried again a few times.
        for attempt in range(6):
            self._client.publish(topic, payload, qos=1, properties=properties)
            kind, value = self._next("answer", PROVISIONING_TIMEOUT, also=("published",))
            if kind == "published" and value.is_failure:
                if attempt < 5:
                    time.sleep(1.0)
                    continue
                raise CloudError(
                    f"{what}: the cloud's broker does not let {self.who} publish on {topic} "
                    f"({value}); is the claim's template registered in the cloud?"
                )
            if kind == "published":
                kind, value = self._next("answer", PROVISIONING_TIMEOUT)
            break
        outcome, document = value
        if outcome == "rejected":
            raise CloudError(
                f"{what} was refused by the cloud: {document.get('statusCode')} "
                f"{document.get('errorCode')}: {document.get('errorMessage')}"
            )
        if not isinstance(document, dict):
            raise CloudError(f"{what}: the cloud's answer is not a JSON object")
        return document

    def _next(self, kind: str, timeout: float, also: tuple[str, ...] = ()) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CloudError(
                    f"the cloud at {self.settings.endpoint} did not answer {self.who} within "
                    f"{timeout:g} s (waiting for its {kind})"
                ) from None
            if event[0] == "disconnected" and kind != "connect":
                raise _Dropped(
                    f"the cloud at {self.settings.endpoint} closed {self.who}'s connection "
                    f"while waiting for its {kind} ({event[1]})"
                )
            if event[0] == kind or event[0] in also:
                return event

    # paho callbacks (its thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._events.put(("connect", reason))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._events.put(("disconnected", reason))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self._events.put(("subscribe", reasons))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._events.put(("published", reason))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        props = getattr(message, "properties", None)
        if getattr(props, "CorrelationData", None) != self._correlation:
            return  # another device's answer: the broker sends them to every claim
        outcome = "accepted" if message.topic.endswith("/accepted") else "rejected"
        try:
            document = json.loads(message.payload)
        except ValueError:
            document = {"errorMessage": "the cloud's answer is not JSON"}
        self._events.put(("answer", (outcome, document)))


def provision_by_claim(settings: CloudConnection) -> str:
    """Get the hub its own certificate and thing with its claim; the thing's name.

    Writes ``settings.key`` and ``settings.cert`` (0600) when done; CloudError, naming
    the step and the cloud's reason, when the cloud refuses or does not answer.
    """
    claim = settings.claim
    if claim is None:
        raise CloudError("the hub has no claim to provision itself with (cloud.claim)")
    template = claim.template
    interim_key, csr = _new_key_and_csr()
    who = f"the claim of template {template!r}"
    try:
        claim_cn = _common_name(claim.cert.read_text())
    except OSError as err:
        raise CloudError(f"cannot read the claim certificate {claim.cert}: {err}") from err
    # The broker names a connection after its certificate's CN, so hubs provisioning with
    # one claim at the same moment take the connection from each other: try again, later.
    rng = random.Random()
    for attempt in range(1, CLAIM_ATTEMPTS + 1):
        try:
            with _Exchange(settings, claim.cert, claim.key, claim_cn, who) as exchange:
                created = exchange.request(
                    _CREATE_FROM_CSR,
                    {"certificateSigningRequest": csr},
                    "CreateCertificateFromCsr",
                )
                provisioned = exchange.request(
                    _provision_topic(template),
                    {
                        "certificateOwnershipToken": created.get("certificateOwnershipToken"),
                        "parameters": dict(claim.parameters),
                    },
                    f"provisioning through template {template!r}",
                )
            break
        except _Dropped as err:
            if attempt == CLAIM_ATTEMPTS:
                raise
            delay = rng.uniform(0.2, 1.0) * attempt
            log.info("%s; trying again in %.1f s", err, delay)
            time.sleep(delay)
    thing = provisioned.get("thingName")
    interim_pem = created.get("certificatePem")
    if not isinstance(thing, str) or not isinstance(interim_pem, str):
        raise CloudError("the cloud's provisioning answer lacks thingName or certificatePem")
    interim_cn = _common_name(interim_pem)
    log.info("provisioned as thing %r; trading interim certificate %s", thing, interim_cn)
    final_key, csr = _new_key_and_csr()
    with tempfile.TemporaryDirectory(prefix=".provisioning-", dir=settings.cert.parent) as tmp:
        cert_path, key_path = Path(tmp) / "interim.pem", Path(tmp) / "interim.key"
        _write_private(cert_path, interim_pem.encode())
        _write_private(key_path, interim_key)
        who = f"interim certificate {interim_cn}"
        with _Exchange(settings, cert_path, key_path, interim_cn, who) as exchange:
            rotated = exchange.request(
                _rotate_topic(interim_cn),
                {"certificateId": created.get("certificateId"), "certificateSigningRequest": csr},
                f"rotating to thing {thing!r}'s certificate",
            )
    final_pem = rotated.get("certificatePem")
    if not isinstance(final_pem, str) or _common_name(final_pem) != thing:
        raise CloudError(f"the cloud's rotation answer is not a certificate of thing {thing!r}")
    _write_private(settings.key, final_key)
    _write_private(settings.cert, final_pem.encode())
    log.info("the hub is thing %r; its certificate is %s", thing, settings.cert)
    return thing
