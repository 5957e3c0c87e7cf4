"""Tests for sdnotify.py against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from fdqueue import sdnotify

# sockaddr_un holds 108 bytes; pytest's tmp_path can be longer than that.
_MAX_SOCKET_PATH = 100


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a short private directory when tmp_path is too long for a socket path."""
    if len(str(tmp_path / "notify.sock")) <= _MAX_SOCKET_PATH:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="sdn"))
    yield short
    shutil.rmtree(short)


@pytest.fixture
def systemd_socket(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket at a filesystem path, announced in $NOTIFY_SOCKET."""
    path = socket_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket in the abstract namespace, announced as `@name`."""
    name = f"fdqueue-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def _received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`, decoded, without blocking."""
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(4096).decode())
        except BlockingIOError:
            return datagrams


async def _next_datagram(sock: socket.socket) -> str:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 10)
    return data.decode()


def test_notify_outside_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $NOTIFY_SOCKET nothing is sent and every helper returns False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("serving") is False
    assert sdnotify.status("idle") is False
    assert sdnotify.stopping("draining") is False


def test_notify_sends_one_datagram_to_a_path_socket(systemd_socket: socket.socket) -> None:
    """All states go out together in one newline-separated datagram."""
    assert sdnotify.notify("READY=1", "STATUS=serving on 127.0.0.1:3000") is True
    assert _received(systemd_socket) == ["READY=1\nSTATUS=serving on 127.0.0.1:3000"]


def test_notify_reaches_an_abstract_socket(abstract_socket: socket.socket) -> None:
    """A leading @ in $NOTIFY_SOCKET addresses the Linux abstract namespace."""
    assert sdnotify.notify("WATCHDOG=1") is True
    assert _received(abstract_socket) == ["WATCHDOG=1"]


def test_helpers_send_the_protocol_messages(systemd_socket: socket.socket) -> None:
    """ready, status, stopping and extend_timeout send their documented assignments."""
    sdnotify.ready("serving")
    sdnotify.status("3 jobs running,\n120 queued")
    sdnotify.stopping("draining 2 jobs")
    sdnotify.extend_timeout(1.5)
    assert _received(systemd_socket) == [
        "READY=1\nSTATUS=serving",
        "STATUS=3 jobs running, 120 queued",
        "STOPPING=1\nSTATUS=draining 2 jobs",
        "EXTEND_TIMEOUT_USEC=1500000",
    ]


def test_send_error_returns_false_and_logs_at_debug(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead notify socket makes notify return False with a debug event, never raise."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(socket_dir / "gone.sock"))
    with structlog.testing.capture_logs() as events:
        assert sdnotify.notify("READY=1") is False
    assert [(e["event"], e["log_level"]) for e in events] == [("sd_notify failed", "debug")]


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=60s gives a 30 s ping interval when WATCHDOG_PID is ours or absent."""
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0


def test_watchdog_interval_ignores_another_processes_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A WATCHDOG_PID that is not ours (inherited variables) turns the watchdog off."""
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "thirty"])
def test_watchdog_interval_is_none_when_off_or_malformed(
    usec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset, zero, negative or malformed WATCHDOG_USEC means no watchdog."""
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None


async def test_watchdog_loop_pings_repeatedly(abstract_socket: socket.socket) -> None:
    """The loop sends WATCHDOG=1 again and again until it is cancelled."""
    task = asyncio.create_task(sdnotify.watchdog_loop(0.01))
    try:
        pings = [await _next_datagram(abstract_socket) for _ in range(3)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pings == ["WATCHDOG=1"] * 3


def _block_the_event_loop(seconds: float) -> None:
    """Test hook standing in for a handler that blocks the loop (the hang of case B22)."""
    time.sleep(seconds)


async def test_b22_watchdog_pings_stop_while_the_event_loop_is_blocked(
    abstract_socket: socket.socket,
) -> None:
    """Pings come from the event loop: none arrive while it is blocked, so systemd would abort."""
    interval = 0.01
    task = asyncio.create_task(sdnotify.watchdog_loop(interval))
    try:
        assert await _next_datagram(abstract_socket) == "WATCHDOG=1"
        _received(abstract_socket)  # drop pings sent meanwhile; from here on nothing yields
        _block_the_event_loop(interval * 20)
        assert _received(abstract_socket) == []
        assert await _next_datagram(abstract_socket) == "WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
