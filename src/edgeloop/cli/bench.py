"""`edgeloop bench`: measure edgeloop's detectors where others can check the numbers."""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from numpy.typing import NDArray
from rich.table import Table

from edgeloop.cli._common import JsonOption, console, one_line_errors, print_json
from edgeloop.core.errors import ValidationError
from edgeloop.ml import nab
from edgeloop.ml.detectors import DEFAULT_CONFIG, DetectorConfig
from edgeloop.ml.nab_bench import ProfileResult, corpus_scores, held_out_scores, run_detector
from edgeloop.ml.nab_corpus import (
    NabCorpus,
    check_profiles,
    default_root,
    load_corpus,
    load_reference_scores,
    reference_detectors,
)

app = typer.Typer(help="Benchmarks of edgeloop's detectors.", no_args_is_help=True)

PROFILE_COLUMNS = {
    "standard": "standard",
    "reward_low_FP_rate": "low FP",
    "reward_low_FN_rate": "low FN",
}


@dataclass(frozen=True, kw_only=True)
class NabReport:
    """One NAB run: edgeloop's scores, the scoreboard's, and the cost per reading."""

    root: Path
    files: int
    readings: int
    optimal: dict[str, ProfileResult]  # at the corpus-optimal threshold, as NAB scores
    at_decision: dict[str, ProfileResult]  # at the detector's own decision level (0.5)
    held_out: dict[str, float]  # each category at the threshold best for the others
    scoreboard: dict[str, dict[str, float]]  # detector -> profile -> normalised score
    micros_per_reading: float  # detector time alone, per reading
    reference_micros: float  # a fixed numpy operation timed in the same run, for scale
    wall_seconds: float
    jobs: int
    config: DetectorConfig


def _score_file(
    name: str, values: NDArray[np.float64], config: DetectorConfig
) -> tuple[str, NDArray[np.float64], float]:
    run = run_detector(values, config)
    return name, run.scores, run.seconds


def run_nab(root: Path, *, jobs: int = 2, config: DetectorConfig = DEFAULT_CONFIG) -> NabReport:
    """Run edgeloop's detector over every file of the corpus at ``root`` and score it."""
    check_profiles(root)
    corpus = load_corpus(root)
    started = time.perf_counter()
    scores: dict[str, NDArray[np.float64]] = {}
    busy = 0.0
    # largest files first, so the last worker is not left with the longest one
    order = sorted(corpus.files, key=lambda item: -item.values.size)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_score_file, f.name, f.values, config) for f in order]
        for future in futures:
            name, result, seconds = future.result()
            scores[name] = result
            busy += seconds
    wall = time.perf_counter() - started
    reference = reference_micros()
    readings = sum(item.values.size for item in corpus.files)
    return NabReport(
        root=root,
        files=len(corpus.files),
        readings=readings,
        optimal=corpus_scores(corpus.files, scores, corpus.windows),
        at_decision=corpus_scores(
            corpus.files, scores, corpus.windows, threshold=lambda _profile, _sweep: 0.5
        ),
        held_out=held_out_scores(corpus.files, scores, corpus.windows),
        scoreboard=scoreboard(root, corpus),
        micros_per_reading=busy / readings * 1e6,
        reference_micros=reference,
        wall_seconds=wall,
        jobs=jobs,
        config=config,
    )


def reference_micros(repeats: int = 2000) -> float:
    """Microseconds for ``abs(x - c)`` over 4,000 floats: a yardstick of the machine's speed
    taken in the same run, since a loaded or slow machine stretches every timing alike."""
    values = np.linspace(0.0, 1.0, 4000)
    started = time.perf_counter()
    for _ in range(repeats):
        np.abs(values - 0.5)
    return (time.perf_counter() - started) / repeats * 1e6


def scoreboard(root: Path, corpus: NabCorpus) -> dict[str, dict[str, float]]:
    """The reference detectors' normalised scores on this corpus, from their score tables."""
    names = {item.name for item in corpus.files}
    labels = [item.labels for item in corpus.files]
    board: dict[str, dict[str, float]] = {}
    for detector in reference_detectors(root):
        if detector == "null":
            continue
        row = {}
        for profile, cost in nab.PROFILES.items():
            table = [r for r in load_reference_scores(root, detector, profile) if r.file in names]
            if len(table) != len(names):
                break  # a table that does not cover the corpus cannot be compared
            row[profile] = nab.normalized_score(
                sum(r.score for r in table),
                nab.null_score(labels, cost),
                nab.perfect_score(corpus.windows, cost),
            )
        else:
            board[detector] = row
    return board


