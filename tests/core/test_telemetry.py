"""The telemetry wire format: batches, their codec, idempotency keys, readings, topics."""

from __future__ import annotations

import gzip
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.errors import ValidationError
from edgeloop.core.telemetry import (
    MAX_PAYLOAD_BYTES,
    TELEMETRY_TOPIC_FILTER,
    Reading,
    Record,
    TelemetryBatch,
    decode_batch,
    encode_batch,
    encode_reading,
    idempotency_key,
    parse_reading,
    parse_telemetry_topic,
    reading_from_json,
    telemetry_topic,
)
from edgeloop.core.topics import topic_matches

READING = Reading("kit-0007", "furnace", 1716200000.5, {"temp_c": 61.2, "current_a": 3}, 42, None)


def _batch(count: int = 3, *, thing: str = "hub-1", stream: str = "readings") -> TelemetryBatch:
    return TelemetryBatch(
        thing,
        stream,
        tuple(
            Record(100 + i, 1716200000_000000 + i, encode_reading(READING)) for i in range(count)
        ),
    )


# --- the codec ----------------------------------------------------------------------------


def test_round_trip_gzipped_and_plain() -> None:
    batch = _batch()
    packed = encode_batch(batch)
    assert packed[:2] == b"\x1f\x8b"
    assert decode_batch(packed) == batch
    plain = encode_batch(batch, compress=False)
    assert plain.startswith(b"ELTB\x01")
    assert decode_batch(plain) == batch
    assert batch.first == 100 and batch.last == 102


def test_equal_batches_encode_to_equal_bytes_and_keys() -> None:
    assert encode_batch(_batch()) == encode_batch(_batch())
    assert idempotency_key(_batch()) == idempotency_key(_batch())
    assert idempotency_key(_batch()) != idempotency_key(_batch(4))
    assert idempotency_key(_batch()) != idempotency_key(_batch(thing="hub-2"))
    assert idempotency_key(_batch()).startswith("b1-")


records = st.lists(
    st.builds(
        Record,
        st.integers(0, 2**63 - 1),
        st.integers(-(2**63), 2**63 - 1),
        st.binary(max_size=300),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    records=records,
    thing=st.from_regex(r"[a-zA-Z0-9:_-]{1,128}", fullmatch=True),
    stream=st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True),
    compress=st.booleans(),
)
def test_codec_round_trips_any_batch(
    records: list[Record], thing: str, stream: str, compress: bool
) -> None:
    batch = TelemetryBatch(thing, stream, tuple(records))
    assert decode_batch(encode_batch(batch, compress=compress)) == batch


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_decoding_garbage_names_the_field_and_nothing_else(data: bytes) -> None:
    try:
        decode_batch(data)
    except ValidationError as err:
        assert err.field
    for cut in range(0, len(data), 7):
        try:
            decode_batch(encode_batch(_batch(2), compress=False)[:cut] + data[:cut])
        except ValidationError as err:
            assert err.field


@pytest.mark.parametrize(
    ("mangle", "field"),
    [
        (lambda b: b"nonsense", "body"),
        (lambda b: b"\x1f\x8b" + b"broken gzip", "body"),
        (lambda b: gzip.compress(b)[:-9], "body"),
        (lambda b: b"ELTB\x02" + b[5:], "body"),
        (lambda b: b[:-1], "records[2].payload"),
        (lambda b: b + b"x", "header.count"),
        (lambda b: b[:5] + b"\xff\xff\x00\x00" + b[9:], "header"),
    ],
)
def test_broken_bodies_name_where(mangle: object, field: str) -> None:
    body = encode_batch(_batch(), compress=False)
    with pytest.raises(ValidationError) as caught:
        decode_batch(mangle(body))  # type: ignore[operator]
    assert caught.value.field == field


