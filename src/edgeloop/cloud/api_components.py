"""The component registry's REST routes, under /api/v1 (the twins of `cloud component …`).

Publishing over HTTP is two steps, so that an artifact is sent once and a large one never
rides inside a JSON document:

1. ``PUT /components/blobs/<sha256>`` with the file's bytes as the body, for each artifact
   the registry does not have yet (``GET /components/blobs/<sha256>`` says whether it does).
   The bytes must hash to the SHA-256 in the path.
2. ``POST /components`` with ``{"recipe": TEXT, "artifacts": {FILE: SHA256}}``; 201 when
   the version is new, 200 when it was already published with the same content, 409 when
   it was published with different content.

Downloads (``edgeloop.core.registry_uri`` has the paths) answer HTTP Range requests:
206 with Content-Range for one satisfiable range, 416 with ``Content-Range: bytes */SIZE``
for an unsatisfiable or malformed one, and a full 200 when ``If-Range`` no longer matches
the ETag (the blob's SHA-256). Signed links under ``/downloads/`` answer 403 naming why
(``signature``, ``expires``, ``thing``) when the signature is missing, wrong or expired.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from edgeloop.cloud.components import (
    ComponentRegistry,
    ComponentSummary,
    ComponentVersion,
    PublishedArtifact,
)
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.signing import (
    DEFAULT_LINK_LIFETIME,
    MAX_LINK_LIFETIME,
    SignatureError,
    artifact_resource,
    recipe_resource,
)
from edgeloop.core.errors import NotFoundError
from edgeloop.core.registry_uri import API_PREFIX, RegistryRef

__all__ = ["MAX_UPLOAD_BYTES", "component_router", "parse_range"]

# Uploads are held in memory while they are checked and stored (the object store takes
# whole objects), so they are capped.
MAX_UPLOAD_BYTES = 2 << 30


SignedParam = Annotated[str | None, Query(description="part of a signed link")]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class PublishComponent(_Request):
    recipe: str = Field(description="the recipe's text, JSON or YAML")
    format: Literal["json", "yaml"] | None = Field(
        default=None, description="default: JSON if the text starts with '{', else YAML"
    )
    artifacts: dict[str, str] = Field(
        default_factory=dict,
        description="artifact file name → SHA-256 of a blob uploaded with PUT "
        "/components/blobs/{sha256}",
    )
    source: str = Field(default="recipe", max_length=1024, description="names it in errors")


class IssueDownloads(_Request):
    thingName: str
    lifetime: int = Field(default=DEFAULT_LINK_LIFETIME, ge=1, le=MAX_LINK_LIFETIME)


class BlobOut(BaseModel):
    sha256: str
    size: int
    created: bool = False


class ArtifactOut(BaseModel):
    file: str
    uri: str
    sha256: str
    digest: str = Field(description="the SHA-256 in base64, as the recipe's Digest")
    algorithm: Literal["SHA-256"] = "SHA-256"
    size: int
    downloadPath: str


class ComponentVersionOut(BaseModel):
    componentName: str
    componentVersion: str
    description: str
    publisher: str
    createdAt: datetime
    recipeSha256: str
    size: int
    artifacts: list[ArtifactOut]
    recipe: dict[str, Any]


class PublishedOut(ComponentVersionOut):
    created: bool


class ComponentOut(BaseModel):
    componentName: str
    latestVersion: str
    versions: list[str]
    description: str
    publisher: str
    updatedAt: datetime


class ComponentList(BaseModel):
    components: list[ComponentOut]


class ComponentDetail(BaseModel):
    componentName: str
    versions: list[ComponentVersionOut]


class SignedArtifactOut(BaseModel):
    file: str
    uri: str
    url: str
    sha256: str
    size: int


class DownloadsOut(BaseModel):
    componentName: str
    componentVersion: str
    thingName: str
    expiresAt: datetime
    recipeUrl: str
    artifacts: list[SignedArtifactOut]


def _artifact_out(artifact: PublishedArtifact) -> ArtifactOut:
    return ArtifactOut(
        file=artifact.file,
        uri=artifact.uri,
        sha256=artifact.sha256,
        digest=artifact.digest,
        size=artifact.size,
        downloadPath=artifact.ref.artifact_path,
    )


def _version_out(version: ComponentVersion) -> ComponentVersionOut:
    return ComponentVersionOut(
        componentName=version.name,
        componentVersion=version.version,
        description=version.description,
        publisher=version.publisher,
        createdAt=version.created_at,
        recipeSha256=version.recipe_sha256,
        size=version.size,
        artifacts=[_artifact_out(a) for a in version.artifacts],
        recipe=version.recipe,
    )


def _component_out(summary: ComponentSummary) -> ComponentOut:
    return ComponentOut(
        componentName=summary.name,
        latestVersion=summary.latest,
        versions=list(summary.versions),
        description=summary.description,
        publisher=summary.publisher,
        updatedAt=summary.updated_at,
    )


# --- ranges -------------------------------------------------------------------------------


class RangeNotSatisfiable(Exception):
    """A Range header this resource cannot serve; the message says why."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``[first, last]`` a Range header asks for; None for the whole.

    Multiple ranges are answered whole (RFC 9110 lets a server ignore Range); a range in
    another unit is ignored; a malformed or unsatisfiable byte range raises
    RangeNotSatisfiable.
    """
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash or not (first_text or last_text):
        raise RangeNotSatisfiable(f"{header!r} is not bytes=FIRST-LAST, FIRST- or -SUFFIX")
    if not all(part.isdigit() for part in (first_text, last_text) if part):
        raise RangeNotSatisfiable(f"{header!r} is not bytes=FIRST-LAST, FIRST- or -SUFFIX")
    if not first_text:  # a suffix: the last N bytes
        length = int(last_text)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(f"{header!r} asks for no bytes of a {size}-byte file")
        return max(0, size - length), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        raise RangeNotSatisfiable(f"{header!r} ends before it starts")
    if first >= size:
        raise RangeNotSatisfiable(f"{header!r} starts at or past the end of a {size}-byte file")
    return first, min(last, size - 1)


def _range_error(reason: str, size: int) -> JSONResponse:
    body = {"error": "range", "field": "Range", "message": f"Range: {reason}"}
    return JSONResponse(body, status_code=416, headers={"Content-Range": f"bytes */{size}"})


def _forbidden(err: SignatureError) -> JSONResponse:
    body = {"error": "forbidden", "field": err.field, "message": f"{err.field}: {err.reason}"}
    return JSONResponse(body, status_code=403)


def _serve(
    components: ComponentRegistry, artifact: PublishedArtifact, request: Request
) -> Response:
    """The artifact's bytes, whole or the one range asked for, streamed from the store."""
    etag = f'"{artifact.sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(artifact.file, safe='')}",
    }
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's partial copy is of something else: send it all
    try:
        span = parse_range(wanted, artifact.size)
    except RangeNotSatisfiable as err:
        return _range_error(str(err), artifact.size)
    if span is None:
        body: Iterator[bytes] = components.read(artifact)
        headers["Content-Length"] = str(artifact.size)
        return StreamingResponse(body, media_type="application/octet-stream", headers=headers)
    first, last = span
    headers["Content-Range"] = f"bytes {first}-{last}/{artifact.size}"
    headers["Content-Length"] = str(last - first + 1)
    return StreamingResponse(
        components.read(artifact, first, last + 1),
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )


def _signature(expires: str | None, thing: str | None, signature: str | None) -> dict[str, Any]:
    return {"expires": expires, "thing": thing, "signature": signature}


# --- the routes ---------------------------------------------------------------------------


def component_router(ctx: CloudContext) -> APIRouter:
    """The component registry's routes over one running cloud."""
    components = ctx.components  # made now, before requests race to make it
    api = APIRouter(prefix=API_PREFIX, tags=["components"])

    # == blobs ===========================================================================

    @api.put(
        "/components/blobs/{sha256}",
        status_code=201,
        response_model=BlobOut,
        responses={413: {"description": "larger than MAX_UPLOAD_BYTES"}},
    )
    async def upload_blob(sha256: str, request: Request, response: Response) -> Any:
        """Upload an artifact's bytes (the request body); they must hash to ``sha256``.
        201 when stored now, 200 when the registry had them."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            return _too_large()
        chunks: list[bytes] = []
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_UPLOAD_BYTES:
                return _too_large()
            chunks.append(chunk)
        blob = await run_in_threadpool(
            components.put_blob, b"".join(chunks), expected_sha256=sha256
        )
        if not blob.created:
            response.status_code = 200
        return BlobOut(sha256=blob.sha256, size=blob.size, created=blob.created)

    @api.get("/components/blobs/{sha256}")
    def describe_blob(sha256: str) -> BlobOut:
        """Whether the registry has a blob (404 when not): skip uploading what it has."""
        blob = components.get_blob(sha256)
        if blob is None:
            raise NotFoundError("blob", sha256, "upload it with PUT")
        return BlobOut(sha256=blob.sha256, size=blob.size)

    # == versions ========================================================================

    @api.post("/components", status_code=201)
    def publish(body: PublishComponent, response: Response) -> PublishedOut:
        """Publish a recipe whose artifacts were uploaded (201; 200 when already published
        with the same content; 409 when with different content)."""
        published = components.publish(
            body.recipe, source=body.source, artifacts=body.artifacts, fmt=body.format
        )
        version = published.version
        if not published.created:
            response.status_code = 200
        response.headers["Location"] = (
            f"{API_PREFIX}/components/{quote(version.name, safe='')}/versions/"
            f"{quote(version.version, safe='')}"
        )
        return PublishedOut(**_version_out(version).model_dump(), created=published.created)

    @api.get("/components")
    def list_components(prefix: str = "") -> ComponentList:
        """Every component in name order, with its versions newest first."""
        return ComponentList(
            components=[_component_out(c) for c in components.list_components(prefix=prefix)]
        )

    @api.get("/components/{name}")
    def describe_component(name: str) -> ComponentDetail:
        """A component's versions, newest first, with their artifacts, digests and sizes."""
        versions = components.versions(name)
        return ComponentDetail(componentName=name, versions=[_version_out(v) for v in versions])

    @api.get("/components/{name}/versions/{version}")
    def describe_version(name: str, version: str) -> ComponentVersionOut:
        """One version: its recipe as published, its artifacts' digests and sizes."""
        return _version_out(components.get(name, version))

    @api.delete("/components/{name}/versions/{version}", status_code=204)
    def delete_version(name: str, version: str) -> Response:
        """Delete a version (409 naming the deployment when one uses it)."""
        components.delete(name, version)
        return Response(status_code=204)

    @api.get("/components/{name}/versions/{version}/recipe")
    def get_recipe(name: str, version: str) -> dict[str, Any]:
        """The recipe as published: what a hub installs."""
        return components.get(name, version).recipe

    @api.get("/components/{name}/versions/{version}/artifacts/{file}")
    def get_artifact(name: str, version: str, file: str, request: Request) -> Response:
        """An artifact's bytes; Range requests resume a download."""
        return _serve(components, components.artifact(name, version, file), request)

    @api.post("/components/{name}/versions/{version}/downloads")
    def issue_downloads(
        name: str, version: str, body: IssueDownloads, request: Request
    ) -> DownloadsOut:
        """Signed links for one thing to the version's recipe and artifacts; they work
        without the API's authentication until they expire."""
        ctx.registry.get_thing(body.thingName)  # 404 for an unknown thing
        links = components.links_for_thing(
            name,
            version,
            thing=body.thingName,
            base_url=str(request.base_url),
            lifetime=body.lifetime,
        )
        return DownloadsOut(
            componentName=links.name,
            componentVersion=links.version,
            thingName=links.thing,
            expiresAt=links.expires_at,
            recipeUrl=links.recipe_url,
            artifacts=[
                SignedArtifactOut(file=a.file, uri=a.uri, url=a.url, sha256=a.sha256, size=a.size)
                for a in links.artifacts
            ],
        )

    # == signed downloads ================================================================

    @api.get(
        "/downloads/components/{name}/{version}/artifacts/{file}",
        responses={403: {"description": "missing, altered or expired signature"}},
    )
    def signed_artifact(
        name: str,
        version: str,
        file: str,
        request: Request,
        expires: SignedParam = None,
        thing: SignedParam = None,
        signature: SignedParam = None,
    ) -> Response:
        """An artifact's bytes through a signed link; Range requests resume a download."""
        try:
            components.signer.verify(
                artifact_resource(RegistryRef(name, version, file)),
                _signature(expires, thing, signature),
            )
        except SignatureError as err:
            return _forbidden(err)
        return _serve(components, components.artifact(name, version, file), request)

    @api.get(
        "/downloads/components/{name}/{version}/recipe",
        responses={403: {"description": "missing, altered or expired signature"}},
    )
    def signed_recipe(
        name: str,
        version: str,
        expires: SignedParam = None,
        thing: SignedParam = None,
        signature: SignedParam = None,
    ) -> Any:
        """The recipe as published, through a signed link."""
        try:
            components.signer.verify(
                recipe_resource(name, version), _signature(expires, thing, signature)
            )
        except SignatureError as err:
            return _forbidden(err)
        return components.get(name, version).recipe

    return api


def _too_large() -> JSONResponse:
    body = {
        "error": "too_large",
        "field": "body",
        "message": f"body: an artifact may be at most {MAX_UPLOAD_BYTES} bytes",
    }
    return JSONResponse(body, status_code=413)
