"""The agent's control channel: one JSON request and one JSON reply per line, over a Unix
socket in the hub's folder. The ``edgeloop device`` commands are its clients.

Kept apart from the Greengrass IPC socket on purpose: this channel is for the hub's owner
(file permissions guard it), IPC is for components (their SVCUID guards it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edgeloop.core.errors import AgentError, EdgeloopError
from edgeloop.edge.settings import Layout

log = logging.getLogger("edgeloop.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 1024 * 1024
SOCKET_PATH_LIMIT = 107  # sun_path is 108 bytes with its NUL


def check_socket_path(path: Path) -> None:
    """Unix socket paths are short; say so plainly instead of failing deep in bind()."""
    if len(os.fsencode(path)) > SOCKET_PATH_LIMIT:
        raise AgentError(
            f"the hub folder path is too long for a Unix socket ({path}); "
            f"use a --root whose socket path has at most {SOCKET_PATH_LIMIT} bytes"
        )


class ControlServer:
    """Serves control requests by dispatching ``op`` to a handler."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on the socket (owner-only)."""
        check_socket_path(self.path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    await _reply(writer, {"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                await _reply(writer, await self._dispatch(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError("a request is a JSON object with a string 'op'")
        except ValueError as err:
            return {"ok": False, "error": f"bad request: {err}"}
        handler = self.handlers.get(request["op"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown operation {request['op']!r}; known: {known}"}
        try:
            return {"ok": True, "result": await handler(request)}
        except EdgeloopError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:
            log.exception("control request %s failed", request["op"])
            return {"ok": False, "error": f"internal error: {err}"}


async def _reply(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    writer.write(json.dumps(doc, default=str).encode() + b"\n")
    await writer.drain()


class ControlClient:
    """A blocking client of the control channel, for the CLI."""

    def __init__(self, root: Path, timeout: float = 30.0) -> None:
        self.root = root
        self.path = Layout(root).control_socket
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            raise AgentError(
                f"no agent is running for the hub at {self.root} "
                f"(start one with: edgeloop device run --root {self.root})"
            ) from err
        except OSError as err:
            sock.close()
            raise AgentError(f"cannot reach the agent at {self.path}: {err}") from err
        self._sock = sock
        return sock

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; raises AgentError with the agent's reason."""
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            while b"\n" not in self._buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise AgentError("the agent closed the connection (did it stop?)")
                self._buf += chunk
        except TimeoutError as err:
            raise AgentError(f"the agent did not answer {op!r} within {self.timeout:g} s") from err
        except OSError as err:
            raise AgentError(f"lost the connection to the agent: {err}") from err
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise AgentError(str(reply.get("error")))
        return reply.get("result")

    def close(self) -> None:
        """Close the connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_agent(
    root: Path, proc: subprocess.Popen[bytes], *, timeout: float = 15.0
) -> dict[str, Any]:
    """Wait until the agent ``proc`` started for ``root`` answers; returns its status.

    Raises AgentError when the process exits first or does not answer within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ControlClient(root, timeout=2) as client:
                status: dict[str, Any] = client.call("status")
                return status
        except AgentError as err:
            if proc.poll() is not None:
                raise AgentError(
                    f"the agent for {root} exited with code {proc.returncode} before it "
                    f"answered (see {Layout(root).logs / 'edgeloop.log'})"
                ) from err
            if time.monotonic() > deadline:
                raise AgentError(
                    f"the agent for {root} did not answer within {timeout:g} s"
                ) from err
            time.sleep(0.02)
