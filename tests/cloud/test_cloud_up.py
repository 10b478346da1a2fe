"""`cloud up` end to end: API, broker with mutual TLS, shadow and connectivity services, with
real devices (paho over mTLS, and the official AWS IoT Device SDK shadow client)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from edgeloop.cloud.service import Cloud, CloudSettings, connectivity_topic
from edgeloop.core.errors import CloudError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningCloud:
    """A cloud served from a background event loop, for synchronous tests."""

    def __init__(self, data_dir: Path) -> None:
        self.cloud = Cloud(CloudSettings(data_dir=data_dir, port=_free_port()))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.endpoints: dict[str, Any] = self._run(self.cloud.start())
        self.api = httpx.Client(base_url=self.endpoints["api"] + "/api/v1", timeout=30)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.api.close()
        self._run(self.cloud.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def _device(cloud: RunningCloud, tmp: Path) -> tuple[str, Path, Path]:
    thing = f"hub-{uuid.uuid4().hex[:8]}"
    assert cloud.api.post("/things", json={"thingName": thing}).status_code == 201
    issued = cloud.api.post(f"/things/{thing}/certificates", json={}).json()
    cert, key = tmp / f"{thing}.pem", tmp / f"{thing}.key"
    cert.write_text(issued["certificatePem"])
    key.write_text(issued["privateKeyPem"])
    return thing, cert, key


class Device:
    """A paho client with a client certificate, recording what it receives."""

    def __init__(
        self, cloud: RunningCloud, thing: str, cert: Path, key: Path, *, will: bool = True
    ):
        self.thing = thing
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=thing, protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=cloud.endpoints["caFile"], certfile=str(cert), keyfile=str(key)
        )
        if will:
            self.client.will_set(connectivity_topic(thing), b'{"connected": false}', 1, True)
        self.client.on_message = lambda c, u, m: self.received.append(
            (m.topic, json.loads(m.payload) if m.payload else {})
        )
        mq = cloud.endpoints["mqtt"]
        self.client.connect(mq["host"], mq["port"], keepalive=2)
        self.client.loop_start()

    def wait_for(self, topic: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for got, doc in self.received:
                if got == topic:
                    return doc
            time.sleep(0.02)
        raise AssertionError(f"nothing on {topic}; got {[t for t, _ in self.received]}")


def _connected(cloud: RunningCloud, thing: str) -> bool | None:
    info = cloud.api.get(f"/things/{thing}").json()["connectivity"]
    return info["connected"] if info else None


def _eventually(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_device_goes_online_syncs_its_shadow_and_goes_offline(
    cloud: RunningCloud, tmp_path: Path
) -> None:
    thing, cert, key = _device(cloud, tmp_path)
    device = Device(cloud, thing, cert, key)
    prefix = f"$aws/things/{thing}/shadow"
    device.client.subscribe(f"{prefix}/#", qos=1)
    time.sleep(0.3)
    birth = {"connected": True, "at": int(time.time() * 1000), "clientId": thing}
    device.client.publish(connectivity_topic(thing), json.dumps(birth), qos=1, retain=True)
    _eventually(lambda: _connected(cloud, thing) is True)

    update = {"state": {"reported": {"temp": 21.5}}, "clientToken": "c1"}
    device.client.publish(f"{prefix}/update", json.dumps(update), qos=1)
    accepted = device.wait_for(f"{prefix}/update/accepted")
    assert accepted["clientToken"] == "c1" and accepted["version"] == 1
    shadow = cloud.api.get(f"/things/{thing}/shadow").json()
    assert shadow["state"]["reported"] == {"temp": 21.5}

    # The cloud side asks for a change; the device hears the delta on its topic.
    cloud.api.post(f"/things/{thing}/shadow", json={"state": {"desired": {"temp": 19}}})
    device.client.publish(f"{prefix}/get", b"{}", qos=1)
    got = device.wait_for(f"{prefix}/get/accepted")
    assert got["state"]["delta"] == {"temp": 19}

    # Drop the connection without a DISCONNECT: the broker publishes the last will.
    device.client.socket().close()
    _eventually(lambda: _connected(cloud, thing) is False, timeout=15)
    device.client.loop_stop()


def test_a_device_cannot_touch_another_things_shadow(cloud: RunningCloud, tmp_path: Path) -> None:
    thing, cert, key = _device(cloud, tmp_path)
    other, _, _ = _device(cloud, tmp_path)
    device = Device(cloud, thing, cert, key, will=False)
    device.client.subscribe(f"$aws/things/{other}/shadow/#", qos=1)
    time.sleep(0.3)
    info = device.client.publish(
        f"$aws/things/{other}/shadow/update",
        json.dumps({"state": {"reported": {"hacked": True}}}),
        qos=1,
    )
    info.wait_for_publish(5)
    time.sleep(0.5)
    assert cloud.api.get(f"/things/{other}/shadow").status_code == 404
    device.client.disconnect()
    device.client.loop_stop()


def test_a_revoked_certificate_can_no_longer_connect(cloud: RunningCloud, tmp_path: Path) -> None:
    thing, cert, key = _device(cloud, tmp_path)
    certificate_id = cloud.api.get(f"/things/{thing}").json()["certificates"][0]["certificateId"]
    ok = Device(cloud, thing, cert, key, will=False)
    _eventually(ok.client.is_connected)  # the same certificate worked before
    ok.client.disconnect()
    ok.client.loop_stop()
    revoked = cloud.api.post(f"/certificates/{certificate_id}/revoke", json={"reason": "stolen"})
    assert revoked.status_code == 200 and revoked.json()["brokerNotified"] is True
    # With TLS 1.3 the server judges the client certificate after the client's handshake
    # ends, so the refusal shows as a connection that never gets its CONNACK.
    try:
        refused = Device(cloud, thing, cert, key, will=False)
    except (ssl.SSLError, OSError):
        return
    time.sleep(2)
    assert not refused.client.is_connected()
    refused.client.loop_stop()


def test_a_taken_api_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cloud = Cloud(CloudSettings(data_dir=tmp_path / "data", port=port))
        with pytest.raises(CloudError, match=f"API port 127.0.0.1:{port} is not free"):
            asyncio.run(cloud.start())
    assert cloud.broker is None  # nothing was left running
