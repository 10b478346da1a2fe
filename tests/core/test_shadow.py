"""Tests for edgeloop.core.shadow: AWS IoT Device Shadow semantics, from AWS's worked examples."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.errors import ShadowError, ValidationError
from edgeloop.core.shadow import (
    MAX_STATE_BYTES,
    ShadowDocument,
    apply_update,
    compute_delta,
    delete,
    get_response,
    not_found,
    parse_payload,
)

T0 = 1_700_000_000


def update(doc: ShadowDocument | None, state: Any, now: int = T0, **extra: Any) -> ShadowDocument:
    return apply_update(doc, {"state": state, **extra}, now).document


def rejected(doc: ShadowDocument | None, request: Any) -> ShadowError:
    with pytest.raises(ShadowError) as info:
        apply_update(doc, request, T0)
    return info.value


# --- AWS's worked examples ----------------------------------------------------------------


def test_update_merges_only_the_fields_given() -> None:
    # "Updating a Shadow": reported color + a desired update.
    doc = update(None, {"reported": {"color": {"r": 255, "g": 255, "b": 0}}})
    doc = update(doc, {"desired": {"color": {"r": 10}, "engine": "ON"}}, T0 + 1)
    assert doc.desired == {"color": {"r": 10}, "engine": "ON"}
    # The device applies the delta and reports; nested objects merge key by key.
    result = apply_update(
        doc, {"state": {"reported": {"color": {"r": 10}, "engine": "ON"}}}, T0 + 2
    )
    assert result.document.reported == {"color": {"r": 10, "g": 255, "b": 0}, "engine": "ON"}
    assert result.delta is None
    assert result.document.version == 3


def test_get_includes_delta_with_desired_metadata() -> None:
    # "Retrieving a Shadow Document": lights.color differs, engine agrees.
    doc = update(None, {"desired": {"lights": {"color": "RED"}, "engine": "ON"}}, 123456)
    doc = update(doc, {"reported": {"lights": {"color": "GREEN"}, "engine": "ON"}}, 789012)
    response = get_response(doc, 123456789)
    assert response == {
        "state": {
            "desired": {"lights": {"color": "RED"}, "engine": "ON"},
            "reported": {"lights": {"color": "GREEN"}, "engine": "ON"},
            "delta": {"lights": {"color": "RED"}},
        },
        "metadata": {
            "desired": {
                "lights": {"color": {"timestamp": 123456}},
                "engine": {"timestamp": 123456},
            },
            "reported": {
                "lights": {"color": {"timestamp": 789012}},
                "engine": {"timestamp": 789012},
            },
            "delta": {"lights": {"color": {"timestamp": 123456}}},
        },
        "version": 2,
        "timestamp": 123456789,
    }


def test_delta_state_example() -> None:
    # "Delta state": keys only in reported are not in the delta; keys only in desired are.
    delta, _ = compute_delta(
        {"color": "RED", "state": "STOP"}, {"color": "GREEN", "engine": "ON"}, {}
    )
    assert delta == {"color": "RED", "state": "STOP"}


def test_nested_delta_keeps_the_path_to_the_root() -> None:
    desired = {"lights": {"color": {"r": 255, "g": 255, "b": 255}}}
    reported = {"lights": {"color": {"r": 255, "g": 0, "b": 255}}}
    meta = {"lights": {"color": {k: {"timestamp": 1} for k in "rgb"}}}
    delta, delta_meta = compute_delta(desired, reported, meta)
    assert delta == {"lights": {"color": {"g": 255}}}
    assert delta_meta == {"lights": {"color": {"g": {"timestamp": 1}}}}


def test_arrays_are_compared_and_replaced_whole() -> None:
    doc = update(None, {"desired": {"colors": ["RED", "GREEN", "BLUE"]}})
    doc = update(doc, {"desired": {"colors": ["RED"]}})
    assert doc.desired == {"colors": ["RED"]}
    assert doc.desired_metadata == {"colors": {"timestamp": T0}}
    delta, _ = compute_delta({"colors": ["RED", "GREEN"]}, {"colors": ["RED"]}, {})
    assert delta == {"colors": ["RED", "GREEN"]}


def test_optimistic_locking_example() -> None:
    doc = update(None, {"desired": {"colors": ["RED", "GREEN", "BLUE"]}})
    for _ in range(9):
        doc = update(doc, {"desired": {"colors": ["RED", "GREEN", "BLUE"]}})
    assert doc.version == 10
    request = {
        "state": {"desired": {"colors": ["BLUE"]}},
        "version": 9,
        "clientToken": "426bfd96-e720-46d3-95cd-014e3ef12bb6",
    }
    error = rejected(doc, request)
    assert error.to_document(T0) == {
        "code": 409,
        "message": "Version conflict",
        "timestamp": T0,
        "clientToken": "426bfd96-e720-46d3-95cd-014e3ef12bb6",
    }
    result = apply_update(doc, {**request, "version": 10}, T0)
    assert result.document.desired == {"colors": ["BLUE"]}
    assert result.document.version == 11


def test_deleting_data_with_nulls() -> None:
    # "Deleting Data": desired null removes the section, reported.engine null the key.
    doc = update(
        None,
        {
            "desired": {"lights": {"color": "RED"}, "engine": "ON"},
            "reported": {"lights": {"color": "GREEN"}, "engine": "OFF"},
        },
    )
    doc = update(doc, {"desired": None, "reported": {"engine": None}})
    assert doc.state() == {"reported": {"lights": {"color": "GREEN"}}}
    assert doc.metadata() == {"reported": {"lights": {"color": {"timestamp": T0}}}}


def test_state_null_clears_everything_but_keeps_the_shadow() -> None:
    doc = update(None, {"desired": {"a": 1}, "reported": {"b": 2}})
    result = apply_update(doc, {"state": None}, T0 + 5)
    assert result.document.state() == {}
    assert result.document.version == 2
    assert result.accepted["state"] is None
    assert update(result.document, {"reported": {"b": 3}}).version == 3


def test_desired_null_with_reported_update() -> None:
    # "Empty sections": a device reports and clears desired in one request.
    doc = update(None, {"desired": {"color": "red"}})
    doc = update(doc, {"reported": {"color": "red"}, "desired": None})
    assert doc.state() == {"reported": {"color": "red"}}


def test_message_order_example_versions() -> None:
    doc = update(None, {"reported": {"color": "blue"}})
    first = apply_update(doc, {"state": {"desired": {"color": "RED"}}, "version": 1}, 123456778)
    second = apply_update(
        first.document, {"state": {"desired": {"color": "GREEN"}}, "version": 2}, 123456779
    )
    assert first.delta == {
        "state": {"color": "RED"},
        "metadata": {"color": {"timestamp": 123456778}},
        "version": 2,
        "timestamp": 123456778,
    }
    assert second.delta is not None
    assert second.delta["state"] == {"color": "GREEN"}
    assert second.delta["version"] == 3


# --- the published documents ----------------------------------------------------------------


def test_accepted_delta_and_documents() -> None:
    first = apply_update(None, {"state": {"reported": {"temp": 20}}}, T0)
    assert first.delta is None
    assert "previous" not in first.documents
    result = apply_update(
        first.document,
        {"state": {"desired": {"temp": 22, "mode": {"fan": "auto"}}}, "clientToken": "tok-1"},
        T0 + 10,
    )
    assert result.accepted == {
        "state": {"desired": {"temp": 22, "mode": {"fan": "auto"}}},
        "metadata": {
            "desired": {"temp": {"timestamp": T0 + 10}, "mode": {"fan": {"timestamp": T0 + 10}}}
        },
        "version": 2,
        "timestamp": T0 + 10,
        "clientToken": "tok-1",
    }
    assert result.delta == {
        "state": {"temp": 22, "mode": {"fan": "auto"}},
        "metadata": {"temp": {"timestamp": T0 + 10}, "mode": {"fan": {"timestamp": T0 + 10}}},
        "version": 2,
        "timestamp": T0 + 10,
        "clientToken": "tok-1",
    }
    assert result.documents == {
        "previous": {
            "state": {"reported": {"temp": 20}},
            "metadata": {"reported": {"temp": {"timestamp": T0}}},
            "version": 1,
        },
        "current": {
            "state": {"desired": {"temp": 22, "mode": {"fan": "auto"}}, "reported": {"temp": 20}},
            "metadata": {
                "desired": {
                    "temp": {"timestamp": T0 + 10},
                    "mode": {"fan": {"timestamp": T0 + 10}},
                },
                "reported": {"temp": {"timestamp": T0}},
            },
            "version": 2,
        },
        "timestamp": T0 + 10,
        "clientToken": "tok-1",
    }


def test_accepted_stamps_deleted_keys_too() -> None:
    doc = update(None, {"desired": {"engine": "ON", "fan": 1}})
    result = apply_update(doc, {"state": {"desired": {"engine": None}}}, T0 + 1)
    assert result.accepted["state"] == {"desired": {"engine": None}}
    assert result.accepted["metadata"] == {"desired": {"engine": {"timestamp": T0 + 1}}}
    assert result.document.desired == {"fan": 1}


def test_delta_is_published_when_reported_loses_a_desired_key() -> None:
    doc = update(None, {"desired": {"a": 1}, "reported": {"a": 1}})
    result = apply_update(doc, {"state": {"reported": {"a": None}}}, T0 + 1)
    assert result.delta is not None
    assert result.delta["state"] == {"a": 1}


def test_metadata_timestamps_only_move_for_touched_leaves() -> None:
    doc = update(None, {"reported": {"a": 1, "b": {"c": 2, "d": 3}}}, T0)
    doc = update(doc, {"reported": {"b": {"c": 2}}}, T0 + 7)
    assert doc.reported_metadata == {
        "a": {"timestamp": T0},
        "b": {"c": {"timestamp": T0 + 7}, "d": {"timestamp": T0}},
    }
    assert doc.timestamp == T0 + 7


def test_scalar_replaced_by_object_and_back() -> None:
    doc = update(None, {"reported": {"x": 1}})
    doc = update(doc, {"reported": {"x": {"y": 2}}})
    assert doc.reported == {"x": {"y": 2}}
    assert doc.reported_metadata == {"x": {"y": {"timestamp": T0}}}
    doc = update(doc, {"reported": {"x": [1, 2]}})
    assert doc.reported_metadata == {"x": {"timestamp": T0}}


def test_empty_objects_are_removed() -> None:
    doc = update(None, {"reported": {"a": {"b": 1}, "c": 1}})
    doc = update(doc, {"reported": {"a": {"b": None}}})
    assert doc.reported == {"c": 1}
    doc = update(doc, {"reported": {"c": None, "e": {}}})
    assert doc.reported is None
    assert doc.state() == {}


def test_json_equality_in_delta() -> None:
    assert compute_delta({"a": 1}, {"a": 1.0}, {})[0] == {}
    assert compute_delta({"a": True}, {"a": 1}, {})[0] == {"a": True}
    assert compute_delta({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]}, {})[0] == {}
    assert compute_delta({"a": {"b": 1}}, {"a": "x"}, {"a": {"b": {"timestamp": 3}}}) == (
        {"a": {"b": 1}},
        {"a": {"b": {"timestamp": 3}}},
    )


def test_inputs_are_not_mutated() -> None:
    doc = update(None, {"desired": {"a": {"b": 1}}})
    before = doc.to_json()
    request = {"state": {"desired": {"a": {"c": [1, 2]}}}}
    snapshot = json.loads(json.dumps(request))
    result = apply_update(doc, request, T0 + 1)
    assert doc.to_json() == before
    assert request == snapshot
    result.accepted["state"]["desired"]["a"]["c"].append(3)
    assert result.document.desired == {"a": {"b": 1, "c": [1, 2]}}


def test_new_shadow_continues_a_deleted_version() -> None:
    doc = update(None, {"reported": {"a": 1}})
    doc = update(doc, {"reported": {"a": 2}})
    gone = delete(doc, None, T0 + 3)
    assert gone.accepted == {"version": 2, "timestamp": T0 + 3}
    again = apply_update(None, {"state": {"reported": {"a": 3}}}, T0 + 4, base_version=gone.version)
    assert again.document.version == 3


def test_unknown_top_level_keys_are_ignored() -> None:
    result = apply_update(None, {"state": {"reported": {"a": 1}}, "extra": {"x": 1}}, T0)
    assert result.document.state() == {"reported": {"a": 1}}


def test_document_round_trips_through_json() -> None:
    doc = update(None, {"desired": {"a": [1, 2], "b": {"c": "x"}}, "reported": {"a": [1]}})
    text = json.dumps(doc.to_json())
    assert ShadowDocument.from_json(json.loads(text)) == doc
    empty = update(doc, None)
    assert ShadowDocument.from_json(empty.to_json()) == empty


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "shadow"),
        ({"state": {}, "metadata": {}, "version": -1, "timestamp": 0}, "version"),
        ({"state": {}, "metadata": {}, "version": True, "timestamp": 0}, "version"),
        ({"state": {}, "metadata": {}, "version": 1}, "timestamp"),
        ({"state": [], "metadata": {}, "version": 1, "timestamp": 0}, "state"),
        ({"state": {"desired": 1}, "metadata": {}, "version": 1, "timestamp": 0}, "state.desired"),
        (
            {"state": {"reported": {"a": 1}}, "metadata": {}, "version": 1, "timestamp": 0},
            "metadata.reported",
        ),
    ],
)
def test_from_json_names_what_is_wrong(data: Any, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ShadowDocument.from_json(data)
    assert info.value.field == field


# --- get and delete ----------------------------------------------------------------------


def test_get_without_delta_and_with_token() -> None:
    doc = update(None, {"reported": {"a": 1}})
    assert get_response(doc, T0 + 1, client_token="t") == {
        "state": {"reported": {"a": 1}},
        "metadata": {"reported": {"a": {"timestamp": T0}}},
        "version": 1,
        "timestamp": T0 + 1,
        "clientToken": "t",
    }


def test_delete_checks_version_and_echoes_token() -> None:
    doc = update(None, {"reported": {"a": 1}})
    result = delete(doc, {"version": 1, "clientToken": "d"}, T0)
    assert result.accepted == {"version": 1, "timestamp": T0, "clientToken": "d"}
    with pytest.raises(ShadowError) as info:
        delete(doc, {"version": 5, "clientToken": "d"}, T0)
    assert (info.value.code, info.value.message, info.value.client_token) == (
        409,
        "Version conflict",
        "d",
    )


def test_delete_or_get_of_a_missing_shadow_is_404() -> None:
    with pytest.raises(ShadowError) as info:
        delete(None, {"clientToken": "x"}, T0, shadow_name="config")
    assert info.value.to_document(T0) == {
        "code": 404,
        "message": "No shadow exists with name: config",
        "timestamp": T0,
        "clientToken": "x",
    }
    assert not_found("hub-1").code == 404


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        ({"clientToken": 5}, 400, "Invalid clientToken"),
        ({"version": "1"}, 400, "Invalid version"),
        ([], 400, "Invalid JSON"),
    ],
)
def test_delete_request_errors(request_: Any, code: int, message: str) -> None:
    doc = update(None, {"reported": {"a": 1}})
    with pytest.raises(ShadowError) as info:
        delete(doc, request_, T0)
    assert (info.value.code, info.value.message) == (code, message)


# --- every error case ----------------------------------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for i in range(depth - 1):
        value = {f"k{i}": value}
    return value


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        ("not an object", 400, "Invalid JSON"),
        ({}, 400, "Missing required node: state"),
        ({"version": 1}, 400, "Missing required node: state"),
        ({"state": 5}, 400, "State node must be an object"),
        ({"state": [{"desired": {}}]}, 400, "State node must be an object"),
        ({"state": {"desired": 5}}, 400, "Desired node must be an object"),
        ({"state": {"desired": [1]}}, 400, "Desired node must be an object"),
        ({"state": {"reported": "x"}}, 400, "Reported node must be an object"),
        ({"state": {"delta": {"a": 1}}}, 400, "State contains an invalid node"),
        ({"state": {"reported": {"a": [1, None]}}}, 400, "State contains an invalid node"),
        ({"state": {"reported": {"a": [[None]]}}}, 400, "State contains an invalid node"),
        ({"state": {}, "version": "3"}, 400, "Invalid version"),
        ({"state": {}, "version": True}, 400, "Invalid version"),
        ({"state": {}, "version": -1}, 400, "Invalid version"),
        ({"state": {}, "version": 1.5}, 400, "Invalid version"),
        ({"state": {}, "clientToken": 7}, 400, "Invalid clientToken"),
        ({"state": {}, "clientToken": "x" * 65}, 400, "Invalid clientToken"),
        ({"state": {}, "clientToken": "é" * 33}, 400, "Invalid clientToken"),
        (
            {"state": {"reported": nested(7)}},
            400,
            "JSON contains too many levels of nesting; maximum is 6",
        ),
        (
            {"state": {"reported": {"a": [[[[[[1]]]]]]}}},
            400,
            "JSON contains too many levels of nesting; maximum is 6",
        ),
        ({"state": {"reported": {"a": float("nan")}}}, 400, "Invalid JSON"),
        ({"state": {"reported": {"a": {1, 2}}}}, 400, "Invalid JSON"),
        ({"state": {"reported": {1: "a"}}}, 400, "Invalid JSON"),
        ({"state": {"desired": {"a": 1}}, "version": 7}, 409, "Version conflict"),
        (
            {"state": {"reported": {"blob": "x" * MAX_STATE_BYTES}}},
            413,
            "The payload exceeds the maximum size allowed",
        ),
    ],
)
def test_update_errors(request_: Any, code: int, message: str) -> None:
    doc = update(None, {"reported": {"z": 0}})  # version 1
    error = rejected(doc, request_)
    assert (error.code, error.message) == (code, message)


def test_limits_at_the_boundary_are_accepted() -> None:
    apply_update(None, {"state": {"reported": nested(6)}}, T0)
    apply_update(None, {"state": {"reported": {"a": [[[[[1]]]]]}}}, T0)
    apply_update(None, {"state": {}, "clientToken": "x" * 64}, T0)
    filler = "x" * (MAX_STATE_BYTES - len('{"reported":{"b":""}}'))
    exact = apply_update(None, {"state": {"reported": {"b": filler}}}, T0)
    assert exact.document.version == 1
    with pytest.raises(ShadowError) as info:
        apply_update(exact.document, {"state": {"desired": {"c": 1}}}, T0)
    assert info.value.code == 413  # the stored whole counts, not the request


def test_size_limit_counts_what_remains_after_deletes() -> None:
    big = apply_update(None, {"state": {"reported": {"b": "x" * 8000}}}, T0).document
    swapped = apply_update(big, {"state": {"reported": {"b": None, "c": "y" * 8000}}}, T0)
    assert swapped.document.reported == {"c": "y" * 8000}


def test_errors_echo_the_client_token() -> None:
    error = rejected(None, {"state": 5, "clientToken": "abc"})
    assert error.to_document(T0) == {
        "code": 400,
        "message": "State node must be an object",
        "timestamp": T0,
        "clientToken": "abc",
    }
    assert "clientToken" not in rejected(None, {"state": 5}).to_document(T0)


def test_a_version_on_a_new_shadow_must_be_its_base() -> None:
    assert apply_update(None, {"state": {}, "version": 0}, T0).document.version == 1
    assert rejected(None, {"state": {}, "version": 1}).code == 409
    result = apply_update(None, {"state": {}, "version": 4}, T0, base_version=4)
    assert result.document.version == 5


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"{not json", 400, "Invalid JSON"),
        (b"[1, 2]", 400, "Invalid JSON"),
        (b'{"a": NaN}', 400, "Invalid JSON"),
        (b"\xff\xfe", 415, "Unsupported documented encoding; supported encoding is UTF-8"),
    ],
)
def test_parse_payload_errors(payload: bytes, code: int, message: str) -> None:
    with pytest.raises(ShadowError) as info:
        parse_payload(payload)
    assert (info.value.code, info.value.message) == (code, message)


def test_parse_payload() -> None:
    assert parse_payload(b"") == {}
    assert parse_payload(None) == {}
    assert parse_payload('{"state": {}}') == {"state": {}}
    assert parse_payload(b'{"state": {"reported": {"t": "\xc3\xa9"}}}') == {
        "state": {"reported": {"t": "é"}}
    }


def test_error_documents_for_the_other_codes() -> None:
    for code, message in [
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (429, "Too Many Requests"),
        (500, "Internal service failure"),
    ]:
        assert ShadowError(code, message).to_document(1) == {
            "code": code,
            "message": message,
            "timestamp": 1,
        }


# --- properties ----------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])
SCALARS = st.one_of(
    st.integers(-5, 5), st.booleans(), st.sampled_from(["x", "y", ""]), st.floats(-2, 2)
)
LEAVES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))
VALUES = st.recursive(LEAVES, lambda inner: st.dictionaries(KEYS, inner, max_size=3), max_leaves=8)
PATCH_VALUES = st.recursive(
    st.one_of(LEAVES, st.none()),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
SECTIONS = st.dictionaries(KEYS, PATCH_VALUES, max_size=4)
STATES = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "desired": st.one_of(st.none(), SECTIONS),
            "reported": st.one_of(st.none(), SECTIONS),
        },
    ),
)


def assert_metadata_mirrors(state: Any, metadata: Any) -> None:
    if isinstance(state, dict):
        assert isinstance(metadata, dict) and state.keys() == metadata.keys()
        assert state  # empty objects are removed
        for key in state:
            assert_metadata_mirrors(state[key], metadata[key])
    else:
        assert set(metadata) == {"timestamp"}


@settings(max_examples=200)
@given(st.lists(STATES, min_size=1, max_size=8))
def test_versions_increase_and_metadata_mirrors_state(states: list[Any]) -> None:
    doc: ShadowDocument | None = None
    for step, state in enumerate(states):
        result = apply_update(doc, {"state": state}, T0 + step)
        previous_version = doc.version if doc is not None else 0
        assert result.document.version == previous_version + 1
        assert result.accepted["version"] == result.document.version
        doc = result.document
        for section, meta in (
            (doc.desired, doc.desired_metadata),
            (doc.reported, doc.reported_metadata),
        ):
            assert (section is None) == (meta is None)
            if section is not None:
                assert_metadata_mirrors(section, meta)
        assert ShadowDocument.from_json(json.loads(json.dumps(doc.to_json()))) == doc


@given(
    st.dictionaries(KEYS, VALUES, min_size=1, max_size=4),
    st.dictionaries(KEYS, VALUES, max_size=4),
)
def test_reporting_the_delta_empties_it(desired: dict[str, Any], reported: dict[str, Any]) -> None:
    doc = update(None, {"desired": desired, "reported": reported})
    delta, _ = doc.delta()
    after = apply_update(doc, {"state": {"reported": delta}}, T0 + 1)
    assert after.document.delta() == ({}, {})
    assert after.delta is None


@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4), st.data())
def test_null_deletes(section: dict[str, Any], data: st.DataObject) -> None:
    doc = update(None, {"reported": section})
    stored = doc.reported or {}
    key = data.draw(st.sampled_from(sorted(section)))
    after = update(doc, {"reported": {key: None}})
    remaining = after.reported or {}
    assert key not in remaining
    assert key not in (after.reported_metadata or {})
    assert remaining == {k: v for k, v in stored.items() if k != key}
