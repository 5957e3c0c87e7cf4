"""The queue in PostgreSQL: each SQL statement a named constant beside the function running it."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from fdqueue.models import ClaimedTicket, QueueStats

# A pool, a connection, or a connection acquired from a pool: all run single statements.
DB = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy

NOTIFY_CHANNEL = "fdqueue_due"  # must match the trigger in sql/0001_queue.sql
CLEANUP_LOCK = 0x6664_7175_6563  # advisory lock: one cleanup at a time across all workers


async def init_connection(conn: asyncpg.Connection) -> None:
    """Decode JSONB to Python objects on every pooled connection."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on every release: half of a delivery's round trips.

    fdqueue never changes a pooled session's state (no SET, no LISTEN on pooled connections,
    and the one session-level advisory lock is released in a `finally`), and asyncpg still
    rolls back a transaction left open before the connection goes back.
    """


async def create_pool(
    dsn: str, *, max_size: int = 10, statement_cache_size: int = 100, connect_timeout: float = 10.0
) -> asyncpg.Pool:
    """A pool whose connections decode JSONB; `statement_cache_size=0` suits PgBouncer."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        statement_cache_size=statement_cache_size,
        timeout=connect_timeout,
        init=init_connection,
        reset=_keep_session,
        server_settings={"application_name": "fdqueue"},
    )
    assert pool is not None
    return pool


# --- Intake ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The stored row as the intake answers it; `created` is False for a repeated key."""

    id: int
    public_id: uuid.UUID
    status: str
    created_at: datetime
    created: bool


# One round trip: the statement-level trigger sends the NOTIFY inside this statement's
# transaction, and a repeated idempotency key returns the first row instead of a new one.
ENQUEUE = """
WITH inserted AS (
    INSERT INTO freshdesk_ticket_queue
        (ticket_data, max_attempts, chatbot_id, user_id, idempotency_key)
    VALUES ($1::jsonb, $2, $3, $4, $5)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, public_id, status, created_at, true AS created
)
SELECT * FROM inserted
UNION ALL
SELECT id, public_id, status, created_at, false
FROM freshdesk_ticket_queue
WHERE $5::text IS NOT NULL AND idempotency_key = $5 AND NOT EXISTS (SELECT 1 FROM inserted)
"""
# A concurrent insert of the same key commits after our statement's snapshot was taken,
# so the first statement can see neither row; this read, in a new snapshot, does.
FIND_BY_IDEMPOTENCY_KEY = """
SELECT id, public_id, status, created_at, false AS created
FROM freshdesk_ticket_queue WHERE idempotency_key = $1
"""


async def enqueue(
    db: DB,
    ticket_data: dict[str, Any],
    *,
    max_attempts: int,
    chatbot_id: str | None = None,
    user_id: str | None = None,
    idempotency_key: str | None = None,
) -> Enqueued:
    """Insert a pending row and wake the workers (NOTIFY); commits before returning.

    With an idempotency key already stored, returns that row (created=False) and stores nothing.
    """
    args = (ticket_data, max_attempts, chatbot_id, user_id, idempotency_key)
    row = await db.fetchrow(ENQUEUE, *args)
    if row is None and idempotency_key is not None:
        row = await db.fetchrow(FIND_BY_IDEMPOTENCY_KEY, idempotency_key)
    if row is None:
        raise RuntimeError("enqueue returned no row")
    return Enqueued(**dict(row))


@dataclass(frozen=True, slots=True)
class NewTicket:
    """One submission to store (see `enqueue_many`)."""

    ticket_data: dict[str, Any]
    max_attempts: int
    chatbot_id: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = None


# Many submissions in one statement and one commit (group commit): NOTIFY serialises
# concurrent commits, so one commit for many rows beats one per row. The public ids are
# made by the caller so each answer finds its own row; rows whose idempotency key is
# already stored (or repeated within the batch) are skipped here and read back below.
ENQUEUE_MANY = """
INSERT INTO freshdesk_ticket_queue
    (public_id, ticket_data, max_attempts, chatbot_id, user_id, idempotency_key)
SELECT * FROM unnest($1::uuid[], $2::text[]::jsonb[], $3::int[], $4::text[], $5::text[], $6::text[])
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, public_id, status, created_at, true AS created
"""
FIND_BY_IDEMPOTENCY_KEYS = """
SELECT id, public_id, status, created_at, false AS created, idempotency_key
FROM freshdesk_ticket_queue WHERE idempotency_key = ANY($1::text[])
"""


