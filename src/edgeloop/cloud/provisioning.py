"""Provisioning by claim, on AWS IoT's fleet-provisioning MQTT API.

A factory image holds a claim certificate (``CN=claim:<template>``, see
``edgeloop.cloud.pki``) that may only ask for a real identity. Devices written for AWS IoT
fleet provisioning (the ``awsiot.iotidentity`` clients, the Greengrass provisioning
plugin) work unchanged; only the JSON payload format is served.

Topics (requests; answers go to the request topic plus ``/accepted`` or ``/rejected``)::

    $aws/certificates/create/json                       {}
        accepted: {certificateId, certificatePem, privateKey, certificateOwnershipToken}
    $aws/certificates/create-from-csr/json              {certificateSigningRequest}
        accepted: {certificateId, certificatePem, certificateOwnershipToken}
    $aws/provisioning-templates/{T}/provision/json      {certificateOwnershipToken,
                                                         parameters: {str: str}}
        accepted: {deviceConfiguration: {str: str}, thingName}
    edgeloop/certificates/{CN}/rotate                   {certificateId,
                                                         certificateSigningRequest}
        accepted: {certificateId, certificatePem, thingName}
    rejected (all four): {statusCode, errorCode, errorMessage}

The fourth is edgeloop's, not AWS's: see "Rotation" below.

=====================  ======  ====================================================
rejection              status  errorCode
=====================  ======  ====================================================
not a claim identity   403     Unauthorized
(rotate: not an interim        (rotate: the topic's CN, the certificate's CN, its
certificate)                   status or its thing do not fit)
create turned off      403     Unauthorized (``allow_create_keys=False``)
claim of another T     403     InvalidTemplate
T not registered       404     InvalidTemplate
payload not JSON/shape 400     InvalidPayload
bad CSR                400     InvalidCertificateSigningRequest
token empty, unknown,  400     InvalidCertificateOwnershipToken (AWS's code; its
used or expired                message for an empty one is copied)
hook refused or failed 403     AccessDenied (AWS: a hook that fails or does not allow
                               provisioning fails the request with ACCESS_DENIED)
no usable thing name,  400     ResourceRegistrationFailure
bad attribute, thing
of another template
too many pending       429     Throttling
anything else          500     InternalFailure
=====================  ======  ====================================================

Certificates. A created certificate is *pending*: held here, in memory, with its
single-use ownership token, and not recorded in the registry (which has no pending
state and cannot attach a recorded certificate to a thing later), so the API and
``Registry.is_active`` refuse it. A provision call with the token records it ACTIVE and
attached to the thing and spends the token; a refused or failed one leaves it usable.
Tokens expire after ``token_ttl`` seconds (AWS: one hour); a restart forgets pending
certificates, and the device starts over, as AWS devices do when a token has expired.
Because the certificate exists before its thing is named, its CN is a provisional
``cert:<32 hex>`` rather than the thing name: see the closing note of
:class:`ProvisioningService`.

Rotation. Mosquitto takes a device's username (the ACL's ``%u``) from its certificate's
CN, so an interim ``cert:<hex>`` certificate cannot use its thing's topics. Once
provisioned, the device connects with it and publishes a CSR on
``edgeloop/certificates/<its CN>/rotate`` (the broker lets each certificate write only
its own CN's topic, claims none); the answer is a certificate whose CN is the thing the
interim one was attached to, recorded ACTIVE for that thing, and the interim certificate
turns INACTIVE (in the registry: the broker checks only the CRL, so it could still
connect, to no avail: it can write only its rotate topic, and rotation refuses it now).
Only the CSR form exists: no private key crosses the wire.

Thing naming (the registry's claim templates have no configuration column yet, so this
is fixed, plus :class:`TemplateRules` given to the service): the ``thingName`` parameter
if present, else ``<template>-<SerialNumber>``; parameters are read after the hook's
overrides. Attributes: the parameters the template's rules list (default: every
parameter but ``thingName``), plus ``provisioningTemplate: <template>``. Provisioning a
name that exists is idempotent when that thing came from the same template (attributes
are merged, the new certificate is attached, the thing name is the same); a thing made
otherwise is refused, so a claim cannot take over an unrelated thing. Within one
template, whoever holds its claim can re-provision any serial (as on AWS): a hook that
checks serials against an allowlist is what stops that.

Pre-provisioning hook: a callable ``(template, parameters) -> HookDecision``, given to
the service, or else the template's ``hook`` — a command line run by
:func:`command_hook` (AWS's Lambda hook as a local executable: JSON request on stdin,
``{"allowProvisioning": bool, "parameterOverrides": {...}, "reason": "..."}`` on stdout).

Audit: accepted provisioning writes the registry (``thing.created`` / ``thing.updated``,
``certificate.recorded`` events); creations and refusals are logged on
``edgeloop.cloud.provisioning``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.registry import ClaimTemplate, Thing, check_thing_name
from edgeloop.core.errors import (
    CloudError,
    ConflictError,
    EdgeloopError,
    NotFoundError,
    PkiError,
    ValidationError,
)

__all__ = [
    "PROVISIONAL_CN_PREFIX",
    "REQUEST_FILTERS",
    "ROTATE_FILTER",
    "ClientIdentity",
    "HookDecision",
    "PreProvisioningHook",
    "ProvisioningRequest",
    "ProvisioningService",
    "TemplateRules",
    "command_hook",
    "parse_decision",
    "parse_request_topic",
    "rotate_topic",
]

log = logging.getLogger("edgeloop.cloud.provisioning")

REQUEST_FILTERS = (
    "$aws/certificates/create/+",
    "$aws/certificates/create-from-csr/+",
    "$aws/provisioning-templates/+/provision/+",
)
ROTATE_FILTER = "edgeloop/certificates/+/rotate"
PROVISIONAL_CN_PREFIX = "cert:"
TEMPLATE_ATTRIBUTE = "provisioningTemplate"
THING_NAME_PARAMETER = "thingName"
SERIAL_PARAMETER = "SerialNumber"
DEFAULT_HOOK_TIMEOUT = 5.0  # AWS: the hook must return within 5 seconds

_CREATE = re.compile(r"^\$aws/certificates/(create|create-from-csr)/([^/]+)$")
_PROVISION = re.compile(r"^\$aws/provisioning-templates/([^/]+)/provision/([^/]+)$")
_ROTATE = re.compile(r"^edgeloop/certificates/([^/]+)/rotate$")

Publish = Callable[[str, bytes], None]
Operation = Literal["create", "create-from-csr", "provision", "rotate"]


@dataclass(frozen=True)
class ClientIdentity:
    """Who published a request, as the transport knows it.

    ``name`` is the template of a claim (``""``: some claim, the transport cannot tell
    which — accepted for the create requests only) or the thing's name. A given
    ``certificate_id`` must be an ACTIVE claim certificate in the registry.
    """

    kind: Literal["claim", "thing"]
    name: str
    certificate_id: str | None = None


@dataclass(frozen=True)
class HookDecision:
    """A pre-provisioning hook's answer; ``parameter_overrides`` replace device parameters."""

    allow: bool
    parameter_overrides: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""


