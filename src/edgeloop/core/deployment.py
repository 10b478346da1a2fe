"""Fleet deployments as both ends read them: the document a user creates, and a hub's job.

A **deployment document** is Greengrass v2's CreateDeployment body, so existing ones work:

    {"deploymentName": "furnace-v2",
     "components": {"com.example.Detector": {"componentVersion": "2.0.0",
                    "configurationUpdate": {"merge": "{\\"threshold\\": 0.8}",
                                            "reset": ["/window"]}}},
     "deploymentPolicies": {"failureHandlingPolicy": "ROLLBACK",
                            "componentUpdatePolicy": {"action": "NOTIFY_COMPONENTS",
                                                      "timeoutInSeconds": 60},
                            "configurationValidationPolicy": {"timeoutInSeconds": 30}},
     "iotJobConfiguration": {"jobExecutionsRolloutConfig": {...}, "abortConfig": {...},
                             "timeoutConfig": {...}}}

edgeloop adds ``deploymentPolicies.healthWindowSeconds`` (how long every touched component
must stay up before the hub reports success) and, in ``iotJobConfiguration``, ``canary``
and ``jitterSeconds`` (see :mod:`edgeloop.core.rollout`).

A **job document** is what one hub receives as its job execution's ``jobDocument``: the
components of one target (a thing group, or the thing itself), the policies and the
jitter. A hub keeps the latest job of each of its targets and runs their union
(:func:`union_roots`); two targets asking for different versions of one component fail
that hub with a message naming both deployments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeloop.core.config import ConfigurationUpdate, parse_configuration_update
from edgeloop.core.errors import ConfigurationError, DeploymentError, ValidationError
from edgeloop.core.rollout import RolloutConfig, parse_rollout_config
from edgeloop.core.semver import Version

__all__ = [
    "JOB_DOCUMENT_VERSION",
    "ComponentTarget",
    "FleetDeployment",
    "JobDocument",
    "Policies",
    "parse_deployment",
    "parse_job_document",
    "thing_target",
    "union_roots",
]

JOB_DOCUMENT_VERSION = 1
FAILURE_HANDLING = ("ROLLBACK", "DO_NOTHING")
UPDATE_ACTIONS = ("NOTIFY_COMPONENTS", "SKIP_NOTIFY_COMPONENTS")
THING_TARGET_PREFIX = "thing/"  # a deployment to one thing is its own target


def thing_target(thing: str) -> str:
    """The target name of a deployment made to one thing rather than a group."""
    return f"{THING_TARGET_PREFIX}{thing}"


@dataclass(frozen=True)
class ComponentTarget:
    """One component of a deployment: its exact version and a configuration update."""

    version: str
    update: ConfigurationUpdate | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"componentVersion": self.version}
        if self.update is not None:
            doc["configurationUpdate"] = {
                "merge": self.update.merge,
                "reset": list(self.update.reset),
            }
        return doc


@dataclass(frozen=True)
class Policies:
    """How a hub applies a deployment."""

    failure_handling: str = "ROLLBACK"
    update_action: str = "NOTIFY_COMPONENTS"
    notify_timeout: float = 60.0
    validation_timeout: float = 30.0
    health_window: float | None = None  # None: the hub's own setting

    def to_json(self) -> dict[str, Any]:
        return {
            "failureHandlingPolicy": self.failure_handling,
            "componentUpdatePolicy": {
                "action": self.update_action,
                "timeoutInSeconds": self.notify_timeout,
            },
            "configurationValidationPolicy": {"timeoutInSeconds": self.validation_timeout},
            "healthWindowSeconds": self.health_window,
        }


@dataclass(frozen=True)
class FleetDeployment:
    """A validated deployment document."""

    name: str
    components: Mapping[str, ComponentTarget]
    policies: Policies = field(default_factory=Policies)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass(frozen=True)
class JobDocument:
    """One hub's share of a deployment."""

    deployment_id: str
    target: str  # a thing group's name, or thing_target(thing)
    components: Mapping[str, ComponentTarget]
    policies: Policies = field(default_factory=Policies)
    jitter_seconds: float = 0.0
    rollback_of: str | None = None  # set when this job undoes an aborted deployment
    # Versions of the components' dependencies the cloud resolved from its registry, for
    # the hub to download with them (its own resolver still has the last word).
    dependencies: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "edgeloopDeployment": JOB_DOCUMENT_VERSION,
            "deploymentId": self.deployment_id,
            "target": self.target,
            "components": {name: c.to_json() for name, c in sorted(self.components.items())},
            "dependencies": dict(sorted(self.dependencies.items())),
            "deploymentPolicies": self.policies.to_json(),
            "jitterSeconds": self.jitter_seconds,
            "rollbackOf": self.rollback_of,
        }


