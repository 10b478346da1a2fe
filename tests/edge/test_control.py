"""The control channel, against a real agent and raw sockets: bad requests get a reason,
and the agent keeps answering."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgeloop.core.errors import AgentError
from edgeloop.edge.control import (
    MAX_REQUEST,
    SOCKET_PATH_LIMIT,
    ControlClient,
    ControlServer,
    check_socket_path,
)
from tests.edge.conftest import Hub

KNOWN_OPS = [
    "components",
    "deploy",
    "deployment",
    "deployments",
    "restart",
    "shutdown",
    "start",
    "status",
    "stop",
    "streams",
]


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One agent for the tests that only send requests which change nothing."""
    hub = Hub(tmp_path_factory.mktemp("control") / "hub", {})
    hub.start()
    yield hub
    hub.stop()


@contextmanager
def raw(hub: Hub) -> Iterator[socket.socket]:
    """A plain socket connected to the agent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(hub.root / "agent.sock"))
    try:
        yield sock
    finally:
        sock.close()


def read_line(sock: socket.socket) -> dict[str, Any]:
    """One reply line; fails on EOF before a newline."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    assert buf.count(b"\n") == 1
    reply: dict[str, Any] = json.loads(buf)
    return reply


def ask(sock: socket.socket, payload: bytes) -> dict[str, Any]:
    sock.sendall(payload)
    return read_line(sock)


def assert_still_serving(hub: Hub) -> None:
    status = hub.call("status")
    assert status["thingName"] == "test-hub"
    assert status["root"] == str(hub.root)


@pytest.mark.parametrize(
    "payload",
    [b"hello there\n", b"{\n", b"\x00\xff\xfe\n", b"   \n"],
    ids=["words", "half-object", "binary", "blank"],
)
def test_garbage_line_gets_a_bad_request_reply(shared_hub: Hub, payload: bytes) -> None:
    with raw(shared_hub) as sock:
        reply = ask(sock, payload)
        assert reply["ok"] is False
        assert reply["error"].startswith("bad request:")
        # The same connection keeps working.
        again = ask(sock, b'{"op": "status"}\n')
        assert again["ok"] is True
        assert again["result"]["thingName"] == "test-hub"
    assert_still_serving(shared_hub)


@pytest.mark.parametrize(
    "payload",
    [b"[1, 2]\n", b'"status"\n', b"42\n", b"null\n", b"{}\n", b'{"op": 5}\n', b'{"op": null}\n'],
)
def test_json_that_is_not_a_request_is_refused(shared_hub: Hub, payload: bytes) -> None:
    with raw(shared_hub) as sock:
        reply = ask(sock, payload)
    assert reply == {
        "ok": False,
        "error": "bad request: a request is a JSON object with a string 'op'",
    }
    assert_still_serving(shared_hub)


def test_unknown_operation_lists_the_known_ones(shared_hub: Hub) -> None:
    with raw(shared_hub) as sock:
        reply = ask(sock, b'{"op": "frobnicate"}\n')
    assert reply["ok"] is False
    assert reply["error"] == f"unknown operation 'frobnicate'; known: {', '.join(KNOWN_OPS)}"
    assert_still_serving(shared_hub)


def test_oversized_request_is_refused_and_the_connection_closed(shared_hub: Hub) -> None:
    payload = b'{"op": "status", "pad": "' + b"x" * (MAX_REQUEST + 4096) + b'"}\n'
    with raw(shared_hub) as sock:

        def send() -> None:
            # The agent stops reading at its limit and hangs up: the rest may not fit.
            try:
                sock.sendall(payload)
            except OSError:
                pass

        sender = threading.Thread(target=send)
        sender.start()
        try:
            reply = read_line(sock)
            assert reply == {"ok": False, "error": "request too large"}
            # ... and then the agent closes this connection.
            rest = b""
            while chunk := sock.recv(65536):
                rest += chunk
            assert rest == b""
        finally:
            sock.shutdown(socket.SHUT_RDWR)
            sender.join(10)
    assert_still_serving(shared_hub)