async def enqueue_many(db: DB, tickets: list[NewTicket]) -> list[Enqueued]:
    """Store many submissions in one statement (one commit, one NOTIFY); answers in order.

    A submission whose idempotency key is already stored gets that row (created=False).
    """
    public_ids = [uuid.uuid4() for _ in tickets]
    rows = await db.fetch(
        ENQUEUE_MANY,
        public_ids,
        [json.dumps(t.ticket_data) for t in tickets],
        [t.max_attempts for t in tickets],
        [t.chatbot_id for t in tickets],
        [t.user_id for t in tickets],
        [t.idempotency_key for t in tickets],
    )
    by_public_id = {row["public_id"]: Enqueued(**dict(row)) for row in rows}
    missing = [
        t.idempotency_key
        for t, p in zip(tickets, public_ids, strict=True)
        if p not in by_public_id and t.idempotency_key is not None
    ]
    by_key = {}
    if missing:
        for row in await db.fetch(FIND_BY_IDEMPOTENCY_KEYS, missing):
            fields = dict(row)
            key = fields.pop("idempotency_key")
            by_key[key] = Enqueued(**fields)
    answers = []
    for ticket, public_id in zip(tickets, public_ids, strict=True):
        found = by_public_id.get(public_id) or by_key.get(ticket.idempotency_key or "")
        if found is None:
            raise RuntimeError("enqueue_many lost a row")  # pragma: no cover
        answers.append(found)
    return answers


# --- Claiming ----------------------------------------------------------------------------

# One atomic statement: lock due rows (skipping rows other claimers hold), flip them to
# processing under a lease, count the attempt. Two CTEs so each reads its own partial index
# in order with a LIMIT instead of sorting every due row: expired leases of dead workers
# first, then pending rows by next_attempt_at. A reclaimed row's last send may have reached
# Freshdesk, so it is marked outcome_unknown (look up before sending again).
CLAIM_DUE = """
WITH expired AS (
    SELECT id, true AS reclaimed FROM freshdesk_ticket_queue
    WHERE status = 'processing' AND locked_until < now()
    ORDER BY locked_until
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), due AS (
    SELECT id, false AS reclaimed FROM freshdesk_ticket_queue
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT $1 - (SELECT count(*) FROM expired)
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT * FROM expired UNION ALL SELECT * FROM due
)
UPDATE freshdesk_ticket_queue AS q
SET status = 'processing',
    attempts = q.attempts + 1,
    outcome_unknown = q.outcome_unknown OR picked.reclaimed,
    locked_until = now() + make_interval(secs => $2),
    locked_by = $3,
    updated_at = now()
FROM picked
WHERE q.id = picked.id
RETURNING q.id, q.public_id, q.ticket_data, q.attempts, q.max_attempts, q.outcome_unknown,
          q.created_at, picked.reclaimed, q.error_message AS last_error, q.last_http_status,
          q.lookup_failures
"""


async def claim_due(db: DB, limit: int, lease_seconds: float, token: str) -> list[ClaimedTicket]:
    """Claim up to `limit` due rows for `token` for `lease_seconds`; commits before returning."""
    rows = await db.fetch(CLAIM_DUE, limit, lease_seconds, token)
    claimed = [ClaimedTicket(token=token, **dict(row)) for row in rows]
    return sorted(claimed, key=lambda ticket: ticket.id)


NEXT_DUE_IN = """
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
FROM freshdesk_ticket_queue WHERE status = 'pending'
"""


async def seconds_until_next_due(db: DB) -> float | None:
    """Seconds until the earliest pending row is due (≤ 0: due now); None when none is pending."""
    return await _seconds(db, NEXT_DUE_IN)


NEXT_LEASE_EXPIRY_IN = """
SELECT extract(epoch FROM min(locked_until) - now())::float8
FROM freshdesk_ticket_queue WHERE status = 'processing'
"""


