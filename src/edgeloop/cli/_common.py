"""What every command shares: one-line errors, JSON output, the hub's root option."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from edgeloop.core.errors import EdgeloopError
from edgeloop.edge.settings import default_root

P = ParamSpec("P")
R = TypeVar("R")

console = Console()
err_console = Console(stderr=True)

RootOption = Annotated[
    Path,
    typer.Option(
        "--root",
        help="The hub's folder (default: $EDGELOOP_ROOT, else a per-user folder).",
        default_factory=default_root,
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def one_line_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn edgeloop's errors into one line on stderr and exit code 1, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except EdgeloopError as err:
            err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def print_json(data: Any) -> None:
    """Machine-readable output."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
