"""Tests for edgeloop.core.resolver: version resolution and start order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeloop.core.errors import EdgeloopError, ResolutionError
from edgeloop.core.resolver import (
    Candidate,
    DependencySpec,
    Requirement,
    Resolution,
    resolve,
    start_order,
)
from edgeloop.core.semver import Range, Version

R = Range.parse
V = Version.parse


def cand(name: str, version: str, hard: bool = True, **deps: str) -> Candidate:
    """A candidate; dependencies as keyword args with '_' standing for '.' in names."""
    return cand_map(name, version, deps, hard=hard)


def cand_map(name: str, version: str, deps: Mapping[str, str], *, hard: bool = True) -> Candidate:
    """A candidate whose dependencies map names to range texts."""
    return Candidate(
        name,
        V(version),
        {k.replace("_", "."): DependencySpec(R(v), hard) for k, v in deps.items()},
    )


def pool(*candidates: Candidate) -> dict[str, list[Candidate]]:
    grouped: dict[str, list[Candidate]] = {}
    for c in candidates:
        grouped.setdefault(c.name, []).append(c)
    return grouped


def versions_of(resolution: Resolution) -> dict[str, str]:
    return {name: str(v) for name, v in resolution.versions.items()}


def test_highest_satisfying_versions_and_transitive_closure() -> None:
    available = pool(
        cand("A", "1.0.0", B="^1"),
        cand("A", "1.1.0", B="^1.2", C="~2.0"),
        cand("B", "1.1.0"),
        cand("B", "1.3.0", D="*"),
        cand("B", "2.0.0"),
        cand("C", "2.0.5"),
        cand("C", "2.1.0"),
        cand("D", "0.1.0"),
        cand("Unused", "9.9.9"),
    )
    result = resolve({"A": R("*")}, available)
    assert versions_of(result) == {"A": "1.1.0", "B": "1.3.0", "C": "2.0.5", "D": "0.1.0"}
    assert result.warnings == ()
    assert list(result.versions) == sorted(result.versions)
    assert set(result.dependencies["A"]) == {"B", "C"}


def test_soft_dependencies_resolve_too() -> None:
    available = pool(
        cand("A", "1.0.0", hard=False, B=">=2"), cand("B", "1.0.0"), cand("B", "2.0.0")
    )
    assert versions_of(resolve({"A": R("1.0.0")}, available)) == {"A": "1.0.0", "B": "2.0.0"}


def test_diamond_intersects_requirements() -> None:
    available = pool(
        cand("Top", "1.0.0", Left="*", Right="*"),
        cand("Left", "1.0.0", Base=">=1.2 <3"),
        cand("Right", "1.0.0", Base="~1.4"),
        *(cand("Base", v) for v in ("1.0.0", "1.2.0", "1.4.0", "1.4.7", "1.5.0", "2.0.0", "3.0.0")),
    )
    result = resolve({"Top": R("*")}, available)
    assert result.versions["Base"] == V("1.4.7")


def test_backtracks_when_highest_choice_makes_dependency_unsatisfiable() -> None:
    available = pool(
        cand("A", "2.0.0", B=">=5"),  # no B 5.x exists
        cand("A", "1.9.0", B="^2", C="^1"),
        cand("A", "1.0.0", B="^1"),
        cand("B", "1.0.0"),
        cand("B", "2.0.0", C="^2"),  # clashes with A 1.9.0's C ^1
        cand("B", "2.5.0", C="^1"),
        cand("C", "1.0.0"),
        cand("C", "2.0.0"),
    )
    result = resolve({"A": R("*")}, available)
    assert versions_of(result) == {"A": "1.9.0", "B": "2.5.0", "C": "1.0.0"}


def test_backtracks_over_an_already_chosen_component() -> None:
    # B is decided first (fewer options); A's highest version then rules it out.
    available = pool(
        cand("A", "2.0.0", B="<1.5"),
        cand("A", "1.0.0"),
        cand("A", "0.5.0"),
        cand("B", "2.0.0"),
    )
    assert versions_of(resolve({"A": R("*"), "B": R("*")}, available)) == {
        "A": "1.0.0",
        "B": "2.0.0",
    }


def test_deep_backtracking_finds_the_only_solution() -> None:
    # A chain where only the lowest version of every link works with the last one.
    n = 6
    candidates = []
    for i in range(n):
        for major in (1, 2, 3):
            deps = {f"L{i + 1}": f"^{major}"} if i + 1 < n else {}
            candidates.append(cand_map(f"L{i}", f"{major}.0.0", deps))
    available = pool(*candidates)
    result = resolve({"L0": R("*"), f"L{n - 1}": R("^1")}, available)
    assert set(result.versions.values()) == {V("1.0.0")}


def test_preferred_version_is_kept_while_it_satisfies_everything() -> None:
    available = pool(cand("A", "1.0.0"), cand("A", "1.2.0"), cand("A", "2.0.0"))
    result = resolve({"A": R("^1")}, available, preferred={"A": V("1.0.0")})
    assert result.versions["A"] == V("1.0.0")


def test_preferred_version_is_replaced_when_it_no_longer_satisfies() -> None:
    available = pool(cand("A", "1.0.0"), cand("A", "1.2.0"), cand("A", "2.0.0"))
    result = resolve({"A": R(">=1.1")}, available, preferred={"A": V("1.0.0")})
    assert result.versions["A"] == V("2.0.0")


def test_preferred_version_replaced_when_a_new_dependent_excludes_it() -> None:
    available = pool(
        cand("App", "1.0.0", Lib=">=1.5"),
        cand("Lib", "1.0.0"),
        cand("Lib", "1.5.0"),
        cand("Lib", "1.8.0"),
    )
    result = resolve({"App": R("*")}, available, preferred={"Lib": V("1.0.0")})
    assert result.versions["Lib"] == V("1.8.0")
    result = resolve({"App": R("*")}, available, preferred={"Lib": V("1.5.0")})
    assert result.versions["Lib"] == V("1.5.0")


def test_preferred_version_not_available_is_ignored() -> None:
    available = pool(cand("A", "1.0.0"), cand("A", "1.2.0"))
    result = resolve({"A": R("*")}, available, preferred={"A": V("1.1.0")})
    assert result.versions["A"] == V("1.2.0")


def test_exact_root_from_local_merge() -> None:
    available = pool(cand("A", "1.0.0"), cand("A", "1.2.0"))
    result = resolve({"A": Range.exact(V("1.0.0"))}, available)
    assert result.versions["A"] == V("1.0.0")


def test_prerelease_versions_only_when_asked_for() -> None:
    available = pool(cand("A", "1.0.0"), cand("A", "1.1.0-beta.1"))
    assert resolve({"A": R("^1")}, available).versions["A"] == V("1.0.0")
    assert resolve({"A": R(">=1.1.0-beta")}, available).versions["A"] == V("1.1.0-beta.1")


def test_builtins_are_accepted_left_out_and_warned_about() -> None:
    nucleus = "aws.greengrass.Nucleus"
    available = pool(
        cand("A", "1.0.0", aws_greengrass_Nucleus=">=2.9.0"),
        cand("B", "1.0.0", aws_greengrass_Nucleus="^2"),
    )
    result = resolve(
        {"A": R("*"), "B": R("*"), nucleus: R("2.12.0")},
        available,
        builtins={nucleus: V("2.5.0")},
    )
    assert versions_of(result) == {"A": "1.0.0", "B": "1.0.0"}
    assert len(result.warnings) == 2
    by_deployment, by_a = result.warnings  # root requirements are recorded first
    assert nucleus in by_a
    assert "2.5.0" in by_a
    assert '">=2.9.0"' in by_a
    assert "required by A 1.0.0" in by_a
    assert "required by the deployment" in by_deployment


def test_builtin_wins_over_available_recipes() -> None:
    available = pool(cand("A", "1.0.0", N="^1"), cand("N", "1.0.0"))
    result = resolve({"A": R("*")}, available, builtins={"N": V("1.3.0")})
    assert versions_of(result) == {"A": "1.0.0"}
    assert result.warnings == ()


def test_dependency_cycles_resolve() -> None:
    available = pool(cand("A", "1.0.0", B="*"), cand("B", "1.0.0", A="^1"))
    assert versions_of(resolve({"A": R("*")}, available)) == {"A": "1.0.0", "B": "1.0.0"}


def test_self_dependency_is_checked() -> None:
    available = pool(cand("A", "2.0.0", A="<2"), cand("A", "1.0.0", A="<2"))
    assert resolve({"A": R("*")}, available).versions["A"] == V("1.0.0")


def test_roots_with_several_requirements_when_unioning_deployments() -> None:
    available = pool(*(cand("A", v) for v in ("1.0.0", "1.5.0", "2.0.0")))
    roots = {
        "A": [
            Requirement(R(">=1.2"), "thinggroup/Kitchen"),
            Requirement(R("<2"), "thinggroup/Basement"),
        ]
    }
    assert resolve(roots, available).versions["A"] == V("1.5.0")
    roots["A"].append(Requirement(R("<1.2"), "thing/hub-7"))
    with pytest.raises(ResolutionError) as info:
        resolve(roots, available)
    message = str(info.value)
    assert '">=1.2" (required by thinggroup/Kitchen)' in message
    assert '"<1.2" (required by thing/hub-7)' in message
    # Not part of the clash, so not named.
    assert "Basement" not in message


# --- errors -------------------------------------------------------------------------------


def test_clash_message_names_ranges_requirers_and_available_versions() -> None:
    available = pool(
        cand("com.example.A", "1.0.0", com_example_B=">=2.0.0"),
        cand("com.example.B", "1.0.0"),
        cand("com.example.B", "2.1.0"),
    )
    with pytest.raises(ResolutionError) as info:
        resolve({"com.example.A": R("1.0.0"), "com.example.B": R("<2.0.0")}, available)
    message = str(info.value)
    assert message.startswith("com.example.B: no version satisfies ")
    assert '">=2.0.0" (required by com.example.A 1.0.0)' in message
    assert '"<2.0.0" (required by the deployment)' in message
    assert message.endswith("available: 1.0.0, 2.1.0")
    assert isinstance(info.value, EdgeloopError)


def test_single_requirement_that_nothing_meets() -> None:
    available = pool(cand("A", "1.0.0"), cand("A", "1.1.0"))
    with pytest.raises(ResolutionError) as info:
        resolve({"A": R("^2")}, available)
    assert str(info.value) == (
        'A: no version satisfies "^2" (required by the deployment); available: 1.0.0, 1.1.0'
    )


def test_missing_component_names_who_needs_it() -> None:
    available = pool(cand("com.example.A", "1.0.0", com_example_Missing="^1"))
    with pytest.raises(ResolutionError) as info:
        resolve({"com.example.A": R("*")}, available)
    message = str(info.value)
    assert message.startswith("com.example.Missing: not available")
    assert "required by com.example.A 1.0.0" in message


def test_missing_root() -> None:
    with pytest.raises(ResolutionError, match=r"Ghost: not available \(required by the deployment"):
        resolve({"Ghost": R("*")}, {})


def test_failure_after_backtracking_lists_other_attempts() -> None:
    available = pool(
        cand("A", "2.0.0", B=">=3"),
        cand("A", "1.0.0", B="<1"),
        cand("B", "1.0.0"),
        cand("B", "2.0.0"),
    )
    with pytest.raises(ResolutionError) as info:
        resolve({"A": R("*")}, available)
    message = str(info.value)
    first, _, rest = message.partition("\n")
    assert '">=3" (required by A 2.0.0)' in first
    assert "other combinations tried also failed" in rest
    assert '"<1" (required by A 1.0.0)' in rest


def test_search_is_bounded() -> None:
    # Ten components of ten versions each whose only clash is at the very end: the
    # search would try 10**9 combinations, so it must give up and say so.
    candidates = [cand(f"C{i}", f"{v}.0.0") for i in range(9) for v in range(1, 11)]
    candidates += [cand("C9", f"{v}.0.0", C0="<0") for v in range(1, 11)]
    roots = {f"C{i}": R("*") for i in range(10)}
    with pytest.raises(ResolutionError, match="gave up after 500 attempts"):
        resolve(roots, pool(*candidates), max_attempts=500)


def test_candidate_listed_under_wrong_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="listed under 'B'"):
        resolve({"B": R("*")}, {"B": [cand("A", "1.0.0")]})


def test_resolution_is_deterministic() -> None:
    available = pool(
        cand("A", "1.0.0", B="^1", C="^1"),
        cand("B", "1.0.0", C="<1.5"),
        cand("B", "1.1.0", C=">=1.5"),
        cand("C", "1.0.0"),
        cand("C", "1.5.0"),
    )
    results = {tuple(versions_of(resolve({"A": R("*")}, available)).items()) for _ in range(5)}
    assert len(results) == 1


# --- property: any answer satisfies every requirement --------------------------------------

NAMES = ["P", "Q", "S", "T"]


@st.composite
def universes(draw: st.DrawFn) -> tuple[dict[str, list[Candidate]], dict[str, Range]]:
    available: dict[str, list[Candidate]] = {}
    for name in NAMES:
        entries = []
        for major in draw(st.sets(st.integers(1, 4), min_size=0, max_size=3)):
            deps = draw(st.dictionaries(st.sampled_from(NAMES), st.integers(1, 4), max_size=2))
            op = draw(st.sampled_from(["^", ">=", "<="]))
            entries.append(cand_map(name, f"{major}.0.0", {d: f"{op}{m}" for d, m in deps.items()}))
        available[name] = entries
    root_names = draw(st.sets(st.sampled_from(NAMES), min_size=1, max_size=2))
    roots = {n: R(draw(st.sampled_from(["*", ">=2", "<3", "^1"]))) for n in root_names}
    return available, roots


def _check_solution(
    result: Resolution, available: Mapping[str, Sequence[Candidate]], roots: Mapping[str, Range]
) -> None:
    chosen = {
        n: next(c for c in available[n] if c.version == v) for n, v in result.versions.items()
    }
    for name, requirement in roots.items():
        assert requirement.allows(result.versions[name])
    for candidate in chosen.values():
        for dep, spec in candidate.dependencies.items():
            assert dep in result.versions, "dependency closure is incomplete"
            assert spec.requirement.allows(result.versions[dep])


@settings(max_examples=150, deadline=None)
@given(universes())
def test_resolutions_satisfy_every_requirement(
    universe: tuple[dict[str, list[Candidate]], dict[str, Range]],
) -> None:
    available, roots = universe
    try:
        result = resolve(roots, available)
    except ResolutionError as err:
        assert str(err)
        return
    _check_solution(result, available, roots)


def _brute_force_has_solution(
    available: Mapping[str, Sequence[Candidate]], roots: Mapping[str, Range]
) -> bool:
    import itertools

    options = [[None, *available[n]] for n in NAMES]
    for combo in itertools.product(*options):
        chosen = {n: c for n, c in zip(NAMES, combo, strict=True) if c is not None}
        if not all(n in chosen and r.allows(chosen[n].version) for n, r in roots.items()):
            continue
        if all(
            d in chosen and s.requirement.allows(chosen[d].version)
            for c in chosen.values()
            for d, s in c.dependencies.items()
        ):
            return True
    return False


@settings(max_examples=100, deadline=None)
@given(universes())
def test_finds_a_solution_whenever_one_exists(
    universe: tuple[dict[str, list[Candidate]], dict[str, Range]],
) -> None:
    available, roots = universe
    try:
        resolve(roots, available)
        found = True
    except ResolutionError:
        found = False
    assert found == _brute_force_has_solution(available, roots)


# --- start order ----------------------------------------------------------------------------


def deps_of(**edges: str) -> dict[str, dict[str, DependencySpec]]:
    return {
        name: {d: DependencySpec(R("*"), hard=not d.islower()) for d in targets.split()}
        for name, targets in edges.items()
    }


def test_start_order_layers() -> None:
    versions = {n: V("1.0.0") for n in ("App", "Lib", "Base", "Other", "Ui")}
    dependencies = deps_of(App="Lib Base Nucleus", Lib="Base", Ui="App")
    assert start_order(versions, dependencies) == [
        ["Base", "Other"],
        ["Lib"],
        ["App"],
        ["Ui"],
    ]


def test_start_order_counts_soft_dependencies() -> None:
    versions = {"a": V("1.0.0"), "b": V("1.0.0")}
    assert start_order(versions, deps_of(a="b")) == [["b"], ["a"]]


def test_start_order_of_nothing() -> None:
    assert start_order({}, {}) == []


def test_start_order_names_the_cycle() -> None:
    versions = {n: V("1.0.0") for n in ("A", "B", "C", "D", "E")}
    with pytest.raises(ResolutionError) as info:
        start_order(versions, deps_of(A="E", B="C", C="D", D="B", E=""))
    assert "dependency cycle: B -> C -> D -> B" in str(info.value)


def test_start_order_self_cycle() -> None:
    with pytest.raises(ResolutionError, match="dependency cycle: A -> A"):
        start_order({"A": V("1.0.0")}, deps_of(A="A"))


def test_start_order_after_resolution() -> None:
    available = pool(cand("A", "1.0.0", B="*"), cand("B", "1.0.0"), cand("C", "1.0.0", A="*"))
    result = resolve({"C": R("*")}, available)
    assert start_order(result.versions, result.dependencies) == [["B"], ["A"], ["C"]]
