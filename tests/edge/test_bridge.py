"""The MQTT bridge: its Greengrass-form configuration, how it recognises redeliveries, and a
real agent moving kits' readings into a stream and onto IPC — across kill -9 of the agent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeloop.core.errors import CloudError, ValidationError
from edgeloop.edge.bridge import COMPONENT, Bridge, SeqWindow
from edgeloop.edge.bridge_config import Endpoint, parse_bridge
from edgeloop.edge.ipc.pubsub import Published, PubSub
from edgeloop.edge.settings import AgentSettings
from edgeloop.edge.spool import Spool
from edgeloop.edge.spool_segment import DeadLetter
from tests.edge.conftest import Hub
from tests.edge.test_hub_broker import (
    KITS,
    STREAMS,
    TO_STREAM,
    KitConnection,
    Pki,
    assert_complete,
    broker_hub,
    broker_status,
    dead_letters,
    end_kit_runs,  # noqa: F401 - an autouse fixture
    finish_kits,
    kit_connections,  # noqa: F401 - a fixture
    pki,  # noqa: F401 - a fixture
    read_all,
    reading,
    run_kits,
    stored_readings,
    trust_file,
    wait_status,
)
from tests.edge.test_ipc_official_sdk import PUBSUB, access, python_component, records

# -- configuration ---------------------------------------------------------------------------


def test_mappings_take_greengrass_form_and_stream_targets() -> None:
    config = parse_bridge(
        {
            "mqttTopicMapping": {
                "KitsToStream": TO_STREAM,
                "KitsToIpc": {
                    "topic": "kits/+/telemetry",
                    "source": "LocalMqtt",
                    "target": "Pubsub",
                    "targetTopicPrefix": "hub/",
                },
                "Commands": {"topic": "commands/#", "source": "Pubsub", "target": "LocalMqtt"},
            }
        },
        source="agent.json",
    )
    first, second, third = config.mappings
    assert (first.target, first.stream) == (Endpoint.STREAM, "telemetry")
    assert second.target_topic_prefix == "hub/" and third.source is Endpoint.PUBSUB
    assert config.streams() == ["telemetry"] and second.to_json()["targetTopicPrefix"] == "hub/"


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        ({"topic": "kits/#/x", "source": "LocalMqtt", "target": "Pubsub"}, "m.topic"),
        ({"topic": "a", "source": "Kits", "target": "Pubsub"}, "m.source"),
        ({"topic": "a", "source": "LocalMqtt", "target": "Lake"}, "m.target"),
        ({"topic": "a", "source": "LocalMqtt", "target": "LocalMqtt"}, "m.target"),
        ({"topic": "a", "source": "LocalMqtt", "target": "Stream:dead-letter"}, "m.target"),
        ({"topic": "a", "source": "Pubsub", "target": "IotCore", "targetTopicPrefix": "+/"}, None),
        (
            {"topic": "a", "source": "LocalMqtt", "target": "Stream:t", "targetTopicPrefix": "x"},
            None,
        ),
        ({"topic": "a", "source": "LocalMqtt", "target": "Pubsub", "qos": 1}, "m.qos"),
    ],
)
def test_bad_mappings_are_refused_naming_the_field(
    mapping: dict[str, Any], field: str | None
) -> None:
    with pytest.raises(ValidationError) as info:
        parse_bridge({"mqttTopicMapping": {"m": mapping}}, source="agent.json")
    expected = f"bridge.mqttTopicMapping.{field or 'm.targetTopicPrefix'}"
    assert info.value.field == expected, str(info.value)


def test_mappings_must_fit_the_hub(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    broker = {"ca": "ca.pem"}

    def load(**doc: Any) -> AgentSettings:
        return AgentSettings(root=tmp_path).with_document(doc, source="agent.json")

    mapping = {"mqttTopicMapping": {"m": TO_STREAM}}
    assert load(broker=broker, streams=STREAMS, bridge=mapping).bridge is not None
    cases = [
        ({"streams": STREAMS, "bridge": mapping}, "LocalMqtt needs the hub broker"),
        ({"broker": broker, "bridge": mapping}, "stream 'telemetry' is not declared"),
        (
            {"bridge": {"mqttTopicMapping": {"m": {**TO_STREAM, "source": "IotCore"}}}},
            "IotCore needs the cloud connection",
        ),
    ]
    for doc, message in cases:
        with pytest.raises(ValidationError) as info:
            load(**doc)
        assert message in str(info.value) and info.value.field is not None


def test_window_recognises_repeats_within_its_size() -> None:
    window = SeqWindow(size=8)
    for seq in (0, 1, 2, 5):
        window.add("kit", seq)
    assert all(window.seen("kit", s) for s in (0, 1, 2, 5))
    assert not window.seen("kit", 3) and not window.seen("kit", 6) and not window.seen("k2", 0)
    window.add("kit", 3)  # late, but inside the window
    assert window.seen("kit", 3)
    window.add("kit", 20)  # jumps past the window: older ones are no longer known
    assert window.seen("kit", 20) and not window.seen("kit", 5)
    window.add("kit", 10)  # more than the window below the highest: not remembered
    assert not window.seen("kit", 10)
    window.add("kit", 13)
    assert window.seen("kit", 13) and len(window) == 1


# -- a real agent ----------------------------------------------------------------------------


@pytest.mark.slow
def test_readings_reach_ipc_components_and_bad_ones_the_dead_letters(
    hub_factory: Callable[..., Hub],
    pki: Pki,  # noqa: F811
    kit_connections: list[KitConnection],  # noqa: F811
) -> None:
    mappings = {
        "KitsToStream": TO_STREAM,
        "KitsToIpc": {
            "topic": "kits/+/telemetry",
            "source": "LocalMqtt",
            "target": "Pubsub",
            "targetTopicPrefix": "hub/",
        },
        "EventsToStream": {"topic": "events/#", "source": "Pubsub", "target": "Stream:events"},
    }
    streams = {**STREAMS, "events": {"max_bytes": 1 << 20}}
    hub = broker_hub(hub_factory, pki, mappings, streams=streams)
    out = hub.root.parent / "watcher.jsonl"
    script = """
