"""Deliver one claimed row: look up or send, classify, record the outcome, log it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog

from fdqueue import store
from fdqueue.freshdesk import FreshdeskClient, Lookup, marker_for
from fdqueue.listener import CONNECTION_ERRORS
from fdqueue.models import (
    AccountProblem,
    ClaimedTicket,
    Delivered,
    DrainCounts,
    FreshdeskReply,
    Outcome,
    RateLimited,
    SendResult,
)
from fdqueue.pacing import SendGate
from fdqueue.policy import (
    Complete,
    Decision,
    Fail,
    Retry,
    RetryPolicy,
    backoff_seconds,
    classify,
    decide,
)
from fdqueue.worker_metrics import WorkerMetrics

log = structlog.get_logger("fdqueue.delivery")

LOOKUP_BACKOFF_MAX_EXPONENT = 6
LEASE_MARGIN = 5.0  # at most this much of a lease is kept free for recording the outcome

# Labels of what happened to a row, counted by drains and metrics.
COMPLETED, FAILED, RETRY, DEFERRED, LOST = "completed", "failed", "retry", "deferred", "lost"


@dataclass(slots=True)
class Deliverer:
    """Everything one delivery needs; one instance per process, shared by concurrent deliveries."""

    pool: asyncpg.Pool
    client: FreshdeskClient
    rules: RetryPolicy
    gate: SendGate
    lease_seconds: float
    default_retry_after: float = 60.0
    marker_field: str | None = None
    default_tags: Sequence[str] = ()
    # The longest one create call can take (connect + request timeouts).
    send_seconds: float = 40.0
    metrics: WorkerMetrics | None = None
    outcomes: dict[str, int] = field(default_factory=dict)

    async def deliver(self, ticket: ClaimedTicket) -> str:
        """Take a claimed row to its next state; never raises (one row cannot hurt another).

        Returns the label of what happened: completed, failed, retry, deferred or lost (the
        claim was taken over, or the database was unreachable: the lease then expires and the
        row is claimed again).
        """
        try:
            label = await self._deliver(ticket)
        except asyncio.CancelledError:
            raise
        except CONNECTION_ERRORS as exc:
            # The database went away mid-delivery: the lease expires and the row is claimed
            # again (looked up first), so this is a warning, not a crash.
            log.warning(
                "database unavailable during a delivery; its lease will expire",
                queue_id=ticket.id,
                attempt=ticket.attempts,
                error=f"{type(exc).__name__}: {exc}",
            )
            label = LOST
        except Exception:  # recorded and logged: the worker loop must go on
            log.exception(
                "Freshdesk delivery crashed",
                category="FRESHDESK_ERROR",
                queue_id=ticket.id,
                attempt=ticket.attempts,
            )
            label = await self._after_crash(ticket)
        self.outcomes[label] = self.outcomes.get(label, 0) + 1
        if self.metrics is not None:
            self.metrics.deliveries.labels(label).inc()
        return label

    async def _deliver(self, ticket: ClaimedTicket) -> str:
        # Everything up to the end of the send must fit in the lease: once it runs out,
        # another worker may claim the row, and two sends would make two tickets.
        margin = min(LEASE_MARGIN, self.lease_seconds / 10)
        lease_ends = time.monotonic() + self.lease_seconds - margin
        if ticket.reclaimed:
            log.warning(
                "reclaimed a row whose lease expired", queue_id=ticket.id, attempt=ticket.attempts
            )
        if ticket.outcome_unknown:
            found = await self._look_up(ticket, lease_ends - self.send_seconds)
            if found is not None:
                return found
        if ticket.attempts > ticket.max_attempts:
            # Only a maybe-sent row comes back past its last attempt, for the look-up above.
            reason = (
                f"gave up after {ticket.max_attempts} attempts (no ticket in Freshdesk): "
                f"{ticket.last_error or 'unknown error'}"
            )
            return await self._apply(ticket, Fail(reason, ticket.last_http_status), give_back=True)
        room = lease_ends - self.send_seconds - time.monotonic()
        if room < 0 or not await self.gate.slot(max_wait=room):
            return await self._defer(ticket)
        started = time.monotonic()
        result = await self.client.create_ticket(
            ticket.ticket_data,
            marker_for(ticket.public_id),
            marker_field=self.marker_field,
            default_tags=self.default_tags,
        )
        self._observe(result, time.monotonic() - started)
        outcome = classify(result, default_retry_after=self.default_retry_after)
        self._react(outcome, result)
        decision = decide(outcome, ticket.attempts, ticket.max_attempts, self.rules)
        return await self._apply(ticket, decision, outcome=outcome, result=result)

    async def _look_up(self, ticket: ClaimedTicket, finish_by: float) -> str | None:
        """After an unknown outcome: record the ticket Freshdesk already has, if any.

        A look-up that would run past `finish_by` (monotonic) counts as failed: the row
        waits rather than risk a send after its lease.
        """
        try:
            async with asyncio.timeout_at(_loop_time(finish_by)):
                found = await self.client.find_ticket_by_marker(
                    ticket.ticket_data,
                    marker_for(ticket.public_id),
                    created_after=ticket.created_at,
                    marker_field=self.marker_field,
                )
        except TimeoutError:
            found = Lookup(truncated=True)
        if found.failed:
            return await self._look_up_failed(ticket, found)
        if found.ticket_id is None:
            return None
        log.info(
            "found the ticket of an earlier unknown outcome",
            queue_id=ticket.id,
            ticket_id=found.ticket_id,
        )
        return await self._apply(ticket, Complete(found.ticket_id, None), give_back=True)

    async def _look_up_failed(self, ticket: ClaimedTicket, lookup: Lookup) -> str:
        """No answer on whether the ticket exists: sending could duplicate it, so wait.

        Consecutive failures wait 2^n units (at most 2^6: an hour with the default unit), so
        an outage costs a few look-ups per row, not one per unit.
        """
        exponent = min(ticket.lookup_failures, LOOKUP_BACKOFF_MAX_EXPONENT)
        delay = backoff_seconds(exponent, self.rules.backoff_unit, self.rules.backoff_jitter)
        status = None
        reason = "too many tickets to search"
        if lookup.failure is not None:
            outcome = classify(lookup.failure, default_retry_after=self.default_retry_after)
            self._react(outcome, lookup.failure)
            if isinstance(outcome, RateLimited):
                delay = outcome.retry_after
            status = lookup.failure.status if isinstance(lookup.failure, FreshdeskReply) else None
            reason = "unreadable list reply" if isinstance(outcome, Delivered) else outcome.reason
        log.warning(
            "Freshdesk look-up failed; will try again",
            category="FRESHDESK_ERROR",
            queue_id=ticket.id,
            attempt=ticket.attempts,
            http_status=status,
            error=reason,
        )
        applied = await store.record_retry(
            self.pool,
            ticket,
            delay=delay,
            reason=f"look-up failed: {reason}",
            http_status=status,
            give_back=True,
            outcome_unknown=True,
            lookup_failed=True,
        )
        return RETRY if applied else LOST

    def _observe(self, result: SendResult, seconds: float) -> None:
        self.gate.observe(result)
        if self.metrics is not None:
            status = str(result.status) if isinstance(result, FreshdeskReply) else result.kind
            self.metrics.freshdesk_seconds.labels(status).observe(seconds)

    def _react(self, outcome: Outcome, result: SendResult) -> None:
        """Account-wide consequences: pause every send after a 429 or an account error."""
        if isinstance(outcome, RateLimited | AccountProblem) and self.metrics is not None:
            self.metrics.pauses.labels(
                "429" if isinstance(outcome, RateLimited) else "account"
            ).inc()
            if isinstance(outcome, RateLimited):
                self.metrics.rate_limited.inc()
        if isinstance(outcome, RateLimited):
            self.gate.pause(outcome.retry_after, "rate limited (429)")
            assert isinstance(result, FreshdeskReply)
            log.warning(
                "Freshdesk rate limit reached; pausing sends",
                category="FRESHDESK_ERROR",
                retry_after=outcome.retry_after,
                ratelimit_total=result.ratelimit_total,
                ratelimit_remaining=result.ratelimit_remaining,
            )
        elif isinstance(outcome, AccountProblem):
            self.gate.pause(self.rules.account_pause, f"HTTP {outcome.status}")
            log.error(
                "Freshdesk refused the account: check FRESHDESK_API_KEY (401), the agent's "
                "role (403) or FRESHDESK_DOMAIN (404); deliveries are paused",
                category="FRESHDESK_ERROR",
                http_status=outcome.status,
                pause_seconds=self.rules.account_pause,
                error=outcome.reason,
            )

    async def _apply(
        self,
        ticket: ClaimedTicket,
        decision: Decision,
        *,
        outcome: Outcome | None = None,
        result: SendResult | None = None,
        give_back: bool = False,
    ) -> str:
        match decision:
            case Complete(ticket_id=ticket_id, status=status):
                applied = await store.record_completed(
                    self.pool, ticket, ticket_id, status, give_back=give_back
                )
                if applied:
                    log.info(
                        f"Freshdesk ticket completed: queue_id={ticket.id}, ticket_id={ticket_id}",
                        queue_id=ticket.id,
                        ticket_id=ticket_id,
                        attempt=ticket.attempts,
                    )
                return COMPLETED if applied else LOST
            case Fail(reason=reason, status=status):
                applied = await store.record_failed(
                    self.pool, ticket, reason, status, give_back=give_back
                )
                log.error(
                    "Freshdesk ticket failed",
                    category="FRESHDESK_ERROR",
                    queue_id=ticket.id,
                    attempt=ticket.attempts,
                    http_status=status,
                    error_codes=_codes(result),
                    error=reason,
                )
                return FAILED if applied else LOST
            case Retry():
                return await self._retry(ticket, decision, outcome, result)
        raise AssertionError(f"unhandled decision {decision!r}")  # pragma: no cover

    async def _retry(
        self,
        ticket: ClaimedTicket,
        retry: Retry,
        outcome: Outcome | None,
        result: SendResult | None,
    ) -> str:
        applied = await store.record_retry(
            self.pool,
            ticket,
            delay=retry.delay,
            reason=retry.reason,
            http_status=retry.status,
            give_back=retry.give_back,
            outcome_unknown=retry.outcome_unknown,
        )
        if not isinstance(outcome, RateLimited | AccountProblem):
            log.warning(
                "Freshdesk delivery failed; will retry",
                category="FRESHDESK_ERROR",
                queue_id=ticket.id,
                attempt=ticket.attempts,
                http_status=retry.status,
                error_codes=_codes(result),
                retry_in_seconds=round(retry.delay, 3),
                error=retry.reason,
            )
        return RETRY if applied else LOST

    async def _defer(self, ticket: ClaimedTicket) -> str:
        """Sends are paused for longer than the lease allows: hand the row back untouched."""
        applied = await store.record_retry(
            self.pool,
            ticket,
            delay=self.gate.paused_for(),
            reason=self.gate.pause_reason or "paced",
            http_status=None,
            give_back=True,
            outcome_unknown=ticket.outcome_unknown,
        )
        return DEFERRED if applied else LOST

    async def _after_crash(self, ticket: ClaimedTicket) -> str:
        """A bug or a lost database inside one delivery: retry later, look up first."""
        return await self.hand_back(
            ticket, delay=self.rules.backoff_unit, reason="internal error", give_back=False
        )

    async def hand_back(
        self, ticket: ClaimedTicket, *, delay: float, reason: str, give_back: bool
    ) -> str:
        """Put a row whose send may have gone out back to pending; it is looked up first.

        Never raises for a lost database: the lease then expires and brings the row back.
        """
        try:
            applied = await store.record_retry(
                self.pool,
                ticket,
                delay=delay,
                reason=reason,
                http_status=None,
                give_back=give_back,
                outcome_unknown=True,
            )
        except CONNECTION_ERRORS as exc:
            log.warning(
                "could not hand a row back; its lease will expire",
                queue_id=ticket.id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return LOST
        return RETRY if applied else LOST


def _codes(result: SendResult | None) -> list[str]:
    if isinstance(result, FreshdeskReply):
        return [f"{e.field}:{e.code}" if e.field else e.code for e in result.errors]
    return []


async def process_batch(
    deliverer: Deliverer, batch_size: int, token: str, concurrency: int | None = None
) -> DrainCounts:
    """Claim up to `batch_size` due rows and deliver them concurrently (the manual trigger)."""
    counts = DrainCounts()
    tickets = await store.claim_due(deliverer.pool, batch_size, deliverer.lease_seconds, token)
    limit = asyncio.Semaphore(concurrency or max(len(tickets), 1))

    async def one(ticket: ClaimedTicket) -> str:
        async with limit:
            return await deliverer.deliver(ticket)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(t)) for t in tickets]
    for task in tasks:
        counts.add(task.result())
    return counts


def _loop_time(monotonic_deadline: float) -> float:
    """A `time.monotonic()` deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
