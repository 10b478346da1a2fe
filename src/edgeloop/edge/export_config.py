"""How each spool stream goes to the cloud, described as data: the ``export`` section of
``agent.json``.

    "export": {
      "alerts":    {"policy": "mqtt"},
      "telemetry": {"policy": "batch", "interval_seconds": 86400,
                    "max_records": 10000, "max_bytes": 4194304},
      "debug":     {"policy": "off"}
    }

- ``mqtt``: at once, over the hub's MQTT connection to the cloud (QoS 1), up to
  ``max_records`` records / ``max_bytes`` bytes of payload a message. For high-priority
  streams (alerts, events).
- ``batch``: compressed batches over HTTPS (``cloud.api``), once the oldest waiting record
  is ``interval_seconds`` old or ``max_records`` records / ``max_bytes`` bytes wait; then
  everything waiting goes, in batches of that size. For bulk telemetry: a daily interval
  keeps cellular and metered links cheap.
- ``off``: the stream stays on the hub.

A stream not named here is exported by ``batch`` with the defaults below. The
``dead-letter`` stream is never exported (the cloud refused its records once already).
``retry_max_seconds`` caps the jittered backoff between attempts while the cloud is away
or refuses the hub. Every key but ``policy`` is optional; errors name the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from edgeloop.core.errors import ValidationError
from edgeloop.core.telemetry import MAX_BATCH_RECORDS

KIB = 1024
MIB = 1024 * KIB
MAX_BATCH_BYTES = 16 * MIB  # payload bytes of one HTTPS batch; the cloud takes 32 MiB gzipped
MAX_MQTT_BYTES = 192 * KIB  # payload bytes of one message; the cloud's broker takes 256 KiB
DEAD_LETTER = "dead-letter"  # as edgeloop.edge.spool_config (not imported: kept light)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ExportVia(StrEnum):
    """How a stream's records reach the cloud."""

    MQTT = "mqtt"  # at once, one small batch a message, QoS 1
    BATCH = "batch"  # compressed batches over HTTPS, by interval or size
    OFF = "off"  # not exported


@dataclass(frozen=True, kw_only=True)
class ExportPolicy:
    """How one stream is exported."""

    stream: str
    policy: ExportVia = ExportVia.BATCH
    interval_seconds: float = 60.0  # batch: send once the oldest waiting record is this old
    max_records: int | None = None  # per batch or message (None: the policy's default)
    max_bytes: int | None = None  # payload bytes per batch or message (None: default)
    retry_max_seconds: float = 60.0  # cap of the backoff between failed attempts

    def __post_init__(self) -> None:
        where = f"export.{self.stream}"
        if not isinstance(self.stream, str) or not _NAME.fullmatch(self.stream):
            raise ValidationError(f"{self.stream!r} is not a stream name", field="export")
        if self.stream == DEAD_LETTER and self.policy is not ExportVia.OFF:
            raise ValidationError(
                "the dead-letter stream keeps what the cloud refused; it is not exported",
                field=f"{where}.policy",
            )
        if not _is_number(self.interval_seconds) or self.interval_seconds < 0:
            raise ValidationError(
                "must be a number of seconds, 0 or more", field=f"{where}.interval_seconds"
            )
        cap_bytes = MAX_MQTT_BYTES if self.policy is ExportVia.MQTT else MAX_BATCH_BYTES
        if self.max_records is not None and (
            not _is_int(self.max_records) or not 1 <= self.max_records <= MAX_BATCH_RECORDS
        ):
            raise ValidationError(
                f"must be a whole number from 1 to {MAX_BATCH_RECORDS}",
                field=f"{where}.max_records",
            )
        if self.max_bytes is not None and (
            not _is_int(self.max_bytes) or not 1024 <= self.max_bytes <= cap_bytes
        ):
            raise ValidationError(
                f"must be a whole number of bytes from 1024 to {cap_bytes} for policy "
                f"{self.policy.value}",
                field=f"{where}.max_bytes",
            )
        if not _is_number(self.retry_max_seconds) or self.retry_max_seconds <= 0:
            raise ValidationError(
                "must be a positive number of seconds", field=f"{where}.retry_max_seconds"
            )

    @property
    def records_per_batch(self) -> int:
        """Records per batch (HTTPS) or message (MQTT)."""
        if self.max_records is not None:
            return self.max_records
        return 100 if self.policy is ExportVia.MQTT else 10_000

    @property
    def bytes_per_batch(self) -> int:
        """Payload bytes per batch (HTTPS) or message (MQTT)."""
        if self.max_bytes is not None:
            return self.max_bytes
        return 128 * KIB if self.policy is ExportVia.MQTT else 4 * MIB

    def to_json(self) -> dict[str, Any]:
        """The policy's ``agent.json`` form, defaults filled in."""
        return {
            "policy": self.policy.value,
            "interval_seconds": self.interval_seconds,
            "max_records": self.records_per_batch,
            "max_bytes": self.bytes_per_batch,
            "retry_max_seconds": self.retry_max_seconds,
        }


def default_policy(stream: str) -> ExportPolicy:
    """The policy of a stream ``export`` does not name."""
    if stream == DEAD_LETTER:
        return ExportPolicy(stream=stream, policy=ExportVia.OFF)
    return ExportPolicy(stream=stream)


def parse_export(value: Any, *, source: str) -> tuple[ExportPolicy, ...]:
    """The ``export`` section of ``agent.json``: ``{STREAM: {KEY: VALUE}}``, validated."""
    if not isinstance(value, dict):
        raise ValidationError(
            'must be an object: {"STREAM": {"policy": "mqtt" | "batch" | "off", ...}}',
            source=source,
            field="export",
        )
    known = {f.name for f in fields(ExportPolicy)} - {"stream"}
    policies = []
    for name, body in value.items():
        if not isinstance(body, dict):
            raise ValidationError(
                f"must be an object with any of: {', '.join(sorted(known))}",
                source=source,
                field=f"export.{name}",
            )
        for key in body:
            if key not in known:
                raise ValidationError(
                    f"unknown key; known: {', '.join(sorted(known))}",
                    source=source,
                    field=f"export.{name}.{key}",
                )
        args = dict(body)
        if "policy" in args:
            try:
                args["policy"] = ExportVia(args["policy"])
            except ValueError:
                raise ValidationError(
                    f"{args['policy']!r} is not one of {', '.join(v.value for v in ExportVia)}",
                    source=source,
                    field=f"export.{name}.policy",
                ) from None
        try:
            policies.append(ExportPolicy(stream=name, **args))
        except ValidationError as err:
            raise ValidationError(err.reason, source=source, field=err.field) from None
    return tuple(policies)


def check_streams(
    policies: tuple[ExportPolicy, ...], streams: set[str], *, source: str
) -> tuple[ExportPolicy, ...]:
    """``policies``, each of a stream declared under ``streams`` (or the dead-letter one)."""
    for policy in policies:
        if policy.stream not in streams and policy.stream != DEAD_LETTER:
            declared = ", ".join(sorted(streams)) or "none"
            raise ValidationError(
                f'no stream {policy.stream!r} is declared under "streams" (declared: {declared})',
                source=source,
                field=f"export.{policy.stream}",
            )
    return policies


def policy_for(policies: tuple[ExportPolicy, ...], stream: str) -> ExportPolicy:
    """The policy of ``stream``: its own, or the default."""
    for policy in policies:
        if policy.stream == stream:
            return policy
    return default_policy(stream)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = [
    "ExportPolicy",
    "ExportVia",
    "check_streams",
    "default_policy",
    "parse_export",
    "policy_for",
]
