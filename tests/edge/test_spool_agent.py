"""The spool in the agent: streams declared in agent.json, shown by ``edgeloop device
streams`` over the control socket, kept across kill -9 of the agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeloop.core.errors import ValidationError
from edgeloop.edge.settings import AgentSettings
from edgeloop.edge.spool import Spool, StreamConfig
from edgeloop.edge.spool_config import FullPolicy
from tests.edge.conftest import Hub

EDGELOOP = Path(sys.executable).parent / "edgeloop"
STREAMS = {
    "telemetry": {"max_bytes": 1 << 20, "ttl_seconds": 3600, "priority": 1},
    "events": {"full_policy": "overwrite-oldest", "max_bytes": 65536, "priority": 5},
}


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGELOOP_ROOT", "FORCE_COLOR")}
    env |= {"NO_COLOR": "1", "COLUMNS": "300"}
    return subprocess.run(
        [str(EDGELOOP), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_streams_come_from_agent_json(tmp_path: Path) -> None:
    settings = AgentSettings(root=tmp_path).with_document({"streams": STREAMS}, source="agent.json")
    assert settings.streams == (
        StreamConfig(name="telemetry", max_bytes=1 << 20, ttl_seconds=3600, priority=1),
        StreamConfig(
            name="events",
            full_policy=FullPolicy.OVERWRITE_OLDEST,
            max_bytes=65536,
            priority=5,
        ),
    )
    with pytest.raises(ValidationError) as info:
        AgentSettings(root=tmp_path).with_document(
            {"streams": {"telemetry": {"priority": 0}}}, source="agent.json"
        )
    assert str(info.value).startswith("agent.json: streams.telemetry.priority: must be")


@pytest.mark.slow
def test_device_streams_shows_each_stream_and_survives_kill_9(
    hub_factory: Callable[..., Hub],
) -> None:
    hub = hub_factory(streams=STREAMS)
    configs = AgentSettings.load(hub.root).streams
    with Spool(hub.root / "spool", configs) as spool:  # what components appended earlier
        telemetry = spool.stream("telemetry")
        for i in range(30):
            telemetry.append(b"reading %d" % i)
        telemetry.flush()
        telemetry.commit(10)
        spool.stream("events").append(b"door opened")
    hub.start()
    rows = {row["name"]: row for row in hub.call("streams")}
    assert list(rows) == ["telemetry", "events", "dead-letter"]  # export order
    assert rows["telemetry"]["pending"] == 20 and rows["telemetry"]["exported"] == 10
    assert rows["events"]["fullPolicy"] == "overwrite-oldest"
    assert rows["dead-letter"]["pending"] == 0

    shown = _cli("device", "streams", "--root", hub.root)
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[1]: line for line in shown.stdout.splitlines() if "│" in line[:3]}
    assert "telemetry" in lines and "20 (" in lines["telemetry"]
    assert "overwrite-oldest" in lines["events"]
    as_json = _cli("device", "streams", "--json", "--root", hub.root)
    assert json.loads(as_json.stdout)[0]["name"] == "telemetry"

    hub.kill9()  # the spool's lock dies with the agent; nothing in it is lost
    hub.start()
    rows = {row["name"]: row for row in hub.call("streams")}
    assert (rows["telemetry"]["pending"], rows["telemetry"]["lastSequence"]) == (20, 30)
    hub.stop()
    state = json.loads((hub.root / "spool" / "telemetry" / "state.json").read_text())
    assert state["committed"] == 10 and state["lastSequence"] == 30