PreProvisioningHook = Callable[[str, Mapping[str, str]], HookDecision]


@dataclass(frozen=True, kw_only=True)
class TemplateRules:
    """What a template makes of parameters: which become attributes, what config is sent."""

    attributes: tuple[str, ...] | None = None  # None: every parameter but thingName
    device_configuration: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProvisioningRequest:
    """A request topic, taken apart."""

    topic: str
    operation: Operation
    payload_format: str  # "json" (served) or "cbor" (not)
    template: str | None  # the provision topic's template
    common_name: str | None = None  # the rotate topic's certificate CN


def rotate_topic(common_name: str) -> str:
    """Where the holder of the interim certificate ``common_name`` asks for its final one."""
    return f"edgeloop/certificates/{common_name}/rotate"


def parse_request_topic(topic: str) -> ProvisioningRequest | None:
    """The request a topic carries, or None when it is none of ours (answers included)."""
    match = _CREATE.match(topic)
    if match is not None:
        operation: Operation = "create" if match.group(1) == "create" else "create-from-csr"
        return ProvisioningRequest(topic, operation, match.group(2), None)
    match = _PROVISION.match(topic)
    if match is not None:
        return ProvisioningRequest(topic, "provision", match.group(2), match.group(1))
    match = _ROTATE.match(topic)
    if match is not None:
        return ProvisioningRequest(topic, "rotate", "json", None, match.group(1))
    return None


