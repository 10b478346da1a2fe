"""``python -m benchmarks [SUITE ...]``: run every suite, or the ones named, and print one table.

Exit status: 0 when every suite ran (whether or not its targets were met: the table says),
1 when a suite itself failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from typing import Any

from rich.console import Console

from benchmarks import SUITES
from benchmarks._report import SuiteResult, describe_machine, print_report

WIDE = 160  # when not on a terminal (CI logs, pasted reports), do not wrap at 80 columns


def main(argv: list[str] | None = None) -> int:
    """Run the suites and print the machine and the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run (default: all of {', '.join(SUITES)})",
    )
    parser.add_argument(
        "--hubs",
        type=int,
        metavar="N",
        help="simulated hubs for the cloud and rollout suites (default 10,000; fewer: a quick run)",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(unknown)}; known: {', '.join(SUITES)}")
    names = args.suites or list(SUITES)
    if args.hubs is not None and args.hubs < 2:
        parser.error("--hubs must be at least 2")
    # Options that only one suite takes, passed to its run() as keywords.
    options: dict[str, dict[str, Any]] = {"cloud": {}, "rollout": {}}
    if args.hubs is not None:
        options["cloud"]["hubs"] = args.hubs
        options["rollout"]["hubs"] = args.hubs

    console = Console(width=None if sys.stdout.isatty() else WIDE)
    machine = describe_machine()
    done: list[SuiteResult] = []
    failed: list[str] = []
    for name in names:
        started = time.monotonic()
        print(f"running suite {name} ...", file=sys.stderr, flush=True)
        result = SuiteResult(name=name)
        done.append(result)  # rows measured before a failure are still reported
        try:
            importlib.import_module(SUITES[name]).run(result, **options.get(name, {}))
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"suite {name} took {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    print_report(machine, done, console)
    if failed:
        console.print(f"[bold red]benchmark failed: {', '.join(failed)} (see above)[/bold red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