# -- parsing ---------------------------------------------------------------------------


def parse_deployment(doc: object, *, source: str = "deployment") -> FleetDeployment:
    """A FleetDeployment from a CreateDeployment body; ValidationError naming the field."""
    body = _object(doc, source, None)
    _only(
        body,
        source,
        None,
        {
            "deploymentName",
            "targetArn",
            "components",
            "deploymentPolicies",
            "iotJobConfiguration",
            "tags",
        },
    )
    name = body.get("deploymentName", "")
    if not isinstance(name, str) or len(name) > 256:
        raise ValidationError(
            "must be a string of at most 256 characters", source=source, field="deploymentName"
        )
    components = _components(body.get("components"), source)
    policies = _policies(body.get("deploymentPolicies"), source, "deploymentPolicies")
    rollout = _rollout(body.get("iotJobConfiguration"), source)
    return FleetDeployment(name, components, policies, rollout)


def parse_job_document(doc: object, *, source: str = "job document") -> JobDocument:
    """A hub's JobDocument; ValidationError naming the field when it is not one."""
    body = _object(doc, source, None)
    version = body.get("edgeloopDeployment")
    if version != JOB_DOCUMENT_VERSION:
        raise ValidationError(
            f"is {version!r}: not an edgeloop deployment this hub can read "
            f"(it reads version {JOB_DOCUMENT_VERSION})",
            source=source,
            field="edgeloopDeployment",
        )
    deployment_id = body.get("deploymentId")
    if not isinstance(deployment_id, str) or not deployment_id:
        raise ValidationError("must be a non-empty string", source=source, field="deploymentId")
    target = body.get("target")
    if not isinstance(target, str) or not target:
        raise ValidationError("must be a non-empty string", source=source, field="target")
    jitter = body.get("jitterSeconds", 0.0)
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter <= 3600:
        raise ValidationError(
            "must be seconds from 0 to 3600", source=source, field="jitterSeconds"
        )
    rollback_of = body.get("rollbackOf")
    if rollback_of is not None and not isinstance(rollback_of, str):
        raise ValidationError("must be a deployment id", source=source, field="rollbackOf")
    return JobDocument(
        deployment_id=deployment_id,
        target=target,
        components=_components(body.get("components"), source, allow_empty=True),
        policies=_policies(body.get("deploymentPolicies"), source, "deploymentPolicies"),
        jitter_seconds=float(jitter),
        rollback_of=rollback_of,
        dependencies=_dependencies(body.get("dependencies", {}), source),
    )


def _dependencies(value: object, source: str) -> dict[str, str]:
    body = _object(value, source, "dependencies")
    for name, version in body.items():
        if not isinstance(version, str):
            raise ValidationError(
                "must be a version string", source=source, field=f"dependencies.{name}"
            )
        try:
            Version.parse(version)
        except ValueError as err:
            raise ValidationError(str(err), source=source, field=f"dependencies.{name}") from None
    return dict(body)


def union_roots(targets: Mapping[str, tuple[str, Mapping[str, str]]]) -> dict[str, str]:
    """The root components a hub runs: the union over its targets' latest deployments.

    ``targets`` maps each target to (its deployment id, {component: version}). A
    component two targets ask for at different versions is a DeploymentError naming
    both deployments and both versions.
    """
    roots: dict[str, str] = {}
    owner: dict[str, tuple[str, str]] = {}
    for target in sorted(targets):
        deployment_id, components = targets[target]
        for name, version in sorted(components.items()):
            if name in roots and roots[name] != version:
                other_target, other_deployment = owner[name]
                raise DeploymentError(
                    f"{name} is asked for at {roots[name]} by deployment {other_deployment} "
                    f"(target {other_target}) and at {version} by deployment "
                    f"{deployment_id} (target {target}); a hub runs one version of a "
                    "component: deploy the same version to both targets"
                )
            roots[name] = version
            owner.setdefault(name, (target, deployment_id))
    return roots


