"""The Freshdesk client: payloads, replies, transport failures, look-up; cases B14, B16-B18."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import CallbackResult, aioresponses
from yarl import URL

from fdqueue import __version__
from fdqueue.freshdesk import (
    LOOKUP_MAX_PAGES,
    MARKER_PREFIX,
    FreshdeskClient,
    Lookup,
    build_payload,
    marker_for,
)
from fdqueue.models import (
    AccountProblem,
    Delivered,
    FreshdeskError,
    FreshdeskReply,
    Outcome,
    RateLimited,
    Rejected,
    SendResult,
    TicketIn,
    Transient,
    TransportFailure,
)
from fdqueue.policy import classify

BASE = "http://127.0.0.1:8089"
TICKETS = f"{BASE}/api/v2/tickets"
API_KEY = "sEcReT-kEy-0123456789"
DEFAULT_WAIT = 60.0
MARKER = marker_for(uuid.UUID("12345678-1234-5678-1234-567812345678"))
TICKET: dict[str, Any] = {
    "email": "ada@example.com",
    "subject": "Printer on fire",
    "description": "It is on fire.",
    "status": 2,
    "priority": 3,
    "source": 2,
}
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>" + "x" * 2000 + "</body></html>"


def outcome(result: SendResult) -> Outcome:
    return classify(result, default_retry_after=DEFAULT_WAIT)


class _MockedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` (aioresponses #289)."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class Mocked(aioresponses):
    """aioresponses whose canned responses build on aiohttp 3.14."""

    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _MockedResponse)
        super().add(url, method, *args, **kwargs)


def answer(status: int = 200, body: str = "", **kwargs: Any) -> CallbackResult:
    """A callback's canned response, built on aiohttp 3.14 (see _MockedResponse)."""
    return CallbackResult(status=status, body=body, response_class=_MockedResponse, **kwargs)


@pytest.fixture
def mocked() -> Iterator[Mocked]:
    mock = Mocked()
    with mock:
        yield mock


@pytest.fixture
async def client() -> AsyncIterator[FreshdeskClient]:
    async with FreshdeskClient(BASE + "/", API_KEY, timeout=5.0, connect_timeout=1.0) as fd:
        yield fd


def sent_requests(mocked: Mocked, method: str = "POST") -> list[Any]:
    return [
        call for (verb, _), calls in mocked.requests.items() if verb == method for call in calls
    ]


def sent_json(mocked: Mocked) -> dict[str, Any]:
    (call,) = sent_requests(mocked)
    body: dict[str, Any] = json.loads(call.kwargs["data"])
    return body


# --- marker and payload ------------------------------------------------------------------


def test_marker_fits_freshdesks_32_character_tag_limit() -> None:
    """A marker is prefixed, lowercase, at most 32 characters, and stable and distinct per UUID."""
    first, second = uuid.uuid4(), uuid.uuid4()
    marker = marker_for(first)
    assert marker.startswith(MARKER_PREFIX)
    assert len(marker) <= 32
    assert marker == marker.lower() == marker_for(first)
    assert marker != marker_for(second)


def test_b17_stored_string_codes_are_sent_as_numbers() -> None:
    """B17: codes stored as strings ("2", "high") by older rows go out as JSON numbers."""
    stored = {**TICKET, "status": "2", "priority": "high", "source": "3"}
    payload = build_payload(stored, MARKER)
    assert (payload["status"], payload["priority"], payload["source"]) == (2, 3, 3)
    assert all(type(payload[key]) is int for key in ("status", "priority", "source"))


def test_payload_fills_in_required_codes_when_absent() -> None:
    """Status 2, priority 1 and source 2 are always sent: Freshdesk rejects creates without them."""
    payload = build_payload({"email": "a@example.com", "subject": "s", "description": "d"}, MARKER)
    assert (payload["status"], payload["priority"], payload["source"]) == (2, 1, 2)
    assert (payload["subject"], payload["description"]) == ("s", "d")


def test_payload_sends_unreadable_codes_unchanged() -> None:
    """A code that cannot be read is sent as it is, so Freshdesk's 400 names the problem."""
    payload = build_payload({**TICKET, "priority": "whenever"}, MARKER)
    assert payload["priority"] == "whenever"


