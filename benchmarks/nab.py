"""NAB suite: edgeloop's detector on the NAB development split, next to NAB's scoreboard.

The same run as ``edgeloop bench nab``, reported as rows of the benchmark table.
"""

from __future__ import annotations

from benchmarks._report import Result, SuiteResult
from edgeloop.cli.bench import PROFILE_COLUMNS, run_nab
from edgeloop.core.errors import ValidationError
from edgeloop.ml.nab_corpus import default_root

TARGET_TO_BEAT = "ARTime"  # the best of NAB's scoreboard on these files


def run(out: SuiteResult) -> None:
    """Score the detector on every profile; time it per reading."""
    root = default_root()
    if root is None:
        raise ValidationError("no NAB corpus: set EDGELOOP_NAB or place it at ../shared/nab")
    report = run_nab(root, jobs=2)
    for profile, label in PROFILE_COLUMNS.items():
        ours = report.optimal[profile]
        best = max(report.scoreboard.items(), key=lambda item: item[1][profile])
        rival = report.scoreboard.get(TARGET_TO_BEAT, {}).get(profile)
        verdict = "above" if rival is not None and ours.normalized > rival else "not above"
        out.results.append(
            Result(
                benchmark=f"NAB score, {label} profile ({report.files} files)",
                measured=f"{ours.normalized:.1f} at threshold {ours.threshold:.3f}; "
                f"held out {report.held_out[profile]:.1f}; at 0.5 "
                f"{report.at_decision[profile].normalized:.1f}",
                comparison=f"{TARGET_TO_BEAT} {rival:.1f} ({verdict}); best {best[0]} "
                f"{best[1][profile]:.1f}"
                if rival is not None
                else f"best {best[0]} {best[1][profile]:.1f}",
            )
        )
    out.results.append(
        Result(
            benchmark="detector time per reading",
            measured=f"{report.micros_per_reading:.1f} µs ({report.readings:,} readings, "
            f"{report.jobs} processes)",
            comparison=f"yardstick in the same run: abs(x - c) over 4,000 floats "
            f"{report.reference_micros:.1f} µs",
        )
    )
    out.notes.append(
        "NAB scores: null detector 0, perfect 100; one threshold per profile for the whole "
        "corpus; held out = each category at the threshold optimal for the others."
    )
