"""The shadow service serving queued requests in batches: one write, then the answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgeloop.cloud.db import Database
from edgeloop.cloud.registry import Registry, RegistryShadowStorage
from edgeloop.cloud.shadow_service import ShadowService
from edgeloop.core.errors import ShadowError
from edgeloop.core.shadowbook import ShadowBook

Sent = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    db = Database(f"sqlite:///{tmp_path / 'edgeloop.db'}")
    db.migrate()
    registry = Registry(db)
    registry.create_things({"hub-1": {}, "hub-2": {}})
    yield registry
    db.dispose()


def _service(storage: Any) -> tuple[ShadowService, ShadowBook, Sent]:
    sent: Sent = []
    book = ShadowBook(storage, clock=lambda: 1_700_000_000)
    service = ShadowService(book, lambda topic, payload: sent.append((topic, json.loads(payload))))
    return service, book, sent


def _update(thing: str, token: str, **reported: Any) -> tuple[str, bytes]:
    body = {"state": {"reported": reported}, "clientToken": token}
    return f"$aws/things/{thing}/shadow/update", json.dumps(body).encode()


async def _submit_all(service: ShadowService, messages: list[tuple[str, bytes]]) -> None:
    for topic, payload in messages:
        assert service.submit(topic, payload)
    assert not service.submit("$aws/things/hub-1/shadow/update/accepted", b"{}")
    await asyncio.sleep(0)  # the batch runs once the loop gets to it
    await asyncio.sleep(0)


def test_queued_requests_share_one_write_and_are_answered_after_it(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = registry.shadow_storage()
    service, _, sent = _service(storage)
    writes: list[int] = []
    put_shadows = registry.put_shadows

    def counting(batch: Any) -> set[str]:
        writes.append(len(batch))
        assert not sent, "answered before the write"
        return put_shadows(batch)

    monkeypatch.setattr(registry, "put_shadows", counting)
    messages = [
        _update("hub-1", "a", temp=20),
        _update("ghost", "b", temp=1),
        _update("hub-1", "c", temp=21),
        ("$aws/things/hub-2/shadow/get", b'{"clientToken": "d"}'),
    ]
    asyncio.run(_submit_all(service, messages))
    assert writes == [3]  # two of hub-1, one of the unknown thing, in one transaction
    answers = [(topic.split("/shadow/")[1], doc.get("clientToken")) for topic, doc in sent]
    assert answers == [
        ("update/accepted", "a"),
        ("update/documents", "a"),
        ("update/rejected", "b"),
        ("update/accepted", "c"),
        ("update/documents", "c"),
        ("get/rejected", "d"),
    ]
    rejected = dict(sent)["$aws/things/ghost/shadow/update/rejected"]
    assert (rejected["code"], rejected["message"]) == (404, "No thing named 'ghost' is registered")
    stored = registry.get_shadow("hub-1")
    assert stored is not None and stored.version == 2
    assert stored.document is not None and stored.document["state"]["reported"] == {"temp": 21}


class FailingStorage(RegistryShadowStorage):
    """Storage whose batch write fails, as a database gone away would."""

    @contextmanager
    def batch(self) -> Iterator[Any]:
        with super().batch():
            yield None
            raise ShadowError(500, "the shadow store failed: database is locked")


def test_a_failed_batch_rejects_every_request_and_keeps_nothing(registry: Registry) -> None:
    service, book, sent = _service(FailingStorage(registry))
    asyncio.run(_submit_all(service, [_update("hub-1", "a", on=True), _update("hub-2", "b")]))
    assert [(topic.rsplit("/", 1)[1], doc["code"], doc["clientToken"]) for topic, doc in sent] == [
        ("rejected", 500, "a"),
        ("rejected", 500, "b"),
    ]
    # Memory forgot the update the store lacks: the next read goes to storage.
    assert book.document("hub-1") is None
    assert registry.get_shadow("hub-1") is None


def test_handle_still_serves_at_once(registry: Registry) -> None:
    service, _, sent = _service(registry.shadow_storage())
    topic, payload = _update("hub-1", "a", on=True)
    assert service.handle(topic, payload)
    assert [t.split("/shadow/")[1] for t, _ in sent] == ["update/accepted", "update/documents"]
    assert registry.get_shadow("hub-1") is not None