def test_payload_adds_marker_and_default_tags_once() -> None:
    """User tags are kept, default tags and the marker are added, and no tag appears twice."""
    stored = {**TICKET, "tags": ["vip", "web", MARKER]}
    payload = build_payload(stored, MARKER, default_tags=("web", "fdqueue"))
    assert payload["tags"] == ["vip", "web", MARKER, "fdqueue"]


def test_payload_writes_marker_field_and_drops_null_custom_fields() -> None:
    """The marker field joins the user's custom fields, and null custom fields are left out."""
    stored = {**TICKET, "custom_fields": {"cf_order": "A-1", "cf_empty": None}}
    payload = build_payload(stored, MARKER, marker_field="cf_submission_id")
    assert payload["custom_fields"] == {"cf_order": "A-1", "cf_submission_id": MARKER}


def test_payload_without_marker_field_has_no_custom_fields_key() -> None:
    """Without custom fields or a marker field the payload has no `custom_fields` at all."""
    assert "custom_fields" not in build_payload(TICKET, MARKER)


def test_payload_never_carries_chatbot_or_user_id() -> None:
    """chatbot_id and user_id stay in the queue's own columns and never reach Freshdesk."""
    payload = build_payload(
        {**TICKET, "chatbot_id": "bot-1", "user_id": "u-9", "type": None}, MARKER
    )
    assert not {"chatbot_id", "user_id", "type"} & payload.keys()


def test_payload_from_intake_model_is_freshdesk_shaped() -> None:
    """A TicketIn's stored data becomes a payload with numeric codes and the marker."""
    ticket = TicketIn.model_validate(
        {**TICKET, "priority": "urgent", "chatbot_id": "bot", "custom_fields": {"cf_x": 1}}
    )
    payload = build_payload(ticket.ticket_data(), MARKER, marker_field="cf_submission_id")
    assert payload["priority"] == 4
    assert payload["custom_fields"] == {"cf_x": 1, "cf_submission_id": MARKER}
    assert MARKER in payload["tags"]
    assert "chatbot_id" not in payload


# --- what goes on the wire ---------------------------------------------------------------