class _Rejected(EdgeloopError):
    """A request refused with AWS's error document; never leaves this module."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{status} {code}: {message}")

    def document(self) -> dict[str, object]:
        return {"statusCode": self.status, "errorCode": self.code, "errorMessage": self.message}


@dataclass(frozen=True)
class _Pending:
    certificate_id: str
    certificate_pem: str
    template: str | None  # the claim's template, when the transport told
    expires_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _dump(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _parse_body(payload: bytes, *, empty_ok: bool) -> dict[str, Any]:
    if empty_ok and not payload.strip():
        return {}
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as err:
        raise _Rejected(400, "InvalidPayload", f"the payload is not JSON: {err}") from err
    if not isinstance(body, dict):
        raise _Rejected(400, "InvalidPayload", "the payload must be a JSON object")
    return body


def _string_map(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Rejected(400, "InvalidPayload", f"{where} must be an object of string values")
    for key, item in value.items():
        if not isinstance(item, str):
            raise _Rejected(
                400,
                "InvalidPayload",
                f"{where}.{key} must be a string (AWS parameters are a string-to-string map), "
                f"not {type(item).__name__}",
            )
    return dict(value)


class ProvisioningService:
    """Answers fleet-provisioning requests from claim certificates, as AWS IoT does.

    ``handle`` is synchronous and may wait for a hook (up to its timeout): call it from a
    worker thread, not an event loop. It is safe to call from several threads.

    A certificate made by ``create`` exists before the provision call names its thing, so
    its CN is ``cert:<hex>``; the device then rotates it for one named after its thing
    (see "Rotation" in the module docstring), which is what the broker's ACL keys on.
    """

    def __init__(
        self,
        ctx: CloudContext,
        publish: Publish,
        *,
        hook: PreProvisioningHook | None = None,
        token_ttl: float = 300,
        clock: Callable[[], float] = time.time,
        rules: Mapping[str, TemplateRules] | None = None,
        max_pending: int = 10_000,
        allow_create_keys: bool = True,
    ) -> None:
        if token_ttl <= 0:
            raise ValidationError("must be a positive number of seconds", field="token_ttl")
        self.ctx = ctx
        self.publish = publish
        self.hook = hook
        self.token_ttl = float(token_ttl)
        self.clock = clock
        self.rules = dict(rules or {})
        self.max_pending = max_pending
        self.allow_create_keys = allow_create_keys
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._rotating = threading.Lock()  # one rotation at a time: a CN rotates once

    @property
    def pending_count(self) -> int:
        """Certificates created and not yet provisioned nor expired."""
        with self._lock:
            self._prune(self.clock())
            return len(self._pending)

    def handle(self, topic: str, payload: bytes, *, client: ClientIdentity) -> bool:
        """Serve one message; False when ``topic`` is not a fleet-provisioning request."""
        request = parse_request_topic(topic)
        if request is None:
            return False
        if request.payload_format != "json":
            # A rejected answer would have to be CBOR too, which the device expects.
            log.warning(
                "ignored a fleet-provisioning request on %s: only the json payload format "
                "is served (publish to the .../json topic)",
                topic,
            )
            return True
        try:
            if request.operation == "provision":
                assert request.template is not None
                answer = self._provision(request.template, payload, client)
            elif request.operation == "rotate":
                assert request.common_name is not None
                answer = self._rotate(request.common_name, payload, client)
            else:
                answer = self._create(request.operation, payload, client)
        except _Rejected as err:
            log.warning("refused %s from %s: %s", topic, _who(client), err)
            self.publish(f"{topic}/rejected", _dump(err.document()))
        except Exception:
            log.exception("fleet-provisioning request on %s from %s failed", topic, _who(client))
            failure = _Rejected(500, "InternalFailure", "the cloud failed; try again later")
            self.publish(f"{topic}/rejected", _dump(failure.document()))
        else:
            self.publish(f"{topic}/accepted", _dump(answer))
        return True

    # -- the three operations ---------------------------------------------------------------

    def _create(
        self, operation: Operation, payload: bytes, client: ClientIdentity
    ) -> dict[str, str]:
        template = self._authorize(client, None)
        if operation == "create" and not self.allow_create_keys:
            raise _Rejected(
                403,
                "Unauthorized",
                "CreateKeysAndCertificate ($aws/certificates/create/json) is turned off on this "
                "cloud: its answer carries a private key, and on a shared broker answers reach "
                "every connected claim holder. Use CreateCertificateFromCsr "
                "($aws/certificates/create-from-csr/json) with a key made on the device.",
            )
        body = _parse_body(payload, empty_ok=operation == "create")
        csr: bytes | None = None
        if operation == "create-from-csr":
            raw = body.get("certificateSigningRequest")
            if not isinstance(raw, str) or not raw.strip():
                raise _Rejected(
                    400, "InvalidPayload", "certificateSigningRequest must be a PEM CSR string"
                )
            csr = raw.encode()
        now = self.clock()
        with self._lock:
            self._prune(now)
            if len(self._pending) >= self.max_pending:
                raise _Rejected(
                    429,
                    "Throttling",
                    f"{len(self._pending)} certificates await provisioning; retry later",
                )
        cn = PROVISIONAL_CN_PREFIX + secrets.token_hex(16)
        try:
            issued = self.ctx.ca.issue_device_certificate(cn, csr_pem=csr)
        except PkiError as err:
            if csr is None:
                raise
            raise _Rejected(400, "InvalidCertificateSigningRequest", str(err)) from err
        token = secrets.token_urlsafe(48)
        pending = _Pending(
            certificate_id=issued.certificate_id,
            certificate_pem=issued.certificate_pem.decode(),
            template=template.name if template is not None else None,
            expires_at=now + self.token_ttl,
        )
        with self._lock:
            self._pending[_digest(token)] = pending
        log.info(
            "created pending certificate %s for %s; it must be provisioned within %g s",
            issued.certificate_id,
            _who(client),
            self.token_ttl,
        )
        answer = {
            "certificateId": issued.certificate_id,
            "certificatePem": pending.certificate_pem,
            "certificateOwnershipToken": token,
        }
        if issued.private_key_pem is not None:
            answer["privateKey"] = issued.private_key_pem.decode()
        return answer

    def _provision(self, name: str, payload: bytes, client: ClientIdentity) -> dict[str, Any]:
        template = self._authorize(client, name)
        assert template is not None
        body = _parse_body(payload, empty_ok=False)
        token = body.get("certificateOwnershipToken")
        if not isinstance(token, str) or not token:
            raise _Rejected(
                400,
                "InvalidCertificateOwnershipToken",
                "Certificate ownership token cannot be empty.",
            )
        raw_parameters = body.get("parameters")
        parameters = _string_map({} if raw_parameters is None else raw_parameters, "parameters")
        pending = self._take(token, template.name)
        try:
            thing = self._register(template, parameters, pending)
        except BaseException:
            self._give_back(token, pending)
            raise
        log.info(
            "provisioned thing %r through template %r with certificate %s",
            thing.name,
            template.name,
            pending.certificate_id,
        )
        rules = self.rules.get(template.name, TemplateRules())
        return {"deviceConfiguration": dict(rules.device_configuration), "thingName": thing.name}

    def _rotate(self, common_name: str, payload: bytes, client: ClientIdentity) -> dict[str, str]:
        """The final certificate of the thing an interim certificate was provisioned for."""
        if (
            client.kind != "thing"
            or client.name != common_name
            or not common_name.startswith(PROVISIONAL_CN_PREFIX)
        ):
            raise _Rejected(
                403,
                "Unauthorized",
                f"only an interim certificate (CN {PROVISIONAL_CN_PREFIX}...) may rotate, and "
                "only on its own CN's topic",
            )
        body = _parse_body(payload, empty_ok=False)
        certificate_id, csr = body.get("certificateId"), body.get("certificateSigningRequest")
        if not isinstance(certificate_id, str) or not certificate_id:
            raise _Rejected(
                400, "InvalidPayload", "certificateId must be the interim certificate's id"
            )
        if not isinstance(csr, str) or not csr.strip():
            raise _Rejected(
                400, "InvalidPayload", "certificateSigningRequest must be a PEM CSR string"
            )
        registry = self.ctx.registry
        with self._rotating:
            try:
                interim = registry.get_certificate(certificate_id)
            except NotFoundError as err:
                raise _Rejected(403, "Unauthorized", "the certificate is not registered") from err
            if _common_name(interim.pem) != common_name:
                raise _Rejected(
                    403, "Unauthorized", f"certificate {certificate_id} is not {common_name!r}"
                )
            if interim.kind != "device" or interim.status != "ACTIVE" or interim.thing is None:
                raise _Rejected(
                    403,
                    "Unauthorized",
                    f"certificate {interim.certificate_id} cannot rotate: it is "
                    f"{interim.status}{'' if interim.thing else ', of no thing'} (provision "
                    "again with the claim)",
                )
            thing = interim.thing
            try:
                issued = self.ctx.ca.issue_device_certificate(thing, csr_pem=csr.encode())
            except PkiError as err:
                raise _Rejected(400, "InvalidCertificateSigningRequest", str(err)) from err
            registry.record_certificate(
                issued.certificate_pem, thing=thing, certificate_id=issued.certificate_id
            )
            registry.set_certificate_status(interim.certificate_id, "INACTIVE")
            # Interim certificates of earlier attempts that never rotated (the hub's
            # connection was taken mid-exchange and it started over) end here too.
            for other in registry.list_certificates(thing=thing):
                if other.status == "ACTIVE" and (_common_name(other.pem) or "").startswith(
                    PROVISIONAL_CN_PREFIX
                ):
                    registry.set_certificate_status(other.certificate_id, "INACTIVE")
        log.info(
            "thing %r rotated from interim certificate %s to %s",
            thing,
            interim.certificate_id,
            issued.certificate_id,
        )
        return {
            "certificateId": issued.certificate_id,
            "certificatePem": issued.certificate_pem.decode(),
            "thingName": thing,
        }

    # -- steps ------------------------------------------------------------------------------

    def _authorize(self, client: ClientIdentity, template: str | None) -> ClaimTemplate | None:
        """The claim's template; _Rejected unless a claim may make this request."""
        if client.kind != "claim":
            raise _Rejected(
                403,
                "Unauthorized",
                f"only a claim certificate may use the fleet-provisioning API; {client.kind} "
                f"{client.name!r} already has an identity",
            )
        if template is not None and client.name != template:
            raise _Rejected(
                403,
                "InvalidTemplate",
                f"a claim certificate of template {client.name!r} may provision only through "
                f"$aws/provisioning-templates/{client.name}/provision, not {template!r}",
            )
        registry = self.ctx.registry
        if client.certificate_id is not None:
            try:
                certificate = registry.get_certificate(client.certificate_id)
            except NotFoundError as err:
                raise _Rejected(
                    403, "Unauthorized", "the claim certificate is not registered"
                ) from err
            if certificate.kind != "claim" or certificate.status != "ACTIVE":
                raise _Rejected(
                    403,
                    "Unauthorized",
                    f"certificate {certificate.certificate_id} is not an active claim "
                    f"certificate ({certificate.kind}, {certificate.status})",
                )
        if not client.name:
            return None
        try:
            return registry.get_claim_template(client.name)
        except NotFoundError as err:
            raise _Rejected(
                404,
                "InvalidTemplate",
                f"provisioning template {client.name!r} is not registered (create it with "
                "`edgeloop cloud claim create`)",
            ) from err

    def _take(self, token: str, template: str) -> _Pending:
        """Claim the token's pending certificate (so a concurrent use of it fails)."""
        key = _digest(token)
        now = self.clock()
        with self._lock:
            pending = self._pending.pop(key, None)
            if pending is not None and pending.template not in (None, template):
                self._pending[key] = pending
                raise _Rejected(
                    400,
                    "InvalidCertificateOwnershipToken",
                    f"the certificate ownership token was issued to a claim of template "
                    f"{pending.template!r}, not {template!r}",
                )
            self._prune(now)
        if pending is None:
            raise _Rejected(
                400,
                "InvalidCertificateOwnershipToken",
                "the certificate ownership token is unknown or was already used; create a "
                "new certificate",
            )
        if now >= pending.expires_at:
            raise _Rejected(
                400,
                "InvalidCertificateOwnershipToken",
                f"the certificate ownership token expired ({self.token_ttl:g} s after its "
                "certificate was created); create a new certificate",
            )
        return pending

    def _give_back(self, token: str, pending: _Pending) -> None:
        with self._lock:
            self._pending[_digest(token)] = pending

    def _prune(self, now: float) -> None:
        expired = [key for key, item in self._pending.items() if now >= item.expires_at]
        for key in expired:
            log.info(
                "certificate %s was not provisioned in time; forgotten",
                self._pending.pop(key).certificate_id,
            )

    def _register(
        self, template: ClaimTemplate, parameters: dict[str, str], pending: _Pending
    ) -> Thing:
        decision = self._ask_hook(template, parameters)
        merged = {**parameters, **decision.parameter_overrides}
        name = _thing_name(template.name, merged)
        attributes = self._attributes(template.name, merged)
        registry = self.ctx.registry
        thing, created = self._ensure_thing(template.name, name, attributes)
        try:
            registry.record_certificate(
                pending.certificate_pem, thing=name, certificate_id=pending.certificate_id
            )
        except BaseException:
            if created:
                # Nothing half-written stays behind: the device will start over.
                try:
                    registry.delete_thing(name)
                except EdgeloopError:
                    log.exception("could not remove thing %r after a failed provisioning", name)
            raise
        return thing

    def _ask_hook(self, template: ClaimTemplate, parameters: Mapping[str, str]) -> HookDecision:
        if self.hook is None and not template.hook:
            return HookDecision(True)
        try:
            hook = self.hook or command_hook(shlex.split(template.hook or ""))
            decision = hook(template.name, dict(parameters))
            if not isinstance(decision, HookDecision):
                raise CloudError(f"answered {decision!r}, not a HookDecision")
            overrides = _string_map(dict(decision.parameter_overrides), "parameterOverrides")
        except Exception as err:
            log.error("pre-provisioning hook of template %r failed: %s", template.name, err)
            raise _Rejected(
                403,
                "AccessDenied",
                "the pre-provisioning hook failed, so provisioning is refused (details are "
                "in the cloud's log)",
            ) from err
        if not decision.allow:
            reason = decision.reason or "no reason given"
            raise _Rejected(
                403, "AccessDenied", f"the pre-provisioning hook refused provisioning: {reason}"
            )
        return HookDecision(True, overrides, decision.reason)

    def _attributes(self, template: str, parameters: Mapping[str, str]) -> dict[str, str]:
        listed = self.rules.get(template, TemplateRules()).attributes
        keys = [k for k in parameters if k != THING_NAME_PARAMETER] if listed is None else listed
        attributes = {key: parameters[key] for key in keys if key in parameters}
        attributes[TEMPLATE_ATTRIBUTE] = template
        return attributes

    def _ensure_thing(
        self, template: str, name: str, attributes: dict[str, str]
    ) -> tuple[Thing, bool]:
        """The thing named ``name``, created or brought up to date; whether it was created."""
        registry = self.ctx.registry
        try:
            try:
                return registry.create_thing(name, attributes), True
            except ConflictError:
                pass  # it exists (perhaps made a moment ago by a concurrent request)
            existing = registry.get_thing(name)
            if existing.attributes.get(TEMPLATE_ATTRIBUTE) != template:
                raise _Rejected(
                    400,
                    "ResourceRegistrationFailure",
                    f"thing {name!r} exists and was not provisioned through template "
                    f"{template!r}; it cannot be claimed",
                )
            patch: dict[str, str | None] = {
                key: value
                for key, value in attributes.items()
                if existing.attributes.get(key) != value
            }
            if patch:
                return registry.update_attributes(name, patch), False
            return existing, False
        except ValidationError as err:
            raise _Rejected(400, "ResourceRegistrationFailure", str(err)) from err


