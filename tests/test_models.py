"""TicketIn: what intake accepts and how it normalises (case B17 a)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fdqueue.models import TicketIn

BASE: dict[str, Any] = {"email": "ada@example.com", "subject": "s", "description": "d"}


@pytest.mark.parametrize(
    ("given", "field", "expected"),
    [
        ({"priority": "3"}, "priority", 3),
        ({"priority": "high"}, "priority", 3),
        ({"priority": "Urgent"}, "priority", 4),
        ({"status": "resolved"}, "status", 4),
        ({"status": "2"}, "status", 2),
        ({"source": "chat"}, "source", 7),
        ({"requester_id": "12"}, "requester_id", 12),
    ],
)
def test_b17a_codes_are_normalised_to_numbers(
    given: dict[str, Any], field: str, expected: int
) -> None:
    """B17 (a): names and numeric strings become Freshdesk's integer codes before storing."""
    ticket = TicketIn.model_validate({**BASE, **given})
    assert ticket.ticket_data()[field] == expected


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"status": 9}, "status"),
        ({"priority": "extreme"}, "priority"),
        ({"requester_id": True}, "requester_id"),
        ({"group_id": False}, "group_id"),
        ({"tags": ["x" * 33]}, "tags.0"),
        ({"email": "josé@example.com"}, "email"),
        ({"email": "a*b@example.com"}, "email"),
    ],
)
def test_b17a_values_freshdesk_would_refuse_are_rejected(given: dict[str, Any], field: str) -> None:
    """B17 (a): a submission certain to fail in Freshdesk is refused at intake, field named."""
    with pytest.raises(ValidationError) as info:
        TicketIn.model_validate({**BASE, **given})
    assert field in {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}


def test_b17a_requester_is_required() -> None:
    """B17 (a): without any requester identifier the submission is refused."""
    with pytest.raises(ValidationError, match="a requester is required"):
        TicketIn.model_validate({"subject": "s", "description": "d"})


def test_operator_columns_are_not_sent_to_freshdesk() -> None:
    """chatbot_id and user_id go to their columns, not into the Freshdesk payload."""
    ticket = TicketIn.model_validate({**BASE, "chatbot_id": "bot", "user_id": "u1"})
    assert "chatbot_id" not in ticket.ticket_data()
    assert (ticket.chatbot_id, ticket.user_id) == ("bot", "u1")
