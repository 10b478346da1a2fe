"""MQTT topic names and filters: validation, matching, a fan-out trie, IPC resource patterns.

MQTT rules (3.1.1 section 4.7, unchanged in 5.0 section 4.7):

- Topic names and filters are at least one character and at most 65535 bytes of UTF-8,
  and never contain U+0000.
- ``/`` separates levels; levels may be empty (``a//b``, ``/a`` and ``a/`` are valid).
- ``+`` matches exactly one level and must fill its whole level (``a/+/c``, ``+``).
- ``#`` matches any number of levels, including the parent level itself (``a/#`` matches
  ``a``); it must be the last character and fill its whole level (``a/#``, ``#``).
- Topic names (what is published) contain no wildcards.
- A filter whose first level is ``+`` or ``#`` does not match a topic starting with ``$``
  (``$SYS/...``, ``$aws/...``): such topics are only matched by filters that spell ``$...``.

Greengrass IPC authorization resources (``accessControl`` in a recipe) are matched by
``resource_matches``; see its docstring for the nucleus behaviour it follows.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Generic, TypeVar

from edgeloop.core.errors import ValidationError

__all__ = [
    "MAX_TOPIC_BYTES",
    "TopicTrie",
    "resource_matches",
    "topic_matches",
    "validate_resource_pattern",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_TOPIC_BYTES = 65535

T = TypeVar("T", bound=Hashable)


# --- validation ------------------------------------------------------------------------


def _validate_common(topic: str, what: str) -> None:
    if not isinstance(topic, str):
        raise ValidationError(
            f"a {what} must be a string, got {type(topic).__name__}", field="topic"
        )
    if topic == "":
        raise ValidationError(f"a {what} must be at least one character long", field="topic")
    if "\x00" in topic:
        raise ValidationError(f"a {what} must not contain the null character U+0000", field="topic")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ValidationError(
            f"a {what} must be valid UTF-8 ({err.reason})", field="topic"
        ) from err
    if size > MAX_TOPIC_BYTES:
        raise ValidationError(
            f"a {what} is at most {MAX_TOPIC_BYTES} bytes of UTF-8, this one is {size}",
            field="topic",
        )


def validate_topic_name(topic: str) -> None:
    """Raise ``ValidationError`` unless ``topic`` is a valid MQTT topic name (no wildcards)."""
    _validate_common(topic, "topic name")
    if "+" in topic or "#" in topic:
        raise ValidationError(
            f"topic name {topic!r} contains a wildcard ('+' or '#'); "
            "wildcards are only allowed in subscription filters",
            field="topic",
        )


def validate_topic_filter(topic_filter: str) -> None:
    """Raise ``ValidationError`` unless ``topic_filter`` is a valid MQTT topic filter."""
    _validate_common(topic_filter, "topic filter")
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise ValidationError(
                f"topic filter {topic_filter!r}: '#' must be the last level and alone in it "
                "(e.g. 'a/#')",
                field="topic",
            )
        if "+" in level and level != "+":
            raise ValidationError(
                f"topic filter {topic_filter!r}: '+' must be alone in its level (e.g. 'a/+/c')",
                field="topic",
            )


# --- matching --------------------------------------------------------------------------


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether the (valid) filter matches the (valid) topic name, with MQTT semantics."""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(eq=False)
class _Node(Generic[T]):
    children: dict[str, _Node[T]] = field(default_factory=dict)
    # Values of the filters that end here (ordered set: dict keys).
    values: dict[T, None] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.children and not self.values


