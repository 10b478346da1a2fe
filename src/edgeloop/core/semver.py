"""Semantic Versioning 2.0.0 versions and npm-style ranges (Greengrass's VersionRequirement).

Ranges follow node-semver's grammar and its prerelease rule::

    range-set  ::= range ( '||' range )*
    range      ::= hyphen | simple ( ' ' simple )* | ''
    hyphen     ::= partial ' - ' partial
    simple     ::= ( '<' | '>' | '>=' | '<=' | '=' | '~' | '~>' | '^' )? partial
    partial    ::= xr ( '.' xr ( '.' xr qualifier? )? )?
    xr         ::= 'x' | 'X' | '*' | '0' | [1-9][0-9]*

Deliberate differences from node-semver, both towards strictness: a leading ``v`` is
rejected (as in ``Version.parse``), and so is a prerelease on a partial like ``1.x-beta``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

_NUMERIC = re.compile(r"0|[1-9][0-9]*")
_IDENTIFIER = re.compile(r"[0-9A-Za-z-]+")
_WILDCARDS = frozenset({"x", "X", "*"})

Identifier = int | str


def _parse_number(text: str, what: str) -> int:
    if not text:
        raise ValueError(f"{what} is empty")
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{what} {text!r} is not a number")
    if not _NUMERIC.fullmatch(text):
        raise ValueError(f"{what} {text!r} has a leading zero")
    return int(text)


def _parse_prerelease(text: str) -> tuple[Identifier, ...]:
    identifiers: list[Identifier] = []
    for part in text.split("."):
        if not part:
            raise ValueError("prerelease has an empty identifier")
        if not _IDENTIFIER.fullmatch(part):
            raise ValueError(f"prerelease identifier {part!r} may only use [0-9A-Za-z-]")
        if part.isdigit():
            identifiers.append(_parse_number(part, "prerelease identifier"))
        else:
            identifiers.append(part)
    return tuple(identifiers)


def _parse_build(text: str) -> tuple[str, ...]:
    parts = tuple(text.split("."))
    for part in parts:
        if not part:
            raise ValueError("build metadata has an empty identifier")
        if not _IDENTIFIER.fullmatch(part):
            raise ValueError(f"build identifier {part!r} may only use [0-9A-Za-z-]")
    return parts


def _split_qualifiers(text: str) -> tuple[str, str | None, str | None]:
    """Split ``core-pre+build`` at the first '+' and then the first '-'."""
    core, plus, build = text.partition("+")
    core, minus, pre = core.partition("-")
    return core, (pre if minus else None), (build if plus else None)


@dataclass(frozen=True)
class Version:
    """A semantic version.

    Equality (and hashing) compares every field, build metadata included, so
    ``1.0.0+a != 1.0.0+b``; ordering follows semver precedence, which ignores build
    metadata, so neither of those two is less than the other. Sorting is therefore a
    total preorder: versions differing only in build metadata sort as ties.
    """

    major: int
    minor: int
    patch: int
    prerelease: tuple[Identifier, ...] = ()
    build: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("major", "minor", "patch"):
            value = getattr(self, name)
            # bool is an int subclass; True as a version number is always a bug.
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for ident in self.prerelease:
            if isinstance(ident, bool) or not isinstance(ident, int | str):
                raise ValueError(f"prerelease identifier {ident!r} must be an int or a str")
            if isinstance(ident, int):
                if ident < 0:
                    raise ValueError(f"prerelease identifier {ident} is negative")
            elif not _IDENTIFIER.fullmatch(ident) or ident.isdigit():
                # A digit-only str would print like an int and break round-tripping.
                raise ValueError(f"prerelease identifier {ident!r} is not a valid identifier")
        for ident in self.build:
            if not isinstance(ident, str) or not _IDENTIFIER.fullmatch(ident):
                raise ValueError(f"build identifier {ident!r} is not a valid identifier")

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse a strict semver string such as ``1.2.3-rc.1+build.5``."""
        if not isinstance(text, str):
            raise ValueError(f"a version must be a string, got {type(text).__name__}")
        try:
            return cls._parse(text)
        except ValueError as err:
            raise ValueError(f"invalid version {text!r}: {err}") from None

    @classmethod
    def _parse(cls, text: str) -> Version:
        if not text:
            raise ValueError("it is empty")
        if text != text.strip():
            raise ValueError("it has surrounding whitespace")
        if text[0] in "vV":
            raise ValueError("remove the leading 'v'")
        if not text[0].isdigit():
            raise ValueError("it must start with the MAJOR number")
        core, pre, build = _split_qualifiers(text)
        parts = core.split(".")
        if len(parts) != 3:
            raise ValueError(f"expected MAJOR.MINOR.PATCH, got {len(parts)} part(s) in {core!r}")
        major, minor, patch = (
            _parse_number(part, what)
            for part, what in zip(parts, ("major", "minor", "patch"), strict=False)
        )
        return cls(
            major,
            minor,
            patch,
            _parse_prerelease(pre) if pre is not None else (),
            _parse_build(build) if build is not None else (),
        )

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(str(ident) for ident in self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    @property
    def release(self) -> tuple[int, int, int]:
        """The ``(major, minor, patch)`` triple."""
        return (self.major, self.minor, self.patch)

    def precedence_key(self) -> tuple[int, int, int, tuple[object, ...]]:
        """A sort key that orders versions by semver precedence (build ignored)."""
        if not self.prerelease:
            # A release outranks every prerelease of the same triple.
            tail: tuple[object, ...] = (1,)
        else:
            tail = (
                0,
                tuple((0, i, "") if isinstance(i, int) else (1, 0, i) for i in self.prerelease),
            )
        return (self.major, self.minor, self.patch, tail)

    def compare(self, other: Version) -> int:
        """Return -1, 0 or 1 as ``self`` has lower, equal or higher precedence than ``other``."""
        mine, theirs = self.precedence_key(), other.precedence_key()
        return (mine > theirs) - (mine < theirs)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.compare(other) < 0

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.compare(other) <= 0

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.compare(other) > 0

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.compare(other) >= 0


Operator = Literal["<", "<=", ">", ">=", "="]
_OPERATORS: dict[str, Operator] = {"": "=", "=": "=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass(frozen=True)
class Comparator:
    """One primitive comparison such as ``>=1.2.3``."""

    operator: Operator
    version: Version

    def test(self, version: Version) -> bool:
        """Whether ``version`` passes this comparison (by precedence)."""
        order = version.compare(self.version)
        match self.operator:
            case "<":
                return order < 0
            case "<=":
                return order <= 0
            case ">":
                return order > 0
            case ">=":
                return order >= 0
            case "=":
                return order == 0

    def __str__(self) -> str:
        return f"{self.operator}{self.version}"


@dataclass(frozen=True)
class _Partial:
    """A version whose trailing numbers may be wildcards (None)."""

    major: int | None
    minor: int | None
    patch: int | None
    prerelease: tuple[Identifier, ...] = ()

    @property
    def is_full(self) -> bool:
        return self.patch is not None

    def floor(self) -> Version:
        """The lowest version this partial covers."""
        return Version(self.major or 0, self.minor or 0, self.patch or 0, self.prerelease)


# Upper bounds end in "-0" (as node-semver 7 does) so that prereleases of the next
# version, e.g. 2.0.0-beta for "^1.2.3", stay outside the range.
def _below(major: int, minor: int = 0, patch: int = 0) -> Comparator:
    return Comparator("<", Version(major, minor, patch, (0,)))


def _at_least(version: Version) -> Comparator:
    return Comparator(">=", version)


_NOTHING = (Comparator("<", Version(0, 0, 0, (0,))),)  # 0.0.0-0 is the lowest version


def _parse_partial(text: str) -> _Partial:
    if not text:
        raise ValueError("a version is missing")
    try:
        return _parse_partial_parts(text)
    except ValueError as err:
        raise ValueError(f"{text!r}: {err}") from None


def _parse_partial_parts(text: str) -> _Partial:
    if text[0] in "vV":
        raise ValueError("remove the leading 'v'")
    core, pre, build = _split_qualifiers(text)
    parts = core.split(".")
    if len(parts) > 3:
        raise ValueError("more than three numbers")
    numbers: list[int | None] = []
    for part, what in zip(parts, ("major", "minor", "patch"), strict=False):
        if part in _WILDCARDS or (numbers and numbers[-1] is None):
            # npm's grammar allows "1.x.3"; everything after a wildcard is a wildcard too.
            numbers.append(None)
        else:
            numbers.append(_parse_number(part, what))
    numbers += [None] * (3 - len(numbers))
    if build is not None:
        _parse_build(build)  # validated, then ignored: build never affects matching
    prerelease = _parse_prerelease(pre) if pre is not None else ()
    if prerelease and numbers[2] is None:
        raise ValueError("a prerelease needs a full MAJOR.MINOR.PATCH version")
    return _Partial(numbers[0], numbers[1], numbers[2], prerelease)


def _xrange(operator: str, p: _Partial) -> tuple[Comparator, ...]:
    if p.major is None:
        # "<*" and ">*" can match nothing; every other operator on "*" matches anything.
        return _NOTHING if operator in ("<", ">") else ()
    if p.is_full:
        return (Comparator(_OPERATORS[operator], p.floor()),)
    major = p.major
    if p.minor is None:
        after = (major + 1, 0)
        floor = Version(major, 0, 0)
    else:
        after = (major, p.minor + 1)
        floor = Version(major, p.minor, 0)
    match operator:
        case ">":
            return (_at_least(Version(*after, 0)),)
        case ">=":
            return (_at_least(floor),)
        case "<":
            return (_below(*floor.release),)
        case "<=":
            return (_below(*after),)
        case _:
            return (_at_least(floor), _below(*after))


def _tilde(p: _Partial) -> tuple[Comparator, ...]:
    if p.major is None:
        return ()
    if p.minor is None:
        return (_at_least(p.floor()), _below(p.major + 1))
    return (_at_least(p.floor()), _below(p.major, p.minor + 1))


def _caret(p: _Partial) -> tuple[Comparator, ...]:
    if p.major is None:
        return ()
    floor = p.floor()
    if p.minor is None:
        return (_at_least(floor), _below(p.major + 1))
    if p.major != 0:
        return (_at_least(floor), _below(p.major + 1))
    if p.patch is None or p.minor != 0:
        # ^0.2.3 and ^0.2 stay within 0.2; ^0.0 stays within 0.0.
        return (_at_least(floor), _below(0, p.minor + 1))
    return (_at_least(floor), _below(0, 0, p.patch + 1))


def _hyphen(low: _Partial, high: _Partial) -> tuple[Comparator, ...]:
    comparators: list[Comparator] = []
    if low.major is not None:
        comparators.append(_at_least(low.floor()))
    if high.major is None:
        pass
    elif high.minor is None:
        comparators.append(_below(high.major + 1))
    elif high.patch is None:
        comparators.append(_below(high.major, high.minor + 1))
    else:
        comparators.append(Comparator("<=", high.floor()))
    return tuple(comparators)


_HYPHEN = re.compile(r"(\S+)\s+-\s+(\S+)")
_OPERATOR_SPACE = re.compile(r"(<=|>=|<|>|=|~>|~|\^)\s+")
_SIMPLE = re.compile(r"(<=|>=|<|>|=|~>|~|\^)?(.*)")


def _parse_set(text: str) -> tuple[str, tuple[Comparator, ...]]:
    """Parse one ``||`` alternative; return its normalised text and its comparators."""
    text = " ".join(text.split())
    if not text:
        return "", ()
    hyphen = _HYPHEN.fullmatch(text)
    if hyphen:
        low, high = (_parse_partial(part) for part in hyphen.groups())
        return f"{hyphen[1]} - {hyphen[2]}", _hyphen(low, high)
    tokens = _OPERATOR_SPACE.sub(r"\1", text).split(" ")
    comparators: list[Comparator] = []
    for token in tokens:
        match = _SIMPLE.fullmatch(token)
        assert match is not None  # ".*" matches any token
        operator, rest = match[1] or "", match[2]
        if not rest:
            raise ValueError(f"operator {operator!r} has no version after it")
        if rest[0] in "<>=~^":
            raise ValueError(f"{token!r} has more than one operator")
        if rest == "-":
            raise ValueError("a hyphen range needs a version on both sides of ' - '")
        partial = _parse_partial(rest)
        if operator in ("~", "~>"):
            comparators += _tilde(partial)
        elif operator == "^":
            comparators += _caret(partial)
        else:
            comparators += _xrange(operator, partial)
    return " ".join(tokens), tuple(comparators)


def _test_set(comparators: tuple[Comparator, ...], version: Version) -> bool:
    if not all(comparator.test(version) for comparator in comparators):
        return False
    if not version.prerelease:
        return True
    # npm's rule: a prerelease only matches when the range names a prerelease of the
    # same [major, minor, patch], so "^1.0.0" never silently picks up 1.5.0-beta.
    return any(c.version.prerelease and c.version.release == version.release for c in comparators)


@dataclass(frozen=True)
class Range:
    """An npm-style version range: comparator sets (AND) joined by ``||`` (OR)."""

    text: str
    alternatives: tuple[tuple[Comparator, ...], ...] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> Range:
        """Parse a range such as ``>=1.2.0 <2.0.0 || ^3.1``; raise ValueError with a reason."""
        if not isinstance(text, str):
            raise ValueError(f"a version range must be a string, got {type(text).__name__}")
        texts: list[str] = []
        alternatives: list[tuple[Comparator, ...]] = []
        for part in text.split("||"):
            try:
                normal, comparators = _parse_set(part)
            except ValueError as err:
                raise ValueError(f"invalid version range {text!r}: {err}") from None
            texts.append(normal)
            alternatives.append(comparators)
        return cls(" || ".join(texts).strip(), tuple(alternatives))

    @classmethod
    def exact(cls, version: Version) -> Range:
        """The range that allows exactly ``version`` (by precedence)."""
        return cls(str(version), ((Comparator("=", version),),))

    def allows(self, version: Version) -> bool:
        """Whether ``version`` satisfies this range, prerelease rule included."""
        return any(_test_set(comparators, version) for comparators in self.alternatives)

    def __str__(self) -> str:
        return self.text


def max_satisfying(versions: Iterable[Version], ranges: Iterable[Range]) -> Version | None:
    """The highest version allowed by every range, or None; ties (build only) go to the first."""
    required = tuple(ranges)
    best: Version | None = None
    for version in versions:
        if all(r.allows(version) for r in required) and (best is None or version > best):
            best = version
    return best
