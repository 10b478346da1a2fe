"""Tests for edgeloop.core.topics: MQTT validation and matching, the trie, IPC resources."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.errors import ValidationError
from edgeloop.core.topics import (
    MAX_TOPIC_BYTES,
    TopicTrie,
    resource_matches,
    topic_matches,
    validate_resource_pattern,
    validate_topic_filter,
    validate_topic_name,
)

# --- strategies -------------------------------------------------------------------------

NAME_LEVEL = st.sampled_from(["a", "b", "c", "", "ab"])
FIRST_LEVEL = st.one_of(NAME_LEVEL, st.sampled_from(["$SYS", "$aws"]))

topic_names = st.builds(
    lambda first, rest: "/".join([first, *rest]),
    FIRST_LEVEL,
    st.lists(NAME_LEVEL, max_size=4),
).filter(bool)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    first = draw(st.one_of(FIRST_LEVEL, st.just("+")))
    rest = draw(st.lists(st.one_of(NAME_LEVEL, st.just("+")), max_size=4))
    levels = [first, *rest]
    ending = draw(st.sampled_from(["", "append #", "only #"]))
    if ending == "append #":
        levels.append("#")
    elif ending == "only #":
        levels = ["#"]
    return "/".join(levels) or "+"


def reference_filter_ok(text: str) -> bool:
    levels = text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["a", "a/b", "/", "//", "/a", "a/", "$SYS/broker", "sport/tennis/player1", "é/ü"]
)
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("", "at least one character"),
        ("a/+", "wildcard"),
        ("a/#", "wildcard"),
        ("a+b", "wildcard"),
        ("a\x00b", "null character"),
        ("a\udc80", "valid UTF-8"),
    ],
)
def test_invalid_topic_names(topic: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why) as info:
        validate_topic_name(topic)
    assert info.value.field == "topic"


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "a/#", "a/+", "+/+", "/+", "+/", "a/+/c/#", "$SYS/#", "+/#", "/#", "//"],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "why"),
    [
        ("", "at least one character"),
        ("a/#/b", "'#' must be the last level"),
        ("a#", "'#' must be the last level"),
        ("a/b#", "'#' must be the last level"),
        ("#/", "'#' must be the last level"),
        ("##", "'#' must be the last level"),
        ("a+", "'\\+' must be alone"),
        ("a/+b/c", "'\\+' must be alone"),
        ("++", "'\\+' must be alone"),
        ("a\x00", "null character"),
    ],
)
def test_invalid_topic_filters(topic_filter: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        validate_topic_filter(topic_filter)


def test_length_limit_counts_utf8_bytes() -> None:
    validate_topic_name("a" * MAX_TOPIC_BYTES)
    with pytest.raises(ValidationError, match="65536"):
        validate_topic_name("a" * (MAX_TOPIC_BYTES + 1))
    two_byte = "é" * (MAX_TOPIC_BYTES // 2 + 1)  # fewer characters than bytes
    with pytest.raises(ValidationError, match="at most 65535 bytes"):
        validate_topic_filter(two_byte)


def test_non_string_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        validate_topic_name(b"a/b")  # type: ignore[arg-type]


@given(st.text(alphabet="ab/+#", min_size=1, max_size=12))
def test_filter_validity_matches_the_rule(text: str) -> None:
    try:
        validate_topic_filter(text)
    except ValidationError:
        assert not reference_filter_ok(text)
    else:
        assert reference_filter_ok(text)


@given(topic_filters())
def test_generated_filters_are_valid(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@given(topic_names)
def test_generated_names_are_valid(topic: str) -> None:
    validate_topic_name(topic)


# --- matching ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        # The examples of MQTT 3.1.1 section 4.7.1.
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "sport/tennis", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("+", "finance", True),
        ("+/tennis/#", "sport/tennis/player1", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("a/+/c", "a//c", True),
        # Section 4.7.2: wildcards at the first level never match '$' topics.
        ("#", "$SYS/broker/clients", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("$aws/things/+/shadow/update", "$aws/things/t1/shadow/update", True),
        ("a/#", "a/$b", True),  # only the first level is special
        ("#", "a$", True),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_a_filter_without_wildcards_matches_only_itself() -> None:
    assert topic_matches("a/b", "a/b")
    assert not topic_matches("a/b", "a/B")


# --- the trie ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.lists(st.tuples(topic_filters(), st.integers(0, 5)), max_size=30), topic_names)
def test_trie_agrees_with_topic_matches(subscriptions: list[tuple[str, int]], topic: str) -> None:
    trie: TopicTrie[int] = TopicTrie()
    unique = list(dict.fromkeys(subscriptions))
    for topic_filter, value in subscriptions:
        trie.add(topic_filter, value)
    expected = Counter(value for f, value in unique if topic_matches(f, topic))
    assert Counter(trie.match(topic)) == expected
    assert len(trie) == len(unique)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.booleans(), topic_filters(), st.integers(0, 3)),
        max_size=40,
    ),
    st.lists(topic_names, min_size=1, max_size=5),
)
def test_trie_add_remove_model(ops: list[tuple[bool, str, int]], topics: list[str]) -> None:
    trie: TopicTrie[int] = TopicTrie()
    model: set[tuple[str, int]] = set()
    for is_add, topic_filter, value in ops:
        if is_add:
            trie.add(topic_filter, value)
            model.add((topic_filter, value))
        else:
            assert trie.remove(topic_filter, value) is ((topic_filter, value) in model)
            model.discard((topic_filter, value))
    assert len(trie) == len(model)
    assert set(trie.filters()) == model
    for topic in topics:
        expected = Counter(v for f, v in model if topic_matches(f, topic))
        assert Counter(trie.match(topic)) == expected


def test_trie_basics() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a/+", "s1")
    trie.add("a/+", "s1")  # a re-subscription replaces, it does not duplicate
    trie.add("a/#", "s1")
    trie.add("a/b", "s2")
    assert len(trie) == 3
    assert sorted(trie.match("a/b")) == ["s1", "s1", "s2"]
    assert trie.match("a") == ["s1"]  # 'a/#' matches the parent level
    assert trie.match("b") == []
    assert trie.remove("a/+", "s1")
    assert not trie.remove("a/+", "s1")
    assert not trie.remove("x/y/z", "s1")
    assert not trie.remove("a/b", "other")
    assert sorted(trie.match("a/b")) == ["s1", "s2"]


def test_trie_dollar_topics() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("#", "all")
    trie.add("+/x", "plus")
    trie.add("$aws/#", "aws")
    trie.add("$aws/+", "aws-plus")
    assert sorted(trie.match("$aws/x")) == ["aws", "aws-plus"]
    assert sorted(trie.match("a/x")) == ["all", "plus"]


def test_trie_refuses_invalid_filters() -> None:
    trie: TopicTrie[str] = TopicTrie()
    with pytest.raises(ValidationError):
        trie.add("a/#/b", "x")
    assert len(trie) == 0


def test_trie_prunes_empty_branches() -> None:
    trie: TopicTrie[int] = TopicTrie()
    for i in range(100):
        trie.add(f"unique/{i}/x", i)
    for i in range(100):
        assert trie.remove(f"unique/{i}/x", i)
    assert trie._root.is_empty()


def test_trie_fan_out_is_fast() -> None:
    trie: TopicTrie[int] = TopicTrie()
    for i in range(20_000):
        trie.add(f"hub/{i % 200}/sensor/{i}/telemetry", i)
    for i in range(5_000):  # many subscribers on one topic
        trie.add("hub/7/sensor/+/telemetry", 100_000 + i)
    trie.add("hub/#", -1)
    started = time.perf_counter()
    for _ in range(200):
        matched = trie.match("hub/7/sensor/207/telemetry")
    elapsed = time.perf_counter() - started
    assert len(matched) == 5_002
    # 200 fan-outs of 5,002 subscribers among 25,001 filters; generous for slow CI.
    assert elapsed < 2.0, elapsed


# --- Greengrass IPC resources -----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "resource", "mqtt", "expected"),
    [
        ("test/topic", "test/topic", False, True),
        ("test/topic", "test/topic/x", False, False),
        ("*", "anything/at/all", False, True),
        ("*", "$aws/things/x", True, True),
        ("test/*", "test/a/b/c", False, True),
        ("test/*", "test", False, False),
        ("test/*/status", "test/a/b/status", False, True),
        ("*/status", "a/status/x", False, False),
        # Without MQTT wildcards (pubsub), '+' and '#' are plain characters.
        ("test/+", "test/a", False, False),
        ("test/+", "test/+", False, True),
        ("test/#", "test/a", False, False),
        ("test/#", "test/#", False, True),
        # With them (mqttproxy), the pattern is an MQTT filter over topics and filters.
        ("test/topic/#", "test/topic", True, True),
        ("test/topic/#", "test/topic/filter", True, True),
        ("test/topic/#", "test/topic/#", True, True),
        ("test/topic/#", "test/topic/+/x", True, True),
        ("test/topic/#", "test/topicx", True, False),
        ("test/topic/#", "test/#", True, False),
        ("#", "a/b", True, True),
        ("test/+/status", "test/a/status", True, True),
        ("test/+/status", "test/+/status", True, True),
        ("test/+/status", "test/a/b/status", True, False),
        ("test/+", "test/#", True, False),  # narrower than the nucleus, on purpose
        ("+", "a", True, True),
        ("+/x", "a/x", True, True),
        ("a+/x", "ab/x", True, False),  # '+' not filling its level is a plain character
        ("a+/x", "a+/x", True, True),
        ("a#", "a#", True, True),
        ("a/b#", "a/bc", True, False),
        ("abc/*xy/#", "abc/12xy", True, True),
        ("abc/*xy/#", "abc/1/2xy/z", True, True),
        # A request's '*' is literal text.
        ("a/b", "a/*", False, False),
        ("a/${*}", "a/*", False, True),
        ("a/${*}", "a/b", False, False),
        ("cost${$}", "cost$", False, True),
        ("why${?}", "why?", False, True),
    ],
)
def test_resource_matches(pattern: str, resource: str, mqtt: bool, expected: bool) -> None:
    assert resource_matches(pattern, resource, mqtt_wildcards=mqtt) is expected


def test_resource_thing_name_variable() -> None:
    pattern = "things/{iot:thingName}/telemetry/#"
    assert resource_matches(
        pattern, "things/hub-1/telemetry/x", mqtt_wildcards=True, thing_name="hub-1"
    )
    assert not resource_matches(
        pattern, "things/hub-2/telemetry/x", mqtt_wildcards=True, thing_name="hub-1"
    )
    # Without a thing name the variable stays literal text.
    assert resource_matches(pattern, "things/{iot:thingName}/telemetry", mqtt_wildcards=True)
    # A thing name is literal, even if it holds a character that is special in patterns.
    assert not resource_matches("t/{iot:thingName}", "t/abc", mqtt_wildcards=False, thing_name="a*")
    assert resource_matches("t/{iot:thingName}", "t/a*", mqtt_wildcards=False, thing_name="a*")


@pytest.mark.parametrize("pattern", ["a?b", "a/${x}", "a/${*", "${", "a/${**}"])
def test_invalid_resource_patterns(pattern: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_resource_pattern(pattern)
    assert info.value.field == "resource"
    with pytest.raises(ValidationError):
        resource_matches(pattern, "a", mqtt_wildcards=True)


def test_empty_resource_pattern_is_invalid() -> None:
    with pytest.raises(ValidationError, match="non-empty"):
        validate_resource_pattern("")


@given(topic_filters(), topic_names)
def test_mqtt_resource_agrees_with_topic_matches_for_topics(pattern: str, topic: str) -> None:
    # A pattern that is a plain MQTT filter allows a topic exactly when the filter matches
    # it, except for MQTT's '$' rule, which authorization does not apply (as the nucleus).
    if topic.startswith("$") and pattern.split("/")[0] in ("+", "#"):
        return
    assert resource_matches(pattern, topic, mqtt_wildcards=True) is topic_matches(pattern, topic)


@given(topic_filters(), topic_filters(), topic_names)
def test_an_allowed_filter_only_covers_allowed_topics(
    pattern: str, requested: str, topic: str
) -> None:
    # Soundness: if a pattern allows subscribing to a filter, every topic that filter
    # delivers is a topic the pattern would allow to be published or received.
    if resource_matches(pattern, requested, mqtt_wildcards=True) and topic_matches(
        requested, topic
    ):
        assert resource_matches(pattern, topic, mqtt_wildcards=True)
