"""Device shadows over MQTT, on AWS IoT's topics, so devices written for AWS IoT work as is.

Requests arrive on ``$aws/things/{thing}/shadow[/name/{name}]/{get,update,delete}``; the
answers go to the same topic plus ``/accepted`` or ``/rejected``, and an accepted update
also publishes ``/update/delta`` (when desired and reported differ) and
``/update/documents``. This module only maps topics and payloads onto a ``ShadowBook``;
the MQTT connection that feeds it belongs to the cloud's services.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeloop.core.errors import ShadowError
from edgeloop.core.shadow import UpdateResult, parse_payload
from edgeloop.core.shadowbook import ShadowBook

log = logging.getLogger("edgeloop.cloud.shadows")

REQUEST_FILTER = "$aws/things/+/shadow/#"
_REQUEST = re.compile(r"^\$aws/things/([^/]+)/shadow(?:/name/([^/]+))?/(get|update|delete)$")

Publish = Callable[[str, bytes], None]


@dataclass(frozen=True)
class ShadowRequest:
    """A request topic, taken apart."""

    thing: str
    name: str  # "" for the classic shadow
    operation: str  # get, update or delete

    @property
    def prefix(self) -> str:
        """The shadow's topic prefix, which answers extend."""
        named = f"/name/{self.name}" if self.name else ""
        return f"$aws/things/{self.thing}/shadow{named}"


def parse_request_topic(topic: str) -> ShadowRequest | None:
    """The request a topic carries, or None when it is not a request (e.g. an answer)."""
    match = _REQUEST.match(topic)
    if match is None:
        return None
    return ShadowRequest(match.group(1), match.group(2) or "", match.group(3))


def _dump(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class ShadowService:
    """Answers shadow requests from devices, as AWS IoT's shadow service does."""

    def __init__(self, book: ShadowBook, publish: Publish) -> None:
        self.book = book
        self.publish = publish
        # Deltas and documents follow every accepted update, whoever made it (a device
        # over MQTT, or the REST API on the same book), as AWS IoT announces them.
        book.listeners.append(self._announce)
        self._held: list[tuple[str, bytes]] | None = None

    def handle(self, topic: str, payload: bytes) -> bool:
        """Serve one message; False when ``topic`` is not a shadow request."""
        request = parse_request_topic(topic)
        if request is None:
            return False
        token: str | None = None
        try:
            body = parse_payload(payload)
            raw_token = body.get("clientToken")
            token = raw_token if isinstance(raw_token, str) else None
            if request.operation == "get":
                answer = self.book.get(request.thing, request.name, client_token=token)
                self._answer(request, "get/accepted", answer)
            elif request.operation == "update":
                # The requester hears /accepted before the announcements the update causes.
                self._held = []
                try:
                    result = self.book.update(request.thing, request.name, body)
                    self._answer(request, "update/accepted", result.accepted)
                finally:
                    held, self._held = self._held, None
                for topic, payload in held:
                    self.publish(topic, payload)
            else:
                accepted = self.book.delete(request.thing, request.name, body)
                self._answer(request, "delete/accepted", accepted)
        except ShadowError as err:
            if err.client_token is None and token is not None:
                err.client_token = token
            self._answer(request, f"{request.operation}/rejected", err.to_document(self.book.now()))
        return True

    def _announce(self, thing: str, name: str, result: UpdateResult | None) -> None:
        if result is None:
            return  # deletes are answered to their requester only
        prefix = ShadowRequest(thing, name, "update").prefix
        out = [] if result.delta is None else [(f"{prefix}/update/delta", _dump(result.delta))]
        out.append((f"{prefix}/update/documents", _dump(result.documents)))
        if self._held is not None:
            self._held.extend(out)
        else:
            for topic, payload in out:
                self.publish(topic, payload)

    def _answer(self, request: ShadowRequest, suffix: str, document: Mapping[str, Any]) -> None:
        self.publish(f"{request.prefix}/{suffix}", _dump(document))
