"""Deployment documents (Greengrass's CreateDeployment form), hub job documents, and the
union a hub runs over the deployments of all its targets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeloop.core.config import ConfigurationUpdate
from edgeloop.core.deployment import (
    ComponentTarget,
    JobDocument,
    Policies,
    parse_deployment,
    parse_job_document,
    thing_target,
    union_roots,
)
from edgeloop.core.errors import DeploymentError, ValidationError
from edgeloop.core.rollout import AbortCriterion

GREENGRASS_DOCUMENT: dict[str, Any] = {
    "targetArn": "arn:aws:iot:eu-west-1:123456789012:thinggroup/furnaces",
    "deploymentName": "furnace detector 2",
    "components": {
        "com.example.Detector": {
            "componentVersion": "2.0.0",
            "configurationUpdate": {"merge": json.dumps({"threshold": 0.8}), "reset": ["/window"]},
            "runWith": {},
        },
        "com.example.Model": {"componentVersion": "1.3.0"},
    },
    "deploymentPolicies": {
        "failureHandlingPolicy": "ROLLBACK",
        "componentUpdatePolicy": {"timeoutInSeconds": 30, "action": "SKIP_NOTIFY_COMPONENTS"},
        "configurationValidationPolicy": {"timeoutInSeconds": 10},
    },
    "iotJobConfiguration": {
        "jobExecutionsRolloutConfig": {
            "exponentialRate": {
                "baseRatePerMinute": 5,
                "incrementFactor": 2.0,
                "rateIncreaseCriteria": {"numberOfSucceededThings": 5},
            },
            "maximumPerMinute": 50,
        },
        "abortConfig": {
            "criteriaList": [
                {
                    "failureType": "FAILED",
                    "action": "CANCEL",
                    "thresholdPercentage": 10,
                    "minNumberOfExecutedThings": 3,
                }
            ]
        },
        "timeoutConfig": {"inProgressTimeoutInMinutes": 15},
    },
}


def test_a_greengrass_create_deployment_body_parses() -> None:
    deployment = parse_deployment(GREENGRASS_DOCUMENT)
    assert deployment.name == "furnace detector 2"
    assert deployment.components == {
        "com.example.Detector": ComponentTarget(
            "2.0.0", ConfigurationUpdate(merge={"threshold": 0.8}, reset=("/window",))
        ),
        "com.example.Model": ComponentTarget("1.3.0"),
    }
    assert deployment.policies == Policies("ROLLBACK", "SKIP_NOTIFY_COMPONENTS", 30.0, 10.0, None)
    rollout = deployment.rollout
    assert (rollout.base_per_minute, rollout.maximum_per_minute) == (5, 50)
    assert (rollout.increment_factor, rollout.increase_every, rollout.increase_on) == (
        2.0,
        5,
        "succeeded",
    )
    assert rollout.abort == (AbortCriterion("FAILED", 10.0, 3),)
    assert rollout.execution_timeout_minutes == 15


def test_edgeloops_additions_parse() -> None:
    deployment = parse_deployment(
        {
            "components": {"a": {"componentVersion": "1.0.0"}},
            "deploymentPolicies": {"healthWindowSeconds": 3},
            "iotJobConfiguration": {"canary": {"size": 1}, "jitterSeconds": 4},
        }
    )
    assert deployment.policies.health_window == 3.0
    assert deployment.rollout.canary_size == 1 and deployment.rollout.jitter_seconds == 4.0


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        ({"components": {}}, "components", "at least one component"),
        ({"components": []}, "components", "JSON object"),
        (
            {"components": {"bad name": {"componentVersion": "1.0.0"}}},
            "components.bad name",
            "letters",
        ),
        ({"components": {"a": {}}}, "components.a.componentVersion", "exact version"),
        (
            {"components": {"a": {"componentVersion": "^1.0"}}},
            "components.a.componentVersion",
            "invalid version",
        ),
        (
            {"components": {"a": {"componentVersion": "1.0.0", "version": "x"}}},
            "components.a.version",
            "unknown field",
        ),
        (
            {
                "components": {
                    "a": {"componentVersion": "1.0.0", "configurationUpdate": {"merge": "{"}}
                }
            },
            "components.a.configurationUpdate.MERGE",
            "JSON",
        ),
        (
            {"deploymentPolicies": {"failureHandlingPolicy": "RETRY"}},
            "deploymentPolicies.failureHandlingPolicy",
            "ROLLBACK",
        ),
        (
            {"deploymentPolicies": {"componentUpdatePolicy": {"action": "ASK"}}},
            "deploymentPolicies.componentUpdatePolicy.action",
            "NOTIFY_COMPONENTS",
        ),
        (
            {"deploymentPolicies": {"configurationValidationPolicy": {"timeoutInSeconds": -1}}},
            "deploymentPolicies.configurationValidationPolicy.timeoutInSeconds",
            "seconds",
        ),
        (
            {"iotJobConfiguration": {"jobExecutionsRolloutConfig": {"maximumPerMinute": 0}}},
            "iotJobConfiguration.jobExecutionsRolloutConfig.maximumPerMinute",
            "from 1",
        ),
        (
            {"iotJobConfiguration": {"abortConfig": {"criteriaList": [{"failureType": "X"}]}}},
            "iotJobConfiguration.abortConfig.criteriaList[0].failureType",
            "one of",
        ),
        ({"deploymentName": 5}, "deploymentName", "string"),
        ({"target": "x"}, "target", "unknown field"),
    ],
)
def test_a_bad_deployment_names_its_field(patch: dict[str, Any], field: str, message: str) -> None:
    doc = {"components": {"a": {"componentVersion": "1.0.0"}}, **patch}
    with pytest.raises(ValidationError, match=message) as caught:
        parse_deployment(doc)
    assert caught.value.field == field
    assert caught.value.source == "deployment"


def test_a_job_document_round_trips() -> None:
    job = JobDocument(
        deployment_id="d-1",
        target=thing_target("hub-1"),
        components={
            "a": ComponentTarget("1.0.0", ConfigurationUpdate(merge={"x": 1}, reset=("",))),
            "b": ComponentTarget("2.1.0"),
        },
        policies=Policies(health_window=2.0),
        jitter_seconds=1.5,
        rollback_of="d-0",
        dependencies={"lib": "3.0.1"},
    )
    wire = json.loads(json.dumps(job.to_json()))
    assert parse_job_document(wire) == job
    assert job.target == "thing/hub-1"


def test_a_rollback_to_nothing_is_a_job_without_components() -> None:
    job = JobDocument("d-2", "furnaces", {}, rollback_of="d-1")
    assert parse_job_document(job.to_json()).components == {}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"edgeloopDeployment": 2}, "edgeloopDeployment"),
        ({"deploymentId": ""}, "deploymentId"),
        ({"target": None}, "target"),
        ({"jitterSeconds": "soon"}, "jitterSeconds"),
        ({"rollbackOf": 3}, "rollbackOf"),
        ({"components": {"a": {"componentVersion": "x"}}}, "components.a.componentVersion"),
        ({"dependencies": {"lib": "^1"}}, "dependencies.lib"),
        ({"dependencies": {"lib": 1}}, "dependencies.lib"),
        ({"dependencies": []}, "dependencies"),
    ],
)
def test_a_bad_job_document_names_its_field(patch: dict[str, Any], field: str) -> None:
    doc = {**JobDocument("d-1", "g", {}).to_json(), **patch}
    with pytest.raises(ValidationError) as caught:
        parse_job_document(doc)
    assert caught.value.field == field


def test_a_hub_runs_the_union_of_its_targets() -> None:
    roots = union_roots(
        {
            "furnaces": ("d-1", {"detector": "2.0.0", "model": "1.0.0"}),
            "kitchen": ("d-2", {"detector": "2.0.0", "notifier": "1.1.0"}),
            "thing/hub-1": ("d-3", {}),
        }
    )
    assert roots == {"detector": "2.0.0", "model": "1.0.0", "notifier": "1.1.0"}


def test_two_targets_asking_for_different_versions_name_both_deployments() -> None:
    with pytest.raises(DeploymentError) as caught:
        union_roots(
            {
                "furnaces": ("d-1", {"detector": "2.0.0"}),
                "kitchen": ("d-2", {"detector": "1.0.0"}),
            }
        )
    message = str(caught.value)
    assert "d-1" in message and "d-2" in message
    assert "2.0.0" in message and "1.0.0" in message
