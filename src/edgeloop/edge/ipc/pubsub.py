"""The hub's local publish/subscribe router, behind PublishToTopic and SubscribeToTopic.

Delivery policy: every subscription has a bounded queue drained by its own task. A
publisher never waits for a subscriber. When a subscriber cannot keep up and its queue is
full, the OLDEST queued message is dropped to make room (the newest telemetry is worth
more than stale telemetry) and the subscription's ``dropped`` counter says how many. A
dead subscriber's subscription is removed when its connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edgeloop.core.topics import TopicTrie

log = logging.getLogger("edgeloop.ipc.pubsub")

DEFAULT_QUEUE_LIMIT = 1024
MATCH_CACHE_LIMIT = 4096


@dataclass
class Published:
    """One message as published: JSON (any JSON value) or bytes, and where it came from."""

    topic: str
    payload: Any  # a JSON value, or bytes for a binary message
    binary: bool
    source: str  # the publishing component, for RECEIVE_MESSAGES_FROM_OTHERS
    # The encoded event, made once and shared by every subscriber it fans out to.
    encoded: bytes | None = field(default=None, compare=False)


Deliver = Callable[[Published], Awaitable[None]]


@dataclass(eq=False)
class Subscription:
    """One subscriber's filter, queue and counters."""

    topic_filter: str
    component: str
    deliver: Deliver
    from_others_only: bool = False
    limit: int = DEFAULT_QUEUE_LIMIT
    delivered: int = 0
    dropped: int = 0
    _queue: deque[Published] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def offer(self, message: Published) -> None:
        """Queue a message without waiting; drop the oldest when full."""
        if self.from_others_only and message.source == self.component:
            return
        if len(self._queue) >= self.limit:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "%s is not keeping up with %s: %d message(s) dropped so far",
                    self.component,
                    self.topic_filter,
                    self.dropped,
                )
        self._queue.append(message)
        self._ready.set()

    async def _drain(self) -> None:
        while True:
            await self._ready.wait()
            while self._queue:
                message = self._queue.popleft()
                try:
                    await self.deliver(message)
                except (ConnectionError, OSError):
                    return  # the connection is gone; its close removes us
                self.delivered += 1
            self._ready.clear()

    @property
    def pending(self) -> int:
        """Messages queued and not yet delivered."""
        return len(self._queue)


class PubSub:
    """Routes local messages to the subscriptions whose filter matches."""

    def __init__(self) -> None:
        self._trie: TopicTrie[Subscription] = TopicTrie()
        # Topics repeat (a sensor publishes on the same few): remember who matched, until
        # the subscriptions change.
        self._matches: dict[str, list[Subscription]] = {}
        self.published = 0
        self._retired_dropped = 0  # what ended subscriptions had dropped

    def subscribe(self, subscription: Subscription) -> Subscription:
        """Start delivering to a subscription."""
        self._trie.add(subscription.topic_filter, subscription)
        self._matches.clear()
        subscription._task = asyncio.get_running_loop().create_task(
            subscription._drain(), name=f"pubsub:{subscription.component}"
        )
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to a subscription and end its task."""
        if self._trie.remove(subscription.topic_filter, subscription):
            self._retired_dropped += subscription.dropped
        self._matches.clear()
        task, subscription._task = subscription._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def publish(self, message: Published) -> int:
        """Offer a message to every matching subscription; returns how many matched."""
        self.published += 1
        matched = self._matches.get(message.topic)
        if matched is None:
            matched = self._trie.match(message.topic)
            if len(self._matches) >= MATCH_CACHE_LIMIT:
                self._matches.clear()
            self._matches[message.topic] = matched
        for subscription in matched:
            subscription.offer(message)
        return len(matched)

    def stats(self) -> dict[str, int]:
        """Counters for `edgeloop device status`: traffic, subscriptions, drops."""
        live = [subscription for _, subscription in self._trie.filters()]
        return {
            "published": self.published,
            "subscriptions": len(live),
            "pending": sum(s.pending for s in live),
            "dropped": self._retired_dropped + sum(s.dropped for s in live),
        }
