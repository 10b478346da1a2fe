"""Tests for edgeloop.core.semver: strict versions, npm ranges, and their properties."""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.semver import Range, Version, max_satisfying

V = Version.parse

# --- versions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0", Version(0, 0, 0)),
        ("1.2.3", Version(1, 2, 3)),
        ("10.20.30", Version(10, 20, 30)),
        ("1.2.3-0", Version(1, 2, 3, (0,))),
        ("1.2.3-alpha.1", Version(1, 2, 3, ("alpha", 1))),
        ("1.2.3-0a", Version(1, 2, 3, ("0a",))),
        ("1.0.0-x-y-z.--", Version(1, 0, 0, ("x-y-z", "--"))),
        ("1.0.0-alpha+001", Version(1, 0, 0, ("alpha",), ("001",))),
        ("1.2.3+build.5", Version(1, 2, 3, (), ("build", "5"))),
        ("1.0.0-a+b-c", Version(1, 0, 0, ("a",), ("b-c",))),
    ],
)
def test_parse_valid_versions(text: str, expected: Version) -> None:
    assert V(text) == expected
    assert str(V(text)) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (" 1.2.3", "whitespace"),
        ("v1.2.3", "leading 'v'"),
        ("V1.2.3", "leading 'v'"),
        ("1.2", "MAJOR.MINOR.PATCH"),
        ("1.2.3.4", "MAJOR.MINOR.PATCH"),
        ("01.2.3", "major '01' has a leading zero"),
        ("1.02.3", "minor '02' has a leading zero"),
        ("1.2.03", "patch '03' has a leading zero"),
        ("1.2.x", "patch 'x' is not a number"),
        ("-1.2.3", "must start with the MAJOR number"),
        ("1..3", "minor is empty"),
        ("1.2.3-", "empty identifier"),
        ("1.2.3-01", "leading zero"),
        ("1.2.3-a..b", "empty identifier"),
        ("1.2.3-a_b", "[0-9A-Za-z-]"),
        ("1.2.3+", "empty identifier"),
        ("1.2.3+a..b", "empty identifier"),
        ("1.2.3+ab$", "[0-9A-Za-z-]"),
    ],
)
def test_parse_invalid_versions_says_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        V(text)
    assert reason in str(info.value)
    assert repr(text) in str(info.value)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        Version.parse(123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"major": -1, "minor": 0, "patch": 0},
        {"major": True, "minor": 0, "patch": 0},
        {"major": 1, "minor": 0, "patch": 0, "prerelease": ("01",)},
        {"major": 1, "minor": 0, "patch": 0, "prerelease": (-1,)},
        {"major": 1, "minor": 0, "patch": 0, "prerelease": ("a b",)},
        {"major": 1, "minor": 0, "patch": 0, "build": ("",)},
    ],
)
def test_constructor_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Version(**kwargs)  # type: ignore[arg-type]


def test_semver_org_precedence_example() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "2.0.0",
        "2.1.0",
        "2.1.1",
    ]
    versions = [V(t) for t in ordered]
    for low, high in itertools.pairwise(versions):
        assert low < high
        assert high > low
        assert low <= high
        assert not high <= low
    assert sorted(reversed(versions)) == versions


def test_build_metadata_is_ignored_for_ordering_but_not_equality() -> None:
    a, b = V("1.0.0+a"), V("1.0.0+b")
    assert a != b
    assert not a < b
    assert not b < a
    assert a <= b
    assert b >= a
    assert a.compare(b) == 0
    assert len({a, b}) == 2


def test_comparison_with_other_types_is_not_implemented() -> None:
    assert V("1.0.0") != "1.0.0"  # type: ignore[comparison-overlap]
    with pytest.raises(TypeError):
        _ = V("1.0.0") < "1.0.0"


# --- ranges: npm's well-known cases ----------------------------------------------------

