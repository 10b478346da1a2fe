"""The SDK's IPC client against a real IpcServer with the real pub/sub router and authorizer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import edgeloop.sdk
from edgeloop.core.eventstream import Decoder, Int32, Message, encode
from edgeloop.core.eventstream_rpc import (
    CONTENT_TYPE,
    MESSAGE_FLAGS,
    MESSAGE_TYPE,
    OPERATION,
    SERVICE_MODEL_TYPE,
    STREAM_ID,
    VERSION,
    MessageFlag,
    MessageType,
    parse,
)
from edgeloop.edge.ipc import ops_pubsub
from edgeloop.edge.ipc.authz import Authorizer
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.pubsub import PubSub
from edgeloop.edge.ipc.server import IpcServer, Operation, ServiceError, Stream
from edgeloop.sdk import (
    InvalidArgumentsError,
    IpcClient,
    IpcConnectionError,
    IpcError,
    IpcTimeoutError,
    TopicMessage,
    UnauthorizedError,
)
from edgeloop.sdk import ServiceError as ClientServiceError

A, B = "com.example.A", "com.example.B"

CONFIG: dict[str, dict[str, Any]] = {
    A: {
        "accessControl": {
            "aws.greengrass.ipc.pubsub": {
                "com.example.A:pubsub:1": {
                    "policyDescription": "A may publish and subscribe anywhere",
                    "operations": ["*"],
                    "resources": ["*"],
                }
            }
        }
    },
    B: {
        "accessControl": {
            "aws.greengrass.ipc.pubsub": {
                "com.example.B:pubsub:1": {
                    "operations": ["aws.greengrass#SubscribeToTopic"],
                    "resources": ["*"],
                },
                "com.example.B:pubsub:2": {
                    "operations": ["aws.greengrass#PublishToTopic"],
                    "resources": ["t/*"],
                },
            }
        }
    },
}


def authenticate(token: str) -> str | None:
    return A if token == "tok-a" else (B if token == "tok-b" else None)


@dataclass
class Hub:
    """A running IpcServer, its router, and what the stub operations recorded."""

    server: IpcServer
    pubsub: PubSub
    path: Path
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, token: str = "tok-a") -> IpcClient:
        return await IpcClient.connect(self.path, token, timeout=5)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path is often longer.
    folder = Path(tempfile.mkdtemp(prefix="elipc-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def topic_prefix() -> str:
    return f"t/{uuid.uuid4().hex[:10]}"


def _stub_operations(hub: Hub) -> list[Operation]:
    """Operations whose handlers record the request shape, to check the client's encoding."""

    def recorder(name: str, answer: dict[str, Any]) -> Operation:
        async def handler(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
            hub.requests.append((name, body))
            return answer

        return Operation(name, handler, inline=True)

    doc = {"state": {"reported": {"on": True}}, "version": 3}
    b64doc = base64.b64encode(json.dumps(doc).encode()).decode()

    async def list_named(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        hub.requests.append(("ListNamedShadowsForThing", body))
        if body.get("nextToken") == "page2":
            return {"results": ["c"], "timestamp": 1.5}
        return {"results": ["a", "b"], "nextToken": "page2", "timestamp": 1.5}

    async def hang(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        await hub.release.wait()
        return {}

    def streaming(name: str, events: list[dict[str, Any]], error: bool) -> Operation:
        async def send_events(stream: Stream) -> None:
            for event in events:
                await stream.send_event(f"{name}Event", event)
            if error:
                await stream.connection._error(stream, ServiceError("the watcher broke"))
            else:
                await stream.close()

        async def handler(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
            hub.requests.append((name, body))
            stream.after_response(lambda: asyncio.create_task(send_events(stream)))
            return {}

        return Operation(name, handler, streaming=True, inline=True)

    return [
        recorder("GetConfiguration", {"componentName": A, "value": {"b": 5}}),
        recorder("UpdateConfiguration", {}),
        recorder("UpdateState", {}),
        recorder("DeferComponentUpdate", {}),
        recorder("SendConfigurationValidityReport", {}),
        recorder("GetThingShadow", {"payload": b64doc}),
        recorder("UpdateThingShadow", {"payload": b64doc}),
        recorder("DeleteThingShadow", {"payload": ""}),
        recorder("PublishToIoTCore", {}),
        Operation("ListNamedShadowsForThing", list_named, inline=True),
        Operation("Hang", hang),
        streaming(
            "SubscribeToComponentUpdates", [{"preUpdateEvent": {"deploymentId": "d1"}}] * 2, False
        ),
        streaming("SubscribeToValidateConfigurationUpdates", [{"n": 1}], True),
    ]


@contextlib.asynccontextmanager
async def running_hub(folder: Path) -> AsyncIterator[Hub]:
    pubsub = PubSub()
    ctx = IpcContext(
        settings=None,  # type: ignore[arg-type]
        authorizer=Authorizer(lambda name: CONFIG[name], "thing"),
        pubsub=pubsub,
        supervisor=None,  # type: ignore[arg-type]
        deployments=None,  # type: ignore[arg-type]
        hub=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        events=None,  # type: ignore[arg-type]
        shadows=None,  # type: ignore[arg-type]
    )
    server = IpcServer(folder / "ipc.sock", authenticate)
    hub = Hub(server, pubsub, server.path)
    server.register(*ops_pubsub.operations(ctx), *_stub_operations(hub))
    await server.start()
    try:
        yield hub
    finally:
        hub.release.set()
        await server.close()


def run(folder: Path, body: Callable[[Hub], Awaitable[None]], timeout: float = 60) -> None:
    async def main() -> None:
        async with running_hub(folder) as hub:
            await asyncio.wait_for(body(hub), timeout)

    asyncio.run(main())


async def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def take(sub: edgeloop.sdk.Subscription[Any], count: int, timeout: float = 5) -> list[Any]:
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        async for item in sub:
            out.append(item)
            if len(out) == count:
                break
    return out


# -- raw sockets, for misbehaving or never-reading peers ----------------------------------
def _rpc(
    kind: MessageType, stream_id: int, flags: MessageFlag = MessageFlag.NONE
) -> dict[str, Any]:
    return {
        MESSAGE_TYPE: Int32(int(kind)),
        MESSAGE_FLAGS: Int32(int(flags)),
        STREAM_ID: Int32(stream_id),
    }


async def raw_subscriber(
    path: Path, token: str, topic: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Handshake and subscribe by hand, then leave the socket unread."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    connect = _rpc(MessageType.CONNECT, 0)
    connect[VERSION] = "0.1.0"
    writer.write(encode(Message(connect, json.dumps({"authToken": token}).encode())))
    request = _rpc(MessageType.APPLICATION_MESSAGE, 1)
    request[CONTENT_TYPE] = "application/json"
    request[SERVICE_MODEL_TYPE] = "aws.greengrass#SubscribeToTopicRequest"
    request[OPERATION] = "aws.greengrass#SubscribeToTopic"
    writer.write(encode(Message(request, json.dumps({"topic": topic}).encode())))
    await writer.drain()
    decoder = Decoder()
    seen: list[MessageType] = []
    while len(seen) < 2:
        for message in decoder.feed(await reader.read(4096)):
            seen.append(parse(message).message_type)
    assert seen[:2] == [MessageType.CONNECT_ACK, MessageType.APPLICATION_MESSAGE]
    return reader, writer


# -- the public surface ------------------------------------------------------------------
def test_public_api_is_curated() -> None:
    assert sorted(edgeloop.sdk.__all__) == sorted(
        [
            "ComponentNotFoundError",
            "ConflictError",
            "FailedUpdateConditionCheckError",
            "InvalidArgumentsError",
            "IpcClient",
            "IpcConnectionError",
            "IpcError",
            "IpcTimeoutError",
            "ResourceNotFoundError",
            "ServiceError",
            "Subscription",
            "TopicMessage",
            "UnauthorizedError",
        ]
    )
    for name in edgeloop.sdk.__all__:
        assert getattr(edgeloop.sdk, name) is not None
    for name in ("ServiceError", "UnauthorizedError", "ResourceNotFoundError", "ConflictError"):
        assert issubclass(getattr(edgeloop.sdk, name), IpcError)


# -- connecting --------------------------------------------------------------------------
def test_connect_accepted_and_closed(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as client:
            assert client.connected
            await eventually(lambda: [c.component for c in hub.server.connections] == [A])
        assert not client.connected
        await eventually(lambda: not hub.server.connections)
        with pytest.raises(IpcConnectionError, match="closed"):
            await client.publish_json("t/x", 1)

    run(sock_dir, body)


def test_connect_refused_token(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        with pytest.raises(IpcConnectionError, match=r"^the agent refused the auth token"):
            await hub.client("tok-unknown")

    run(sock_dir, body)


def test_connect_reads_the_environment(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", raising=False)
    monkeypatch.delenv("SVCUID", raising=False)

    async def body(hub: Hub) -> None:
        with pytest.raises(
            IpcConnectionError, match="AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
        ):
            await IpcClient.connect()
        monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", str(hub.path))
        with pytest.raises(IpcConnectionError, match="SVCUID is not set"):
            await IpcClient.connect()
        monkeypatch.setenv("SVCUID", "tok-b")
        async with await IpcClient.connect() as client:
            await client.publish_json("t/env", {"ok": True})

    run(sock_dir, body)


def test_connect_without_an_agent(sock_dir: Path) -> None:
    async def main() -> None:
        with pytest.raises(IpcConnectionError, match="is the agent running"):
            await IpcClient.connect(sock_dir / "nothing.sock", "tok-a")

    asyncio.run(main())


# -- publish / subscribe -----------------------------------------------------------------
def test_publish_json_and_binary_to_a_wildcard_subscriber(sock_dir: Path) -> None:
    prefix = topic_prefix()

    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as pub, await hub.client("tok-b") as sub_client:
            sub = await sub_client.subscribe_topic(f"{prefix}/+/x")
            everything = await sub_client.subscribe_topic(f"{prefix}/#")
            await pub.publish_json(f"{prefix}/one/x", {"a": 1, "ü": [1.5, None]})
            await pub.publish_binary(f"{prefix}/two/x", b"\x00\xffhi")
            await pub.publish_json(f"{prefix}/three/x", "just text")
            await pub.publish_json(f"{prefix}/other", 42)
            assert await take(sub, 3) == [
                TopicMessage(f"{prefix}/one/x", {"a": 1, "ü": [1.5, None]}, False),
                TopicMessage(f"{prefix}/two/x", b"\x00\xffhi", True),
                TopicMessage(f"{prefix}/three/x", "just text", False),
            ]
            got = await take(everything, 4)
            assert got[-1] == TopicMessage(f"{prefix}/other", 42, False)
            assert sub.pending == 0 and sub.dropped == 0

    run(sock_dir, body)


def test_receive_messages_from_others(sock_dir: Path) -> None:
    topic = f"{topic_prefix()}/mode"

    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as a, await hub.client("tok-b") as b:
            others = await a.subscribe_topic(topic, from_others_only=True)
            every = await a.subscribe_topic(topic)
            await a.publish_json(topic, "mine")
            await b.publish_json(topic, "theirs")
            # "mine" was offered first: had it been queued, it would come out first.
            assert [m.payload for m in await take(others, 1)] == ["theirs"]
            assert [m.payload for m in await take(every, 2)] == ["mine", "theirs"]
            assert others.pending == 0

    run(sock_dir, body)


def test_unauthorized_publish_names_component_and_topic(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        async with await hub.client("tok-b") as b:
            with pytest.raises(UnauthorizedError) as caught:
                await b.publish_json("secret/plans", {"x": 1})
            assert B in caught.value.message and "secret/plans" in caught.value.message
            assert caught.value.model == "UnauthorizedError"
            # One refused call ends only its stream: the connection carries on.
            await b.publish_json("t/allowed", 1)

    run(sock_dir, body)


def test_modelled_errors_and_generic_calls(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as a:
            with pytest.raises(InvalidArgumentsError, match="topic"):
                await a.publish_json("bad/#", 1)
            with pytest.raises(ClientServiceError, match="GetSecretValue"):
                await a.call("GetSecretValue", {"secretId": "x"})
            with pytest.raises(InvalidArgumentsError, match="receiveMode"):
                await a.subscribe("SubscribeToTopic", {"topic": "t/x", "receiveMode": "NOPE"})
            request = {"topic": "t/x", "publishMessage": {"jsonMessage": {"message": 1}}}
            assert await a.call("aws.greengrass#PublishToTopic", request) == {}
            sub = await a.subscribe("SubscribeToTopic", {"topic": "t/generic"})
            await a.publish_json("t/generic", [1, 2])
            assert await take(sub, 1) == [
                {"jsonMessage": {"message": [1, 2], "context": {"topic": "t/generic"}}}
            ]
            assert hub.server.connections  # still connected

    run(sock_dir, body)


def test_closing_a_subscription_stops_delivery(sock_dir: Path) -> None:
    topic = f"{topic_prefix()}/close"

    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as a:
            sub = await a.subscribe_topic(topic)
            await eventually(lambda: len(hub.pubsub._trie) == 1)
            await a.publish_json(topic, 1)
            assert [m.payload for m in await take(sub, 1)] == [1]
            await sub.close()
            await eventually(lambda: len(hub.pubsub._trie) == 0)
            (connection,) = hub.server.connections
            assert connection.streams == {}
            assert hub.pubsub._trie.match(topic) == []
            await a.publish_json(topic, 2)
            with pytest.raises(StopAsyncIteration):
                await anext(sub)
            assert sub.closed and sub.pending == 0
            await sub.close()  # twice is fine
            assert a.connected

    run(sock_dir, body)


def test_server_ended_streams_and_stream_errors(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as a:
            updates = await a.subscribe_component_updates()
            assert [e async for e in updates] == [{"preUpdateEvent": {"deploymentId": "d1"}}] * 2
            assert updates.closed
            validate = await a.subscribe_validate_configuration()
            assert await anext(validate) == {"n": 1}
            with pytest.raises(ClientServiceError, match="the watcher broke"):
                await anext(validate)
            with pytest.raises(StopAsyncIteration):
                await anext(validate)

    run(sock_dir, body)


def test_killed_subscriber_does_not_disturb_others(sock_dir: Path) -> None:
    topic = f"{topic_prefix()}/kill"

    async def body(hub: Hub) -> None:
        victim = await hub.client("tok-a")
        async with await hub.client("tok-b") as b, await hub.client("tok-a") as pub:
            dead = await victim.subscribe_topic(topic)
            alive = await b.subscribe_topic(topic)
            await eventually(lambda: len(hub.pubsub._trie) == 2)
            hanging = asyncio.create_task(victim.call("Hang", {}, timeout=30))
            await eventually(lambda: victim._last_stream_id == 2)
            victim._writer.transport.abort()
            with pytest.raises(IpcConnectionError):
                await hanging
            with pytest.raises(IpcConnectionError):
                await anext(dead)
            with pytest.raises(IpcConnectionError):
                await victim.publish_json(topic, "late")
            await eventually(lambda: len(hub.pubsub._trie) == 1)
            for n in range(50):
                await pub.publish_json(topic, n)
            assert [m.payload for m in await take(alive, 50)] == list(range(50))
        await victim.close()

    run(sock_dir, body)


def test_slow_subscriber_does_not_stall_a_fast_one(sock_dir: Path) -> None:
    topic = f"{topic_prefix()}/flood"
    total = 20_000

    async def body(hub: Hub) -> None:
        raw_reader, raw_writer = await raw_subscriber(hub.path, "tok-b", topic)
        async with await hub.client("tok-a") as pub, await hub.client("tok-b") as b:
            fast = await b.subscribe_topic(topic)
            lazy = await b.subscribe_topic(topic, max_queue=100)  # never iterated
            await eventually(lambda: len(hub.pubsub._trie) == 3)

            async def consume() -> list[int]:
                return [m.payload for m in await take(fast, total, timeout=60)]

            consumer = asyncio.create_task(consume())
            for start in range(0, total, 64):  # 64 publishes in flight at a time
                await asyncio.gather(
                    *(pub.publish_json(topic, n) for n in range(start, min(start + 64, total)))
                )
            assert await consumer == list(range(total))
            # The connection's reader kept reading: the lazy consumer lost its oldest events.
            await eventually(lambda: lazy.received == total)
            assert lazy.dropped == total - 100
            assert [m.payload for m in await take(lazy, 100)] == list(range(total - 100, total))
            dropped = sorted(s.dropped for s in hub.pubsub._trie.match(topic))
            assert dropped[:2] == [0, 0] and dropped[2] > 0  # the raw one never reads
            stats = hub.pubsub.stats()
            assert stats["dropped"] == dropped[2]
            assert stats["published"] >= total and stats["subscriptions"] == 3
        raw_writer.close()
        del raw_reader

    run(sock_dir, body, timeout=120)


def test_a_thousand_subscriptions_on_one_topic(sock_dir: Path) -> None:
    topic = f"{topic_prefix()}/many"

    async def body(hub: Hub) -> None:
        async with await hub.client("tok-b") as b, await hub.client("tok-a") as pub:
            subs = await asyncio.gather(*(b.subscribe_topic(topic) for _ in range(1000)))
            assert sorted(s.stream_id for s in subs) == list(range(1, 1001))
            await eventually(lambda: len(hub.pubsub._trie) == 1000)
            await pub.publish_json(topic, "hello all")
            got = await asyncio.gather(*(take(s, 1) for s in subs))
            assert all(g == [TopicMessage(topic, "hello all", False)] for g in got)
            await asyncio.gather(*(s.close() for s in subs))
            await eventually(lambda: len(hub.pubsub._trie) == 0)

    run(sock_dir, body)


@pytest.mark.parametrize("handshake_first", [False, True])
def test_garbage_frame_closes_only_that_connection(sock_dir: Path, handshake_first: bool) -> None:
    topic = f"{topic_prefix()}/garbage"

    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as a:
            sub = await a.subscribe_topic(topic)
            if handshake_first:
                reader, writer = await raw_subscriber(hub.path, "tok-b", topic)
                frame = bytearray(encode(Message(_rpc(MessageType.PING, 0))))
                frame[-1] ^= 0xFF  # a bad message CRC
                writer.write(bytes(frame))
            else:
                reader, writer = await asyncio.open_unix_connection(str(hub.path))
                writer.write(os.urandom(8) + b"\x00" * 56)
            await writer.drain()
            async with asyncio.timeout(5):
                while await reader.read(65536):
                    pass  # the server closes: EOF
            writer.close()
            await eventually(lambda: len(hub.server.connections) == 1)
            await a.publish_json(topic, "still here")
            assert [m.payload for m in await take(sub, 1)] == ["still here"]

    run(sock_dir, body)


def test_call_timeout_leaves_the_connection_usable(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as a:
            with pytest.raises(IpcTimeoutError, match="Hang"):
                await a.call("Hang", {}, timeout=0.1)
            hub.release.set()  # the late answer is dropped quietly
            await a.publish_json("t/after", 1)
            assert a.connected and a._streams == {}

    run(sock_dir, body)


# -- the typed convenience methods: request shapes as docs/ipc-protocol.md has them ------
def test_convenience_methods_encode_the_documented_shapes(sock_dir: Path) -> None:
    doc = {"state": {"reported": {"on": True}}, "version": 3}

    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as a:
            assert await a.get_configuration(["a", "b"], component="other") == {"b": 5}
            await a.update_configuration(["a"], {"b": 6}, timestamp=12.5)
            await a.update_configuration([], {"c": 1})
            await a.update_state("RUNNING")
            await a.defer_component_update("d1", 5000, "busy")
            await a.send_configuration_validity_report("d2", False, "too hot")
            assert await a.get_thing_shadow("thing1") == doc
            assert await a.update_thing_shadow("thing1", {"state": {"desired": {}}}, "cfg") == doc
            await a.delete_thing_shadow("thing1", "cfg")
            assert await a.list_named_shadows("thing1") == ["a", "b", "c"]
            await a.publish_to_iot_core("dt/hub/x", b"\x01\x02", qos=0)
            with pytest.raises(ValueError):
                await a.update_state("STOPPED")  # type: ignore[arg-type]

        stamp = hub.requests[2][1].pop("timestamp")
        assert isinstance(stamp, float) and abs(stamp - time.time()) < 60
        update_doc = base64.b64encode(b'{"state":{"desired":{}}}').decode()
        assert hub.requests == [
            ("GetConfiguration", {"keyPath": ["a", "b"], "componentName": "other"}),
            (
                "UpdateConfiguration",
                {"keyPath": ["a"], "valueToMerge": {"b": 6}, "timestamp": 12.5},
            ),
            ("UpdateConfiguration", {"keyPath": [], "valueToMerge": {"c": 1}}),
            ("UpdateState", {"state": "RUNNING"}),
            (
                "DeferComponentUpdate",
                {"deploymentId": "d1", "recheckAfterMs": 5000, "message": "busy"},
            ),
            (
                "SendConfigurationValidityReport",
                {
                    "configurationValidityReport": {
                        "status": "REJECTED",
                        "deploymentId": "d2",
                        "message": "too hot",
                    }
                },
            ),
            ("GetThingShadow", {"thingName": "thing1"}),
            (
                "UpdateThingShadow",
                {"thingName": "thing1", "shadowName": "cfg", "payload": update_doc},
            ),
            ("DeleteThingShadow", {"thingName": "thing1", "shadowName": "cfg"}),
            ("ListNamedShadowsForThing", {"thingName": "thing1"}),
            ("ListNamedShadowsForThing", {"thingName": "thing1", "nextToken": "page2"}),
            ("PublishToIoTCore", {"topicName": "dt/hub/x", "payload": "AQI=", "qos": "0"}),
        ]

    run(sock_dir, body)


# -- a rough throughput figure (not a benchmark suite) ----------------------------------
def test_throughput_one_publisher_one_subscriber(sock_dir: Path) -> None:
    topic = f"{topic_prefix()}/rate"
    count = 5_000

    async def body(hub: Hub) -> None:
        async with await hub.client("tok-a") as pub, await hub.client("tok-b") as b:
            sub = await b.subscribe_topic(topic)
            rates = {}
            for mode, window in (("awaited one by one", 1), ("64 in flight", 64)):
                started = time.perf_counter()
                consumer = asyncio.create_task(take(sub, count, timeout=60))
                for start in range(0, count, window):
                    await asyncio.gather(
                        *(pub.publish_json(topic, {"n": n}) for n in range(start, start + window))
                    )
                assert len(await consumer) == count
                rates[mode] = count / (time.perf_counter() - started)
            for mode, rate in rates.items():
                print(f"\nIPC pub -> sub, {mode}: {rate:,.0f} messages/s")
            assert sub.dropped == 0
            assert min(rates.values()) > 200  # only catches a pathological slowdown

    run(sock_dir, body)


def test_closing_the_client_fails_calls_and_ends_subscriptions(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        a = await hub.client("tok-a")
        sub = await a.subscribe_topic("t/closing")
        hanging = asyncio.create_task(a.call("Hang", {}, timeout=30))
        iterating = asyncio.create_task(take(sub, 1))
        await eventually(lambda: a._last_stream_id == 2)
        await a.close()
        with pytest.raises(IpcConnectionError, match="closed"):
            await hanging
        assert await iterating == []  # closed on purpose: the iterator just ends
        await eventually(lambda: len(hub.pubsub._trie) == 0)

    run(sock_dir, body)


async def _raw_request(path: Path, stream_ids: list[int]) -> list[MessageType]:
    """Connect by hand, publish on the given stream ids, and return what came back."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    connect = _rpc(MessageType.CONNECT, 0)
    connect[VERSION] = "0.1.0"
    writer.write(encode(Message(connect, b'{"authToken": "tok-a"}')))
    for stream_id in stream_ids:
        request = _rpc(MessageType.APPLICATION_MESSAGE, stream_id)
        request[CONTENT_TYPE] = "application/json"
        request[SERVICE_MODEL_TYPE] = "aws.greengrass#PublishToTopicRequest"
        request[OPERATION] = "aws.greengrass#PublishToTopic"
        body = {"topic": "t/raw", "publishMessage": {"jsonMessage": {"message": 1}}}
        writer.write(encode(Message(request, json.dumps(body).encode())))
    await writer.drain()
    decoder, seen = Decoder(), []
    async with asyncio.timeout(5):
        while data := await reader.read(65536):
            seen += [parse(m).message_type for m in decoder.feed(data)]
            if MessageType.PROTOCOL_ERROR in seen or len(seen) > len(stream_ids):
                break
    writer.close()
    return seen


def test_server_refuses_a_reused_stream_id(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        seen = await _raw_request(hub.path, [1, 1])
        assert seen == [
            MessageType.CONNECT_ACK,
            MessageType.APPLICATION_MESSAGE,
            MessageType.PROTOCOL_ERROR,
        ]

    run(sock_dir, body)


def test_server_refuses_a_skipped_stream_id(sock_dir: Path) -> None:
    async def body(hub: Hub) -> None:
        seen = await _raw_request(hub.path, [1, 3])
        assert seen == [
            MessageType.CONNECT_ACK,
            MessageType.APPLICATION_MESSAGE,
            MessageType.PROTOCOL_ERROR,
        ]

    run(sock_dir, body)
