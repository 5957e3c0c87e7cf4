"""Test harness: the simulator, settings for tests, and a worker running in-process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg

from fdqueue.config import Settings
from fdqueue.freshdesk import FreshdeskClient
from fdqueue.listener import Listener
from fdqueue.simulator import RequestRecord, RunningSimulator
from fdqueue.worker import Worker, WorkerOptions, build_deliverer

API_KEY = "test-key"
TICKET = {
    "email": "ada@example.com",
    "subject": "Printer on fire",
    "description": "<p>It is on fire.</p>",
    "priority": 2,
    "status": 2,
    "source": 2,
}


def make_settings(db_url: str, sim_url: str, **overrides: Any) -> Settings:
    """Settings for a test: short time units, the simulator as Freshdesk."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "freshdesk_base_url": sim_url,
        "freshdesk_api_key": API_KEY,
        "backoff_unit": 0.1,
        "backoff_jitter": 0.0,
        "poll_interval": 60.0,
        "http_timeout": 5.0,
        "http_connect_timeout": 2.0,
        "rate_limit_default_wait": 0.5,
        "auth_pause": 0.5,
        "shutdown_grace": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


async def sim_faults(sim: RunningSimulator, payload: dict[str, Any]) -> None:
    """Script the simulator's next answers (see docs/simulator.md)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sim.url}/_simulator/faults", json=payload) as response,
    ):
        assert response.status == 200, await response.text()


def creates(sim: RunningSimulator) -> list[RequestRecord]:
    """Every create request the simulator saw, in order."""
    return [r for r in sim.state.requests if r.method == "POST" and r.path == "/api/v2/tickets"]


def markers(sim: RunningSimulator) -> list[str]:
    """The fdqueue marker tag of every ticket the simulator holds."""
    return [tag for t in sim.state.tickets for tag in t["tags"] if tag.startswith("fdq-")]


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float = 20.0, every: float = 0.05
) -> None:
    """Poll `check` until it holds; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(every)


async def statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM freshdesk_ticket_queue GROUP BY 1")
    return {row["status"]: row["n"] for row in rows}


async def all_completed(pool: asyncpg.Pool, count: int) -> bool:
    return (await statuses(pool)).get("completed", 0) == count


async def insert_tickets(
    pool: asyncpg.Pool, count: int, ticket: dict[str, Any] | None = None
) -> None:
    """`count` pending rows in ONE statement, hence one NOTIFY."""
    await pool.execute(
        "INSERT INTO freshdesk_ticket_queue (ticket_data)"
        " SELECT $1::jsonb FROM generate_series(1, $2)",
        ticket or TICKET,
        count,
    )


class RunningWorker:
    """A worker with its own client, run loop and (optionally) its LISTEN connection."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, *, listen_dsn: str | None) -> None:
        base_url, api_key = settings.require_freshdesk()
        self.client = FreshdeskClient(
            base_url,
            api_key,
            timeout=settings.http_timeout,
            connect_timeout=settings.http_connect_timeout,
            max_in_flight=settings.concurrency,
        )
        self.worker = Worker(
            build_deliverer(settings, pool, self.client), WorkerOptions.from_settings(settings)
        )
        self.listener = (
            Listener(listen_dsn, self.worker.wake, keepalive=1.0, max_backoff=1.0)
            if listen_dsn
            else None
        )
        self._listening: asyncio.Task[None] | None = None
        self._running: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.listener is not None:
            self._listening = asyncio.create_task(self.listener.run())
            await asyncio.wait_for(self.listener.connected.wait(), timeout=10)
        self._running = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        """Stop as SIGTERM would: no new claims, in-flight deliveries finish or are released."""
        self.worker.stopping.set()
        if self._running is not None:
            await asyncio.wait_for(self._running, timeout=30)
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        await self.client.close()


@asynccontextmanager
async def running_worker(
    settings: Settings, pool: asyncpg.Pool, *, listen: bool = True
) -> AsyncIterator[RunningWorker]:
    """A worker running its loop for the duration of the block."""
    dsn = settings.require_database() if listen else None
    worker = RunningWorker(settings, pool, listen_dsn=dsn)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
