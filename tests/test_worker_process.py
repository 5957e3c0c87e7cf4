"""`fdqueue worker` as a real process: systemd notifications, SIGTERM drain, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from fdqueue.embedded import free_port
from fdqueue.simulator import RunningSimulator
from tests.harness import API_KEY, all_completed, creates, insert_tickets, wait_until

pytestmark = pytest.mark.slow


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def wait_for(self, needle: str, within: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not any(needle in m for m in self.messages):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {needle!r} in {self.messages}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            except TimeoutError:
                continue
            self.messages.append(data.decode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


async def start_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FDQUEUE_", "FRESHDESK_"))}
    base.pop("DATABASE_URL", None)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fdqueue.cli",
        "worker",
        env={**base, "FDQUEUE_LOG_FORMAT": "json", **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_b22_ready_after_database_and_stopping_on_sigterm(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator, notify_socket: NotifySocket
) -> None:
    """B22: READY=1 once pool and LISTEN are up, WATCHDOG=1 pings, STOPPING=1, exit 0; in-flight
    deliveries finish during the SIGTERM drain."""
    sim.state.config.latency = 1.5
    proc = await start_worker(
        {
            "DATABASE_URL": db_url,
            "FDQUEUE_FRESHDESK_BASE_URL": sim.url,
            "FRESHDESK_API_KEY": API_KEY,
            "NOTIFY_SOCKET": str(notify_socket.path),
            "WATCHDOG_USEC": "500000",
        }
    )
    try:
        await notify_socket.wait_for("READY=1")
        await notify_socket.wait_for("WATCHDOG=1")
        await insert_tickets(pool, 5)
        await wait_until(lambda: _in_flight(sim, 5))
        proc.send_signal(signal.SIGTERM)
        await notify_socket.wait_for("STOPPING=1")
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert await all_completed(pool, 5)


async def _in_flight(sim: RunningSimulator, count: int) -> bool:
    return len(creates(sim)) >= count


async def test_b22_database_down_at_start_is_retried_not_ready(
    sim: RunningSimulator, notify_socket: NotifySocket
) -> None:
    """B22: with the database unreachable the worker says why in STATUS=, never READY=1."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    proc = await start_worker(
        {
            "DATABASE_URL": dead,
            "FDQUEUE_FRESHDESK_BASE_URL": sim.url,
            "FRESHDESK_API_KEY": API_KEY,
            "NOTIFY_SOCKET": str(notify_socket.path),
            "FDQUEUE_DB_CONNECT_TIMEOUT": "1",
        }
    )
    try:
        await notify_socket.wait_for("STATUS=waiting for the database")
        assert not any("READY=1" in m for m in notify_socket.messages)
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_config_exits_78_with_one_line() -> None:
    """Invalid configuration: one line naming the variable, exit status 78, no traceback."""
    proc = await start_worker({"FDQUEUE_BATCH_SIZE": "lots", "DATABASE_URL": "postgresql://x/y"})
    _, err = await proc.communicate()
    assert proc.returncode == 78
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert "FDQUEUE_BATCH_SIZE" in lines[0]


async def test_missing_api_key_exits_78() -> None:
    """B25: an empty API key stops the worker at start-up instead of a storm of 401s."""
    proc = await start_worker(
        {
            "DATABASE_URL": "postgresql://x/y",
            "FRESHDESK_DOMAIN": "acme",
            "FRESHDESK_API_KEY": " ",
        }
    )
    _, err = await proc.communicate()
    assert proc.returncode == 78
    assert "FRESHDESK_API_KEY: required setting missing" in err.decode()
