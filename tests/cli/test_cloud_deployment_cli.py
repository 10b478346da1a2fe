"""`edgeloop cloud deployment …` against a real running cloud, and the live view's rendering."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from edgeloop.cli.cloud_deployment import render, settled
from tests.cli.test_cloud_cli import cli, ok
from tests.cloud.test_cloud_up import RunningCloud

COMPONENT = "com.example.Blink"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    folder = tmp_path_factory.mktemp("cloud")
    running = RunningCloud(folder / "data")
    recipe = folder / "recipe.json"
    for version in ("1.0.0", "2.0.0"):
        recipe.write_text(
            json.dumps(
                {
                    "RecipeFormatVersion": "2020-01-25",
                    "ComponentName": COMPONENT,
                    "ComponentVersion": version,
                    "Manifests": [{"Lifecycle": {"Run": "sleep 600"}}],
                }
            )
        )
        ok(cli(running, "component", "publish", str(recipe)))
    yield running
    running.close()


def _group(cloud: RunningCloud, size: int) -> tuple[str, list[str]]:
    group = f"g-{uuid.uuid4().hex[:6]}"
    assert cloud.api.post("/groups", json={"thingGroupName": group}).status_code == 201
    things = [f"{group}-hub-{i}" for i in range(size)]
    for thing in things:
        assert cloud.api.post("/things", json={"thingName": thing}).status_code == 201
        assert cloud.api.put(f"/groups/{group}/things/{thing}").status_code == 200
    return group, things


def _document(tmp: Path, version: str, **extra: Any) -> Path:
    path = tmp / f"deployment-{uuid.uuid4().hex[:6]}.json"
    path.write_text(
        json.dumps(
            {
                "deploymentName": f"blink {version}",
                "components": {COMPONENT: {"componentVersion": version}},
                **extra,
            }
        )
    )
    return path


def test_create_follow_pause_resume_cancel(cloud: RunningCloud, tmp_path: Path) -> None:
    group, _ = _group(cloud, 3)
    document = _document(
        tmp_path,
        "1.0.0",
        iotJobConfiguration={"jobExecutionsRolloutConfig": {"maximumPerMinute": 1}},
    )
    created = json.loads(
        ok(cli(cloud, "deployment", "create", str(document), "--group", group, "--json"))
    )
    deployment_id = created["deploymentId"]
    assert (created["target"], created["targets"], created["released"]) == (group, 3, 1)

    human = ok(cli(cloud, "deployment", "status", deployment_id))
    assert deployment_id in human and "ACTIVE" in human and "notified 1/3" in human
    assert f"{COMPONENT} 1.0.0" in human

    listed = json.loads(ok(cli(cloud, "deployment", "list", "--target", group, "--json")))
    assert [d["deploymentId"] for d in listed] == [deployment_id]

    assert "PAUSED" in ok(cli(cloud, "deployment", "pause", deployment_id))
    again = cli(cloud, "deployment", "pause", deployment_id)
    assert again.returncode == 1 and "only from ACTIVE" in again.stderr
    assert "ACTIVE" in ok(cli(cloud, "deployment", "resume", deployment_id))
    canceled = json.loads(
        ok(cli(cloud, "deployment", "cancel", deployment_id, "--reason", "wrong blink", "--json"))
    )
    assert (canceled["status"], canceled["reason"]) == ("CANCELED", "wrong blink")
    # --watch ends at once on a settled rollout.
    watched = json.loads(ok(cli(cloud, "deployment", "status", deployment_id, "--watch", "--json")))
    assert watched["status"] == "CANCELED"
    assert [e["kind"] for e in watched["events"]] == [
        "created",
        "wave",
        "paused",
        "active",
        "canceled",
    ]


def test_a_deployment_to_one_thing(cloud: RunningCloud, tmp_path: Path) -> None:
    _, things = _group(cloud, 1)
    document = _document(tmp_path, "2.0.0")
    created = json.loads(
        ok(cli(cloud, "deployment", "create", str(document), "--thing", things[0], "--json"))
    )
    assert created["target"] == f"thing/{things[0]}" and created["released"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group", "no-such-group"], "no thing group named 'no-such-group'"),
        ([], "no targetArn: give --group NAME or --thing NAME"),
        (["--group", "a", "--thing", "b"], "--group or --thing, not both"),
    ],
)
def test_bad_deployments_say_what_is_wrong(
    cloud: RunningCloud, tmp_path: Path, args: list[str], message: str
) -> None:
    result = cli(cloud, "deployment", "create", str(_document(tmp_path, "1.0.0")), *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_a_bad_document_names_the_field(cloud: RunningCloud, tmp_path: Path) -> None:
    group, _ = _group(cloud, 1)
    document = _document(tmp_path, "1.0.0", deploymentPolicies={"failureHandlingPolicy": "RETRY"})
    result = cli(cloud, "deployment", "create", str(document), "--group", group)
    assert result.returncode == 1
    assert "deploymentPolicies.failureHandlingPolicy" in result.stderr and "RETRY" in result.stderr
    missing = cli(cloud, "deployment", "create", str(tmp_path / "none.json"), "--group", group)
    assert missing.returncode == 1 and "none.json: no such file" in missing.stderr


def _detail(**changes: Any) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "deploymentId": "d-1",
        "deploymentName": "blink 2",
        "target": "furnaces",
        "status": "ABORTED",
        "phase": "aborted",
        "ratePerMinute": 120.0,
        "targets": 10,
        "released": 6,
        "canary": ["hub-0"],
        "executions": {"SUCCEEDED": 3, "FAILED": 2, "IN_PROGRESS": 1, "CANCELED": 0},
        "reason": "failures reached 40.0% of 5 executed hubs",
        "previousDeploymentId": "d-0",
        "rollback": {"QUEUED": 1, "SUCCEEDED": 2},
        "components": {COMPONENT: "2.0.0"},
        "events": [
            {
                "at": "2026-11-22T06:00:00+00:00",
                "kind": "wave",
                "detail": {"phase": "canary", "size": 1, "released": 1, "ratePerMinute": 0},
            },
            {
                "at": "2026-11-22T06:00:05+00:00",
                "kind": "wave",
                "detail": {"phase": "rollout", "size": 5, "released": 6, "ratePerMinute": 120},
            },
        ],
    }
    return {**detail, **changes}


def test_the_live_view_shows_waves_counts_and_the_abort_decision() -> None:
    console = Console(width=160, record=True, color_system=None)
    console.print(render(_detail()))
    text = console.export_text()
    assert "d-1" in text and "ABORTED" in text and "notified 6/10" in text
    assert "executed 5" in text
    assert "aborted: failures reached 40.0% of 5 executed hubs" in text
    assert "fleet rollback to d-0: QUEUED 1, SUCCEEDED 2" in text
    assert "canary: hub-0" in text
    assert "06:00:05" in text and "rollout" in text
    assert "CANCELED" not in text  # statuses with no hub are left out


def test_a_rollout_settles_when_its_rollback_is_done() -> None:
    assert not settled(_detail())
    assert not settled(_detail(executions={"IN_PROGRESS": 1}, rollback={}))
    assert settled(_detail(executions={"SUCCEEDED": 3}, rollback={"SUCCEEDED": 3}))
    assert settled(_detail(status="COMPLETED"))
    assert not settled(_detail(status="ACTIVE"))
