"""The HTTP API on a real PostgreSQL, with the Freshdesk simulator: every route's contracts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from fdqueue import api
from fdqueue.api import admin_denial, create_app, error_middleware, is_loopback
from fdqueue.config import Settings
from fdqueue.embedded import free_port
from fdqueue.metrics import ApiMetrics
from fdqueue.migrate import migrate
from fdqueue.models import QueueStats
from fdqueue.simulator import RunningSimulator, start_simulator
from tests.pg import EmbeddedPostgres

Client = TestClient[web.Request, web.Application]
API_KEY = "test-key"
INTAKE = "/api/create-freshdesk-ticket"
DIRECT = "/api/create-freshdesk-ticket-direct"
STATS = "/api/freshdesk-queue/stats"
PROCESS = "/api/freshdesk-queue/process"
EMAIL = "ada@example.com"
TICKET: dict[str, Any] = {
    "email": EMAIL,
    "subject": "Printer on fire",
    "description": "It is on fire.",
    "priority": "high",
    "chatbot_id": "bot-7",
    "user_id": "u-42",
}


def api_settings(db_url: str | None, freshdesk_url: str | None, **overrides: Any) -> Settings:
    """Settings for one test app: Freshdesk at `freshdesk_url`, short time units."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "freshdesk_domain": None,
        "freshdesk_base_url": freshdesk_url,
        "freshdesk_api_key": API_KEY if freshdesk_url else None,
        "admin_token": None,
        "cors_origins": [],
        "http_timeout": 5.0,
        "http_connect_timeout": 2.0,
        "db_connect_timeout": 5.0,
        "backoff_unit": 0.1,
        "backoff_jitter": 0.0,
        "rate_limit_default_wait": 1.0,
        "auth_pause": 1.0,
        "shutdown_grace": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[Client]:
    """The app on a real socket on 127.0.0.1, with a client; both closed afterwards."""
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.fixture
async def simulator() -> AsyncIterator[RunningSimulator]:
    """The Freshdesk simulator on a free loopback port."""
    running = await start_simulator(port=0)
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def client(
    db_url: str, pool: asyncpg.Pool, simulator: RunningSimulator
) -> AsyncIterator[Client]:
    """The API with default settings, the test's pool and the simulator."""
    async with serving(create_app(api_settings(db_url, simulator.url), pool=pool)) as test_client:
        yield test_client


async def rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM freshdesk_ticket_queue ORDER BY id")


def created(sim: RunningSimulator) -> list[dict[str, Any]]:
    """The tickets the simulator holds."""
    return list(sim.state.tickets)


async def wait_until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll `check` until it holds; fail after a minute."""
    deadline = time.monotonic() + 60.0
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


# --- intake ---------------------------------------------------------------------------------


async def test_intake_answers_202_only_with_a_committed_row(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A valid submission is stored (codes normalised, operator columns filled) and answered 202."""
    with structlog.testing.capture_logs() as logs:
        response = await client.post(INTAKE, json=TICKET)
    body = await response.json()
    assert response.status == 202
    (row,) = await rows(pool)
    assert body == {
        "success": True,
        "queued": True,
        "queue_id": row["id"],
        "id": str(row["public_id"]),
        "status": "pending",
        "status_url": f"/api/freshdesk-queue/tickets/{row['public_id']}",
        "message": "Ticket queued for delivery to Freshdesk",
    }
    assert response.headers["Location"] == body["status_url"]
    assert row["ticket_data"]["priority"] == 3
    assert "chatbot_id" not in row["ticket_data"]
    assert (row["chatbot_id"], row["user_id"], row["max_attempts"]) == ("bot-7", "u-42", 3)
    queued = [e for e in logs if e["event"] == "Freshdesk ticket queued successfully"]
    assert [e["queue_id"] for e in queued] == [row["id"]]
    assert EMAIL not in repr(logs)
    assert "on fire" not in repr(logs)


