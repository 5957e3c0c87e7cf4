"""The queue store on a real PostgreSQL: enqueue, claims, leases, outcomes, stats, cleanup."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from fdqueue import store
from fdqueue.models import Transient
from fdqueue.policy import Fail, Retry, RetryPolicy, backoff_seconds, decide

TICKET = {"email": "a@example.com", "subject": "s", "description": "d", "priority": 1, "status": 2}


async def _enqueue_many(pool: asyncpg.Pool, count: int) -> None:
    await pool.execute(
        "INSERT INTO freshdesk_ticket_queue (ticket_data)"
        " SELECT $1::jsonb FROM generate_series(1, $2)",
        TICKET,
        count,
    )


async def test_enqueue_returns_committed_pending_row(pool: asyncpg.Pool) -> None:
    """enqueue stores the body, the operator columns and a public uuid, committed at once."""
    row = await store.enqueue(pool, TICKET, max_attempts=3, chatbot_id="bot", user_id="u1")
    assert row.created
    assert row.status == "pending"
    stored = await pool.fetchrow("SELECT * FROM freshdesk_ticket_queue WHERE id = $1", row.id)
    assert stored is not None
    assert stored["ticket_data"] == TICKET
    assert (stored["chatbot_id"], stored["user_id"], stored["public_id"]) == (
        "bot",
        "u1",
        row.public_id,
    )


async def test_enqueue_same_idempotency_key_returns_first_row(pool: asyncpg.Pool) -> None:
    """A repeated Idempotency-Key returns the first row and stores nothing new."""
    first = await store.enqueue(pool, TICKET, max_attempts=3, idempotency_key="k1")
    again = await store.enqueue(
        pool, {**TICKET, "subject": "other"}, max_attempts=3, idempotency_key="k1"
    )
    assert (again.id, again.created) == (first.id, False)
    assert await pool.fetchval("SELECT count(*) FROM freshdesk_ticket_queue") == 1


async def test_enqueue_concurrent_same_key_stores_one_row(pool: asyncpg.Pool) -> None:
    """Ten concurrent submissions with one key store one row and all answer with it."""
    rows = await asyncio.gather(
        *(store.enqueue(pool, TICKET, max_attempts=3, idempotency_key="race") for _ in range(10))
    )
    assert len({r.id for r in rows}) == 1
    assert sum(r.created for r in rows) == 1


async def test_claim_sets_processing_lease_and_attempt(pool: asyncpg.Pool) -> None:
    """A claim flips due rows to processing under the token, with a lease, attempts + 1."""
    await _enqueue_many(pool, 3)
    claimed = await store.claim_due(pool, 2, 60, "tok")
    assert len(claimed) == 2
    assert all(t.attempts == 1 and t.token == "tok" and not t.reclaimed for t in claimed)
    rows = await pool.fetch(
        "SELECT status, locked_by, locked_until > now() AS leased FROM freshdesk_ticket_queue"
        " WHERE status = 'processing'"
    )
    assert [(r["status"], r["locked_by"], r["leased"]) for r in rows] == [
        ("processing", "tok", True)
    ] * 2


async def test_b09_three_concurrent_claimers_claim_each_row_once(pool: asyncpg.Pool) -> None:
    """B09: three claimers racing over 500 due rows claim every row exactly once."""
    await _enqueue_many(pool, 500)
    seen: list[int] = []

    async def claimer(token: str) -> None:
        while batch := await store.claim_due(pool, 7, 60, token):
            seen.extend(t.id for t in batch)
            await pool.execute("SELECT pg_notify('fdqueue_due', '')")  # a NOTIFY storm

    await asyncio.gather(*(claimer(f"w{i}") for i in range(3)))
    assert len(seen) == 500
    assert len(set(seen)) == 500


async def test_b07_expired_lease_is_reclaimed_and_old_token_refused(pool: asyncpg.Pool) -> None:
    """B07: a row whose lease ran out is claimable again; the dead claim can no longer record."""
    await _enqueue_many(pool, 1)
    [old] = await store.claim_due(pool, 10, 0.2, "dead-worker")
    assert await store.claim_due(pool, 10, 60, "live") == []
    await asyncio.sleep(0.3)
    [new] = await store.claim_due(pool, 10, 60, "live")
    assert new.id == old.id
    assert new.reclaimed
    assert new.outcome_unknown
    assert not await store.record_completed(pool, old, 99, 201)
    assert await store.record_completed(pool, new, 42, 201)
    row = await pool.fetchrow("SELECT status, freshdesk_ticket_id FROM freshdesk_ticket_queue")
    assert row is not None
    assert tuple(row) == ("completed", "42")


async def test_live_lease_is_not_reclaimed(pool: asyncpg.Pool) -> None:
    """A row under a live lease is never handed to another claimer."""
    await _enqueue_many(pool, 1)
    await store.claim_due(pool, 10, 30, "slow-but-alive")
    assert await store.claim_due(pool, 10, 30, "other") == []


async def test_b11_backoff_schedule_and_failure_after_max_attempts(pool: asyncpg.Pool) -> None:
    """B11: transient failures wait 2^attempts units, never early; failed after attempt 3."""
    unit = 0.2
    rules = RetryPolicy(backoff_unit=unit, backoff_jitter=0.0, account_pause=60)
    await _enqueue_many(pool, 1)
    for attempt in (1, 2, 3):
        [ticket] = await store.claim_due(pool, 10, 60, f"t{attempt}")
        assert ticket.attempts == attempt
        decision = decide(
            Transient("HTTP 503", maybe_sent=False, status=503), ticket.attempts, 3, rules
        )
        if attempt < 3:
            assert isinstance(decision, Retry)
            assert await store.record_retry(
                pool,
                ticket,
                delay=decision.delay,
                reason="HTTP 503",
                http_status=503,
                give_back=False,
                outcome_unknown=False,
            )
            # Both columns come from one statement's now(): the difference is the delay itself.
            wait = await pool.fetchval(
                "SELECT extract(epoch FROM next_attempt_at - updated_at)::float8"
                " FROM freshdesk_ticket_queue"
            )
            assert wait == pytest.approx(backoff_seconds(attempt, unit))
            assert await store.claim_due(pool, 10, 60, "too-early") == []
            await asyncio.sleep(wait + 0.05)
        else:
            assert isinstance(decision, Fail)
            assert await store.record_failed(pool, ticket, "gave up", 503)
    row = await pool.fetchrow("SELECT status, attempts FROM freshdesk_ticket_queue")
    assert row is not None
    assert tuple(row) == ("failed", 3)


async def test_retry_with_give_back_keeps_attempt_count(pool: asyncpg.Pool) -> None:
    """A rate-limited try is given back: attempts stay what they were before the claim."""
    await _enqueue_many(pool, 1)
    [ticket] = await store.claim_due(pool, 10, 60, "tok")
    assert await store.record_retry(
        pool, ticket, delay=20, reason="429", http_status=429, give_back=True, outcome_unknown=False
    )
    row = await pool.fetchrow(
        "SELECT status, attempts, next_attempt_at > now() + interval '19 s' AS later"
        " FROM freshdesk_ticket_queue"
    )
    assert row is not None
    assert tuple(row) == ("pending", 0, True)


async def test_stats_counts_every_status_with_zeros(pool: asyncpg.Pool) -> None:
    """stats reports all four statuses, zeros included, plus due rows and the oldest due age."""
    empty = await store.stats(pool)
    assert empty.as_dict()["pending"] == 0
    assert empty.oldest_due_age_seconds is None
    await _enqueue_many(pool, 3)
    [ticket] = await store.claim_due(pool, 1, 60, "tok")
    await store.record_failed(pool, ticket, "bad", 400)
    result = await store.stats(pool)
    assert (result.pending, result.processing, result.completed, result.failed, result.due) == (
        2,
        0,
        0,
        1,
        2,
    )
    assert result.oldest_due_age_seconds is not None
    assert result.oldest_due_age_seconds >= 0


async def test_retry_failed_all_or_one(pool: asyncpg.Pool) -> None:
    """retry_failed sends failed rows back to pending with attempts reset, all or by id."""
    await _enqueue_many(pool, 2)
    claimed = await store.claim_due(pool, 2, 60, "tok")
    for ticket in claimed:
        await store.record_failed(pool, ticket, "bad", 500)
    assert await store.retry_failed(pool, claimed[0].id) == 1
    assert await store.retry_failed(pool) == 1
    rows = await pool.fetch("SELECT status, attempts FROM freshdesk_ticket_queue")
    assert {tuple(r) for r in rows} == {("pending", 0)}


async def test_b13_purge_deletes_only_old_final_rows(pool: asyncpg.Pool) -> None:
    """B13 (a): only completed/failed rows older than the retention are deleted, in batches."""
    await pool.execute(
        """
        INSERT INTO freshdesk_ticket_queue
            (ticket_data, status, processed_at, created_at, locked_until)
        VALUES ('{}', 'completed', now() - interval '31 days', now() - interval '31 days', NULL),
               ('{}', 'failed', now() - interval '31 days', now() - interval '31 days', NULL),
               ('{}', 'pending', NULL, now() - interval '31 days', NULL),
               ('{}', 'processing', now() - interval '40 days', now() - interval '40 days',
                now() - interval '39 days'),
               ('{}', 'completed', now() - interval '29 days', now() - interval '29 days', NULL)
        """
    )
    await pool.execute(
        "INSERT INTO freshdesk_ticket_queue (ticket_data, status, processed_at)"
        " SELECT '{}', 'completed', now() - interval '60 days' FROM generate_series(1, 25)"
    )
    deleted = await store.purge(pool, 30 * 86400, batch=10)
    assert deleted == 27
    left = await pool.fetch("SELECT status FROM freshdesk_ticket_queue ORDER BY id")
    assert [r["status"] for r in left] == ["pending", "processing", "completed"]


async def test_purge_exclusive_runs_once_when_locked(pool: asyncpg.Pool) -> None:
    """With the cleanup lock held elsewhere, purge_exclusive does nothing and says so."""
    async with pool.acquire() as holder:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", store.CLEANUP_LOCK)
        assert await store.purge_exclusive(pool, 1, 10) is None
        await holder.fetchval("SELECT pg_advisory_unlock($1)", store.CLEANUP_LOCK)
    assert await store.purge_exclusive(pool, 1, 10) == 0


async def test_get_by_public_id_has_no_ticket_body(pool: asyncpg.Pool) -> None:
    """The public status lookup returns the status fields and never the ticket body."""
    row = await store.enqueue(pool, TICKET, max_attempts=3)
    found = await store.get_by_public_id(pool, row.public_id)
    assert found is not None
    assert found["status"] == "pending"
    assert "ticket_data" not in found
    assert await store.get_by_public_id(pool, uuid.uuid4()) is None


async def test_seconds_until_next_due(pool: asyncpg.Pool) -> None:
    """The worker's timer target: None with nothing pending, about the delay of a future retry."""
    assert await store.seconds_until_next_due(pool) is None
    await _enqueue_many(pool, 1)
    [ticket] = await store.claim_due(pool, 1, 60, "tok")
    await store.record_retry(
        pool, ticket, delay=30, reason="x", http_status=500, give_back=False, outcome_unknown=True
    )
    wait = await store.seconds_until_next_due(pool)
    assert wait is not None
    assert 29 < wait <= 30
