"""The official AWS IoT Device SDK shadow client, unmodified, against edgeloop's cloud:
MQTT 3.1.1 and MQTT 5, over mutual TLS."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from awscrt import mqtt
from awsiot import iotshadow, mqtt5_client_builder, mqtt_connection_builder

from tests.cloud.test_cloud_up import RunningCloud, _device


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def _mqtt311(cloud: RunningCloud, thing: str, cert: Path, key: Path) -> Any:
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=cloud.endpoints["mqtt"]["host"],
        port=cloud.endpoints["mqtt"]["port"],
        cert_filepath=str(cert),
        pri_key_filepath=str(key),
        ca_filepath=cloud.endpoints["caFile"],
        client_id=thing,
        clean_session=True,
        keep_alive_secs=30,
    )
    connection.connect().result(10)
    return connection


def _mqtt5(cloud: RunningCloud, thing: str, cert: Path, key: Path) -> Any:
    connected = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=cloud.endpoints["mqtt"]["host"],
        port=cloud.endpoints["mqtt"]["port"],
        cert_filepath=str(cert),
        pri_key_filepath=str(key),
        ca_filepath=cloud.endpoints["caFile"],
        client_id=thing,
        on_lifecycle_connection_success=lambda data: connected.set(),
    )
    client.start()
    assert connected.wait(10), "the MQTT 5 client did not connect"
    return client


@pytest.mark.parametrize("protocol", ["mqtt311", "mqtt5"])
def test_official_shadow_client_updates_and_gets_its_shadow(
    cloud: RunningCloud, tmp_path: Path, protocol: str
) -> None:
    thing, cert, key = _device(cloud, tmp_path)
    link = (_mqtt311 if protocol == "mqtt311" else _mqtt5)(cloud, thing, cert, key)
    client = iotshadow.IotShadowClient(link)
    qos = mqtt.QoS.AT_LEAST_ONCE
    accepted: Future[Any] = Future()
    delta: Future[Any] = Future()
    got: Future[Any] = Future()
    rejected: Future[Any] = Future()
    token = uuid.uuid4().hex

    client.subscribe_to_update_shadow_accepted(
        iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing),
        qos,
        lambda r: accepted.done() or accepted.set_result(r),
    )[0].result(10)
    client.subscribe_to_shadow_delta_updated_events(
        iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing),
        qos,
        lambda r: delta.done() or delta.set_result(r),
    )[0].result(10)
    client.subscribe_to_get_shadow_accepted(
        iotshadow.GetShadowSubscriptionRequest(thing_name=thing), qos, got.set_result
    )[0].result(10)
    client.subscribe_to_update_shadow_rejected(
        iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), qos, rejected.set_result
    )[0].result(10)

    state = iotshadow.ShadowState(reported={"fan": "off"}, desired={"fan": "on"})
    client.publish_update_shadow(
        iotshadow.UpdateShadowRequest(thing_name=thing, state=state, client_token=token), qos
    ).result(10)
    response = accepted.result(10)
    assert response.client_token == token and response.version == 1
    assert delta.result(10).state == {"fan": "on"}

    client.publish_get_shadow(iotshadow.GetShadowRequest(thing_name=thing), qos).result(10)
    shadow = got.result(10)
    assert shadow.state.reported == {"fan": "off"} and shadow.state.delta == {"fan": "on"}

    # A stale version is refused with AWS's error document, parsed by the SDK.
    client.publish_update_shadow(
        iotshadow.UpdateShadowRequest(thing_name=thing, state=state, version=99), qos
    ).result(10)
    error = rejected.result(10)
    assert error.code == 409

    if protocol == "mqtt311":
        link.disconnect().result(10)
    else:
        link.stop()