async def test_intake_accepts_json_with_a_charset_parameter(client: Client) -> None:
    """`application/json; charset=utf-8` is JSON too."""
    response = await client.post(
        INTAKE,
        data=json.dumps(TICKET).encode(),
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert response.status == 202


async def test_status_url_reports_the_submission_without_personal_data(client: Client) -> None:
    """The status route shows the row's progress and nothing the requester typed."""
    queued = await (await client.post(INTAKE, json=TICKET)).json()
    response = await client.get(queued["status_url"])
    body = await response.json()
    assert response.status == 200
    assert body["success"] is True
    assert (body["id"], body["queue_id"], body["status"]) == (
        queued["id"],
        queued["queue_id"],
        "pending",
    )
    assert (body["attempts"], body["max_attempts"], body["freshdesk_ticket_id"]) == (0, 3, None)
    assert body["next_attempt_at"] is not None
    assert body["error"] is None
    text = json.dumps(body)
    for personal in (EMAIL, "Printer", "on fire", "bot-7", "u-42"):
        assert personal not in text


@pytest.mark.parametrize(
    "public_id", [str(uuid.uuid4()), "not-a-uuid", "1" * 500, "%00", "00000000-0000"]
)
async def test_status_of_unknown_or_malformed_id_is_404(client: Client, public_id: str) -> None:
    """Unknown and malformed ids both answer a JSON 404, never a 500."""
    response = await client.get(f"/api/freshdesk-queue/tickets/{public_id}")
    body = await response.json()
    assert response.status == 404
    assert body["success"] is False
    assert body["error"]["code"] == "not_found"


async def test_status_of_failed_row_carries_a_short_error(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A failed row shows why, cut short."""
    queued = await (await client.post(INTAKE, json=TICKET)).json()
    await pool.execute(
        "UPDATE freshdesk_ticket_queue SET status = 'failed', error_message = $2, "
        "processed_at = now() WHERE id = $1",
        queued["queue_id"],
        "email: invalid_value (It should be a valid email address) " + "x" * 1000,
    )
    body = await (await client.get(queued["status_url"])).json()
    assert body["status"] == "failed"
    assert body["error"].startswith("email: invalid_value")
    assert len(body["error"]) <= 200
    assert body["next_attempt_at"] is None
    assert body["processed_at"] is not None


async def test_async_false_creates_in_freshdesk_now(
    client: Client, pool: asyncpg.Pool, simulator: RunningSimulator
) -> None:
    """`?async=false` answers 201 with Freshdesk's ticket id, marked, and stores no row."""
    response = await client.post(INTAKE, params={"async": "false"}, json=TICKET)
    body = await response.json()
    assert response.status == 201
    (ticket,) = created(simulator)
    assert body == {
        "success": True,
        "queued": False,
        "ticket_id": ticket["id"],
        "fallback": False,
        "message": "Ticket created in Freshdesk",
    }
    assert ticket["priority"] == 3
    assert any(tag.startswith("fdq-") for tag in ticket["tags"])
    assert await rows(pool) == []


async def test_async_parameter_must_be_a_boolean(client: Client) -> None:
    """An unreadable `?async=` is a 422 naming it, not a guess."""
    response = await client.post(INTAKE, params={"async": "maybe"}, json=TICKET)
    body = await response.json()
    assert response.status == 422
    assert [f["field"] for f in body["error"]["fields"]] == ["async"]


async def test_idempotency_key_repeat_returns_first_answer_and_stores_nothing(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The same Idempotency-Key answers the first row again (202) and adds no row."""
    headers = {"Idempotency-Key": "form-123"}
    first = await client.post(INTAKE, json=TICKET, headers=headers)
    again = await client.post(INTAKE, json={**TICKET, "subject": "other"}, headers=headers)
    one, two = await first.json(), await again.json()
    assert (first.status, again.status) == (202, 202)
    assert (two["queue_id"], two["id"], two["status_url"]) == (
        one["queue_id"],
        one["id"],
        one["status_url"],
    )
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(await rows(pool)) == 1
    other = await client.post(INTAKE, json=TICKET, headers={"Idempotency-Key": "form-124"})
    assert (await other.json())["queue_id"] != one["queue_id"]


async def test_idempotency_key_repeat_on_direct_path_creates_one_ticket(
    client: Client, simulator: RunningSimulator
) -> None:
    """A direct creation repeated with its key answers the first 201 and creates nothing new."""
    headers = {"Idempotency-Key": "direct-1"}
    first = await client.post(INTAKE, params={"async": "false"}, json=TICKET, headers=headers)
    again = await client.post(INTAKE, params={"async": "false"}, json=TICKET, headers=headers)
    assert (first.status, again.status) == (201, 201)
    assert await first.json() == await again.json()
    assert len(created(simulator)) == 1


@pytest.mark.parametrize("key", ["k" * 201, "", "ключ", "tab\tinside"])
async def test_unusable_idempotency_key_is_422_naming_the_header(
    client: Client, pool: asyncpg.Pool, key: str
) -> None:
    """An over-long or non-printable Idempotency-Key is refused by name; nothing is stored."""
    response = await client.post(
        INTAKE, json=TICKET, headers={"Idempotency-Key": key.encode().decode("latin-1")}
    )
    body = await response.json()
    assert response.status == 422
    assert [f["field"] for f in body["error"]["fields"]] == ["Idempotency-Key"]
    assert await rows(pool) == []


async def test_longest_idempotency_key_is_accepted(client: Client) -> None:
    """A key of exactly the bound (200 characters) works."""
    response = await client.post(INTAKE, json=TICKET, headers={"Idempotency-Key": "k" * 200})
    assert response.status == 202


async def test_queue_write_timing_out_is_503_and_never_a_second_copy(
    db_url: str, pool: asyncpg.Pool, simulator: RunningSimulator
) -> None:
    """An INSERT that gets no answer may still commit: 503 asking for a retry, no direct create."""
    settings = api_settings(db_url, simulator.url, db_connect_timeout=0.5)
    async with serving(create_app(settings, pool=pool)) as client, pool.acquire() as locker:
        async with locker.transaction():
            await locker.execute("LOCK TABLE freshdesk_ticket_queue IN ACCESS EXCLUSIVE MODE")
            response = await client.post(INTAKE, json=TICKET, headers={"Idempotency-Key": "k"})
            body = await response.json()
        assert response.status == 503
        assert body["error"]["code"] == "queue_uncertain"
        assert created(simulator) == []
        assert await rows(pool) == []
        retried = await client.post(INTAKE, json=TICKET, headers={"Idempotency-Key": "k"})
        assert retried.status == 202


# --- the body: type, size, syntax ------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
async def test_wrong_content_type_is_415(client: Client, content_type: str) -> None:
    """Only JSON is accepted, with a JSON error naming what to send."""
    response = await client.post(
        INTAKE, data=json.dumps(TICKET), headers={"Content-Type": content_type}
    )
    body = await response.json()
    assert response.status == 415
    assert body["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "raw", [b"{", b"", b"   ", b'{"email": NaN}', b"[" * 100_000, b'{"a": "\xc3\x28"}', b"1e999"]
)
async def test_invalid_json_is_400(client: Client, pool: asyncpg.Pool, raw: bytes) -> None:
    """Broken, empty, NaN, deeply nested or non-UTF-8 bodies are a 400 `invalid_json`."""
    response = await client.post(INTAKE, data=raw, headers={"Content-Type": "application/json"})
    body = await response.json()
    assert response.status == 400
    assert body["error"]["code"] == "invalid_json"
    assert await rows(pool) == []


def body_of_size(size: int) -> bytes:
    """A valid ticket serialised to exactly `size` bytes."""
    base = json.dumps({**TICKET, "description": ""}).encode()
    padded = json.dumps({**TICKET, "description": "x" * (size - len(base))}).encode()
    assert len(padded) == size
    return padded


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 300):
        yield data[start : start + 300]


@pytest.mark.parametrize("chunked", [False, True])
async def test_size_limit_is_exact_at_the_boundary(
    db_url: str, pool: asyncpg.Pool, simulator: RunningSimulator, chunked: bool
) -> None:
    """A body of exactly FDQUEUE_MAX_BODY_BYTES is queued; one byte more is a JSON 413."""
    limit = 2048
    settings = api_settings(db_url, simulator.url, max_body_bytes=limit)
    headers = {"Content-Type": "application/json"}
    async with serving(create_app(settings, pool=pool)) as client:
        for size, expected in ((limit, 202), (limit + 1, 413)):
            data = body_of_size(size)
            payload: Any = _chunks(data) if chunked else data
            response = await client.post(INTAKE, data=payload, headers=headers)
            assert response.status == expected, size
            if expected == 413:
                body = await response.json()
                assert body["error"]["code"] == "body_too_large"
                assert str(limit) in body["error"]["message"]
    assert len(await rows(pool)) == 1


# --- errors the router and the middleware answer -----------------------------------------------


async def test_unknown_route_is_json_404(client: Client) -> None:
    """A path with no route answers JSON, not aiohttp's text page."""
    response = await client.get("/api/nope")
    body = await response.json()
    assert response.status == 404
    assert body["success"] is False
    assert body["error"]["code"] == "not_found"
    assert response.headers["X-Request-Id"] == body["error"]["request_id"]


async def test_wrong_method_is_json_405_with_allow(client: Client) -> None:
    """A known path with the wrong method answers 405 JSON and says what is allowed."""
    response = await client.get(INTAKE)
    body = await response.json()
    assert response.status == 405
    assert body["error"]["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


async def test_unexpected_exception_is_a_bare_500_with_request_id() -> None:
    """A crash answers 500 JSON with a request id and no internals; the traceback is logged."""

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals at /srv/db password=hunter2")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/crash", crash)
    with structlog.testing.capture_logs() as logs:
        async with serving(app) as client:
            response = await client.get("/crash", headers={"X-Request-Id": "req-1"})
            body = await response.json()
    assert response.status == 500
    assert body == {
        "success": False,
        "error": {
            "code": "internal_error",
            "message": "Internal error; quote request id req-1 when reporting it.",
            "request_id": "req-1",
        },
    }
    assert [e["request_id"] for e in logs if e["event"] == "request failed"] == ["req-1"]


# --- the direct path ---------------------------------------------------------------------------


async def test_direct_route_creates_at_once_for_loopback_admin(
    client: Client, simulator: RunningSimulator
) -> None:
    """The admin direct route answers 201 with the ticket id."""
    response = await client.post(DIRECT, json=TICKET)
    body = await response.json()
    assert response.status == 201
    assert body["ticket_id"] == created(simulator)[0]["id"]
    assert body["queued"] is False


async def test_direct_freshdesk_validation_errors_are_422_with_its_fields(
    client: Client, simulator: RunningSimulator
) -> None:
    """Freshdesk's 400 comes back as 422 listing Freshdesk's field errors."""
    ticket = {**TICKET, "type": "Nonsense", "custom_fields": {"cf_unknown": 1}}
    response = await client.post(DIRECT, json=ticket)
    body = await response.json()
    assert response.status == 422
    assert body["error"]["code"] == "freshdesk_validation_error"
    assert {"type", "custom_fields.cf_unknown"} <= {f["field"] for f in body["error"]["fields"]}
    assert created(simulator) == []


async def test_direct_rate_limit_is_503_with_retry_after(
    client: Client, simulator: RunningSimulator
) -> None:
    """Freshdesk's 429 becomes a 503 carrying its Retry-After."""
    simulator.state.faults.load({"script": [{"fault": "429", "retry_after": 17}]})
    response = await client.post(DIRECT, json=TICKET)
    body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "freshdesk_rate_limited"
    assert response.headers["Retry-After"] == "17"


@pytest.mark.parametrize(
    ("fault", "maybe_sent"),
    [({"fault": "503_html"}, True), ({"fault": "reset"}, True), ({"fault": "500_json"}, True)],
)
async def test_direct_outage_is_503(
    client: Client, simulator: RunningSimulator, fault: dict[str, Any], maybe_sent: bool
) -> None:
    """Freshdesk outages answer 503 `freshdesk_unavailable`, warning when it may have created it."""
    simulator.state.faults.load({"script": [fault]})
    response = await client.post(DIRECT, json=TICKET)
    body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "freshdesk_unavailable"
    assert ("may have been created" in body["error"]["message"]) is maybe_sent


async def test_direct_unreachable_freshdesk_is_503(db_url: str, pool: asyncpg.Pool) -> None:
    """Nothing listening at the Freshdesk address: 503, nothing sent."""
    settings = api_settings(db_url, "http://127.0.0.1:9")
    async with serving(create_app(settings, pool=pool)) as client:
        response = await client.post(DIRECT, json=TICKET)
        body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "freshdesk_unavailable"
    assert "may have been created" not in body["error"]["message"]


async def test_direct_with_refused_credentials_names_settings_never_the_key(
    db_url: str, pool: asyncpg.Pool, simulator: RunningSimulator
) -> None:
    """Freshdesk's 401 is a 503 telling the operator what to check, without the key."""
    settings = api_settings(db_url, simulator.url, freshdesk_api_key="wrong-key-s3cr3t")
    with structlog.testing.capture_logs() as logs:
        async with serving(create_app(settings, pool=pool)) as client:
            response = await client.post(DIRECT, json=TICKET)
            body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "freshdesk_credentials"
    assert "FRESHDESK_API_KEY" in body["error"]["message"]
    assert "wrong-key-s3cr3t" not in json.dumps(body) + repr(logs)
    assert any(e["log_level"] == "error" for e in logs)


async def test_without_freshdesk_config_intake_queues_and_direct_is_503(
    db_url: str, pool: asyncpg.Pool
) -> None:
    """No Freshdesk settings: the queue still works, direct creation says what is missing."""
    async with serving(create_app(api_settings(db_url, None), pool=pool)) as client:
        queued = await client.post(INTAKE, json=TICKET)
        direct = await client.post(INTAKE, params={"async": "false"}, json=TICKET)
        process = await client.post(PROCESS)
        body = await direct.json()
    assert queued.status == 202
    assert direct.status == 503
    assert body["error"]["code"] == "freshdesk_not_configured"
    assert process.status == 503


# --- stats and manual processing -----------------------------------------------------------------


async def test_seed_curl_stats_works_on_loopback(client: Client) -> None:
    """`curl http://localhost:3000/api/freshdesk-queue/stats` from the seed: zeros when empty."""
    response = await client.get(STATS)
    body = await response.json()
    assert response.status == 200
    assert body["success"] is True
    assert {k: body["stats"][k] for k in ("pending", "processing", "completed", "failed")} == {
        "pending": 0,
        "processing": 0,
        "completed": 0,
        "failed": 0,
    }
    assert body["stats"]["due"] == 0
    assert body["stats"]["oldest_due_age_seconds"] is None


async def test_process_delivers_due_rows_through_the_worker_code(
    client: Client, pool: asyncpg.Pool, simulator: RunningSimulator
) -> None:
    """Manual processing delivers up to batch_size rows and answers the counts."""
    ids = [(await (await client.post(INTAKE, json=TICKET)).json())["id"] for _ in range(3)]
    with structlog.testing.capture_logs() as logs:
        first = await client.post(PROCESS, params={"batch_size": "2"})
        second = await client.post(PROCESS)
    one, two = await first.json(), await second.json()
    assert (first.status, one["processed"], one["successful"], one["failed"]) == (200, 2, 2, 0)
    assert (two["processed"], two["successful"]) == (1, 1)
    assert len(created(simulator)) == 3
    summaries = [e["event"] for e in logs if e["event"].startswith("Freshdesk queue processing")]
    assert summaries == [
        "Freshdesk queue processing: 2 successful, 0 failed",
        "Freshdesk queue processing: 1 successful, 0 failed",
    ]
    status = await (await client.get(f"/api/freshdesk-queue/tickets/{ids[0]}")).json()
    assert status["status"] == "completed"
    assert status["freshdesk_ticket_id"] in {t["id"] for t in created(simulator)}
    stats = (await (await client.get(STATS)).json())["stats"]
    assert (stats["pending"], stats["completed"]) == (0, 3)


async def test_process_default_batch_is_five(client: Client, pool: asyncpg.Pool) -> None:
    """Without batch_size, one run delivers at most 5 rows."""
    for _ in range(7):
        await client.post(INTAKE, json=TICKET)
    body = await (await client.post(PROCESS)).json()
    assert body["processed"] == 5


async def test_process_records_freshdesk_rejection_as_failed(
    client: Client, pool: asyncpg.Pool, simulator: RunningSimulator
) -> None:
    """A 400 from Freshdesk during manual processing fails the row at once (B17 b)."""
    await client.post(INTAKE, json={**TICKET, "type": "Nonsense"})
    body = await (await client.post(PROCESS)).json()
    assert (body["processed"], body["failed"]) == (1, 1)
    (row,) = await rows(pool)
    assert row["status"] == "failed"


@pytest.mark.parametrize("value", ["0", "101", "abc", "1.5", "-1", "", "99999"])
async def test_process_batch_size_out_of_range_is_422(client: Client, value: str) -> None:
    """batch_size must be an integer from 1 to 100; the 422 names it."""
    response = await client.post(PROCESS, params={"batch_size": value})
    body = await response.json()
    assert response.status == 422
    assert [f["field"] for f in body["error"]["fields"]] == ["batch_size"]


# --- health, readiness, metrics ------------------------------------------------------------------


async def test_health_and_readiness(client: Client) -> None:
    """/healthz and /readyz answer 200 while the process and the database are up."""
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"


async def test_metrics_show_queue_depth_intake_and_latency_by_route(client: Client) -> None:
    """/metrics exposes queue gauges, intake outcomes and latency keyed by route pattern."""
    queued = await (await client.post(INTAKE, json=TICKET)).json()
    await client.get(queued["status_url"])
    await client.post(INTAKE, data=b"{", headers={"Content-Type": "application/json"})
    await client.get(f"/no/such/{queued['id']}")
    response = await client.get("/metrics")
    text = await response.text()
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert 'fdqueue_queue_rows{status="pending"} 1.0' in text
    assert "fdqueue_queue_due_rows 1.0" in text
    assert "fdqueue_queue_stats_up 1.0" in text
    assert 'fdqueue_intake_total{outcome="queued"} 1.0' in text
    assert 'fdqueue_intake_total{outcome="invalid"} 1.0' in text
    assert 'route="/api/freshdesk-queue/tickets/{public_id}"' in text
    assert 'route="unmatched"' in text
    assert queued["id"] not in text


async def test_metrics_queue_gauges_are_read_at_most_once_per_cache_period() -> None:
    """Scrapes within the cache period reuse the last read: no query per scrape."""
    registry = ApiMetrics(cache_seconds=3600)
    reads: list[int] = []

    async def read() -> QueueStats | None:
        reads.append(1)
        return QueueStats(pending=len(reads), due=1, oldest_due_age_seconds=2.5)

    await registry.refresh_queue(read)
    await registry.refresh_queue(read)
    text, content_type = registry.render(None)
    assert len(reads) == 1
    assert content_type.startswith("text/plain")
    assert b'fdqueue_queue_rows{status="pending"} 1.0' in text
    assert b"fdqueue_queue_oldest_due_age_seconds 2.5" in text


async def test_metrics_mark_a_failed_queue_read() -> None:
    """A failed read sets fdqueue_queue_stats_up to 0 and keeps the last gauges."""
    registry = ApiMetrics(cache_seconds=0)

    async def works() -> QueueStats | None:
        return QueueStats(failed=4)

    async def fails() -> QueueStats | None:
        return None

    await registry.refresh_queue(works)
    await registry.refresh_queue(fails)
    text, _ = registry.render("application/openmetrics-text; version=1.0.0")
    assert b"fdqueue_queue_stats_up 0.0" in text
    assert b'fdqueue_queue_rows{status="failed"} 4.0' in text
    assert text.rstrip().endswith(b"# EOF")


def test_two_apps_keep_separate_metrics() -> None:
    """Each app has a private registry, so counting in one never shows in another."""
    one, two = ApiMetrics(), ApiMetrics()
    one.count_intake("queued")
    assert b'fdqueue_intake_total{outcome="queued"} 1.0' in one.render(None)[0]
    assert b'fdqueue_intake_total{outcome="queued"} 0.0' in two.render(None)[0]


# --- admin protection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Basic c2VjcmV0", 401),
        ("Bearer s3cret-token", 200),
        ("bearer s3cret-token", 200),
        ("Bearer s3cret-token-longer", 401),
        ("Bearer sécret", 401),
    ],
)
async def test_admin_token_is_required_when_configured(
    db_url: str,
    pool: asyncpg.Pool,
    simulator: RunningSimulator,
    authorization: str | None,
    expected: int,
) -> None:
    """With FDQUEUE_ADMIN_TOKEN set, admin routes need the bearer token, even on loopback."""
    settings = api_settings(db_url, simulator.url, admin_token="s3cret-token")
    headers = {} if authorization is None else {"Authorization": authorization}
    async with serving(create_app(settings, pool=pool)) as client:
        response = await client.get(STATS, headers=headers)
        body = await response.json()
        public = await client.get("/healthz")
    assert response.status == expected
    assert public.status == 200
    if expected == 401:
        assert body["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "s3cret-token" not in json.dumps(body)


@pytest.mark.parametrize("route", [("GET", STATS), ("POST", PROCESS), ("POST", DIRECT)])
async def test_every_admin_route_refuses_proxied_clients_without_a_token(
    client: Client, route: tuple[str, str]
) -> None:
    """Behind a local reverse proxy every client looks local: forwarded requests get 403."""
    method, path = route
    response = await client.request(
        method, path, json=TICKET, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    body = await response.json()
    assert response.status == 403
    assert body["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    ("remote", "token", "authorization", "expected"),
    [
        ("127.0.0.1", None, None, None),
        ("127.8.9.10", None, None, None),
        ("::1", None, None, None),
        ("::ffff:127.0.0.1", None, None, None),
        ("203.0.113.9", None, None, 403),
        ("10.0.0.2", None, None, 403),
        ("::ffff:10.0.0.2", None, None, 403),
        (None, None, None, 403),
        ("203.0.113.9", "tok", "Bearer tok", None),
        ("203.0.113.9", "tok", "Bearer nope", 401),
        ("127.0.0.1", "tok", None, 401),
    ],
)
async def test_admin_rule_for_remote_addresses(
    remote: str | None, token: str | None, authorization: str | None, expected: int | None
) -> None:
    """Without a token only loopback clients pass; with one, only its bearer, from anywhere."""
    headers = {} if authorization is None else {"Authorization": authorization}
    request = make_mocked_request("GET", STATS, headers=headers)
    if remote is not None:
        request = request.clone(remote=remote)
    denial = admin_denial(request, token)
    assert (None if denial is None else denial.status) == expected


def test_loopback_detection() -> None:
    """127.0.0.0/8 and ::1 are loopback, other and malformed addresses are not."""
    assert all(is_loopback(a) for a in ("127.0.0.1", "127.255.0.1", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(a) for a in ("192.168.1.1", "fe80::1%lo", "nonsense", "", None))


# --- CORS ---------------------------------------------------------------------------------------


@pytest.fixture
async def cors_client(
    db_url: str, pool: asyncpg.Pool, simulator: RunningSimulator
) -> AsyncIterator[Client]:
    settings = api_settings(db_url, simulator.url, cors_origins=["https://app.example"])
    async with serving(create_app(settings, pool=pool)) as test_client:
        yield test_client


async def test_cors_preflight_allows_the_configured_origin(cors_client: Client) -> None:
    """A preflight from a configured origin allows POST with Content-Type and Idempotency-Key."""
    response = await cors_client.options(
        INTAKE,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, idempotency-key",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "content-type" in allowed
    assert "idempotency-key" in allowed
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.headers.getall("Vary")


async def test_cors_preflight_refuses_other_origins(cors_client: Client) -> None:
    """A preflight from an unlisted origin gets no CORS grant."""
    response = await cors_client.options(
        INTAKE,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_headers_on_answers_and_errors(cors_client: Client) -> None:
    """Real requests from the origin get the grant, on a 202 and on a 422 alike."""
    origin = {"Origin": "https://app.example"}
    ok = await cors_client.post(INTAKE, json=TICKET, headers=origin)
    bad = await cors_client.post(INTAKE, json={}, headers=origin)
    assert (ok.status, bad.status) == (202, 422)
    for response in (ok, bad):
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Location" in response.headers["Access-Control-Expose-Headers"]


async def test_cors_answers_vary_by_origin_even_without_one(cors_client: Client) -> None:
    """Responses to requests without Origin still say they vary by it, for shared caches."""
    response = await cors_client.get("/healthz")
    assert "Origin" in response.headers.getall("Vary")
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_admin_head_request_is_guarded_like_get(client: Client) -> None:
    """HEAD on an admin route meets the same rule as GET (here: a proxied client)."""
    response = await client.head(STATS, headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status == 403


async def test_cors_wildcard_never_comes_with_credentials(
    db_url: str, pool: asyncpg.Pool, simulator: RunningSimulator
) -> None:
    """`*` allows any origin, and credentials are never allowed with it."""
    settings = api_settings(db_url, simulator.url, cors_origins=["*"])
    async with serving(create_app(settings, pool=pool)) as client:
        response = await client.options(
            INTAKE, headers={"Origin": "https://x.example", "Access-Control-Request-Method": "POST"}
        )
        unknown = await client.options(
            "/nope", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "GET"}
        )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert unknown.status == 404


# --- the database goes away ---------------------------------------------------------------


async def _migrated(server: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(server.url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


async def test_database_down_at_start_falls_back_and_recovers(
    embedded_pg: EmbeddedPostgres, simulator: RunningSimulator
) -> None:
    """Started without a database, the API serves, falls back to direct creation, then queues."""
    await _migrated(embedded_pg)
    await asyncio.to_thread(embedded_pg.stop)
    settings = api_settings(embedded_pg.url, simulator.url, db_connect_timeout=2.0)
    async with serving(create_app(settings)) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503
        stats = await client.get(STATS)
        assert (stats.status, (await stats.json())["error"]["code"]) == (
            503,
            "database_unavailable",
        )
        fallback = await client.post(INTAKE, json=TICKET)
        body = await fallback.json()
        assert fallback.status == 201
        assert (body["fallback"], body["queued"]) == (True, False)
        assert body["ticket_id"] == created(simulator)[0]["id"]

        simulator.state.faults.load({"down": True})
        both_down = await client.post(INTAKE, json=TICKET)
        assert both_down.status == 503
        assert (await both_down.json())["error"]["code"] == "unavailable"
        simulator.state.faults.clear()

        await asyncio.to_thread(embedded_pg.start)
        await wait_until(lambda: _ready(client))
        queued = await client.post(INTAKE, json=TICKET)
        assert queued.status == 202
    conn = await asyncpg.connect(embedded_pg.url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM freshdesk_ticket_queue") == 1
    finally:
        await conn.close()


async def test_no_202_without_a_committed_row_when_the_database_stops(
    embedded_pg: EmbeddedPostgres, simulator: RunningSimulator
) -> None:
    """Stopping the database between and during requests: every 202 names a stored row."""
    await _migrated(embedded_pg)
    settings = api_settings(embedded_pg.url, simulator.url, db_connect_timeout=2.0)
    answers: list[tuple[int, dict[str, Any]]] = []

    async def submit(client: Client, n: int) -> None:
        ticket = {**TICKET, "subject": f"ticket {n}"}
        response = await client.post(INTAKE, json=ticket)
        answers.append((response.status, await response.json()))

    async with serving(create_app(settings)) as client:
        await wait_until(lambda: _ready(client))
        for n in range(5):
            await submit(client, n)
        stopping = asyncio.create_task(asyncio.to_thread(embedded_pg.stop))
        n = 5
        while not stopping.done():
            await asyncio.gather(*(submit(client, n + i) for i in range(4)))
            n += 4
        await stopping
        for later in range(n, n + 5):
            await submit(client, later)
        await asyncio.to_thread(embedded_pg.start)
        await wait_until(lambda: _ready(client))
        await submit(client, 999)

    statuses = [status for status, _ in answers]
    assert set(statuses) <= {201, 202, 503}, statuses
    assert statuses[:5] == [202] * 5
    assert statuses[-1] == 202
    assert 201 in statuses
    conn = await asyncpg.connect(embedded_pg.url)
    try:
        stored = {
            (row["id"], str(row["public_id"]))
            for row in await conn.fetch("SELECT id, public_id FROM freshdesk_ticket_queue")
        }
    finally:
        await conn.close()
    accepted = {(body["queue_id"], body["id"]) for status, body in answers if status == 202}
    assert accepted <= stored
    fallbacks = [body for status, body in answers if status == 201]
    assert all(body["fallback"] for body in fallbacks)
    assert len(created(simulator)) == len(fallbacks)


# --- state of the module ------------------------------------------------------------------


def test_admin_routes_are_registered_names() -> None:
    """Every name in ADMIN_ROUTES is a route of the app, so none goes unguarded by a typo."""
    app = create_app(api_settings("postgresql://u@127.0.0.1:9/x", None))
    names = {route.name for route in app.router.routes() if route.name}
    assert names >= api.ADMIN_ROUTES


async def test_bad_request_never_reaches_freshdesk(
    client: Client, simulator: RunningSimulator
) -> None:
    """A refused body is never sent anywhere, even with ?async=false."""
    response = await client.post(INTAKE, params={"async": "false"}, json={"subject": "x"})
    assert response.status == 422
    assert len(simulator.state.requests) == 0


# --- the server process: readiness, socket activation, graceful stop --------------------------

_SERVE = (
    "import asyncio, os, sys\n"
    "fd = int(os.environ.pop('TEST_LISTEN_FD', '-1'))\n"
    "if fd >= 0:\n"  # what systemd does before exec: the socket at fd 3, LISTEN_* for our pid
    "    os.dup2(fd, 3)\n"
    "    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
    "from fdqueue.api import serve_api\n"
    "from fdqueue.config import load_settings\n"
    "sys.exit(asyncio.run(serve_api(load_settings())))\n"
)


class Notifications:
    """A fake `$NOTIFY_SOCKET`: collects the datagrams the service sends to systemd."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.seen: list[str] = []

    async def wait_for(self, state: str) -> None:
        """Read datagrams until one carries `state` (e.g. READY=1); fail after a minute."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(60.0):
            while not any(state in message.split("\n") for message in self.seen):
                self.seen.append((await loop.sock_recv(self.sock, 4096)).decode())

    def close(self) -> None:
        self.sock.close()


class SlowFreshdesk:
    """A Freshdesk stand-in whose create waits until the test releases it."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/api/v2/tickets", self.create)

    async def create(self, request: web.Request) -> web.Response:
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"id": 4711}, status=201)


@asynccontextmanager
async def api_process(
    db_url: str, freshdesk_url: str, tmp: Any, listen_fd: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Notifications, int]]:
    """`fdqueue api`'s serve_api in a child process with a fake NOTIFY_SOCKET."""
    notify = Notifications(str(tmp / "notify.sock"))
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "FDQUEUE_FRESHDESK_BASE_URL": freshdesk_url,
        "FRESHDESK_API_KEY": API_KEY,
        "FDQUEUE_HOST": "127.0.0.1",
        "FDQUEUE_PORT": str(port),
        "FDQUEUE_SHUTDOWN_GRACE": "30",
        "FDQUEUE_ADMIN_TOKEN": "",
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "2000000",
    }
    env.pop("WATCHDOG_PID", None)
    if listen_fd is not None:
        env["TEST_LISTEN_FD"] = str(listen_fd)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVE,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        pass_fds=() if listen_fd is None else (listen_fd,),
    )
    try:
        yield process, notify, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        notify.close()


async def test_serve_api_ready_after_bind_and_stops_gracefully_with_exit_0(
    db_url: str, tmp_path: Any
) -> None:
    """READY=1 once the port answers; SIGTERM lets the in-flight request finish, then exit 0."""
    fake = SlowFreshdesk()
    async with (
        serving(fake.app) as freshdesk,
        api_process(db_url, str(freshdesk.make_url("")).rstrip("/"), tmp_path) as (
            process,
            notify,
            port,
        ),
        aiohttp.ClientSession() as http,
    ):
        await notify.wait_for("READY=1")
        base = f"http://127.0.0.1:{port}"
        async with http.get(f"{base}/healthz") as health:
            assert health.status == 200
        await notify.wait_for("WATCHDOG=1")
        in_flight = asyncio.create_task(
            http.post(f"{base}{INTAKE}", params={"async": "false"}, json=TICKET)
        )
        await fake.arrived.wait()
        process.send_signal(signal.SIGTERM)
        await notify.wait_for("STOPPING=1")
        fake.release.set()
        response = await in_flight
        assert response.status == 201
        assert (await response.json())["ticket_id"] == 4711
        response.release()
        assert await asyncio.wait_for(process.wait(), 60) == 0


async def test_serve_api_uses_the_socket_systemd_passes(db_url: str, tmp_path: Any) -> None:
    """With LISTEN_PID/LISTEN_FDS set, the API serves on fd 3 instead of binding its own port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    try:
        async with (
            api_process(db_url, "http://127.0.0.1:9", tmp_path, listener.fileno()) as (
                process,
                notify,
                own_port,
            ),
            aiohttp.ClientSession() as http,
        ):
            listener.close()
            await notify.wait_for("READY=1")
            async with http.get(f"http://127.0.0.1:{port}/healthz") as health:
                assert health.status == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(f"http://127.0.0.1:{own_port}/healthz")
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        listener.close()
