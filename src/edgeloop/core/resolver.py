"""Component version resolution: one version of every component the hub runs, and start order.

The search is a deterministic depth-first backtracking over components, most constrained
first (fewest versions left, then the order they were discovered in). For each component
it tries the version that runs now (``preferred``) if it still satisfies every
requirement, then the others from the highest down. HARD and SOFT dependencies constrain
versions alike; the kind only matters when starting components.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgeloop.core.errors import ResolutionError
from edgeloop.core.semver import Range, Version

DEPLOYMENT = "the deployment"
DEFAULT_MAX_ATTEMPTS = 10_000


@dataclass(frozen=True)
class DependencySpec:
    """A recipe's requirement on another component."""

    requirement: Range
    hard: bool = True


@dataclass(frozen=True)
class Candidate:
    """One available version of a component, with the dependencies its recipe declares."""

    name: str
    version: Version
    dependencies: Mapping[str, DependencySpec] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Requirement:
    """A range some party (a deployment, or a component version) puts on a component."""

    range: Range
    required_by: str

    def __str__(self) -> str:
        return f'"{self.range}" (required by {self.required_by})'


@dataclass(frozen=True)
class Resolution:
    """The chosen versions, the dependencies of each choice, and any warnings."""

    versions: dict[str, Version]
    warnings: tuple[str, ...] = ()
    dependencies: dict[str, Mapping[str, DependencySpec]] = field(default_factory=dict)


Requirements = dict[str, tuple[Requirement, ...]]


class _GiveUp(Exception):
    """The search ran out of attempts."""


def _versions_list(candidates: Sequence[Candidate]) -> str:
    shown = ", ".join(str(c.version) for c in sorted(candidates, key=lambda c: c.version))
    return shown or "none"


def _join_and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class _Search:
    """One resolution run; records the clashes it meets so a failure can explain itself."""

    def __init__(
        self,
        pool: Mapping[str, tuple[Candidate, ...]],
        preferred: Mapping[str, Version],
        builtins: Mapping[str, Version],
        max_attempts: int,
    ) -> None:
        self.pool = pool
        self.preferred = preferred
        self.builtins = builtins
        self.max_attempts = max_attempts
        self.attempts = 0
        self.discovered: dict[str, int] = {}
        # Clashes no choice elsewhere can fix come first in the explanation.
        self.dead_ends: list[str] = []
        self.clashes: list[str] = []

    def options(self, name: str, requirements: tuple[Requirement, ...]) -> list[Candidate]:
        allowed = [
            c
            for c in self.pool.get(name, ())
            if all(r.range.allows(c.version) for r in requirements)
        ]
        keep = self.preferred.get(name)
        if keep is not None:
            # Greengrass keeps the running version while it still satisfies everything.
            allowed.sort(key=lambda c: c.version != keep)
        return allowed

    def explain_unsatisfiable(self, name: str, requirements: tuple[Requirement, ...]) -> str:
        candidates = self.pool.get(name, ())
        if not candidates:
            who = ", ".join(dict.fromkeys(r.required_by for r in requirements))
            return f"{name}: not available (required by {who}); no version of it is known"
        # Drop requirements that are not part of the clash, so the message names only
        # the ones that actually exclude each other.
        clash = list(requirements)
        for requirement in requirements:
            rest = [r for r in clash if r is not requirement]
            if rest and not self.options(name, tuple(rest)):
                clash = rest
        return (
            f"{name}: no version satisfies {_join_and([str(r) for r in clash])}; "
            f"available: {_versions_list(candidates)}"
        )

    def note(self, message: str, *, dead_end: bool) -> None:
        target = self.dead_ends if dead_end else self.clashes
        if message not in target:
            target.append(message)

    def run(
        self, chosen: dict[str, Candidate], requirements: Requirements
    ) -> tuple[dict[str, Candidate], Requirements] | None:
        for name in requirements:
            self.discovered.setdefault(name, len(self.discovered))
        pending = [n for n in requirements if n not in chosen and n not in self.builtins]
        if not pending:
            return chosen, requirements
        options = {n: self.options(n, requirements[n]) for n in pending}
        for name in pending:
            if not options[name]:
                self.note(self.explain_unsatisfiable(name, requirements[name]), dead_end=True)
                return None
        name = min(pending, key=lambda n: (len(options[n]), self.discovered[n]))
        for candidate in options[name]:
            self.attempts += 1
            if self.attempts > self.max_attempts:
                raise _GiveUp
            trial = {**chosen, name: candidate}
            extended = self.extend(trial, requirements, candidate)
            if extended is None:
                continue
            found = self.run(trial, extended)
            if found is not None:
                return found
        return None

    def extend(
        self, chosen: dict[str, Candidate], requirements: Requirements, candidate: Candidate
    ) -> Requirements | None:
        """Add ``candidate``'s dependencies; None if one rules out a version already chosen."""
        extended = dict(requirements)
        for dep, spec in sorted(candidate.dependencies.items()):
            extended[dep] = (*extended.get(dep, ()), Requirement(spec.requirement, str(candidate)))
            current = chosen.get(dep)
            if current is None or spec.requirement.allows(current.version):
                continue
            if self.options(dep, extended[dep]):
                self.note(
                    f'{dep}: {candidate} requires "{spec.requirement}" '
                    f"but {current} was already chosen",
                    dead_end=False,
                )
            else:
                self.note(self.explain_unsatisfiable(dep, extended[dep]), dead_end=True)
            return None
        return extended

    def failure(self) -> str:
        messages = self.dead_ends + self.clashes
        if not messages:
            return "no combination of versions satisfies every requirement"
        text = messages[0]
        if len(messages) > 1:
            others = messages[1:4]
            more = len(messages) - 1 - len(others)
            text += "\nother combinations tried also failed:\n" + "\n".join(
                f"  - {m}" for m in others
            )
            if more:
                text += f"\n  - ... and {more} more"
        return text


