"""PublishToTopic and SubscribeToTopic: local publish/subscribe between components."""

from __future__ import annotations

import base64
from typing import Any

from edgeloop.core.eventstream_rpc import json_body
from edgeloop.edge.ipc import args
from edgeloop.edge.ipc.authz import PUBSUB
from edgeloop.edge.ipc.context import IpcContext
from edgeloop.edge.ipc.pubsub import Published, Subscription
from edgeloop.edge.ipc.server import InvalidArgumentsError, Operation, Stream

RECEIVE_MODES = ("RECEIVE_ALL_MESSAGES", "RECEIVE_MESSAGES_FROM_OTHERS")


def _message(body: dict[str, Any]) -> tuple[Any, bool]:
    message = body.get("publishMessage")
    if not isinstance(message, dict):
        raise InvalidArgumentsError("publishMessage is required: a jsonMessage or binaryMessage")
    if isinstance(message.get("jsonMessage"), dict):
        return message["jsonMessage"].get("message"), False
    if isinstance(message.get("binaryMessage"), dict):
        raw = message["binaryMessage"].get("message") or ""
        return args.blob(raw, "publishMessage.binaryMessage.message"), True
    raise InvalidArgumentsError("publishMessage needs a jsonMessage or a binaryMessage")


def _event(message: Published) -> dict[str, Any]:
    context = {"topic": message.topic}
    if message.binary:
        encoded = base64.b64encode(message.payload).decode("ascii")
        return {"binaryMessage": {"message": encoded, "context": context}}
    return {"jsonMessage": {"message": message.payload, "context": context}}


def operations(ctx: IpcContext) -> list[Operation]:
    """The pub/sub operations."""

    async def publish(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        topic = args.topic(body, "topic", is_filter=False)
        ctx.authorizer.check(stream.component, PUBSUB, "PublishToTopic", topic)
        payload, binary = _message(body)
        ctx.pubsub.publish(Published(topic, payload, binary, stream.component))
        return {}

    async def subscribe(stream: Stream, body: dict[str, Any]) -> dict[str, Any]:
        topic_filter = args.topic(body, "topic", is_filter=True)
        mode = body.get("receiveMode") or "RECEIVE_ALL_MESSAGES"
        if mode not in RECEIVE_MODES:
            raise InvalidArgumentsError(f"receiveMode must be one of {', '.join(RECEIVE_MODES)}")
        ctx.authorizer.check(stream.component, PUBSUB, "SubscribeToTopic", topic_filter)

        async def deliver(message: Published) -> None:
            if message.encoded is None:
                message.encoded = json_body(_event(message))
            await stream.send_event("SubscriptionResponseMessage", message.encoded)

        subscription = Subscription(
            topic_filter,
            stream.component,
            deliver,
            from_others_only=mode == "RECEIVE_MESSAGES_FROM_OTHERS",
        )
        # The response must reach the client before the first event: subscribe after it.
        stream.on_close(lambda: ctx.pubsub.unsubscribe(subscription))
        stream.after_response(lambda: ctx.pubsub.subscribe(subscription))
        return {}

    return [
        Operation("PublishToTopic", publish, inline=True),
        Operation("SubscribeToTopic", subscribe, streaming=True, inline=True),
    ]
