"""The telemetry lake's REST routes, under /api/v1: uploads from hubs, and SQL for operators.

``POST /things/{thing}/telemetry`` takes one batch as the body, in the encoding of
``edgeloop.core.telemetry`` (gzipped or not; ``Content-Encoding: gzip`` may say so but
the bytes decide). With an ``Idempotency-Key`` header, a retried upload gets the answer
the first one got (and ``Idempotent-Replayed: true``), even when that answer was lost on
the way; without one a retry is still harmless, its records counted as duplicates. A key
used again for different content is refused (409). A body that cannot be read as a batch
is refused (400, ``field`` naming where: ``body``, ``header.thing``, ``records[7]``) and
changes nothing; readings that break the schema are kept in the quarantine table and
counted, not refused.

``POST /lake/query`` runs one SELECT over the views ``telemetry`` and ``quarantine``;
``GET /lake/stats``, ``POST /lake/compact`` and ``POST /lake/retention`` are the upkeep.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from decimal import Decimal
from typing import Annotated, Any

import pyarrow as pa
from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.lake import IngestResult
from edgeloop.cloud.lake_query import DEFAULT_TIMEOUT

__all__ = ["MAX_BATCH_BODY", "lake_router"]

# The same prefix as edgeloop.cloud.api's (which imports this module).
API_PREFIX = "/api/v1"
# A compressed batch body; its decompressed size has its own cap in the decoder.
MAX_BATCH_BODY = 32 * 1024 * 1024
MAX_QUERY_ROWS = 100_000


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LakeQuery(_Request):
    sql: str = Field(description="one SELECT (or WITH ... SELECT) over telemetry, quarantine")
    limit: int = Field(default=1000, ge=1, le=MAX_QUERY_ROWS, description="rows answered")
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, le=600, description="seconds")


class Retention(_Request):
    days: int = Field(ge=0, description="keep partitions of the last N days (UTC), drop older")


class IngestOut(BaseModel):
    thing: str
    stream: str
    received: int = Field(description="records in the batch")
    accepted: int = Field(description="readings the lake took now")
    duplicates: int = Field(description="records it already held (or repeated in the batch)")
    quarantined: int = Field(description="records kept in the quarantine table, with why")
    replayed: bool = Field(description="the answer first given to this Idempotency-Key")


class Column(BaseModel):
    name: str
    type: str


class QueryOut(BaseModel):
    columns: list[Column]
    rows: list[list[Any]]
    rowCount: int = Field(description="rows the query gave (rows holds at most `limit`)")
    truncated: bool


def _ingest_out(result: IngestResult) -> IngestOut:
    return IngestOut(**result.to_json())


def lake_router(ctx: CloudContext) -> APIRouter:
    """The lake's routes over one running cloud."""
    from edgeloop.cloud.api import ErrorBody  # here: api imports this module

    lake = ctx.lake  # made now, before requests race to make it
    registry = ctx.registry
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "bad input; `field` names what is wrong"},
    }
    api = APIRouter(prefix=API_PREFIX, tags=["lake"], responses=errors)

    @api.post(
        "/things/{thing}/telemetry",
        responses={
            404: {"model": ErrorBody, "description": "no such thing"},
            409: {"model": ErrorBody, "description": "the key was used for another batch"},
            413: {"model": ErrorBody, "description": "a body over 32 MiB"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def upload_telemetry(
        thing: str,
        request: Request,
        response: Response,
        idempotency_key: Annotated[
            str | None,
            Header(alias="Idempotency-Key", description="names the batch across retries"),
        ] = None,
    ) -> Any:
        """Ingest one batch: each new record once, readings that break the schema to the
        quarantine; the counts say what became of them."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BATCH_BODY:
            return _too_large()
        chunks: list[bytes] = []
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_BATCH_BODY:
                return _too_large()
            chunks.append(chunk)
        body = b"".join(chunks)

        def ingest() -> IngestResult:
            registry.get_thing(thing)  # 404 for a thing the registry does not know
            return lake.ingest_bytes(body, thing=thing, idempotency_key=idempotency_key)

        result = await run_in_threadpool(ingest)
        if result.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return _ingest_out(result)

    @api.post("/lake/query")
    def query(body: LakeQuery) -> QueryOut:
        """Rows of one SELECT over the views ``telemetry`` and ``quarantine`` (read-only)."""
        table = lake.query(body.sql, timeout=body.timeout)
        shown = table.slice(0, body.limit)
        return QueryOut(
            columns=[Column(name=f.name, type=str(f.type)) for f in table.schema],
            rows=_json_rows(shown),
            rowCount=table.num_rows,
            truncated=table.num_rows > body.limit,
        )

    @api.get("/lake/stats")
    def stats() -> dict[str, Any]:
        """Files, rows and bytes of both tables, from the manifest."""
        return lake.stats().to_json()

    @api.post("/lake/compact")
    def compact() -> dict[str, Any]:
        """Merge each partition's small files; old files go after the grace period."""
        return lake.compact().to_json()

    @api.post("/lake/retention")
    def retention(body: Retention) -> dict[str, Any]:
        """Drop partitions older than ``days`` days."""
        return lake.retain(body.days).to_json()

    return api


def _too_large() -> JSONResponse:
    return JSONResponse(
        {
            "error": "too_large",
            "field": "body",
            "message": f"a batch body is at most {MAX_BATCH_BODY} bytes: send smaller batches",
        },
        status_code=413,
    )


def _json_rows(table: pa.Table) -> list[list[Any]]:
    columns = [_json_value(column.to_pylist(), column.type) for column in table.columns]
    return [list(row) for row in zip(*columns, strict=True)] if columns else []


def _json_value(values: list[Any], kind: pa.DataType) -> list[Any]:
    if pa.types.is_map(kind):
        return [None if v is None else {str(k): _plain(x) for k, x in v} for v in values]
    return [_plain(v) for v in values]


def _plain(value: Any) -> Any:
    """A value JSON can carry: times and intervals in ISO 8601, bytes in base64, NaN and
    ±inf as null."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, pa.MonthDayNano):  # an interval: ISO 8601
        return f"P{value.months}M{value.days}DT{value.nanoseconds / 1e9:g}S"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)