def describe_machine() -> str:
    """CPU, cores and load: what a reader needs to judge a time per reading."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    try:
        load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    return (
        f"{cpu}, {cores} logical cores, load {load} (1/5/15 min), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


RootArg = Annotated[
    Path | None,
    typer.Option(
        "--nab",
        help="The NAB corpus (default: $EDGELOOP_NAB, else ../shared/nab beside the checkout).",
        show_default=False,
    ),
]


@app.command("nab")
@one_line_errors
def nab_command(
    root: RootArg = None,
    jobs: Annotated[int, typer.Option(help="Worker processes for the files.")] = 2,
    as_json: JsonOption = False,
) -> None:
    """Score edgeloop's detector on a NAB corpus next to the scoreboard's detectors."""
    if root is None:
        root = default_root()
        if root is None:
            raise ValidationError(
                "no NAB corpus found: pass --nab PATH or set EDGELOOP_NAB", source="--nab"
            )
    machine = describe_machine()
    report = run_nab(root, jobs=jobs)
    if as_json:
        print_json(
            {
                "corpus": str(report.root),
                "files": report.files,
                "readings": report.readings,
                "edgeloop": {p: r.normalized for p, r in report.optimal.items()},
                "thresholds": {p: r.threshold for p, r in report.optimal.items()},
                "edgeloop_at_decision": {p: r.normalized for p, r in report.at_decision.items()},
                "edgeloop_held_out": report.held_out,
                "scoreboard": report.scoreboard,
                "micros_per_reading": report.micros_per_reading,
                "reference_micros": report.reference_micros,
                "wall_seconds": report.wall_seconds,
                "machine": machine,
            }
        )
        return
    table = Table(
        title=f"NAB scores on {report.files} files ({report.readings:,} readings), normalised: "
        "null detector 0, perfect 100",
        title_style="bold",
    )
    table.add_column("detector")
    for label in PROFILE_COLUMNS.values():
        table.add_column(label, justify="right")
    table.add_column("threshold")

    def cells(values: dict[str, float]) -> list[str]:
        return [f"{values[p]:.1f}" for p in PROFILE_COLUMNS]

    optimal = {p: r.normalized for p, r in report.optimal.items()}
    table.add_row(
        "[bold]edgeloop[/bold]",
        *[f"[bold]{v}[/bold]" for v in cells(optimal)],
        "optimal " + " / ".join(f"{report.optimal[p].threshold:.3f}" for p in PROFILE_COLUMNS),
    )
    table.add_row(
        "edgeloop, own decision",
        *cells({p: r.normalized for p, r in report.at_decision.items()}),
        "0.5",
    )
    table.add_row(
        "edgeloop, held out",
        *cells(report.held_out),
        "optimal without the category",
    )
    table.add_section()
    ranked = sorted(report.scoreboard.items(), key=lambda item: -item[1]["standard"])
    for detector, values in ranked:
        table.add_row(detector, *cells(values), "NAB's optimal")
    console.print(table)
    console.print(
        "optimal: the one threshold per profile that maximises the corpus score, as NAB "
        "chooses it; 0.5: where edgeloop's detector raises an alarm; held out: each "
        "category scored at the threshold optimal for the other categories. Scoreboard "
        "rows: NAB's per-file scores in reference/scores, normalised the same way.",
        highlight=False,
    )
    console.print(
        f"edgeloop detector: {report.micros_per_reading:.1f} µs per reading "
        f"(detector time in {report.jobs} worker process(es)); wall {report.wall_seconds:.1f} s; "
        f"yardstick: abs(x - c) over 4,000 floats takes {report.reference_micros:.1f} µs here; "
        f"parameters {report.config}",
        highlight=False,
    )
    console.print(f"machine: {machine}", highlight=False)
    console.print(f"corpus: {report.root}", highlight=False)
