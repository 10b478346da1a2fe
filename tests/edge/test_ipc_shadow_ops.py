"""Shadow and IoT Core IPC operations: handlers directly, then the official V2 client."""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeloop.edge.ipc import ops_iotcore, ops_shadow
from edgeloop.edge.ipc.authz import MQTT_PROXY, SHADOW, Authorizer
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.ops_iotcore import CloudMessage, MqttProperties
from edgeloop.edge.ipc.server import (
    ConflictError,
    InvalidArgumentsError,
    IpcServer,
    Operation,
    ResourceNotFoundError,
    ServiceError,
    UnauthorizedError,
)
from edgeloop.edge.shadows import LocalShadows

COMPONENT = "com.example.Shadowy"
NOW = 1_700_000_000.0

POLICIES: dict[str, Any] = {
    "accessControl": {
        SHADOW: {
            "com.example.Shadowy:shadow:1": {
                "operations": ["*"],
                "resources": ["$aws/things/pump-1/shadow", "$aws/things/pump-1/shadow/name/*"],
            }
        },
        MQTT_PROXY: {
            "com.example.Shadowy:mqttproxy:1": {
                "operations": [
                    "aws.greengrass#PublishToIoTCore",
                    "aws.greengrass#SubscribeToIoTCore",
                ],
                "resources": ["factory/#"],
            }
        },
    }
}


class FakeStream:
    """What handlers use of a server Stream."""

    def __init__(self, component: str = COMPONENT) -> None:
        self.component = component
        self.closed = False
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._on_close: list[Callable[[], Awaitable[None] | None]] = []
        self._after_response: list[Callable[[], Any]] = []

    def after_response(self, callback: Callable[[], Any]) -> None:
        self._after_response.append(callback)

    def responded(self) -> None:
        """What the server does once it has sent a streaming operation's response."""
        for callback in self._after_response:
            callback()

    def on_close(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        self._on_close.append(callback)

    async def send_event(self, model: str, body: dict[str, Any]) -> None:
        if self.closed:
            raise ConnectionError("stream closed")
        self.events.append((model, body))

    async def close(self) -> None:
        self.closed = True
        for callback in self._on_close:
            result = callback()
            if result is not None:
                await result


class FakeCloud:
    """An in-memory CloudLink."""

    def __init__(self, *, fail: Exception | None = None) -> None:
        self.published: list[tuple[str, bytes, int, bool, MqttProperties | None]] = []
        self.subscriptions: dict[int, tuple[str, int, Callable[[CloudMessage], None]]] = {}
        self.fail = fail
        self._next = 0

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        *,
        properties: MqttProperties | None = None,
    ) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.append((topic, payload, qos, retain, properties))

    async def subscribe(
        self, topic_filter: str, qos: int, callback: Callable[[CloudMessage], None]
    ) -> Callable[[], Awaitable[None]]:
        key = self._next
        self._next += 1
        self.subscriptions[key] = (topic_filter, qos, callback)

        async def unsubscribe() -> None:
            del self.subscriptions[key]

        return unsubscribe

    def deliver(self, message: CloudMessage) -> None:
        for _, _, callback in list(self.subscriptions.values()):
            callback(message)


def make_context(root: Path) -> IpcContext:
    shadows = LocalShadows(root / "shadows", clock=lambda: NOW, fsync=False)
    authorizer = Authorizer(lambda component: POLICIES if component == COMPONENT else {}, "hub")
    unused: Any = None  # the parts these operations never touch
    return IpcContext(
        settings=unused,
        authorizer=authorizer,
        pubsub=unused,
        supervisor=unused,
        deployments=unused,
        hub=unused,
        store=unused,
        events=unused,
        shadows=shadows,
    )


@pytest.fixture
def ctx(tmp_path: Path) -> IpcContext:
    return make_context(tmp_path)


