"""Device shadows over MQTT, on AWS IoT's topics, so devices written for AWS IoT work as is.

Requests arrive on ``$aws/things/{thing}/shadow[/name/{name}]/{get,update,delete}``; the
answers go to the same topic plus ``/accepted`` or ``/rejected``, and an accepted update
also publishes ``/update/delta`` (when desired and reported differ) and
``/update/documents``. This module only maps topics and payloads onto a ``ShadowBook``;
the MQTT connection that feeds it belongs to the cloud's services.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeloop.core.errors import ShadowError
from edgeloop.core.shadow import UpdateResult, parse_payload
from edgeloop.core.shadowbook import ShadowBook

log = logging.getLogger("edgeloop.cloud.shadows")

REQUEST_FILTER = "$aws/things/+/shadow/#"
_REQUEST = re.compile(r"^\$aws/things/([^/]+)/shadow(?:/name/([^/]+))?/(get|update|delete)$")

Publish = Callable[[str, bytes], None]
Message = tuple[str, bytes]  # a topic and a payload to publish
MAX_BATCH = 500  # requests served (and stored) together at most


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
    """Answers shadow requests from devices, as AWS IoT's shadow service does.

    ``handle`` serves one request at once. ``submit`` (on the event loop's thread) queues
    it instead: every request queued before the loop gets to them is served in one batch,
    whose saves the storage writes together when it offers ``batch()``
    (``RegistryShadowStorage`` does: one database transaction), and answered once that
    write is done. A fleet's updates then cost one commit per batch, not one each.
    """

    def __init__(self, book: ShadowBook, publish: Publish) -> None:
        self.book = book
        self.publish = publish
        # Deltas and documents follow every accepted update, whoever made it (a device
        # over MQTT, or the REST API on the same book), as AWS IoT announces them.
        book.listeners.append(self._announce)
        self._announced: list[Message] | None = None
        self._queue: list[tuple[ShadowRequest, bytes]] = []
        self._scheduled = False

    def handle(self, topic: str, payload: bytes) -> bool:
        """Serve one message; False when ``topic`` is not a shadow request."""
        request = parse_request_topic(topic)
        if request is None:
            return False
        _, out = self._serve(request, payload)
        for answer_topic, answer in out:
            self.publish(answer_topic, answer)
        return True

    def submit(self, topic: str, payload: bytes) -> bool:
        """Queue one message to be served in the next batch; False when ``topic`` is not a
        shadow request. Call on the event loop's thread."""
        request = parse_request_topic(topic)
        if request is None:
            return False
        self._queue.append((request, payload))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._serve_queue)
        return True

    def serve_batch(self, requests: Sequence[tuple[ShadowRequest, bytes]]) -> None:
        """Serve requests in order, store their changes together, then answer them all."""
        batch = getattr(self.book.storage, "batch", None)
        if batch is None:
            for request, payload in requests:
                for topic, answer in self._serve(request, payload)[1]:
                    self.publish(topic, answer)
            return
        served: list[tuple[ShadowRequest, str | None, list[Message]]] = []
        try:
            with batch() as written:
                for request, payload in requests:
                    token, out = self._serve(request, payload)
                    served.append((request, token, out))
        except Exception as err:
            # Nothing of the batch is stored: memory must not keep what storage lacks.
            if not isinstance(err, ShadowError):
                log.exception("a batch of %d shadow requests failed", len(requests))
            failure = err if isinstance(err, ShadowError) else ShadowError(500, "internal error")
            for thing in {request.thing for request, _ in requests}:
                self.book.forget(thing)
            for request, token, _ in served:
                self._reject(
                    request, ShadowError(failure.code, failure.message, client_token=token)
                )
            return
        unknown: Collection[str] = getattr(written, "unknown", ())
        for request, token, out in served:
            if request.thing in unknown:
                self.book.forget(request.thing)
                missing = f"No thing named {request.thing!r} is registered"
                self._reject(request, ShadowError(404, missing, client_token=token))
                continue
            for topic, answer in out:
                self.publish(topic, answer)

    def _serve_queue(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        if self._queue:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._serve_queue)
        try:
            self.serve_batch(batch)
        except Exception:
            log.exception("serving %d shadow requests failed", len(batch))

    def _serve(self, request: ShadowRequest, payload: bytes) -> tuple[str | None, list[Message]]:
        """Serve one request: its client token, and what to publish (the answer first,
        then the announcements it caused)."""
        token: str | None = None
        answers: list[Message] = []
        self._announced = []
        try:
            body = parse_payload(payload)
            raw_token = body.get("clientToken")
            token = raw_token if isinstance(raw_token, str) else None
            if request.operation == "get":
                answer = self.book.get(request.thing, request.name, client_token=token)
                answers.append(_message(request, "get/accepted", answer))
            elif request.operation == "update":
                result = self.book.update(request.thing, request.name, body)
                answers.append(_message(request, "update/accepted", result.accepted))
            else:
                accepted = self.book.delete(request.thing, request.name, body)
                answers.append(_message(request, "delete/accepted", accepted))
        except ShadowError as err:
            if err.client_token is None and token is not None:
                err.client_token = token
            answers.append(
                _message(request, f"{request.operation}/rejected", err.to_document(self.book.now()))
            )
        finally:
            announced, self._announced = self._announced, None
        return token, answers + announced

    def _announce(self, thing: str, name: str, result: UpdateResult | None) -> None:
        if result is None:
            return  # deletes are answered to their requester only
        prefix = ShadowRequest(thing, name, "update").prefix
        out = [] if result.delta is None else [(f"{prefix}/update/delta", _dump(result.delta))]
        out.append((f"{prefix}/update/documents", _dump(result.documents)))
        if self._announced is not None:
            self._announced.extend(out)  # published after the answer (and the batch's write)
        else:
            for topic, payload in out:
                self.publish(topic, payload)

    def _reject(self, request: ShadowRequest, err: ShadowError) -> None:
        document = err.to_document(self.book.now())
        topic, payload = _message(request, f"{request.operation}/rejected", document)
        self.publish(topic, payload)


def _message(request: ShadowRequest, suffix: str, document: Mapping[str, Any]) -> Message:
    return f"{request.prefix}/{suffix}", _dump(document)