ipc = GreengrassCoreIPCClientV2()
out = sys.argv[1]

def on_message(event):
    message = event.binary_message
    emit(out, topic=message.context.topic, payload=message.message.decode())

ipc.subscribe_to_topic(topic="hub/kits/+/telemetry", on_stream_event=on_message)
event = {"kit": "furnace-1", "appliance": "furnace", "ts": 1.75e9, "sensors": {}, "kit_seq": 7}
ipc.publish_to_topic(topic="events/door", publish_message=PublishMessage(
    json_message=JsonMessage(message=event)))
ipc.publish_to_topic(topic="events/door", publish_message=PublishMessage(
    binary_message=BinaryMessage(message=b"door opened")))
emit(out, ready=True)
idle()
"""
    policy = access(PUBSUB, ["aws.greengrass#SubscribeToTopic"], ["hub/kits/+/telemetry"])
    policy["accessControl"][PUBSUB]["test:pub:1"] = {
        "operations": ["aws.greengrass#PublishToTopic"],
        "resources": ["events/*"],
    }
    python_component(hub, "test.Watcher", script, out, config=policy)
    hub.start()
    assert hub.deploy(merge={"test.Watcher": "1.0.0"})["status"] == "SUCCEEDED"
    deadline = time.monotonic() + 20
    while not any(r.get("ready") for r in records(out)):
        assert time.monotonic() < deadline, hub.log("test.Watcher")
        time.sleep(0.05)
    wait_status(hub, lambda s: s["bridge"]["connected"])

    kit = KitConnection(broker_status(hub)["port"], trust_file(hub), *pki.kit("furnace-1"))
    kit_connections.append(kit)
    assert kit.connect()
    topic = "kits/furnace-1/telemetry"
    for seq in range(20):
        assert kit.publish(topic, reading("furnace-1", seq)) == "Success"
    assert kit.publish(topic, b"not json") == "Success"
    assert kit.publish(topic, reading("pump-1", 20)) == "Success"  # names another kit
    assert kit.publish(topic, reading("furnace-1", 5)) == "Success"  # a repeat

    status = wait_status(hub, lambda s: s["bridge"]["acked"] == 23)["bridge"]
    counters = {m["name"]: m for m in status["mappings"]}
    assert counters["KitsToStream"]["forwarded"] == 20
    assert counters["KitsToStream"]["invalid"] == 2
    assert counters["KitsToStream"]["deadLettered"] == 2
    assert counters["KitsToStream"]["duplicates"] == 1
    assert counters["KitsToIpc"]["forwarded"] == 22  # IPC gets what the kit sent, as it came
    assert counters["EventsToStream"]["forwarded"] == 1
    assert counters["EventsToStream"]["deadLettered"] == 1

    deadline = time.monotonic() + 10
    while len(got := [r for r in records(out) if "topic" in r]) < 22:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    assert {r["topic"] for r in got} == {"hub/kits/furnace-1/telemetry"}
    # (The SDK's client calls handlers from a thread pool: their order is not the bridge's.)
    seqs = [json.loads(r["payload"])["kit_seq"] for r in got if r["payload"] != "not json"]
    assert sorted(seqs) == list(range(21))  # the repeat of 5 was recognised, not forwarded

    hub.stop()
    assert stored_readings(hub) == {"furnace-1": list(range(20))}
    assert stored_readings(hub, "events") == {"furnace-1": [7]}
    letters = {letter.payload: letter for letter in dead_letters(hub)}
    assert letters[b"not json"].reason.startswith("not a reading (kits/furnace-1/telemetry)")
    assert letters[b"not json"].stream == "telemetry" and letters[b"not json"].sequence == 0
    assert "'pump-1' is not the kit that published it" in letters[reading("pump-1", 20)].reason
    assert letters[b"door opened"].stream == "events"


@pytest.mark.slow
def test_kill_9_of_the_agent_loses_no_acknowledged_reading(
    hub_factory: Callable[..., Hub],
    pki: Pki,  # noqa: F811
) -> None:
    # 4 kits x 400 readings at 30 a second each: about 13 s, the agent killed twice.
    kill_agent_while_kits_publish(hub_factory, pki, count=400, kills=(300, 900))


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_kill_9_of_the_agent_again_and_again(
    hub_factory: Callable[..., Hub],
    pki: Pki,  # noqa: F811
) -> None:
    # 4 kits x 3,000 readings: about 2 minutes, the agent killed every 1,200 readings.
    kill_agent_while_kits_publish(hub_factory, pki, count=3000, kills=(1200,) * 8)


def kill_agent_while_kits_publish(
    hub_factory: Callable[..., Hub],
    pki: Pki,  # noqa: F811
    *,
    count: int,
    kills: tuple[int, ...],
) -> None:
    """Kits publish ``count`` readings each while the agent is killed (kill -9) once its
    bridge has acknowledged each of ``kills`` readings since it started; then every reading
    the kits had acknowledged must be in the stream, once."""
    hub = broker_hub(hub_factory, pki)
    hub.start()
    wait_status(hub, lambda s: s["bridge"]["connected"])
    proc = run_kits(hub, pki, "--count", str(count), "--speed", "300", background=True)
    assert isinstance(proc, subprocess.Popen) and hub.proc is not None
    for threshold in kills:
        wait_status(hub, lambda s, t=threshold: s["bridge"]["acked"] > t, timeout=60)
        hub.kill9()
        time.sleep(0.3)  # kits keep publishing to the orphaned broker meanwhile
        hub.start()
        status = wait_status(hub, lambda s: s["bridge"]["connected"])
        assert status["broker"]["state"] == "RUNNING"
    summary = finish_kits(proc, timeout=60 + count / 10)
    total = sum(kit["acked"] for kit in summary["kits"])

    def settled(status: dict[str, Any]) -> bool:
        bridge = status["bridge"]
        return bridge["inbox"] == 0 and bridge["pendingAcks"] == 0

    def appended() -> int:
        rows = {row["name"]: row for row in hub.call("streams")}
        return int(rows["telemetry"]["appended"])

    deadline = time.monotonic() + 30
    while appended() < total or not settled(hub.call("status")):
        assert time.monotonic() < deadline, (appended(), total, hub.call("status")["bridge"])
        time.sleep(0.1)
    duplicates = hub.call("status")["bridge"]["mappings"][0]["duplicates"]
    hub.stop()
    found = stored_readings(hub)
    acked = {kit["kit"]: range(kit["firstSeq"], kit["lastSeq"] + 1) for kit in summary["kits"]}
    assert set(acked) == set(KITS)
    # Readings stored but not yet acknowledged when the agent died came again; the bridge
    # knew them from the stream's last records.
    assert assert_complete(found, acked, ordered=False) == 0, f"{duplicates} recognised"
    log = (hub.root / "broker" / "mosquitto.log").read_text()
    assert "Outgoing messages are being dropped" not in log


@pytest.mark.slow
def test_a_full_stream_holds_readings_back_in_the_broker_until_there_is_room(
    hub_factory: Callable[..., Hub],
    pki: Pki,  # noqa: F811
    kit_connections: list[KitConnection],  # noqa: F811
) -> None:
    small = {"telemetry": {"max_bytes": 16384, "full_policy": "reject-new"}}
    hub = broker_hub(hub_factory, pki, streams=small)
    hub.start()
    wait_status(hub, lambda s: s["bridge"]["connected"])
    kit = KitConnection(broker_status(hub)["port"], trust_file(hub), *pki.kit("furnace-1"))
    kit_connections.append(kit)
    assert kit.connect()
    for seq in range(200):  # more than the stream holds
        assert kit.publish("kits/furnace-1/telemetry", reading("furnace-1", seq)) == "Success"
    status = wait_status(hub, lambda s: s["bridge"]["blocked"] is not None)["bridge"]
    assert "is full" in status["blocked"]
    stored = status["mappings"][0]["forwarded"]
    assert 50 < stored < 200
    hub.stop()  # what the bridge could not store stays with the broker, unacknowledged

    # The exporter's part: the stream's records reach the cloud and are committed.
    configs = AgentSettings.load(hub.root).streams
    with Spool(hub.root / "spool", configs) as spool:
        first = [json.loads(p)["kit_seq"] for p in read_all(spool, "telemetry")]
        stream = spool.stream("telemetry")
        stream.commit(stream.metrics().last_sequence)
    assert first == list(range(stored))

    hub.start()
    wait_status(hub, lambda s: s["bridge"]["mappings"][0]["forwarded"] >= 200 - stored)
    hub.stop()
    rest = stored_readings(hub)["furnace-1"]
    assert sorted(set(first) | set(rest)) == list(range(200))
    assert set(rest) - set(first) == set(range(stored, 200))


class _CloudLink:
    """The hub's cloud connection as the bridge sees it: takes publishes, or refuses them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.refuse = False

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool, **_: Any) -> None:
        if self.refuse:
            raise CloudError("offline and 1000 messages wait (cloud.queue_limit)")
        self.sent.append((topic, payload))

    async def subscribe(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("no IotCore source here")


def test_ipc_messages_reach_the_cloud_or_the_dead_letters_with_the_reason(tmp_path: Path) -> None:
    config = parse_bridge(
        {
            "mqttTopicMapping": {
                "AlertsToCloud": {
                    "topic": "alerts/#",
                    "source": "Pubsub",
                    "target": "IotCore",
                    "targetTopicPrefix": "edgeloop/things/hub-1/",
                }
            }
        },
        source="agent.json",
    )
    cloud = _CloudLink()

    async def scenario() -> dict[str, Any]:
        pubsub = PubSub()
        with Spool(tmp_path / "spool") as spool:
            bridge = Bridge(config, spool=spool, pubsub=pubsub, cloud=cloud, state_dir=tmp_path)
            await bridge.start()
            pubsub.publish(Published("alerts/furnace", {"level": "high"}, False, "test.Alerter"))
            await asyncio.sleep(0.05)
            cloud.refuse = True
            pubsub.publish(Published("alerts/pump", b"dry run", True, "test.Alerter"))
            pubsub.publish(Published("alerts/x", b"mine", True, COMPONENT))  # not bridged back
            await asyncio.sleep(0.05)
            await spool.aflush()
            status = bridge.status()
            await bridge.stop()
            letters = [DeadLetter.decode(p) for p in read_all(spool, "dead-letter")]
        assert [(d.stream, d.payload) for d in letters] == [("bridge.AlertsToCloud", b"dry run")]
        assert "IotCore refused edgeloop/things/hub-1/alerts/pump" in letters[0].reason
        return status

    status = asyncio.run(scenario())
    assert cloud.sent == [("edgeloop/things/hub-1/alerts/furnace", b'{"level":"high"}')]
    (mapping,) = status["mappings"]
    assert (mapping["received"], mapping["forwarded"], mapping["deadLettered"]) == (2, 1, 1)
    assert status["state"] == "RUNNING" and status["lost"] == 0
