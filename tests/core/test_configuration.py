"""Tests for edgeloop.core.config: JSON pointers, merge/reset and configuration updates."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.config import (
    ConfigurationUpdate,
    apply_update,
    deep_merge,
    format_pointer,
    get_pointer,
    has_pointer,
    json_equal,
    parse_configuration_update,
    parse_pointer,
    parse_update_config_document,
    reset,
    upgrade_defaults,
)
from edgeloop.core.errors import ConfigurationError, ValidationError

FAST = settings(max_examples=120, deadline=None)

# --- JSON pointers ----------------------------------------------------------------------

RFC_DOC = {
    "foo": ["bar", "baz"],
    "": 0,
    "a/b": 1,
    "c%d": 2,
    "e^f": 3,
    "g|h": 4,
    "i\\j": 5,
    'k"l': 6,
    " ": 7,
    "m~n": 8,
}


@pytest.mark.parametrize(
    ("pointer", "expected"),
    [
        ("", RFC_DOC),
        ("/foo", ["bar", "baz"]),
        ("/foo/0", "bar"),
        ("/", 0),
        ("/a~1b", 1),
        ("/c%d", 2),
        ("/e^f", 3),
        ("/g|h", 4),
        ("/i\\j", 5),
        ('/k"l', 6),
        ("/ ", 7),
        ("/m~0n", 8),
    ],
)
def test_rfc6901_examples(pointer: str, expected: Any) -> None:
    assert get_pointer(RFC_DOC, pointer) == expected
    assert has_pointer(RFC_DOC, pointer)


def test_parse_pointer_tokens() -> None:
    assert parse_pointer("") == ()
    assert parse_pointer("/") == ("",)
    assert parse_pointer("/a/b") == ("a", "b")
    assert parse_pointer("/a~1b/~0") == ("a/b", "~")
    # "~01" is "~" followed by "1", not "/".
    assert parse_pointer("/~01") == ("~1",)


@pytest.mark.parametrize("pointer", ["a/b", "#/a", " /a"])
def test_pointer_must_start_with_slash(pointer: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_pointer(pointer)
    assert repr(pointer) in str(info.value)
    assert 'must start with "/"' in str(info.value)


@pytest.mark.parametrize("pointer", ["/a~", "/a~2", "/~x/b"])
def test_pointer_bad_escape(pointer: str) -> None:
    with pytest.raises(ConfigurationError, match="~0"):
        parse_pointer(pointer)


def test_pointer_must_be_a_string() -> None:
    with pytest.raises(ConfigurationError, match="must be a string"):
        parse_pointer(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pointer", ["/missing", "/foo/2", "/foo/-", "/foo/01", "/foo/x", "/foo/0/deeper", "/ /x"]
)
def test_get_pointer_absent_raises_key_error(pointer: str) -> None:
    with pytest.raises(KeyError):
        get_pointer(RFC_DOC, pointer)
    assert not has_pointer(RFC_DOC, pointer)


def test_get_pointer_accepts_tokens() -> None:
    assert get_pointer({"a/b": {"c": 1}}, ("a/b", "c")) == 1
    with pytest.raises(KeyError, match="/a~1b/d"):
        get_pointer({"a/b": {"c": 1}}, ("a/b", "d"))


@FAST
@given(st.lists(st.text(max_size=5), max_size=5).map(tuple))
def test_pointer_escapes_round_trip(tokens: tuple[str, ...]) -> None:
    pointer = format_pointer(tokens)
    assert parse_pointer(pointer) == tokens
    assert format_pointer(parse_pointer(pointer)) == pointer


@FAST
@given(st.lists(st.text(alphabet="ab~/", max_size=4), min_size=1, max_size=3).map(tuple))
def test_pointer_finds_what_it_names(tokens: tuple[str, ...]) -> None:
    tree: Any = "leaf"
    for token in reversed(tokens):
        tree = {token: tree}
    assert get_pointer(tree, format_pointer(tokens)) == "leaf"


# --- deep_merge -------------------------------------------------------------------------


def test_deep_merge_examples() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    update = {"a": {"c": [3], "e": None}, "f": {"g": True}}
    assert deep_merge(base, update) == {
        "a": {"b": 1, "c": [3], "e": None},
        "d": "x",
        "f": {"g": True},
    }
    # A non-object on either side replaces.
    assert deep_merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}
    assert deep_merge({"a": 5}, {"a": {"b": 1}}) == {"a": {"b": 1}}
    assert deep_merge({"a": 1}, {}) == {"a": 1}


def test_deep_merge_does_not_alias_inputs() -> None:
    base = {"a": {"b": [1]}}
    update = {"c": {"d": [2]}}
    merged = deep_merge(base, update)
    merged["a"]["b"].append(9)
    merged["c"]["d"].append(9)
    assert base == {"a": {"b": [1]}}
    assert update == {"c": {"d": [2]}}


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=3),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("abcd"), inner, max_size=3)
    ),
    max_leaves=8,
)
json_trees = st.dictionaries(st.sampled_from("abcde"), json_values, max_size=4)


def _schema_tree(depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Trees where a key is always an object ("o*") or always a scalar ("s*")."""
    scalars = st.dictionaries(st.sampled_from(["s1", "s2", "s3"]), json_scalars, max_size=3)
    if depth == 2:
        return scalars
    objects = st.dictionaries(st.sampled_from(["o1", "o2"]), _schema_tree(depth + 1), max_size=2)
    return st.tuples(scalars, objects).map(lambda pair: {**pair[0], **pair[1]})