def _root_requirements(roots: Mapping[str, Range | Sequence[Requirement]]) -> Requirements:
    requirements: Requirements = {}
    for name in sorted(roots):
        spec = roots[name]
        requirements[name] = (
            (Requirement(spec, DEPLOYMENT),) if isinstance(spec, Range) else tuple(spec)
        )
    return requirements


def _pool(available: Mapping[str, Sequence[Candidate]]) -> dict[str, tuple[Candidate, ...]]:
    pool: dict[str, tuple[Candidate, ...]] = {}
    for name, candidates in available.items():
        for candidate in candidates:
            if candidate.name != name:
                raise ValueError(f"candidate {candidate} is listed under {name!r}")
        unique = {str(c.version): c for c in reversed(candidates)}  # first listing wins
        # Highest first; build metadata breaks precedence ties so the order is stable.
        pool[name] = tuple(
            sorted(unique.values(), key=lambda c: (c.version.precedence_key(), str(c.version)))
        )[::-1]
    return pool


def resolve(
    roots: Mapping[str, Range | Sequence[Requirement]],
    available: Mapping[str, Sequence[Candidate]],
    preferred: Mapping[str, Version] | None = None,
    builtins: Mapping[str, Version] | None = None,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Resolution:
    """Pick a version of every root and of its transitive dependencies.

    ``roots`` maps a component to the deployment's range, or to several requirements
    (when unioning deployments, each naming who required it). ``builtins`` are provided
    by the runtime itself: every requirement on them is accepted, they are left out of
    the result, and a requirement their version does not meet becomes a warning.
    Raises ResolutionError naming the clashing ranges and who required each.
    """
    builtin_versions = dict(builtins or {})
    search = _Search(_pool(available), dict(preferred or {}), builtin_versions, max_attempts)
    try:
        found = search.run({}, _root_requirements(roots))
    except _GiveUp:
        raise ResolutionError(
            f"gave up after {max_attempts} attempts without finding compatible versions; "
            f"first clash found: {search.failure()}"
        ) from None
    if found is None:
        raise ResolutionError(search.failure())
    chosen, requirements = found
    warnings = [
        f"{name} is provided by the runtime at {builtin_versions[name]}, "
        f'which does not satisfy "{r.range}" (required by {r.required_by}); using it anyway'
        for name in sorted(builtin_versions)
        for r in requirements.get(name, ())
        if not r.range.allows(builtin_versions[name])
    ]
    return Resolution(
        versions={name: chosen[name].version for name in sorted(chosen)},
        warnings=tuple(warnings),
        dependencies={name: chosen[name].dependencies for name in sorted(chosen)},
    )


def start_order(
    versions: Mapping[str, Version], dependencies: Mapping[str, Mapping[str, DependencySpec]]
) -> list[list[str]]:
    """Layer components so each starts after everything it depends on (HARD or SOFT).

    Dependencies on components outside ``versions`` (builtins) are ignored. Raises
    ResolutionError naming a dependency cycle, which Greengrass cannot start.
    """
    edges = {
        name: sorted(d for d in dependencies.get(name, {}) if d in versions) for name in versions
    }
    started: set[str] = set()
    layers: list[list[str]] = []
    remaining = sorted(versions)
    while remaining:
        layer = [n for n in remaining if all(d in started for d in edges[n])]
        if not layer:
            cycle = _find_cycle(remaining, edges)
            raise ResolutionError(
                "dependency cycle: " + " -> ".join(cycle) + "; components that depend on "
                "each other cannot be started in any order: remove one of these dependencies"
            )
        layers.append(layer)
        started.update(layer)
        remaining = [n for n in remaining if n not in started]
    return layers


def _find_cycle(remaining: list[str], edges: Mapping[str, list[str]]) -> list[str]:
    # Every remaining component has a dependency that is also remaining (or it would
    # have been layered), so walking those dependencies must revisit a component.
    left = set(remaining)
    path: list[str] = []
    seen: dict[str, int] = {}
    node = remaining[0]
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in edges[node] if d in left)
    return [*path[seen[node] :], node]
