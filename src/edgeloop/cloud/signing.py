"""Short-lived signed download links: HMAC-SHA256 over a resource, an expiry and a thing.

A link's query string carries ``expires`` (Unix seconds), ``thing`` (whom it was issued
to, for the record) and ``signature`` (base64url, unpadded) of::

    <resource>\n<expires>\n<thing>

where the resource names what is downloaded (``artifact_resource``, ``recipe_resource``),
not the URL path, so a proxy that re-encodes the path does not break it. The secret is
per install (``url-signing.key`` in the data folder, 0600), so links are checked without a
database lookup and work over plain HTTP for clients without a certificate.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from edgeloop.core.errors import EdgeloopError, ValidationError
from edgeloop.core.registry_uri import RegistryRef

__all__ = [
    "DEFAULT_LINK_LIFETIME",
    "MAX_LINK_LIFETIME",
    "SIGNING_KEY_FILE",
    "SignatureError",
    "UrlSigner",
    "artifact_resource",
    "check_lifetime",
    "recipe_resource",
]

SIGNING_KEY_FILE = "url-signing.key"
DEFAULT_LINK_LIFETIME = 15 * 60
MAX_LINK_LIFETIME = 7 * 24 * 3600  # S3's limit for pre-signed URLs, for the same reasons


class SignatureError(EdgeloopError):
    """A signed link is missing its signature, was altered, or expired; ``field`` says which."""

    def __init__(self, reason: str, *, field: str) -> None:
        self.reason = reason
        self.field = field
        super().__init__(reason)


class UrlSigner:
    """Signs and checks download links: HMAC-SHA256 over resource, expiry and thing."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("a URL-signing secret must be at least 16 bytes")
        self._secret = secret
        self.clock = clock

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, clock: Callable[[], float] = time.time) -> UrlSigner:
        """The install's signer; its secret is made on first use (0600, in ``data_dir``)."""
        return cls(_load_or_create_secret(data_dir / SIGNING_KEY_FILE), clock=clock)

    def _mac(self, resource: str, expires: int, thing: str) -> str:
        message = f"{resource}\n{expires}\n{thing}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def sign(
        self, resource: str, *, thing: str, lifetime: float = DEFAULT_LINK_LIFETIME
    ) -> dict[str, str]:
        """The query parameters that authorise ``resource`` for ``lifetime`` seconds."""
        check_lifetime(lifetime)
        expires = int(self.clock() + lifetime)
        return {
            "expires": str(expires),
            "thing": thing,
            "signature": self._mac(resource, expires, thing),
        }

    def expiry(self, params: Mapping[str, str]) -> datetime:
        """When links signed with ``params`` stop working."""
        return datetime.fromtimestamp(int(params["expires"]), UTC)

    def verify(self, resource: str, params: Mapping[str, str | None]) -> str:
        """The thing a valid link was issued to; SignatureError naming what is wrong."""
        for name in ("signature", "expires", "thing"):
            if not params.get(name):
                raise SignatureError(
                    f"the link has no {name}: download links must be signed by the cloud "
                    "(ask it for one, e.g. POST .../versions/<version>/downloads)",
                    field=name,
                )
        thing = str(params["thing"])
        try:
            expires = int(str(params["expires"]))
        except ValueError:
            raise SignatureError(
                f"expires {params['expires']!r} is not a Unix time in seconds", field="expires"
            ) from None
        expected = self._mac(resource, expires, thing)
        if not hmac.compare_digest(expected, str(params["signature"])):
            raise SignatureError(
                "the signature does not match: the link was altered, or signed by another "
                "install of the cloud",
                field="signature",
            )
        now = self.clock()
        if now >= expires:
            at = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
            raise SignatureError(
                f"the link expired at {at} ({now - expires:.0f} s ago); ask the cloud for a "
                "new one",
                field="expires",
            )
        return thing


def check_lifetime(lifetime: float) -> None:
    if not (1 <= lifetime <= MAX_LINK_LIFETIME):
        raise ValidationError(
            f"must be between 1 and {MAX_LINK_LIFETIME} seconds, not {lifetime}",
            field="lifetime",
        )


def _load_or_create_secret(path: Path) -> bytes:
    """Read the install's secret, making it first if there is none.

    Made beside its final name and linked into place, so two processes starting together
    agree on one secret (the second link fails and that process reads the first's).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        text = path.read_text()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)  # a secret readable by others signs links for anyone
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise ValidationError(
            "is not a hex secret of at least 16 bytes; delete it to make a new one (links "
            "signed before then stop working)",
            source=str(path),
        )
    return secret


def artifact_resource(ref: RegistryRef) -> str:
    """What a signed artifact link authorises (signed over, with its expiry and thing)."""
    return f"artifact\n{ref.name}\n{ref.version}\n{ref.file}"


def recipe_resource(name: str, version: str) -> str:
    """What a signed recipe link authorises."""
    return f"recipe\n{name}\n{version}"