def ops(ctx: IpcContext, cloud: ops_iotcore.CloudLink | None = None) -> dict[str, Operation]:
    return {op.name: op for op in ops_shadow.operations(ctx) + ops_iotcore.operations(ctx, cloud)}


def call(op: Operation, body: dict[str, Any], stream: FakeStream | None = None) -> dict[str, Any]:
    return asyncio.run(op.handler(stream or FakeStream(), body))  # type: ignore[arg-type]


def b64json(document: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def unb64json(payload: str) -> Any:
    return json.loads(base64.b64decode(payload))


# --- shadows -----------------------------------------------------------------------------


def test_update_get_delete_named_and_classic(ctx: IpcContext) -> None:
    o = ops(ctx)
    update = {"state": {"reported": {"rpm": 1200}}, "clientToken": "tok"}
    for name in (None, "", "config"):
        body: dict[str, Any] = {"thingName": "pump-1", "payload": b64json(update)}
        if name is not None:
            body["shadowName"] = name
        accepted = unb64json(call(o["UpdateThingShadow"], body)["payload"])
        assert accepted["state"] == update["state"]
        assert accepted["clientToken"] == "tok"
        assert accepted["metadata"] == {"reported": {"rpm": {"timestamp": int(NOW)}}}
    # None and "" are both the classic shadow: updated twice.
    got = unb64json(call(o["GetThingShadow"], {"thingName": "pump-1"})["payload"])
    assert got["version"] == 2 and got["state"] == {"reported": {"rpm": 1200}}
    named = call(o["GetThingShadow"], {"thingName": "pump-1", "shadowName": "config"})
    assert unb64json(named["payload"])["version"] == 1

    # ShadowManager answers a delete with an empty payload.
    deleted = call(o["DeleteThingShadow"], {"thingName": "pump-1", "shadowName": "config"})
    assert deleted == {"payload": ""}
    with pytest.raises(ResourceNotFoundError) as err:
        call(o["GetThingShadow"], {"thingName": "pump-1", "shadowName": "config"})
    assert err.value.fields == {
        "resourceType": "shadow",
        "resourceName": "$aws/things/pump-1/shadow/name/config",
    }
    assert "'config'" in err.value.message and "'pump-1'" in err.value.message


def test_missing_shadow_errors_name_the_shadow(ctx: IpcContext) -> None:
    o = ops(ctx)
    for name in ("GetThingShadow", "DeleteThingShadow"):
        with pytest.raises(ResourceNotFoundError) as err:
            call(o[name], {"thingName": "pump-1"})
        assert (
            err.value.message
            == "No shadow found: the classic shadow of thing 'pump-1' does not exist"
        )


def test_version_conflict_is_a_conflict_error_with_both_versions(ctx: IpcContext) -> None:
    o = ops(ctx)
    body = {"thingName": "pump-1", "payload": b64json({"state": {"reported": {"a": 1}}})}
    call(o["UpdateThingShadow"], body)
    stale = {"state": {"reported": {"a": 2}}, "version": 5}
    with pytest.raises(ConflictError) as err:
        call(o["UpdateThingShadow"], {"thingName": "pump-1", "payload": b64json(stale)})
    message = err.value.message
    assert "the classic shadow of thing 'pump-1'" in message
    assert "version 5" in message and "current version 1" in message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "thingName is required"),
        ({"thingName": "bad name"}, "Invalid thing name 'bad name'"),
        ({"thingName": "pump-1", "shadowName": "a/b"}, "Invalid shadow name 'a/b'"),
        ({"thingName": "pump-1", "shadowName": 3}, "shadowName must be a string"),
        ({"thingName": "pump-1"}, "payload is required"),
        ({"thingName": "pump-1", "payload": "@@@"}, "not valid base64"),
        (
            {"thingName": "pump-1", "payload": base64.b64encode(b"{nope").decode()},
            "Invalid JSON (code 400)",
        ),
        (
            {"thingName": "pump-1", "payload": base64.b64encode(b"\xff\xfe").decode()},
            "(code 415)",
        ),
        (
            {"thingName": "pump-1", "payload": b64json({"state": {"reported": {"x": "y" * 9000}}})},
            "(code 413)",
        ),
        (
            {"thingName": "pump-1", "payload": b64json({"state": {"other": {}}})},
            "State contains an invalid node",
        ),
    ],
)
def test_bad_updates_are_invalid_arguments(
    ctx: IpcContext, body: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidArgumentsError) as err:
        call(ops(ctx)["UpdateThingShadow"], body)
    assert words in err.value.message


