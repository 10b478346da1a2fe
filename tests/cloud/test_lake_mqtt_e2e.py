"""High-priority telemetry over MQTT into the lake, through `cloud up`: a hub publishes a
batch (QoS 1) on its own telemetry topic and the lake holds each reading once; a hub cannot
publish on another thing's topic; what arrived while the cloud's services were away is
delivered to them when they are back (their session persists in the broker)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeloop.core.telemetry import (
    Reading,
    Record,
    TelemetryBatch,
    encode_batch,
    encode_reading,
    telemetry_topic,
)
from tests.cloud.test_cloud_up import Device, RunningCloud, _device, _eventually


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def _batch(thing: str, stream: str, first: int, count: int) -> bytes:
    now = time.time()
    records = tuple(
        Record(
            sequence,
            int(now * 1e6),
            encode_reading(
                Reading(
                    kit=f"{thing}-kit",
                    appliance="furnace",
                    ts=now,
                    sensors={"supply_temp_c": 40.0 + sequence},
                    kit_seq=sequence,
                    label="normal",
                )
            ),
        )
        for sequence in range(first, first + count)
    )
    return encode_batch(TelemetryBatch(thing, stream, records))


def _rows(cloud: RunningCloud, thing: str) -> list[dict[str, Any]]:
    ctx = cloud.cloud.ctx
    assert ctx is not None
    return ctx.lake.rows(f"SELECT sequence FROM telemetry WHERE thing = '{thing}' ORDER BY 1")


def _publish(device: Device, topic: str, payload: bytes) -> bool:
    info = device.client.publish(topic, payload, qos=1)
    info.wait_for_publish(10)
    return bool(info.is_published())


def test_a_hubs_alerts_reach_the_lake_once(cloud: RunningCloud, tmp_path: Path) -> None:
    thing, cert, key = _device(cloud, tmp_path)
    device = Device(cloud, thing, cert, key, will=False)
    _eventually(device.client.is_connected)
    try:
        topic = telemetry_topic(thing, "alerts")
        assert _publish(device, topic, _batch(thing, "alerts", 1, 3))
        assert _publish(device, topic, _batch(thing, "alerts", 2, 3))  # 2 and 3 again, and 4
        _eventually(lambda: len(_rows(cloud, thing)) == 4)
        assert [row["sequence"] for row in _rows(cloud, thing)] == [1, 2, 3, 4]

        # Another thing's topic: the broker refuses it, and nothing lands under that name.
        other, _, _ = _device(cloud, tmp_path)
        device.client.publish(telemetry_topic(other, "alerts"), _batch(other, "alerts", 1, 1), 1)
        time.sleep(1)
        assert _rows(cloud, other) == []
    finally:
        device.client.disconnect()
        device.client.loop_stop()


def test_telemetry_published_while_the_services_are_away_is_kept(
    cloud: RunningCloud, tmp_path: Path
) -> None:
    thing, cert, key = _device(cloud, tmp_path)
    device = Device(cloud, thing, cert, key, will=False)
    _eventually(device.client.is_connected)
    services = cloud.cloud.services
    assert services is not None
    try:
        services.client.disconnect()  # the services go away; the broker stays up
        services.client.loop_stop()
        time.sleep(0.5)
        topic = telemetry_topic(thing, "events")
        assert _publish(device, topic, _batch(thing, "events", 1, 5))  # the broker has it
        time.sleep(0.5)
        assert _rows(cloud, thing) == []
        services.client.reconnect()
        services.client.loop_start()
        _eventually(lambda: len(_rows(cloud, thing)) == 5, timeout=20)
    finally:
        device.client.disconnect()
        device.client.loop_stop()


def test_the_lake_takes_alerts_before_anything_else_named_like_a_service(
    cloud: RunningCloud, tmp_path: Path
) -> None:
    # A stream called "connectivity" is telemetry, not a connectivity report.
    thing, cert, key = _device(cloud, tmp_path)
    device = Device(cloud, thing, cert, key, will=False)
    _eventually(device.client.is_connected)
    try:
        stream = "connectivity"
        assert _publish(device, telemetry_topic(thing, stream), _batch(thing, stream, 7, 1))
        _eventually(lambda: [r["sequence"] for r in _rows(cloud, thing)] == [7])
    finally:
        device.client.disconnect()
        device.client.loop_stop()