@FAST
@given(_schema_tree(), _schema_tree(), _schema_tree())
def test_deep_merge_is_associative_for_object_trees(a: Any, b: Any, c: Any) -> None:
    assert deep_merge(deep_merge(a, b), c) == deep_merge(a, deep_merge(b, c))


@FAST
@given(json_trees, json_trees)
def test_deep_merge_never_mutates_and_update_wins(base: Any, update: Any) -> None:
    before = copy.deepcopy((base, update))
    merged = deep_merge(base, update)
    assert (base, update) == before
    for key, value in update.items():
        if not isinstance(value, dict):
            assert json_equal(merged[key], value)
    assert deep_merge(merged, update) == merged  # idempotent
    assert deep_merge(base, {}) == base


# --- reset ------------------------------------------------------------------------------

DEFAULTS = {"mqtt": {"port": 1883, "host": "localhost"}, "log": "INFO", "topics": ["a", "b"]}


def test_reset_restores_default_or_removes() -> None:
    tree = {
        "mqtt": {"port": 8883, "host": "broker", "user": "u"},
        "log": "DEBUG",
        "extra": 1,
        "topics": ["c"],
    }
    assert reset(tree, DEFAULTS, ["/mqtt/port", "/mqtt/user", "/extra", "/topics"]) == {
        "mqtt": {"port": 1883, "host": "broker"},
        "log": "DEBUG",
        "topics": ["a", "b"],
    }
    assert reset(tree, DEFAULTS, ["/mqtt"]) == {
        "mqtt": {"port": 1883, "host": "localhost"},
        "log": "DEBUG",
        "extra": 1,
        "topics": ["c"],
    }
    assert reset(tree, DEFAULTS, [""]) == DEFAULTS
    assert reset(tree, DEFAULTS, []) == tree
    assert reset(tree, DEFAULTS, ["/absent/deeper"]) == tree


def test_reset_recreates_missing_parents_from_defaults() -> None:
    assert reset({"log": "DEBUG"}, DEFAULTS, ["/mqtt/port"]) == {
        "log": "DEBUG",
        "mqtt": {"port": 1883},
    }


def test_reset_below_a_customised_scalar_changes_nothing() -> None:
    tree = {"mqtt": "disabled"}
    assert reset(tree, DEFAULTS, ["/mqtt/port"]) == tree


@pytest.mark.parametrize("pointer", ["/topics/0", "/mqtt/list/1"])
def test_reset_inside_a_list_is_refused(pointer: str) -> None:
    tree = {"topics": ["x"], "mqtt": {"list": [1, 2]}}
    with pytest.raises(ConfigurationError) as info:
        reset(tree, DEFAULTS, [pointer])
    assert "whole list" in str(info.value)
    assert info.value.field == pointer


def test_reset_with_bad_pointer_changes_nothing() -> None:
    tree = {"log": "DEBUG"}
    with pytest.raises(ConfigurationError):
        reset(tree, DEFAULTS, ["/log", "log"])
    assert tree == {"log": "DEBUG"}


def test_reset_result_does_not_alias_defaults() -> None:
    defaults = copy.deepcopy(DEFAULTS)
    result = reset({}, defaults, ["/mqtt", "/topics"])
    result["mqtt"]["port"] = 1
    result["topics"].append("z")
    assert defaults == DEFAULTS


