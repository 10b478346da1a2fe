"""From a telemetry batch to lake rows: readings checked and turned into Arrow tables.

The lake's two tables (see ``TELEMETRY_SCHEMA`` and ``QUARANTINE_SCHEMA``)::

    telemetry    thing, stream, sequence, kit, appliance, sensors (name -> number),
                 device_time, kit_seq, label, hub_time, ingest_time, date
    quarantine   thing, stream, sequence, reason, field, payload (the bytes received),
                 hub_time, ingest_time, source, date

Speed comes from parsing a batch's readings in one go with Arrow's JSON reader and
checking them column by column; correctness from :func:`edgeloop.core.telemetry.reading_from_json`,
the hub's own rules. Every record the columnar path cannot vouch for (a payload that is
not one compact JSON object on one line, a null it cannot place, a column of the wrong
type, a value out of range) is checked one by one with those rules instead, so both
paths give the same verdict and a bad record is quarantined with its reason while its
neighbours are kept.

Sequence bookkeeping (which sequences of a stream the lake holds, and which kit counters
of each kit in it) is kept as sorted, disjoint, inclusive ranges ``[[first, last], ...]``;
:func:`seen_mask` and :func:`merge_ranges` work on them, :func:`kit_repeats` on a
batch's readings.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from edgeloop.core.errors import ValidationError
from edgeloop.core.telemetry import (
    MAX_LABEL,
    MAX_NAME,
    MAX_SENSORS,
    MAX_TS,
    MIN_TS,
    SENSOR_PATTERN,
    reading_from_json,
)

__all__ = [
    "QUARANTINE_SCHEMA",
    "TELEMETRY_SCHEMA",
    "Converted",
    "convert",
    "kit_repeats",
    "merge_ranges",
    "quarantine_table",
    "seen_mask",
]

UTC_US = pa.timestamp("us", tz="UTC")
SENSORS_TYPE = pa.map_(pa.string(), pa.float64())
TELEMETRY_SCHEMA = pa.schema(
    [
        pa.field("thing", pa.string(), nullable=False),
        pa.field("stream", pa.string(), nullable=False),
        pa.field("sequence", pa.int64(), nullable=False),
        pa.field("kit", pa.string(), nullable=False),
        pa.field("appliance", pa.string(), nullable=False),
        pa.field("sensors", SENSORS_TYPE, nullable=False),
        pa.field("device_time", UTC_US, nullable=False),
        pa.field("kit_seq", pa.int64()),
        pa.field("label", pa.string()),
        pa.field("hub_time", UTC_US, nullable=False),
        pa.field("ingest_time", UTC_US, nullable=False),
        pa.field("date", pa.date32(), nullable=False),  # of device_time, UTC: the partition
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("thing", pa.string(), nullable=False),
        pa.field("stream", pa.string()),
        pa.field("sequence", pa.int64()),  # null when the message could not be framed
        pa.field("reason", pa.string(), nullable=False),
        pa.field("field", pa.string()),
        pa.field("payload", pa.binary(), nullable=False),
        pa.field("hub_time", UTC_US),
        pa.field("ingest_time", UTC_US, nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "https" or "mqtt"
        pa.field("date", pa.date32(), nullable=False),  # of ingest_time, UTC
    ]
)

_US_PER_DAY = 86_400_000_000
# Explicit types for the reading's scalar fields; ``sensors`` is inferred (its keys vary).
_JSON_SCHEMA = pa.schema(
    [
        ("kit", pa.string()),
        ("appliance", pa.string()),
        ("ts", pa.float64()),
        ("kit_seq", pa.int64()),
        ("label", pa.string()),
    ]
)
_TOP_LEVEL = frozenset({*_JSON_SCHEMA.names, "sensors"})
_NUMERIC = (pa.float64(), pa.int64(), pa.null())


@dataclass(frozen=True)
class Converted:
    """A batch's records, sorted: readings for the lake, and the rest for quarantine."""

    rows: pa.Table  # TELEMETRY_SCHEMA, ordered by sequence
    quarantined: pa.Table  # QUARANTINE_SCHEMA


