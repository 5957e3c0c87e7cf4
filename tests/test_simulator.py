"""Tests of the Freshdesk simulator: it must answer like Freshdesk v2 and fail on command."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from fdqueue.simulator import (
    SIMULATOR_KEY,
    Simulator,
    SimulatorConfig,
    TicketField,
    add_cli,
    build_app,
    start_simulator,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

AUTH = {"Authorization": aiohttp.encode_basic_auth("test-key", "X")}
TICKETS = "/api/v2/tickets"
VALID = {
    "email": "ada@example.com",
    "subject": "Printer on fire",
    "description": "It is on fire.",
    "status": 2,
    "priority": 1,
}


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Start an in-process simulator with the given config overrides; closed after the test."""
    clients: list[Client] = []

    async def factory(**overrides: Any) -> Client:
        client = TestClient(TestServer(build_app(SimulatorConfig(**overrides))))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def state(client: Client) -> Simulator:
    return client.app[SIMULATOR_KEY]


async def create(client: Client, **changes: Any) -> aiohttp.ClientResponse:
    return await client.post(TICKETS, json={**VALID, **changes}, headers=AUTH)


async def errors_of(response: aiohttp.ClientResponse) -> list[dict[str, str]]:
    assert response.status == 400
    body = await response.json()
    assert body["description"] == "Validation failed"
    errors: list[dict[str, str]] = body["errors"]
    return errors


