"""Group commit for intake: concurrent submissions share one INSERT, one commit and one NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncpg

from fdqueue import store

Writer = Callable[[list[store.NewTicket]], Awaitable[list[store.Enqueued]]]


class QueueUnavailable(Exception):
    """The row was certainly not written: safe to create the ticket directly instead."""


class QueueUncertain(Exception):
    """The INSERT went out and no answer came: the row may exist, so no direct create."""


def pool_writer(pool: asyncpg.Pool, acquire_timeout: float) -> Writer:
    """A Writer on `pool` that tells "certainly not stored" from "maybe stored"."""

    async def write(tickets: list[store.NewTicket]) -> list[store.Enqueued]:
        try:
            conn = await pool.acquire(timeout=acquire_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc
        try:
            return await store.enqueue_many(conn, tickets)
        except asyncpg.DataError:
            raise  # one refused row: the committer retries the others alone
        except asyncpg.PostgresError as exc:  # the server refused: the statement rolled back
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            # The connection broke while the statement was out: it may have committed.
            raise QueueUncertain(f"{type(exc).__name__}: {exc}") from exc
        finally:
            # A broken connection is dropped by the pool; the answer stands either way.
            with contextlib.suppress(
                OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError
            ):
                await pool.release(conn, timeout=5.0)

    return write


Pending = tuple[store.NewTicket, asyncio.Future[store.Enqueued]]


class GroupCommitter:
    """Queues submissions and writes them in batches; each caller gets its own row back.

    There is no timer: a batch leaves as soon as a writer is free, and whatever arrives
    while `writers` batches are in flight waits for the next one. Under light load every
    submission is written alone and at once; under heavy load batches grow by themselves.
    A caller is answered only after the statement holding its row has committed, and a
    failed statement fails every caller of that batch (nothing of it was stored).
    """

    def __init__(self, write: Writer, *, max_batch: int = 200, writers: int = 4) -> None:
        self._write = write
        self._max_batch = max_batch
        self._writers = asyncio.Semaphore(writers)
        self._waiting: list[Pending] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, ticket: store.NewTicket) -> store.Enqueued:
        """Store one submission; returns when its row is committed, raises when it was not."""
        answer: asyncio.Future[store.Enqueued] = asyncio.get_running_loop().create_future()
        self._waiting.append((ticket, answer))
        if len(self._waiting) == 1 or len(self._waiting) >= self._max_batch:
            task = asyncio.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await answer

    async def _flush(self) -> None:
        async with self._writers:
            batch, self._waiting = (
                self._waiting[: self._max_batch],
                self._waiting[self._max_batch :],
            )
            if self._waiting:  # more than one batch's worth arrived: keep going
                task = asyncio.create_task(self._flush())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if not batch:
                return
            await self._write_batch_safely(batch)

    async def _write_batch(self, batch: list[Pending]) -> None:
        try:
            rows = await self._write([ticket for ticket, _ in batch])
        except asyncpg.DataError:
            if len(batch) == 1:
                raise
            # One submission PostgreSQL refuses must not fail its neighbours: write each alone.
            for one in batch:
                await self._write_batch_safely([one])
            return
        for (_, answer), row in zip(batch, rows, strict=True):
            if not answer.done():
                answer.set_result(row)

    async def _write_batch_safely(self, batch: list[Pending]) -> None:
        """Write a batch; whatever happens, every caller gets an answer or the error."""
        try:
            await self._write_batch(batch)
        except Exception as exc:  # noqa: BLE001 - not swallowed: every caller receives it
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
        finally:
            for _, answer in batch:
                if not answer.done():  # cancelled mid-statement: the outcome is unknown
                    answer.set_exception(TimeoutError("intake write interrupted"))