async def seconds_until_lease_expiry(db: DB) -> float | None:
    """Seconds until the earliest lease runs out; None when nothing is processing."""
    return await _seconds(db, NEXT_LEASE_EXPIRY_IN)


async def _seconds(db: DB, query: str) -> float | None:
    value = await db.fetchval(query)
    return None if value is None else float(value)


# --- Recording outcomes -------------------------------------------------------------------
# Every write-back is guarded by "still processing under my token": a worker whose lease
# expired (and whose row another worker now holds) can no longer change the row.

RECORD_COMPLETED = """
UPDATE freshdesk_ticket_queue
SET status = 'completed', freshdesk_ticket_id = $3, last_http_status = $4,
    attempts = attempts - $5::int,
    processed_at = now(), updated_at = now(), error_message = NULL,
    outcome_unknown = false, locked_until = NULL, locked_by = NULL
WHERE id = $1 AND status = 'processing' AND locked_by = $2
"""


async def record_completed(
    db: DB,
    ticket: ClaimedTicket,
    freshdesk_id: int,
    http_status: int | None,
    *,
    give_back: bool = False,
) -> bool:
    """Mark the row completed with Freshdesk's id; False when the claim was lost."""
    result = await db.execute(
        RECORD_COMPLETED, ticket.id, ticket.token, str(freshdesk_id), http_status, int(give_back)
    )
    return _changed(result)


RECORD_FAILED = """
UPDATE freshdesk_ticket_queue
SET status = 'failed', error_message = $3, last_http_status = $4,
    attempts = attempts - $5::int,
    processed_at = now(), updated_at = now(),
    outcome_unknown = false, locked_until = NULL, locked_by = NULL
WHERE id = $1 AND status = 'processing' AND locked_by = $2
"""


async def record_failed(
    db: DB, ticket: ClaimedTicket, reason: str, http_status: int | None, *, give_back: bool = False
) -> bool:
    """Mark the row failed for good with the reason; False when the claim was lost."""
    result = await db.execute(
        RECORD_FAILED, ticket.id, ticket.token, reason[:4000], http_status, int(give_back)
    )
    return _changed(result)


RECORD_RETRY = """
UPDATE freshdesk_ticket_queue
SET status = 'pending', error_message = $3, last_http_status = $4,
    attempts = greatest(attempts - $5::int, 0),
    next_attempt_at = now() + make_interval(secs => $6),
    outcome_unknown = $7,
    lookup_failures = CASE WHEN $8 THEN lookup_failures + 1 ELSE 0 END,
    updated_at = now(), locked_until = NULL, locked_by = NULL
WHERE id = $1 AND status = 'processing' AND locked_by = $2
"""


async def record_retry(
    db: DB,
    ticket: ClaimedTicket,
    *,
    delay: float,
    reason: str,
    http_status: int | None,
    give_back: bool,
    outcome_unknown: bool,
    lookup_failed: bool = False,
) -> bool:
    """Put the row back to pending, due in `delay` seconds; False when the claim was lost.

    `give_back` returns the attempt counted at claim (rate limits, account problems,
    shutdown). `lookup_failed` counts one more failed marker look-up (else the count
    resets). A zero delay makes the row due now, which also wakes the workers.
    """
    result = await db.execute(
        RECORD_RETRY,
        ticket.id,
        ticket.token,
        reason[:4000],
        http_status,
        int(give_back),
        max(delay, 0.0),
        outcome_unknown,
        lookup_failed,
    )
    return _changed(result)


# Rows held back by an account problem (bad key, role or domain) are due again as soon as a
# worker starts: a restart is how a fixed FRESHDESK_API_KEY takes effect.
RESUME_ACCOUNT_PAUSES = """
UPDATE freshdesk_ticket_queue
SET next_attempt_at = now(), updated_at = now()
WHERE status = 'pending' AND last_http_status IN (401, 403, 404) AND next_attempt_at > now()
"""


async def resume_account_pauses(db: DB) -> int:
    """Make rows paused by 401/403/404 due now; returns how many."""
    return int((await db.execute(RESUME_ACCOUNT_PAUSES)).split()[-1])


def _changed(command_tag: str) -> bool:
    return command_tag.endswith(" 1")


# --- Operators ----------------------------------------------------------------------------

