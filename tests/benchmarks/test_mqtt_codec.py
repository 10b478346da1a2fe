"""The benchmarks' minimal MQTT 5 codec: round trips, and a session with a real Mosquitto."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks import _mqtt as mqtt

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@given(st.integers(min_value=0, max_value=268_435_455))
def test_varint_round_trip(value: int) -> None:
    encoded = mqtt.varint(value)
    assert len(encoded) <= 4
    assert mqtt.read_varint(encoded + b"\xff", 0) == (value, len(encoded))
    assert mqtt.read_varint(encoded[:-1], 0) is None  # cut short: wait for more


@given(
    topic=st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\x00+#"),
        min_size=1,
        max_size=80,
    ),
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1]),
    retain=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=10),
)
def test_publish_decodes_from_any_chunking(
    topic: str, payload: bytes, qos: int, retain: bool, cuts: list[int]
) -> None:
    wire = mqtt.publish(topic, payload, qos=qos, retain=retain, packet_id=7 if qos else 0)
    wire += bytes([mqtt.PINGRESP << 4, 0])
    decoder, packets, at = mqtt.Decoder(), [], 0
    for cut in [*cuts, len(wire)]:
        packets += decoder.feed(wire[at : at + cut])
        at += cut
    packets += decoder.feed(wire[at:])
    assert [p.kind for p in packets] == [mqtt.PUBLISH, mqtt.PINGRESP]
    got = packets[0]
    assert (got.topic, got.payload, got.qos, got.retain) == (topic, payload, qos, retain)
    assert got.packet_id == (7 if qos else 0)


def test_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(mqtt.ProtocolError):
        mqtt.publish("t", b"", qos=2)
    with pytest.raises(mqtt.ProtocolError):
        mqtt.publish("t", b"", qos=1)  # no packet id
    with pytest.raises(mqtt.ProtocolError):
        mqtt.varint(268_435_456)


# -- against Mosquitto ------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (make system-packages)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


class Wire:
    """A blocking socket speaking the codec, for the test."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.decoder = mqtt.Decoder()
        self.packets: list[mqtt.Packet] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self, kind: int) -> mqtt.Packet:
        while True:
            for index, packet in enumerate(self.packets):
                if packet.kind == kind:
                    return self.packets.pop(index)
            data = self.sock.recv(65536)
            assert data, "the broker closed the connection"
            self.packets += self.decoder.feed(data)


def test_a_session_with_mosquitto(broker: int) -> None:
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="watcher", protocol=paho.MQTTv5)
    wills: list[bytes] = []
    got_will = threading.Event()

    def on_message(client: object, userdata: object, message: paho.MQTTMessage) -> None:
        wills.append(bytes(message.payload))
        got_will.set()

    watcher.on_message = on_message
    watcher.connect("127.0.0.1", broker)
    watcher.subscribe("bench/+/state", qos=1)
    watcher.loop_start()
    try:
        hub = Wire(broker)
        hub.send(
            mqtt.connect(
                "hub-1",
                keepalive=60,
                clean_start=False,
                session_expiry=300,
                will_topic="bench/hub-1/state",
                will_payload=b'{"connected":false}',
                will_qos=1,
                will_retain=True,
            )
        )
        ack = hub.next(mqtt.CONNACK)
        assert (ack.reason, ack.session_present) == (0, False)
        hub.send(mqtt.subscribe(1, [("bench/hub-1/#", 1), ("bench/other", 0)]))
        assert hub.next(mqtt.SUBACK).reasons == b"\x01\x00"
        hub.send(mqtt.publish("bench/hub-1/birth", b"hello", qos=1, retain=True, packet_id=2))
        assert hub.next(mqtt.PUBACK).packet_id == 2
        echo = hub.next(mqtt.PUBLISH)
        assert (echo.topic, echo.payload, echo.qos) == ("bench/hub-1/birth", b"hello", 1)
        hub.send(mqtt.puback(echo.packet_id))

        # paho adds properties, which the decoder must step over to find the payload.
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = ("k", "v")
        properties.CorrelationData = b"\x00\x01"
        watcher.publish("bench/hub-1/cmd", b'{"go":1}', qos=1, properties=properties)
        command = hub.next(mqtt.PUBLISH)
        assert (command.topic, command.payload) == ("bench/hub-1/cmd", b'{"go":1}')
        hub.send(mqtt.puback(command.packet_id))

        hub.send(mqtt.PINGREQ_PACKET)
        hub.next(mqtt.PINGRESP)
        hub.sock.close()  # no DISCONNECT: the broker sends the will
        assert got_will.wait(5)
        assert wills == [b'{"connected":false}']
    finally:
        watcher.loop_stop()
        watcher.disconnect()
