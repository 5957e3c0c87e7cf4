"""Pure decisions: what a Freshdesk reply means for a row, and when to try again. No IO."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fdqueue.models import (
    AccountProblem,
    Delivered,
    FreshdeskReply,
    Outcome,
    RateLimited,
    Rejected,
    SendResult,
    Transient,
    TransportFailure,
)

# Statuses that a retry cannot fix; everything else in 4xx that is not listed below is
# treated the same way (DESIGN §6).
ACCOUNT_STATUSES = frozenset({401, 403, 404})
# Request Timeout, Locked and Too Early may pass on retry; other 4xx (409 included: a
# conflicting state such as an existing contact) will not.
TRANSIENT_4XX = frozenset({408, 423, 425})


def classify(result: SendResult, *, default_retry_after: float) -> Outcome:
    """Map a create-ticket result to the outcome of DESIGN §6's table."""
    if isinstance(result, TransportFailure):
        return Transient(
            reason=f"{result.kind}: {result.detail}", maybe_sent=result.kind == "unknown"
        )
    return _classify_reply(result, default_retry_after)


def _classify_reply(reply: FreshdeskReply, default_retry_after: float) -> Outcome:
    status = reply.status
    if 200 <= status < 300:
        if reply.ticket_id is None:
            # Created, but the id is unreadable: never resend (a duplicate); look it up later.
            return Transient(
                reason=f"HTTP {status} without a ticket id", maybe_sent=True, status=status
            )
        return Delivered(ticket_id=reply.ticket_id, status=status)
    if status == 429:
        wait = reply.retry_after if reply.retry_after is not None else default_retry_after
        return RateLimited(retry_after=max(wait, 1.0), reason=_reason(reply))
    if status in ACCOUNT_STATUSES:
        return AccountProblem(status=status, reason=_reason(reply))
    if 400 <= status < 500 and status not in TRANSIENT_4XX:
        return Rejected(status=status, reason=_reason(reply))
    # 5xx (and odd statuses): Freshdesk may have created the ticket before failing.
    return Transient(reason=_reason(reply), maybe_sent=True, status=status)


def _reason(reply: FreshdeskReply) -> str:
    if reply.errors:
        return "; ".join(str(error) for error in reply.errors)[:2000]
    snippet = " ".join(reply.body_snippet.split())[:200]
    return f"HTTP {reply.status}" + (f": {snippet}" if snippet else "")


def backoff_seconds(
    attempts: int, unit: float, jitter: float = 0.0, rng: random.Random | None = None
) -> float:
    """Delay before the next try after `attempts` tries: 2^attempts units, plus up to `jitter`.

    Jitter is only ever added, so a retry never comes earlier than the formula says.
    """
    base = float(2 ** max(attempts, 0)) * unit
    if jitter <= 0:
        return base
    draw: float = (rng or random.Random()).random()
    return base * (1 + draw * jitter)


@dataclass(frozen=True, slots=True)
class Retry:
    """Back to pending after `delay` seconds; `give_back` returns the claim's attempt."""

    delay: float
    reason: str
    give_back: bool
    outcome_unknown: bool
    status: int | None


@dataclass(frozen=True, slots=True)
class Complete:
    ticket_id: int
    status: int | None


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str
    status: int | None


Decision = Retry | Complete | Fail


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The numbers behind `decide`; built from Settings."""

    backoff_unit: float
    backoff_jitter: float
    account_pause: float


def decide(
    outcome: Outcome,
    attempts: int,
    max_attempts: int,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> Decision:
    """What the row becomes; `attempts` already counts this try (it is incremented at claim)."""
    match outcome:
        case Delivered(ticket_id=ticket_id, status=status):
            return Complete(ticket_id=ticket_id, status=status)
        case Rejected(status=status, reason=reason):
            return Fail(reason=reason, status=status)
        case AccountProblem(status=status, reason=reason):
            return Retry(
                policy.account_pause, reason, give_back=True, outcome_unknown=False, status=status
            )
        case RateLimited(retry_after=wait, reason=reason):
            return Retry(wait, reason, give_back=True, outcome_unknown=False, status=429)
        case Transient(reason=reason, maybe_sent=maybe_sent, status=status):
            if attempts >= max_attempts and not maybe_sent:
                return Fail(reason=f"gave up after {attempts} attempts: {reason}", status=status)
            # After the last attempt a maybe-sent row still comes back once, for a look-up
            # only (delivery never sends past max_attempts): found means completed.
            delay = backoff_seconds(attempts, policy.backoff_unit, policy.backoff_jitter, rng)
            return Retry(delay, reason, give_back=False, outcome_unknown=maybe_sent, status=status)
    raise AssertionError(f"unhandled outcome {outcome!r}")  # pragma: no cover
