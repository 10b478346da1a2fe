"""The fleet query language: parse, render and evaluate queries over thing documents.

Used by the registry for ``cloud fleet query 'EXPR'`` and for dynamic thing groups. It
mirrors AWS IoT fleet indexing (a Lucene-style syntax) where that makes sense::

    thingName:hub-* AND attributes.model:furnace
    shadow.reported.temperature>20 AND NOT connectivity.connected:true
    attributes.serial:["abcd" TO "abcf"] OR thingGroupNames:(beta OR canary)

Grammar (whitespace separates tokens; keywords are upper case, as in AWS)::

    query   := "*"                              every thing
             | or
    or      := and ("OR" and)*
    and     := unary (["AND"] unary)*           adjacency means AND (AWS's default operator)
    unary   := ("NOT" | "-") unary | primary    "-x" is AWS's exclusion, the same as "NOT x"
    primary := "(" or ")" | clause
    clause  := FIELD ":" value                  equality, prefix, existence or range
             | FIELD ":" "(" group ")"          field grouping: thingName:(a* AND NOT ab)
             | FIELD ("<" | "<=" | ">" | ">=") bound
    value   := WORD | WORD "*" | QUOTED | QUOTED "*" | "*" | range
    range   := ("[" | "{") bound "TO" bound ("]" | "}")   "[" "]" inclusive, "{" "}" exclusive,
                                                          mixable per end: {75 TO 80]
    bound   := "*" (open end) | WORD | QUOTED

A group is ``or`` with bare values in place of clauses. A WORD is a run of characters
other than whitespace, ``( ) [ ] { } " * ?``; it is a number if it looks like one (``-1``,
``2.5``, ``1e3``), ``true``/``false`` if it is one, and a string otherwise; ``\\`` escapes
the next character (and makes the word a string). A QUOTED string is always a string.
Precedence: NOT binds tightest, then AND, then OR; ``a NOT b`` is ``a AND NOT b``.
A parenthesised group stays its own node, so ``a AND (b AND c)`` renders as written.
Error positions are 0-based character offsets into the query.

Fields: ``thingName``, ``thingGroupNames`` (a list: any element), ``attributes.<name>``
(the rest of the field is the attribute name), ``connectivity.connected``,
``connectivity.timestamp``, ``connectivity.disconnectReason``,
``shadow.reported.<path>``, ``shadow.desired.<path>`` and
``shadow.name.<shadow>.reported|desired.<path>``, where a path is dotted keys into nested
JSON. A list anywhere on the path matches when any element does.

Matching:

- A missing field (or a JSON ``null``) never matches; only ``NOT`` turns that into a match.
- A number matches numbers, and strings that spell a number, numerically (AWS registry
  attributes are strings, so ``attributes.floor>2`` must see ``"10"`` as ten). ``true`` and
  ``false`` match booleans and the strings ``"true"``/``"false"``. A string matches strings,
  exactly: unlike AWS, matching is case-sensitive.
- ``abc*`` matches strings starting with ``abc``; ``field:*`` matches when the field has a
  value; ranges and comparisons with number bounds compare numerically, with string bounds
  lexicographically (by code point); booleans are never in a range.

Not supported, with an error saying so: searching every field (a term without a field),
leading or inner wildcards and ``?`` (AWS limits leading wildcards; we leave them out so
every query stays index-friendly), fuzzy, proximity and boosting.

``parse`` returns an AST of frozen dataclasses whose ``str()`` is a normalised query that
parses back to an equal AST; ``compile`` turns it into a predicate over thing documents;
``referenced_fields`` says which fields a query reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from edgeloop.core.errors import ValidationError

__all__ = [
    "All",
    "And",
    "Exists",
    "Not",
    "Or",
    "Predicate",
    "Prefix",
    "Query",
    "Range",
    "Scalar",
    "Term",
    "compile",
    "matches",
    "parse",
    "referenced_fields",
]

Scalar = str | int | float | bool
Predicate = Callable[[Mapping[str, Any]], bool]

MAX_DEPTH = 100
KEYWORDS = frozenset({"AND", "OR", "NOT", "TO"})
SUPPORTED_FIELDS = (
    "thingName, thingGroupNames, attributes.<name>, connectivity.connected, "
    "connectivity.timestamp, connectivity.disconnectReason, shadow.reported.<path>, "
    "shadow.desired.<path>, shadow.name.<shadow>.reported.<path>, "
    "shadow.name.<shadow>.desired.<path>"
)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
# Characters that end a field name, and a bare value word.
_FIELD_STOP = frozenset(':()[]{}"\\<>=*?')
_WORD_STOP = frozenset('()[]{}"')
# Strings rendered without quotes; anything else is quoted so it parses back as a string.
_BARE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@$/+\-]*")


# --- the AST ---------------------------------------------------------------------------


def _field_keys(field: str) -> tuple[str, ...] | str:
    """The document keys a field reads, or the reason the field is not one we know."""
    if not field:
        return "a field name must not be empty"
    head, _, rest = field.partition(".")
    if head in ("thingName", "thingGroupNames"):
        return (head,) if not rest else f"{head} has no sub-fields"
    if head == "attributes":
        return (head, rest) if rest else "attributes needs a name: attributes.<name>"
    parts = field.split(".")
    if "" in parts:
        return f"field {field!r} has an empty segment between dots"
    if head == "connectivity":
        if len(parts) == 2 and parts[1] in ("connected", "timestamp", "disconnectReason"):
            return tuple(parts)
        return (
            f"unknown connectivity field {field!r}; expected connectivity.connected, "
            "connectivity.timestamp or connectivity.disconnectReason"
        )
    if head == "shadow":
        if len(parts) >= 3 and parts[1] in ("reported", "desired"):
            return tuple(parts)
        if len(parts) >= 5 and parts[1] == "name" and parts[3] in ("reported", "desired"):
            return tuple(parts)
        return (
            f"shadow field {field!r} needs a section and a path: shadow.reported.<path>, "
            "shadow.desired.<path> or shadow.name.<shadow>.reported|desired.<path>"
        )
    return f"unknown field {field!r}; expected one of {SUPPORTED_FIELDS}"


def _check_field(field: str) -> None:
    keys = _field_keys(field)
    if isinstance(keys, str):
        raise ValidationError(keys, field=field or None)


def _check_scalar(value: object, field: str) -> None:
    if not isinstance(value, str | int | float):
        raise ValidationError(f"a value must be a string, number or boolean, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"a number must be finite, got {value!r}", field=field)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class All:
    """``*``: every thing."""

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True, slots=True)
class Term:
    """``field:value``: the field equals the value."""

    field: str
    value: Scalar

    def __post_init__(self) -> None:
        _check_field(self.field)
        _check_scalar(self.value, self.field)

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True, slots=True)
class Prefix:
    """``field:abc*``: the field is a string starting with ``prefix``."""

    field: str
    prefix: str

    def __post_init__(self) -> None:
        _check_field(self.field)
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ValidationError("a prefix must be a non-empty string", field=self.field)

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True, slots=True)
class Exists:
    """``field:*``: the field has a value."""

    field: str

    def __post_init__(self) -> None:
        _check_field(self.field)

    def __str__(self) -> str:
        return _render(self)


def _range_problem(low: Scalar | None, high: Scalar | None, inc_low: bool, inc_high: bool) -> str:
    """Why a range is invalid, or "" if it is fine."""
    for bound in (low, high):
        if isinstance(bound, bool):
            return "a range bound must be a number or a string, not true or false"
    if low is None or high is None:
        return ""
    if isinstance(low, str) and isinstance(high, str):
        above = low > high
    elif isinstance(low, str) or isinstance(high, str):
        return "a range's bounds must both be numbers or both be strings"
    else:
        above = low > high
    if above:
        return f"the range is empty: its low end {low!r} is above its high end {high!r}"
    if low == high and not (inc_low and inc_high):
        return f"the range is empty: it excludes its only value {low!r}"
    return ""


@dataclass(frozen=True, slots=True)
class Range:
    """``field:[low TO high]`` and ``field>n`` alike; ``None`` is an open end.

    An open end is always stored as inclusive, so ``x>5`` and ``x:{5 TO *}`` are equal.
    """

    field: str
    low: Scalar | None = None
    high: Scalar | None = None
    include_low: bool = True
    include_high: bool = True

    def __post_init__(self) -> None:
        _check_field(self.field)
        for bound in (self.low, self.high):
            if bound is not None:
                _check_scalar(bound, self.field)
        problem = _range_problem(self.low, self.high, self.include_low, self.include_high)
        if problem:
            raise ValidationError(problem, field=self.field)
        if self.low is None:
            object.__setattr__(self, "include_low", True)
        if self.high is None:
            object.__setattr__(self, "include_high", True)

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True, slots=True)
class Not:
    """``NOT operand``."""

    operand: Query

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True, slots=True)
class And:
    """``a AND b AND ...``: every operand matches."""

    operands: tuple[Query, ...]

    def __post_init__(self) -> None:
        if len(self.operands) < 2:
            raise ValidationError("AND needs at least two operands")

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True, slots=True)
class Or:
    """``a OR b OR ...``: some operand matches."""

    operands: tuple[Query, ...]

    def __post_init__(self) -> None:
        if len(self.operands) < 2:
            raise ValidationError("OR needs at least two operands")

    def __str__(self) -> str:
        return _render(self)


Query = All | Term | Prefix | Exists | Range | Not | And | Or


# --- rendering ---------------------------------------------------------------------------


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_scalar(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    bare = (
        _BARE.fullmatch(value)
        and value not in KEYWORDS
        and value not in ("true", "false")
        and not _NUMBER.fullmatch(value)
    )
    return value if bare else _quote(value)


def _render_bound(value: Scalar | None) -> str:
    return "*" if value is None else _render_scalar(value)


def _render(query: Query) -> str:
    match query:
        case All():
            return "*"
        case Term(field, value):
            return f"{field}:{_render_scalar(value)}"
        case Prefix(field, prefix):
            return f"{field}:{prefix if _BARE.fullmatch(prefix) else _quote(prefix)}*"
        case Exists(field):
            return f"{field}:*"
        case Range(field, low, high, include_low, include_high):
            if low is None and high is not None:
                return f"{field}{'<=' if include_high else '<'}{_render_scalar(high)}"
            if high is None and low is not None:
                return f"{field}{'>=' if include_low else '>'}{_render_scalar(low)}"
            opening = "[" if include_low else "{"
            closing = "]" if include_high else "}"
            return f"{field}:{opening}{_render_bound(low)} TO {_render_bound(high)}{closing}"
        case Not(operand):
            inner = _render(operand)
            return f"NOT ({inner})" if isinstance(operand, And | Or) else f"NOT {inner}"
        case And(operands):
            return " AND ".join(
                f"({_render(op)})" if isinstance(op, And | Or) else _render(op) for op in operands
            )
        case Or(operands):
            return " OR ".join(
                f"({_render(op)})" if isinstance(op, Or) else _render(op) for op in operands
            )
    raise TypeError(f"not a fleet query node: {query!r}")  # pragma: no cover


# --- parsing ---------------------------------------------------------------------------


def _typed(word: str) -> Scalar:
    if _NUMBER.fullmatch(word):
        return float(word) if any(c in word for c in ".eE") else int(word)
    if word in ("true", "false"):
        return word == "true"
    return word


class _Parser:
    """Recursive descent over the query text, tracking positions for error messages."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    # -- scanning

    def fail(self, reason: str, pos: int | None = None) -> NoReturn:
        where = self.pos if pos is None else pos
        raise ValidationError(reason, source=self.text, field=f"position {where}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def char(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos].isspace():
            pos += 1
        self.pos = pos

    def at_delimiter(self, pos: int) -> bool:
        """Whether a value may end before ``pos``: end, whitespace or a parenthesis."""
        return pos >= len(self.text) or self.text[pos].isspace() or self.text[pos] in "()"

    def keyword(self) -> str | None:
        for word in ("AND", "OR", "NOT"):
            if self.text.startswith(word, self.pos) and self.at_delimiter(self.pos + len(word)):
                return word
        return None

    def found(self) -> str:
        """A description of what is at the current position, for error messages."""
        if self.at_end():
            return "the end of the query"
        return repr(self.text[self.pos])

    def descend(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"the query nests more than {MAX_DEPTH} levels deep")

    # -- grammar

    def parse(self) -> Query:
        self.skip_ws()
        if self.at_end():
            self.fail("the query is empty; expected a term such as thingName:abc, or *")
        if self.char() == "*" and self.at_delimiter(self.pos + 1):
            start = self.pos
            self.pos += 1
            self.skip_ws()
            if not self.at_end():
                self.fail("* (every thing) cannot be combined with other terms", start)
            return All()
        query = self.parse_or(None, "at the start of the query")
        self.skip_ws()
        if not self.at_end():  # only a stray ")" stops the AND loop before the end
            self.fail('unexpected ")" without a matching "("')
        return query

    def parse_or(self, field: str | None, context: str) -> Query:
        operands = [self.parse_and(field, context)]
        while True:
            self.skip_ws()
            if self.keyword() != "OR":
                break
            self.pos += 2
            operands.append(self.parse_and(field, 'after "OR"'))
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def parse_and(self, field: str | None, context: str) -> Query:
        operands = [self.parse_unary(field, context)]
        while True:
            self.skip_ws()
            if self.at_end() or self.char() == ")":
                break
            keyword = self.keyword()
            if keyword == "OR":
                break
            if keyword == "AND":
                self.pos += 3
                operands.append(self.parse_unary(field, 'after "AND"'))
            else:  # adjacency: AWS's default operator is AND
                operands.append(self.parse_unary(field, "here"))
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def parse_unary(self, field: str | None, context: str) -> Query:
        self.skip_ws()
        what = "a term" if field is None else f"a value for {field}"
        if self.at_end() or self.char() == ")":
            self.fail(f"expected {what} {context}, found {self.found()}")
        keyword = self.keyword()
        if keyword == "NOT":
            self.pos += 3
            self.descend()
            operand = self.parse_unary(field, 'after "NOT"')
            self.depth -= 1
            return Not(operand)
        if keyword is not None:
            self.fail(f'expected {what} {context}, found the keyword "{keyword}"')
        if self.char() == "-" and not self.at_delimiter(self.pos + 1):
            following = self.text[self.pos + 1]
            if field is None or not (following.isdigit() or following == "."):
                self.pos += 1
                self.descend()
                operand = self.parse_unary(field, 'after "-"')
                self.depth -= 1
                return Not(operand)
        if self.char() == "(":
            return self.parse_group(field)
        if field is None:
            return self.parse_clause()
        return self.parse_value(field)

    def parse_group(self, field: str | None) -> Query:
        opened = self.pos
        self.descend()
        self.pos += 1
        inner = self.parse_or(field, 'after "("')
        self.skip_ws()
        if self.char() != ")":
            self.fail(f'expected ")" to close the "(" at position {opened}, found {self.found()}')
        self.pos += 1
        self.depth -= 1
        return inner

    def parse_clause(self) -> Query:
        start = self.pos
        text = self.text
        while self.pos < len(text) and not text[self.pos].isspace():
            if text[self.pos] in _FIELD_STOP:
                break
            self.pos += 1
        name = text[start : self.pos]
        if not name:
            if self.char() == "*":
                self.fail("* (every thing) must be the whole query")
            self.fail(
                f"expected a field name such as thingName or attributes.<name>, "
                f"found {self.found()}"
            )
        if self.char() not in (":", "<", ">"):
            hint = (
                f'; the keywords are upper case: "{name.upper()}"'
                if name.upper() in KEYWORDS
                else "; a term must name its field (searching every field is not supported)"
            )
            self.fail(
                f'expected ":" or a comparison (<, <=, >, >=) after the field name {name!r}, '
                f"found {self.found()}{hint}"
            )
        keys = _field_keys(name)
        if isinstance(keys, str):
            self.fail(keys, start)
        if self.char() == ":":
            self.pos += 1
            self.skip_ws()
            if self.char() == "(":
                return self.parse_group(name)
            return self.parse_value(name)
        operator = self.char()
        self.pos += 1
        if self.char() == "=":
            operator += "="
            self.pos += 1
        self.skip_ws()
        bound_pos = self.pos
        bound = self.parse_bound(f'after "{operator}"', open_end=False)
        assert bound is not None
        if isinstance(bound, bool):
            self.fail(f'a comparison needs a number or a string after "{operator}"', bound_pos)
        self.expect_delimiter()
        if operator.startswith("<"):
            return Range(name, high=bound, include_high=operator == "<=")
        return Range(name, low=bound, include_low=operator == ">=")

    def expect_delimiter(self) -> None:
        if not self.at_delimiter(self.pos):
            self.fail(f'expected a space, ")" or the end of the query, found {self.found()}')

    def parse_value(self, field: str) -> Query:
        char = self.char()
        if self.at_end() or char == ")":
            self.fail(f"expected a value for {field}, found {self.found()}")
        if char in "[{":
            return self.parse_range(field)
        if char in "]}":
            self.fail(f"unexpected {char!r}: a range starts with [ or {{")
        if char == "*":
            if self.at_delimiter(self.pos + 1):
                self.pos += 1
                return Exists(field)
            self.fail("leading wildcards are not supported; * may only end a value")
        keyword = self.keyword()
        if keyword is not None:
            self.fail(
                f'expected a value for {field}, found the keyword "{keyword}"; '
                f'quote it ("{keyword}") to match the word'
            )
        if char == '"':
            value: Scalar = self.read_quoted()
            escaped = True
        else:
            value, escaped = self.read_word()
        star = self.char() == "*"
        if star:
            self.pos += 1
            if not self.at_delimiter(self.pos):
                if self.char() == "*":
                    self.fail("only one wildcard is allowed in a value")
                self.fail("only a wildcard at the end of a value is supported", self.pos - 1)
        self.expect_delimiter()
        assert isinstance(value, str)
        if star:
            return Prefix(field, value)
        if not escaped:
            value = _typed(value)
        return Term(field, value)

    def read_quoted(self) -> str:
        opened = self.pos
        self.pos += 1
        text, out = self.text, []
        while self.pos < len(text):
            char = text[self.pos]
            if char == "\\" and self.pos + 1 < len(text):
                out.append(text[self.pos + 1])
                self.pos += 2
            elif char == '"':
                self.pos += 1
                return "".join(out)
            else:
                out.append(char)
                self.pos += 1
        self.fail('unterminated quoted string: expected a closing "', opened)

    def read_word(self, stop: frozenset[str] = _WORD_STOP) -> tuple[str, bool]:
        """A bare word up to whitespace, a stop character or a ``*``; and if it had escapes."""
        text, out, escaped = self.text, [], False
        while self.pos < len(text):
            char = text[self.pos]
            if char.isspace() or char in stop or char == "*":
                break
            if char == "?":
                self.fail(r"the ? wildcard is not supported; write \? to match a literal ?")
            if char == "\\":
                if self.pos + 1 >= len(text):
                    self.fail("expected a character after the escape \\")
                out.append(text[self.pos + 1])
                escaped = True
                self.pos += 2
                continue
            out.append(char)
            self.pos += 1
        return "".join(out), escaped

    def parse_bound(self, context: str, *, open_end: bool) -> Scalar | None:
        """A range end or comparison operand: a number, a string, or ``*`` if ``open_end``."""
        start = self.pos
        if self.at_end() or self.char() in ")]}":
            self.fail(f"expected a number or a string {context}, found {self.found()}")
        if self.char() == "*":
            if open_end:
                self.pos += 1
                return None
            self.fail(f"expected a number or a string {context}, found '*'")
        if self.char() == '"':
            return self.read_quoted()
        word, escaped = self.read_word(_WORD_STOP)
        if self.char() == "*":
            self.fail("wildcards are not allowed in a range or a comparison")
        if not word:
            self.fail(f"expected a number or a string {context}, found {self.found()}")
        if word == "TO" and not escaped:
            self.fail(f'expected a number or a string {context}, found "TO"', start)
        return word if escaped else _typed(word)

    def parse_range(self, field: str) -> Query:
        opened = self.pos
        include_low = self.char() == "["
        self.pos += 1
        self.skip_ws()
        low_pos = self.pos
        low = self.parse_bound("at the start of the range (or * for an open end)", open_end=True)
        self.skip_ws()
        if not (self.text.startswith("TO", self.pos) and self.at_delimiter(self.pos + 2)):
            self.fail(f'expected "TO" in a range, found {self.found()}')
        self.pos += 2
        self.skip_ws()
        high_pos = self.pos
        high = self.parse_bound('after "TO" (or * for an open end)', open_end=True)
        self.skip_ws()
        if self.char() not in ("]", "}"):
            self.fail(
                f'expected "]" or "}}" to close the range opened at position {opened}, '
                f"found {self.found()}"
            )
        include_high = self.char() == "]"
        self.pos += 1
        self.expect_delimiter()
        for bound, pos in ((low, low_pos), (high, high_pos)):
            if isinstance(bound, bool):
                self.fail("a range bound must be a number or a string, not true or false", pos)
        problem = _range_problem(low, high, include_low, include_high)
        if problem:
            self.fail(problem, opened)
        return Range(field, low, high, include_low, include_high)


def parse(query: str) -> Query:
    """Parse a fleet query; raise ``ValidationError`` naming the position and what was expected."""
    if not isinstance(query, str):
        raise ValidationError(f"a fleet query must be a string, got {type(query).__name__}")
    return _Parser(query).parse()


# --- evaluation ------------------------------------------------------------------------

_MISSING: Any = object()


def _walk(value: Any, keys: tuple[str, ...], index: int) -> Any:
    """Follow ``keys[index:]`` from ``value``, fanning out over lists; the slow path."""
    for position in range(index, len(keys)):
        if isinstance(value, Mapping):
            value = value.get(keys[position], _MISSING)
        elif isinstance(value, list):
            return [_walk(item, keys, position) for item in value]
        else:
            return _MISSING
    return value


def _as_number(value: Any) -> int | float | None:
    """A JSON number, or a string spelling one, as a number; ``None`` otherwise."""
    kind = type(value)
    if kind is int or kind is float:
        return value  # type: ignore[no-any-return]
    if kind is str and _NUMBER.fullmatch(value):
        return float(value) if any(c in value for c in ".eE") else int(value)
    return None


def _number_range(
    low: Any, high: Any, include_low: bool, include_high: bool
) -> Callable[[Any], bool]:
    # One closure per bound shape: this runs once per thing, so branches cost.
    if low is None:
        if include_high:
            return lambda x: x <= high
        return lambda x: x < high
    if high is None:
        if include_low:
            return lambda x: x >= low
        return lambda x: x > low
    if include_low and include_high:
        return lambda x: low <= x <= high
    if include_low:
        return lambda x: low <= x < high
    if include_high:
        return lambda x: low < x <= high
    return lambda x: low < x < high


def _value_test(query: Term | Prefix | Exists | Range) -> Callable[[Any], bool]:
    """The test one leaf value must pass; lists are fanned out by the caller."""
    match query:
        case Exists():
            return lambda value: value is not _MISSING and value is not None
        case Prefix(_, prefix):
            return lambda value: type(value) is str and value.startswith(prefix)
        case Term(_, bool() as flag):
            text = "true" if flag else "false"
            return lambda value: value is flag or (type(value) is str and value == text)
        case Term(_, int() | float() as number):

            def equals_number(value: Any) -> bool:
                kind = type(value)
                if kind is int or kind is float:
                    return bool(value == number)
                return kind is str and _as_number(value) == number

            return equals_number
        case Term(_, str() as string):
            # Only a str (or str subclass) ever equals a str, so no type check is needed.
            return lambda value: bool(value == string)
        case Range(_, None, None):
            return lambda value: type(value) is str or _as_number(value) is not None
        case Range(_, str() | None as low, str() | None as high, include_low, include_high):
            within = _number_range(low, high, include_low, include_high)
            return lambda value: type(value) is str and bool(within(value))
        case Range(_, low, high, include_low, include_high):
            within = _number_range(low, high, include_low, include_high)

            def in_number_range(value: Any) -> bool:
                kind = type(value)
                if kind is int or kind is float:
                    return bool(within(value))
                if kind is str and _NUMBER.fullmatch(value):
                    return bool(within(_as_number(value)))
                return False

            return in_number_range
    raise TypeError(f"not a fleet query leaf: {query!r}")  # pragma: no cover


def _leaf(query: Term | Prefix | Exists | Range) -> Predicate:
    """Read the field and test it, in one closure: the hot path of every fleet query."""
    keys = _field_keys(query.field)
    assert not isinstance(keys, str)  # the constructors checked the field
    test = _value_test(query)

    # Plain loops, not any()/all() over generators: this is the hot path, and a generator
    # costs more than the test itself.
    def any_element(values: list[Any]) -> bool:
        for value in values:  # noqa: SIM110
            if any_element(value) if type(value) is list else test(value):
                return True
        return False

    if len(keys) == 1:
        (key,) = keys

        def leaf_one(doc: Mapping[str, Any]) -> bool:
            value = doc.get(key, _MISSING)
            return any_element(value) if type(value) is list else test(value)

        return leaf_one

    if len(keys) == 2:
        first, second = keys

        def leaf_two(doc: Mapping[str, Any]) -> bool:
            value = doc.get(first, _MISSING)
            value = value.get(second, _MISSING) if type(value) is dict else _walk(value, keys, 1)
            return any_element(value) if type(value) is list else test(value)

        return leaf_two

    def leaf(doc: Mapping[str, Any]) -> bool:
        value: Any = doc
        for key in keys:
            if type(value) is not dict:  # a list or a foreign Mapping on the way
                value = _walk(doc, keys, 0)
                break
            value = value.get(key, _MISSING)
        return any_element(value) if type(value) is list else test(value)

    return leaf


def _compile(query: Query) -> Predicate:
    match query:
        case All():
            return lambda doc: True
        case Not(operand):
            inner = _compile(operand)
            return lambda doc: not inner(doc)
        case And(operands):
            parts = tuple(_compile(op) for op in operands)
            if len(parts) == 2:
                first, second = parts
                return lambda doc: first(doc) and second(doc)

            def every(doc: Mapping[str, Any]) -> bool:
                for part in parts:  # noqa: SIM110 - see any_element
                    if not part(doc):
                        return False
                return True

            return every
        case Or(operands):
            parts = tuple(_compile(op) for op in operands)
            if len(parts) == 2:
                first, second = parts
                return lambda doc: first(doc) or second(doc)

            def some(doc: Mapping[str, Any]) -> bool:
                for part in parts:  # noqa: SIM110 - see any_element
                    if part(doc):
                        return True
                return False

            return some
        case Term() | Prefix() | Exists() | Range():
            return _leaf(query)
    raise TypeError(f"not a fleet query node: {query!r}")  # pragma: no cover


# Shadows the builtin inside this module only, where nothing needs the builtin.
def compile(query: Query | str) -> Predicate:
    """Turn a query into a predicate over thing documents, closures built once."""
    return _compile(parse(query) if isinstance(query, str) else query)


def matches(query: Query | str, doc: Mapping[str, Any]) -> bool:
    """Whether one thing document matches a query (compile once to test many)."""
    return compile(query)(doc)


def _walk_nodes(query: Query) -> Iterator[Query]:
    yield query
    if isinstance(query, Not):
        yield from _walk_nodes(query.operand)
    elif isinstance(query, And | Or):
        for operand in query.operands:
            yield from _walk_nodes(operand)


def referenced_fields(query: Query | str) -> set[str]:
    """The fields a query reads, as written (``attributes.model``, ``shadow.reported.t``).

    A dynamic group needs re-evaluating only when one of these, or a path above or below
    one of them (``shadow.reported`` replaced whole), changes.
    """
    tree = parse(query) if isinstance(query, str) else query
    return {
        node.field for node in _walk_nodes(tree) if isinstance(node, Term | Prefix | Exists | Range)
    }