def test_authorization_uses_the_shadow_topic_prefix(ctx: IpcContext) -> None:
    o = ops(ctx)
    body = {"thingName": "pump-2", "payload": b64json({"state": {"reported": {"a": 1}}})}
    with pytest.raises(UnauthorizedError) as err:
        call(o["UpdateThingShadow"], body)
    assert "'$aws/things/pump-2/shadow'" in err.value.message
    with pytest.raises(UnauthorizedError) as err:
        call(o["GetThingShadow"], {"thingName": "pump-1"}, FakeStream("com.example.Other"))
    with pytest.raises(UnauthorizedError) as err:
        call(o["ListNamedShadowsForThing"], {"thingName": "pump-2"})
    assert "'$aws/things/pump-2/shadow'" in err.value.message
    # Authorization comes before the store is touched: nothing was created.
    assert ctx.shadows.document("pump-2") is None


def test_list_named_shadows_pages(ctx: IpcContext) -> None:
    o = ops(ctx)
    for name in ["c", "a", "b", ""]:
        body = {"thingName": "pump-1", "shadowName": name, "payload": b64json({"state": {}})}
        call(o["UpdateThingShadow"], body)
    first = call(o["ListNamedShadowsForThing"], {"thingName": "pump-1", "pageSize": 2})
    assert first["results"] == ["a", "b"] and first["timestamp"] == NOW
    rest = call(
        o["ListNamedShadowsForThing"],
        {"thingName": "pump-1", "pageSize": 2, "nextToken": first["nextToken"]},
    )
    assert rest == {"results": ["c"], "timestamp": NOW}
    everything = call(o["ListNamedShadowsForThing"], {"thingName": "pump-1"})
    assert everything == {"results": ["a", "b", "c"], "timestamp": NOW}
    for bad in ({"pageSize": 0}, {"pageSize": 101}, {"pageSize": "2"}, {"nextToken": "junk"}):
        with pytest.raises(InvalidArgumentsError):
            call(o["ListNamedShadowsForThing"], {"thingName": "pump-1", **bad})


def test_shadow_store_failure_is_a_service_error(tmp_path: Path) -> None:
    (tmp_path / "shadows").write_text("a file where the folder should be")
    o = ops(make_context(tmp_path))
    with pytest.raises(ServiceError) as err:
        body = {"thingName": "pump-1", "payload": b64json({"state": {"reported": {"a": 1}}})}
        call(o["UpdateThingShadow"], body)
    assert "the classic shadow of thing 'pump-1'" in err.value.message


# --- IoT Core ----------------------------------------------------------------------------


def test_without_a_cloud_link_nothing_is_accepted(ctx: IpcContext) -> None:
    o = ops(ctx, None)
    body = {"topicName": "factory/line1", "payload": base64.b64encode(b"hi").decode()}
    with pytest.raises(ServiceError) as err:
        call(o["PublishToIoTCore"], body)
    assert "no cloud connection configured" in err.value.message
    assert "NOT accepted" in err.value.message
    with pytest.raises(ServiceError) as err:
        call(o["SubscribeToIoTCore"], {"topicName": "factory/#"})
    assert "no cloud connection configured" in err.value.message


