"""The cloud's shadow service: AWS IoT shadow topics in, accepted/rejected/delta/documents out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeloop.cloud.shadow_service import ShadowService, parse_request_topic
from edgeloop.core.shadowbook import ShadowBook, ShadowEntry


class MemoryStorage:
    """Entries in a dict: the service's logic does not depend on where they live."""

    def __init__(self) -> None:
        self.saved: dict[tuple[str, str], ShadowEntry] = {}

    def load(self, thing: str) -> dict[str, ShadowEntry]:
        return {name: e for (t, name), e in self.saved.items() if t == thing}

    def save(self, thing: str, name: str, entry: ShadowEntry) -> None:
        self.saved[(thing, name)] = entry


@pytest.fixture
def wire() -> tuple[ShadowService, list[tuple[str, dict[str, Any]]]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    book = ShadowBook(MemoryStorage(), clock=lambda: 1_700_000_000)
    service = ShadowService(book, lambda topic, payload: sent.append((topic, json.loads(payload))))
    return service, sent


def test_request_topics_are_recognised() -> None:
    assert parse_request_topic("$aws/things/pump-1/shadow/update") is not None
    named = parse_request_topic("$aws/things/pump-1/shadow/name/cfg/get")
    assert named is not None and (named.thing, named.name, named.operation) == (
        "pump-1",
        "cfg",
        "get",
    )
    for topic in (
        "$aws/things/pump-1/shadow/update/accepted",
        "$aws/things/pump-1/shadow/update/delta",
        "$aws/things/pump-1/jobs/get",
        "edgeloop/things/pump-1/telemetry",
    ):
        assert parse_request_topic(topic) is None


def test_update_publishes_accepted_delta_and_documents(wire: Any) -> None:
    service, sent = wire
    request = {
        "state": {"desired": {"mode": "eco"}, "reported": {"mode": "boost"}},
        "clientToken": "t1",
    }
    assert service.handle("$aws/things/pump-1/shadow/update", json.dumps(request).encode())
    topics = [topic for topic, _ in sent]
    prefix = "$aws/things/pump-1/shadow/update"
    assert topics == [f"{prefix}/accepted", f"{prefix}/delta", f"{prefix}/documents"]
    accepted, delta, documents = (doc for _, doc in sent)
    assert accepted["version"] == 1 and accepted["clientToken"] == "t1"
    assert delta["state"] == {"mode": "eco"}
    assert documents["current"]["state"]["reported"] == {"mode": "boost"}


def test_named_get_after_update_and_missing_shadow_rejected(wire: Any) -> None:
    service, sent = wire
    service.handle(
        "$aws/things/pump-1/shadow/name/cfg/update",
        b'{"state": {"reported": {"rpm": 900}}}',
    )
    sent.clear()
    service.handle("$aws/things/pump-1/shadow/name/cfg/get", b'{"clientToken": "g"}')
    topic, doc = sent[-1]
    assert topic == "$aws/things/pump-1/shadow/name/cfg/get/accepted"
    assert doc["state"]["reported"] == {"rpm": 900} and doc["clientToken"] == "g"
    service.handle("$aws/things/pump-1/shadow/name/other/get", b'{"clientToken": "m"}')
    topic, doc = sent[-1]
    assert topic == "$aws/things/pump-1/shadow/name/other/get/rejected"
    assert doc["code"] == 404 and doc["clientToken"] == "m"


def test_stale_version_and_bad_json_are_rejected_with_the_token(wire: Any) -> None:
    service, sent = wire
    service.handle("$aws/things/t/shadow/update", b'{"state": {"reported": {"a": 1}}}')
    service.handle(
        "$aws/things/t/shadow/update",
        b'{"state": {"reported": {"a": 2}}, "version": 7, "clientToken": "v"}',
    )
    topic, doc = sent[-1]
    assert topic == "$aws/things/t/shadow/update/rejected"
    assert doc["code"] == 409 and doc["clientToken"] == "v"
    service.handle("$aws/things/t/shadow/update", b"{not json")
    topic, doc = sent[-1]
    assert topic.endswith("/update/rejected") and doc["code"] == 400


def test_delete_then_recreate_continues_the_version(wire: Any) -> None:
    service, sent = wire
    service.handle("$aws/things/t/shadow/update", b'{"state": {"reported": {"a": 1}}}')
    service.handle("$aws/things/t/shadow/delete", b"")
    topic, doc = sent[-1]
    assert topic == "$aws/things/t/shadow/delete/accepted" and doc["version"] == 1
    service.handle("$aws/things/t/shadow/update", b'{"state": {"reported": {"a": 2}}}')
    accepted = next(
        doc
        for topic, doc in sent
        if topic.endswith("update/accepted") and doc["state"]["reported"] == {"a": 2}
    )
    assert accepted["version"] == 2


def test_updates_made_elsewhere_on_the_book_are_announced(wire: Any) -> None:
    service, sent = wire
    service.book.update("t", "", {"state": {"desired": {"fan": "on"}}})  # e.g. the REST API
    topics = [topic for topic, _ in sent]
    assert topics == ["$aws/things/t/shadow/update/delta", "$aws/things/t/shadow/update/documents"]
    assert sent[0][1]["state"] == {"fan": "on"}