def _thing_name(template: str, parameters: Mapping[str, str]) -> str:
    if THING_NAME_PARAMETER in parameters:
        name, where = parameters[THING_NAME_PARAMETER], f"parameters.{THING_NAME_PARAMETER}"
    elif SERIAL_PARAMETER in parameters:
        name, where = f"{template}-{parameters[SERIAL_PARAMETER]}", f"parameters.{SERIAL_PARAMETER}"
    else:
        raise _Rejected(
            400,
            "ResourceRegistrationFailure",
            f"cannot name the thing: give parameters.{THING_NAME_PARAMETER} or "
            f"parameters.{SERIAL_PARAMETER} (the thing is then {template}-<SerialNumber>)",
        )
    if name.startswith(PROVISIONAL_CN_PREFIX):
        raise _Rejected(
            400,
            "ResourceRegistrationFailure",
            f"{where}: {name!r} must not start with {PROVISIONAL_CN_PREFIX!r} (reserved for "
            "certificates)",
        )
    try:
        return check_thing_name(name, field=where)
    except ValidationError as err:
        raise _Rejected(400, "ResourceRegistrationFailure", str(err)) from err


def _common_name(pem: str) -> str | None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = x509.load_pem_x509_certificate(pem.encode()).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    return str(names[0].value) if names else None