async def poll(check: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Wait until `check()` holds, polling briefly; fails the test after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- Create --------------------------------------------------------------------------------


async def test_create_answers_201_with_the_full_ticket(client: Client) -> None:
    """A valid create gets 201, a Location header and the full ticket with every field."""
    response = await create(client, custom_fields={"cf_submission_id": "s-1"}, tags=["a"])
    assert response.status == 201
    body = await response.json()
    assert response.headers["Location"] == str(client.make_url(f"{TICKETS}/1"))
    assert body["id"] == 1
    assert body["description"] == "<div>It is on fire.</div>"
    assert body["description_text"] == "It is on fire."
    assert body["custom_fields"] == {
        "cf_submission_id": "s-1",
        "cf_order_id": None,
        "cf_category": None,
        "cf_vip": None,
        "cf_purchase_date": None,
    }
    assert body["tags"] == ["a"]
    assert body["requester_id"] > 80_000_000_000
    for key in ("due_by", "fr_due_by", "type", "group_id", "to_emails", "source_additional_info"):
        assert key in body
        assert body[key] is None
    assert body["created_at"].endswith("Z")
    assert (await (await create(client)).json())["id"] == 2


async def test_create_has_no_idempotency(client: Client) -> None:
    """Identical repeated creates make distinct tickets and reuse the requester contact."""
    first = await (await create(client)).json()
    second = await (await create(client)).json()
    assert (first["id"], second["id"]) == (1, 2)
    assert first["requester_id"] == second["requester_id"]
    assert len(state(client).contacts) == 1


async def test_html_description_is_kept(client: Client) -> None:
    """HTML descriptions are stored as sent, with the text version stripped of tags."""
    body = await (await create(client, description="<p>Hi &amp; <b>bye</b></p>")).json()
    assert body["description"] == "<p>Hi &amp; <b>bye</b></p>"
    assert body["description_text"] == "Hi & bye"


# --- Validation: exact bodies -----------------------------------------------------------------

STATUS_LIST = "'2,3,4,5'"
VALIDATION_CASES: list[tuple[dict[str, Any], list[dict[str, str]]]] = [
    (
        {"status": "2"},
        [
            {
                "field": "status",
                "message": "Value set is of type String.It should be one of these values: "
                + STATUS_LIST,
                "code": "datatype_mismatch",
            }
        ],
    ),
    (
        {"status": 9},
        [
            {
                "field": "status",
                "message": f"It should be one of these values: {STATUS_LIST}",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"priority": 7},
        [
            {
                "field": "priority",
                "message": "It should be one of these values: '1,2,3,4'",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"source": 4},
        [
            {
                "field": "source",
                "message": "It should be one of these values: '1,2,3,7,9,10'",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"description_html": "<b>x</b>"},
        [
            {
                "field": "description_html",
                "message": "Unexpected/invalid field in request",
                "code": "invalid_field",
            }
        ],
    ),
    (
        {"email": "zoë@example.com"},
        [
            {
                "field": "email",
                "message": "It should be in the 'valid email address' format",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"email": "a*b@example.com"},
        [
            {
                "field": "email",
                "message": "It should be in the 'valid email address' format",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"tags": "vip"},
        [
            {
                "field": "tags",
                "message": "Value set is of type String.It should be a/an Array",
                "code": "datatype_mismatch",
            }
        ],
    ),
    (
        {"cc_emails": "x@example.com"},
        [
            {
                "field": "cc_emails",
                "message": "Value set is of type String.It should be a/an Array",
                "code": "datatype_mismatch",
            }
        ],
    ),
    (
        {"attachments": {"name": "a.txt"}},
        [
            {
                "field": "attachments",
                "message": "Value set is of type key/value pair.It should be a/an Array",
                "code": "datatype_mismatch",
            }
        ],
    ),
    (
        {"type": "Complaint"},
        [
            {
                "field": "type",
                "message": "It should be one of these values: "
                "'Question,Incident,Problem,Feature Request,Refund'",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"custom_fields": {"cf_nope": "x"}},
        [
            {
                "field": "custom_fields.cf_nope",
                "message": "Unexpected/invalid field in request",
                "code": "invalid_field",
            }
        ],
    ),
    (
        {"custom_fields": {"cf_order_id": "12"}},
        [
            {
                "field": "custom_fields.cf_order_id",
                "message": "Value set is of type String. It should be a/an Integer.",
                "code": "datatype_mismatch",
            }
        ],
    ),
    (
        {"custom_fields": {"cf_category": "Sales"}},
        [
            {
                "field": "custom_fields.cf_category",
                "message": "It should be one of these values: 'Billing,Technical,Other'",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"custom_fields": {"cf_submission_id": "x" * 256}},
        [
            {
                "field": "custom_fields.cf_submission_id",
                "message": "Has 256 characters, it can have maximum of 255 characters",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"subject": ""},
        [
            {
                "field": "subject",
                "message": "It should not be blank as this is a mandatory field",
                "code": "invalid_value",
            }
        ],
    ),
    (
        {"email": None, "phone": "+15550100"},
        [{"field": "name", "message": "It should be a/an String", "code": "missing_field"}],
    ),
    (
        {"email": None, "requester_id": 42},
        [
            {
                "field": "requester_id",
                "message": "There is no contact matching the given requester_id",
                "code": "invalid_value",
            }
        ],
    ),
]


@pytest.mark.parametrize(("changes", "expected"), VALIDATION_CASES)
async def test_invalid_create_gets_freshdesks_exact_error(
    client: Client, changes: dict[str, Any], expected: list[dict[str, str]]
) -> None:
    """Each invalid input gets Freshdesk's exact field, message and code, and no ticket."""
    payload = {key: value for key, value in {**VALID, **changes}.items() if value is not None}
    response = await client.post(TICKETS, json=payload, headers=AUTH)
    assert await errors_of(response) == expected
    assert state(client).tickets == []


async def test_validation_collects_every_error(client: Client) -> None:
    """An empty create reports every missing field at once, requester included."""
    response = await client.post(TICKETS, json={}, headers=AUTH)
    assert await errors_of(response) == [
        {"field": "subject", "message": "It should be a/an String", "code": "missing_field"},
        {"field": "description", "message": "It should be a/an String", "code": "missing_field"},
        {
            "field": "status",
            "message": f"It should be one of these values: {STATUS_LIST}",
            "code": "missing_field",
        },
        {
            "field": "priority",
            "message": "It should be one of these values: '1,2,3,4'",
            "code": "missing_field",
        },
        {
            "field": "requester_id",
            "message": "Please fill at least 1 of requester_id, phone, email, twitter_id, "
            "facebook_id, unique_external_id fields",
            "code": "missing_field",
        },
    ]


async def test_required_custom_field_is_enforced(make_client: MakeClient) -> None:
    """A custom field required for agents is missing_field with its choices when absent."""
    fields = [TicketField("cf_team", "dropdown", "Team", ("Red", "Blue"), required_for_agents=True)]
    client = await make_client(ticket_fields=fields)
    assert await errors_of(await create(client)) == [
        {
            "field": "custom_fields.cf_team",
            "message": "It should be one of these values: 'Red,Blue'",
            "code": "missing_field",
        }
    ]
    assert (await create(client, custom_fields={"cf_team": "Red"})).status == 201


async def test_known_requester_id_and_named_cc_are_accepted(client: Client) -> None:
    """An existing requester_id is used; cc addresses may carry a display name."""
    first = await (await create(client)).json()
    response = await create(
        client, email=None, requester_id=first["requester_id"], cc_emails=['"Bo" <bo@example.com>']
    )
    body = await response.json()
    assert response.status == 201, body
    assert body["requester_id"] == first["requester_id"]
    assert body["cc_emails"] == ["bo@example.com"]


# --- Auth, routing and request checks -------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, aiohttp.encode_basic_auth("wrong-key", "X"), "Basic not-base64!", "Bearer test-key"],
)
async def test_bad_credentials_get_401(client: Client, authorization: str | None) -> None:
    """A missing, unknown or undecodable key gets Freshdesk's flat 401 body."""
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.get(TICKETS, headers=headers)
    assert response.status == 401
    assert await response.json() == {
        "code": "invalid_credentials",
        "message": "You have to be logged in to perform this action.",
    }


async def test_key_without_permission_gets_403(make_client: MakeClient) -> None:
    """A key whose agent lacks the role gets 403 access_denied."""
    client = await make_client(forbidden_keys={"agent-key"})
    headers = {"Authorization": aiohttp.encode_basic_auth("agent-key", "")}
    response = await client.post(TICKETS, json=VALID, headers=headers)
    assert response.status == 403
    assert await response.json() == {
        "code": "access_denied",
        "message": "You are not authorized to perform this action.",
    }
    assert state(client).tickets == []


@pytest.mark.parametrize("path", ["/api/v2/nothing", f"{TICKETS}/99", f"{TICKETS}/abc", "/"])
async def test_unknown_path_or_ticket_is_404_with_empty_body(client: Client, path: str) -> None:
    """Unknown URLs and unknown ticket ids answer 404 with an empty body."""
    response = await client.get(path, headers=AUTH)
    assert response.status == 404
    assert await response.read() == b""


async def test_wrong_verb_gets_405_naming_the_allowed_ones(client: Client) -> None:
    """A known path with the wrong verb gets 405 and Freshdesk's message."""
    response = await client.put(TICKETS, json=VALID, headers=AUTH)
    assert response.status == 405
    assert await response.json() == {
        "message": "PUT method is not allowed. It should be one of these method(s): GET, POST"
    }


async def test_unacceptable_accept_header_gets_406(client: Client) -> None:
    """An Accept header without JSON gets 406; */* and JSON are fine."""
    response = await client.get(TICKETS, headers={**AUTH, "Accept": "application/xml"})
    assert response.status == 406
    assert (await response.json())["code"] == "invalid_accept_header"
    response = await client.get(TICKETS, headers={**AUTH, "Accept": "*/*"})
    assert response.status == 200


async def test_non_json_create_gets_415(client: Client) -> None:
    """A create whose body is neither JSON nor multipart gets 415."""
    headers = {**AUTH, "Content-Type": "application/xml"}
    response = await client.post(TICKETS, data=b"<ticket/>", headers=headers)
    assert response.status == 415
    assert (await response.json())["code"] == "invalid_content_type"


async def test_malformed_json_gets_invalid_json(client: Client) -> None:
    """Unparseable JSON gets the flat invalid_json body."""
    headers = {**AUTH, "Content-Type": "application/json"}
    response = await client.post(TICKETS, data=b'{"subject": ', headers=headers)
    assert response.status == 400
    assert await response.json() == {
        "code": "invalid_json",
        "message": "Request body has invalid json format",
    }


# --- Headers and rate limits -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("POST", TICKETS), ("GET", "/api/v2/nope")])
async def test_every_answer_carries_freshdesk_headers(
    client: Client, method: str, path: str
) -> None:
    """Successes and errors alike carry the JSON type, a request id, the version and quotas."""
    response = await client.request(method, path, json=VALID, headers=AUTH)
    headers = response.headers
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    uuid.UUID(headers["X-Request-Id"])
    assert headers["X-Freshdesk-Api-Version"] == "latest=v2; requested=v2"
    assert headers["X-Ratelimit-Used-Currentrequest"] == "1"
    expected_total = "80" if method == "POST" else "200"
    assert headers["X-Ratelimit-Total"] == expected_total
    assert int(headers["X-Ratelimit-Remaining"]) == int(expected_total) - 1


async def test_create_limit_gives_429_then_resets(make_client: MakeClient) -> None:
    """N creates fit a window; the next gets 429 with Retry-After, no quota headers; then resets."""
    client = await make_client(create_limit=3, window_seconds=0.5)
    for _ in range(3):
        assert (await create(client)).status == 201
    limited = await create(client)
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert "X-Ratelimit-Total" not in limited.headers
    assert (await limited.json())["code"] == "too_many_requests"
    assert len(state(client).tickets) == 3

    async def accepted() -> bool:
        return (await create(client)).status == 201

    await poll(accepted)
    assert len(state(client).tickets) == 4


async def test_account_bucket_covers_every_endpoint(make_client: MakeClient) -> None:
    """The account bucket is shared: reads spend the credits a create then lacks."""
    client = await make_client(account_limit=2, window_seconds=30)
    assert (await client.get("/api/v2/ticket_fields", headers=AUTH)).status == 200
    assert (await client.get("/api/v2/ticket_fields", headers=AUTH)).status == 200
    response = await create(client)
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 30


async def test_invalid_requests_spend_credits_but_429s_do_not(make_client: MakeClient) -> None:
    """400s and 401s count against the limit; a 429 does not by default."""
    client = await make_client(create_limit=2, window_seconds=30)
    assert (await client.post(TICKETS, json={}, headers=AUTH)).status == 400
    assert (await client.post(TICKETS, json=VALID)).status == 401
    assert (await create(client)).status == 429
    assert (await create(client)).status == 429
    view = await client.get("/api/v2/ticket_fields", headers=AUTH)
    assert view.headers["X-Ratelimit-Remaining"] == "197"  # 2 creates + this call, no 429s


async def test_includes_cost_extra_credits(client: Client) -> None:
    """include= on view costs one more credit each, on list two more each."""
    await create(client)
    view = await client.get(f"{TICKETS}/1?include=requester,stats", headers=AUTH)
    assert view.headers["X-Ratelimit-Used-Currentrequest"] == "3"
    body = await view.json()
    assert body["requester"]["email"] == "ada@example.com"
    listed = await client.get(f"{TICKETS}?include=description", headers=AUTH)
    assert listed.headers["X-Ratelimit-Used-Currentrequest"] == "3"
    assert (await listed.json())[0]["description_text"] == "It is on fire."


# --- List, search, fields, contacts ---------------------------------------------------------


async def test_list_filters_and_paginates_with_link_header(client: Client) -> None:
    """List filters by requester email, pages with a next link only while more remain."""
    for number in range(5):
        await create(client, subject=f"a{number}")
    await create(client, email="bob@example.com")
    url = f"{TICKETS}?email=ada%40example.com&per_page=2&order_type=asc"
    first = await client.get(url, headers=AUTH)
    assert [item["subject"] for item in await first.json()] == ["a0", "a1"]
    assert "description" not in (await first.json())[0]
    assert first.headers["Link"].endswith('page=2>;rel="next"')
    last = await client.get(f"{url}&page=3", headers=AUTH)
    assert [item["subject"] for item in await last.json()] == ["a4"]
    assert "Link" not in last.headers
    default = await client.get(TICKETS, headers=AUTH)
    assert [item["id"] for item in await default.json()] == [6, 5, 4, 3, 2, 1]


async def test_list_filters_by_requester_and_updated_since(client: Client) -> None:
    """requester_id, unique_external_id, updated_since narrow the list; unknown email: empty."""
    ada = await (await create(client)).json()
    await create(client, email=None, unique_external_id="ext-1")
    by_id = await client.get(f"{TICKETS}?requester_id={ada['requester_id']}", headers=AUTH)
    assert [item["id"] for item in await by_id.json()] == [1]
    by_external = await client.get(f"{TICKETS}?unique_external_id=ext-1", headers=AUTH)
    assert [item["id"] for item in await by_external.json()] == [2]
    future = await client.get(f"{TICKETS}?updated_since=2999-01-01T00:00:00Z", headers=AUTH)
    assert await future.json() == []
    nobody = await client.get(f"{TICKETS}?email=nobody%40example.com", headers=AUTH)
    assert await nobody.json() == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("per_page=101", "per_page"),
        ("page=0", "page"),
        ("order_by=name", "order_by"),
        ("colour=red", "colour"),
    ],
)
async def test_list_rejects_bad_parameters(client: Client, query: str, field: str) -> None:
    """Out-of-range paging, unknown sort keys and unknown parameters are 400s."""
    response = await client.get(f"{TICKETS}?{query}", headers=AUTH)
    assert [error["field"] for error in await errors_of(response)] == [field]


async def test_list_is_read_after_write_consistent(client: Client) -> None:
    """A ticket shows in the list right after its create answer."""
    created = await (await create(client, custom_fields={"cf_submission_id": "abc"})).json()
    listed = await (await client.get(f"{TICKETS}?email=ada%40example.com", headers=AUTH)).json()
    assert listed[0]["id"] == created["id"]
    assert listed[0]["custom_fields"]["cf_submission_id"] == "abc"


async def test_search_sees_tickets_only_after_the_index_delay(make_client: MakeClient) -> None:
    """Search finds a ticket by tag or custom field only once the indexing delay has passed."""
    client = await make_client(search_index_delay=0.2)
    await create(client, tags=["sub-1"], custom_fields={"cf_submission_id": "u-1"}, priority=3)
    await create(client, tags=["other"], status=3)
    query = "/api/v2/search/tickets?query=\"tag:'sub-1'\""
    assert await (await client.get(query, headers=AUTH)).json() == {"results": [], "total": 0}

    async def indexed() -> bool:
        body = await (await client.get(query, headers=AUTH)).json()
        return bool(body["total"] == 1)

    await poll(indexed)
    checks = {
        "\"cf_submission_id:'u-1'\"": [1],
        '"priority:3 AND status:2"': [1],
        "\"(tag:'other' OR priority:3) AND status:>3\"": [2],
        "\"tag:'other' OR tag:'sub-1'\"": [2, 1],
        '"priority:>2"': [1],
    }
    for text, ids in checks.items():
        body = await (
            await client.get("/api/v2/search/tickets", params={"query": text}, headers=AUTH)
        ).json()
        assert [item["id"] for item in body["results"]] == ids, text
        assert body["total"] == len(ids)


@pytest.mark.parametrize(
    ("query", "field"),
    [("tag:'x'", "query"), ('"requester_id:1"', "requester_id"), ('"status:2 AND"', "query")],
)
async def test_search_rejects_unquoted_or_unknown_queries(
    client: Client, query: str, field: str
) -> None:
    """A query without outer double quotes, with requester_id, or malformed is a 400."""
    response = await client.get("/api/v2/search/tickets", params={"query": query}, headers=AUTH)
    assert [error["field"] for error in await errors_of(response)] == [field]


async def test_ticket_fields_lists_defaults_and_custom_fields(client: Client) -> None:
    """ticket_fields shows the default fields and every custom field with its type."""
    fields = await (await client.get("/api/v2/ticket_fields", headers=AUTH)).json()
    by_name = {item["name"]: item for item in fields}
    assert by_name["ticket_type"]["choices"][0] == "Question"
    assert by_name["cf_category"]["type"] == "custom_dropdown"
    assert by_name["cf_category"]["choices"] == ["Billing", "Technical", "Other"]
    assert by_name["cf_submission_id"]["type"] == "custom_text"


async def test_contacts_are_created_and_found_by_email(client: Client) -> None:
    """A create with an unknown email makes a contact that the contacts list finds."""
    ticket = await (await create(client, name="Ada")).json()
    found = await (
        await client.get("/api/v2/contacts?email=ada%40example.com", headers=AUTH)
    ).json()
    assert [(item["id"], item["name"]) for item in found] == [(ticket["requester_id"], "Ada")]
    assert (
        await (await client.get("/api/v2/contacts?email=x%40example.com", headers=AUTH)).json()
        == []
    )


# --- Multipart -------------------------------------------------------------------------------


def form(**extra: str) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for key, value in {"email": "ada@example.com", "subject": "S", "description": "D"}.items():
        data.add_field(key, value)
    data.add_field("status", "2")
    data.add_field("priority", "1")
    for key, value in extra.items():
        data.add_field(key, value)
    return data


async def test_multipart_create_accepts_strings_arrays_custom_fields_and_files(
    client: Client,
) -> None:
    """In form data "2" is a valid status, name[] builds arrays and files become attachments."""
    data = form()
    data.add_field("tags[]", "one")
    data.add_field("tags[]", "two")
    data.add_field("custom_fields[cf_order_id]", "42")
    data.add_field("custom_fields[cf_vip]", "true")
    data.add_field("attachments[]", b"hello", filename="hello.txt", content_type="text/plain")
    response = await client.post(TICKETS, data=data, headers=AUTH)
    body = await response.json()
    assert response.status == 201, body
    assert body["status"] == 2
    assert body["tags"] == ["one", "two"]
    assert body["custom_fields"]["cf_order_id"] == 42
    assert body["custom_fields"]["cf_vip"] is True
    assert [(item["name"], item["size"]) for item in body["attachments"]] == [("hello.txt", 5)]


async def test_multipart_text_sent_as_file_is_absent(client: Client) -> None:
    """A text field sent as a file part is not seen, as in Freshdesk's old sample."""
    data = aiohttp.FormData()
    data.add_field("email", "ada@example.com")
    data.add_field("subject", b"S", filename="", content_type="text/plain")
    data.add_field("description", "D")
    data.add_field("status", "2")
    data.add_field("priority", "1")
    response = await client.post(TICKETS, data=data, headers=AUTH)
    assert await errors_of(response) == [
        {"field": "subject", "message": "It should be a/an String", "code": "missing_field"}
    ]


async def test_multipart_non_file_attachment_is_rejected(client: Client) -> None:
    """An attachments[] part that is not a file gets datatype_mismatch."""
    response = await client.post(
        TICKETS, data=form(**{"attachments[]": "not a file"}), headers=AUTH
    )
    assert await errors_of(response) == [
        {
            "field": "attachments",
            "message": "It should contain elements of type valid file format only",
            "code": "datatype_mismatch",
        }
    ]


async def test_multipart_attachments_over_the_limit_are_rejected(make_client: MakeClient) -> None:
    """Attachments larger in total than the account limit get a 400 and no ticket."""
    client = await make_client(attachment_limit_bytes=10)
    data = form()
    data.add_field(
        "attachments[]", b"x" * 11, filename="big.bin", content_type="application/octet-stream"
    )
    response = await client.post(TICKETS, data=data, headers=AUTH)
    assert [error["field"] for error in await errors_of(response)] == ["attachments"]
    assert state(client).tickets == []


# --- Faults ------------------------------------------------------------------------------------


async def inject(client: Client, payload: dict[str, Any]) -> None:
    response = await client.post("/_simulator/faults", json=payload)
    assert response.status == 200, await response.text()


async def test_500_json_fault(client: Client) -> None:
    """A 500_json fault answers Freshdesk's internal_error body and creates nothing."""
    await inject(client, {"script": [{"fault": "500_json"}]})
    response = await create(client)
    assert response.status == 500
    assert await response.json() == {
        "code": "internal_error",
        "message": "We're sorry, but something went wrong.",
    }
    assert state(client).tickets == []
    assert (await create(client)).status == 201


@pytest.mark.parametrize(
    ("kind", "status"), [("500_html", 500), ("502_html", 502), ("503_html", 503), ("504_html", 504)]
)
async def test_html_faults_answer_html_pages(client: Client, kind: str, status: int) -> None:
    """HTML faults answer the status with a text/html body, as gateways do."""
    await inject(client, {"script": [{"fault": kind}]})
    response = await create(client)
    assert response.status == status
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<html>" in (await response.text()).lower()


async def test_429_fault_with_and_without_retry_after(client: Client) -> None:
    """A scripted 429 carries the given Retry-After, or none when it is null."""
    await inject(
        client,
        {
            "script": [
                {"fault": "429", "retry_after": 20, "count": 2},
                {"fault": "429", "retry_after": None},
            ]
        },
    )
    for _ in range(2):
        response = await create(client)
        assert (response.status, response.headers["Retry-After"]) == (429, "20")
    bare = await create(client)
    assert bare.status == 429
    assert "Retry-After" not in bare.headers
    assert (await create(client)).status == 201


async def test_reset_fault_drops_the_connection(client: Client) -> None:
    """A reset fault closes the connection: the client sees the server disconnect."""
    await inject(client, {"script": [{"fault": "reset"}]})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(client)
    assert state(client).tickets == []
    assert state(client).requests[-1].fault == "reset"
    assert state(client).requests[-1].status is None


async def test_hang_fault_outlasts_the_client_timeout(client: Client) -> None:
    """A hang fault never answers, so the client's timeout fires."""
    await inject(client, {"script": [{"fault": "hang"}]})
    with pytest.raises(TimeoutError):
        await client.post(
            TICKETS, json=VALID, headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.2)
        )
    assert state(client).tickets == []


async def test_latency_fault_delays_then_answers(client: Client) -> None:
    """A latency fault delays the answer and then processes the request normally."""
    await inject(client, {"script": [{"fault": "latency", "seconds": 0.05}]})
    assert (await create(client)).status == 201
    assert state(client).requests[-1].fault == "latency"


@pytest.mark.parametrize("then", ["503_html", "500_json", "reset", "hang"])
async def test_create_then_fail_keeps_the_ticket(client: Client, then: str) -> None:
    """create_then_fail stores the ticket although the client sees a 5xx, a reset or a hang."""
    await inject(client, {"script": [{"fault": "create_then_fail", "then": then, "seconds": 0.3}]})
    timeout = aiohttp.ClientTimeout(total=0.2)
    try:
        response = await client.post(TICKETS, json=VALID, headers=AUTH, timeout=timeout)
    except (TimeoutError, aiohttp.ClientConnectionError):
        assert then in ("reset", "hang")
    else:
        assert response.status >= 500
    tickets = await (await client.get("/_simulator/tickets")).json()
    assert [ticket["id"] for ticket in tickets] == [1]


@pytest.mark.parametrize(
    ("then", "content_type"), [("201_text_plain", "text/plain"), ("201_empty", None)]
)
async def test_create_then_fail_can_garble_the_201(
    client: Client, then: str, content_type: str | None
) -> None:
    """create_then_fail can answer the 201 as text/plain or with no body at all."""
    await inject(client, {"script": [{"fault": "create_then_fail", "then": then}]})
    response = await create(client)
    assert response.status == 201
    body = await response.read()
    if content_type is None:
        assert body == b""
    else:
        assert response.headers["Content-Type"].startswith(content_type)
        assert b'"id":1' in body
    assert len(state(client).tickets) == 1


async def test_create_only_faults_skip_other_requests(client: Client) -> None:
    """A fault matching creates is not consumed by a GET in between."""
    await inject(client, {"script": [{"fault": "503_html", "match": "create"}]})
    assert (await client.get(TICKETS, headers=AUTH)).status == 200
    assert (await create(client)).status == 503
    assert (await create(client)).status == 201


async def test_down_answers_503_until_cleared(client: Client) -> None:
    """While down every API call gets a 503 page; clearing restores service."""
    await inject(client, {"down": True})
    assert (await create(client)).status == 503
    assert (await client.get(TICKETS, headers=AUTH)).status == 503
    await inject(client, {"clear": True})
    assert (await create(client)).status == 201


async def test_fault_rates_are_seeded_and_deterministic(client: Client) -> None:
    """The same seed gives the same sequence of random faults."""

    async def run() -> list[int]:
        await inject(client, {"clear": True, "rates": {"500_json": 0.5}, "seed": 7})
        return [(await client.get(TICKETS, headers=AUTH)).status for _ in range(12)]

    first = await run()
    assert first == await run()
    assert set(first) == {200, 500}
    await inject(client, {"clear": True})
    assert (await client.get(TICKETS, headers=AUTH)).status == 200


async def test_respond_fault_returns_the_scripted_answer(client: Client) -> None:
    """A respond fault answers exactly the scripted status, headers and body."""
    fault = {
        "fault": "respond",
        "status": 201,
        "body": "ok",
        "headers": {"Content-Type": "text/plain"},
    }
    await inject(client, {"script": [fault]})
    response = await create(client)
    assert (response.status, await response.text()) == (201, "ok")
    assert response.headers["Content-Type"] == "text/plain"
    assert state(client).tickets == []


async def test_rate_objects_carry_fault_options(client: Client) -> None:
    """A rate given as an object takes fault options such as match and then."""
    rates = {"create_then_fail": {"p": 1.0, "then": "502_html", "match": "create"}}
    await inject(client, {"rates": rates, "seed": 3})
    assert (await client.get(TICKETS, headers=AUTH)).status == 200
    assert (await create(client)).status == 502
    assert len(state(client).tickets) == 1


async def test_429_accounting_is_configurable(make_client: MakeClient) -> None:
    """With count_429 and ratelimit_headers_on_429, a 429 spends credits and shows the quota."""
    client = await make_client(
        create_limit=1, window_seconds=30, count_429=True, ratelimit_headers_on_429=True
    )
    assert (await create(client)).status == 201
    limited = await create(client)
    assert limited.status == 429
    assert limited.headers["X-Ratelimit-Remaining"] == "0"
    fields = await client.get("/api/v2/ticket_fields", headers=AUTH)
    assert fields.headers["X-Ratelimit-Remaining"] == "197"  # the 429 was charged too


async def test_search_pages_stop_at_ten(client: Client) -> None:
    """Search pages run from 1 to 10; page 11 is a 400."""
    params = {"query": '"status:2"', "page": "11"}
    response = await client.get("/api/v2/search/tickets", params=params, headers=AUTH)
    assert [error["field"] for error in await errors_of(response)] == ["page"]


@pytest.mark.parametrize(
    "payload",
    [
        {"script": [{"fault": "explode"}]},
        {"rates": {"500_json": 0.8, "reset": 0.5}},
        {"script": "503_html"},
    ],
)
async def test_malformed_fault_payloads_are_refused(
    client: Client, payload: dict[str, Any]
) -> None:
    """The control surface refuses unknown faults and impossible rates with a 400."""
    response = await client.post("/_simulator/faults", json=payload)
    assert response.status == 400
    assert (await (await client.get("/_simulator/faults")).json())["script"] == []


# --- Control surface ------------------------------------------------------------------------


async def test_requests_log_records_status_ticket_and_submission(client: Client) -> None:
    """/_simulator/requests lists each call with its status, ticket id and submission id."""
    await create(client, custom_fields={"cf_submission_id": "sub-9"})
    await client.get(f"{TICKETS}/1", headers=AUTH)
    await client.get("/api/v2/missing", headers=AUTH)
    log = await (await client.get("/_simulator/requests")).json()
    assert [(item["method"], item["path"], item["status"], item["ticket_id"]) for item in log] == [
        ("POST", TICKETS, 201, 1),
        ("GET", f"{TICKETS}/1", 200, 1),
        ("GET", "/api/v2/missing", 404, None),
    ]
    assert log[0]["submission_id"] == "sub-9"
    assert isinstance(log[0]["time"], float)


async def test_runtime_config_changes_limits_and_keys(client: Client) -> None:
    """POST /_simulator/config changes keys and limits at once; its answer hides the keys."""
    response = await client.post(
        "/_simulator/config", json={"create_limit": 2, "api_keys": ["new-key"]}
    )
    shown = await response.json()
    assert shown["create_limit"] == 2
    assert shown["api_keys"] == 1
    assert (await create(client)).status == 401  # spends one of the two credits
    new_auth = {"Authorization": aiohttp.encode_basic_auth("new-key", "X")}
    assert (await client.post(TICKETS, json=VALID, headers=new_auth)).status == 201
    assert (await client.post(TICKETS, json=VALID, headers=new_auth)).status == 429
    bad = await client.post("/_simulator/config", json={"create_limit": "many"})
    assert bad.status == 400


async def test_runtime_changes_leave_the_callers_config_alone() -> None:
    """A simulator copies its config, so changing it at runtime never touches a shared one."""
    shared = SimulatorConfig(create_limit=5)
    Simulator(shared).configure({"create_limit": 1, "api_keys": ["other"]})
    assert (shared.create_limit, shared.api_keys) == (5, {"test-key"})


async def test_reset_forgets_everything(client: Client) -> None:
    """POST /_simulator/reset forgets tickets, requests, faults and windows; ids restart at 1."""
    await create(client)
    await inject(client, {"script": [{"fault": "503_html"}]})
    assert (await client.post("/_simulator/reset")).status == 200
    health = await (await client.get("/_simulator/health")).json()
    assert health == {"status": "ok", "tickets": 0, "requests": 0}
    assert (await (await create(client)).json())["id"] == 1


async def test_latency_setting_delays_every_answer(make_client: MakeClient) -> None:
    """A configured latency applies to API answers and is cut short on shutdown."""
    client = await make_client(latency=30.0)
    task = asyncio.create_task(create(client))
    await poll(lambda: _has_request(client))
    assert not task.done()
    await client.close()  # shutdown ends the wait instead of letting it run 30 s
    with pytest.raises(aiohttp.ClientError):
        await task


async def _has_request(client: Client) -> bool:
    return len(state(client).requests) == 1


# --- Running as a server, CLI, secrets --------------------------------------------------------


async def test_start_simulator_serves_on_a_free_port() -> None:
    """start_simulator binds port 0 to a free port and close() stops it."""
    running = await start_simulator(port=0)
    try:
        async with (
            aiohttp.ClientSession(headers=AUTH) as session,
            session.post(f"{running.url}{TICKETS}", json=VALID) as response,
        ):
            assert response.status == 201
        assert len(running.state.tickets) == 1
    finally:
        await running.close()


async def test_hang_ends_when_the_server_closes() -> None:
    """A hanging request does not keep a closing server waiting."""
    running = await start_simulator(port=0)
    running.state.faults.load({"script": [{"fault": "hang"}]})
    async with aiohttp.ClientSession(headers=AUTH) as session:
        task = asyncio.create_task(session.post(f"{running.url}{TICKETS}", json=VALID))
        await poll(lambda: _requests_seen(running.state))
        await running.close()
        with pytest.raises(aiohttp.ClientError):
            await task


async def _requests_seen(sim: Simulator) -> bool:
    return len(sim.requests) == 1


async def test_throughput_sanity(make_client: MakeClient) -> None:
    """Concurrent creates all succeed with sequential ids (the rate is printed, not asserted)."""
    client = await make_client(create_limit=10**6, account_limit=10**6)
    count = 500
    started = time.perf_counter()
    statuses = await asyncio.gather(*(_status(client) for _ in range(count)))
    elapsed = time.perf_counter() - started
    print(f"simulator: {count / elapsed:.0f} creates/s in-process")
    assert statuses == [201] * count
    assert [ticket["id"] for ticket in state(client).tickets] == list(range(1, count + 1))


async def _status(client: Client) -> int:
    response = await create(client)
    response.release()
    return response.status


def test_cli_registers_fake_freshdesk() -> None:
    """add_cli registers fake-freshdesk with its options, help and a func."""
    parser = argparse.ArgumentParser(prog="fdqueue")
    subparsers = parser.add_subparsers(dest="command")
    add_cli(subparsers)
    args = parser.parse_args(
        ["fake-freshdesk", "--port", "0", "--api-key", "a", "--api-key", "b", "--window", "1"]
    )
    assert (args.port, args.api_key, args.window, args.host) == (0, ["a", "b"], 1.0, "127.0.0.1")
    assert callable(args.func)
    help_text = subparsers.choices["fake-freshdesk"].format_help()
    assert "/_simulator/faults" in help_text
    assert "POST /api/v2/tickets" in help_text


async def test_no_key_or_body_reaches_the_logs(client: Client) -> None:
    """Neither API keys nor ticket bodies appear in any log event."""
    with capture_logs() as events:
        await create(client, description="secret body text")
        await client.post(
            TICKETS, json=VALID, headers={"Authorization": aiohttp.encode_basic_auth("bad", "")}
        )
    text = repr(events)
    assert "test-key" not in text
    assert "secret body text" not in text


async def test_create_then_fail_leaves_a_refused_create_alone() -> None:
    """`create_then_fail` only garbles answers of creates that made a ticket: an invalid
    create still gets Freshdesk's 400 with its errors (a chaos run once saw a bare 400)."""
    from fdqueue.simulator import start_simulator

    async with await start_simulator() as running, aiohttp.ClientSession() as http:
        async with http.post(
            f"{running.url}/_simulator/faults",
            json={"script": [{"fault": "create_then_fail", "then": "201_empty"}]},
        ) as scripted:
            assert scripted.status == 200
        async with http.post(
            f"{running.url}/api/v2/tickets",
            json={"email": "a@example.com", "subject": "s", "status": 2, "priority": 1},
            headers=AUTH,
        ) as refused:
            body = await refused.json()
        assert refused.status == 400
        assert body["errors"][0]["field"] == "description"
        assert running.state.tickets == []
