"""The hub's artifact downloads over HTTP(S): resumable, retried, verified.

``HttpFetcher`` is a fetch function for ``ArtifactStore.stage``: given a recipe's artifact
it returns a local file holding it, downloaded into the store's ``tmp/downloads/``.

- What it downloads: a signed link handed to the hub with a deployment (``urls``: artifact
  URI → URL, the simplest form), an ``http(s)://`` URI as written in the recipe, or an
  ``edgeloop://components/<name>/<version>/<file>`` URI resolved against the cloud's API
  (``api_url``: the API's own authentication then applies, so the caller must be allowed
  to read that path; signed links need no such permission).
- Resume. Bytes are appended to ``<key>.part`` as they arrive, and the server's ETag is
  kept beside it (``<key>.json``). ``<key>`` is derived from the artifact's URI and
  digest, not from the link, so a fresh signed link continues the same file. After an
  interruption — a dropped connection, a timeout, or the agent restarting — the download
  goes on from the partial file's length with ``Range`` (and ``If-Range``, so a changed
  file starts over instead of being spliced).
- Retries. Network errors and 408/429/5xx answers are retried with capped, jittered
  exponential backoff; a retry that made progress starts the count again. 403 (an expired
  link) asks ``renew`` for a new link when one is given; otherwise it fails, keeping the
  partial file for the next attempt with a fresh link.
- Verification. When complete, the file is hashed with the recipe's algorithm; a mismatch
  discards it and raises ArtifactError naming the artifact, the expected and the actual
  digest. (A mismatch after a resumed download is retried once from zero first: the splice
  may be what went wrong.)
- TLS with the install's CA (``ca``) and, optionally, the hub's client certificate.

It blocks: run it in a worker thread from async code, as ``ArtifactStore.stage`` is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import httpx

from edgeloop.core.errors import ArtifactError
from edgeloop.core.registry_uri import API_PREFIX, is_registry_uri, parse_registry_uri
from edgeloop.edge.artifacts import ArtifactSpec

__all__ = ["HttpFetcher", "backoff", "remote_or_local"]

log = logging.getLogger("edgeloop.fetch")

DEFAULT_ATTEMPTS = 5
_CHUNK = 1 << 16
_MIN_BACKOFF = 0.5
_ALGORITHMS = {"SHA-256": "sha256", "SHA-1": "sha1", "SHA-384": "sha384", "SHA-512": "sha512"}
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
REMOTE_SCHEMES = frozenset({"http", "https", "edgeloop"})


def backoff(failures: int, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``failures`` failed attempts: exponential, capped, jittered
    over its upper half (so hubs that lost the cloud together do not return together)."""
    ceiling = min(max(cap, _MIN_BACKOFF), _MIN_BACKOFF * 2.0 ** min(failures, 20))
    return ceiling / 2 + rng() * ceiling / 2


class _Retry(Exception):
    """A failure worth another attempt (the message says what happened)."""


class _Expired(Exception):
    """403: the link is no longer (or never was) valid."""


class _StartOver(Exception):
    """The partial file cannot be continued; download from zero (not a failure)."""