async def test_create_sends_json_with_auth_and_headers(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """The POST goes to /api/v2/tickets (trailing slash stripped) as JSON with Basic key:X auth."""
    mocked.post(TICKETS, status=201, payload={"id": 5})
    await client.create_ticket({**TICKET, "priority": "3"}, MARKER, default_tags=("web",))
    (call,) = sent_requests(mocked)
    headers = call.kwargs["headers"]
    assert headers["Authorization"] == "Basic " + base64.b64encode(f"{API_KEY}:X".encode()).decode()
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"] == f"fdqueue/{__version__}"
    assert call.kwargs["allow_redirects"] is False
    body = sent_json(mocked)
    assert body["priority"] == 3
    assert body["tags"] == ["web", MARKER]


async def test_key_never_appears_in_results_or_repr(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """Neither the reply, a transport failure nor the client's repr shows the API key."""
    mocked.post(TICKETS, status=401, payload={"code": "invalid_credentials", "message": "no"})
    mocked.post(TICKETS, exception=aiohttp.ServerDisconnectedError())
    results = [await client.create_ticket(TICKET, MARKER) for _ in range(2)]
    for text in (*map(repr, results), repr(client)):
        assert API_KEY not in text


# --- DESIGN §6: every reply through policy.classify ----------------------------------------


@dataclass(frozen=True)
class Row:
    status: int
    body: str = ""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


VALIDATION = json.dumps(
    {
        "description": "Validation failed",
        "errors": [
            {
                "field": "priority",
                "message": "It should be one of these values: '1,2,3,4'",
                "code": "invalid_value",
            },
            {"field": "email", "message": "It is invalid", "code": "invalid_value"},
        ],
    }
)
FLAT_401 = (
    '{"code":"invalid_credentials","message":"You have to be logged in to perform this action."}'
)
FLAT_403 = '{"code":"access_denied","message":"You are not authorized to perform this action."}'
INTERNAL = '{"code":"internal_error","message":"We\'re sorry, but something went wrong."}'


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (Row(201, '{"id": 42, "subject": "s"}'), Delivered(ticket_id=42, status=201)),
        (Row(400, VALIDATION), Rejected),
        (
            Row(400, '{"code":"invalid_json","message":"Request body has invalid json format"}'),
            Rejected,
        ),
        (Row(401, FLAT_401), AccountProblem),
        (Row(403, FLAT_403), AccountProblem),
        (Row(404, "", ""), AccountProblem),
        (Row(405, '{"message":"POST method is not allowed."}'), Rejected),
        (Row(409, '{"code":"inconsistent_state","message":"busy"}'), Rejected),
        (Row(415, '{"code":"invalid_content_type","message":"no"}'), Rejected),
        (Row(422, '{"code":"invalid_value","message":"no"}'), Rejected),
        (Row(429, "", headers=(("Retry-After", "20"),)), RateLimited(20.0, "HTTP 429")),
        (Row(429, '{"message":"slow down"}'), RateLimited),
        (Row(500, INTERNAL), Transient),
        (Row(502, HTML_502, "text/html"), Transient),
        (Row(503, "<html><body>Maintenance</body></html>", "text/html"), Transient),
        (Row(504, "", ""), Transient),
    ],
    ids=lambda value: str(value.status) if isinstance(value, Row) else "",
)
async def test_every_reply_classifies_per_design_table(
    client: FreshdeskClient, mocked: Mocked, row: Row, expected: Outcome | type
) -> None:
    """Each Freshdesk status becomes a FreshdeskReply whose outcome matches DESIGN §6's table."""
    mocked.post(
        TICKETS,
        status=row.status,
        body=row.body,
        content_type=row.content_type,
        headers=dict(row.headers),
    )
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert result.status == row.status
    got = outcome(result)
    if isinstance(expected, type):
        assert isinstance(got, expected)
    else:
        assert got == expected
    if isinstance(got, Transient):
        assert got.maybe_sent  # a 5xx may have created the ticket: look it up before resending