SATISFIES = [
    ("1.0.0 - 2.0.0", "1.2.3"),
    ("^1.2.3+build", "1.2.3"),
    ("^1.2.3+build", "1.3.0"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "1.2.3"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "1.2.3-pre.2"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "2.4.3-alpha"),
    ("1.2.3+asdf - 2.4.3+asdf", "1.2.3"),
    ("1.0.0", "1.0.0"),
    ("=1.0.0", "1.0.0"),
    ("1.0.0", "1.0.0+build"),
    (">=*", "0.2.4"),
    ("", "1.0.0"),
    ("*", "1.2.3"),
    ("x", "1.2.3"),
    ("X", "1.2.3"),
    (">=1.0.0", "1.0.0"),
    (">=1.0.0", "1.0.1"),
    (">=1.0.0", "1.1.0"),
    (">1.0.0", "1.0.1"),
    (">1.0.0", "1.1.0"),
    ("<=2.0.0", "2.0.0"),
    ("<=2.0.0", "1.9999.9999"),
    ("<=2.0.0", "0.2.9"),
    ("<2.0.0", "1.9999.9999"),
    ("<2.0.0", "0.2.9"),
    (">= 1.0.0", "1.0.0"),
    (">=  1.0.0", "1.0.1"),
    ("> 1.0.0", "1.0.1"),
    ("<=   2.0.0", "2.0.0"),
    ("<\t2.0.0", "0.2.9"),
    (">=0.1.97", "0.1.97"),
    ("0.1.20 || 1.2.4", "1.2.4"),
    (">=0.2.3 || <0.0.1", "0.0.0"),
    (">=0.2.3 || <0.0.1", "0.2.3"),
    (">=0.2.3 || <0.0.1", "0.2.4"),
    ("||", "1.3.4"),
    ("2.x.x", "2.1.3"),
    ("1.2.x", "1.2.3"),
    ("1.2.x || 2.x", "2.1.3"),
    ("1.2.x || 2.x", "1.2.3"),
    ("2.*.*", "2.1.3"),
    ("1.2.*", "1.2.3"),
    ("1.2.* || 2.*", "2.1.3"),
    ("2", "2.1.2"),
    ("2.3", "2.3.1"),
    ("1.x.3", "1.9.0"),
    ("~0.0.1", "0.0.1"),
    ("~0.0.1", "0.0.2"),
    ("~x", "0.0.9"),
    ("~2", "2.0.9"),
    ("~2.4", "2.4.0"),
    ("~2.4", "2.4.5"),
    ("~>3.2.1", "3.2.2"),
    ("~1", "1.2.3"),
    ("~>1", "1.2.3"),
    ("~> 1", "1.2.3"),
    ("~1.0", "1.0.2"),
    ("~ 1.0", "1.0.2"),
    ("~ 1.0.3", "1.0.12"),
    ("~1.2.3", "1.2.9"),
    ("~0.5.4-pre", "0.5.5"),
    ("~0.5.4-pre", "0.5.4"),
    ("~0.5.4-alpha", "0.5.4-beta"),
    (">=1", "1.0.0"),
    (">= 1", "1.0.0"),
    ("<1.2", "1.1.1"),
    ("< 1.2", "1.1.1"),
    ("=0.7.x", "0.7.2"),
    ("<=0.7.x", "0.7.2"),
    (">=0.7.x", "0.7.2"),
    ("<=0.7.x", "0.6.2"),
    ("~1.2.1 >=1.2.3", "1.2.3"),
    ("~1.2.1 =1.2.3", "1.2.3"),
    ("~1.2.1 1.2.3", "1.2.3"),
    ("~1.2.1 >=1.2.3 1.2.3", "1.2.3"),
    (">=1.2.1 1.2.3", "1.2.3"),
    ("1.2.3 >=1.2.1", "1.2.3"),
    (">=1.2.3 >=1.2.1", "1.2.3"),
    (">=1.2", "1.2.8"),
    ("^1.2.3", "1.8.1"),
    ("^0.1.2", "0.1.2"),
    ("^0.1.2", "0.1.9"),
    ("^0.1", "0.1.2"),
    ("^0.0.1", "0.0.1"),
    ("^0.0", "0.0.7"),
    ("^0", "0.9.9"),
    ("^1.2", "1.4.2"),
    ("^1.2 ^1", "1.4.2"),
    ("^1.2.3-alpha", "1.2.3-pre"),
    ("^1.2.0-alpha", "1.2.0-pre"),
    ("^0.0.1-alpha", "0.0.1-beta"),
    ("^0.0.1-alpha", "0.0.1"),
    ("^0.1.1-alpha", "0.1.1-beta"),
    ("^x", "1.2.3"),
    ("x - 1.0.0", "0.9.7"),
    ("x - 1.x", "0.9.7"),
    ("1.0.0 - x", "1.9.7"),
    ("1.x - x", "1.9.7"),
    ("1.2 - 2.3", "2.3.9"),
    ("1 - 2", "2.9.9"),
    ("<=7.x", "7.9.9"),
    (">1.2.3-alpha.3", "1.2.3-alpha.7"),
    (">=1.0.0-rc.1 <2", "1.0.0-rc.2"),
    ("1.2.3-beta.1", "1.2.3-beta.1"),
]