# --- apply_update -----------------------------------------------------------------------


def test_apply_update_resets_before_merging() -> None:
    tree = {"mqtt": {"port": 8883, "host": "broker"}, "log": "DEBUG"}
    update = ConfigurationUpdate(merge={"mqtt": {"port": 9000}}, reset=("/mqtt",))
    # RESET first, so the merged port survives and the host goes back to its default.
    assert apply_update(tree, DEFAULTS, update) == {
        "mqtt": {"port": 9000, "host": "localhost"},
        "log": "DEBUG",
    }


def test_apply_update_on_new_component_starts_from_defaults() -> None:
    update = ConfigurationUpdate(merge={"log": "WARN"})
    assert apply_update(DEFAULTS, DEFAULTS, update) == {**DEFAULTS, "log": "WARN"}


def test_apply_empty_update_is_identity() -> None:
    tree = {"a": 1}
    assert apply_update(tree, DEFAULTS, ConfigurationUpdate()) == tree


@FAST
@given(json_trees, json_trees)
def test_reset_everything_without_merge_returns_defaults(tree: Any, defaults: Any) -> None:
    assert apply_update(tree, defaults, ConfigurationUpdate(reset=("",))) == defaults


@FAST
@given(json_trees, json_trees, json_trees, st.lists(st.sampled_from(["", "/a", "/b/c", "/e"])))
def test_apply_update_never_mutates_inputs(
    tree: Any, defaults: Any, merge: Any, pointers: list[str]
) -> None:
    before = copy.deepcopy((tree, defaults, merge))
    update = ConfigurationUpdate(merge=merge, reset=tuple(pointers))
    try:
        result = apply_update(tree, defaults, update)
    except ConfigurationError:
        pass  # a pointer went into a list; still nothing may change
    else:
        result.clear()
    assert (tree, defaults, merge) == before


# --- upgrade_defaults -------------------------------------------------------------------


def test_upgrade_defaults_follows_new_defaults_where_not_customised() -> None:
    old = {"port": 1883, "log": "INFO", "retired": True, "nested": {"a": 1, "b": 2}}
    new = {"port": 8883, "log": "INFO", "added": "x", "nested": {"a": 10, "b": 2, "c": 3}}
    tree = {"port": 1883, "log": "DEBUG", "retired": True, "mine": 7, "nested": {"a": 1, "b": 5}}
    assert upgrade_defaults(tree, old, new) == {
        "port": 8883,  # never customised: follows the new default
        "log": "DEBUG",  # customised: kept
        "mine": 7,  # the user's own key: kept
        "added": "x",  # new default key: added
        "nested": {"a": 10, "b": 5, "c": 3},  # recursed key by key
    }  # "retired" was never customised and is gone from the new defaults


def test_upgrade_defaults_whole_subtree_equal_to_old_default_is_replaced() -> None:
    old = {"list": [1, 2], "obj": {"x": 1}}
    new = {"list": [3], "obj": "flat now"}
    assert upgrade_defaults({"list": [1, 2], "obj": {"x": 1}}, old, new) == new
    assert upgrade_defaults({"list": [1], "obj": {"x": 2}}, old, new) == {
        "list": [1],
        "obj": {"x": 2},
    }


def test_upgrade_defaults_distinguishes_true_from_one() -> None:
    assert upgrade_defaults({"a": True}, {"a": 1}, {"a": 2}) == {"a": True}
    assert upgrade_defaults({"a": 1}, {"a": 1}, {"a": 2}) == {"a": 2}


@FAST
@given(json_trees, json_trees)
def test_upgrade_of_untouched_tree_yields_new_defaults(old: Any, new: Any) -> None:
    before = copy.deepcopy((old, new))
    assert upgrade_defaults(copy.deepcopy(old), old, new) == new
    assert (old, new) == before


@FAST
@given(json_trees, json_trees)
def test_upgrade_to_same_defaults_keeps_tree_and_fills_gaps(tree: Any, defaults: Any) -> None:
    upgraded = upgrade_defaults(tree, defaults, defaults)
    for key, value in tree.items():
        if not isinstance(value, dict):
            assert json_equal(upgraded[key], value)
    for key in defaults:
        assert key in upgraded


# --- parsing configuration updates -------------------------------------------------------


