"""The fleet registry: things, groups, certificates, CAs, connectivity and stored shadows.

``Registry(db)`` is the one writer of those tables. Every write runs in one transaction
and appends an ``events`` row (the audit log) in it; reads return frozen dataclasses.

Fleet documents and queries. ``thing_document(name)`` is what the fleet query language
(``edgeloop.core.fleetquery``) evaluates::

    {"thingName": "hub-1", "thingGroupNames": ["kitchen", "online-hubs"],
     "attributes": {"model": "pi4"},
     "connectivity": {"connected": false, "timestamp": 1700000000000,  # epoch ms
                      "disconnectReason": "CLIENT_ERROR"},            # when given
     "shadow": {"reported": {...}, "desired": {...},                   # classic shadow
                "name": {"config": {"reported": {...}, "desired": {...}}}}}

A thing that never connected has ``{"connected": false}`` and no timestamp; sections a
thing lacks are absent.

``fleet_query`` evaluates over an in-memory cache of every thing's document, loaded with
one query per table. This registry's own writes mark the things they touch, which are
reloaded (again one query per table) by the next query; writes by other processes are
noticed through the newest ``events`` id, which every write advances, and reload the
cache. (On PostgreSQL a transaction that took an event id and commits after a later one
can slip past that check until the next write; the cache is a fast path, not a source of
truth, and ``invalidate_cache()`` drops it.)

Dynamic groups. Membership of a thing is recomputed, inside the write that changed it, for
each dynamic group whose query reads a field the write changed (``referenced_fields``) —
never by a timer. Dynamic queries see a thing's static groups only in
``thingGroupNames`` (so groups cannot depend on each other); ``fleet_query`` sees both.

Connectivity moves forward only: an event older than (or as old as) the stored one is
ignored, so a late last-will cannot mark a hub offline after its newer birth message.

Every hub's birth messages and shadow updates land in ``set_connectivity`` and
``put_shadow``; they run prebuilt Core statements (the ORM's unit of work cost three times
as much), and have batch forms, ``set_connectivity_many`` and ``put_shadows`` (behind
``RegistryShadowStorage.batch()``), that write whatever is waiting in one transaction.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgeloop.cloud import pki
from edgeloop.cloud.db import (
    CertificateRow,
    ClaimTemplateRow,
    ConnectivityRow,
    Database,
    DynamicMembershipRow,
    EventRow,
    GroupMemberRow,
    RegisteredCaRow,
    ShadowRow,
    ThingGroupRow,
    ThingRow,
    utcnow,
)
from edgeloop.core import fleetquery
from edgeloop.core.errors import (
    CloudError,
    ConflictError,
    NotFoundError,
    ShadowError,
    ValidationError,
)
from edgeloop.core.shadow import ShadowDocument
from edgeloop.core.shadowbook import ShadowEntry

__all__ = [
    "Certificate",
    "Connectivity",
    "ConnectivityEvent",
    "Event",
    "Registry",
    "RegistryShadowStorage",
    "RevokedSerial",
    "ShadowBatch",
    "ShadowWrite",
    "StoredShadow",
    "Thing",
    "ThingGroup",
    "ThingPage",
]

MAX_ATTRIBUTES = 50
MAX_ATTRIBUTE_VALUE = 800
MAX_PAGE = 250
# Beyond this many changed things, one full reload is cheaper than an IN (...) list.
_DIRTY_RELOAD_LIMIT = 500
_IN_CHUNK = 1000

_PEM = Encoding.PEM
_ATTRIBUTE_NAME = re.compile(r"[a-zA-Z0-9_.,@/:#-]{1,128}")
_GROUP_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_SHADOW_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,64}")

AttributeValue = str | int | float | bool
GroupKind = Literal["static", "dynamic"]
CertificateKind = Literal["device", "claim"]
Document = dict[str, Any]


# Statements of the hot paths (a birth message or a shadow update of every hub), built
# once: building a statement costs more than running it on SQLite.
_THING_EXISTS = select(ThingRow.name).where(ThingRow.name == bindparam("b_thing"))
_DYNAMIC_GROUPS = select(ThingGroupRow.name, ThingGroupRow.query).where(
    ThingGroupRow.kind == "dynamic"
)
_THINGS_KNOWN = select(ThingRow.name).where(
    ThingRow.name.in_(bindparam("b_things", expanding=True))
)
_CONNECTIVITY_SINCE_MANY = (
    select(ConnectivityRow.thing_name, ConnectivityRow.since, ConnectivityRow.connected)
    .where(ConnectivityRow.thing_name.in_(bindparam("b_things", expanding=True)))
    .with_for_update()
)
_CONNECTIVITY_INSERT = insert(ConnectivityRow)
_CONNECTIVITY_UPDATE = update(ConnectivityRow).where(
    ConnectivityRow.thing_name == bindparam("b_thing")
)
_SHADOW_VERSION = (
    select(ShadowRow.version)
    .where(ShadowRow.thing_name == bindparam("b_thing"), ShadowRow.name == bindparam("b_name"))
    .with_for_update()
)
_SHADOWS_OF = (
    select(ShadowRow.name, ShadowRow.document, ShadowRow.version, ShadowRow.updated_at)
    .where(ShadowRow.thing_name == bindparam("b_thing"))
    .order_by(ShadowRow.name)
)
_SHADOWS_STORED = (
    select(ShadowRow.thing_name, ShadowRow.name)
    .where(ShadowRow.thing_name.in_(bindparam("b_things", expanding=True)))
    .with_for_update()
)
_SHADOW_INSERT = insert(ShadowRow)
_SHADOW_UPDATE = update(ShadowRow).where(
    ShadowRow.thing_name == bindparam("b_thing"), ShadowRow.name == bindparam("b_name")
)
_EVENT_INSERT = insert(EventRow).returning(EventRow.id)


# --- what the registry returns ----------------------------------------------------------


@dataclass(frozen=True)
class Thing:
    """A registered thing."""

    name: str
    thing_type: str | None
    attributes: dict[str, AttributeValue]
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ThingPage:
    """One page of things; pass ``next_token`` as ``after`` for the next (None: no more)."""

    things: list[Thing]
    next_token: str | None


@dataclass(frozen=True)
class ThingGroup:
    """A static or dynamic thing group."""

    name: str
    kind: GroupKind
    query: str | None
    description: str
    created_at: datetime


@dataclass(frozen=True)
class Certificate:
    """A certificate the registry knows, by its SHA-256 fingerprint."""

    certificate_id: str
    thing: str | None
    kind: CertificateKind
    status: str
    serial: int
    issuer: str
    pem: str
    created_at: datetime
    revoked_at: datetime | None
    revoke_reason: str | None


class ConnectivityEvent(NamedTuple):
    """A connect or disconnect seen at ``at`` (a birth message, a last will)."""

    thing: str
    connected: bool
    at: datetime
    client_id: str | None = None
    reason: str | None = None  # why it disconnected
    # The connection a disconnect ends (when it started, as its birth's ``at`` says): a
    # late will of an older connection than the recorded live one is ignored.
    connection: datetime | None = None


class ShadowWrite(NamedTuple):
    """One shadow to store: ``ShadowDocument.to_json()``, or None for a deleted one."""

    thing: str
    name: str  # "" for the classic shadow
    document: Mapping[str, Any] | None
    version: int
    at: datetime | None = None  # when it changed; None: now


class RevokedSerial(NamedTuple):
    """A CRL entry: ``CertificateAuthority.crl_pem`` takes these as they are."""

    serial: int
    revoked_at: datetime


@dataclass(frozen=True)
class RegisteredCa:
    """A CA certificate a user registered."""

    fingerprint: str
    pem: str
    created_at: datetime


@dataclass(frozen=True)
class Connectivity:
    """Whether a thing is connected, since when, over which client id, and why it left."""

    thing: str
    connected: bool
    since: datetime
    client_id: str | None
    disconnect_reason: str | None


@dataclass(frozen=True)
class StoredShadow:
    """One stored shadow; ``document`` None is a deleted shadow that keeps its version."""

    thing: str
    name: str
    document: Document | None
    version: int
    updated_at: datetime


@dataclass(frozen=True)
class ClaimTemplate:
    """A provisioning template for claim certificates."""

    name: str
    description: str
    hook: str | None
    created_at: datetime


@dataclass(frozen=True)
class Event:
    """One audit log entry."""

    id: int
    at: datetime
    kind: str
    subject: str
    detail: dict[str, Any]


# --- validation -------------------------------------------------------------------------


def check_thing_name(name: object, field: str = "thingName") -> str:
    """``name`` if it is a valid thing name; ValidationError naming ``field`` otherwise."""
    if not isinstance(name, str):
        raise ValidationError("must be a string", field=field)
    return pki.check_thing_name(name, field=field)


def check_group_name(name: object, field: str = "thingGroupName") -> str:
    """``name`` if it is a valid thing group name; ValidationError otherwise."""
    if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name):
        raise ValidationError(
            f"{name!r} must be 1-128 characters of letters, digits, ':', '_' and '-'",
            field=field,
        )
    return name


def _check_value(key: str, value: object) -> AttributeValue:
    where = f"attributes.{key}"
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError("must be a finite number", field=where)
        return value
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTE_VALUE:
            raise ValidationError(
                f"is {len(value)} characters long; at most {MAX_ATTRIBUTE_VALUE}", field=where
            )
        return value
    raise ValidationError(
        f"must be a string, number or boolean, not {type(value).__name__} "
        "(attributes are a flat map)",
        field=where,
    )


def _check_patch(patch: object, *, allow_null: bool) -> dict[str, AttributeValue | None]:
    if not isinstance(patch, Mapping):
        raise ValidationError("must be an object of name → value", field="attributes")
    checked: dict[str, AttributeValue | None] = {}
    for key, value in patch.items():
        if not isinstance(key, str) or not _ATTRIBUTE_NAME.fullmatch(key):
            raise ValidationError(
                f"name {key!r} must be 1-128 characters of letters, digits and _.,@/:#-",
                field=f"attributes.{key}",
            )
        if value is None and allow_null:
            checked[key] = None
        elif value is None:
            raise ValidationError("must not be null", field=f"attributes.{key}")
        else:
            checked[key] = _check_value(key, value)
    return checked


def _check_shadow_write(name: str, document: object, version: object) -> None:
    if name and not _SHADOW_NAME.fullmatch(name):
        raise ValidationError(
            f"{name!r} must be 1-64 characters of letters, digits, ':', '_' and '-'",
            field="shadowName",
        )
    if document is not None and not isinstance(document, Mapping):
        raise ValidationError("must be a JSON object or null", field="document")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValidationError("must be a non-negative integer", field="version")


def _check_count(attributes: Mapping[str, object]) -> None:
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValidationError(
            f"a thing has at most {MAX_ATTRIBUTES} attributes; this would make {len(attributes)}",
            field="attributes",
        )


def _aware(at: datetime, field: str) -> datetime:
    if at.tzinfo is None:
        raise ValidationError("must be a timezone-aware time", field=field)
    return at.astimezone(UTC)


def _epoch_ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


# --- compiled dynamic-group queries -----------------------------------------------------


@dataclass(frozen=True)
class _Compiled:
    predicate: Callable[[Document], bool]
    fields: frozenset[str]


@functools.lru_cache(maxsize=512)
def _compile(query: str) -> _Compiled:
    return _Compiled(fleetquery.compile(query), frozenset(fleetquery.referenced_fields(query)))


def _touches(fields: Collection[str], changed: Collection[str]) -> bool:
    """Whether a query reading ``fields`` can see a change to the ``changed`` paths."""
    for read in fields:
        for path in changed:
            if read == path or read.startswith(path + ".") or path.startswith(read + "."):
                return True
    return False


# --- change tracking for one write ------------------------------------------------------


@dataclass
class _Change:
    """What one write did, applied to the document cache after it commits."""

    events: list[EventRow] = field(default_factory=list)
    event_ids: list[int] = field(default_factory=list)  # events inserted with Core statements
    things: set[str] = field(default_factory=set)
    everything: bool = False


class Registry:
    """The fleet registry over a migrated ``Database``."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock
        self._lock = threading.Lock()
        self._docs: dict[str, Document] | None = None
        self._seen_event = 0
        self._dirty: set[str] = set()

    # == things ==========================================================================

    def create_thing(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        thing_type: str | None = None,
    ) -> Thing:
        """Register a thing; ConflictError when the name is taken."""
        check_thing_name(name)
        if thing_type is not None:
            check_thing_name(thing_type, field="thingTypeName")
        attrs = _check_patch(attributes or {}, allow_null=False)
        _check_count(attrs)
        now = self._now()
        with self._write() as (session, change):
            if session.get(ThingRow, name) is not None:
                raise ConflictError(f"a thing named {name!r} already exists")
            row = ThingRow(
                name=name,
                thing_type=thing_type,
                attributes=attrs,
                created_at=now,
                updated_at=now,
                version=1,
            )
            session.add(row)
            self._event(session, change, "thing.created", name, attributes=attrs)
            self._refresh_dynamic(session, change, name, None)
        return _thing(row)

    def create_things(
        self,
        attributes_by_name: Mapping[str, Mapping[str, AttributeValue]],
        *,
        thing_type: str | None = None,
    ) -> int:
        """Register many things in one transaction (a bulk import); returns how many.

        All or nothing: a bad or taken name refuses the whole batch.
        """
        if thing_type is not None:
            check_thing_name(thing_type, field="thingTypeName")
        rows: list[dict[str, Any]] = []
        now = self._now()
        for name, attributes in attributes_by_name.items():
            check_thing_name(name)
            attrs = _check_patch(attributes, allow_null=False)
            _check_count(attrs)
            rows.append(
                {
                    "name": name,
                    "thing_type": thing_type,
                    "attributes": attrs,
                    "created_at": now,
                    "updated_at": now,
                    "version": 1,
                }
            )
        if not rows:
            return 0
        names = [row["name"] for row in rows]
        with self._write() as (session, change):
            for chunk in _chunks(names):
                taken = session.scalars(select(ThingRow.name).where(ThingRow.name.in_(chunk)))
                first = next(iter(taken), None)
                if first is not None:
                    raise ConflictError(f"a thing named {first!r} already exists")
            session.execute(insert(ThingRow), rows)
            session.execute(
                insert(EventRow),
                [
                    {
                        "at": now,
                        "kind": "thing.created",
                        "subject": row["name"],
                        "detail": {"attributes": row["attributes"]},
                    }
                    for row in rows
                ],
            )
            change.everything = True
            groups = self._dynamic_groups(session)
            if groups:
                members = [
                    {"group_name": group, "thing_name": row["name"]}
                    for row in rows
                    for group, compiled in groups.items()
                    if compiled.predicate(_document(row["name"], row["attributes"]))
                ]
                if members:
                    session.execute(insert(DynamicMembershipRow), members)
                    session.execute(
                        insert(EventRow),
                        [
                            {
                                "at": now,
                                "kind": "group.dynamic.joined",
                                "subject": member["group_name"],
                                "detail": {"thing": member["thing_name"]},
                            }
                            for member in members
                        ],
                    )
        return len(rows)

    def get_thing(self, name: str) -> Thing:
        """The thing named ``name``; NotFoundError if there is none."""
        with self.db.read() as session:
            row = session.get(ThingRow, name)
            if row is None:
                raise NotFoundError("thing", name)
            return _thing(row)

    def list_things(
        self, *, prefix: str = "", after: str | None = None, limit: int = 100
    ) -> ThingPage:
        """Things in name order whose names start with ``prefix``, ``limit`` at a time."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise ValidationError(f"must be an integer from 1 to {MAX_PAGE}", field="limit")
        if not isinstance(prefix, str):
            raise ValidationError("must be a string", field="prefix")
        statement = select(ThingRow).order_by(ThingRow.name).limit(limit + 1)
        if prefix:
            statement = statement.where(ThingRow.name.startswith(prefix, autoescape=True))
        if after:
            statement = statement.where(ThingRow.name > after)
        with self.db.read() as session:
            rows = list(session.scalars(statement))
        page = [_thing(row) for row in rows[:limit]]
        return ThingPage(page, page[-1].name if len(rows) > limit else None)

    def update_attributes(
        self,
        name: str,
        patch: Mapping[str, AttributeValue | None],
        *,
        expected_version: int | None = None,
    ) -> Thing:
        """Merge ``patch`` into a thing's attributes (``None`` deletes a key); bumps its version.

        ConflictError when ``expected_version`` is given and is not the current version.
        """
        checked = _check_patch(patch, allow_null=True)
        with self._write() as (session, change):
            row = self._thing_row(session, name, lock=True)
            if expected_version is not None and expected_version != row.version:
                raise ConflictError(
                    f"thing {name!r} is at version {row.version}, not {expected_version}: "
                    "read it again and retry"
                )
            merged = dict(row.attributes)
            for key, value in checked.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            _check_count(merged)
            row.attributes = merged
            row.version += 1
            row.updated_at = self._now()
            self._event(session, change, "thing.updated", name, patch=checked)
            self._refresh_dynamic(session, change, name, {f"attributes.{k}" for k in checked})
        return _thing(row)

    def delete_thing(self, name: str) -> None:
        """Delete a thing: its memberships, connectivity and shadows go with it, and its
        active certificates become INACTIVE (kept, detached, for the audit trail)."""
        with self._write() as (session, change):
            self._thing_row(session, name, lock=True)
            certificates = list(
                session.scalars(
                    select(CertificateRow.certificate_id).where(CertificateRow.thing_name == name)
                )
            )
            session.execute(
                update(CertificateRow)
                .where(CertificateRow.thing_name == name, CertificateRow.status == "ACTIVE")
                .values(status="INACTIVE")
            )
            # The foreign key would do this too; done here so it never depends on the
            # backend enforcing it.
            session.execute(
                update(CertificateRow)
                .where(CertificateRow.thing_name == name)
                .values(thing_name=None)
            )
            session.execute(delete(ThingRow).where(ThingRow.name == name))
            self._event(session, change, "thing.deleted", name, certificates=certificates)
            change.things.add(name)

    # == groups ==========================================================================

    def create_group(
        self,
        name: str,
        *,
        kind: GroupKind = "static",
        query: str | None = None,
        description: str = "",
    ) -> ThingGroup:
        """Create a static group, or a dynamic one whose members match ``query``."""
        check_group_name(name)
        if kind not in ("static", "dynamic"):
            raise ValidationError(f"{kind!r} must be 'static' or 'dynamic'", field="kind")
        if kind == "dynamic":
            if not isinstance(query, str) or not query.strip():
                raise ValidationError("a dynamic group needs a fleet query", field="queryString")
            try:
                fleetquery.parse(query)
            except ValidationError as err:
                raise ValidationError(str(err), field="queryString") from err
        elif query is not None:
            raise ValidationError(
                "only a dynamic group has a query (pass kind='dynamic')", field="queryString"
            )
        if not isinstance(description, str):
            raise ValidationError("must be a string", field="description")
        with self._write() as (session, change):
            if session.get(ThingGroupRow, name) is not None:
                raise ConflictError(f"a thing group named {name!r} already exists")
            row = ThingGroupRow(
                name=name,
                kind=kind,
                query=query,
                description=description,
                created_at=self._now(),
            )
            session.add(row)
            session.flush()  # the group row goes first: memberships refer to it
            members = 0
            if query is not None:
                predicate = _compile(query).predicate
                documents = self._load(session, None, dynamic=False)
                matching = [thing for thing, doc in documents.items() if predicate(doc)]
                if matching:
                    session.execute(
                        insert(DynamicMembershipRow),
                        [{"group_name": name, "thing_name": thing} for thing in matching],
                    )
                members = len(matching)
                change.everything = True
            self._event(
                session, change, "group.created", name, kind=kind, query=query, members=members
            )
        return _group(row)

    def get_group(self, name: str) -> ThingGroup:
        """The thing group named ``name``; NotFoundError if there is none."""
        with self.db.read() as session:
            return _group(self._group_row(session, name))

    def list_groups(self) -> list[ThingGroup]:
        """Every thing group, in name order."""
        with self.db.read() as session:
            rows = session.scalars(select(ThingGroupRow).order_by(ThingGroupRow.name))
            return [_group(row) for row in rows]

    def delete_group(self, name: str) -> None:
        """Delete a thing group (its things stay)."""
        with self._write() as (session, change):
            row = self._group_row(session, name)
            former: list[str] = []
            if row.kind == "static":
                former = list(
                    session.scalars(
                        select(GroupMemberRow.thing_name).where(GroupMemberRow.group_name == name)
                    )
                )
            session.execute(delete(ThingGroupRow).where(ThingGroupRow.name == name))
            self._event(session, change, "group.deleted", name, kind=row.kind)
            for thing in former:
                self._refresh_dynamic(session, change, thing, {"thingGroupNames"})
            change.everything = True

    def add_to_group(self, group: str, thing: str) -> bool:
        """Add a thing to a static group; False when it was already a member."""
        return self._change_static(group, thing, add=True)

    def add_many_to_group(self, group: str, things: Iterable[str]) -> int:
        """Add many things to a static group in one transaction (a bulk import); returns how
        many joined (members already in it are skipped).

        All or nothing: an unknown thing refuses the whole batch (NotFoundError names it).
        """
        names = list(dict.fromkeys(things))
        with self._write() as (session, change):
            row = self._group_row(session, group)
            if row.kind == "dynamic":
                raise ConflictError(
                    f"thing group {group!r} is dynamic: its members are the things matching "
                    f"{row.query!r}; change the things or the query instead"
                )
            known: set[str] = set()
            members: set[str] = set()
            for chunk in _chunks(names):
                known.update(session.scalars(select(ThingRow.name).where(ThingRow.name.in_(chunk))))
                members.update(
                    session.scalars(
                        select(GroupMemberRow.thing_name).where(
                            GroupMemberRow.group_name == group,
                            GroupMemberRow.thing_name.in_(chunk),
                        )
                    )
                )
            missing = next((name for name in names if name not in known), None)
            if missing is not None:
                raise NotFoundError("thing", missing)
            joining = [name for name in names if name not in members]
            if not joining:
                return 0
            now = self._now()
            session.execute(
                insert(GroupMemberRow),
                [{"group_name": group, "thing_name": name} for name in joining],
            )
            session.execute(
                insert(EventRow),
                [
                    {
                        "at": now,
                        "kind": "group.member.added",
                        "subject": group,
                        "detail": {"thing": name},
                    }
                    for name in joining
                ],
            )
            change.everything = True  # the events were inserted as Core rows: reload
            dynamic = self._dynamic_groups(session)
            for name in joining:
                self._refresh_dynamic(session, change, name, {"thingGroupNames"}, groups=dynamic)
            return len(joining)

    def remove_from_group(self, group: str, thing: str) -> bool:
        """Remove a thing from a static group; False when it was not a member."""
        return self._change_static(group, thing, add=False)

    def _change_static(self, group: str, thing: str, *, add: bool) -> bool:
        with self._write() as (session, change):
            row = self._group_row(session, group)
            if row.kind == "dynamic":
                raise ConflictError(
                    f"thing group {group!r} is dynamic: its members are the things matching "
                    f"{row.query!r}; change the things or the query instead"
                )
            self._thing_row(session, thing)
            member = session.get(GroupMemberRow, (group, thing))
            if (member is not None) == add:
                return False
            if add:
                session.add(GroupMemberRow(group_name=group, thing_name=thing))
            else:
                session.delete(member)
            kind = "group.member.added" if add else "group.member.removed"
            self._event(session, change, kind, group, thing=thing)
            self._refresh_dynamic(session, change, thing, {"thingGroupNames"})
            return True

    def group_members(self, group: str) -> list[str]:
        """Names of a group's things, in order (a dynamic group's current matches)."""
        with self.db.read() as session:
            row = self._group_row(session, group)
            table = GroupMemberRow if row.kind == "static" else DynamicMembershipRow
            return list(
                session.scalars(
                    select(table.thing_name)
                    .where(table.group_name == group)
                    .order_by(table.thing_name)
                )
            )

    def groups_of(self, thing: str) -> list[str]:
        """The groups a thing is in, static and dynamic, in name order."""
        with self.db.read() as session:
            self._thing_row(session, thing)
            names = set(
                session.scalars(
                    select(GroupMemberRow.group_name).where(GroupMemberRow.thing_name == thing)
                )
            )
            names.update(
                session.scalars(
                    select(DynamicMembershipRow.group_name).where(
                        DynamicMembershipRow.thing_name == thing
                    )
                )
            )
        return sorted(names)

    # == certificates ====================================================================

    def record_certificate(
        self,
        pem: str | bytes,
        *,
        thing: str | None = None,
        kind: CertificateKind = "device",
        certificate_id: str | None = None,
    ) -> Certificate:
        """Record a certificate issued (or registered) for ``thing``, or a claim certificate.

        Its id, serial and issuer are read from the PEM; a given ``certificate_id`` must
        match the fingerprint. ConflictError when it is already recorded.
        """
        if kind not in ("device", "claim"):
            raise ValidationError(f"{kind!r} must be 'device' or 'claim'", field="kind")
        if kind == "claim" and thing is not None:
            raise ValidationError("a claim certificate belongs to no thing", field="thing")
        pem_bytes = pem.encode() if isinstance(pem, str) else pem
        cert = pki.load_certificate(pem_bytes)
        fingerprint = pki.fingerprint(cert)
        if certificate_id is not None and certificate_id.lower() != fingerprint:
            raise ValidationError(
                f"{certificate_id!r} is not the certificate's SHA-256 fingerprint {fingerprint}",
                field="certificateId",
            )
        now = self._now()
        with self._write() as (session, change):
            if thing is not None:
                self._thing_row(session, thing)
            if session.get(CertificateRow, fingerprint) is not None:
                raise ConflictError(f"certificate {fingerprint} is already recorded")
            row = CertificateRow(
                certificate_id=fingerprint,
                thing_name=thing,
                kind=kind,
                pem=cert.public_bytes(_PEM).decode(),
                serial=str(cert.serial_number),
                issuer=cert.issuer.rfc4514_string(),
                status="ACTIVE",
                created_at=now,
            )
            session.add(row)
            self._event(
                session, change, "certificate.recorded", fingerprint, thing=thing, kind=kind
            )
        return _certificate(row)

    def record_certificates(self, pems_by_thing: Mapping[str, str | bytes]) -> int:
        """Record many device certificates, one per thing, in one transaction (a bulk
        import, as ``create_things`` is); returns how many.

        All or nothing: an unknown thing, an unreadable PEM or a certificate already
        recorded refuses the whole batch.
        """
        now = self._now()
        rows: list[dict[str, Any]] = []
        for thing, pem in pems_by_thing.items():
            cert = pki.load_certificate(pem.encode() if isinstance(pem, str) else pem)
            rows.append(
                {
                    "certificate_id": pki.fingerprint(cert),
                    "thing_name": thing,
                    "kind": "device",
                    "pem": cert.public_bytes(_PEM).decode(),
                    "serial": str(cert.serial_number),
                    "issuer": cert.issuer.rfc4514_string(),
                    "status": "ACTIVE",
                    "created_at": now,
                }
            )
        if not rows:
            return 0
        if len({row["certificate_id"] for row in rows}) != len(rows):
            raise ConflictError("the same certificate is given for two things")
        with self._write() as (session, change):
            things = list(pems_by_thing)
            ids = [row["certificate_id"] for row in rows]
            for chunk in _chunks(things):
                known = set(session.scalars(select(ThingRow.name).where(ThingRow.name.in_(chunk))))
                missing = next((thing for thing in chunk if thing not in known), None)
                if missing is not None:
                    raise NotFoundError("thing", missing)
            for chunk in _chunks(ids):
                taken = session.scalars(
                    select(CertificateRow.certificate_id).where(
                        CertificateRow.certificate_id.in_(chunk)
                    )
                )
                first = next(iter(taken), None)
                if first is not None:
                    raise ConflictError(f"certificate {first} is already recorded")
            session.execute(insert(CertificateRow), rows)
            session.execute(
                insert(EventRow),
                [
                    {
                        "at": now,
                        "kind": "certificate.recorded",
                        "subject": row["certificate_id"],
                        "detail": {"thing": row["thing_name"], "kind": "device"},
                    }
                    for row in rows
                ],
            )
            change.everything = True
        return len(rows)

    def get_certificate(self, certificate_id: str) -> Certificate:
        """The certificate with this id; NotFoundError if there is none."""
        with self.db.read() as session:
            return _certificate(self._certificate_row(session, certificate_id))

    def list_certificates(self, *, thing: str | None = None) -> list[Certificate]:
        """Certificates, oldest first; only ``thing``'s when given."""
        statement = select(CertificateRow).order_by(
            CertificateRow.created_at, CertificateRow.certificate_id
        )
        if thing is not None:
            statement = statement.where(CertificateRow.thing_name == thing)
        with self.db.read() as session:
            return [_certificate(row) for row in session.scalars(statement)]

    def is_active(self, certificate_id: str) -> bool:
        """Whether the certificate is known and ACTIVE (unknown, revoked, inactive: False)."""
        with self.db.read() as session:
            status = session.scalar(
                select(CertificateRow.status).where(
                    CertificateRow.certificate_id == certificate_id.lower()
                )
            )
        return status == "ACTIVE"

    def revoke_certificate(
        self, certificate_id: str, *, reason: str = "unspecified", at: datetime | None = None
    ) -> Certificate:
        """Revoke a certificate for good; ConflictError when it already is."""
        revoked_at = _aware(at, "revokedAt") if at is not None else self._now()
        with self._write() as (session, change):
            row = self._certificate_row(session, certificate_id, lock=True)
            if row.status == "REVOKED":
                raise ConflictError(f"certificate {row.certificate_id} is already revoked")
            row.status = "REVOKED"
            row.revoked_at = revoked_at
            row.revoke_reason = reason
            self._event(session, change, "certificate.revoked", row.certificate_id, reason=reason)
        return _certificate(row)

    def set_certificate_status(
        self, certificate_id: str, status: Literal["ACTIVE", "INACTIVE"]
    ) -> Certificate:
        """Deactivate or reactivate a certificate; a revoked one stays revoked (ConflictError)."""
        if status not in ("ACTIVE", "INACTIVE"):
            raise ValidationError(f"{status!r} must be 'ACTIVE' or 'INACTIVE'", field="status")
        with self._write() as (session, change):
            row = self._certificate_row(session, certificate_id, lock=True)
            if row.status == "REVOKED":
                raise ConflictError(f"certificate {row.certificate_id} is revoked for good")
            if status == "ACTIVE" and row.thing_name is None and row.kind == "device":
                raise ConflictError(
                    f"certificate {row.certificate_id} belongs to no thing (it was deleted)"
                )
            row.status = status
            self._event(session, change, "certificate.status", row.certificate_id, status=status)
        return _certificate(row)

    def revoked_serials(self, *, issuer: str | None = None) -> list[RevokedSerial]:
        """``(serial, revoked_at)`` of revoked certificates, oldest first, for the CRL.

        ``issuer`` (an RFC 4514 name) keeps only those one CA issued.
        """
        statement = (
            select(CertificateRow.serial, CertificateRow.revoked_at)
            .where(CertificateRow.status == "REVOKED")
            .order_by(CertificateRow.revoked_at, CertificateRow.serial)
        )
        if issuer is not None:
            statement = statement.where(CertificateRow.issuer == issuer)
        with self.db.read() as session:
            return [
                RevokedSerial(int(serial), revoked_at or datetime.fromtimestamp(0, UTC))
                for serial, revoked_at in session.execute(statement)
            ]

    # == registered CAs ==================================================================

    def add_ca(self, pem: str | bytes) -> RegisteredCa:
        """Register a CA certificate; ConflictError when it is already registered."""
        cert = pki.load_certificate(pem.encode() if isinstance(pem, str) else pem)
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValidationError("is not a CA certificate (basicConstraints CA:TRUE)", field="pem")
        fingerprint = pki.fingerprint(cert)
        with self._write() as (session, change):
            if session.get(RegisteredCaRow, fingerprint) is not None:
                raise ConflictError(f"CA certificate {fingerprint} is already registered")
            row = RegisteredCaRow(
                fingerprint=fingerprint,
                pem=cert.public_bytes(_PEM).decode(),
                created_at=self._now(),
            )
            session.add(row)
            self._event(
                session, change, "ca.registered", fingerprint, subject=cert.subject.rfc4514_string()
            )
        return RegisteredCa(row.fingerprint, row.pem, row.created_at)

    def list_cas(self) -> list[RegisteredCa]:
        """Registered CA certificates, oldest first."""
        with self.db.read() as session:
            rows = session.scalars(select(RegisteredCaRow).order_by(RegisteredCaRow.created_at))
            return [RegisteredCa(row.fingerprint, row.pem, row.created_at) for row in rows]

    # == claim templates =================================================================

    def create_claim_template(
        self, name: str, *, description: str = "", hook: str | None = None
    ) -> ClaimTemplate:
        """Save a provisioning template; ConflictError when the name is taken."""
        check_group_name(name, field="templateName")
        with self._write() as (session, change):
            if session.get(ClaimTemplateRow, name) is not None:
                raise ConflictError(f"a claim template named {name!r} already exists")
            row = ClaimTemplateRow(
                name=name, description=description, hook=hook, created_at=self._now()
            )
            session.add(row)
            self._event(session, change, "claim_template.created", name, hook=hook)
        return ClaimTemplate(row.name, row.description, row.hook, row.created_at)

    def get_claim_template(self, name: str) -> ClaimTemplate:
        """The claim template named ``name``; NotFoundError if there is none."""
        with self.db.read() as session:
            row = session.get(ClaimTemplateRow, name)
            if row is None:
                raise NotFoundError("claim template", name)
            return ClaimTemplate(row.name, row.description, row.hook, row.created_at)

    # == connectivity ====================================================================

    def set_connectivity(
        self,
        thing: str,
        connected: bool,
        at: datetime,
        client_id: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Record a connect or disconnect observed at ``at``; False when it was ignored
        because the stored state is as new or newer (messages can arrive out of order)."""
        applied = self.set_connectivity_many(
            [ConnectivityEvent(thing, connected, at, client_id, reason)]
        )[0]
        if applied is None:
            raise NotFoundError("thing", thing)
        return applied

    def set_connectivity_many(self, events: Sequence[ConnectivityEvent]) -> list[bool | None]:
        """Record many connects and disconnects in one transaction, in order.

        One result per event: True recorded, False ignored (the stored state, or an
        earlier event of the batch, is as new or newer), None when no such thing is
        registered. A fleet's birth messages arrive in storms; one transaction for all
        that are waiting costs one commit instead of one each.
        """
        checked = [
            ConnectivityEvent(
                event.thing,
                bool(event.connected),
                _aware(event.at, "timestamp"),
                event.client_id,
                event.reason,
                _aware(event.connection, "connection") if event.connection else None,
            )
            for event in events
        ]
        if not checked:
            return []
        for attempt in range(2):
            try:
                return self._set_connectivity_many(checked)
            except IntegrityError:
                # Two first reports of one thing raced (from two processes) to insert its
                # row: the loser retries as an update against the winner's.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _set_connectivity_many(self, events: list[ConnectivityEvent]) -> list[bool | None]:
        # Core statements on the session's connection: the birth message of every hub that
        # connects lands here, and the ORM's unit of work would take most of the time.
        names = sorted({event.thing for event in events})
        results: list[bool | None] = []
        with self._write() as (session, change):
            connection = session.connection()
            known: set[str] = set()
            since: dict[str, datetime] = {}
            live: dict[str, bool] = {}
            for chunk in _chunks(names):
                known.update(connection.execute(_THINGS_KNOWN, {"b_things": chunk}).scalars())
                for name, stored_since, stored_connected in connection.execute(
                    _CONNECTIVITY_SINCE_MANY, {"b_things": chunk}
                ):
                    since[name] = stored_since
                    live[name] = stored_connected
            groups = self._dynamic_groups(session)
            for thing, connected, at, client_id, reason, ends in events:
                if thing not in known:
                    results.append(None)
                    continue
                before = since.get(thing)
                if before is not None and at <= before:
                    results.append(False)
                    continue
                if (
                    not connected
                    and ends is not None
                    and before is not None
                    and live.get(thing)
                    and before > ends
                ):
                    results.append(False)  # the will of a connection a newer one replaced
                    continue
                values = {
                    "connected": connected,
                    "since": at,
                    "client_id": client_id,
                    "disconnect_reason": None if connected else reason,
                }
                if before is None:
                    connection.execute(_CONNECTIVITY_INSERT, {"thing_name": thing, **values})
                else:
                    connection.execute(_CONNECTIVITY_UPDATE, {"b_thing": thing, **values})
                since[thing] = at
                live[thing] = connected
                self._log(
                    connection,
                    change,
                    "thing.connected" if connected else "thing.disconnected",
                    thing,
                    at=at.isoformat(),
                    clientId=client_id,
                    reason=values["disconnect_reason"],
                )
                self._refresh_dynamic(session, change, thing, {"connectivity"}, groups=groups)
                results.append(True)
        return results

    def connectivity(self, thing: str) -> Connectivity | None:
        """A thing's last known connectivity (None: never seen); NotFoundError if no thing."""
        with self.db.read() as session:
            self._thing_row(session, thing)
            row = session.get(ConnectivityRow, thing)
            if row is None:
                return None
            return Connectivity(
                thing, row.connected, row.since, row.client_id, row.disconnect_reason
            )

    # == shadows (storage only: the semantics are edgeloop.core.shadow's) ================

    def get_shadow(self, thing: str, name: str = "") -> StoredShadow | None:
        """A stored shadow row (a deleted shadow has ``document`` None), or None."""
        with self.db.read() as session:
            row = session.get(ShadowRow, (thing, name))
            return _shadow(row) if row is not None else None

    def list_shadows(self, thing: str) -> list[StoredShadow]:
        """Every stored shadow row of a thing, deleted ones included, by name."""
        # Core rows: the shadow service reads every thing's shadows on first use.
        with self.db.read() as session:
            rows = session.connection().execute(_SHADOWS_OF, {"b_thing": thing})
            return [StoredShadow(thing, *row) for row in rows]

    def put_shadow(
        self,
        thing: str,
        name: str,
        document: Mapping[str, Any] | None,
        *,
        version: int,
        expected_version: int | None = None,
        at: datetime | None = None,
    ) -> StoredShadow:
        """Store a shadow document (``ShadowDocument.to_json()``), or None for a deleted one.

        ``expected_version`` makes it a compare-and-set: ConflictError unless the stored
        version is that (0: no row yet).
        """
        _check_shadow_write(name, document, version)
        stamp = _aware(at, "updatedAt") if at is not None else self._now()
        stored = dict(document) if document is not None else None
        # Core statements, as in _set_connectivity_many: every shadow update of the fleet
        # lands here.
        with self._write() as (session, change):
            connection = session.connection()
            self._require_thing(connection, thing)
            key = {"b_thing": thing, "b_name": name}
            found = connection.execute(_SHADOW_VERSION, key).scalar_one_or_none()
            current = found if found is not None else 0
            if expected_version is not None and expected_version != current:
                raise ConflictError(
                    f"shadow {name or '(classic)'!r} of {thing!r} is at version {current}, "
                    f"not {expected_version}"
                )
            values = {"document": stored, "version": version, "updated_at": stamp}
            if found is None:
                connection.execute(_SHADOW_INSERT, {"thing_name": thing, "name": name, **values})
            else:
                connection.execute(_SHADOW_UPDATE, {**key, **values})
            self._log(
                connection,
                change,
                "shadow.updated" if document is not None else "shadow.deleted",
                thing,
                shadow=name,
                version=version,
            )
            paths = {f"shadow.name.{name}"} if name else {"shadow.reported", "shadow.desired"}
            self._refresh_dynamic(session, change, thing, paths)
        return StoredShadow(thing, name, stored, version, stamp)

    def put_shadows(self, writes: Sequence[ShadowWrite]) -> set[str]:
        """Store many shadow documents in one transaction, in order (as ``put_shadow``
        without its compare-and-set); returns the things not registered, whose writes
        were skipped. The shadow service writes every update waiting for it this way."""
        now = self._now()
        checked: list[ShadowWrite] = []
        for write in writes:
            _check_shadow_write(write.name, write.document, write.version)
            stamp = _aware(write.at, "updatedAt") if write.at is not None else now
            stored = dict(write.document) if write.document is not None else None
            checked.append(ShadowWrite(write.thing, write.name, stored, write.version, stamp))
        if not checked:
            return set()
        names = sorted({write.thing for write in checked})
        with self._write() as (session, change):
            connection = session.connection()
            known: set[str] = set()
            for chunk in _chunks(names):
                known.update(connection.execute(_THINGS_KNOWN, {"b_things": chunk}).scalars())
            groups = self._dynamic_groups(session)
            stored_before: set[tuple[str, str]] = set()
            for chunk in _chunks([name for name in names if name in known]):
                stored_before.update(
                    (thing, shadow)
                    for thing, shadow in connection.execute(_SHADOWS_STORED, {"b_things": chunk})
                )
            for thing, name, document, version, at in checked:
                if thing not in known:
                    continue
                values = {"document": document, "version": version, "updated_at": at}
                if (thing, name) in stored_before:
                    connection.execute(_SHADOW_UPDATE, {"b_thing": thing, "b_name": name, **values})
                else:
                    connection.execute(
                        _SHADOW_INSERT, {"thing_name": thing, "name": name, **values}
                    )
                    stored_before.add((thing, name))
                self._log(
                    connection,
                    change,
                    "shadow.updated" if document is not None else "shadow.deleted",
                    thing,
                    shadow=name,
                    version=version,
                )
                paths = {f"shadow.name.{name}"} if name else {"shadow.reported", "shadow.desired"}
                self._refresh_dynamic(session, change, thing, paths, groups=groups)
        return set(names) - known

    def shadow_storage(self) -> RegistryShadowStorage:
        """A ``ShadowStorage`` for ``ShadowBook`` that keeps shadows in this registry."""
        return RegistryShadowStorage(self)

    # == fleet documents and queries =====================================================

    def thing_document(self, thing: str) -> Document:
        """The thing's document, as the fleet query language sees it (read fresh)."""
        with self.db.read() as session:
            documents = self._load(session, [thing], dynamic=True)
        if thing not in documents:
            raise NotFoundError("thing", thing)
        return documents[thing]

    def fleet_query(self, query: str) -> list[str]:
        """Names of the things matching a fleet query, in name order."""
        if not isinstance(query, str) or not query.strip():
            raise ValidationError("is empty", field="queryString")
        try:
            predicate = _compile(query).predicate
        except ValidationError as err:
            raise ValidationError(str(err), field="queryString") from err
        documents = self._documents()
        return sorted(name for name, doc in documents.items() if predicate(doc))

    def invalidate_cache(self) -> None:
        """Forget the cached documents (after writing the tables behind the registry's back)."""
        with self._lock:
            self._docs = None

    def _documents(self) -> dict[str, Document]:
        # The lock is held over a reload so concurrent queries wait for one reload rather
        # than each running their own; writers only take it for a moment after commit.
        with self._lock:
            with self.db.read() as session:
                newest = session.scalar(select(func.max(EventRow.id))) or 0
            if self._docs is None or newest != self._seen_event:
                self._reload_all()
            elif self._dirty:
                if len(self._dirty) > _DIRTY_RELOAD_LIMIT:
                    self._reload_all()
                else:
                    dirty = sorted(self._dirty)
                    with self.db.read() as session:
                        fresh = self._load(session, dirty, dynamic=True)
                    # Copy on write: queries in other threads may be iterating the old dict.
                    docs = dict(self._docs)
                    for name in dirty:
                        if name in fresh:
                            docs[name] = fresh[name]
                        else:
                            docs.pop(name, None)
                    self._docs = docs
                    self._dirty.clear()
            assert self._docs is not None
            return self._docs

    def _reload_all(self) -> None:
        with self.db.read() as session:
            if self.db.dialect == "postgresql":
                # One snapshot for the event id and every table read after it.
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            newest = session.scalar(select(func.max(EventRow.id))) or 0
            self._docs = self._load(session, None, dynamic=True)
        self._seen_event = newest
        self._dirty.clear()

    def _load(
        self, session: Session, names: Collection[str] | None, *, dynamic: bool
    ) -> dict[str, Document]:
        """Documents of ``names`` (None: every thing), one query per table (per chunk)."""
        if names is not None and len(names) > _IN_CHUNK:
            out: dict[str, Document] = {}
            for chunk in _chunks(list(names)):
                out.update(self._load(session, chunk, dynamic=dynamic))
            return out

        def only(column: Any, statement: Any) -> Any:
            return statement if names is None else statement.where(column.in_(list(names)))

        # Core rows straight off the connection: the ORM's result machinery would double
        # the time of a full load. Callers flush pending ORM changes first.
        connection = session.connection()

        documents: dict[str, Document] = {
            name: _document(name, attributes)
            for name, attributes in connection.execute(
                only(ThingRow.name, select(ThingRow.name, ThingRow.attributes))
            )
        }
        for thing, connected, since, reason in connection.execute(
            only(
                ConnectivityRow.thing_name,
                select(
                    ConnectivityRow.thing_name,
                    ConnectivityRow.connected,
                    ConnectivityRow.since,
                    ConnectivityRow.disconnect_reason,
                ),
            )
        ):
            doc = documents.get(thing)
            if doc is not None:
                state = {"connected": connected, "timestamp": _epoch_ms(since)}
                if reason is not None:
                    state["disconnectReason"] = reason
                doc["connectivity"] = state
        for thing, shadow_name, stored in connection.execute(
            only(
                ShadowRow.thing_name,
                select(ShadowRow.thing_name, ShadowRow.name, ShadowRow.document).where(
                    ShadowRow.document.is_not(None)
                ),
            )
        ):
            doc = documents.get(thing)
            if doc is None or not isinstance(stored, dict):
                continue
            state = stored.get("state") or {}
            sections = {k: state[k] for k in ("reported", "desired") if state.get(k) is not None}
            shadow = doc.setdefault("shadow", {})
            if shadow_name:
                shadow.setdefault("name", {})[shadow_name] = sections
            else:
                shadow.update(sections)
        tables: list[type[GroupMemberRow] | type[DynamicMembershipRow]] = [GroupMemberRow]
        if dynamic:
            tables.append(DynamicMembershipRow)
        for table in tables:
            for thing, group in connection.execute(
                only(table.thing_name, select(table.thing_name, table.group_name))
            ):
                doc = documents.get(thing)
                if doc is not None:
                    doc["thingGroupNames"].append(group)
        for doc in documents.values():
            doc["thingGroupNames"].sort()
        return documents

    # == dynamic groups ==================================================================

    def _dynamic_groups(self, session: Session) -> dict[str, _Compiled]:
        rows = session.connection().execute(_DYNAMIC_GROUPS)
        return {name: _compile(query) for name, query in rows if query is not None}

    def _refresh_dynamic(
        self,
        session: Session,
        change: _Change,
        thing: str,
        changed: set[str] | None,
        *,
        groups: Mapping[str, _Compiled] | None = None,
    ) -> None:
        """Recompute the thing's dynamic memberships that ``changed`` paths can affect
        (None: all of them), within the current write. ``groups``: the dynamic groups, when
        the caller read them already (a batch reads them once)."""
        every = groups if groups is not None else self._dynamic_groups(session)
        groups = {
            name: compiled
            for name, compiled in every.items()
            if changed is None or _touches(compiled.fields, changed)
        }
        if not groups:
            return
        session.flush()
        doc = self._load(session, [thing], dynamic=False).get(thing)
        current = set(
            session.scalars(
                select(DynamicMembershipRow.group_name).where(
                    DynamicMembershipRow.thing_name == thing
                )
            )
        )
        for group, compiled in sorted(groups.items()):
            matches = doc is not None and compiled.predicate(doc)
            if matches and group not in current:
                session.execute(
                    insert(DynamicMembershipRow).values(group_name=group, thing_name=thing)
                )
                self._event(session, change, "group.dynamic.joined", group, thing=thing)
            elif not matches and group in current:
                session.execute(
                    delete(DynamicMembershipRow).where(
                        DynamicMembershipRow.group_name == group,
                        DynamicMembershipRow.thing_name == thing,
                    )
                )
                self._event(session, change, "group.dynamic.left", group, thing=thing)

    # == the audit log ===================================================================

    def events(
        self, *, subject: str | None = None, after: int = 0, limit: int = 100
    ) -> list[Event]:
        """Audit log entries after id ``after``, oldest first; only ``subject``'s if given."""
        statement = select(EventRow).where(EventRow.id > after).order_by(EventRow.id).limit(limit)
        if subject is not None:
            statement = statement.where(EventRow.subject == subject)
        with self.db.read() as session:
            return [
                Event(row.id, row.at, row.kind, row.subject, dict(row.detail))
                for row in session.scalars(statement)
            ]

    # == internals =======================================================================

    def _now(self) -> datetime:
        return _aware(self.clock(), "clock")

    @contextmanager
    def _write(self) -> Iterator[tuple[Session, _Change]]:
        change = _Change()
        with self.db.write() as session:
            yield session, change
            session.flush()
        self._committed(change)

    def _committed(self, change: _Change) -> None:
        ids = sorted([*(event.id for event in change.events), *change.event_ids])
        if not ids and not change.everything:
            return  # nothing was written
        with self._lock:
            if self._docs is None:
                return
            if change.everything:
                self._docs = None
            elif ids and ids[-1] <= self._seen_event:
                # A reload that started after this commit has it already.
                return
            elif ids and ids == list(range(self._seen_event + 1, self._seen_event + 1 + len(ids))):
                # Nobody else wrote since the cache was filled: reload just these things.
                self._seen_event = ids[-1]
                self._dirty |= change.things
            else:
                self._docs = None

    def _event(
        self, session: Session, change: _Change, kind: str, subject: str, /, **detail: Any
    ) -> None:
        row = EventRow(at=self._now(), kind=kind, subject=subject, detail=detail)
        session.add(row)
        change.events.append(row)
        if kind.startswith(("thing.", "shadow.")):
            change.things.add(subject)
        elif "thing" in detail and isinstance(detail["thing"], str):
            change.things.add(detail["thing"])

    def _log(
        self, connection: Connection, change: _Change, kind: str, subject: str, /, **detail: Any
    ) -> None:
        """``_event`` for writes made with Core statements: the row is inserted at once."""
        values = {"at": self._now(), "kind": kind, "subject": subject, "detail": detail}
        change.event_ids.append(int(connection.execute(_EVENT_INSERT, values).scalar_one()))
        change.things.add(subject)  # _log is only used for events about a thing

    @staticmethod
    def _require_thing(connection: Connection, name: str) -> None:
        found = connection.execute(_THING_EXISTS, {"b_thing": name}).first()
        if found is None:
            raise NotFoundError("thing", name)

    def _thing_row(self, session: Session, name: str, *, lock: bool = False) -> ThingRow:
        row = session.get(ThingRow, name, with_for_update=lock)
        if row is None:
            raise NotFoundError("thing", name)
        return row

    def _group_row(self, session: Session, name: str) -> ThingGroupRow:
        row = session.get(ThingGroupRow, name)
        if row is None:
            raise NotFoundError("thing group", name)
        return row

    def _certificate_row(
        self, session: Session, certificate_id: str, *, lock: bool = False
    ) -> CertificateRow:
        row = session.get(CertificateRow, certificate_id.lower(), with_for_update=lock)
        if row is None:
            raise NotFoundError("certificate", certificate_id)
        return row


@dataclass
class ShadowBatch:
    """What a ``RegistryShadowStorage.batch()`` found when it wrote."""

    unknown: set[str] = field(default_factory=set)  # things not registered


class RegistryShadowStorage:
    """``ShadowStorage`` (see ``edgeloop.core.shadowbook``) over the registry's shadows table."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._held: list[ShadowWrite] | None = None

    @contextmanager
    def batch(self) -> Iterator[ShadowBatch]:
        """Hold every ``save`` made inside, and write them all in one transaction when the
        block ends. The batch's ``unknown`` then names the things not registered (their
        saves were skipped: answer those requests 404); ShadowError 500 when the write
        failed, and then nothing of the batch is stored. Not reentrant."""
        if self._held is not None:
            raise RuntimeError("a shadow batch is already open")
        result = ShadowBatch()
        self._held = []
        try:
            yield result
            held = self._held
        finally:
            self._held = None
        try:
            result.unknown = self.registry.put_shadows(held)
        except CloudError as err:
            raise ShadowError(500, f"the shadow store failed: {err}") from err

    def load(self, thing: str) -> dict[str, ShadowEntry]:
        """Every stored shadow of a thing, deleted ones as their remembered version."""
        entries: dict[str, ShadowEntry] = {}
        try:
            rows = self.registry.list_shadows(thing)
        except CloudError as err:
            raise ShadowError(500, f"the shadow store failed: {err}") from err
        for row in rows:
            if row.document is not None:
                entries[row.name] = ShadowEntry(ShadowDocument.from_json(row.document))
            else:
                deleted_at = int(row.updated_at.timestamp())
                entries[row.name] = ShadowEntry(None, row.version, deleted_at)
        return entries

    def save(self, thing: str, name: str, entry: ShadowEntry) -> None:
        """Store one entry; ShadowError 404 for an unregistered thing, 500 on failure.

        Inside ``batch()`` the entry is held, and written when the batch ends.
        """
        if entry.document is not None:
            document: Document | None = entry.document.to_json()
            version = entry.document.version
            at = None
        else:
            document, version = None, entry.deleted_version
            at = datetime.fromtimestamp(entry.deleted_at, UTC)
        if self._held is not None:
            self._held.append(ShadowWrite(thing, name, document, version, at))
            return
        try:
            self.registry.put_shadow(thing, name, document, version=version, at=at)
        except NotFoundError as err:
            raise ShadowError(404, f"No thing named {thing!r} is registered") from err
        except CloudError as err:
            raise ShadowError(500, f"the shadow store failed: {err}") from err


# --- row → value ------------------------------------------------------------------------


def _document(name: str, attributes: Mapping[str, Any]) -> Document:
    return {
        "thingName": name,
        "thingGroupNames": [],
        "attributes": dict(attributes),
        "connectivity": {"connected": False},
    }


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _thing(row: ThingRow) -> Thing:
    return Thing(
        row.name,
        row.thing_type,
        dict(row.attributes),
        row.version,
        row.created_at,
        row.updated_at,
    )


def _group(row: ThingGroupRow) -> ThingGroup:
    kind: GroupKind = "dynamic" if row.kind == "dynamic" else "static"
    return ThingGroup(row.name, kind, row.query, row.description, row.created_at)


def _certificate(row: CertificateRow) -> Certificate:
    kind: CertificateKind = "claim" if row.kind == "claim" else "device"
    return Certificate(
        certificate_id=row.certificate_id,
        thing=row.thing_name,
        kind=kind,
        status=row.status,
        serial=int(row.serial),
        issuer=row.issuer,
        pem=row.pem,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        revoke_reason=row.revoke_reason,
    )


def _shadow(row: ShadowRow) -> StoredShadow:
    return StoredShadow(row.thing_name, row.name, row.document, row.version, row.updated_at)