@dataclass
class _Bad:
    index: int
    reason: str
    field: str | None


def convert(
    thing: str,
    stream: str,
    sequences: np.ndarray[Any, Any],
    timestamps: np.ndarray[Any, Any],
    payloads: Sequence[bytes],
    *,
    ingest_time: datetime,
    source: str,
    max_future_us: int,
) -> Converted:
    """Check and convert records given as columns (none of them already in the lake).

    A reading whose device clock runs more than ``max_future_us`` ahead of ``ingest_time``
    is quarantined: its partition would be wrong, and retention would keep it forever.
    """
    ingest_us = _to_us(ingest_time)
    fast, slow, joined = _eligible(payloads)
    table: pa.Table | None = None
    if fast:
        table, refused = _columnar(payloads, fast, joined)
        slow.extend(refused)
    good_slow, bad = _one_by_one(payloads, sorted(slow))
    parts = [part for part in (table, good_slow) if part is not None and part.num_rows]
    readings = (
        pa.concat_tables(parts) if parts else _reading_columns([], [], [], [], [], [], [], [], [])
    )
    # Device clocks too far ahead: quarantined here, with their reason.
    ahead = pc.greater(readings.column("ts_us"), pa.scalar(ingest_us + max_future_us))
    if pc.any(ahead).as_py():
        for index in readings.filter(ahead).column("index").to_pylist():
            bad.append(
                _Bad(index, "the device's clock is ahead of the cloud's by more than allowed", "ts")
            )
        readings = readings.filter(pc.invert(ahead))
    rows = _telemetry_table(thing, stream, sequences, timestamps, readings, ingest_us)
    return Converted(
        rows=rows,
        quarantined=quarantine_table(
            thing,
            stream,
            [int(sequences[b.index]) for b in bad],
            [b.reason for b in bad],
            [b.field for b in bad],
            [payloads[b.index] for b in bad],
            [int(timestamps[b.index]) for b in bad],
            ingest_us=ingest_us,
            source=source,
        ),
    )


def _eligible(payloads: Sequence[bytes]) -> tuple[list[int], list[int], bytes | None]:
    """Which payloads the columnar path may parse: one compact object on one line, and no
    null except ``"label":null`` / ``"kit_seq":null`` (a null sensor must be refused, and
    Arrow reads it as a missing key). With them all, their newline-joined bytes too."""
    count = len(payloads)
    joined = b"\n".join(payloads)
    # The whole batch at once (C speed): n-1 newlines, each between "}" and "{", so every
    # payload is one line starting "{" and ending "}"; and every null accounted for (a
    # batch's counts are equal only when every payload's are).
    if (
        count
        and joined[:1] == b"{"
        and joined[-1:] == b"}"
        and joined.count(b"\n") == count - 1
        and joined.count(b"}\n{") == count - 1
        and b"\r" not in joined
        and (
            b"null" not in joined
            or joined.count(b"null")
            == joined.count(b'"label":null') + joined.count(b'"kit_seq":null')
        )
    ):
        return list(range(count)), [], joined
    fast: list[int] = []
    slow: list[int] = []
    for index, payload in enumerate(payloads):
        if (
            payload[:1] == b"{"
            and payload[-1:] == b"}"
            and b"\n" not in payload
            and b"\r" not in payload
            and (
                b"null" not in payload
                or payload.count(b"null")
                == payload.count(b'"label":null') + payload.count(b'"kit_seq":null')
            )
        ):
            fast.append(index)
        else:
            slow.append(index)
    return fast, slow, None