def _with_header(header: dict[str, object]) -> bytes:
    raw = json.dumps(header).encode()
    return b"ELTB\x01" + struct.pack("<I", len(raw)) + raw


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ({"thing": "a/b", "stream": "s", "count": 0}, "header.thing"),
        ({"stream": "s", "count": 0}, "header.thing"),
        ({"thing": "t", "stream": "a b", "count": 0}, "header.stream"),
        ({"thing": "t", "stream": "s", "count": -1}, "header.count"),
        ({"thing": "t", "stream": "s", "count": True}, "header.count"),
        ({"thing": "t", "stream": "s", "count": 1}, "records[0]"),
    ],
)
def test_bad_headers_name_the_field(header: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_batch(_with_header(header))
    assert caught.value.field == field


def test_limits() -> None:
    with pytest.raises(ValidationError, match="at most") as caught:
        encode_batch(TelemetryBatch("t", "s", (Record(1, 0, b"x" * (MAX_PAYLOAD_BYTES + 1)),)))
    assert caught.value.field == "records[0].payload"
    with pytest.raises(ValidationError) as caught:
        encode_batch(TelemetryBatch("t", "s", (Record(-1, 0, b""),)))
    assert caught.value.field == "records[0].sequence"
    bomb = gzip.compress(b"\0" * (2 << 20))
    with pytest.raises(ValidationError, match="more than") as caught:
        decode_batch(bomb, max_bytes=1 << 20)
    assert caught.value.field == "body"
    with pytest.raises(ValidationError) as caught:
        TelemetryBatch("no spaces", "s", ())
    assert caught.value.field == "thing"


# --- readings -----------------------------------------------------------------------------


def test_reading_round_trip() -> None:
    assert parse_reading(encode_reading(READING)) == Reading(
        "kit-0007", "furnace", 1716200000.5, {"temp_c": 61.2, "current_a": 3}, 42
    )
    bare = Reading("k", "pump", 1716200000, {"p": 1.0})
    assert json.loads(encode_reading(bare)) == {
        "kit": "k",
        "appliance": "pump",
        "ts": 1716200000,
        "sensors": {"p": 1.0},
    }
    assert reading_from_json({**bare.to_json(), "label": None, "kit_seq": None}) == bare
    # Every sensor dropped out: still a reading (the kit's counter moved on).
    assert reading_from_json({**GOOD, "sensors": {}}).sensors == {}


GOOD = {"kit": "k", "appliance": "fridge", "ts": 1716200000.0, "sensors": {"t": 4.5}}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"kit": None}, "kit", "string"),
        ({"kit": ""}, "kit", "1-128"),
        ({"appliance": 3}, "appliance", "string"),
        ({"ts": "yesterday"}, "ts", "not a string"),
        ({"ts": True}, "ts", "not a boolean"),
        ({"ts": 12.0}, "ts", "device's clock"),
        ({"sensors": []}, "sensors", "not an array"),
        ({"sensors": {f"s{i}": i for i in range(65)}}, "sensors", "at most 64"),
        ({"sensors": {"t": "hot"}}, "sensors.t", "number"),
        ({"sensors": {"t": None}}, "sensors.t", "not null"),
        ({"sensors": {"t": True}}, "sensors.t", "not a boolean"),
        ({"sensors": {"t": float("nan")}}, "sensors.t", "finite"),
        ({"sensors": {"bad name": 1}}, "sensors.bad name", "sensor name"),
        ({"kit_seq": 1.5}, "kit_seq", "integer"),
        ({"label": 7}, "label", "string"),
        ({"label": "x" * 65}, "label", "at most 64"),
        ({"temperature": 3}, "temperature", "unknown field"),
    ],
)
def test_invalid_readings_name_the_field(change: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        reading_from_json({**GOOD, **change})
    assert caught.value.field == field
    assert words in caught.value.reason


@pytest.mark.parametrize("missing", ["kit", "appliance", "ts", "sensors"])
def test_required_fields(missing: str) -> None:
    document = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ValidationError, match="required") as caught:
        reading_from_json(document)
    assert caught.value.field == missing


@pytest.mark.parametrize(
    ("payload", "words"), [(b"not json", "not JSON"), (b"[1]", "an array"), (b"\xff", "not JSON")]
)
def test_payloads_that_are_not_objects(payload: bytes, words: str) -> None:
    with pytest.raises(ValidationError, match=words) as caught:
        parse_reading(payload)
    assert caught.value.field == "payload"


# --- topics -------------------------------------------------------------------------------


def test_telemetry_topic_is_under_the_things_grant() -> None:
    topic = telemetry_topic("hub-1", "alerts")
    assert topic == "edgeloop/things/hub-1/telemetry/alerts"
    assert topic_matches("edgeloop/things/hub-1/#", topic)  # the broker's %u grant
    assert topic_matches(TELEMETRY_TOPIC_FILTER, topic)
    assert parse_telemetry_topic(topic) == ("hub-1", "alerts")
    for other in (
        "edgeloop/things/hub-1/connectivity",
        "edgeloop/things/hub-1/telemetry/a/b",
        "edgeloop/things/hub 1/telemetry/a",
        "$aws/things/hub-1/shadow/update",
    ):
        assert parse_telemetry_topic(other) is None
    with pytest.raises(ValidationError) as caught:
        telemetry_topic("hub-1", "a/b")
    assert caught.value.field == "stream"
