"""Faults found by the chaos scenarios (tools/chaos.py), each shown with its smallest setup."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncpg
import pytest
import structlog
from aiohttp import web

from fdqueue import store
from fdqueue.api import create_app
from fdqueue.freshdesk import FreshdeskClient
from fdqueue.simulator import RunningSimulator
from fdqueue.worker import build_deliverer
from tests.harness import (
    API_KEY,
    all_completed,
    insert_tickets,
    make_settings,
    running_worker,
    sim_faults,
    wait_until,
)

# What asyncpg raises on a connection that a PostgreSQL restart or pg_terminate_backend
# broke: seen in the chaos "outage" scenario, where it killed the worker process.
BROKEN_CONNECTION_ERRORS = [
    asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
    asyncpg.InterfaceError("connection is closed"),
]


class FlakyPool:
    """A real pool whose first `failures` calls of `method` raise `error` instead."""

    def __init__(self, pool: asyncpg.Pool, method: str, error: Exception, failures: int) -> None:
        self._pool = pool
        self._method = method
        self._error = error
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._pool, name)
        if name != self._method:
            return real

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            if self.failures > 0:
                self.failures -= 1
                raise self._error
            return await real(*args, **kwargs)

        return flaky


@pytest.mark.parametrize("error", BROKEN_CONNECTION_ERRORS, ids=lambda e: type(e).__name__)
async def test_b01_worker_loop_survives_a_broken_connection(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator, error: Exception
) -> None:
    """B01: a claim that fails on a connection broken by a restart is retried; the loop lives."""
    await insert_tickets(pool, 3)
    flaky = cast(asyncpg.Pool, FlakyPool(pool, "fetch", error, failures=2))
    settings = make_settings(db_url, sim.url, poll_interval=0.2)
    async with running_worker(settings, flaky, listen=False):
        await wait_until(lambda: all_completed(pool, 3))


@pytest.mark.parametrize("error", BROKEN_CONNECTION_ERRORS, ids=lambda e: type(e).__name__)
async def test_b07_deliver_never_raises_when_recording_fails(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator, error: Exception
) -> None:
    """B07: when every write-back fails on a broken connection, `deliver` returns "lost" (the
    lease brings the row back) instead of raising into the drain or the manual route."""
    await insert_tickets(pool, 1)
    [ticket] = await store.claim_due(pool, 1, 30.0, "regression")
    flaky = cast(asyncpg.Pool, FlakyPool(pool, "execute", error, failures=10))
    client = FreshdeskClient(sim.url, API_KEY)
    try:
        label = await build_deliverer(make_settings(db_url, sim.url), flaky, client).deliver(ticket)
    finally:
        await client.close()
    assert label == "lost"


async def test_client_gone_mid_body_is_no_server_error(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """A client that hangs up halfway through its body (slowloris, a closed tab) gets no 500
    and logs no error: aiohttp's ConnectionResetError from `request.read()` is the client's."""
    # As `serve_api` runs it: aiohttp's default, no handler cancellation on disconnect
    # (aiohttp's TestServer turns cancellation on, which hides the fault).
    runner = web.AppRunner(create_app(make_settings(db_url, sim.url), pool=pool))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        with structlog.testing.capture_logs() as logs:
            _, writer = await asyncio.open_connection(host, port)
            writer.write(
                b"POST /api/create-freshdesk-ticket HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()
    assert [event["event"] for event in logs if event["log_level"] == "error"] == []


async def test_b11_lookups_during_an_outage_back_off(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B11: a maybe-sent row whose marker look-up keeps failing (Freshdesk down) waits longer
    each time, as sends do, instead of listing tickets once per backoff unit forever."""
    await insert_tickets(pool, 1)
    await pool.execute("UPDATE freshdesk_ticket_queue SET outcome_unknown = true")
    await sim_faults(sim, {"down": True})
    settings = make_settings(db_url, sim.url, backoff_unit=0.05, poll_interval=0.05)
    async with running_worker(settings, pool, listen=False):
        await asyncio.sleep(3.0)
    lookups = [r for r in sim.state.requests if r.method == "GET"]
    # Doubling from 0.05 s fits at most 6 look-ups into 3 s; a constant delay fits ~60.
    assert len(lookups) <= 8
