"""What a monitoring kit publishes: its MQTT topics and its JSON payloads.

Topics, under a configurable prefix (``kits`` by default)::

    {prefix}/{kit_id}/telemetry   one reading per message, QoS 1, not retained
    {prefix}/{kit_id}/status      retained: "online" with the kit's description when it
                                  connects; "offline" as its last will, and when it stops

A kit id is 1-64 letters, digits, ``_``, ``.`` or ``-`` (``edgeloop.sim.scenario.KIT_ID``):
one topic level, never a wildcard. It is also the kit's client id and its certificate's CN.

Telemetry payload: compact JSON, UTF-8, sensors in the appliance model's order. It is
the *reading* object of edgeloop's telemetry format (the records a hub spools and uploads),
so a hub can keep a kit's payload as it came::

    {"kit": "furnace-1", "appliance": "furnace", "ts": 1736164020.0,
     "sensors": {"supply_temp_c": 48.3, "supply_rh_pct": 9.5, "blower_current_a": 3.61,
                 "vibration_rms_g": 0.093, "duty_cycle_pct": 41.7},
     "kit_seq": 4242, "label": "bearing_wear"}

- ``ts``: the device's sampling time in seconds since the Unix epoch (whole milliseconds),
  in simulated time: ``start + kit_seq * interval``.
- ``sensors``: a number per sensor that gave a reading; a sensor that gave none (dropout)
  is left out.
- ``kit_seq``: 0 at the scenario's start, +1 per sample of that kit. A consumer
  deduplicates on (kit, kit_seq) and sees a lost reading as a gap; a kit restarted on the
  same scenario sends the same readings under the same numbers, so replays deduplicate too.
- ``label``: the simulator's ground truth, for evaluation only (a detector must not read
  it): ``"normal"`` or the name of the fault (see ``edgeloop.sim.scenario``). The fault's
  level and any other faults active at once are not sent; ``edgeloop sim generate`` and
  the generator's ``Reading`` have them.

Status payload: ``{"kit": ..., "online": true, "appliance": ..., "interval_ms": 10000,
"sensors": [{"name": ..., "quantity": ..., "unit": ...}, ...]}`` when online;
``{"kit": ..., "online": false}`` when not.
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgeloop.core.errors import ValidationError
from edgeloop.sim.generator import Reading
from edgeloop.sim.models import APPLIANCES, NORMAL
from edgeloop.sim.scenario import KIT_ID, KitSpec

DEFAULT_PREFIX = "kits"
_FIELDS = {"kit", "appliance", "ts", "sensors", "kit_seq", "label"}


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start a kit's topics: no wildcards, no empty levels."""
    levels = prefix.split("/")
    if not prefix or any(not level or "+" in level or "#" in level for level in levels):
        raise ValidationError(
            f"{prefix!r} is not a topic prefix (levels separated by '/', no wildcards, "
            "no empty level)",
            field="topic prefix",
        )
    return prefix


def telemetry_topic(kit_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where ``kit_id`` publishes its readings."""
    return f"{prefix}/{kit_id}/telemetry"


def status_topic(kit_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where ``kit_id`` keeps its retained online/offline status."""
    return f"{prefix}/{kit_id}/status"


def encode(reading: Reading) -> bytes:
    """The telemetry payload of ``reading``."""
    doc = {
        "kit": reading.kit_id,
        "appliance": reading.appliance,
        "ts": reading.ts_ms / 1000,
        "sensors": {name: value for name, value in reading.values.items() if value is not None},
        "kit_seq": reading.seq,
        "label": reading.label,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes, *, source: str = "telemetry payload") -> Reading:
    """A reading from its telemetry payload; errors name the field.

    Sensors of a known appliance that are not in the payload come back as ``None``;
    ``faults`` is the label's fault alone and ``level`` 0, as neither is on the wire.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValidationError(f"not JSON ({err})", source=source) from err
    if not isinstance(doc, dict):
        raise ValidationError("must be a JSON object", source=source)
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown field; a reading has {', '.join(sorted(_FIELDS))}",
            source=source,
            field=unknown[0],
        )
    kit = _field(doc, "kit", str, source)
    if not KIT_ID.match(kit):
        raise ValidationError("is not a kit id", source=source, field="kit")
    sensors = _field(doc, "sensors", dict, source)
    for name, value in sensors.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValidationError("must be a finite number", source=source, field=f"sensors.{name}")
    kind = _field(doc, "appliance", str, source)
    model = APPLIANCES.get(kind)
    values: dict[str, float | None] = (
        {s.name: None for s in model.sensors} if model is not None else {}
    )
    values |= {str(k): float(v) for k, v in sensors.items()}
    ts = _field(doc, "ts", (int, float), source)
    label = _field(doc, "label", str, source)
    return Reading(
        kit_id=kit,
        appliance=kind,
        seq=_count(doc, "kit_seq", source),
        ts_ms=round(ts * 1000),
        values=values,
        label=label,
        faults=() if label == NORMAL else (label,),
    )


def status_payload(kit: KitSpec, *, online: bool) -> bytes:
    """The retained status of ``kit``."""
    doc: dict[str, Any] = {"kit": kit.kit_id, "online": online}
    if online:
        doc |= {
            "appliance": kit.appliance,
            "interval_ms": kit.interval_ms,
            "sensors": [
                {"name": s.name, "quantity": s.quantity.value, "unit": s.unit}
                for s in kit.model.sensors
            ],
        }
    return json.dumps(doc, separators=(",", ":")).encode()


def _field(doc: dict[str, Any], name: str, kind: Any, source: str, where: str = "") -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValidationError("is missing or of the wrong type", source=source, field=where + name)
    return value


def _count(doc: dict[str, Any], name: str, source: str) -> int:
    value = _field(doc, name, int, source)
    if value < 0:
        raise ValidationError("must not be negative", source=source, field=name)
    return int(value)
