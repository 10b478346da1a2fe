"""The Greengrass IPC server: eventstream RPC over the hub's Unix socket.

One ``Connection`` per client: it checks the CONNECT handshake's token (the SVCUID the
agent gave the component), then reads requests, one stream each, and hands them to the
operation registered under the ``operation`` header. Request/response operations answer
once and end the stream; streaming operations answer once and then send events until
either side ends the stream. A frame that cannot be decoded closes only its own
connection; a handler's failure becomes a ``ServiceError`` on its own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.core.eventstream import Decoder, FrameError, Int32, Message, encode
from edgeloop.core.eventstream_rpc import (
    MESSAGE_FLAGS,
    MESSAGE_TYPE,
    STREAM_ID,
    MessageFlag,
    MessageType,
    ProtocolError,
    RpcMessage,
    application_error,
    connect_ack,
    encode_application_message,
    json_body,
    parse,
    parse_connect,
    ping_response,
    protocol_error,
)
from edgeloop.core.ipc_errors import (
    ComponentNotFoundError,
    ConflictError,
    FailedUpdateConditionCheckError,
    InvalidArgumentsError,
    IpcError,
    ResourceNotFoundError,
    ServiceError,
    UnauthorizedError,
)

log = logging.getLogger("edgeloop.ipc")

PREFIX = "aws.greengrass#"
WRITE_BUFFER_LIMIT = 256 * 1024  # bytes queued for one client before senders wait
REFUSED_CLOSE_WAIT = 2.0  # seconds a refused client gets to close the connection itself
__all__ = [
    "ComponentNotFoundError",
    "ConflictError",
    "Connection",
    "FailedUpdateConditionCheckError",
    "InvalidArgumentsError",
    "IpcError",
    "IpcServer",
    "Operation",
    "ResourceNotFoundError",
    "ServiceError",
    "Stream",
    "UnauthorizedError",
]
READ_CHUNK = 256 * 1024


@dataclass(eq=False)
class Stream:
    """One RPC stream: a request, its response, and for subscriptions, events."""

    stream_id: int
    connection: Connection
    operation: str
    closed: bool = False
    _on_close: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    _after_response: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def component(self) -> str:
        """The component on the other end."""
        return self.connection.component

    def after_response(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once the response is on its way (start sending events there)."""
        self._after_response.append(callback)

    def on_close(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``callback`` when the stream ends, from either side or by disconnection."""
        self._on_close.append(callback)

    async def send_event(self, model: str, body: dict[str, Any] | bytes) -> None:
        """Send one stream event (after the response); ``body`` may be JSON already encoded."""
        if self.closed:
            raise ConnectionError("stream closed")
        payload = body if isinstance(body, bytes) else json_body(body)
        await self.connection.send_frame(
            encode_application_message(self.stream_id, PREFIX + model, payload)
        )

    async def close(self) -> None:
        """End the stream from the server's side."""
        if self.closed:
            return
        with contextlib.suppress(ConnectionError, OSError):
            await self.connection.send(_terminate(self.stream_id))
        await self._closed()

    async def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.connection.streams.pop(self.stream_id, None)
        for callback in self._on_close:
            try:
                result = callback()
                if result is not None:
                    await result
            except Exception:
                log.exception("stream close callback failed")


def _terminate(stream_id: int) -> Message:
    # An empty message that only ends the stream: no model type, as the SDK's own close.
    return Message(
        {
            MESSAGE_TYPE: Int32(int(MessageType.APPLICATION_MESSAGE)),
            MESSAGE_FLAGS: Int32(int(MessageFlag.TERMINATE_STREAM)),
            STREAM_ID: Int32(stream_id),
        }
    )


Handler = Callable[[Stream, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Operation:
    """How to serve one IPC operation."""

    name: str  # e.g. "PublishToTopic"
    handler: Handler
    streaming: bool = False
    inline: bool = False  # fast and never blocks: served on the reader task itself

    @property
    def response_model(self) -> str:
        """The response shape's model name."""
        return f"{PREFIX}{self.name}Response"


class Connection:
    """One client of the IPC socket."""

    def __init__(
        self,
        server: IpcServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.component = ""
        self.streams: dict[int, Stream] = {}
        self._last_stream_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._outbox: list[bytes] = []
        self._flush_scheduled = False

    async def send(self, message: Message) -> None:
        """Queue one frame; wait only while the client's buffer is over its limit."""
        await self.send_frame(encode(message))

    async def send_frame(self, frame: bytes) -> None:
        """Queue one encoded frame (see ``send``).

        Frames queued during one turn of the event loop go out in one write: with many
        small messages, a system call per frame was a large share of the agent's time.
        """
        if self.writer.is_closing():
            raise ConnectionError("connection closed")
        self._outbox.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        if self.writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self._flush()
            await self.writer.drain()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        if not self.writer.is_closing():
            self.writer.write(data)

    async def serve(self) -> None:
        """Handshake, then serve requests until the client goes away."""
        decoder = Decoder(max_message_size=self.server.max_message_size)
        try:
            connected = False
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    return
                for message in decoder.feed(data):
                    rpc = parse(message)
                    if not connected:
                        connected = await self._handshake(rpc)
                        if not connected:
                            await self._await_client_close(REFUSED_CLOSE_WAIT)
                            return
                        continue
                    await self._on_message(rpc)
        except FrameError as err:
            log.warning("IPC %s: closing the connection: %s", self.component or "client", err)
        except ProtocolError as err:
            log.warning("IPC %s: protocol error: %s", self.component or "client", err)
            with contextlib.suppress(ConnectionError, OSError):
                await self.send(protocol_error(str(err)))
        except (ConnectionError, OSError):
            pass
        finally:
            await self._teardown()

    async def _await_client_close(self, limit: float) -> None:
        # After a refused CONNECT the client closes; closing first makes the official
        # SDK report a socket error instead of its AccessDeniedError.
        self._flush()
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(limit):
                while await self.reader.read(READ_CHUNK):
                    pass

    async def _handshake(self, rpc: RpcMessage) -> bool:
        if rpc.message_type is not MessageType.CONNECT:
            raise ProtocolError(f"expected CONNECT first, got {rpc.message_type.name}")
        request = parse_connect(rpc)
        component = self.server.authenticate(request.auth_token or "")
        if component is None:
            log.warning("IPC: refused a connection with an unknown or missing auth token")
            await self.send(connect_ack(accepted=False))
            return False
        self.component = component
        await self.send(connect_ack(accepted=True))
        log.debug("IPC: %s connected", component)
        return True

    async def _on_message(self, rpc: RpcMessage) -> None:
        kind = rpc.message_type
        if kind is MessageType.PING:
            await self.send(ping_response(rpc.payload))
            return
        if kind is MessageType.CONNECT:
            raise ProtocolError("a second CONNECT on an open connection")
        if kind not in (MessageType.APPLICATION_MESSAGE, MessageType.APPLICATION_ERROR):
            return  # PING_RESPONSE and the like need nothing from us
        stream = self.streams.get(rpc.stream_id)
        if stream is not None:
            if rpc.terminates_stream:
                await stream._closed()
            return  # clients send nothing else on an open stream
        if rpc.stream_id <= self._last_stream_id:
            if rpc.terminates_stream:
                return  # a late close of a stream we already ended
            raise ProtocolError(f"stream {rpc.stream_id} is not open")
        if rpc.stream_id != self._last_stream_id + 1:
            raise ProtocolError(
                f"stream {rpc.stream_id} is not the next stream id ({self._last_stream_id + 1})"
            )
        self._last_stream_id = rpc.stream_id
        if rpc.terminates_stream and not rpc.operation:
            return
        name = (rpc.operation or "").removeprefix(PREFIX)
        operation = self.server.operations.get(name)
        stream = Stream(rpc.stream_id, self, name)
        if operation is None:
            await self._error(stream, ServiceError(f"operation {rpc.operation!r} is not supported"))
            return
        if operation.streaming:
            self.streams[rpc.stream_id] = stream
        body = rpc.json()
        if not isinstance(body, dict):
            await self._error(stream, InvalidArgumentsError("the request must be a JSON object"))
            return
        if operation.inline:
            await self._serve(operation, stream, body)
        else:
            task = asyncio.create_task(self._serve(operation, stream, body), name=f"ipc:{name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, operation: Operation, stream: Stream, body: dict[str, Any]) -> None:
        try:
            response = await operation.handler(stream, body)
        except IpcError as err:
            await self._error(stream, err)
            return
        except (ConnectionError, OSError) as err:
            if self.writer.is_closing():
                return  # the client is gone: nobody to answer
            log.exception("IPC %s from %s failed", operation.name, self.component)
            await self._error(stream, ServiceError(f"{operation.name} failed: {err}"))
            return
        except Exception as err:
            log.exception("IPC %s from %s failed", operation.name, self.component)
            await self._error(stream, ServiceError(f"{operation.name} failed: {err}"))
            return
        if stream.closed:
            return
        with contextlib.suppress(ConnectionError, OSError):
            await self.send_frame(
                encode_application_message(
                    stream.stream_id,
                    operation.response_model,
                    json_body(response) if response else b"{}",
                    terminate=not operation.streaming,
                )
            )
        if not operation.streaming:
            stream.closed = True
            return
        for callback in stream._after_response:
            callback()

    async def _error(self, stream: Stream, err: IpcError) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.send(
                application_error(stream.stream_id, PREFIX + err.model, err.message, **err.fields)
            )
        await stream._closed()

    async def _teardown(self) -> None:
        with contextlib.suppress(Exception):
            self._flush()  # answers already queued (e.g. a refusal) still go out
        for task in list(self._tasks):
            task.cancel()
        for stream in list(self.streams.values()):
            await stream._closed()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        if self.component:
            log.debug("IPC: %s disconnected", self.component)


class IpcServer:
    """Listens on the hub's IPC socket and serves registered operations."""

    def __init__(
        self,
        path: Path,
        authenticate: Callable[[str], str | None],
        *,
        max_message_size: int = 16 * 1024 * 1024,
    ) -> None:
        self.path = path
        self.authenticate = authenticate
        self.max_message_size = max_message_size
        self.operations: dict[str, Operation] = {}
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None

    def register(self, *operations: Operation) -> None:
        """Serve these operations."""
        for operation in operations:
            self.operations[operation.name] = operation

    async def start(self) -> None:
        """Listen. The socket is open to the hub's user only: components run as that user."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old_umask)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(self, reader, writer)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