def test_iot_core_topics_are_validated_then_authorized(ctx: IpcContext) -> None:
    o = ops(ctx, FakeCloud())
    with pytest.raises(InvalidArgumentsError):
        call(o["PublishToIoTCore"], {"topicName": "factory/+"})
    with pytest.raises(InvalidArgumentsError):
        call(o["SubscribeToIoTCore"], {"topicName": "factory/#/x"})
    with pytest.raises(InvalidArgumentsError):
        call(o["PublishToIoTCore"], {"topicName": "factory/a", "qos": "2"})
    with pytest.raises(UnauthorizedError):
        call(o["PublishToIoTCore"], {"topicName": "office/a"})
    with pytest.raises(UnauthorizedError):
        call(o["SubscribeToIoTCore"], {"topicName": "#"})


def test_publish_forwards_to_the_cloud_link(ctx: IpcContext) -> None:
    cloud = FakeCloud()
    o = ops(ctx, cloud)
    body = {
        "topicName": "factory/line1",
        "qos": "0",
        "payload": base64.b64encode(b"\x00data").decode(),
        "retain": True,
        "userProperties": [{"key": "k", "value": "v"}],
        "contentType": "application/octet-stream",
    }
    assert call(o["PublishToIoTCore"], body) == {}
    assert call(o["PublishToIoTCore"], {"topicName": "factory/line2"}) == {}
    assert cloud.published == [
        (
            "factory/line1",
            b"\x00data",
            0,
            True,
            MqttProperties(user_properties=(("k", "v"),), content_type="application/octet-stream"),
        ),
        ("factory/line2", b"", 1, False, None),  # no qos: AT_LEAST_ONCE, as the nucleus
    ]
    cloud.fail = ConnectionError("offline")
    with pytest.raises(ServiceError) as err:
        call(o["PublishToIoTCore"], {"topicName": "factory/line1"})
    assert "offline" in err.value.message and "NOT published" in err.value.message


def test_subscribe_streams_messages_and_unsubscribes_on_close(ctx: IpcContext) -> None:
    model = pytest.importorskip("awsiot.greengrasscoreipc.model")
    cloud = FakeCloud()
    o = ops(ctx, cloud)

    async def scenario() -> FakeStream:
        stream = FakeStream()
        response = await o["SubscribeToIoTCore"].handler(
            stream,  # type: ignore[arg-type]
            {"topicName": "factory/+/temp", "qos": "0"},
        )
        assert response == {}
        assert [(f, q) for f, q, _ in cloud.subscriptions.values()] == [("factory/+/temp", 0)]
        cloud.deliver(CloudMessage("factory/l1/temp", b"21.5"))
        await asyncio.sleep(0)
        assert stream.events == []  # nothing may overtake the response
        stream.responded()
        props = MqttProperties(correlation_data=b"\x01", payload_format_utf8=True)
        cloud.deliver(CloudMessage("factory/l2/temp", b"22", retain=True, properties=props))
        for _ in range(20):
            await asyncio.sleep(0)
        await stream.close()
        assert cloud.subscriptions == {}
        cloud.deliver(CloudMessage("factory/l3/temp", b"late"))  # nobody left to hear it
        return stream

    stream = asyncio.run(scenario())
    assert [model for model, _ in stream.events] == ["IoTCoreMessage", "IoTCoreMessage"]
    first, second = (body["message"] for _, body in stream.events)
    assert first == {"topicName": "factory/l1/temp", "payload": "MjEuNQ==", "retain": False}
    # The SDK's own decoder reads our events.
    decoded = model.IoTCoreMessage._from_payload(stream.events[1][1])
    assert decoded.message.topic_name == "factory/l2/temp"
    assert decoded.message.payload == b"22"
    assert decoded.message.retain is True
    assert decoded.message.correlation_data == b"\x01"
    assert decoded.message.payload_format == model.PayloadFormat.UTF8
    assert second["payloadFormat"] == "1"


