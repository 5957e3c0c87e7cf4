"""Intake validation: every invalid body is a 422 naming each field, nothing is stored (B17 a)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fdqueue.api import create_app
from fdqueue.config import Settings
from fdqueue.validation import (
    FIELD_CHARS,
    MAX_PROBLEMS,
    MESSAGE_CHARS,
    BodyError,
    TicketInvalid,
    clip,
    parse_json,
    unstorable_text,
    validate_ticket,
)

Client = TestClient[web.Request, web.Application]
INTAKE = "/api/create-freshdesk-ticket"
VALID: dict[str, Any] = {"email": "ada@example.com", "subject": "Help", "description": "Broken."}


def without(*names: str) -> dict[str, Any]:
    return {key: value for key, value in VALID.items() if key not in names}


# (case, body, fields that must be named)
INVALID: list[tuple[str, Any, set[str]]] = [
    ("empty object", {}, {"subject", "description", "email"}),
    ("no requester", without("email"), {"email"}),
    ("no subject", without("subject"), {"subject"}),
    ("no description", without("description"), {"description"}),
    ("blank subject", {**VALID, "subject": "   "}, {"subject"}),
    ("blank description", {**VALID, "description": "\n\t "}, {"description"}),
    ("subject too long", {**VALID, "subject": "s" * 256}, {"subject"}),
    ("email not an address", {**VALID, "email": "not-an-email"}, {"email"}),
    ("email non-ASCII", {**VALID, "email": "jürgen@example.com"}, {"email"}),
    ("email with a star", {**VALID, "email": "a*b@example.com"}, {"email"}),
    ("email a number", {**VALID, "email": 5}, {"email"}),
    ("priority out of range", {**VALID, "priority": 5}, {"priority"}),
    ("priority unknown name", {**VALID, "priority": "critical"}, {"priority"}),
    ("priority boolean", {**VALID, "priority": True}, {"priority"}),
    ("status out of range (B17 a)", {**VALID, "status": 9}, {"status"}),
    ("status unknown name", {**VALID, "status": "waiting"}, {"status"}),
    ("source not a Freshdesk code", {**VALID, "source": 4}, {"source"}),
    ("tags not a list", {**VALID, "tags": "a,b"}, {"tags"}),
    ("blank tag", {**VALID, "tags": ["ok", "fine", " "]}, {"tags.2"}),
    ("tag not text", {**VALID, "tags": ["ok", {"x": 1}]}, {"tags.1"}),
    ("cc_emails bad entry", {**VALID, "cc_emails": ["ok@example.com", "nope"]}, {"cc_emails.1"}),
    ("custom field list value", {**VALID, "custom_fields": {"cf_x": [1]}}, {"custom_fields.cf_x"}),
    ("custom field bad name", {**VALID, "custom_fields": {"order": 1}}, {"custom_fields"}),
    ("custom_fields not an object", {**VALID, "custom_fields": [1]}, {"custom_fields"}),
    ("unknown field", {**VALID, "attachments": []}, {"attachments"}),
    ("two unknown fields", {**VALID, "foo": 1, "bar": 2}, {"foo", "bar"}),
    ("requester_id zero", {**VALID, "requester_id": 0}, {"requester_id"}),
    ("group_id text", {**VALID, "group_id": "sales"}, {"group_id"}),
    ("phone without name", {**without("email"), "phone": "+441234"}, {"name"}),
    ("phone too short", {**VALID, "phone": "12"}, {"phone"}),
    ("chatbot_id too long", {**VALID, "chatbot_id": "c" * 256}, {"chatbot_id"}),
    ("NUL in description", {**VALID, "description": "a\x00b"}, {"description"}),
    ("NUL in user_id", {**VALID, "user_id": "u\x00"}, {"user_id"}),
    ("NUL in a custom value", {**VALID, "custom_fields": {"cf_x": "\x00"}}, {"custom_fields.cf_x"}),
    ("NUL in a tag", {**VALID, "tags": ["a", "b\x00"]}, {"tags.1"}),
    ("lone surrogate in subject", {**VALID, "subject": "a\ud800"}, {"subject"}),
    ("lone surrogate in a custom value", {**VALID, "custom_fields": {"cf_x": "\udfff"}},
     {"custom_fields.cf_x"}),
    ("body is an array", [VALID], {"body"}),
    ("body is a string", "ticket", {"body"}),
    ("body is a number", 42, {"body"}),
    ("body is null", None, {"body"}),
    ("every field wrong at once", {"email": 1, "subject": 2, "description": [], "priority": "x",
                                   "status": 1, "tags": 3, "zzz": 0},
     {"email", "subject", "description", "priority", "status", "tags", "zzz"}),
]  # fmt: skip


def _settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url, freshdesk_domain=None, freshdesk_base_url=None, freshdesk_api_key=None
    )


@pytest.fixture
async def client(db_url: str, pool: asyncpg.Pool) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(_settings(db_url), pool=pool))) as test_client:
        yield test_client


def test_table_is_big_enough() -> None:
    """The acceptance asks for at least 25 invalid bodies."""
    assert len(INVALID) >= 25


@pytest.mark.parametrize(
    ("body", "fields"), [(b, f) for _, b, f in INVALID], ids=[c for c, _, _ in INVALID]
)
async def test_invalid_body_is_422_naming_every_field(
    client: Client, pool: asyncpg.Pool, body: Any, fields: set[str]
) -> None:
    """Each invalid body answers 422 validation_error naming its fields; no row is stored."""
    raw = json.dumps(body).encode()  # json escapes NUL and surrogates as \\u sequences
    response = await client.post(INTAKE, data=raw, headers={"Content-Type": "application/json"})
    answer = await response.json()
    assert response.status == 422, answer
    assert answer["success"] is False
    assert answer["error"]["code"] == "validation_error"
    named = {item["field"] for item in answer["error"]["fields"]}
    assert fields <= named, answer
    assert all(item["message"] for item in answer["error"]["fields"])
    assert await pool.fetchval("SELECT count(*) FROM freshdesk_ticket_queue") == 0


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ({"priority": "3"}, {"priority": 3}),
        ({"priority": "High"}, {"priority": 3}),
        ({"priority": 4.0}, {"priority": 4}),
        ({"status": "resolved"}, {"status": 4}),
        ({"status": "2"}, {"status": 2}),
        ({"source": "chat"}, {"source": 7}),
        ({}, {"priority": 1, "status": 2, "source": 2}),
    ],
)
async def test_codes_are_normalised_to_numbers_before_202(
    client: Client, pool: asyncpg.Pool, given: dict[str, Any], stored: dict[str, Any]
) -> None:
    """Names and numeric strings for codes are stored as Freshdesk's integers (B17 a)."""
    response = await client.post(INTAKE, json={**VALID, **given})
    assert response.status == 202
    data = await pool.fetchval("SELECT ticket_data FROM freshdesk_ticket_queue")
    assert {key: data[key] for key in stored} == stored


