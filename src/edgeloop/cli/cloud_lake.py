"""`edgeloop cloud lake …`: query the telemetry lake with SQL, and keep it in shape."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgeloop.cli._common import JsonOption, console, one_line_errors, print_json
from edgeloop.cli.cloud import CloudClient, UrlOption

__all__ = ["lake_app"]

lake_app = typer.Typer(
    help="Query the telemetry lake with SQL; see its size, compact it, apply retention.",
    no_args_is_help=True,
)

_QUERY_HELP = (
    "One SELECT over the views telemetry (thing, stream, sequence, kit, appliance, sensors, "
    "device_time, kit_seq, label, hub_time, ingest_time, date) and quarantine (thing, "
    "stream, sequence, reason, field, payload, hub_time, ingest_time, source, date). "
    "A sensor: sensors['temp_c']."
)


@lake_app.command("query")
@one_line_errors
def lake_query(
    sql: Annotated[str, typer.Argument(help=_QUERY_HELP, show_default=False)],
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Rows to show at most.")] = 1000,
    timeout: Annotated[
        float, typer.Option(min=0.1, max=600, help="Seconds the query may run.")
    ] = 60.0,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a read-only SQL query over the lake (DuckDB's dialect)."""
    with CloudClient(url) as api:
        answer = api.call(
            "POST",
            "/lake/query",
            json_body={"sql": sql, "limit": limit, "timeout": timeout},
            fields={"limit": "--limit", "timeout": "--timeout"},
        )
    names = [column["name"] for column in answer["columns"]]
    if as_json:
        print_json([dict(zip(names, row, strict=True)) for row in answer["rows"]])
        return
    table = Table(*(escape(name) for name in names))
    for row in answer["rows"]:
        table.add_row(*(escape(_cell(value)) for value in row))
    console.print(table)
    shown = len(answer["rows"])
    note = f"{answer['rowCount']} row" + ("" if answer["rowCount"] == 1 else "s")
    if answer["truncated"]:
        note += f", the first {shown} shown (--limit)"
    console.print(note, style="dim", highlight=False)


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@lake_app.command("stats")
@one_line_errors
def lake_stats(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Files, rows and bytes of the lake's tables, from its manifest."""
    with CloudClient(url) as api:
        stats = api.call("GET", "/lake/stats")
    if as_json:
        print_json(stats)
        return
    table = Table("table", "rows", "files", "small files", "size", "partitions", "dates")
    for name in ("telemetry", "quarantine"):
        part = stats[name]
        dates = f"{part['first_date']} … {part['last_date']}" if part["first_date"] else "—"
        table.add_row(
            name,
            f"{part['rows']:,}",
            f"{part['files']:,}",
            f"{part['small_files']:,}",
            _size(part["bytes"]),
            f"{part['partitions']:,}",
            dates,
        )
    console.print(table)
    console.print(
        f"{stats['things']} things, {stats['streams']} streams, "
        f"{stats['sequences_held']:,} sequence numbers held; "
        f"{stats['retired_files']} retired files awaiting deletion; in {escape(stats['store'])}",
        highlight=False,
    )


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


@lake_app.command("compact")
@one_line_errors
def lake_compact(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Merge each partition's small files into big ones.

    Queries see the old files or the new one, never both; the old ones are deleted after a
    grace period, so queries already reading them finish.
    """
    with CloudClient(url) as api:
        result = api.call("POST", "/lake/compact")
    if as_json:
        print_json(result)
        return
    console.print(
        f"{result['files_before']} files in {result['partitions']} partitions merged into "
        f"{result['files_after']} ({result['rows']:,} rows); "
        f"{result['deleted_objects']} old objects deleted",
        highlight=False,
    )


@lake_app.command("retention")
@one_line_errors
def lake_retention(
    days: Annotated[
        int,
        typer.Option("--days", min=0, help="Keep the last N days (UTC); drop older partitions."),
    ],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Drop partitions older than --days days.

    Telemetry is dated by its device time, the quarantine by arrival (UTC). Dropped
    readings stay known: a late copy of one is counted as a duplicate, not taken back.
    """
    with CloudClient(url) as api:
        result = api.call(
            "POST", "/lake/retention", json_body={"days": days}, fields={"days": "--days"}
        )
    if as_json:
        print_json(result)
        return
    console.print(
        f"dropped {result['partitions']} partitions before {result['cutoff']}: "
        f"{result['files']} files, {result['rows']:,} rows",
        highlight=False,
    )
