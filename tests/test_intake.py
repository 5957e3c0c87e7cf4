"""Group commit: concurrent submissions share statements, each caller gets its own committed row."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from fdqueue import store
from fdqueue.intake import GroupCommitter

TICKET = {"email": "a@example.com", "subject": "s", "description": "d"}


async def test_concurrent_submissions_are_batched_and_each_answered(pool: asyncpg.Pool) -> None:
    """200 concurrent submits take far fewer statements, and every caller gets its own row."""
    statements: list[int] = []

    async def write(tickets: list[store.NewTicket]) -> list[store.Enqueued]:
        statements.append(len(tickets))
        return await store.enqueue_many(pool, tickets)

    committer = GroupCommitter(write, max_batch=50, writers=2)
    tickets = [store.NewTicket({**TICKET, "subject": f"s{i}"}, 3) for i in range(200)]
    rows = await asyncio.gather(*(committer.submit(t) for t in tickets))
    assert len({row.id for row in rows}) == 200
    assert len(statements) < 200
    assert sum(statements) == 200
    stored = {
        r["id"]: r["ticket_data"]["subject"]
        for r in await pool.fetch("SELECT id, ticket_data FROM freshdesk_ticket_queue")
    }
    assert [stored[row.id] for row in rows] == [f"s{i}" for i in range(200)]


async def test_idempotency_keys_within_and_across_batches(pool: asyncpg.Pool) -> None:
    """The same key twice in one batch, or again later, maps to the first row only."""
    committer = GroupCommitter(lambda t: store.enqueue_many(pool, t))
    first, again = await asyncio.gather(
        committer.submit(store.NewTicket(TICKET, 3, idempotency_key="k")),
        committer.submit(store.NewTicket(TICKET, 3, idempotency_key="k")),
    )
    later = await committer.submit(store.NewTicket(TICKET, 3, idempotency_key="k"))
    assert first.id == again.id == later.id
    assert (first.created, again.created, later.created) == (True, False, False)
    assert await pool.fetchval("SELECT count(*) FROM freshdesk_ticket_queue") == 1


async def test_a_row_postgres_refuses_does_not_fail_its_neighbours(pool: asyncpg.Pool) -> None:
    """A submission PostgreSQL cannot store fails alone; the rest of its batch is stored."""
    committer = GroupCommitter(lambda t: store.enqueue_many(pool, t), writers=1)
    good = [store.NewTicket(TICKET, 3) for _ in range(5)]
    bad = store.NewTicket({**TICKET, "subject": "nul \u0000 byte"}, 3)
    results = await asyncio.gather(
        *(committer.submit(t) for t in [*good[:2], bad, *good[2:]]), return_exceptions=True
    )
    assert isinstance(results[2], asyncpg.DataError)
    assert sum(isinstance(r, store.Enqueued) for r in results) == 5
    assert await pool.fetchval("SELECT count(*) FROM freshdesk_ticket_queue") == 5


async def test_database_down_fails_every_caller_of_the_batch() -> None:
    """When the write fails, each waiting caller gets the error (nothing was stored)."""

    async def broken(tickets: list[store.NewTicket]) -> list[store.Enqueued]:
        raise ConnectionRefusedError("database down")

    committer = GroupCommitter(broken)
    with pytest.raises(ConnectionRefusedError):
        await committer.submit(store.NewTicket(TICKET, 3))
