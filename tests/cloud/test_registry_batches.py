"""The registry's batch writes (connectivity, shadows, certificates), on both backends."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgeloop.cloud.pki import CertificateAuthority
from edgeloop.cloud.registry import ConnectivityEvent, Registry, ShadowWrite
from edgeloop.core.errors import ConflictError, NotFoundError, ValidationError
from edgeloop.core.shadowbook import ShadowBook

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def kinds(registry: Registry) -> Counter[str]:
    return Counter(event.kind for event in registry.events(limit=10_000))


def test_connectivity_batch_applies_in_order_and_skips_the_unknown(registry: Registry) -> None:
    registry.create_things({"hub-1": {}, "hub-2": {}})
    registry.create_group("online", kind="dynamic", query="connectivity.connected:true")
    results = registry.set_connectivity_many(
        [
            ConnectivityEvent("hub-1", True, T0 + timedelta(seconds=10), "hub-1"),
            # The previous session's last will, late: older than the birth before it.
            ConnectivityEvent("hub-1", False, T0, "hub-1", "LWT"),
            ConnectivityEvent("ghost", True, T0),
            ConnectivityEvent("hub-2", True, T0, "hub-2"),
            ConnectivityEvent("hub-2", False, T0 + timedelta(seconds=5), "hub-2", "LWT"),
        ]
    )
    assert results == [True, False, None, True, True]
    one, two = registry.connectivity("hub-1"), registry.connectivity("hub-2")
    assert one is not None and (one.connected, one.since) == (True, T0 + timedelta(seconds=10))
    assert two is not None and (two.connected, two.disconnect_reason) == (False, "LWT")
    assert registry.group_members("online") == ["hub-1"]
    assert registry.fleet_query("connectivity.connected:false") == ["hub-2"]
    events = kinds(registry)
    assert (events["thing.connected"], events["thing.disconnected"]) == (2, 1)
    assert registry.set_connectivity_many([]) == []
    with pytest.raises(NotFoundError):
        registry.set_connectivity("ghost", True, T0)
    with pytest.raises(ValidationError):
        registry.set_connectivity_many([ConnectivityEvent("hub-1", True, datetime(2030, 1, 1))])


def test_shadow_batch_writes_in_order_and_names_the_unknown(registry: Registry) -> None:
    registry.create_thing("hub-1")
    unknown = registry.put_shadows(
        [
            ShadowWrite("hub-1", "", {"state": {"reported": {"t": 1}}}, 1),
            ShadowWrite("hub-1", "", {"state": {"reported": {"t": 2}}}, 2),
            ShadowWrite("ghost", "", {"state": {}}, 1),
            ShadowWrite("hub-1", "cfg", None, 3, T0),
        ]
    )
    assert unknown == {"ghost"}
    classic, named = registry.get_shadow("hub-1"), registry.get_shadow("hub-1", "cfg")
    assert classic is not None and (classic.version, classic.document) == (
        2,
        {"state": {"reported": {"t": 2}}},
    )
    assert named is not None and (named.document, named.version, named.updated_at) == (
        None,
        3,
        T0,
    )
    assert registry.fleet_query("shadow.reported.t:2") == ["hub-1"]
    events = kinds(registry)
    assert (events["shadow.updated"], events["shadow.deleted"]) == (2, 1)
    # A bad write refuses the whole batch before anything is written.
    with pytest.raises(ValidationError):
        registry.put_shadows(
            [ShadowWrite("hub-1", "", {"state": {}}, 3), ShadowWrite("hub-1", "bad name", {}, 1)]
        )
    again = registry.get_shadow("hub-1")
    assert again is not None and again.version == 2


def test_shadow_storage_batch_holds_saves_until_it_ends(registry: Registry) -> None:
    registry.create_thing("hub-1")
    storage = registry.shadow_storage()
    book = ShadowBook(storage, clock=lambda: 1_700_000_000)
    with storage.batch() as written:
        book.update("hub-1", "", {"state": {"reported": {"on": True}}})
        book.update("ghost", "", {"state": {"reported": {"on": True}}})  # no 404 yet
        assert registry.get_shadow("hub-1") is None  # held
    assert written.unknown == {"ghost"}
    stored = registry.get_shadow("hub-1")
    assert stored is not None and stored.version == 1
    assert registry.get_shadow("ghost") is None
    with storage.batch(), pytest.raises(RuntimeError, match="already open"), storage.batch():
        pass


def test_certificates_recorded_in_bulk(registry: Registry, tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    registry.create_things({"hub-1": {}, "hub-2": {}})
    pems = {
        thing: ca.issue_device_certificate(thing).certificate_pem for thing in ("hub-1", "hub-2")
    }
    assert registry.record_certificates(pems) == 2
    recorded = registry.list_certificates()
    assert sorted((c.thing, c.status, c.kind) for c in recorded) == [
        ("hub-1", "ACTIVE", "device"),
        ("hub-2", "ACTIVE", "device"),
    ]
    assert all(registry.is_active(c.certificate_id) for c in recorded)
    assert kinds(registry)["certificate.recorded"] == 2
    with pytest.raises(ConflictError, match="already recorded"):
        registry.record_certificates({"hub-1": pems["hub-1"]})
    extra = ca.issue_device_certificate("hub-3").certificate_pem
    with pytest.raises(NotFoundError, match="hub-3"):
        registry.record_certificates({"hub-3": extra})
    assert len(registry.list_certificates()) == 2
    assert registry.record_certificates({}) == 0
