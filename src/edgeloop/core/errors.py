"""The one error hierarchy of edgeloop.

    EdgeloopError                  every error edgeloop raises on purpose
    ├── ValidationError            bad input: names where (file), what (field) and why
    │   ├── RecipeError            a component recipe is invalid
    │   ├── ConfigurationError     a configuration update or JSON pointer is invalid
    │   └── ArtifactError          an artifact is missing, corrupt or unsafe
    ├── ResolutionError            component versions cannot be resolved (names the clash)
    ├── DeploymentError            a deployment could not be applied
    ├── ComponentError             a component is unknown or in the wrong state
    ├── AgentError                 the hub's agent is unreachable or answered with an error
    ├── ShadowError                a device shadow request was rejected (AWS code + message)
    ├── NotFoundError              a named resource (thing, group, certificate, ...) does not exist
    ├── ConflictError              the request clashes with what exists (a duplicate, a revoked
    │                              certificate, a resource still in use)
    ├── CloudError                 the cloud is unreachable or answered with an error
    └── PkiError                   a certificate or key cannot be issued, parsed or verified

Foreign errors are translated once, at the boundary: ``raise RecipeError(...) from err``.
"""

from __future__ import annotations


class EdgeloopError(Exception):
    """Base of every error edgeloop raises on purpose."""


class ValidationError(EdgeloopError):
    """Bad input; the message names the source, the field and the reason."""

    def __init__(self, reason: str, *, source: str | None = None, field: str | None = None):
        self.reason = reason
        self.source = source
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = ": ".join(part for part in (self.source, self.field) if part)
        return f"{where}: {self.reason}" if where else self.reason


class RecipeError(ValidationError):
    """A component recipe is invalid."""


class ConfigurationError(ValidationError):
    """A configuration update, or a JSON pointer in one, is invalid."""


class ArtifactError(ValidationError):
    """An artifact is missing, does not match its digest, or is unsafe to unpack."""


class ResolutionError(EdgeloopError):
    """The requested components have no set of versions that satisfies every requirement."""


class DeploymentError(EdgeloopError):
    """A deployment could not be applied."""


class ComponentError(EdgeloopError):
    """A component is unknown, or not in a state that allows the request."""


class AgentError(EdgeloopError):
    """The hub's agent is unreachable, or answered a request with an error."""


class ShadowError(EdgeloopError):
    """A device shadow request was rejected, with AWS IoT's HTTP-style code and message.

    ``to_document`` renders the error document AWS publishes on ``.../rejected`` topics.
    """

    def __init__(self, code: int, message: str, *, client_token: str | None = None):
        self.code = code
        self.message = message
        self.client_token = client_token
        super().__init__(f"{code}: {message}")

    def to_document(self, timestamp: int) -> dict[str, object]:
        """AWS's error response document: code, message, timestamp and any clientToken."""
        document: dict[str, object] = {
            "code": self.code,
            "message": self.message,
            "timestamp": timestamp,
        }
        if self.client_token is not None:
            document["clientToken"] = self.client_token
        return document


class NotFoundError(EdgeloopError):
    """A named resource does not exist; the message names its kind and name."""

    def __init__(self, kind: str, name: str, hint: str = "") -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"no {kind} named {name!r}" + (f" ({hint})" if hint else ""))


class ConflictError(EdgeloopError):
    """The request clashes with the current state (a duplicate, a resource in use, ...)."""


class CloudError(EdgeloopError):
    """The cloud is unreachable, or answered a request with an error."""


class PkiError(EdgeloopError):
    """A certificate or key cannot be issued, parsed or verified."""
