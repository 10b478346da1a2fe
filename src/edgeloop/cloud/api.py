"""The cloud's REST API (FastAPI): the twin of every ``edgeloop cloud`` command, under /api/v1.

``create_app(ctx)`` builds the app over a ``CloudContext``. Errors are mapped to HTTP in
one place, the exception handlers at the bottom of ``create_app``::

    ValidationError, request validation   400 {"error": "validation", "field", "message"}
    PkiError                              400 {"error": "pki", "field": null, "message"}
    NotFoundError                         404 {"error": "not_found", "message"}
    ConflictError                         409 {"error": "conflict", "message"}
    ShadowError                           its code, AWS's error document
    CloudError (database unreachable)     503 {"error": "unavailable", "message"}

Handlers that only call the registry are plain ``def``: the registry is synchronous, so
FastAPI runs them in its thread pool. Shadow handlers are ``async def`` on purpose: a
``ShadowBook`` is not thread-safe and is shared with the MQTT shadow service, so it is
only ever called from the event loop (its calls never await, so they never interleave).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeloop import __version__
from edgeloop.cloud.api_components import component_router
from edgeloop.cloud.api_deployments import deployments_router
from edgeloop.cloud.api_jobs import jobs_router
from edgeloop.cloud.api_lake import lake_router
from edgeloop.cloud.api_ml import ml_router
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.pki import IssuedCertificate, load_certificate
from edgeloop.cloud.registry import MAX_PAGE, Certificate, Thing
from edgeloop.core.errors import (
    CloudError,
    ConflictError,
    NotFoundError,
    PkiError,
    ShadowError,
    ValidationError,
)
from edgeloop.core.shadow import parse_payload
from edgeloop.core.shadowbook import MAX_PAGE_SIZE as MAX_SHADOW_PAGE

__all__ = ["API_PREFIX", "create_app"]

log = logging.getLogger("edgeloop.cloud.api")

API_PREFIX = "/api/v1"

# --- request bodies ------------------------------------------------------------------------
# Strict and closed: a misspelt field is refused by name instead of silently ignored.

AttributeMap = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"type": ["string", "number", "boolean"]},
            "description": "a flat map of attribute name → string, number or boolean",
        }
    ),
]
AttributePatch = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
            "description": "attributes to set; null deletes one",
        }
    ),
]
ShadowUpdateSchema: dict[str, Any] = {
    "type": "object",
    "description": "AWS IoT's shadow update document",
    "properties": {
        "state": {
            "type": "object",
            "properties": {"desired": {"type": "object"}, "reported": {"type": "object"}},
        },
        "version": {"type": "integer"},
        "clientToken": {"type": "string"},
    },
}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class CreateThing(_Request):
    thingName: str
    thingType: str | None = None
    attributes: AttributeMap | None = None


class UpdateAttributes(_Request):
    attributes: AttributePatch
    expectedVersion: int | None = Field(default=None, ge=1)


class CreateGroup(_Request):
    thingGroupName: str
    kind: Literal["static", "dynamic"] = "static"
    query: str | None = None
    description: str = Field(default="", max_length=2048)


class IssueCertificate(_Request):
    csrPem: str | None = Field(
        default=None,
        description="a PEM CSR; without one (and without certificatePem) the "
        "cloud generates a key and returns it once",
    )
    certificatePem: str | None = Field(
        default=None,
        description="register this certificate instead, signed by a registered CA (or ours)",
    )


class RevokeCertificate(_Request):
    reason: str = Field(default="unspecified", min_length=1, max_length=256)


class RotateCertificate(_Request):
    csrPem: str | None = None
    revokeOld: bool = False


class RegisterCa(_Request):
    pem: str


class CreateClaim(_Request):
    template: str
    description: str = Field(default="", max_length=2048)


# --- responses -----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str
    message: str
    field: str | None = None


class ShadowErrorBody(BaseModel):
    code: int
    message: str
    timestamp: int
    clientToken: str | None = None


class ThingOut(BaseModel):
    thingName: str
    thingType: str | None
    attributes: dict[str, str | int | float | bool]
    version: int
    createdAt: datetime
    updatedAt: datetime


class ThingPageOut(BaseModel):
    things: list[ThingOut]
    nextToken: str | None


class ConnectivityOut(BaseModel):
    connected: bool
    since: datetime | None = None
    clientId: str | None = None
    disconnectReason: str | None = None


class CertificateSummary(BaseModel):
    certificateId: str
    kind: str
    status: str
    createdAt: datetime
    revokedAt: datetime | None


class ThingDetail(ThingOut):
    groups: list[str]
    connectivity: ConnectivityOut
    certificates: list[CertificateSummary]


class GroupOut(BaseModel):
    thingGroupName: str
    kind: Literal["static", "dynamic"]
    query: str | None
    description: str
    createdAt: datetime


class GroupList(BaseModel):
    groups: list[GroupOut]


class GroupDetail(GroupOut):
    members: list[str]


class MembershipOut(BaseModel):
    thingGroupName: str
    thingName: str
    member: bool
    changed: bool


class CertificateOut(BaseModel):
    certificateId: str
    thingName: str | None
    kind: str
    status: str
    serial: str = Field(description="decimal; a string because it exceeds 2^53")
    issuer: str
    createdAt: datetime
    revokedAt: datetime | None
    revokeReason: str | None
    certificatePem: str


class RevokedOut(CertificateOut):
    brokerNotified: bool = Field(description="false: the broker refuses it from its next start")


class IssuedOut(BaseModel):
    certificateId: str
    thingName: str | None
    kind: str
    status: str
    serial: str
    notBefore: datetime
    notAfter: datetime
    certificatePem: str
    chainPem: str
    privateKeyPem: str | None = Field(description="only when the cloud made the key; not kept")


class RotationOut(BaseModel):
    certificate: IssuedOut
    previous: CertificateOut
    brokerNotified: bool


class ClaimOut(IssuedOut):
    template: str
    templateCreated: bool


class CaOut(BaseModel):
    caId: str
    pem: str
    createdAt: datetime


class CaList(BaseModel):
    cas: list[CaOut]


class FleetResult(BaseModel):
    things: list[str]
    count: int


class NamedShadows(BaseModel):
    results: list[str]
    nextToken: str | None
    timestamp: int


class DatabaseHealth(BaseModel):
    ok: bool
    dialect: str
    message: str | None = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str
    database: DatabaseHealth


# --- conversions ---------------------------------------------------------------------------


def _thing_out(thing: Thing) -> ThingOut:
    return ThingOut(
        thingName=thing.name,
        thingType=thing.thing_type,
        attributes=thing.attributes,
        version=thing.version,
        createdAt=thing.created_at,
        updatedAt=thing.updated_at,
    )


def _certificate_out(cert: Certificate) -> CertificateOut:
    return CertificateOut(
        certificateId=cert.certificate_id,
        thingName=cert.thing,
        kind=cert.kind,
        status=cert.status,
        serial=str(cert.serial),
        issuer=cert.issuer,
        createdAt=cert.created_at,
        revokedAt=cert.revoked_at,
        revokeReason=cert.revoke_reason,
        certificatePem=cert.pem,
    )


def _issued_out(issued: IssuedCertificate, recorded: Certificate) -> IssuedOut:
    return IssuedOut(
        certificateId=recorded.certificate_id,
        thingName=recorded.thing,
        kind=recorded.kind,
        status=recorded.status,
        serial=str(recorded.serial),
        notBefore=issued.not_before,
        notAfter=issued.not_after,
        certificatePem=issued.certificate_pem.decode(),
        chainPem=issued.chain_pem.decode(),
        privateKeyPem=issued.private_key_pem.decode() if issued.private_key_pem else None,
    )


@contextmanager
def _fields(renamed: Mapping[str, str], *, pki: str | None = None) -> Iterator[None]:
    """Report the registry's field names as this API's (and a PkiError as field ``pki``)."""
    try:
        yield
    except ValidationError as err:
        if err.field is None or err.field not in renamed:
            raise
        raise ValidationError(err.reason, source=err.source, field=renamed[err.field]) from err
    except PkiError as err:
        if pki is None:
            raise
        raise ValidationError(str(err), field=pki) from err


def _request_error(exc: RequestValidationError) -> ErrorBody:
    """FastAPI's validation error as ours: the first problem, its field path named."""
    errors = list(exc.errors())
    if not errors:
        return ErrorBody(error="validation", field=None, message="the request is invalid")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    where, path = (loc[0], loc[1:]) if loc else ("body", [])
    if first.get("type") == "json_invalid":
        field = "body"
        detail = (first.get("ctx") or {}).get("error", "")
        message = f"body: not valid JSON at character {path[0] if path else '?'}: {detail}"
    else:
        field = ".".join(path) if path else where
        message = f"{field}: {first.get('msg', 'is invalid')}"
        kind = first.get("type")
        if kind == "extra_forbidden":
            message = f"{field}: is not a field of this request"
        elif where == "body" and not path:
            message = (
                "body: a JSON object is required"
                if kind == "missing"
                else "body: must be a JSON object (sent as application/json)"
            )
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ErrorBody(error="validation", field=field, message=message)