def _columnar(
    payloads: Sequence[bytes], indices: list[int], joined: bytes | None
) -> tuple[pa.Table | None, list[int]]:
    """Parse and check the readings at ``indices`` (``joined``: all of them, joined) as
    columns: the table of those that pass, and the indices left for the one-by-one path."""
    if joined is None:
        joined = b"\n".join([payloads[i] for i in indices])
    try:
        parsed = pajson.read_json(
            io.BytesIO(joined),
            read_options=pajson.ReadOptions(
                use_threads=False, block_size=max(1 << 20, len(joined) + 1)
            ),
            parse_options=pajson.ParseOptions(explicit_schema=_JSON_SCHEMA),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None, indices
    if parsed.num_rows != len(indices) or "sensors" not in parsed.column_names:
        return None, indices  # no reading had sensors: let the rules speak
    # Rows with a field a reading does not have: refused below, for the rules to name it.
    # (One whose value is null never gets here: _eligible counted its null.)
    unknown = [parsed.column(name) for name in parsed.column_names if name not in _TOP_LEVEL]
    sensors = parsed.column("sensors").combine_chunks()
    if not pa.types.is_struct(sensors.type):
        return None, indices
    names = [sensors.type.field(i).name for i in range(sensors.type.num_fields)]
    if (
        not names
        or len(names) > 4 * MAX_SENSORS
        or any(not SENSOR_PATTERN.fullmatch(n) or n in ("label", "kit_seq") for n in names)
        or any(sensors.type.field(i).type not in _NUMERIC for i in range(len(names)))
    ):
        return None, indices
    values = np.column_stack(
        [
            sensors.field(i).cast(pa.float64()).to_numpy(zero_copy_only=False)
            for i in range(len(names))
        ]
    )
    present = ~np.isnan(values)
    present[~sensors.is_valid().to_numpy(zero_copy_only=False)] = False
    per_row = present.sum(axis=1)
    kit = parsed.column("kit")
    appliance = parsed.column("appliance")
    ts = parsed.column("ts")
    label = parsed.column("label")
    ok = pc.and_kleene(
        pc.and_kleene(_name_ok(kit), _name_ok(appliance)),
        pc.and_kleene(
            pc.and_kleene(pc.greater_equal(ts, MIN_TS), pc.less(ts, MAX_TS)),
            pc.or_kleene(pc.is_null(label), pc.less_equal(pc.utf8_length(label), MAX_LABEL)),
        ),
    )
    ok_np = pc.fill_null(ok, False).to_numpy(zero_copy_only=False) & (
        sensors.is_valid().to_numpy(zero_copy_only=False) & (per_row <= MAX_SENSORS)
    )
    for column in unknown:
        ok_np &= ~column.is_valid().to_numpy(zero_copy_only=False)
    index_np = np.asarray(indices, dtype=np.int64)
    refused = index_np[~ok_np].tolist()
    if not ok_np.any():
        return None, indices
    keep = ok_np
    kept = present[keep]
    counts = kept.sum(axis=1)
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    keys = np.broadcast_to(np.asarray(names, dtype=object), kept.shape)[kept]
    sensor_map = pa.MapArray.from_arrays(
        pa.array(offsets),
        pa.array(keys, pa.string()),
        pa.array(values[keep][kept], pa.float64()),
    )
    mask = pa.array(keep)
    table = pa.table(
        {
            "index": pa.array(index_np[keep]),
            "kit": kit.filter(mask).combine_chunks(),
            "appliance": appliance.filter(mask).combine_chunks(),
            "sensors": sensor_map,
            "ts_us": _seconds_to_us(ts.filter(mask).combine_chunks()),
            "kit_seq": parsed.column("kit_seq").filter(mask).combine_chunks(),
            "label": label.filter(mask).combine_chunks(),
        }
    )
    return table, refused


def _name_ok(column: pa.ChunkedArray) -> pa.ChunkedArray:
    length = pc.utf8_length(column)
    return pc.and_kleene(pc.greater_equal(length, 1), pc.less_equal(length, MAX_NAME))


def _seconds_to_us(seconds: pa.Array) -> pa.Array:
    return pa.array(np.rint(seconds.to_numpy(zero_copy_only=False) * 1e6).astype(np.int64))


def _one_by_one(
    payloads: Sequence[bytes], indices: list[int]
) -> tuple[pa.Table | None, list[_Bad]]:
    """The hub's rules, record by record: readings that pass, and why the others do not."""
    bad: list[_Bad] = []
    good: list[int] = []
    kits: list[str] = []
    appliances: list[str] = []
    offsets = [0]
    keys: list[str] = []
    values: list[float] = []
    ts: list[int] = []
    kit_seqs: list[int | None] = []
    labels: list[str | None] = []
    for index in indices:
        try:
            try:
                document = json.loads(payloads[index])
            except (ValueError, UnicodeDecodeError) as err:
                raise ValidationError(f"not JSON: {err}", field="payload") from err
            reading = reading_from_json(document)
        except ValidationError as err:
            bad.append(_Bad(index, err.reason, err.field))
            continue
        if reading.kit_seq is not None and not -(2**63) <= reading.kit_seq < 2**63:
            bad.append(_Bad(index, "does not fit a signed 64-bit integer", "kit_seq"))
            continue
        good.append(index)
        kits.append(reading.kit)
        appliances.append(reading.appliance)
        keys.extend(reading.sensors)
        values.extend(reading.sensors.values())
        offsets.append(len(keys))
        ts.append(round(reading.ts * 1_000_000))
        kit_seqs.append(reading.kit_seq)
        labels.append(reading.label)
    if not good:
        return None, bad
    return _reading_columns(
        good, kits, appliances, offsets, keys, values, ts, kit_seqs, labels
    ), bad


def _reading_columns(
    index: list[int],
    kits: list[str],
    appliances: list[str],
    offsets: list[int],
    keys: list[str],
    values: list[float],
    ts: list[int],
    kit_seqs: list[int | None],
    labels: list[str | None],
) -> pa.Table:
    return pa.table(
        {
            "index": pa.array(index, pa.int64()),
            "kit": pa.array(kits, pa.string()),
            "appliance": pa.array(appliances, pa.string()),
            "sensors": pa.MapArray.from_arrays(
                pa.array(offsets or [0], pa.int32()),
                pa.array(keys, pa.string()),
                pa.array(values, pa.float64()),
            ),
            "ts_us": pa.array(ts, pa.int64()),
            "kit_seq": pa.array(kit_seqs, pa.int64()),
            "label": pa.array(labels, pa.string()),
        }
    )


def _telemetry_table(
    thing: str,
    stream: str,
    all_sequences: np.ndarray[Any, Any],
    all_timestamps: np.ndarray[Any, Any],
    readings: pa.Table,
    ingest_us: int,
) -> pa.Table:
    order = np.asarray(readings.column("index").to_numpy(), dtype=np.int64)
    sequences = all_sequences[order]
    hub_us = all_timestamps[order]
    by_sequence = np.argsort(sequences, kind="stable")
    take = pa.array(by_sequence)
    n = len(order)
    device_us = readings.column("ts_us").take(take).combine_chunks()
    days = np.floor_divide(device_us.to_numpy(zero_copy_only=False), _US_PER_DAY).astype(np.int32)
    return pa.Table.from_arrays(
        [
            pa.array([thing] * n, pa.string()),
            pa.array([stream] * n, pa.string()),
            pa.array(sequences[by_sequence]),
            readings.column("kit").take(take).combine_chunks(),
            readings.column("appliance").take(take).combine_chunks(),
            readings.column("sensors").take(take).combine_chunks().cast(SENSORS_TYPE),
            device_us.cast(UTC_US),
            readings.column("kit_seq").take(take).combine_chunks(),
            readings.column("label").take(take).combine_chunks(),
            pa.array(hub_us[by_sequence]).cast(UTC_US),
            pa.array(np.full(n, ingest_us, dtype=np.int64)).cast(UTC_US),
            pa.array(days).cast(pa.date32()),
        ],
        schema=TELEMETRY_SCHEMA,
    )


def quarantine_table(
    thing: str,
    stream: str | None,
    sequences: Sequence[int | None],
    reasons: Sequence[str],
    fields: Sequence[str | None],
    payloads: Sequence[bytes],
    hub_us: Sequence[int | None],
    *,
    ingest_us: int,
    source: str,
) -> pa.Table:
    """Rows of the quarantine table (the payloads kept as received)."""
    n = len(reasons)
    day = ingest_us // _US_PER_DAY
    return pa.Table.from_arrays(
        [
            pa.array([thing] * n, pa.string()),
            pa.array([stream] * n, pa.string()),
            pa.array(sequences, pa.int64()),
            pa.array(reasons, pa.string()),
            pa.array(fields, pa.string()),
            pa.array(payloads, pa.binary()),
            pa.array(hub_us, pa.int64()).cast(UTC_US),
            pa.array([ingest_us] * n, pa.int64()).cast(UTC_US),
            pa.array([source] * n, pa.string()),
            pa.array([day] * n, pa.int32()).cast(pa.date32()),
        ],
        schema=QUARANTINE_SCHEMA,
    )


def _to_us(when: datetime) -> int:
    return round(when.timestamp() * 1_000_000)


# --- sequence ranges --------------------------------------------------------------------


def seen_mask(
    ranges: Sequence[Sequence[int]], sequences: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """For each sequence, whether one of the sorted, disjoint, inclusive ``ranges`` holds it."""
    if not ranges or not len(sequences):
        return np.zeros(len(sequences), dtype=bool)
    bounds = np.asarray(ranges, dtype=np.int64)
    at = np.searchsorted(bounds[:, 0], sequences, side="right") - 1
    inside = at >= 0
    result = np.zeros(len(sequences), dtype=bool)
    result[inside] = sequences[inside] <= bounds[at[inside], 1]
    return result


def merge_ranges(
    ranges: Sequence[Sequence[int]], sequences: np.ndarray[Any, Any]
) -> list[list[int]]:
    """``ranges`` with ``sequences`` added, still sorted, disjoint and as few as possible."""
    spans: list[tuple[int, int]] = [(int(a), int(b)) for a, b in ranges]
    if len(sequences):
        unique = np.unique(sequences)
        breaks = np.flatnonzero(np.diff(unique) != 1)
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks, [len(unique) - 1]))
        spans.extend(zip(unique[starts].tolist(), unique[ends].tolist(), strict=True))
    spans.sort()
    merged: list[list[int]] = []
    for first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged


def kit_repeats(
    rows: pa.Table, held: Mapping[str, Sequence[Sequence[int]]]
) -> tuple[np.ndarray[Any, Any], dict[str, list[list[int]]]]:
    """Which of ``rows`` (telemetry rows, ordered by sequence) repeat a reading by its
    ``(kit, kit_seq)``: one the lake holds (``held``: kit -> ranges of kit_seq) or an
    earlier row of the batch; and the ranges of every kit that gains a reading, with it.
    Rows without ``kit_seq`` are never repeats."""
    repeat = np.zeros(rows.num_rows, dtype=bool)
    ranges: dict[str, list[list[int]]] = {}
    kit_seq = rows.column("kit_seq").combine_chunks()
    if kit_seq.null_count == len(kit_seq):
        return repeat, ranges
    valid = kit_seq.is_valid().to_numpy(zero_copy_only=False)
    counters = kit_seq.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    encoded = pc.dictionary_encode(rows.column("kit").combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    for code, kit in enumerate(encoded.dictionary.to_pylist()):
        at = np.flatnonzero((codes == code) & valid)
        if not len(at):
            continue
        seqs = counters[at]
        seen = seen_mask(held.get(kit, ()), seqs)
        once = np.zeros(len(at), dtype=bool)
        once[np.unique(seqs, return_index=True)[1]] = True
        again = seen | ~once
        repeat[at] = again
        if not again.all():
            ranges[kit] = merge_ranges(held.get(kit, ()), seqs[~again])
    return repeat, ranges