def _components(
    value: object, source: str, *, allow_empty: bool = False
) -> dict[str, ComponentTarget]:
    components = _object(value, source, "components")
    if not components and not allow_empty:
        raise ValidationError("must name at least one component", source=source, field="components")
    parsed: dict[str, ComponentTarget] = {}
    for name, spec in components.items():
        where = f"components.{name}"
        if not name or len(name) > 128 or not all(c.isalnum() or c in "._-" for c in name):
            raise ValidationError(
                "a component name is 1-128 letters, digits, '.', '_' and '-'",
                source=source,
                field=where,
            )
        entry = _object(spec, source, where)
        _only(entry, source, where, {"componentVersion", "configurationUpdate", "runWith"})
        version = entry.get("componentVersion")
        if not isinstance(version, str):
            raise ValidationError(
                "is required: the exact version to run, such as 1.0.0",
                source=source,
                field=f"{where}.componentVersion",
            )
        try:
            Version.parse(version)
        except ValueError as err:
            raise ValidationError(
                str(err), source=source, field=f"{where}.componentVersion"
            ) from None
        update = None
        if entry.get("configurationUpdate") is not None:
            try:
                update = parse_configuration_update(entry["configurationUpdate"], source=source)
            except ConfigurationError as err:
                field_name = f"{where}.configurationUpdate"
                if err.field:
                    field_name += f".{err.field}"
                raise ValidationError(err.reason, source=source, field=field_name) from None
        parsed[name] = ComponentTarget(version, update)
    return parsed


def _policies(value: object, source: str, where: str) -> Policies:
    if value is None:
        return Policies()
    body = _object(value, source, where)
    _only(
        body,
        source,
        where,
        {
            "failureHandlingPolicy",
            "componentUpdatePolicy",
            "configurationValidationPolicy",
            "healthWindowSeconds",
        },
    )
    policies = Policies()
    failure = body.get("failureHandlingPolicy", "ROLLBACK")
    if failure not in FAILURE_HANDLING:
        raise ValidationError(
            f"{failure!r} must be one of {', '.join(FAILURE_HANDLING)}",
            source=source,
            field=f"{where}.failureHandlingPolicy",
        )
    action, notify = policies.update_action, policies.notify_timeout
    if body.get("componentUpdatePolicy") is not None:
        update = _object(body["componentUpdatePolicy"], source, f"{where}.componentUpdatePolicy")
        _only(update, source, f"{where}.componentUpdatePolicy", {"action", "timeoutInSeconds"})
        action = update.get("action", action)
        if action not in UPDATE_ACTIONS:
            raise ValidationError(
                f"{action!r} must be one of {', '.join(UPDATE_ACTIONS)}",
                source=source,
                field=f"{where}.componentUpdatePolicy.action",
            )
        notify = _seconds(
            update.get("timeoutInSeconds", notify),
            source,
            f"{where}.componentUpdatePolicy.timeoutInSeconds",
        )
    validation = policies.validation_timeout
    if body.get("configurationValidationPolicy") is not None:
        check = _object(
            body["configurationValidationPolicy"], source, f"{where}.configurationValidationPolicy"
        )
        _only(check, source, f"{where}.configurationValidationPolicy", {"timeoutInSeconds"})
        validation = _seconds(
            check.get("timeoutInSeconds", validation),
            source,
            f"{where}.configurationValidationPolicy.timeoutInSeconds",
        )
    health = body.get("healthWindowSeconds")
    if health is not None:
        health = _seconds(health, source, f"{where}.healthWindowSeconds")
    return Policies(str(failure), str(action), notify, validation, health)


def _rollout(value: object, source: str) -> RolloutConfig:
    if value is None:
        return RolloutConfig()
    body = dict(_object(value, source, "iotJobConfiguration"))
    # AWS nests the rate under jobExecutionsRolloutConfig; the rollout parser reads it flat.
    rate = body.pop("jobExecutionsRolloutConfig", None)
    if rate is not None:
        nested = _object(rate, source, "iotJobConfiguration.jobExecutionsRolloutConfig")
        _only(
            nested,
            source,
            "iotJobConfiguration.jobExecutionsRolloutConfig",
            {"exponentialRate", "maximumPerMinute"},
        )
        body.update(nested)
    try:
        return parse_rollout_config(body, field="iotJobConfiguration")
    except ValidationError as err:
        where = err.field or "iotJobConfiguration"
        for key in ("exponentialRate", "maximumPerMinute"):
            flat = f"iotJobConfiguration.{key}"
            if rate is not None and (where == flat or where.startswith(flat + ".")):
                where = where.replace(flat, f"iotJobConfiguration.jobExecutionsRolloutConfig.{key}")
        raise ValidationError(err.reason, source=source, field=where) from None


def _seconds(value: object, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86_400:
        raise ValidationError("must be seconds from 0 to 86400", source=source, field=where)
    return float(value)


def _object(value: object, source: str, where: str | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(
            f"must be a JSON object, got {type(value).__name__}", source=source, field=where
        )
    return value


def _only(body: Mapping[str, object], source: str, where: str | None, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})",
            source=source,
            field=f"{where}.{unknown[0]}" if where else unknown[0],
        )
