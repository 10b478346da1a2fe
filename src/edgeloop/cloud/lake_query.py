"""Read-only SQL over the lake: DuckDB on the Parquet files of one snapshot of the manifest.

Each query gets a fresh in-memory DuckDB with two views, ``telemetry`` and
``quarantine``, over the files the manifest listed when the query began (so a
compaction that commits meanwhile changes nothing it sees). Before the statement runs the
connection is locked down: file access only under the lake's folders, no configuration
change afterwards. Only one statement, a SELECT (``WITH ... SELECT`` included), is run.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from edgeloop.cloud.lake_rows import QUARANTINE_SCHEMA, TELEMETRY_SCHEMA
from edgeloop.core.errors import ValidationError

__all__ = ["DEFAULT_TIMEOUT", "check_select", "run_query"]

DEFAULT_TIMEOUT = 60.0
VIEWS = {"telemetry": TELEMETRY_SCHEMA, "quarantine": QUARANTINE_SCHEMA}


def check_select(sql: str) -> None:
    """Raise ValidationError (field ``sql``) unless ``sql`` is one SELECT statement."""
    if not isinstance(sql, str) or not sql.strip():
        raise ValidationError("is empty: give a SELECT statement", field="sql")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise ValidationError(_first_line(err), field="sql") from err
    if len(statements) != 1:
        raise ValidationError(
            f"has {len(statements)} statements; give exactly one SELECT", field="sql"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise ValidationError(
            f"is a {kind.name} statement; the lake answers SELECT (or WITH ... SELECT) only",
            field="sql",
        )


def run_query(
    sql: str,
    files: Mapping[str, Sequence[Path]],
    *,
    allowed: Sequence[Path],
    timeout: float = DEFAULT_TIMEOUT,
    threads: int | None = None,
) -> pa.Table:
    """Run one SELECT over views of ``files`` (view name -> Parquet paths), as Arrow."""
    check_select(sql)
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        for view, schema in VIEWS.items():
            paths = [str(p) for p in files.get(view, ())]
            if paths:
                listing = ", ".join(_quote(p) for p in paths)
                con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet([{listing}])")
            else:
                con.register(f"_{view}_empty", schema.empty_table())
                con.execute(f"CREATE VIEW {view} AS SELECT * FROM _{view}_empty")
        dirs = ", ".join(_quote(str(d).rstrip("/") + "/") for d in allowed)
        con.execute(f"SET allowed_directories = [{dirs}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        timer = threading.Timer(timeout, con.interrupt)
        timer.start()
        try:
            relation = con.sql(sql)
            # to_arrow_table since DuckDB 1.4 (arrow() before, a reader from 2.0 on).
            fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
            table = fetch()
        except duckdb.InterruptException as err:
            raise ValidationError(
                f"took longer than {timeout:g} s and was stopped; narrow it (a WHERE on "
                "date or thing, a LIMIT)",
                field="sql",
            ) from err
        except duckdb.Error as err:
            raise ValidationError(_first_line(err), field="sql") from err
        finally:
            timer.cancel()
        return table
    finally:
        con.close()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
