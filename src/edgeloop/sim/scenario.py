"""A home described as data: its kits, their seeds and the faults injected into them.

A scenario is a JSON or YAML document::

    name: winter-home            # optional
    seed: 42                     # every kit's stream derives from it (default 0)
    start: 2025-01-06T00:00:00Z  # simulated time of the first sample (default: this one)
    utc_offset_h: 1              # local time, for the daily curves (default 0)
    kits:
      - id: furnace-1            # the kit's MQTT client id, certificate CN and topic level
        appliance: furnace       # or an alias: hvac, refrigerator, washing_machine, water_pump
        interval: 10s            # optional: the model's own by default
        seed: 7                  # optional: this kit alone on another seed
        params: {day_setpoint_c: 21.0}   # optional: the appliance model's numbers, changed
        faults:
          - fault: bearing_wear
            at: 6h               # after start: 90, "90s", "15m", "6h", "2d"
            ramp: 12h            # time to reach full severity (default: the fault's own)
            severity: 0.8        # 0 < severity <= 1 (default 1)
            until: 2d            # optional: repaired then (default: never)
            sensors: [vibration_rms_g]   # sensor faults only (default: the fault's own)

Label semantics. Every reading carries ground truth: ``label`` is ``"normal"`` unless a
fault's window ``[at, until)`` contains the reading's timestamp, in which case it is that
fault's name, from its start on — during the ramp too, when the effect may still be too
small to see (``level`` says how far in it is: severity * ramp progress, in [0, 1]). With
several faults in their windows the label is the one that began first (the earlier entry on
a tie) and ``faults`` lists them all in that order. Reading ``seq`` of a kit is taken at
``start + seq * interval``, so a fault ``at: 6h`` first labels the sample taken at 6h.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from edgeloop.core.errors import ValidationError
from edgeloop.sim.models import (
    NORMAL,
    ApplianceModel,
    FaultMode,
    appliance,
    fault_mode,
)

DEFAULT_START = "2025-01-06T00:00:00Z"  # a winter Monday: the furnace has work to do
KIT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a topic level, a file name, a CN
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any, *, source: str | None = None, field: str | None = None) -> float:
    """Seconds from a number or a string like ``"90s"``, ``"15m"``, ``"6h"``, ``"2d"``."""
    if isinstance(value, bool):
        raise ValidationError("must be a duration, not a boolean", source=source, field=field)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValidationError(
                f"{value!r} is not a duration (a number of seconds, or like 90s, 15m, 6h, 2d)",
                source=source,
                field=field,
            )
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not 0 <= seconds < 1e9:
        raise ValidationError(f"{value!r} is out of range", source=source, field=field)
    return seconds


def parse_time(value: Any, *, source: str | None = None, field: str | None = None) -> int:
    """Milliseconds since the Unix epoch from an ISO 8601 time (UTC unless it says)."""
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError as err:
            raise ValidationError(
                f"{value!r} is not an ISO 8601 time like {DEFAULT_START}",
                source=source,
                field=field,
            ) from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """One fault in one kit: from ``start_s`` (after the scenario's start) to ``end_s``."""

    fault: str
    start_s: float
    severity: float = 1.0
    ramp_s: float = 0.0
    end_s: float | None = None
    sensors: tuple[str, ...] = ()  # the sensors a sensor fault hits

    @property
    def mode(self) -> FaultMode:
        """The fault mode injected."""
        return fault_mode(self.fault)

    def active(self, t_s: float) -> bool:
        """True while ``t_s`` (seconds after the start) is in the fault's window."""
        return self.start_s <= t_s and (self.end_s is None or t_s < self.end_s)

    def level(self, t_s: float) -> float:
        """severity * ramp progress at ``t_s``; 0 outside the window."""
        if not self.active(t_s):
            return 0.0
        if self.ramp_s <= 0:
            return self.severity
        return self.severity * min(1.0, (t_s - self.start_s) / self.ramp_s)


@dataclass(frozen=True, kw_only=True)
class KitSpec:
    """One monitoring kit on one appliance."""

    kit_id: str
    model: ApplianceModel  # with the scenario's params applied
    interval_ms: int
    seed: int | None = None  # None: the scenario's
    faults: tuple[FaultInjection, ...] = ()

    @property
    def appliance(self) -> str:
        """The appliance kind."""
        return self.model.kind

    def truth(self, t_s: float) -> tuple[str, tuple[str, ...], float]:
        """Ground truth at ``t_s`` after the start: label, active faults, the label's level."""
        active = [
            (f.start_s, i, f) for i, f in enumerate(self.faults) if f.active(t_s)
        ]  # few faults: a scan is cheaper than anything clever
        if not active:
            return NORMAL, (), 0.0
        active.sort(key=lambda item: (item[0], item[1]))
        first = active[0][2]
        return first.fault, tuple(f.fault for _, _, f in active), first.level(t_s)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A home: kits, a seed, a start time."""

    name: str = "home"
    seed: int = 0
    start_ms: int = parse_time(DEFAULT_START)
    utc_offset_h: float = 0.0
    kits: tuple[KitSpec, ...] = ()

    def kit(self, kit_id: str) -> KitSpec:
        """The kit called ``kit_id``."""
        for kit in self.kits:
            if kit.kit_id == kit_id:
                return kit
        raise ValidationError(f"no kit {kit_id!r} in scenario {self.name!r}", field="kits")


# --- parsing -----------------------------------------------------------------------------


def load_scenario(path: Path) -> Scenario:
    """Read a scenario file (``.json``, or YAML for anything else)."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValidationError(f"cannot read the scenario ({err.strerror})", source=source) from err
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ValidationError(f"not valid JSON/YAML ({err})", source=source) from err
    return parse_scenario(doc, source=source)


def parse_scenario(doc: Any, *, source: str = "scenario") -> Scenario:
    """A scenario from its parsed JSON/YAML document; errors name the field."""
    top = _mapping(doc, source, None, {"name", "seed", "start", "utc_offset_h", "kits"})
    seed = _integer(top.get("seed", 0), source, "seed")
    offset = top.get("utc_offset_h", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, int | float) or abs(offset) > 14:
        raise ValidationError("must be hours from -14 to 14", source=source, field="utc_offset_h")
    kits_doc = top.get("kits")
    if not isinstance(kits_doc, list) or not kits_doc:
        raise ValidationError("must be a non-empty list of kits", source=source, field="kits")
    kits = tuple(_kit(item, source, f"kits[{i}]") for i, item in enumerate(kits_doc))
    _unique_ids(kits, source)
    name = top.get("name", "home")
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("must be a non-empty string", source=source, field="name")
    return Scenario(
        name=name,
        seed=seed,
        start_ms=parse_time(top.get("start", DEFAULT_START), source=source, field="start"),
        utc_offset_h=float(offset),
        kits=kits,
    )


def home(
    appliances: Sequence[str],
    *,
    seed: int = 0,
    start: str | datetime = DEFAULT_START,
    name: str = "home",
) -> Scenario:
    """A scenario with one healthy kit per named appliance, ids ``<kind>-<n>``."""
    if not appliances:
        raise ValidationError("name at least one appliance", field="appliances")
    counts: dict[str, int] = {}
    kits = []
    for raw in appliances:
        model = appliance(raw, field="appliances")
        counts[model.kind] = counts.get(model.kind, 0) + 1
        kits.append(
            KitSpec(
                kit_id=f"{model.kind}-{counts[model.kind]}",
                model=model,
                interval_ms=round(model.interval_s * 1000),
            )
        )
    return Scenario(
        name=name, seed=seed, start_ms=parse_time(start, field="start"), kits=tuple(kits)
    )


def scenario_document(scenario: Scenario) -> dict[str, Any]:
    """The scenario's JSON form (params as given are not kept: only their effect)."""
    start = datetime.fromtimestamp(scenario.start_ms / 1000, tz=UTC)
    return {
        "name": scenario.name,
        "seed": scenario.seed,
        "start": start.isoformat().replace("+00:00", "Z"),
        "utc_offset_h": scenario.utc_offset_h,
        "kits": [
            {
                "id": kit.kit_id,
                "appliance": kit.appliance,
                "interval": kit.interval_ms / 1000,
                **({"seed": kit.seed} if kit.seed is not None else {}),
                "faults": [
                    {
                        "fault": f.fault,
                        "at": f.start_s,
                        "ramp": f.ramp_s,
                        "severity": f.severity,
                        **({"until": f.end_s} if f.end_s is not None else {}),
                        **({"sensors": list(f.sensors)} if f.sensors else {}),
                    }
                    for f in kit.faults
                ],
            }
            for kit in scenario.kits
        ],
    }


def _kit(doc: Any, source: str, where: str) -> KitSpec:
    kit = _mapping(doc, source, where, {"id", "appliance", "interval", "seed", "params", "faults"})
    if "appliance" not in kit:
        raise ValidationError("is required", source=source, field=f"{where}.appliance")
    model = appliance(str(kit["appliance"]), source=source, field=f"{where}.appliance")
    kit_id = kit.get("id")
    if not isinstance(kit_id, str) or not KIT_ID.match(kit_id):
        raise ValidationError(
            "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            source=source,
            field=f"{where}.id",
        )
    if "params" in kit:
        model = _with_params(model, kit["params"], source, f"{where}.params")
    interval_s = model.interval_s
    if "interval" in kit:
        interval_s = parse_duration(kit["interval"], source=source, field=f"{where}.interval")
    interval_ms = round(interval_s * 1000)
    if not 1 <= interval_ms <= 3_600_000 or abs(interval_ms - interval_s * 1000) > 1e-6:
        raise ValidationError(
            "must be from 1 ms to 1 h, in whole milliseconds",
            source=source,
            field=f"{where}.interval",
        )
    seed = _integer(kit["seed"], source, f"{where}.seed") if "seed" in kit else None
    faults_doc = kit.get("faults", [])
    if not isinstance(faults_doc, list):
        raise ValidationError("must be a list", source=source, field=f"{where}.faults")
    faults = tuple(
        _fault(item, model, source, f"{where}.faults[{i}]") for i, item in enumerate(faults_doc)
    )
    return KitSpec(kit_id=kit_id, model=model, interval_ms=interval_ms, seed=seed, faults=faults)


def _fault(doc: Any, model: ApplianceModel, source: str, where: str) -> FaultInjection:
    spec = _mapping(doc, source, where, {"fault", "at", "ramp", "severity", "until", "sensors"})
    if "fault" not in spec:
        raise ValidationError("is required", source=source, field=f"{where}.fault")
    mode = fault_mode(str(spec["fault"]), source=source, field=f"{where}.fault")
    if model.kind not in mode.applies_to:
        raise ValidationError(
            f"{mode.name} does not happen to a {model.kind}; it applies to "
            + ", ".join(sorted(mode.applies_to)),
            source=source,
            field=f"{where}.fault",
        )
    if "at" not in spec:
        raise ValidationError(
            "is required (when the fault begins, after the start)",
            source=source,
            field=f"{where}.at",
        )
    start = parse_duration(spec["at"], source=source, field=f"{where}.at")
    ramp = mode.default_ramp_s
    if "ramp" in spec:
        ramp = parse_duration(spec["ramp"], source=source, field=f"{where}.ramp")
    severity = spec.get("severity", 1.0)
    if isinstance(severity, bool) or not isinstance(severity, int | float) or not 0 < severity <= 1:
        raise ValidationError(
            "must be a number with 0 < severity <= 1", source=source, field=f"{where}.severity"
        )
    end = None
    if spec.get("until") is not None:
        end = parse_duration(spec["until"], source=source, field=f"{where}.until")
        if end <= start:
            raise ValidationError("must come after 'at'", source=source, field=f"{where}.until")
    sensors: tuple[str, ...] = ()
    if mode.sensor_fault is not None:
        names = spec.get("sensors")
        if names is None:
            chosen = model.sensors[:1] if mode.default_sensors == "first" else model.sensors
            sensors = tuple(s.name for s in chosen)
        else:
            if not isinstance(names, list) or not names:
                raise ValidationError(
                    "must be a non-empty list of sensor names",
                    source=source,
                    field=f"{where}.sensors",
                )
            for name in names:
                model_sensor = [s for s in model.sensors if s.name == name]
                if not model_sensor:
                    raise ValidationError(
                        f"a {model.kind} kit has no sensor {name!r}; it has "
                        + ", ".join(s.name for s in model.sensors),
                        source=source,
                        field=f"{where}.sensors",
                    )
            sensors = tuple(str(n) for n in names)
    elif "sensors" in spec:
        raise ValidationError(
            f"{mode.name} acts on the appliance, not on chosen sensors; remove 'sensors'",
            source=source,
            field=f"{where}.sensors",
        )
    return FaultInjection(
        fault=mode.name,
        start_s=start,
        severity=float(severity),
        ramp_s=ramp,
        end_s=end,
        sensors=sensors,
    )


def _with_params(model: ApplianceModel, doc: Any, source: str, where: str) -> ApplianceModel:
    given = _mapping(doc, source, where, None)
    current = model.params
    known = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
    changes: dict[str, float] = {}
    for key, value in given.items():
        if key not in known:
            raise ValidationError(
                f"a {model.kind} has no parameter {key!r}; numeric ones are "
                + ", ".join(k for k, v in known.items() if isinstance(v, int | float)),
                source=source,
                field=f"{where}.{key}",
            )
        if not isinstance(known[key], int | float) or isinstance(known[key], bool):
            raise ValidationError(
                "only numeric parameters can be set in a scenario",
                source=source,
                field=f"{where}.{key}",
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError("must be a number", source=source, field=f"{where}.{key}")
        changes[key] = float(value)
    return dataclasses.replace(model, params=dataclasses.replace(current, **changes))  # type: ignore[arg-type]


def _mapping(doc: Any, source: str, where: str | None, keys: set[str] | None) -> Mapping[str, Any]:
    if not isinstance(doc, dict):
        raise ValidationError("must be a mapping", source=source, field=where)
    if keys is not None:
        unknown = sorted(str(k) for k in doc if k not in keys)
        if unknown:
            raise ValidationError(
                f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(keys))}",
                source=source,
                field=where,
            )
    return doc


def _integer(value: Any, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValidationError("must be a non-negative integer", source=source, field=where)
    return value


def _unique_ids(kits: Sequence[KitSpec], source: str) -> None:
    seen: set[str] = set()
    for i, kit in enumerate(kits):
        if kit.kit_id in seen:
            raise ValidationError(
                f"kit id {kit.kit_id!r} is used twice", source=source, field=f"kits[{i}].id"
            )
        seen.add(kit.kit_id)