async def test_huge_unknown_field_name_is_not_echoed(client: Client) -> None:
    """A 50 000-character unknown key is named, clipped; the answer stays small."""
    response = await client.post(INTAKE, json={**VALID, "k" * 50_000: 1})
    answer = await response.json()
    (problem,) = answer["error"]["fields"]
    assert len(problem["field"]) <= FIELD_CHARS
    assert problem["message"] == "unknown field"
    assert len(await response.read()) < 2000


async def test_many_problems_are_capped(client: Client) -> None:
    """Thousands of unknown keys give a bounded list of problems."""
    response = await client.post(INTAKE, json={**VALID, **{f"x{i}": 1 for i in range(3000)}})
    answer = await response.json()
    assert response.status == 422
    assert len(answer["error"]["fields"]) == MAX_PROBLEMS


# --- the functions themselves ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"NaN", b"[Infinity]", b"-Infinity", b"1e400", b"1" * 40, b"[" * 50_000, b"\x80"],
)
def test_parse_json_refuses_what_jsonb_cannot_hold(raw: bytes) -> None:
    """Broken syntax, NaN/Infinity, overflowing or endless numbers, and deep nesting are 400s."""
    with pytest.raises(BodyError):
        parse_json(raw)


def test_parse_json_reads_ordinary_numbers() -> None:
    """Ordinary integers and floats still parse."""
    assert parse_json(b'{"a": -12, "b": 1.5e3}') == {"a": -12, "b": 1500.0}


def test_unstorable_text_walks_keys_values_and_deep_nesting() -> None:
    """NUL and surrogates are found in keys and values at any depth, iteratively."""
    deep: Any = "\x00"
    for _ in range(5000):
        deep = [deep]
    problems = unstorable_text({"a\x00": 1, "b": {"c": ["ok", "\ud83d"]}, "d": deep})
    fields = {p.field for p in problems}
    assert "a\N{REPLACEMENT CHARACTER}" in fields
    assert "b.c.1" in fields
    assert any(field.startswith("d.0.0") for field in fields)


def test_validate_ticket_returns_the_model_for_valid_input() -> None:
    """A valid body becomes a TicketIn with the requester kept."""
    ticket = validate_ticket({**VALID, "priority": "urgent"})
    assert (ticket.email, ticket.priority) == ("ada@example.com", 4)


def test_union_errors_name_the_field_once() -> None:
    """A value fitting none of a union's types is one problem at the field's own path."""
    with pytest.raises(TicketInvalid) as caught:
        validate_ticket({**VALID, "custom_fields": {"cf_x": {"deep": 1}}})
    assert [p.field for p in caught.value.problems] == ["custom_fields.cf_x"]


def test_clip_bounds_and_cleans_text() -> None:
    """Clipped output never exceeds its bound and never carries NUL or surrogates."""
    clipped = clip("\x00\ud800" + "x" * 1000, MESSAGE_CHARS)
    assert len(clipped) == MESSAGE_CHARS
    assert "\x00" not in clipped
    clipped.encode("utf-8")
