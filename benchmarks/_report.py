"""What every benchmark run prints: the machine it ran on, and one table of results."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass(frozen=True, kw_only=True)
class Machine:
    """The machine a run measured, as the reader needs it to judge the numbers."""

    cpu: str
    cores: str
    memory: str
    kernel: str
    os: str
    python: str
    load: str  # other work on the machine skews timings: the reader should see it

    def rows(self) -> list[tuple[str, str]]:
        """Label and value pairs, in print order."""
        return [
            ("CPU", self.cpu),
            ("cores", self.cores),
            ("memory", self.memory),
            ("kernel", self.kernel),
            ("OS", self.os),
            ("Python", self.python),
            ("load", self.load),
        ]


def describe_machine() -> Machine:
    """Read the machine's description from /proc and the interpreter."""
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    cores = f"{logical} logical" + (
        f" ({usable} usable by this process)" if usable != logical else ""
    )
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    memory = f"{int(mem_kb.split()[0]) / 1024 / 1024:.1f} GiB" if mem_kb else "unknown"
    return Machine(
        cpu=cpu,
        cores=cores,
        memory=memory,
        kernel=f"{platform.system()} {platform.release()} ({platform.machine()})",
        os=_os_name(),
        python=f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        load=_load(),
    )


def _load() -> str:
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        return "unknown"
    return f"{one} / {five} / {fifteen} (1, 5, 15 min load average when the run began)"


def _proc_field(path: str, key: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


class Verdict(StrEnum):
    """How a measurement compares with its target."""

    MEETS = "meets"
    MISSES = "misses"
    INFO = "—"  # a baseline or context row, with no target of its own


@dataclass(frozen=True, kw_only=True)
class Target:
    """An upper bound: ``at most`` (inclusive) or ``under`` (strict)."""

    limit: float
    unit: str
    inclusive: bool = True

    def __str__(self) -> str:
        return f"{'≤' if self.inclusive else '<'} {self.limit:g} {self.unit}"

    def met_by(self, value: float) -> bool:
        """True when ``value`` (in this target's unit) is within the bound."""
        return value <= self.limit if self.inclusive else value < self.limit


@dataclass(frozen=True, kw_only=True)
class Result:
    """One row of the table."""

    benchmark: str
    measured: str
    value: float | None = None  # in the target's unit, for the verdict
    target: Target | None = None
    comparison: str = ""

    @property
    def verdict(self) -> Verdict:
        """Meets or misses the target; INFO when there is none."""
        if self.target is None or self.value is None:
            return Verdict.INFO
        return Verdict.MEETS if self.target.met_by(self.value) else Verdict.MISSES


@dataclass(kw_only=True)
class SuiteResult:
    """What one suite measured, and the notes a reader needs to read it."""

    name: str
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Samples:
    """Repeated timings of one thing, in seconds."""

    values: Sequence[float]

    @property
    def median(self) -> float:
        """The median sample."""
        return statistics.median(self.values)

    @property
    def max(self) -> float:
        """The slowest sample."""
        return max(self.values)

    def describe(self, unit: str = "s") -> str:
        """``median X (max Y, N=n)`` in seconds or milliseconds."""
        scale, fmt = (1000.0, "{:.0f}") if unit == "ms" else (1.0, "{:.3f}")
        med = fmt.format(self.median * scale)
        top = fmt.format(self.max * scale)
        return f"median {med} {unit} (max {top}, N={len(self.values)})"


def mb(kib: float) -> float:
    """KiB (as /proc reports it, "kB") to MB (MiB, as memory targets are read)."""
    return kib / 1024


def print_report(machine: Machine, suites: Sequence[SuiteResult], console: Console) -> None:
    """The machine's description, then one table with every suite's rows and notes."""
    console.print()
    console.print("[bold]Machine[/bold]")
    for label, value in machine.rows():
        console.print(f"  {label:<7} {value}")
    console.print()
    table = Table(title="edgeloop benchmarks", show_lines=False, title_style="bold")
    table.add_column("benchmark", overflow="fold")
    table.add_column("measured", overflow="fold")
    table.add_column("target", no_wrap=True)
    table.add_column("baseline / comparison", overflow="fold")
    table.add_column("verdict", no_wrap=True)
    for index, suite in enumerate(suites):
        if index:
            table.add_section()
        for row in suite.results:
            verdict = row.verdict
            style = {Verdict.MEETS: "green", Verdict.MISSES: "bold red"}.get(verdict, "dim")
            table.add_row(
                escape(f"[{suite.name}] {row.benchmark}"),
                escape(row.measured),
                str(row.target) if row.target else "—",
                escape(row.comparison),
                f"[{style}]{verdict.value}[/{style}]",
            )
    console.print(table)
    for suite in suites:
        if suite.notes:
            console.print(f"[bold]Notes ({suite.name})[/bold]")
            for note in suite.notes:
                console.print(f"  • {escape(note)}")


__all__ = [
    "Machine",
    "Result",
    "Samples",
    "SuiteResult",
    "Target",
    "Verdict",
    "describe_machine",
    "mb",
    "print_report",
]