STATS = """
SELECT count(*) FILTER (WHERE status = 'pending')    AS pending,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       count(*) FILTER (WHERE status = 'completed')  AS completed,
       count(*) FILTER (WHERE status = 'failed')     AS failed,
       count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()) AS due,
       extract(epoch FROM now() - min(next_attempt_at)
               FILTER (WHERE status = 'pending' AND next_attempt_at <= now()))::float8
           AS oldest_due_age_seconds
FROM freshdesk_ticket_queue
"""


async def stats(db: DB) -> QueueStats:
    """Counts by status (zeros included), due rows and the age of the oldest due row."""
    row = await db.fetchrow(STATS)
    assert row is not None
    return QueueStats(**dict(row))


# Public status of one submission: no ticket_data, nothing personal.
GET_BY_PUBLIC_ID = """
SELECT id, public_id, status, attempts, max_attempts, created_at, updated_at, processed_at,
       next_attempt_at, freshdesk_ticket_id, error_message, last_http_status
FROM freshdesk_ticket_queue WHERE public_id = $1
"""


async def get_by_public_id(db: DB, public_id: uuid.UUID) -> dict[str, Any] | None:
    """One submission's status fields, or None."""
    row = await db.fetchrow(GET_BY_PUBLIC_ID, public_id)
    return None if row is None else dict(row)


GET_BY_ID = """
SELECT id, public_id, status, attempts, max_attempts, created_at, updated_at, processed_at,
       next_attempt_at, freshdesk_ticket_id, error_message, last_http_status, locked_until,
       locked_by, outcome_unknown, chatbot_id, user_id
FROM freshdesk_ticket_queue WHERE id = $1
"""


async def get_by_id(db: DB, queue_id: int) -> dict[str, Any] | None:
    """One row's operational fields (no ticket body), or None."""
    row = await db.fetchrow(GET_BY_ID, queue_id)
    return None if row is None else dict(row)


# The original "Retry Failed Tickets" recovery, for all failed rows or one; the trigger
# wakes the workers because the rows become due now.
RETRY_FAILED = """
UPDATE freshdesk_ticket_queue
SET status = 'pending', attempts = 0, next_attempt_at = now(), error_message = NULL,
    processed_at = NULL, outcome_unknown = false, updated_at = now()
WHERE status = 'failed' AND ($1::bigint IS NULL OR id = $1)
"""


async def retry_failed(db: DB, queue_id: int | None = None) -> int:
    """Send failed rows (all, or the one with `queue_id`) back to pending now; returns the count."""
    result = await db.execute(RETRY_FAILED, queue_id)
    return int(result.split()[-1])


# Bounded batches keep each DELETE short, so it never blocks claims and status updates for
# long (case B13); only final rows are ever deleted.
PURGE_BATCH = """
DELETE FROM freshdesk_ticket_queue
WHERE id IN (
    SELECT id FROM freshdesk_ticket_queue
    WHERE status IN ('completed', 'failed')
      AND processed_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""


async def purge(db: DB, older_than_seconds: float, batch: int = 1000) -> int:
    """Delete completed/failed rows processed more than `older_than_seconds` ago; return the count.

    Each batch commits on its own, so stopping halfway leaves a consistent table.
    """
    total = 0
    while True:
        result = await db.execute(PURGE_BATCH, older_than_seconds, batch)
        deleted = int(result.split()[-1])
        total += deleted
        if deleted < batch:
            return total


TRY_CLEANUP_LOCK = "SELECT pg_try_advisory_lock($1)"
RELEASE_CLEANUP_LOCK = "SELECT pg_advisory_unlock($1)"


async def purge_exclusive(
    pool: asyncpg.Pool, older_than_seconds: float, batch: int = 1000
) -> int | None:
    """Run `purge` unless another process is already cleaning up (then return None)."""
    async with pool.acquire() as conn:
        if not await conn.fetchval(TRY_CLEANUP_LOCK, CLEANUP_LOCK):
            return None
        try:
            return await purge(conn, older_than_seconds, batch)
        finally:
            await conn.fetchval(RELEASE_CLEANUP_LOCK, CLEANUP_LOCK)


PING = "SELECT 1"


async def ping(db: DB) -> bool:
    """True when the database answers."""
    value = await db.fetchval(PING)
    return bool(value == 1)