def test_a_large_request_under_the_limit_is_served(shared_hub: Hub) -> None:
    payload = b'{"op": "status", "pad": "' + b"x" * (MAX_REQUEST // 2) + b'"}\n'
    with raw(shared_hub) as sock:
        reply = ask(sock, payload)
    assert shared_hub.proc is not None
    assert reply["ok"] is True
    assert reply["result"]["pid"] == shared_hub.proc.pid


def test_pipelined_requests_are_answered_in_order(shared_hub: Hub) -> None:
    with raw(shared_hub) as sock:
        sock.sendall(b'{"op": "status"}\n{"op": "nope"}\n{"op": "components"}\n')
        buf = b""
        while buf.count(b"\n") < 3:
            chunk = sock.recv(65536)
            assert chunk
            buf += chunk
    replies = [json.loads(line) for line in buf.splitlines()]
    assert [r["ok"] for r in replies] == [True, False, True]
    assert "thingName" in replies[0]["result"]
    assert "unknown operation 'nope'" in replies[1]["error"]
    assert replies[2]["result"] == []


def test_a_client_that_hangs_up_mid_request_does_no_harm(shared_hub: Hub) -> None:
    for _ in range(3):
        with raw(shared_hub) as sock:
            sock.sendall(b'{"op": "sta')
    assert_still_serving(shared_hub)


def test_handler_errors_come_back_as_reasons(shared_hub: Hub) -> None:
    with raw(shared_hub) as sock:
        missing = ask(sock, b'{"op": "deployment", "id": "nope"}\n')
        unknown = ask(sock, b'{"op": "restart", "name": "com.example.Ghost"}\n')
        empty = ask(sock, b'{"op": "deploy"}\n')
    assert missing == {"ok": False, "error": "id: no deployment with id 'nope'"}
    assert unknown["ok"] is False
    assert "com.example.Ghost" in unknown["error"]
    assert "(components: none)" in unknown["error"]
    assert empty["ok"] is False
    assert "nothing to deploy" in empty["error"]
    assert_still_serving(shared_hub)


def test_control_client_raises_the_agents_reason(shared_hub: Hub) -> None:
    with ControlClient(shared_hub.root, timeout=10) as client:
        with pytest.raises(AgentError, match="no deployment with id 'x'"):
            client.call("deployment", id="x")
        # The connection survives an error reply.
        assert client.call("status")["thingName"] == "test-hub"


def test_the_socket_is_for_its_owner_only(shared_hub: Hub) -> None:
    mode = (shared_hub.root / "agent.sock").stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_a_second_agent_on_the_same_hub_is_refused(hub: Hub) -> None:
    assert hub.proc is not None
    first_pid = hub.proc.pid
    second = subprocess.Popen(
        [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(hub.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Either it gives up (right) or it takes the socket over (wrong): stop at either.
        deadline = time.monotonic() + 15
        while second.poll() is None and time.monotonic() < deadline:
            try:
                if hub.call("status")["pid"] != first_pid:
                    break
            except AgentError:
                pass
            time.sleep(0.05)
        assert second.poll() == 1, "the second agent kept running"
        assert second.stderr is not None
        assert second.stderr.read().strip() == (
            f"error: an agent (pid {first_pid}) already runs the hub at {hub.root}"
        )
        assert hub.call("status")["pid"] == first_pid
    finally:
        if second.poll() is None:
            second.terminate()
            second.wait(30)
        if second.stderr is not None:
            second.stderr.close()


# -- the client without an agent -----------------------------------------------------
def test_client_without_an_agent_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info, ControlClient(tmp_path, timeout=2) as client:
        client.call("status")
    message = str(info.value)
    assert f"no agent is running for the hub at {tmp_path}" in message
    assert f"edgeloop device run --root {tmp_path}" in message


def test_client_with_a_stale_socket_file_says_the_same(tmp_path: Path) -> None:
    # What a kill -9 leaves behind: the socket file, with nobody listening.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "agent.sock"))
    stale.close()
    assert (tmp_path / "agent.sock").exists()
    with pytest.raises(AgentError, match="edgeloop device run --root"):
        ControlClient(tmp_path, timeout=2).call("status")


def test_client_times_out_on_a_silent_agent(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "agent.sock"))
    server.listen(1)  # connections queue up, and nobody ever answers
    try:
        with pytest.raises(AgentError, match=r"did not answer 'status' within 0.2 s"):
            ControlClient(tmp_path, timeout=0.2).call("status")
    finally:
        server.close()


def test_client_reports_a_hang_up(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "agent.sock"))
    server.listen(1)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        with pytest.raises(AgentError, match="closed the connection"):
            ControlClient(tmp_path, timeout=5).call("status")
    finally:
        thread.join(5)
        server.close()


# -- socket path length --------------------------------------------------------------
def _path_of_length(base: Path, length: int) -> Path:
    filler = length - len(os.fsencode(base)) - len("//agent.sock")
    assert filler > 2
    path = base / ("d" * filler) / "agent.sock"
    assert len(os.fsencode(path)) == length
    return path


def test_check_socket_path_accepts_the_limit(tmp_path: Path) -> None:
    check_socket_path(_path_of_length(tmp_path, SOCKET_PATH_LIMIT))


def test_check_socket_path_rejects_one_byte_more(tmp_path: Path) -> None:
    path = _path_of_length(tmp_path, SOCKET_PATH_LIMIT + 1)
    with pytest.raises(AgentError) as info:
        check_socket_path(path)
    assert "too long for a Unix socket" in str(info.value)
    assert str(path) in str(info.value)
    assert "--root" in str(info.value)


def test_a_socket_at_the_limit_really_binds(tmp_path: Path) -> None:
    path = _path_of_length(tmp_path, SOCKET_PATH_LIMIT)
    path.parent.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))  # the limit is the kernel's, not an arbitrary one
    finally:
        sock.close()


def test_server_refuses_a_too_long_path_before_binding(tmp_path: Path) -> None:
    path = _path_of_length(tmp_path, SOCKET_PATH_LIMIT + 20)

    async def start() -> None:
        await ControlServer(path, {}).start()

    with pytest.raises(AgentError, match="too long"):
        asyncio.run(start())


def test_agent_with_a_too_long_root_exits_with_one_line(tmp_path: Path) -> None:
    root = _path_of_length(tmp_path, SOCKET_PATH_LIMIT + 1).parent
    result = subprocess.run(
        [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: the hub folder path is too long")
