"""How the cloud's component registry names artifacts, and where its API serves them.

Both ends of the wire agree on this: the cloud rewrites a published recipe's artifact URIs
to ``edgeloop://components/<name>/<version>/<file>``, and the hub turns such a URI into a
download from its cloud's API. The URI names *what* an artifact is, not *where* to get it:
the cloud's address and the short-lived signature a download needs are not part of an
immutable recipe (see ``edgeloop.cloud.components`` for why).

Paths under the API (``API_PREFIX`` + ...)::

    /components/<name>/versions/<version>/artifacts/<file>    the API's own authentication
    /components/<name>/versions/<version>/recipe
    /downloads/components/<name>/<version>/artifacts/<file>   ?expires=&thing=&signature=
    /downloads/components/<name>/<version>/recipe             ?expires=&thing=&signature=

Everything under ``/downloads/`` is authorised by its signature alone, so it works over
plain HTTP and for a client without a certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "API_PREFIX",
    "SCHEME",
    "SIGNATURE_PARAMS",
    "RegistryRef",
    "is_registry_uri",
    "parse_registry_uri",
    "recipe_path",
    "registry_uri",
    "signed_recipe_path",
]

API_PREFIX = "/api/v1"
SCHEME = "edgeloop"
_PREFIX = f"{SCHEME}://components/"
SIGNATURE_PARAMS = ("expires", "thing", "signature")


def _q(segment: str) -> str:
    return quote(segment, safe="")


@dataclass(frozen=True)
class RegistryRef:
    """One artifact of one published component version."""

    name: str
    version: str
    file: str

    @property
    def uri(self) -> str:
        """The artifact's URI as a published recipe spells it."""
        return registry_uri(self.name, self.version, self.file)

    @property
    def artifact_path(self) -> str:
        """Its download path under the API, authenticated as the API is."""
        return (
            f"{API_PREFIX}/components/{_q(self.name)}/versions/{_q(self.version)}"
            f"/artifacts/{_q(self.file)}"
        )

    @property
    def signed_path(self) -> str:
        """Its download path for signed links (the query string carries the signature)."""
        return (
            f"{API_PREFIX}/downloads/components/{_q(self.name)}/{_q(self.version)}"
            f"/artifacts/{_q(self.file)}"
        )


def registry_uri(name: str, version: str, file: str) -> str:
    """``edgeloop://components/<name>/<version>/<file>``.

    The file name stays as it is (not percent-encoded): a recipe artifact's file name is
    the last segment of its URI, taken literally, so encoding it would rename the file.
    """
    return f"{_PREFIX}{name}/{version}/{file}"


def is_registry_uri(uri: str) -> bool:
    """Whether ``uri`` uses the registry's scheme (well-formed or not)."""
    scheme, sep, _ = uri.partition(":")
    return bool(sep) and scheme.casefold() == SCHEME


def parse_registry_uri(uri: str) -> RegistryRef:
    """The component, version and file a registry URI names; ValueError saying why not."""
    if not is_registry_uri(uri):
        raise ValueError(f"{uri!r} is not an {SCHEME}:// URI")
    rest = uri.partition(":")[2]
    if not rest.startswith("//components/"):
        raise ValueError(f"{uri!r} must have the form {_PREFIX}<name>/<version>/<file>")
    parts = rest.removeprefix("//components/").split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{uri!r} must have the form {_PREFIX}<name>/<version>/<file>")
    return RegistryRef(*parts)


def recipe_path(name: str, version: str) -> str:
    """The published recipe's path under the API, authenticated as the API is."""
    return f"{API_PREFIX}/components/{_q(name)}/versions/{_q(version)}/recipe"


def signed_recipe_path(name: str, version: str) -> str:
    """The published recipe's path for signed links."""
    return f"{API_PREFIX}/downloads/components/{_q(name)}/{_q(version)}/recipe"