class HttpFetcher:
    """Downloads artifacts into ``downloads`` (the store's ``ArtifactStore.downloads``)."""

    def __init__(
        self,
        downloads: Path,
        *,
        urls: Mapping[str, str] | None = None,
        api_url: str | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        renew: Callable[[str], str] | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_cap: float = 30.0,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.downloads = downloads
        self.urls = dict(urls or {})
        # The cloud's base URL; given with its /api/v1 too, it means the same.
        self.api_url = api_url.rstrip("/").removesuffix(API_PREFIX) if api_url else None
        self.renew = renew
        self.attempts = max(1, attempts)
        self.backoff_cap = backoff_cap
        self.sleep = sleep
        self.rng = rng
        downloads.mkdir(parents=True, exist_ok=True)
        verify: ssl.SSLContext | bool = True
        if ca is not None or cert is not None:
            verify = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
            if cert is not None:
                verify.load_cert_chain(str(cert), str(key) if key is not None else None)
        self._http = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            follow_redirects=True,
        )

    def __enter__(self) -> HttpFetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    # -- where ---------------------------------------------------------------------------

    def url_for(self, uri: str) -> str:
        """The URL an artifact URI is downloaded from."""
        given = self.urls.get(uri)
        if given is not None:
            return given
        scheme = uri.partition(":")[0].lower()
        if scheme in ("http", "https"):
            return uri
        if is_registry_uri(uri):
            try:
                ref = parse_registry_uri(uri)
            except ValueError as err:
                raise ArtifactError(str(err), field="Uri") from None
            if self.api_url is None:
                raise ArtifactError(
                    f"cannot fetch {uri}: the deployment gave no download link for it and "
                    "no cloud API is configured",
                    field="Uri",
                )
            return self.api_url + ref.artifact_path
        raise ArtifactError(
            f"cannot fetch {uri}: the hub downloads http://, https:// and edgeloop:// "
            "artifacts (give other files with --artifact-dir)",
            field="Uri",
        )

    def paths(self, spec: ArtifactSpec) -> tuple[Path, Path, Path]:
        """The partial file, its metadata, and the finished file of one artifact."""
        identity = f"{spec.uri}\n{spec.algorithm.upper()}\n{(spec.digest or '').strip()}"
        key = hashlib.sha256(identity.encode()).hexdigest()[:32]
        base = self.downloads / key
        return base.with_suffix(".part"), base.with_suffix(".json"), base.with_suffix(".done")

    # -- fetching ------------------------------------------------------------------------

    def __call__(self, spec: ArtifactSpec) -> Path:
        """Download ``spec`` (or finish downloading it) and return the verified file."""
        part, meta, done = self.paths(spec)
        if done.exists():
            if self._verified(spec, done):
                return done
            done.unlink(missing_ok=True)
        url = self.url_for(spec.uri)
        failures = 0
        renewed_at: int | None = None  # the partial's size when the link was last renewed
        spliced = False  # whether the file was put together from more than one response
        while True:
            before = _size(part)
            try:
                spliced = self._attempt(url, part, meta) or spliced
            except _StartOver as err:
                log.info("restarting the download of %s: %s", spec.uri, err)
                _discard(part, meta)
                spliced = False
                continue
            except _Expired as err:
                # A new link once per expiry; twice without progress means it is refused.
                if self.renew is None or renewed_at == _size(part):
                    raise ArtifactError(
                        f"cannot download {spec.uri} from {_shown(url)}: {err}{_kept(part)}",
                        field="Uri",
                    ) from None
                url, renewed_at = self.renew(spec.uri), _size(part)
                continue
            except _Retry as err:
                failures = 1 if _size(part) > before else failures + 1
                if failures >= self.attempts:
                    tries = f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}"
                    raise ArtifactError(
                        f"cannot download {spec.uri} from {_shown(url)}: {err} "
                        f"(after {tries}){_kept(part)}",
                        field="Uri",
                    ) from None
                delay = backoff(failures, self.backoff_cap, self.rng)
                log.info("download of %s failed (%s); retrying in %.1f s", spec.uri, err, delay)
                self.sleep(delay)
                continue
            try:
                self._verify(spec, part)
            except ArtifactError:
                _discard(part, meta)
                if spliced:
                    # The splice may be what went wrong (a file changed without a new
                    # ETag, a torn write): one more try, whole.
                    log.warning(
                        "%s did not match its digest after resuming; downloading it whole", spec.uri
                    )
                    spliced = False
                    continue
                raise
            os.replace(part, done)
            meta.unlink(missing_ok=True)
            return done

    def _attempt(self, url: str, part: Path, meta: Path) -> bool:
        """One request: add what arrives to ``part``; return when the file is whole.

        Returns whether it continued a partial file (rather than writing it from zero).
        """
        offset = _size(part)
        headers: dict[str, str] = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            etag = _read_meta(meta).get("etag")
            if etag:
                headers["If-Range"] = etag
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                return self._receive(response, part, meta, offset)
        except httpx.ConnectError as err:
            if "CERTIFICATE_VERIFY_FAILED" in str(err):
                # Not a passing fault: retrying cannot make the certificate trusted.
                raise ArtifactError(
                    f"cannot download {_shown(url)}: the server's certificate is not trusted "
                    f"({err}); is the hub's CA file the cloud's?",
                    field="Uri",
                ) from None
            raise _Retry(_transport_reason(err)) from None
        except httpx.TransportError as err:
            raise _Retry(_transport_reason(err)) from None

    def _receive(self, response: httpx.Response, part: Path, meta: Path, offset: int) -> bool:
        status = response.status_code
        total: int | None
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if match is None or int(match.group(1)) != offset:
                raise _StartOver("the server answered a different range than asked for")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        elif status == 200:
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            offset, mode = 0, "wb"
        elif status == 416 and offset:
            match = _UNSATISFIED.fullmatch(response.headers.get("content-range", "").strip())
            if match is not None and int(match.group(1)) == offset:
                return True  # the partial file is the whole file already
            raise _StartOver("the partial file is longer than the file on the server")
        elif status == 403:
            raise _Expired(f"the link was refused ({_reason(response)})")
        elif status in _RETRY_STATUS:
            raise _Retry(f"the server answered {status} ({_reason(response)})")
        else:
            raise ArtifactError(
                f"cannot download {_shown(str(response.url))}: the server answered {status} "
                f"({_reason(response)})",
                field="Uri",
            )
        etag = response.headers.get("etag")
        _write_meta(meta, {"etag": etag} if etag and not etag.startswith("W/") else {})
        received = offset
        with open(part, mode) as out:
            try:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
            finally:
                # What arrived stays, durable, for the next attempt to continue from.
                out.flush()
                os.fsync(out.fileno())
        if total is not None and received != total:
            raise _Retry(f"the download ended at {received} of {total} bytes")
        return mode == "ab" and offset > 0

    # -- verification ----------------------------------------------------------------------

    def _verified(self, spec: ArtifactSpec, path: Path) -> bool:
        try:
            self._verify(spec, path)
        except ArtifactError:
            return False
        return True

    def _verify(self, spec: ArtifactSpec, path: Path) -> None:
        if spec.digest is None:
            return  # nothing to check against; the store records the SHA-256 it gets
        name = _ALGORITHMS.get(re.sub(r"^SHA-?", "SHA-", spec.algorithm.strip().upper()))
        if name is None:
            raise ArtifactError(
                f"unsupported digest algorithm {spec.algorithm!r} for {spec.uri}",
                field="Algorithm",
            )
        hasher = hashlib.new(name)
        with open(path, "rb") as src:
            while chunk := src.read(1 << 20):
                hasher.update(chunk)
        actual = hasher.digest()
        expected = _decode(spec.digest.strip(), hasher.digest_size)
        if actual != expected:
            raise ArtifactError(
                f"digest mismatch for {spec.uri}: expected {spec.algorithm} "
                f"{spec.digest.strip()}, downloaded {base64.b64encode(actual).decode()} "
                f"({_size(path)} bytes); the download was discarded",
                field="Digest",
            )


