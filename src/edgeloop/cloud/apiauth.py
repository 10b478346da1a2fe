"""Who calls the API, and what they may do: client certificates for things, a token for operators.

With ``cloud up --tls`` the API serves HTTPS and asks every client for a certificate of
the install's CA (optional at the TLS layer, so that a caller without one gets an HTTP
answer that says what is missing rather than a failed handshake):

- a **thing** presents its device certificate; the certificate must be recorded in the
  registry, ACTIVE and attached to a thing. It may then use its own resources only (see
  :data:`THING_RULES`): read itself, its shadows, and what later services put under
  ``/things/{its name}/``. A revoked certificate is refused from the next request on,
  since every request looks the certificate up; a claim certificate is refused (claims
  only ask for an identity, over MQTT).
- an **operator** sends ``Authorization: Bearer <token>``; the token is kept in the data
  folder (``api-token``, mode 0600) and may do everything.

:data:`PUBLIC_PATHS` need neither (health, the OpenAPI description and docs, and downloads
authorized by a signature in their URL).

Without ``--tls`` the API is plain HTTP and open, which `cloud up` allows on loopback
only: whoever can reach a loopback port is a user of this machine.

The peer certificate reaches the app through the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``), which uvicorn does not fill in;
:class:`TlsAwareH11Protocol` adds it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeloop.core.errors import NotFoundError
from edgeloop.fileio import write_bytes_atomic

__all__ = [
    "PUBLIC_PATHS",
    "THING_RULES",
    "ApiAuth",
    "Caller",
    "TlsAwareH11Protocol",
    "load_or_create_token",
    "thing_may",
]

TOKEN_FILE = "api-token"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths anyone may call: health, the API's description, and signed downloads (the
# signature in the URL is their authorization).
PUBLIC_PATHS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^/api/v1/health$"),
    re.compile(r"^/(docs|redoc)(/.*)?$"),
    re.compile(r"^/openapi\.json$"),
    re.compile(r"^/api/v1/downloads/.+$"),
)


@dataclass(frozen=True)
class ThingRule:
    """Requests a thing may make about itself: ``{thing}`` in the pattern is its name."""

    methods: frozenset[str]
    pattern: str
    why: str


_READ = frozenset({"GET", "HEAD"})
_WRITE = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
THING_RULES: tuple[ThingRule, ...] = (
    ThingRule(_READ, r"/api/v1/things/{thing}", "its registry entry"),
    ThingRule(_WRITE, r"/api/v1/things/{thing}/shadows?(/.*)?", "its shadows"),
    ThingRule(_WRITE, r"/api/v1/things/{thing}/jobs(/.*)?", "its jobs"),
    ThingRule(_WRITE, r"/api/v1/things/{thing}/telemetry(/.*)?", "its telemetry"),
    ThingRule(
        _READ,
        r"/api/v1/things/{thing}/components/[^/]+/versions/[^/]+/downloads",
        "links to what its deployments install",
    ),
)


def thing_may(thing: str, method: str, path: str) -> bool:
    """Whether ``thing`` may make this request (one of :data:`THING_RULES` allows it)."""
    name = re.escape(thing)
    return any(
        method in rule.methods and re.fullmatch(rule.pattern.replace("{thing}", name), path)
        for rule in THING_RULES
    )


@dataclass(frozen=True)
class Caller:
    """Who made a request; ``name`` is the thing's name or ``"operator"``."""

    kind: Literal["operator", "thing", "local"]
    name: str
    certificate_id: str | None = None


def load_or_create_token(data_dir: Path) -> str:
    """The operators' API token of this install, made (0600) on first use."""
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = secrets.token_urlsafe(32)
        write_bytes_atomic(path, (token + "\n").encode(), mode=0o600)
    return token


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ApiAuth:
    """ASGI middleware: identifies the caller, refuses what it may not do.

    ``lookup(certificate_id)`` answers ``(kind, thing, status)`` of a recorded
    certificate and raises NotFoundError for an unknown one; it runs in a worker thread,
    as it reads the database.
    """

    def __init__(
        self,
        app: AsgiApp,
        *,
        token: str,
        lookup: Callable[[str], tuple[str, str | None, str]],
    ) -> None:
        self.app = app
        self._token = token.encode()
        self._lookup = lookup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or any(p.match(scope["path"]) for p in PUBLIC_PATHS):
            await self.app(scope, receive, send)
            return
        try:
            caller = await self._caller(scope)
            if caller.kind == "thing" and not thing_may(
                caller.name, scope["method"], scope["path"]
            ):
                raise _Refusal(
                    403,
                    f"thing {caller.name!r} may not {scope['method']} {scope['path']}: a "
                    "thing's certificate reaches only that thing's own resources",
                )
        except _Refusal as refusal:
            await _answer(send, refusal.status, refusal.message)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    async def _caller(self, scope: Scope) -> Caller:
        bearer = _bearer(scope)
        if bearer is not None:
            if not hmac.compare_digest(bearer.encode(), self._token):
                raise _Refusal(401, "the bearer token is not this cloud's operator token")
            return Caller("operator", "operator")
        chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
        if not chain:
            raise _Refusal(
                401,
                "this API needs a client certificate (a thing's, from this cloud's CA) or "
                "the operator token (Authorization: Bearer …, in the data folder's "
                f"{TOKEN_FILE})",
            )
        certificate_id = hashlib.sha256(ssl.PEM_cert_to_DER_cert(chain[0])).hexdigest()
        try:
            kind, thing, status = await anyio.to_thread.run_sync(self._lookup, certificate_id)
        except NotFoundError:
            raise _Refusal(
                403, f"certificate {certificate_id} is not registered with this cloud"
            ) from None
        if status != "ACTIVE":
            raise _Refusal(403, f"certificate {certificate_id} is {status}")
        if kind != "device" or thing is None:
            raise _Refusal(
                403,
                f"certificate {certificate_id} is a claim or belongs to no thing: it may only "
                "ask for an identity, over MQTT",
            )
        return Caller("thing", thing, certificate_id)


def _bearer(scope: Scope) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    return None


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="edgeloop"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TlsAwareH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, adding the ASGI TLS extension to every request."""

    def connection_made(self, transport: Any) -> None:  # the signature of asyncio.Protocol
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        tls: dict[str, Any] = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": None,
            "cipher_suite": None,
        }
        app = self.app

        async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("extensions", {})["tls"] = tls
            await app(scope, receive, send)

        self.app = with_tls
