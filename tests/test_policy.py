"""The pure outcome table of DESIGN §6 and the backoff formula."""

from __future__ import annotations

import random

import pytest

from fdqueue.models import (
    AccountProblem,
    Delivered,
    FreshdeskError,
    FreshdeskReply,
    Outcome,
    RateLimited,
    Rejected,
    Transient,
    TransportFailure,
)
from fdqueue.policy import Complete, Fail, Retry, RetryPolicy, backoff_seconds, classify, decide

RULES = RetryPolicy(backoff_unit=60, backoff_jitter=0, account_pause=300)
ERR = (FreshdeskError("invalid_value", "It should be one of these values: '1,2,3,4'", "priority"),)


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (FreshdeskReply(201, ticket_id=7), Delivered(7, 201)),
        (FreshdeskReply(200, ticket_id=7), Delivered(7, 200)),
        (FreshdeskReply(400, errors=ERR), Rejected),
        (FreshdeskReply(409), Rejected),
        (FreshdeskReply(415), Rejected),
        (FreshdeskReply(422), Rejected),
        (FreshdeskReply(401), AccountProblem),
        (FreshdeskReply(403), AccountProblem),
        (FreshdeskReply(404), AccountProblem),
        (FreshdeskReply(429, retry_after=20), RateLimited(20, "HTTP 429")),
        (FreshdeskReply(429), RateLimited(45, "HTTP 429")),
        (FreshdeskReply(500), Transient),
        (FreshdeskReply(502, body_snippet="<html>bad gateway</html>"), Transient),
        (FreshdeskReply(503), Transient),
        (
            FreshdeskReply(201),
            Transient,
        ),  # created without a readable id: look up, never resend blind
        (
            TransportFailure("never_sent", "refused"),
            Transient("never_sent: refused", maybe_sent=False),
        ),
        (TransportFailure("unknown", "timeout"), Transient("unknown: timeout", maybe_sent=True)),
    ],
)
def test_classify_outcome_table(
    result: FreshdeskReply | TransportFailure, expected: object
) -> None:
    """Each Freshdesk reply maps to the outcome DESIGN §6 assigns it."""
    outcome = classify(result, default_retry_after=45)
    if isinstance(expected, type):
        assert isinstance(outcome, expected)
    else:
        assert outcome == expected


def test_rejected_reason_names_freshdesk_field_errors() -> None:
    """B17 (b): a 400's field and code are kept in the reason."""
    outcome = classify(FreshdeskReply(400, errors=ERR), default_retry_after=60)
    assert isinstance(outcome, Rejected)
    assert "priority" in outcome.reason
    assert "invalid_value" in outcome.reason


def test_5xx_may_have_created_the_ticket() -> None:
    """A 5xx leaves the outcome unknown, so the next try looks the ticket up first."""
    outcome = classify(FreshdeskReply(500), default_retry_after=60)
    assert isinstance(outcome, Transient)
    assert outcome.maybe_sent


@pytest.mark.parametrize(("attempts", "minutes"), [(0, 1), (1, 2), (2, 4), (3, 8)])
def test_backoff_is_two_to_the_attempts_units(attempts: int, minutes: int) -> None:
    """2^attempts minutes with the default unit of 60 s (B11)."""
    assert backoff_seconds(attempts, 60) == minutes * 60


def test_backoff_jitter_only_adds() -> None:
    """Jitter never makes a retry earlier than the formula, and stays within its fraction."""
    rng = random.Random(1)
    delays = [backoff_seconds(2, 60, 0.1, rng) for _ in range(200)]
    assert min(delays) >= 240
    assert max(delays) <= 264


OUTCOME_DECISIONS: list[tuple[Outcome, int, type]] = [
    (Delivered(5, 201), 1, Complete),
    (Rejected(400, "bad"), 1, Fail),
    (AccountProblem(401, "key"), 1, Retry),
    (RateLimited(20, "slow down"), 3, Retry),
    (Transient("503", maybe_sent=False, status=503), 1, Retry),
    (Transient("503", maybe_sent=False, status=503), 3, Fail),
    (Transient("timeout", maybe_sent=True), 3, Retry),
]


@pytest.mark.parametrize(("outcome", "attempts", "kind"), OUTCOME_DECISIONS)
def test_decide_table(outcome: Outcome, attempts: int, kind: type) -> None:
    """decide turns each outcome into complete, fail or retry per DESIGN §6."""
    assert isinstance(decide(outcome, attempts, 3, RULES), kind)


def test_rate_limit_and_account_problems_give_the_attempt_back() -> None:
    """B16: a 429 waits Retry-After and uses no attempt; 401/403/404 pause without one."""
    limited = decide(RateLimited(20, "x"), 1, 3, RULES)
    account = decide(AccountProblem(401, "x"), 1, 3, RULES)
    assert isinstance(limited, Retry)
    assert limited.give_back
    assert limited.delay == 20
    assert isinstance(account, Retry)
    assert account.give_back
    assert account.delay == 300


def test_transient_retry_waits_backoff_and_keeps_attempt() -> None:
    """A transient failure waits 2^attempts units and the attempt counts."""
    retry = decide(Transient("x", maybe_sent=True, status=500), 2, 3, RULES)
    assert isinstance(retry, Retry)
    assert (retry.delay, retry.give_back, retry.outcome_unknown) == (240, False, True)