def test_a_slow_subscriber_loses_the_oldest_messages(
    ctx: IpcContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops_iotcore, "QUEUE_LIMIT", 3)
    cloud = FakeCloud()
    o = ops(ctx, cloud)

    async def scenario() -> FakeStream:
        stream = FakeStream()
        await o["SubscribeToIoTCore"].handler(stream, {"topicName": "factory/#"})  # type: ignore[arg-type]
        for i in range(5):  # all arrive before the response is sent
            cloud.deliver(CloudMessage("factory/x", str(i).encode()))
        stream.responded()
        for _ in range(20):
            await asyncio.sleep(0)
        await stream.close()
        return stream

    stream = asyncio.run(scenario())
    payloads = [base64.b64decode(body["message"]["payload"]) for _, body in stream.events]
    assert payloads == [b"2", b"3", b"4"]


# --- the official client, end to end ----------------------------------------------------


class BackgroundServer:
    """An IpcServer on its own event loop thread."""

    def __init__(self, server: IpcServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ipc-server")

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to about 100 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="el-") as folder:
        yield Path(folder)


def test_official_v2_client_end_to_end(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clientv2 = pytest.importorskip("awsiot.greengrasscoreipc.clientv2")
    model = pytest.importorskip("awsiot.greengrasscoreipc.model")
    ctx = make_context(short_dir)
    socket = short_dir / "ipc.socket"
    server = IpcServer(socket, lambda token: COMPONENT if token == "secret" else None)
    server.register(*ops_shadow.operations(ctx), *ops_iotcore.operations(ctx, None))
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", str(socket))
    monkeypatch.setenv("SVCUID", "secret")

    with BackgroundServer(server):
        ipc = clientv2.GreengrassCoreIPCClientV2()
        try:
            update = {"state": {"desired": {"rpm": 1500}, "reported": {"rpm": 1200}}}
            response = ipc.update_thing_shadow(
                thing_name="pump-1", shadow_name="config", payload=json.dumps(update).encode()
            )
            accepted = json.loads(response.payload)
            assert accepted["version"] == 1 and accepted["state"] == update["state"]

            got = ipc.get_thing_shadow(thing_name="pump-1", shadow_name="config")
            document = json.loads(got.payload)
            assert document["state"]["delta"] == {"rpm": 1500}
            assert document["version"] == 1

            stale = json.dumps({"state": {"reported": {"rpm": 1}}, "version": 7}).encode()
            with pytest.raises(model.ConflictError) as conflict:
                ipc.update_thing_shadow(thing_name="pump-1", shadow_name="config", payload=stale)
            assert "Version conflict" in conflict.value.message

            with pytest.raises(model.ResourceNotFoundError) as missing:
                ipc.get_thing_shadow(thing_name="pump-1", shadow_name="nothing")
            assert missing.value.resource_type == "shadow"
            assert "'nothing'" in missing.value.message

            with pytest.raises(model.UnauthorizedError):
                ipc.get_thing_shadow(thing_name="pump-2")

            ipc.update_thing_shadow(
                thing_name="pump-1", shadow_name="alarms", payload=b'{"state":{}}'
            )
            listed = ipc.list_named_shadows_for_thing(thing_name="pump-1", page_size=1)
            assert listed.results == ["alarms"] and listed.next_token
            assert listed.timestamp.timestamp() == NOW
            rest = ipc.list_named_shadows_for_thing(
                thing_name="pump-1", page_size=1, next_token=listed.next_token
            )
            assert rest.results == ["config"] and rest.next_token is None

            deleted = ipc.delete_thing_shadow(thing_name="pump-1", shadow_name="alarms")
            assert deleted.payload == b""

            with pytest.raises(model.ServiceError) as no_cloud:
                ipc.publish_to_iot_core(topic_name="factory/line1", qos="1", payload=b"x")
            assert "no cloud connection configured" in no_cloud.value.message
        finally:
            ipc.close()

    # What the client changed is on disk for the next agent.
    again = LocalShadows(short_dir / "shadows")
    assert again.get("pump-1", "config")["version"] == 1
    assert again.document("pump-1", "alarms") is None