DOES_NOT_SATISFY = [
    ("1.0.0 - 2.0.0", "2.2.3"),
    ("1.2.3+asdf - 2.4.3+asdf", "1.2.3-pre.2"),
    ("1.2.3+asdf - 2.4.3+asdf", "2.4.3-alpha"),
    ("^1.2.3+build", "2.0.0"),
    ("^1.2.3+build", "1.2.0"),
    ("^1.2.3", "1.2.3-pre"),
    ("^1.2", "1.2.0-pre"),
    (">1.2", "1.3.0-beta"),
    ("<=1.2.3", "1.2.3-beta"),
    ("^1.2.3", "1.2.3-beta"),
    ("=0.7.x", "0.7.0-asdf"),
    (">=0.7.x", "0.7.0-asdf"),
    ("1.0.0", "1.0.1"),
    (">=1.0.0", "0.0.0"),
    (">=1.0.0", "0.0.1"),
    (">=1.0.0", "0.1.0"),
    (">1.0.0", "0.0.1"),
    (">1.0.0", "1.0.0"),
    ("<=2.0.0", "3.0.0"),
    ("<=2.0.0", "2.9999.9999"),
    ("<=2.0.0", "2.2.9"),
    ("<2.0.0", "2.9999.9999"),
    ("<2.0.0", "2.2.9"),
    (">=0.1.97", "0.1.93"),
    ("0.1.20 || 1.2.4", "1.2.3"),
    (">=0.2.3 || <0.0.1", "0.0.3"),
    (">=0.2.3 || <0.0.1", "0.2.2"),
    ("2.x.x", "1.1.3"),
    ("2.x.x", "3.1.3"),
    ("1.2.x", "1.3.3"),
    ("1.2.x || 2.x", "3.1.3"),
    ("1.2.x || 2.x", "1.1.3"),
    ("2.*.*", "1.1.3"),
    ("2.*.*", "3.1.3"),
    ("1.2.*", "1.3.3"),
    ("2", "1.1.2"),
    ("2", "3.0.0"),
    ("2.3", "2.4.1"),
    ("~0.0.1", "0.1.0-alpha"),
    ("~0.0.1", "0.1.0"),
    ("~2.4", "2.5.0"),
    ("~2.4", "2.3.9"),
    ("~>3.2.1", "3.3.2"),
    ("~>3.2.1", "3.2.0"),
    ("~1", "0.2.3"),
    ("~>1", "2.2.3"),
    ("~1.0", "1.1.0"),
    ("~1.2.3", "1.3.0"),
    ("<1", "1.0.0"),
    (">=1.2", "1.1.1"),
    ("~0.5.4-beta", "0.5.4-alpha"),
    ("=0.7.x", "0.8.2"),
    (">=0.7.x", "0.6.2"),
    ("<0.7.x", "0.7.2"),
    ("<1.2.3", "1.2.3-beta"),
    ("=1.2.3", "1.2.3-beta"),
    (">1.2", "1.2.8"),
    ("^0.0.1", "0.0.2-alpha"),
    ("^0.0.1", "0.0.2"),
    ("^0.0", "0.1.0"),
    ("^0", "1.0.0"),
    ("^0.1.2", "0.2.0"),
    ("^0.0.3", "0.0.4"),
    ("^1.2.3", "2.0.0-alpha"),
    ("^1.2.3", "2.0.0"),
    ("^1.2.3", "1.2.2"),
    ("^1.2", "1.1.9"),
    ("*", "1.2.3-foo"),
    ("", "1.2.3-foo"),
    ("^1.0.0", "2.0.0-rc1"),
    ("1 - 2", "2.0.0-pre"),
    ("1 - 2", "1.0.0-pre"),
    ("1 - 2", "3.0.0"),
    ("1.0 - 2", "1.0.0-pre"),
    ("1.1.x", "1.0.0-a"),
    ("1.1.x", "1.1.0-a"),
    ("1.1.x", "1.2.0-a"),
    ("1.x", "1.0.0-a"),
    ("1.x", "1.1.0-a"),
    ("1.x", "0.0.0-a"),
    ("1.x", "2.0.0-a"),
    (">=1.0.0 <1.1.0", "1.1.0"),
    (">=1.0.0 <1.1.0", "1.1.0-pre"),
    (">=1.0.0 <1.1.0-pre", "1.1.0-pre"),
    ("<*", "0.0.0"),
    (">*", "1.0.0"),
    (">1.2.3-alpha.3", "3.4.5-alpha.9"),
    ("1.2.3-beta.1", "1.2.3-beta.2"),
]


