"""The Freshdesk client and the simulator agree over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from fdqueue.freshdesk import FreshdeskClient, marker_for
from fdqueue.models import FreshdeskReply, RateLimited, Rejected, TransportFailure
from fdqueue.policy import classify
from fdqueue.simulator import RunningSimulator, SimulatorConfig, start_simulator
from tests.harness import API_KEY, TICKET, sim_faults


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(config=SimulatorConfig(create_limit=5, window_seconds=30))
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[FreshdeskClient]:
    async with FreshdeskClient(sim.url, API_KEY, timeout=2, connect_timeout=2) as fd:
        yield fd


async def test_valid_ticket_is_created_with_numbers_and_marker(
    client: FreshdeskClient, sim: RunningSimulator
) -> None:
    """A valid submission becomes ticket 1 carrying the marker tag and numeric codes."""
    marker = marker_for(uuid.uuid4())
    reply = await client.create_ticket(TICKET, marker)
    assert isinstance(reply, FreshdeskReply)
    assert (reply.status, reply.ticket_id) == (201, 1)
    assert reply.ratelimit_total == 5
    assert reply.ratelimit_remaining == 4
    stored = sim.state.tickets[0]
    assert marker in stored["tags"]
    assert (stored["priority"], stored["status"], stored["source"]) == (2, 2, 2)


async def test_validation_failure_comes_back_as_field_errors(client: FreshdeskClient) -> None:
    """Freshdesk's 400 errors reach the caller field by field, and classify as rejected."""
    reply = await client.create_ticket({**TICKET, "type": "Not a type"}, marker_for(uuid.uuid4()))
    assert isinstance(reply, FreshdeskReply)
    assert reply.status == 400
    assert [(e.field, e.code) for e in reply.errors] == [("type", "invalid_value")]
    assert isinstance(classify(reply, default_retry_after=60), Rejected)


async def test_rate_limit_gives_429_with_retry_after(client: FreshdeskClient) -> None:
    """The sixth create in a window of five gets a 429 whose Retry-After the client reads."""
    for _ in range(5):
        ok = await client.create_ticket(TICKET, marker_for(uuid.uuid4()))
        assert isinstance(ok, FreshdeskReply)
        assert ok.status == 201
    limited = await client.create_ticket(TICKET, marker_for(uuid.uuid4()))
    assert isinstance(limited, FreshdeskReply)
    assert limited.status == 429
    assert limited.retry_after is not None
    assert 1 <= limited.retry_after <= 30
    outcome = classify(limited, default_retry_after=60)
    assert isinstance(outcome, RateLimited)
    assert outcome.retry_after == limited.retry_after


async def test_create_then_fail_then_marker_lookup_finds_it(
    client: FreshdeskClient, sim: RunningSimulator
) -> None:
    """The answer to a create is lost, yet the marker look-up finds the one ticket."""
    await sim_faults(sim, {"script": [{"fault": "create_then_fail", "then": "reset"}]})
    marker = marker_for(uuid.uuid4())
    before = datetime.now(UTC) - timedelta(seconds=1)
    lost = await client.create_ticket(TICKET, marker)
    assert isinstance(lost, TransportFailure)
    assert lost.kind == "unknown"
    other = await client.find_ticket_by_marker(
        TICKET, marker_for(uuid.uuid4()), created_after=before
    )
    assert other.not_found
    found = await client.find_ticket_by_marker(TICKET, marker, created_after=before)
    assert found.ticket_id == 1
    assert len(sim.state.tickets) == 1
