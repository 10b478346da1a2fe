"""High-priority telemetry over MQTT into the lake: alerts and events, as they happen.

Hubs publish one batch a message (QoS 1) on ``edgeloop/things/{thing}/telemetry/{stream}``
(``edgeloop.core.telemetry.telemetry_topic``). The broker lets a thing publish there
only under its own name, so the topic says who sent it; a batch that names another
thing or stream than its topic is not trusted, and is quarantined.

:meth:`LakeMqttIngest.handle` has stored the message when it returns, and never raises
(the MQTT client's thread must live on). Called from the client's message callback, the
broker's PUBACK goes out only after that, so a message the cloud acknowledged is kept:

- in the lake, or its quarantine when it cannot be read (MQTT has no one to tell);
- or, when the lake cannot take it now (its database or object store is down), in a
  local inbox folder, written and synced first; the inbox is replayed into the lake by
  the next message that gets through, or by :meth:`LakeMqttIngest.replay_inbox`.

A redelivery (after a crash, or of a replayed message) is a duplicate the lake drops.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import uuid
from pathlib import Path

from edgeloop.cloud.lake import IngestResult, Lake
from edgeloop.core.errors import ValidationError
from edgeloop.core.telemetry import TELEMETRY_TOPIC_FILTER, decode_batch, parse_telemetry_topic

__all__ = ["TELEMETRY_TOPIC_FILTER", "LakeMqttIngest"]

log = logging.getLogger("edgeloop.cloud.lake")

_TOPIC_LENGTH = struct.Struct("<H")


class LakeMqttIngest:
    """Telemetry messages from hubs into a lake, with a local inbox for outages."""

    topic_filter = TELEMETRY_TOPIC_FILTER  # subscribe with QoS 1

    def __init__(self, lake: Lake, inbox: Path) -> None:
        self.lake = lake
        self.inbox = inbox
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._waiting = any(self.inbox.glob("*.msg"))
        self._replaying = threading.Lock()

    @staticmethod
    def handles(topic: str) -> bool:
        """Whether ``topic`` is a hub's telemetry topic."""
        return parse_telemetry_topic(topic) is not None

    def handle(self, topic: str, payload: bytes) -> IngestResult | None:
        """Store one message; its result, or None when it was quarantined whole, kept in
        the inbox, or not a telemetry topic."""
        if self._waiting:
            self.replay_inbox()
        try:
            return self._store(topic, payload)
        except Exception:
            log.exception("the lake cannot take telemetry on %s now: kept in %s", topic, self.inbox)
            self._keep(topic, payload)
            return None

    def _store(self, topic: str, payload: bytes) -> IngestResult | None:
        names = parse_telemetry_topic(topic)
        if names is None:
            log.warning("not a telemetry topic, ignored: %s", topic)
            return None
        thing, stream = names
        try:
            batch = decode_batch(payload)
            if batch.thing != thing or batch.stream != stream:
                raise ValidationError(
                    f"the batch is of {batch.thing!r}/{batch.stream!r}, published on {topic}",
                    field="header.thing" if batch.thing != thing else "header.stream",
                )
        except ValidationError as err:
            log.warning("telemetry on %s quarantined: %s", topic, err)
            self.lake.quarantine_message(
                thing, payload, reason=err.reason, field=err.field, stream=stream, source="mqtt"
            )
            return None
        return self.lake.ingest(batch, source="mqtt")

    def _keep(self, topic: str, payload: bytes) -> None:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.inbox / f".{name}.tmp"
        encoded = topic.encode()
        try:
            with tmp.open("wb") as fh:
                fh.write(_TOPIC_LENGTH.pack(len(encoded)) + encoded + payload)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.inbox / f"{name}.msg")
            self._waiting = True
        except OSError:
            log.critical("telemetry on %s LOST: the inbox %s is not writable", topic, self.inbox)

    def replay_inbox(self) -> int:
        """Move what the inbox holds into the lake, oldest first; how many went."""
        if not self._replaying.acquire(blocking=False):
            return 0
        moved = 0
        try:
            for path in sorted(self.inbox.glob("*.msg")):
                data = path.read_bytes()
                (length,) = _TOPIC_LENGTH.unpack_from(data)
                topic = data[2 : 2 + length].decode()
                try:
                    self._store(topic, data[2 + length :])
                except Exception:
                    log.warning("the lake still cannot take telemetry; the inbox waits")
                    return moved
                path.unlink()
                moved += 1
            self._waiting = False
            return moved
        finally:
            self._replaying.release()