@pytest.mark.parametrize(("text", "version"), SATISFIES)
def test_npm_range_satisfies(text: str, version: str) -> None:
    assert Range.parse(text).allows(V(version))


@pytest.mark.parametrize(("text", "version"), DOES_NOT_SATISFY)
def test_npm_range_does_not_satisfy(text: str, version: str) -> None:
    assert not Range.parse(text).allows(V(version))


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("  >=1.2.3    <2  ", ">=1.2.3 <2"),
        (">= 1.2.3", ">=1.2.3"),
        ("~> 1.2", "~>1.2"),
        ("1.2.3  -  2", "1.2.3 - 2"),
        ("1.x||2.x", "1.x || 2.x"),
        ("^1.2.3", "^1.2.3"),
        ("", ""),
        ("*", "*"),
    ],
)
def test_str_returns_text_with_normalised_whitespace(text: str, normalised: str) -> None:
    parsed = Range.parse(text)
    assert str(parsed) == normalised
    assert Range.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (">=", "no version after it"),
        ("1.2.3.4", "more than three numbers"),
        ("a", "major 'a' is not a number"),
        ("v1.2.3", "leading 'v'"),
        (">=01.2.3", "leading zero"),
        ("1.2.3-", "empty identifier"),
        ("^^1", "more than one operator"),
        (">=>=1", "more than one operator"),
        ("1.x-beta", "needs a full MAJOR.MINOR.PATCH"),
        ("1.2.3 -", "both sides"),
        ("~1.2.3-01", "leading zero"),
        ("1.2.3 || >=x.y.z.w", "more than three numbers"),
        ("1.2.3 -2.0.0", "empty"),
    ],
)
def test_invalid_ranges_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        Range.parse(text)
    assert reason in str(info.value)
    assert repr(text) in str(info.value)


def test_exact_range() -> None:
    exact = Range.exact(V("1.2.3-rc.1"))
    assert str(exact) == "1.2.3-rc.1"
    assert exact.allows(V("1.2.3-rc.1"))
    assert exact.allows(V("1.2.3-rc.1+build"))
    assert not exact.allows(V("1.2.3"))
    assert not exact.allows(V("1.2.3-rc.2"))
    assert Range.exact(V("2.0.0")) == Range.parse("2.0.0")


def test_max_satisfying() -> None:
    versions = [V(t) for t in ("1.0.0", "1.5.0", "2.0.0", "2.1.0-beta", "3.0.0")]
    assert max_satisfying(versions, [Range.parse("^1")]) == V("1.5.0")
    assert max_satisfying(versions, [Range.parse(">=1"), Range.parse("<3")]) == V("2.0.0")
    assert max_satisfying(versions, [Range.parse(">=2.1.0-alpha <3")]) == V("2.1.0-beta")
    assert max_satisfying(versions, [Range.parse("^4")]) is None
    assert max_satisfying([], [Range.parse("*")]) is None
    assert max_satisfying(versions, []) == V("3.0.0")
    tied = [V("1.0.0+a"), V("1.0.0+b")]
    assert max_satisfying(tied, [Range.parse("1.0.0")]) == V("1.0.0+a")


# --- properties -----------------------------------------------------------------------