def _error(status_code: int, body: ErrorBody) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status_code)


# --- the app -------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad input; `field` names what is wrong"},
    404: {"model": ErrorBody, "description": "no such resource"},
    409: {"model": ErrorBody, "description": "clashes with what exists"},
}
_SHADOW_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ShadowErrorBody, "description": "AWS IoT's shadow error document"}
    for code in (400, 404, 409, 413, 415)
}


def create_app(ctx: CloudContext) -> FastAPI:
    """The API over one running cloud."""
    app = FastAPI(
        title="edgeloop cloud",
        version=__version__,
        description="Fleet registry, PKI, provisioning claims, fleet queries and device "
        "shadows of a self-hosted edgeloop cloud.",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    registry = ctx.registry
    api = APIRouter(prefix=API_PREFIX, responses=_ERRORS)

    # == things ==========================================================================

    @api.post("/things", status_code=201, tags=["things"])
    def create_thing(body: CreateThing, response: Response) -> ThingOut:
        """Register a thing (409 when the name is taken)."""
        with _fields({"thingTypeName": "thingType"}):
            thing = registry.create_thing(
                body.thingName, body.attributes, thing_type=body.thingType
            )
        response.headers["Location"] = f"{API_PREFIX}/things/{thing.name}"
        return _thing_out(thing)

    @api.get("/things", tags=["things"])
    def list_things(
        prefix: str = "",
        pageSize: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        nextToken: str | None = None,
    ) -> ThingPageOut:
        """Things in name order, a page at a time; pass ``nextToken`` on for the next."""
        page = registry.list_things(prefix=prefix, after=nextToken, limit=pageSize)
        return ThingPageOut(things=[_thing_out(t) for t in page.things], nextToken=page.next_token)

    @api.get("/things/{name}", tags=["things"])
    def describe_thing(name: str) -> ThingDetail:
        """A thing with its groups, connectivity and certificates."""
        thing = registry.get_thing(name)
        seen = registry.connectivity(name)
        connectivity = (
            ConnectivityOut(
                connected=seen.connected,
                since=seen.since,
                clientId=seen.client_id,
                disconnectReason=seen.disconnect_reason,
            )
            if seen is not None
            else ConnectivityOut(connected=False)
        )
        certificates = [
            CertificateSummary(
                certificateId=cert.certificate_id,
                kind=cert.kind,
                status=cert.status,
                createdAt=cert.created_at,
                revokedAt=cert.revoked_at,
            )
            for cert in registry.list_certificates(thing=name)
        ]
        return ThingDetail(
            **_thing_out(thing).model_dump(),
            groups=registry.groups_of(name),
            connectivity=connectivity,
            certificates=certificates,
        )

    @api.patch("/things/{name}/attributes", tags=["things"])
    def update_attributes(name: str, body: UpdateAttributes) -> ThingOut:
        """Merge attributes (null deletes one); 409 when ``expectedVersion`` is stale."""
        thing = registry.update_attributes(
            name, body.attributes, expected_version=body.expectedVersion
        )
        return _thing_out(thing)

    @api.delete("/things/{name}", status_code=204, tags=["things"])
    async def delete_thing(name: str) -> Response:
        """Delete a thing; its shadows, memberships and connectivity go, its certificates
        become INACTIVE."""
        await run_in_threadpool(registry.delete_thing, name)
        # The book keeps every thing's shadows it has served in memory; without this a
        # thing created again under the name would show the deleted one's shadows. Done
        # here, on the event loop, where every other book call runs.
        ctx.shadows.forget(name)
        return Response(status_code=204)

    # == groups ==========================================================================

    @api.post("/groups", status_code=201, tags=["groups"])
    def create_group(body: CreateGroup, response: Response) -> GroupDetail:
        """Create a static group, or a dynamic one: a saved fleet query (``query``)."""
        with _fields({"queryString": "query"}):
            group = registry.create_group(
                body.thingGroupName, kind=body.kind, query=body.query, description=body.description
            )
        response.headers["Location"] = f"{API_PREFIX}/groups/{group.name}"
        return _group_detail(group.name)

    @api.get("/groups", tags=["groups"])
    def list_groups() -> GroupList:
        """Every thing group, in name order."""
        return GroupList(groups=[_group_out(group.name) for group in registry.list_groups()])

    @api.get("/groups/{name}", tags=["groups"])
    def describe_group(name: str) -> GroupDetail:
        """A group and its members (a dynamic group's current matches)."""
        return _group_detail(name)

    @api.delete("/groups/{name}", status_code=204, tags=["groups"])
    def delete_group(name: str) -> Response:
        """Delete a group; its things stay."""
        registry.delete_group(name)
        return Response(status_code=204)

    @api.put("/groups/{name}/things/{thing}", tags=["groups"])
    def add_to_group(name: str, thing: str) -> MembershipOut:
        """Add a thing to a static group (409 for a dynamic one); idempotent."""
        changed = registry.add_to_group(name, thing)
        return MembershipOut(thingGroupName=name, thingName=thing, member=True, changed=changed)

    @api.delete("/groups/{name}/things/{thing}", tags=["groups"])
    def remove_from_group(name: str, thing: str) -> MembershipOut:
        """Remove a thing from a static group; idempotent."""
        changed = registry.remove_from_group(name, thing)
        return MembershipOut(thingGroupName=name, thingName=thing, member=False, changed=changed)

    def _group_out(name: str) -> GroupOut:
        group = registry.get_group(name)
        return GroupOut(
            thingGroupName=group.name,
            kind=group.kind,
            query=group.query,
            description=group.description,
            createdAt=group.created_at,
        )

    def _group_detail(name: str) -> GroupDetail:
        return GroupDetail(**_group_out(name).model_dump(), members=registry.group_members(name))

    # == certificates ====================================================================

    @api.post("/things/{name}/certificates", status_code=201, tags=["certificates"])
    def issue_certificate(name: str, body: IssueCertificate) -> IssuedOut:
        """Issue a certificate for a thing (for a CSR, or a new key returned once), or
        register one signed by a registered CA. Recorded ACTIVE."""
        if body.csrPem is not None and body.certificatePem is not None:
            raise ValidationError("give csrPem or certificatePem, not both", field="certificatePem")
        registry.get_thing(name)  # 404 before any work
        if body.certificatePem is not None:
            return _register(name, body.certificatePem)
        with _fields({}, pki="csrPem"):
            issued = ctx.ca.issue_device_certificate(
                name, csr_pem=body.csrPem.encode() if body.csrPem is not None else None
            )
        recorded = registry.record_certificate(issued.certificate_pem, thing=name)
        return _issued_out(issued, recorded)

    def _register(name: str, pem: str) -> IssuedOut:
        cas = [ca.pem.encode() for ca in registry.list_cas()]
        with _fields({}, pki="certificatePem"):
            identity = ctx.ca.identify(pem.encode(), cas)
            if identity.kind != "thing" or identity.name != name:
                raise ValidationError(
                    f"the certificate's CN names {identity.kind} {identity.name!r}, not "
                    f"thing {name!r}",
                    field="certificatePem",
                )
            recorded = registry.record_certificate(pem, thing=name)
        cert = load_certificate(recorded.pem.encode())
        return IssuedOut(
            certificateId=recorded.certificate_id,
            thingName=recorded.thing,
            kind=recorded.kind,
            status=recorded.status,
            serial=str(recorded.serial),
            notBefore=cert.not_valid_before_utc,
            notAfter=cert.not_valid_after_utc,
            certificatePem=recorded.pem,
            chainPem="",
            privateKeyPem=None,
        )

    @api.get("/certificates/{certificateId}", tags=["certificates"])
    def describe_certificate(certificateId: str) -> CertificateOut:
        """A recorded certificate by its id (the SHA-256 fingerprint)."""
        return _certificate_out(registry.get_certificate(certificateId))

    @api.post("/certificates/{certificateId}/revoke", tags=["certificates"])
    async def revoke_certificate(
        certificateId: str, body: Annotated[RevokeCertificate | None, Body()] = None
    ) -> RevokedOut:
        """Revoke a certificate for good; the broker is told to refuse it from now on."""
        reason = body.reason if body is not None else "unspecified"
        cert = await run_in_threadpool(registry.revoke_certificate, certificateId, reason=reason)
        notified = await _notify_broker()
        return RevokedOut(**_certificate_out(cert).model_dump(), brokerNotified=notified)

    @api.post("/certificates/{certificateId}/rotate", status_code=201, tags=["certificates"])
    async def rotate_certificate(
        certificateId: str, body: Annotated[RotateCertificate | None, Body()] = None
    ) -> RotationOut:
        """Issue a new certificate for the same thing (its attributes, groups and shadows
        stay), optionally revoking the old one."""
        request = body if body is not None else RotateCertificate()
        old = await run_in_threadpool(registry.get_certificate, certificateId)
        if old.kind != "device" or old.thing is None:
            raise ConflictError(
                f"certificate {old.certificate_id} belongs to no thing"
                + (" (a claim: create a new claim instead)" if old.kind == "claim" else "")
            )
        if old.status == "REVOKED":
            raise ConflictError(
                f"certificate {old.certificate_id} is revoked: issue a new one with "
                f"POST {API_PREFIX}/things/{old.thing}/certificates"
            )
        thing = old.thing
        csr = request.csrPem.encode() if request.csrPem is not None else None

        def issue_and_record() -> tuple[IssuedCertificate, Certificate]:
            with _fields({}, pki="csrPem"):
                issued = ctx.ca.issue_device_certificate(thing, csr_pem=csr)
            return issued, registry.record_certificate(issued.certificate_pem, thing=thing)

        issued, recorded = await run_in_threadpool(issue_and_record)
        previous, notified = old, False
        if request.revokeOld:
            try:
                previous = await run_in_threadpool(
                    registry.revoke_certificate, old.certificate_id, reason="superseded"
                )
            except ConflictError:
                # Revoked by someone else meanwhile: the end state asked for.
                previous = await run_in_threadpool(registry.get_certificate, old.certificate_id)
            notified = await _notify_broker()
        return RotationOut(
            certificate=_issued_out(issued, recorded),
            previous=_certificate_out(previous),
            brokerNotified=notified,
        )

    async def _notify_broker() -> bool:
        # The revocation is committed; a broker that cannot reload now still reads the
        # CRL when it next starts, so this is logged rather than failing the request.
        try:
            await ctx.revoked()
        except Exception:
            log.exception("could not hand the new CRL to the broker")
            return False
        return True

    @api.post("/cas", status_code=201, tags=["certificates"])
    def register_ca(body: RegisterCa) -> CaOut:
        """Register a CA whose certificates may then be registered for things."""
        with _fields({}, pki="pem"):
            ca = registry.add_ca(body.pem)
        return CaOut(caId=ca.fingerprint, pem=ca.pem, createdAt=ca.created_at)

    @api.get("/cas", tags=["certificates"])
    def list_cas() -> CaList:
        """Registered CAs, oldest first."""
        return CaList(
            cas=[
                CaOut(caId=ca.fingerprint, pem=ca.pem, createdAt=ca.created_at)
                for ca in registry.list_cas()
            ]
        )

    # == claims ==========================================================================

    @api.post("/claims", status_code=201, tags=["claims"])
    def create_claim(body: CreateClaim) -> ClaimOut:
        """A claim certificate and key for a factory image: it may only ask, through
        ``template``, for a real identity. The template is created if missing."""
        issued = ctx.ca.issue_claim_certificate(body.template)  # checks the name first
        created = False
        try:
            registry.get_claim_template(body.template)
        except NotFoundError:
            try:
                with _fields({"templateName": "template"}):
                    registry.create_claim_template(body.template, description=body.description)
                created = True
            except ConflictError:
                pass  # created meanwhile by another request: just as good
        recorded = registry.record_certificate(issued.certificate_pem, kind="claim")
        return ClaimOut(
            **_issued_out(issued, recorded).model_dump(),
            template=body.template,
            templateCreated=created,
        )

    # == fleet ===========================================================================

    @api.get("/fleet/query", tags=["fleet"])
    def fleet_query(
        q: Annotated[str, Query(description="a fleet query, e.g. 'attributes.model:pi4'")],
    ) -> FleetResult:
        """Names of the things matching a fleet query; a bad query names the position."""
        with _fields({"queryString": "q"}):
            names = registry.fleet_query(q)
        return FleetResult(things=names, count=len(names))

    # == shadows (async: see the module docstring) =======================================

    @api.get("/things/{name}/shadow", tags=["shadows"], responses=_SHADOW_ERRORS)
    async def get_classic_shadow(name: str) -> dict[str, Any]:
        """The classic shadow, as AWS's GetThingShadow returns it."""
        return ctx.shadows.get(name, "")

    @api.get("/things/{name}/shadows", tags=["shadows"], responses=_SHADOW_ERRORS)
    async def list_named_shadows(
        name: str,
        pageSize: Annotated[int, Query(ge=1, le=MAX_SHADOW_PAGE)] = 25,
        nextToken: str | None = None,
    ) -> NamedShadows:
        """The thing's named shadows, as AWS's ListNamedShadowsForThing returns them."""
        names, token = ctx.shadows.list_named(name, pageSize, nextToken)
        return NamedShadows(results=names, nextToken=token, timestamp=ctx.shadows.now())

    @api.get("/things/{name}/shadows/{shadowName}", tags=["shadows"], responses=_SHADOW_ERRORS)
    async def get_named_shadow(name: str, shadowName: str) -> dict[str, Any]:
        """A named shadow, as AWS's GetThingShadow returns it."""
        return ctx.shadows.get(name, shadowName)

    update_body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ShadowUpdateSchema}},
        }
    }

    @api.post(
        "/things/{name}/shadow",
        tags=["shadows"],
        responses=_SHADOW_ERRORS,
        openapi_extra=update_body,
    )
    async def update_classic_shadow(name: str, request: Request) -> dict[str, Any]:
        """Update the classic shadow; answers AWS's accepted document."""
        return await _update(name, "", request)

    @api.post(
        "/things/{name}/shadows/{shadowName}",
        tags=["shadows"],
        responses=_SHADOW_ERRORS,
        openapi_extra=update_body,
    )
    async def update_named_shadow(name: str, shadowName: str, request: Request) -> dict[str, Any]:
        """Update a named shadow; answers AWS's accepted document."""
        return await _update(name, shadowName, request)

    @api.delete("/things/{name}/shadow", tags=["shadows"], responses=_SHADOW_ERRORS)
    async def delete_classic_shadow(name: str, request: Request) -> dict[str, Any]:
        """Delete the classic shadow (an optional body may carry ``version``)."""
        return await _delete(name, "", request)

    @api.delete("/things/{name}/shadows/{shadowName}", tags=["shadows"], responses=_SHADOW_ERRORS)
    async def delete_named_shadow(name: str, shadowName: str, request: Request) -> dict[str, Any]:
        """Delete a named shadow (an optional body may carry ``version``)."""
        return await _delete(name, shadowName, request)

    async def _update(thing: str, shadow: str, request: Request) -> dict[str, Any]:
        body = parse_payload(await request.body())
        with _client_token(body):
            return ctx.shadows.update(thing, shadow, body).accepted

    async def _delete(thing: str, shadow: str, request: Request) -> dict[str, Any]:
        body = parse_payload(await request.body())
        with _client_token(body):
            return ctx.shadows.delete(thing, shadow, body)

    # == health ==========================================================================

    @api.get("/health", tags=["health"], responses={503: {"model": Health}})
    def health() -> Any:
        """Whether the database answers, and the version running."""
        try:
            ctx.db.check()
        except CloudError as err:
            down = Health(
                status="unavailable",
                version=__version__,
                database=DatabaseHealth(ok=False, dialect=ctx.db.dialect, message=str(err)),
            )
            return JSONResponse(down.model_dump(), status_code=503)
        return Health(
            status="ok",
            version=__version__,
            database=DatabaseHealth(ok=True, dialect=ctx.db.dialect),
        )

    app.include_router(api)
    app.include_router(component_router(ctx))
    app.include_router(jobs_router(ctx))
    app.include_router(deployments_router(ctx))
    app.include_router(lake_router(ctx))
    app.include_router(ml_router(ctx))

    # == errors: the one place they become HTTP ==========================================

    @app.exception_handler(ValidationError)
    async def on_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return _error(400, ErrorBody(error="validation", field=exc.field, message=str(exc)))

    @app.exception_handler(RequestValidationError)
    async def on_request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _request_error(exc))

    @app.exception_handler(PkiError)
    async def on_pki(_: Request, exc: PkiError) -> JSONResponse:
        return _error(400, ErrorBody(error="pki", message=str(exc)))

    @app.exception_handler(NotFoundError)
    async def on_not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return _error(404, ErrorBody(error="not_found", message=str(exc)))

    @app.exception_handler(ConflictError)
    async def on_conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return _error(409, ErrorBody(error="conflict", message=str(exc)))

    @app.exception_handler(ShadowError)
    async def on_shadow(_: Request, exc: ShadowError) -> JSONResponse:
        return JSONResponse(exc.to_document(ctx.shadows.now()), status_code=exc.code)

    @app.exception_handler(CloudError)
    async def on_cloud(_: Request, exc: CloudError) -> JSONResponse:
        return _error(503, ErrorBody(error="unavailable", message=str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = ErrorBody(error="http", message=str(exc.detail))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


@contextmanager
def _client_token(body: Mapping[str, Any]) -> Iterator[None]:
    """Echo the request's clientToken in a rejection that lacks it, as AWS does."""
    try:
        yield
    except ShadowError as err:
        token = body.get("clientToken")
        if err.client_token is None and isinstance(token, str):
            err.client_token = token
        raise


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, without FastAPI's 422 answers: this API answers 400 instead."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
