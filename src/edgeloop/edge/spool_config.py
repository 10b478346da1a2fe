"""The spool's streams described as data, and their ``streams`` section in ``agent.json``.

    "streams": {
      "telemetry": {"max_bytes": 67108864, "full_policy": "reject-new",
                    "ttl_seconds": 604800, "priority": 1},
      "dead-letter": {"max_bytes": 16777216}
    }

Every key of a stream is optional (defaults below). ``priority`` follows Greengrass's
stream manager: 1 is exported first, 10 last. A ``dead-letter`` stream always exists; declare
it to change its limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from edgeloop.core.errors import ValidationError

KIB = 1024
MIB = 1024 * KIB
DEAD_LETTER = "dead-letter"
"""The stream that keeps the records an exporter gave up on, each with its reason."""

MIN_SEGMENT_BYTES = 4 * KIB
MAX_SEGMENT_BYTES = 1 * MIB  # the tail segment is scanned whole when the spool opens
MIN_MAX_BYTES = 4 * MIN_SEGMENT_BYTES  # room for a few segments: overwrite drops whole ones
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class FullPolicy(StrEnum):
    """What an append does when the stream is at its size limit."""

    REJECT_NEW = "reject-new"  # the append raises StreamFullError; nothing stored is lost
    OVERWRITE_OLDEST = "overwrite-oldest"  # the oldest segments are dropped to make room


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """One durable, bounded stream of the hub's spool."""

    name: str
    max_bytes: int = 64 * MIB  # the stream's files on disk never grow past this
    full_policy: FullPolicy = FullPolicy.REJECT_NEW
    ttl_seconds: float | None = None  # records older than this are dropped; None: never
    priority: int = 10  # 1 (exported first) .. 10 (last), as Greengrass's stream manager
    segment_bytes: int | None = None  # None: max_bytes / 8, within 4 KiB .. 1 MiB

    def __post_init__(self) -> None:
        where = f"streams.{self.name}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValidationError(
                f"{self.name!r} is not a stream name: 1 to 64 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit",
                field="streams",
            )
        if not _is_int(self.max_bytes) or self.max_bytes < MIN_MAX_BYTES:
            raise ValidationError(
                f"must be a whole number of bytes, at least {MIN_MAX_BYTES}",
                field=f"{where}.max_bytes",
            )
        if not isinstance(self.full_policy, FullPolicy):
            raise ValidationError(
                f"must be one of {', '.join(p.value for p in FullPolicy)}",
                field=f"{where}.full_policy",
            )
        ttl = self.ttl_seconds
        if ttl is not None and (not _is_number(ttl) or ttl <= 0):
            raise ValidationError(
                "must be a positive number of seconds (or null: never expire)",
                field=f"{where}.ttl_seconds",
            )
        if not _is_int(self.priority) or not 1 <= self.priority <= 10:
            raise ValidationError(
                "must be a whole number from 1 (exported first) to 10 (last)",
                field=f"{where}.priority",
            )
        size = self.segment_bytes
        if size is not None and (
            not _is_int(size) or not MIN_SEGMENT_BYTES <= size <= self.max_bytes // 4
        ):
            raise ValidationError(
                f"must be a whole number of bytes from {MIN_SEGMENT_BYTES} to a quarter of "
                f"max_bytes ({self.max_bytes // 4})",
                field=f"{where}.segment_bytes",
            )

    @property
    def segment_size(self) -> int:
        """Bytes after which the stream starts a new segment file."""
        if self.segment_bytes is not None:
            return self.segment_bytes
        return max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, self.max_bytes // 8))

    def to_json(self) -> dict[str, Any]:
        """The stream's ``agent.json`` form."""
        return {
            "max_bytes": self.max_bytes,
            "full_policy": self.full_policy.value,
            "ttl_seconds": self.ttl_seconds,
            "priority": self.priority,
            "segment_bytes": self.segment_bytes,
        }


def dead_letter_config() -> StreamConfig:
    """The dead-letter stream when ``agent.json`` does not declare one: records there are
    the only trace of what the cloud refused, so it refuses rather than overwrites."""
    return StreamConfig(name=DEAD_LETTER, max_bytes=16 * MIB, priority=10)


def parse_streams(value: Any, *, source: str) -> tuple[StreamConfig, ...]:
    """The ``streams`` section of ``agent.json``: ``{NAME: {KEY: VALUE}}``, validated."""
    if not isinstance(value, dict):
        raise ValidationError(
            'must be an object: {"NAME": {"max_bytes": N, "full_policy": "reject-new", ...}}',
            source=source,
            field="streams",
        )
    known = {f.name for f in fields(StreamConfig)} - {"name"}
    configs = []
    for name, body in value.items():
        if not isinstance(body, dict):
            raise ValidationError(
                f"must be an object with any of: {', '.join(sorted(known))}",
                source=source,
                field=f"streams.{name}",
            )
        for key in body:
            if key not in known:
                raise ValidationError(
                    f"unknown key; known: {', '.join(sorted(known))}",
                    source=source,
                    field=f"streams.{name}.{key}",
                )
        args = dict(body)
        if "full_policy" in args:
            try:
                args["full_policy"] = FullPolicy(args["full_policy"])
            except ValueError:
                raise ValidationError(
                    f"{args['full_policy']!r} is not one of "
                    f"{', '.join(p.value for p in FullPolicy)}",
                    source=source,
                    field=f"streams.{name}.full_policy",
                ) from None
        try:
            configs.append(StreamConfig(name=name, **args))
        except ValidationError as err:
            raise ValidationError(err.reason, source=source, field=err.field) from None
    return tuple(configs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = [
    "DEAD_LETTER",
    "FullPolicy",
    "StreamConfig",
    "dead_letter_config",
    "parse_streams",
]