_numbers = st.integers(min_value=0, max_value=12)
_alnum = st.from_regex(r"[0-9A-Za-z-]*[A-Za-z-][0-9A-Za-z-]*", fullmatch=True).filter(
    lambda s: len(s) <= 6
)
_prerelease = st.lists(st.one_of(_numbers, _alnum), max_size=3).map(tuple)
_build = st.lists(st.from_regex(r"[0-9A-Za-z-]{1,4}", fullmatch=True), max_size=2).map(tuple)
versions = st.builds(Version, _numbers, _numbers, _numbers, _prerelease, _build)
releases = st.builds(Version, _numbers, _numbers, _numbers)

FAST = settings(max_examples=150, deadline=None)


@FAST
@given(versions)
def test_parse_round_trips(version: Version) -> None:
    assert Version.parse(str(version)) == version


@FAST
@given(versions, versions)
def test_ordering_is_total_and_antisymmetric(a: Version, b: Version) -> None:
    assert [a < b, a.compare(b) == 0, a > b].count(True) == 1
    assert (a <= b) == (not a > b)
    assert (a >= b) == (not a < b)
    assert a.compare(b) == -b.compare(a)


@FAST
@given(st.lists(versions, max_size=12))
def test_sorting_agrees_with_compare(items: list[Version]) -> None:
    by_key = sorted(items)
    by_compare = sorted(items, key=functools.cmp_to_key(Version.compare))
    assert [v.precedence_key() for v in by_key] == [v.precedence_key() for v in by_compare]
    for low, high in itertools.pairwise(by_key):
        assert low <= high


@FAST
@given(versions, versions, versions)
def test_ordering_is_transitive(a: Version, b: Version, c: Version) -> None:
    if a <= b and b <= c:
        assert a <= c


@FAST
@given(versions, _build)
def test_build_never_changes_precedence(version: Version, build: tuple[str, ...]) -> None:
    other = Version(version.major, version.minor, version.patch, version.prerelease, build)
    assert version.compare(other) == 0


def _caret_ceiling_ok(v: Version, w: Version) -> bool:
    if v.major:
        return w.major == v.major
    if v.minor:
        return (w.major, w.minor) == (0, v.minor)
    return w.release == v.release


@FAST
@given(releases, releases)
def test_caret_expansion(v: Version, w: Version) -> None:
    assert Range.parse(f"^{v}").allows(w) == (w >= v and _caret_ceiling_ok(v, w))


@FAST
@given(releases, releases)
def test_tilde_expansion(v: Version, w: Version) -> None:
    expected = w >= v and (w.major, w.minor) == (v.major, v.minor)
    assert Range.parse(f"~{v}").allows(w) == expected


@FAST
@given(releases, releases)
def test_partial_x_ranges(v: Version, w: Version) -> None:
    assert Range.parse(f"{v.major}.x").allows(w) == (w.major == v.major)
    assert Range.parse(f"{v.major}.{v.minor}").allows(w) == (
        (w.major, w.minor) == (v.major, v.minor)
    )
    assert Range.parse(f"<={v.major}.{v.minor}").allows(w) == (
        (w.major, w.minor) <= (v.major, v.minor)
    )
    assert Range.parse(f">{v.major}").allows(w) == (w.major > v.major)


@FAST
@given(versions, versions)
def test_exact_matches_by_precedence(v: Version, w: Version) -> None:
    assert Range.exact(v).allows(w) == (v.compare(w) == 0)


@FAST
@given(releases, releases, versions)
def test_release_only_ranges_never_admit_prereleases(a: Version, b: Version, w: Version) -> None:
    for text in (f">={a} <{b}", f"^{a}", f"~{a}", f"{a} - {b}", "*", f"<={b}"):
        if w.prerelease:
            assert not Range.parse(text).allows(w)


@FAST
@given(releases, releases, releases)
def test_hyphen_is_inclusive_on_both_ends(a: Version, b: Version, w: Version) -> None:
    assert Range.parse(f"{a} - {b}").allows(w) == (a <= w <= b)


@FAST
@given(st.lists(versions, max_size=10), releases)
def test_max_satisfying_is_the_max_of_the_allowed(items: list[Version], floor: Version) -> None:
    ranges = [Range.parse(f">={floor}")]
    allowed = [v for v in items if ranges[0].allows(v)]
    best = max_satisfying(items, ranges)
    if not allowed:
        assert best is None
    else:
        assert best is not None
        assert all(best >= v for v in allowed)
        assert best in allowed