def test_parse_configuration_update_shapes() -> None:
    parsed = parse_configuration_update(
        {"MERGE": {"a": {"b": 1}}, "RESET": ["/x", ""]}, source="deploy.json"
    )
    assert parsed == ConfigurationUpdate(merge={"a": {"b": 1}}, reset=("/x", ""))
    assert parse_configuration_update(
        {"merge": '{"a": 1}', "reset": []}, source="s"
    ) == ConfigurationUpdate(merge={"a": 1})
    assert parse_configuration_update({"Merge": {}}, source="s") == ConfigurationUpdate(merge={})
    assert parse_configuration_update({}, source="s") == ConfigurationUpdate()
    assert parse_configuration_update(None, source="s") == ConfigurationUpdate()


def test_parse_configuration_update_copies_merge() -> None:
    given_merge = {"a": {"b": 1}}
    parsed = parse_configuration_update({"MERGE": given_merge}, source="s")
    assert parsed.merge is not None
    parsed.merge["a"]["b"] = 2
    assert given_merge == {"a": {"b": 1}}


@pytest.mark.parametrize(
    ("obj", "field", "reason"),
    [
        ([], None, "must be an object"),
        ({"MERGE": [1]}, "MERGE", "must be a JSON object"),
        ({"MERGE": "[1]"}, "MERGE", "must be a JSON object"),
        ({"MERGE": "{not json"}, "MERGE", "not valid JSON"),
        ({"MERGE": '{"a": NaN}'}, "MERGE", "NaN is not valid JSON"),
        ({"MERGE": {"a": {1, 2}}}, "MERGE", "set at /a is not a JSON value"),
        ({"MERGE": {"a": float("inf")}}, "MERGE", "is not a JSON number"),
        ({"MERGE": {"a": {3: 1}}}, "MERGE", "key 3 at /a is not a string"),
        ({"RESET": "/a"}, "RESET", "must be a list of JSON pointers"),
        ({"RESET": ["/a", "", 5]}, "RESET[2]", "must be a JSON pointer string"),
        ({"RESET": ["/a", "b"]}, "RESET[1]", "must start with"),
        ({"RESET": ["/a~"]}, "RESET[0]", '"~0"'),
        ({"MERGE": {}, "merge": {}}, "MERGE", "given twice"),
        ({"UPDATE": {}}, "UPDATE", "unknown key 'UPDATE'"),
    ],
)
def test_parse_configuration_update_errors(obj: Any, field: str | None, reason: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_configuration_update(obj, source="deploy.json")
    err = info.value
    assert isinstance(err, ValidationError)
    assert err.source == "deploy.json"
    assert err.field == field
    assert reason in str(err)
    assert str(err).startswith("deploy.json")


def test_parse_update_config_document() -> None:
    document = {
        "com.example.A": {"MERGE": {"x": 1}, "RESET": ["/y"]},
        "com.example.B": {"reset": [""]},
    }
    expected = {
        "com.example.A": ConfigurationUpdate(merge={"x": 1}, reset=("/y",)),
        "com.example.B": ConfigurationUpdate(reset=("",)),
    }
    assert parse_update_config_document(document, source="cli") == expected
    assert parse_update_config_document(json.dumps(document), source="cli") == expected


@pytest.mark.parametrize(
    ("obj", "field", "reason"),
    [
        ("[", None, "not valid JSON"),
        ("[]", None, "must be an object mapping component names"),
        ({"": {}}, None, "non-empty string"),
        ({"com.example.A": 5}, "com.example.A", 'with "MERGE" and/or "RESET"'),
        ({"com.example.A": {"RESET": ["/a", 1]}}, "com.example.A.RESET[1]", "pointer string"),
        ({"com.example.A": {"RESET": ["x"]}}, "com.example.A.RESET[0]", "'x'"),
        ({"com.example.A": {"MERGE": 3}}, "com.example.A.MERGE", "JSON object"),
        ({"com.example.A": {"Reset": [], "RESET": []}}, "com.example.A.RESET", "twice"),
    ],
)
def test_parse_update_config_document_errors(obj: Any, field: str | None, reason: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_update_config_document(obj, source="--update-config")
    assert info.value.field == field
    assert info.value.source == "--update-config"
    assert reason in str(info.value)


def test_json_equal() -> None:
    assert json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not json_equal(True, 1)
    assert not json_equal(0, False)
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal([1], [1, 2])
    assert not json_equal([1], {"0": 1})
    assert not json_equal("1", 1)
    assert json_equal(None, None)