async def test_b17_validation_errors_are_read_field_by_field(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """B17(b): a 400 "Validation failed" yields each error with field and code; the row fails."""
    mocked.post(TICKETS, status=400, body=VALIDATION)
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert result.errors == (
        FreshdeskError("invalid_value", "It should be one of these values: '1,2,3,4'", "priority"),
        FreshdeskError("invalid_value", "It is invalid", "email"),
    )
    got = outcome(result)
    assert isinstance(got, Rejected)
    assert "priority: invalid_value" in got.reason
    assert "email: invalid_value" in got.reason


async def test_flat_error_shape_is_read(client: FreshdeskClient, mocked: Mocked) -> None:
    """The flat `{"code","message"}` body of a 401 becomes one error without a field."""
    mocked.post(TICKETS, status=401, body=FLAT_401)
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert result.errors == (
        FreshdeskError("invalid_credentials", "You have to be logged in to perform this action."),
    )


@pytest.mark.parametrize(
    ("headers", "expected_wait"),
    [
        ({"Retry-After": "34"}, 34.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({}, DEFAULT_WAIT),
        ({"Retry-After": "soon"}, DEFAULT_WAIT),
        ({"Retry-After": "-3"}, DEFAULT_WAIT),
        (
            {
                "Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT",
                "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
            },
            30.0,
        ),
    ],
    ids=["seconds", "fraction", "missing", "non-numeric", "negative", "http-date"],
)
async def test_b16_retry_after_forms(
    client: FreshdeskClient, mocked: Mocked, headers: dict[str, str], expected_wait: float
) -> None:
    """B16: Retry-After in seconds or as an HTTP date is honoured; else the default applies."""
    mocked.post(TICKETS, status=429, body="", headers=headers)
    result = await client.create_ticket(TICKET, MARKER)
    got = outcome(result)
    assert isinstance(got, RateLimited)
    assert got.retry_after == pytest.approx(expected_wait)


async def test_rate_limit_headers_are_read_case_insensitively(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """X-Ratelimit-Total/Remaining and X-Request-Id are read whatever their casing."""
    headers = {"x-ratelimit-total": "80", "X-RATELIMIT-REMAINING": "7", "x-request-id": "req-1"}
    mocked.post(TICKETS, status=201, payload={"id": 9}, headers=headers)
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert (result.ratelimit_total, result.ratelimit_remaining) == (80, 7)
    assert result.request_id == "req-1"
    assert result.retry_after is None


# --- B18: odd bodies ---------------------------------------------------------------------


async def test_b18_html_502_is_transient_with_a_short_snippet(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """B18: a 502 HTML page is read without raising, kept as a <= 300 char snippet, and retried."""
    mocked.post(TICKETS, status=502, body=HTML_502, content_type="text/html")
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert result.errors == ()
    assert result.body_snippet.startswith("<html><head><title>502 Bad Gateway")
    assert len(result.body_snippet) <= 300
    assert isinstance(outcome(result), Transient)


async def test_b18_201_with_text_plain_json_still_yields_the_id(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """B18: a 201 whose JSON body is labelled text/plain is still read for its id."""
    mocked.post(TICKETS, status=201, body='{"id": 77}', content_type="text/plain")
    result = await client.create_ticket(TICKET, MARKER)
    assert outcome(result) == Delivered(ticket_id=77, status=201)


async def test_b18_201_with_empty_body_is_never_a_failure(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """B18: a 201 with no body and no Location is left for the look-up, never failed."""
    mocked.post(TICKETS, status=201, body="", content_type="")
    result = await client.create_ticket(TICKET, MARKER)
    assert result == FreshdeskReply(status=201)
    got = outcome(result)
    assert isinstance(got, Transient)
    assert got.maybe_sent


@pytest.mark.parametrize(
    "body", ["", "<html>Created</html>", '{"id": "not a number"}'], ids=["empty", "html", "bad-id"]
)
async def test_b18_201_id_falls_back_to_location(
    client: FreshdeskClient, mocked: Mocked, body: str
) -> None:
    """B18: when the body gives no id, the Location header's /tickets/<id> does."""
    location = "https://acme.freshdesk.com/api/v2/tickets/314"
    mocked.post(
        TICKETS, status=201, body=body, content_type="text/html", headers={"Location": location}
    )
    result = await client.create_ticket(TICKET, MARKER)
    assert outcome(result) == Delivered(ticket_id=314, status=201)


async def test_created_ticket_echo_is_not_kept_as_snippet(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """A 201's JSON body is the submission echoed back, so none of it is kept for logs."""
    mocked.post(TICKETS, status=201, payload={"id": 3, "description": "my secret problem"})
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert result.body_snippet == ""


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'{"errors": ["x", 3, null]}',
        b'{"errors": {"a": 1}}',
        b"null",
    ],
)
async def test_odd_error_bodies_never_raise(
    client: FreshdeskClient, mocked: Mocked, body: bytes
) -> None:
    """Bodies of any shape (binary, arrays, malformed error lists) are read without raising."""
    mocked.post(TICKETS, status=500, body=body, content_type="application/json")
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert result.status == 500


async def test_values_that_only_look_numeric_never_raise(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """Ids and header values such as "²" (a digit to str.isdigit, not to int) are ignored."""
    headers = {"X-RateLimit-Total": "²", "Retry-After": "²", "Location": "/api/v2/tickets/²"}
    mocked.post(TICKETS, status=201, body='{"id": "²"}', headers=headers)
    result = await client.create_ticket(TICKET, MARKER)
    assert result == FreshdeskReply(status=201)


# --- transport failures ------------------------------------------------------------------


def _refused() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 8089, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


def _dns_failure() -> aiohttp.ClientConnectorDNSError:
    key = aiohttp.client_reqrep.ConnectionKey("nowhere.invalid", 443, True, True, None, None, None)
    return aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (_refused(), "never_sent"),
        (_dns_failure(), "never_sent"),
        (aiohttp.ConnectionTimeoutError("Connection timeout to host"), "never_sent"),
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), "unknown"),
        (TimeoutError(), "unknown"),
        (aiohttp.ServerDisconnectedError(), "unknown"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), "unknown"),
        (aiohttp.ClientPayloadError("Response payload is not completed"), "unknown"),
        (ConnectionResetError(104, "Connection reset by peer"), "unknown"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
async def test_transport_failures_are_typed(
    client: FreshdeskClient, mocked: Mocked, error: BaseException, kind: str
) -> None:
    """Connect-phase errors are `never_sent`; once the request may have left, it is `unknown`."""
    mocked.post(TICKETS, exception=error)
    result = await client.create_ticket(TICKET, MARKER)
    assert isinstance(result, TransportFailure)
    assert result.kind == kind
    got = outcome(result)
    assert isinstance(got, Transient)
    assert got.maybe_sent is (kind == "unknown")


# --- look-up -----------------------------------------------------------------------------

SUBMITTED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LIST_PATTERN = re.compile(r"^http://127\.0\.0\.1:8089/api/v2/tickets\?")


def listed(
    ticket_id: int, *, tags: list[str] | None = None, created: datetime = SUBMITTED, **extra: Any
) -> dict[str, Any]:
    return {
        "id": ticket_id,
        "tags": tags or [],
        "custom_fields": {"cf_submission_id": None},
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }


def full_page(start: int) -> list[dict[str, Any]]:
    return [listed(ticket_id) for ticket_id in range(start, start + 100)]


Pages = dict[int, CallbackResult]


def serve_pages(mocked: Mocked, pages: Pages) -> list[dict[str, str]]:
    """Answer list calls by their `page` parameter; returns the query of each call, in order."""
    seen: list[dict[str, str]] = []

    def reply(url: URL, **_: Any) -> CallbackResult:
        seen.append(dict(url.query))
        return pages.get(int(url.query["page"]), answer(200, "[]"))

    mocked.get(LIST_PATTERN, callback=reply, repeat=True)
    return seen


def page(tickets: list[dict[str, Any]]) -> CallbackResult:
    return answer(200, json.dumps(tickets))


async def find(
    client: FreshdeskClient, ticket: dict[str, Any] | None = None, **kwargs: Any
) -> Lookup:
    return await client.find_ticket_by_marker(
        ticket or TICKET, MARKER, created_after=SUBMITTED, **kwargs
    )


async def test_lookup_finds_marker_on_page_two(client: FreshdeskClient, mocked: Mocked) -> None:
    """The look-up follows pages and finds the ticket whose tags hold the marker."""
    seen = serve_pages(mocked, {1: page(full_page(1)), 2: page([listed(500, tags=["x", MARKER])])})
    found = await find(client)
    assert found == Lookup(ticket_id=500, pages=2)
    assert found.found
    assert not found.not_found
    assert not found.failed
    assert seen[0] == {
        "email": "ada@example.com",
        "updated_since": "2026-03-01T11:55:00Z",
        "order_by": "created_at",
        "order_type": "desc",
        "per_page": "100",
        "page": "1",
    }
    assert seen[1]["page"] == "2"


async def test_lookup_matches_marker_field(client: FreshdeskClient, mocked: Mocked) -> None:
    """With a marker field configured, a ticket whose custom field holds the marker is found."""
    ticket = listed(8, custom_fields={"cf_submission_id": MARKER})
    serve_pages(mocked, {1: page([listed(7), ticket])})
    assert await find(client, marker_field="cf_submission_id") == Lookup(ticket_id=8, pages=1)


async def test_lookup_not_found_after_a_short_page(client: FreshdeskClient, mocked: Mocked) -> None:
    """A page shorter than per_page without the marker ends the look-up: not found."""
    seen = serve_pages(mocked, {1: page([listed(1), listed(2, tags=["fdq-someoneelse"])])})
    result = await find(client)
    assert result.not_found
    assert not result.failed
    assert len(seen) == 1


async def test_lookup_stops_at_tickets_older_than_the_window(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """Newest-first order lets the look-up stop at the first ticket created before the window."""
    tickets = full_page(1)
    tickets[-1] = listed(100, created=SUBMITTED - timedelta(hours=1))
    seen = serve_pages(mocked, {1: page(tickets)})
    assert (await find(client)).not_found
    assert len(seen) == 1


async def test_lookup_no_such_contact_means_not_found(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """Freshdesk's 400 "no contact matching the given email" proves no ticket was created."""
    body = {
        "description": "Validation failed",
        "errors": [
            {
                "field": "email",
                "message": "There is no contact matching the given email",
                "code": "invalid_value",
            }
        ],
    }
    serve_pages(mocked, {1: answer(400, body=json.dumps(body))})
    assert (await find(client)).not_found


BAD_DATE = json.dumps(
    {
        "description": "Validation failed",
        "errors": [
            {"field": "updated_since", "message": "It should be a date", "code": "invalid_value"}
        ],
    }
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (answer(500, INTERNAL), Transient),
        (answer(429, body="", headers={"Retry-After": "9"}), RateLimited),
        (answer(401, body=FLAT_401), AccountProblem),
        (answer(400, body=BAD_DATE), Rejected),
    ],
    ids=["500", "429", "401", "400-other-field"],
)
async def test_lookup_error_is_a_failure_to_classify(
    client: FreshdeskClient, mocked: Mocked, reply: CallbackResult, expected: type
) -> None:
    """An error reply stops the look-up as failed and carries the reply for policy.classify."""
    serve_pages(mocked, {1: page(full_page(1)), 2: reply})
    result = await find(client)
    assert result.failed
    assert not result.found
    assert not result.not_found
    assert isinstance(result.failure, FreshdeskReply)
    assert result.pages == 2
    assert isinstance(outcome(result.failure), expected)


async def test_lookup_transport_failure_is_a_failure(
    client: FreshdeskClient, mocked: Mocked
) -> None:
    """A connection lost during the look-up ends it as failed with the TransportFailure."""
    mocked.get(LIST_PATTERN, exception=aiohttp.ServerDisconnectedError())
    result = await find(client)
    assert result.failed
    assert isinstance(result.failure, TransportFailure)
    assert result.failure.kind == "unknown"


async def test_lookup_unreadable_page_is_a_failure(client: FreshdeskClient, mocked: Mocked) -> None:
    """A 200 whose body is not a ticket list cannot prove absence, so the look-up fails."""
    serve_pages(mocked, {1: answer(200, body="<html>login</html>", content_type="text/html")})
    result = await find(client)
    assert result.failed
    assert isinstance(result.failure, FreshdeskReply)


async def test_lookup_page_bound_is_a_failure(client: FreshdeskClient, mocked: Mocked) -> None:
    """When every page up to the bound is full of newer tickets, the look-up reports it failed."""
    seen = serve_pages(
        mocked, {n: page(full_page(n * 1000)) for n in range(1, LOOKUP_MAX_PAGES + 2)}
    )
    result = await find(client)
    assert result == Lookup(truncated=True, pages=LOOKUP_MAX_PAGES)
    assert result.failed
    assert result.failure is None
    assert len(seen) == LOOKUP_MAX_PAGES


@pytest.mark.parametrize(
    ("requester", "expected"),
    [
        ({"requester_id": 80001, "email": "ada@example.com"}, {"requester_id": "80001"}),
        ({"unique_external_id": "cust-9"}, {"unique_external_id": "cust-9"}),
        ({"phone": "+44 20 7946 0000", "name": "Ada"}, {}),
    ],
    ids=["requester_id-first", "external-id", "phone-only"],
)
async def test_lookup_filters_by_requester(
    client: FreshdeskClient, mocked: Mocked, requester: dict[str, Any], expected: dict[str, str]
) -> None:
    """The list is narrowed by requester_id, email or unique_external_id; otherwise by time only."""
    seen = serve_pages(mocked, {})
    ticket = {"subject": "s", "description": "d", **requester}
    assert (await find(client, ticket)).not_found
    filters = {
        key: seen[0][key]
        for key in ("requester_id", "email", "unique_external_id")
        if key in seen[0]
    }
    assert filters == expected


async def test_lookup_refuses_naive_time(client: FreshdeskClient) -> None:
    """A naive `created_after` is a programming error and raises ValueError."""
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.find_ticket_by_marker(TICKET, MARKER, created_after=datetime(2026, 1, 1))  # noqa: DTZ001


async def test_view_ticket_reads_the_id(client: FreshdeskClient, mocked: Mocked) -> None:
    """view_ticket returns a reply carrying the ticket's id, or a 404 for an unknown one."""
    mocked.get(f"{TICKETS}/12", status=200, payload={"id": 12})
    mocked.get(f"{TICKETS}/13", status=404, body="", content_type="")
    assert await client.view_ticket(12) == FreshdeskReply(status=200, ticket_id=12)
    assert await client.view_ticket(13) == FreshdeskReply(status=404)


# --- against a real local server ---------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start tiny aiohttp servers on 127.0.0.1; each call returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/api/v2/tickets", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


class Gauge:
    """Counts requests in flight at the server and remembers the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def handler(self, latency: float) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(latency)
            finally:
                self.now -= 1
            return web.json_response({"id": 1}, status=201)

        return handle


async def test_b14_queueing_for_a_connection_does_not_consume_the_timeout(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """B14: 10 concurrent creates through 2 slots, each 0.2 s, all succeed under a 0.5 s timeout."""
    gauge = Gauge()
    base = await serve(gauge.handler(0.2))
    async with FreshdeskClient(
        base, API_KEY, timeout=0.5, connect_timeout=0.1, max_in_flight=2
    ) as fd:
        results = await asyncio.gather(*(fd.create_ticket(TICKET, MARKER) for _ in range(10)))
    assert all(isinstance(outcome(result), Delivered) for result in results), results
    assert gauge.peak <= 2


async def test_b14_in_flight_cap_follows_a_shared_sessions_smaller_connector(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """B14: a shared session limited to 2 connections caps a larger max_in_flight to 2."""
    gauge = Gauge()
    base = await serve(gauge.handler(0.2))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
        fd = FreshdeskClient(
            base, API_KEY, timeout=0.5, connect_timeout=0.1, max_in_flight=10, session=session
        )
        results = await asyncio.gather(*(fd.create_ticket(TICKET, MARKER) for _ in range(10)))
        await fd.close()
        assert not session.closed  # a session passed in belongs to the caller
    assert all(isinstance(outcome(result), Delivered) for result in results), results
    assert gauge.peak <= 2


async def test_slow_answer_is_an_unknown_outcome(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """A server slower than the read timeout gives `unknown`: the ticket may exist."""
    base = await serve(Gauge().handler(1.0))
    async with FreshdeskClient(base, API_KEY, timeout=0.1, connect_timeout=0.1) as fd:
        result = await fd.create_ticket(TICKET, MARKER)
    assert isinstance(result, TransportFailure)
    assert result.kind == "unknown"


async def test_connection_refused_is_never_sent() -> None:
    """A port nobody listens on gives `never_sent`: Freshdesk cannot hold the ticket."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with FreshdeskClient(f"http://127.0.0.1:{port}", API_KEY, connect_timeout=1.0) as fd:
        result = await fd.create_ticket(TICKET, MARKER)
    assert isinstance(result, TransportFailure)
    assert result.kind == "never_sent"


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """A TCP server that reads one request, writes `answer` verbatim, and hangs up."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_disconnect_before_answer_is_unknown(
    raw_server: Callable[[bytes], Awaitable[str]],
) -> None:
    """The server hanging up after reading the request gives `unknown`."""
    base = await raw_server(b"")
    async with FreshdeskClient(base, API_KEY, timeout=2.0) as fd:
        result = await fd.create_ticket(TICKET, MARKER)
    assert isinstance(result, TransportFailure)
    assert result.kind == "unknown"


async def test_201_with_body_cut_short_is_still_a_201(
    raw_server: Callable[[bytes], Awaitable[str]],
) -> None:
    """B18: a 201 whose body is cut off keeps its status and takes the id from Location."""
    answer = (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
        b"Location: /api/v2/tickets/21\r\n\r\n" + b'{"id": 21, "subj'
    )
    base = await raw_server(answer)
    async with FreshdeskClient(base, API_KEY, timeout=2.0) as fd:
        result = await fd.create_ticket(TICKET, MARKER)
    assert isinstance(result, FreshdeskReply)
    assert result.body_snippet.startswith("[body unreadable:")
    assert outcome(result) == Delivered(ticket_id=21, status=201)