class TopicTrie(Generic[T]):
    """Topic filters and their values, indexed by level for fast fan-out.

    ``add`` and ``remove`` treat the values of one filter as a set: adding the same value
    twice under the same filter stores it once (as an MQTT re-subscription replaces the
    old one). ``match`` returns a value once per matching filter, so a value stored under
    two overlapping filters (``a/+`` and ``a/#``) comes back twice; deduplicate if needed.
    A match costs O(levels x matching branches), independent of how many filters are
    stored elsewhere in the tree or how many values share one filter.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """The number of (filter, value) pairs stored."""
        return self._count

    def add(self, topic_filter: str, value: T) -> None:
        """Store ``value`` under ``topic_filter`` (validated first)."""
        validate_topic_filter(topic_filter)
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if value not in node.values:
            node.values[value] = None
            self._count += 1

    def remove(self, topic_filter: str, value: T) -> bool:
        """Remove ``value`` from ``topic_filter``; return whether it was there."""
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if value not in node.values:
            return False
        del node.values[value]
        self._count -= 1
        # Prune branches left empty, so a churn of unique filters does not grow the tree.
        for parent, level in reversed(path):
            if not parent.children[level].is_empty():
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> list[T]:
        """The values of every stored filter that matches the topic name ``topic``."""
        levels = topic.split("/")
        dollar = topic.startswith("$")
        out: list[T] = []
        frontier = [self._root]
        for index, level in enumerate(levels):
            wildcards_ok = not (dollar and index == 0)
            nxt: list[_Node[T]] = []
            for node in frontier:
                children = node.children
                if wildcards_ok:
                    multi = children.get("#")
                    if multi is not None:
                        out.extend(multi.values)
                    single = children.get("+")
                    if single is not None:
                        nxt.append(single)
                exact = children.get(level)
                if exact is not None:
                    nxt.append(exact)
            if not nxt:
                return out
            frontier = nxt
        for node in frontier:
            out.extend(node.values)
            # 'a/#' also matches 'a' (the parent level).
            multi = node.children.get("#")
            if multi is not None:
                out.extend(multi.values)
        return out

    def filters(self) -> Iterator[tuple[str, T]]:
        """Every stored (filter, value) pair."""
        stack: list[tuple[tuple[str, ...], _Node[T]]] = [
            ((level,), child) for level, child in self._root.children.items()
        ]
        while stack:
            path, node = stack.pop()
            for value in node.values:
                yield "/".join(path), value
            stack.extend(((*path, level), child) for level, child in node.children.items())


# --- Greengrass IPC authorization resources ---------------------------------------------

_THING_NAME_VARIABLE = "{iot:thingName}"
_ESCAPABLE = "*$?"


@lru_cache(maxsize=4096)
def _compile_resource(pattern: str, mqtt_wildcards: bool) -> re.Pattern[str]:
    parts: list[str] = []
    length = len(pattern)
    i = 0
    while i < length:
        char = pattern[i]
        if char == "$" and pattern.startswith("${", i):
            if i + 3 < length and pattern[i + 3] == "}" and pattern[i + 2] in _ESCAPABLE:
                parts.append(re.escape(pattern[i + 2]))
                i += 4
                continue
            raise ValidationError(
                f"resource {pattern!r} has an invalid escape sequence at position {i}; "
                "use ${*}, ${$} or ${?}",
                field="resource",
            )
        if char == "?":
            raise ValidationError(
                f"resource {pattern!r} contains '?', which is not a wildcard in Greengrass; "
                "write ${?} for a literal '?'",
                field="resource",
            )
        starts_level = i == 0 or pattern[i - 1] == "/"
        ends_level = i == length - 1 or pattern[i + 1] == "/"
        if char == "*":
            parts.append(".*")
        elif mqtt_wildcards and char == "#" and starts_level and i == length - 1:
            # 'a/#' covers 'a' itself and everything below it; '#' alone covers everything.
            if i == 0:
                parts.append(".*")
            else:
                parts[-1] = "(?:/.*)?"  # replaces the escaped '/' before it
        elif mqtt_wildcards and char == "+" and starts_level and ends_level:
            # One whole level, which may itself be '+' in a requested filter, never '#'.
            parts.append("[^/#]*")
        else:
            parts.append(re.escape(char))
        i += 1
    return re.compile("".join(parts), re.DOTALL)


def _expand(pattern: str, thing_name: str | None) -> str:
    if thing_name is None or _THING_NAME_VARIABLE not in pattern:
        return pattern
    # The thing name is literal text: escape any character Greengrass treats specially.
    literal = "".join(f"${{{c}}}" if c in _ESCAPABLE else c for c in thing_name)
    return pattern.replace(_THING_NAME_VARIABLE, literal)


def validate_resource_pattern(pattern: str, *, mqtt_wildcards: bool = False) -> None:
    """Raise ``ValidationError`` unless ``pattern`` is an acceptable accessControl resource."""
    if not isinstance(pattern, str) or pattern == "":
        raise ValidationError("a resource must be a non-empty string", field="resource")
    _compile_resource(pattern, mqtt_wildcards)


def resource_matches(
    pattern: str,
    resource: str,
    *,
    mqtt_wildcards: bool,
    thing_name: str | None = None,
) -> bool:
    """Whether an accessControl resource ``pattern`` allows the requested ``resource``.

    Follows the Greengrass nucleus (v2.6.0 and later) ``AuthorizationModule`` /
    ``WildcardTrie``:

    - ``*`` matches any sequence of characters, ``/`` included, so ``*`` alone allows every
      topic and ``a/*`` allows ``a/b/c``.
    - ``${*}``, ``${?}`` and ``${$}`` stand for the literal characters; any other ``${``
      sequence, and a bare ``?`` (not a wildcard in Greengrass), make the pattern invalid
      (``ValidationError``), as the nucleus refuses to load such a policy.
    - ``{iot:thingName}`` is replaced by ``thing_name`` (literal text) when one is given.
    - With ``mqtt_wildcards`` (``aws.greengrass.ipc.mqttproxy`` resources), ``+`` filling
      a whole level and a trailing ``#`` filling a whole level are MQTT wildcards; used
      anywhere else they are ordinary characters. ``a/#`` allows ``a`` itself. Without it
      (``aws.greengrass.ipc.pubsub``), ``+`` and ``#`` are always ordinary characters.
    - The requested resource is always literal text: a subscription to ``a/*`` is allowed
      by the patterns ``*``, ``a/*`` (glob) and ``a/${*}``, not by ``a/b``.

    One deliberate narrowing: for a requested *filter*, a pattern's ``+`` covers one level
    that is a plain name or ``+`` but not ``#``. The nucleus lets ``a/+`` authorize a
    subscription to ``a/#`` (its ``+`` matches the text ``#``), which would hand out
    ``a/b/c``; edgeloop refuses that. ``#`` does not follow MQTT's ``$`` rule here:
    authorization is about the characters requested, and the nucleus also lets ``#`` allow
    ``$aws/...``.
    """
    compiled = _compile_resource(_expand(pattern, thing_name), mqtt_wildcards)
    return compiled.fullmatch(resource) is not None