def _who(client: ClientIdentity) -> str:
    if client.kind == "claim":
        return f"a claim of template {client.name!r}" if client.name else "a claim"
    return f"thing {client.name!r}"


# --- the command hook -------------------------------------------------------------------


def parse_decision(output: bytes | str, *, source: str = "hook") -> HookDecision:
    """A hook's JSON answer, as AWS's Lambda hook returns it; CloudError naming what is wrong.

    ``{"allowProvisioning": true|false, "parameterOverrides": {"Key": "value"},
    "reason": "..."}``; ``allowProvisioning`` may also be the string "true" or "false".
    """
    expected = 'expected {"allowProvisioning": true|false, "parameterOverrides": {...}}'
    try:
        answer = json.loads(output)
    except (UnicodeDecodeError, ValueError) as err:
        raise CloudError(f"{source}: its output is not JSON ({err}); {expected}") from err
    if not isinstance(answer, dict):
        raise CloudError(f"{source}: its output is not a JSON object; {expected}")
    allow = answer.get("allowProvisioning")
    if isinstance(allow, str) and allow.lower() in ("true", "false"):
        allow = allow.lower() == "true"
    if not isinstance(allow, bool):
        raise CloudError(f"{source}: allowProvisioning is {allow!r}; {expected}")
    overrides = answer.get("parameterOverrides") or {}
    if not isinstance(overrides, dict) or not all(
        isinstance(value, str) for value in overrides.values()
    ):
        raise CloudError(f"{source}: parameterOverrides must be an object of string values")
    reason = answer.get("reason", "")
    return HookDecision(allow, overrides, reason if isinstance(reason, str) else str(reason))


def command_hook(
    argv: Sequence[str], *, timeout: float = DEFAULT_HOOK_TIMEOUT
) -> PreProvisioningHook:
    """A pre-provisioning hook that runs ``argv`` for each request.

    The executable reads ``{"templateName": ..., "parameters": {...}}`` on stdin and
    prints its decision (see :func:`parse_decision`) on stdout. A timeout, a non-zero exit
    or bad output raises CloudError, which the service turns into a refusal.
    """
    if isinstance(argv, str) or not argv:
        raise ValidationError("must be a non-empty list of arguments", field="hook")
    command = list(argv)
    source = f"pre-provisioning hook {command[0]!r}"

    def hook(template: str, parameters: Mapping[str, str]) -> HookDecision:
        request = json.dumps({"templateName": template, "parameters": dict(parameters)})
        try:
            done = subprocess.run(
                command, input=request.encode(), capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise CloudError(f"{source} did not answer within {timeout:g} s") from err
        except OSError as err:
            raise CloudError(f"{source} could not be run: {err}") from err
        if done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip().splitlines()
            tail = f": {stderr[-1]}" if stderr else ""
            raise CloudError(f"{source} exited with status {done.returncode}{tail}")
        return parse_decision(done.stdout, source=source)

    return hook
