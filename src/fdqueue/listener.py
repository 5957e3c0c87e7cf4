"""A dedicated LISTEN connection that reconnects itself and wakes the worker on notifications."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from fdqueue.store import NOTIFY_CHANNEL

log = structlog.get_logger("fdqueue.listener")

# Errors that mean "the connection or the server is gone"; anything else is a bug and raises.
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class Listener:
    """Keeps one non-pooled connection LISTENing on the queue channel.

    Not from the pool on purpose: asyncpg's pool runs `UNLISTEN *` when a connection goes
    back (case B01). `wake()` is called for every notification and after every (re)connect,
    so rows that arrived while the listener was down are claimed at once.
    """

    def __init__(
        self,
        dsn: str,
        wake: Callable[[], None],
        *,
        connect_timeout: float = 10.0,
        keepalive: float = 15.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._wake = wake
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._max_backoff = max_backoff
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._conn: asyncpg.Connection | None = None
        # One operation at a time on the connection: the keepalive and the probe share it (B06).
        self._busy = asyncio.Lock()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with capped, jittered backoff."""
        failures = 0
        while True:
            try:
                await self._listen_once()
                failures = 0
            except CONNECTION_ERRORS as exc:
                failures += 1
                delay = min(self._max_backoff, 0.5 * 2 ** min(failures, 10))
                delay *= 1 + random.random() * 0.25
                log.warning(
                    "LISTEN connection lost; reconnecting",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_seconds=round(delay, 2),
                )
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                await self._close()

    async def _listen_once(self) -> None:
        lost = asyncio.Event()
        self._conn = await asyncpg.connect(
            self._dsn, timeout=self._connect_timeout, statement_cache_size=0
        )
        self._conn.add_termination_listener(lambda _conn: lost.set())
        await self._conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        if self.reconnects:
            log.info("LISTEN connection re-established", reconnects=self.reconnects)
        self.reconnects += 1
        self.connected.set()
        self._wake()  # catch up on rows that arrived while nobody listened
        while not lost.is_set():
            # A blackholed server never closes the socket: a periodic query finds out.
            try:
                await asyncio.wait_for(lost.wait(), timeout=self._keepalive)
            except TimeoutError:
                async with self._busy:
                    await self._conn.fetchval("SELECT 1", timeout=self._connect_timeout)
        raise ConnectionError("the server closed the LISTEN connection")

    def _on_notify(self, *_args: Any) -> None:
        self._wake()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def probe(self, pool: asyncpg.Pool, wait: float = 2.0) -> bool:
        """Check that a NOTIFY sent through `pool` reaches this listener's session (case B05).

        Behind a transaction-mode pooler it does not: LISTEN is session state.
        """
        if self._conn is None:
            return False
        channel = f"fdqueue_probe_{uuid.uuid4().hex}"
        arrived = asyncio.Event()

        def on_probe(*_args: Any) -> None:
            arrived.set()

        conn = self._conn
        async with self._busy:
            await conn.add_listener(channel, on_probe)
        try:
            await pool.execute("SELECT pg_notify($1, '')", channel)
            await asyncio.wait_for(arrived.wait(), timeout=wait)
            return True
        except TimeoutError:
            return False
        finally:
            if not conn.is_closed():
                async with self._busy:
                    await conn.remove_listener(channel, on_probe)