def remote_or_local(
    remote: Callable[[ArtifactSpec], Path] | None,
    local: Callable[[ArtifactSpec], Path] | None,
) -> Callable[[ArtifactSpec], Path]:
    """One fetch function: http(s):// and edgeloop:// artifacts remote, the rest local."""

    def fetch(spec: ArtifactSpec) -> Path:
        remote_uri = spec.uri.partition(":")[0].lower() in REMOTE_SCHEMES
        chosen = remote if remote_uri else local
        if chosen is None:
            raise ArtifactError(
                f"no way to fetch {spec.uri}: "
                + ("no cloud to download from" if remote_uri else "no artifact folder given"),
                field="Uri",
            )
        return chosen(spec)

    return fetch


# -- helpers -----------------------------------------------------------------------------


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _kept(part: Path) -> str:
    size = _size(part)
    if not size:
        return ""
    return f"; the {size} bytes downloaded so far are kept, and the next attempt continues"


def _discard(part: Path, meta: Path) -> None:
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def _read_meta(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _write_meta(path: Path, data: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _decode(text: str, size: int) -> bytes:
    """A digest as Greengrass writes it (base64), or in hex."""
    if len(text) == 2 * size:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        altchars = b"-_" if "-" in text or "_" in text else None
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _shown(url: str) -> str:
    """A URL without its query: signatures do not belong in logs or error messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _reason(response: httpx.Response) -> str:
    try:
        response.read()
        body = response.json()
    except (ValueError, httpx.HTTPError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return response.reason_phrase or "no reason given"


def _transport_reason(err: httpx.TransportError) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, httpx.TimeoutException):
        return f"timed out ({text})"
    if isinstance(err, httpx.ConnectError):
        return f"cannot connect ({text})"
    return text
