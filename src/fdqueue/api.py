"""The HTTP API of `fdqueue api`: app factory, routes, handlers, middlewares and the server."""

from __future__ import annotations

import asyncio
import faulthandler
import hmac
import ipaddress
import json
import math
import os
import re
import signal
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeVar

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from fdqueue import sdnotify, store
from fdqueue.config import ConfigError, Settings
from fdqueue.delivery import Deliverer, process_batch
from fdqueue.freshdesk import FreshdeskClient, marker_for
from fdqueue.intake import GroupCommitter, QueueUnavailable, QueueUncertain, pool_writer
from fdqueue.metrics import UNMATCHED, ApiMetrics
from fdqueue.models import (
    AccountProblem,
    Delivered,
    FreshdeskReply,
    Outcome,
    QueueStats,
    RateLimited,
    Rejected,
    SendResult,
    TicketIn,
    Transient,
)
from fdqueue.openapi import (
    DEFAULT_BATCH_SIZE,
    IDEMPOTENCY_KEY_CHARS,
    MAX_BATCH_SIZE,
    openapi_document,
)
from fdqueue.policy import classify
from fdqueue.validation import BodyError, TicketInvalid, clip, parse_json, validate_ticket
from fdqueue.worker import build_deliverer

log = structlog.get_logger("fdqueue.api")

T = TypeVar("T")

# Everything that means "PostgreSQL did not do it": refused, reset, timed out, shutting down,
# or a connection left broken by a server that went away mid-operation (InternalClientError:
# "cannot switch to state ...", raised before anything is sent).
DATABASE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
STATUS_PATH: Final = "/api/freshdesk-queue/tickets/"
ADMIN_ROUTES: Final = frozenset({"create_ticket_direct", "queue_stats", "queue_process"})
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Printable ASCII, no leading or trailing blank: safe in a text column, a log line and a header.
_IDEMPOTENCY_KEY: Final = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BATCH_SIZE: Final = re.compile(r"^[0-9]{1,4}$")
_FORWARDING_HEADERS: Final = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
_CORS_ALLOW_HEADERS: Final = "Content-Type, Idempotency-Key, Authorization, X-Request-Id"
_CORS_EXPOSE_HEADERS: Final = "Location, Retry-After, X-Request-Id, Idempotent-Replayed"
_ERROR_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}
SD_LISTEN_FDS_START: Final = 3  # sd_listen_fds(3): the first passed socket is fd 3


# --- errors --------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than success; the error middleware renders it as DESIGN §5's JSON."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        fields: Iterable[Mapping[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = [dict(item) for item in fields]
        self.headers = dict(headers or {})

    def response(self, request_id: str | None = None) -> web.Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            error["fields"] = self.fields
        if request_id is not None:
            error["request_id"] = request_id
        return web.json_response(
            {"success": False, "error": error}, status=self.status, headers=self.headers
        )


class DatabaseDown(Exception):
    """The pool is not open (yet): PostgreSQL was unreachable since start-up."""


def _database_unavailable() -> ApiError:
    return ApiError(503, "database_unavailable", "The database is unreachable; try again shortly.")


# --- the database, opened in the background -------------------------------------------------

PoolOpener = Callable[[], Awaitable[asyncpg.Pool]]


class Database:
    """The API's pool. Opening it never blocks start-up: while PostgreSQL is down the API
    serves (intake falls back to direct creation, /readyz says 503) and keeps retrying.

    Once open, asyncpg replaces broken connections by itself, so a database restart costs
    the requests that were using the old connections, nothing more.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool | None = None,
        opener: PoolOpener | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self._pool = pool
        self._opener = opener
        self._owns_pool = pool is None
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None

    def get(self) -> asyncpg.Pool:
        """The open pool; raises DatabaseDown while it could not be opened."""
        if self._pool is None:
            raise DatabaseDown("the database connection is not open")
        return self._pool

    def start(self) -> None:
        """Begin opening the pool in the background (no-op when a pool was given)."""
        if self._pool is None and self._opener is not None and self._task is None:
            self._task = asyncio.create_task(self._open_until_done())

    async def close(self) -> None:
        """Stop opening, and close the pool if this object opened it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._owns_pool and self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=10.0)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    async def _open_until_done(self) -> None:
        assert self._opener is not None
        failures = 0
        while True:
            try:
                self._pool = await self._opener()
            except DATABASE_ERRORS as exc:
                failures += 1
                delay = min(self._max_backoff, 0.25 * 2**failures)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "database unreachable; intake creates tickets directly meanwhile",
                        error=f"{type(exc).__name__}: {exc}",
                        failures=failures,
                        retry_in_seconds=delay,
                    )
                await asyncio.sleep(delay)
            else:
                log.info("database connected", after_failures=failures)
                return


# --- what the app holds ----------------------------------------------------------------------


class RecentAnswers:
    """Direct-path answers by Idempotency-Key, for repeats: no row exists to hold them.

    Kept in this process's memory only (bounded, oldest dropped first), so it covers the
    usual case of a client retrying while the database is still down.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def get(self, key: str | None) -> dict[str, Any] | None:
        return None if key is None else self._items.get(key)

    def put(self, key: str | None, answer: dict[str, Any]) -> None:
        if key is None:
            return
        self._items[key] = answer
        while len(self._items) > self._size:
            self._items.popitem(last=False)


@dataclass(slots=True)
class Backend:
    """The API's connections: the database, Freshdesk (None when not configured), delivery."""

    settings: Settings
    database: Database
    client: FreshdeskClient | None
    owns_client: bool
    answers: RecentAnswers = field(default_factory=RecentAnswers)
    _deliverer: Deliverer | None = None
    _committer: GroupCommitter | None = None

    def freshdesk(self) -> FreshdeskClient:
        """The client, or a 503 naming the missing configuration."""
        if self.client is None:
            raise ApiError(
                503,
                "freshdesk_not_configured",
                "Freshdesk is not configured on this server (FRESHDESK_DOMAIN, FRESHDESK_API_KEY).",
            )
        return self.client

    def pool(self) -> asyncpg.Pool:
        """The open pool, or a 503."""
        try:
            return self.database.get()
        except DatabaseDown:
            raise _database_unavailable() from None

    def committer(self) -> GroupCommitter:
        """Group commit for intake on the open pool (raises DatabaseDown while it is not)."""
        if self._committer is None:
            pool = self.database.get()
            timeout = self.settings.db_connect_timeout
            self._committer = GroupCommitter(pool_writer(pool, timeout))
        return self._committer

    def deliverer(self) -> Deliverer:
        """The worker's delivery machinery, built once and shared by every manual run."""
        client = self.freshdesk()
        pool = self.pool()
        if self._deliverer is None:
            self._deliverer = build_deliverer(self.settings, pool, client)
        return self._deliverer

    async def query(self, run: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        """`run(pool)` under the database timeout; any database failure becomes a 503."""
        pool = self.pool()
        try:
            async with asyncio.timeout(self.settings.db_connect_timeout):
                return await run(pool)
        except DATABASE_ERRORS as exc:
            log.warning("database query failed", error=f"{type(exc).__name__}: {exc}")
            raise _database_unavailable() from exc

    async def close(self) -> None:
        await self.database.close()
        if self.owns_client and self.client is not None:
            await self.client.close()


SETTINGS: Final = web.AppKey("settings", Settings)
BACKEND: Final = web.AppKey("backend", Backend)
METRICS: Final = web.AppKey("metrics", ApiMetrics)
OPENAPI: Final = web.AppKey("openapi", bytes)


# --- middlewares ---------------------------------------------------------------------------


def route_label(request: web.Request) -> str:
    """The route pattern that served `request` (`/api/.../tickets/{public_id}`), never its path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request into the latency histogram, keyed by route pattern."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        method = request.method if request.method in _KNOWN_METHODS else "other"
        request.app[METRICS].observe_request(
            method, route_label(request), status, time.perf_counter() - started
        )


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as JSON with a request id; an unexpected exception as a bare 500."""
    request_id = _request_id(request)
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            response = await handler(request)
        except ApiError as exc:
            response = exc.response(request_id)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _http_error(exc, request).response(request_id)
        except Exception:  # logged with its traceback; the client learns nothing internal
            log.exception(
                "request failed",
                request_id=request_id,
                method=request.method,
                route=route_label(request),
            )
            response = ApiError(
                500,
                "internal_error",
                f"Internal error; quote request id {request_id} when reporting it.",
            ).response(request_id)
    response.headers["X-Request-Id"] = request_id
    return response


def _http_error(exc: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own refusals (no route, wrong method, body too large) as ApiErrors."""
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    if isinstance(exc, web.HTTPNotFound):
        message = f"No route {request.method} {clip(request.path, 200)}."
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{clip(request.method, 20)} is not allowed here; use {allowed}."
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large(request.app[SETTINGS].max_body_bytes)
    else:
        message = exc.reason
    return ApiError(
        exc.status, _ERROR_CODES.get(exc.status, f"http_{exc.status}"), message, headers=headers
    )


def is_loopback(remote: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1 (also written as an IPv4-mapped IPv6 address)."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def admin_denial(request: web.Request, token: str | None) -> ApiError | None:
    """Why `request` may not use an admin route, or None when it may.

    With a token configured: `Authorization: Bearer <token>`, compared in constant time.
    Without one: loopback clients only, and not through a proxy, since a reverse proxy on
    the same host makes every client look local (its forwarding headers give it away).
    """
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
        ):
            return None
        return ApiError(
            401,
            "unauthorized",
            "This admin route needs Authorization: Bearer <FDQUEUE_ADMIN_TOKEN>.",
            headers={"WWW-Authenticate": 'Bearer realm="fdqueue"'},
        )
    proxied = any(name in request.headers for name in _FORWARDING_HEADERS)
    if is_loopback(request.remote) and not proxied:
        return None
    return ApiError(
        403,
        "forbidden",
        "Admin routes answer loopback clients only unless FDQUEUE_ADMIN_TOKEN is set.",
    )


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard the admin routes (ADMIN_ROUTES) with `admin_denial`."""
    if request.match_info.route.name in ADMIN_ROUTES:
        secret = request.app[SETTINGS].admin_token
        denial = admin_denial(request, None if secret is None else secret.get_secret_value())
        if denial is not None:
            raise denial
    return await handler(request)


def cors_middleware(origins: Iterable[str]) -> Middleware:
    """CORS for the configured origins (`*` allows any), preflight included.

    Credentials are never allowed, so `*` cannot leak a logged-in user's data; the admin
    token travels in a header a browser only sends when the page's script adds it.
    """
    allowed = frozenset(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allowed:
            return await handler(request)
        allow = _granted_origin(request.headers.get("Origin"), allowed)
        if _is_preflight(request):
            response: web.StreamResponse = _preflight(allow)
        else:
            response = await handler(request)
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE_HEADERS
        # Answers differ by Origin, so a shared cache must keep them apart, even the
        # answer to a request that sent none.
        response.headers.add("Vary", "Origin")
        return response

    return cors


def _granted_origin(origin: str | None, allowed: frozenset[str]) -> str | None:
    """The Access-Control-Allow-Origin value for `origin`, or None when it is not allowed."""
    if origin is None:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


def _is_preflight(request: web.Request) -> bool:
    """An OPTIONS preflight for a path that exists (unknown paths still answer 404)."""
    headers = request.headers
    if request.method != "OPTIONS" or "Origin" not in headers:
        return False
    if "Access-Control-Request-Method" not in headers:
        return False
    refused = getattr(request.match_info, "http_exception", None)
    return not isinstance(refused, web.HTTPNotFound)


def _preflight(allow: str | None) -> web.Response:
    if allow is None:
        return ApiError(
            403, "cors_origin_not_allowed", "This origin may not call the API."
        ).response()
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )


# --- reading the request -------------------------------------------------------------------


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"The body is larger than {limit} bytes (FDQUEUE_MAX_BODY_BYTES)."
    )


async def read_ticket(request: web.Request) -> TicketIn:
    """The body as a validated ticket; 413, 415, 400 or 422 otherwise.

    The size limit is exact: a body of `max_body_bytes` is read, one byte more is refused,
    whether announced by Content-Length or streamed in chunks (aiohttp's client_max_size).
    """
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the ticket as JSON (Content-Type: application/json).",
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except ConnectionError:  # the client hung up mid-body: its fault, and nothing was stored
        raise ApiError(
            400, "incomplete_body", "The connection closed before the body was complete."
        ) from None
    try:
        return validate_ticket(parse_json(raw))
    except BodyError as exc:
        raise ApiError(400, "invalid_json", exc.message) from None
    except TicketInvalid as exc:
        count = len(exc.problems)
        raise ApiError(
            422,
            "validation_error",
            f"{count} field{'s are' if count > 1 else ' is'} invalid.",
            fields=[problem.as_dict() for problem in exc.problems],
        ) from None


def idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header, or None; 422 naming the header when it is unusable."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if len(key) > IDEMPOTENCY_KEY_CHARS or not _IDEMPOTENCY_KEY.match(key):
        raise ApiError(
            422,
            "validation_error",
            "The Idempotency-Key header is unusable.",
            fields=[
                {
                    "field": "Idempotency-Key",
                    "message": f"must be 1 to {IDEMPOTENCY_KEY_CHARS} printable ASCII characters",
                }
            ],
        )
    return key


def _wants_direct(request: web.Request) -> bool:
    value = request.query.get("async", "true").strip().lower()
    if value in ("true", "1", "yes", ""):
        return False
    if value in ("false", "0", "no"):
        return True
    raise ApiError(
        422,
        "validation_error",
        "The async query parameter is invalid.",
        fields=[{"field": "async", "message": "must be true or false"}],
    )


def batch_size(request: web.Request) -> int:
    """`?batch_size=`: 1 to MAX_BATCH_SIZE, DEFAULT_BATCH_SIZE when absent; else 422."""
    text = request.query.get("batch_size")
    if text is None:
        return DEFAULT_BATCH_SIZE
    if _BATCH_SIZE.match(text.strip()) and 1 <= int(text) <= MAX_BATCH_SIZE:
        return int(text)
    raise ApiError(
        422,
        "validation_error",
        "The batch_size query parameter is invalid.",
        fields=[
            {"field": "batch_size", "message": f"must be an integer from 1 to {MAX_BATCH_SIZE}"}
        ],
    )


# --- the direct path -----------------------------------------------------------------------


async def create_directly(backend: Backend, ticket: TicketIn, *, fallback: bool) -> dict[str, Any]:
    """Create the ticket in Freshdesk now; the 201 body, or an ApiError saying why not.

    The ticket carries a marker of its own (a fresh uuid), like a queued one, so an
    operator can tell it apart. Freshdesk's validation errors become a 422 with its
    fields; a rate limit or outage a 503 with Retry-After where known; refused
    credentials a 503 that names the settings to check (never their values).
    """
    settings = backend.settings
    result = await backend.freshdesk().create_ticket(
        ticket.ticket_data(),
        marker_for(uuid.uuid4()),
        marker_field=settings.freshdesk_marker_field,
        default_tags=tuple(settings.default_tags),
    )
    if isinstance(result, FreshdeskReply) and 200 <= result.status < 300:
        log.info("Freshdesk ticket created directly", ticket_id=result.ticket_id, fallback=fallback)
        return {
            "success": True,
            "queued": False,
            "ticket_id": result.ticket_id,
            "fallback": fallback,
            "message": "Ticket created in Freshdesk"
            + (" (the queue was unavailable)" if fallback else ""),
        }
    outcome = classify(result, default_retry_after=settings.rate_limit_default_wait)
    _log_direct_failure(outcome, result)
    raise direct_error(outcome, result)


def direct_error(outcome: Outcome, result: SendResult) -> ApiError:
    """The answer for a direct create that Freshdesk did not accept."""
    match outcome:
        case Rejected(status=400):
            errors = result.errors if isinstance(result, FreshdeskReply) else ()
            return ApiError(
                422,
                "freshdesk_validation_error",
                "Freshdesk refused the ticket's fields.",
                fields=[
                    {"field": e.field or "body", "message": f"{e.message} ({e.code})"}
                    for e in errors
                ],
            )
        case Rejected(status=status):
            return ApiError(
                502, "freshdesk_rejected", f"Freshdesk refused the ticket (HTTP {status})."
            )
        case AccountProblem(status=status):
            return ApiError(
                503,
                "freshdesk_credentials",
                f"Freshdesk refused this server's credentials (HTTP {status}): an operator must "
                "check FRESHDESK_API_KEY, the agent's role and FRESHDESK_DOMAIN.",
            )
        case RateLimited(retry_after=wait):
            return ApiError(
                503,
                "freshdesk_rate_limited",
                "Freshdesk's rate limit is reached; try again later.",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        case Transient() | Delivered():
            return _unavailable(outcome, result)
    raise AssertionError(f"unhandled outcome {outcome!r}")  # pragma: no cover


def _unavailable(outcome: Transient | Delivered, result: SendResult) -> ApiError:
    maybe = isinstance(outcome, Transient) and outcome.maybe_sent
    message = "Freshdesk did not answer in time" if maybe else "Freshdesk is unreachable"
    if maybe:
        message += "; the ticket may have been created, so check before sending it again"
    wait = result.retry_after if isinstance(result, FreshdeskReply) else None
    headers = {"Retry-After": str(math.ceil(wait))} if wait is not None else {}
    return ApiError(503, "freshdesk_unavailable", message + ".", headers=headers)


def _log_direct_failure(outcome: Outcome, result: SendResult) -> None:
    status = result.status if isinstance(result, FreshdeskReply) else None
    reason = getattr(outcome, "reason", "")
    if isinstance(outcome, AccountProblem):
        log.error(
            "Freshdesk refused the account: check FRESHDESK_API_KEY (401), the agent's role "
            "(403) or FRESHDESK_DOMAIN (404)",
            category="FRESHDESK_ERROR",
            http_status=status,
            error=reason,
        )
        return
    log.warning(
        "direct Freshdesk create failed",
        category="FRESHDESK_ERROR",
        http_status=status,
        error=reason,
    )


# --- the queue -----------------------------------------------------------------------------


async def enqueue(backend: Backend, ticket: TicketIn, key: str | None) -> store.Enqueued:
    """Write the row (committed on return), or say whether it certainly was not written.

    Concurrent submissions share one INSERT and one commit (intake.GroupCommitter).
    QueueUnavailable: no connection, or the statement failed: nothing was stored.
    QueueUncertain: the statement was sent and no answer came: it may yet commit, so the
    caller must not create the ticket a second way.
    """
    try:
        committer = backend.committer()
    except DatabaseDown as exc:
        raise QueueUnavailable(str(exc)) from exc
    submission = store.NewTicket(
        ticket.ticket_data(),
        backend.settings.max_attempts,
        chatbot_id=ticket.chatbot_id,
        user_id=ticket.user_id,
        idempotency_key=key,
    )
    try:
        async with asyncio.timeout(backend.settings.db_connect_timeout):
            return await committer.submit(submission)
    except TimeoutError as exc:
        raise QueueUncertain("the database did not answer in time") from exc
    except asyncpg.DataError as exc:  # refused by the server: rolled back, nothing stored
        raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc


def queued_answer(row: store.Enqueued) -> web.Response:
    """202 for a committed row, with the status URL in the body and in Location."""
    status_url = f"{STATUS_PATH}{row.public_id}"
    body = {
        "success": True,
        "queued": True,
        "queue_id": row.id,
        "id": str(row.public_id),
        "status": row.status,
        "status_url": status_url,
        "message": "Ticket queued for delivery to Freshdesk",
    }
    headers = {"Location": status_url}
    if not row.created:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(body, status=202, headers=headers)


def _created_answer(body: dict[str, Any], *, replayed: bool = False) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return web.json_response(body, status=201, headers=headers)


# --- handlers ------------------------------------------------------------------------------

IntakeAnswer = tuple[web.Response, str]


async def _counted(
    request: web.Request, intake: Callable[[], Awaitable[IntakeAnswer]]
) -> web.Response:
    """Run an intake and count its outcome (metrics.INTAKE_OUTCOMES), refusals included."""
    metrics = request.app[METRICS]
    try:
        response, outcome = await intake()
    except ApiError as exc:
        if exc.status >= 500 and exc.code != "freshdesk_rejected":
            metrics.count_intake("unavailable")
        elif exc.code.startswith("freshdesk_"):
            metrics.count_intake("freshdesk_rejected")
        else:
            metrics.count_intake("invalid")
        raise
    metrics.count_intake(outcome)
    return response


async def create_ticket(request: web.Request) -> web.Response:
    """POST /api/create-freshdesk-ticket: queue (202), `?async=false` direct (201), fallback."""
    return await _counted(request, lambda: _intake(request))


async def _intake(request: web.Request) -> IntakeAnswer:
    backend = request.app[BACKEND]
    ticket = await read_ticket(request)
    key = idempotency_key(request)
    direct = _wants_direct(request)
    earlier = backend.answers.get(key)
    if earlier is not None:
        return _created_answer(earlier, replayed=True), "duplicate"
    if direct:
        return await _direct(backend, ticket, key, fallback=False), "direct"
    try:
        row = await enqueue(backend, ticket, key)
    except QueueUnavailable as exc:
        log.warning("queue unavailable; creating the ticket directly", error=str(exc))
        return await _fallback(backend, ticket, key), "fallback"
    except QueueUncertain as exc:
        log.error("queue write unconfirmed", error=str(exc))
        raise ApiError(
            503,
            "queue_uncertain",
            "The queue did not confirm the ticket in time; send it again with the same "
            "Idempotency-Key.",
        ) from exc
    log.info(
        "Freshdesk ticket queued successfully",
        queue_id=row.id,
        public_id=str(row.public_id),
        duplicate=not row.created,
    )
    return queued_answer(row), "queued" if row.created else "duplicate"


async def _direct(
    backend: Backend, ticket: TicketIn, key: str | None, *, fallback: bool
) -> web.Response:
    body = await create_directly(backend, ticket, fallback=fallback)
    backend.answers.put(key, body)
    return _created_answer(body)


async def _fallback(backend: Backend, ticket: TicketIn, key: str | None) -> web.Response:
    """The queue is down: create directly; when that fails too, a 503 saying both."""
    try:
        return await _direct(backend, ticket, key, fallback=True)
    except ApiError as exc:
        if exc.status == 422:  # Freshdesk's verdict on the fields holds whatever the queue does
            raise
        raise ApiError(
            503,
            "unavailable",
            f"The queue is unavailable and Freshdesk could not take the ticket either: "
            f"{exc.message} Try again later.",
            headers=exc.headers,
        ) from exc


async def create_ticket_direct(request: web.Request) -> web.Response:
    """POST /api/create-freshdesk-ticket-direct (admin): create in Freshdesk now, 201."""

    async def intake() -> IntakeAnswer:
        backend = request.app[BACKEND]
        ticket = await read_ticket(request)
        key = idempotency_key(request)
        earlier = backend.answers.get(key)
        if earlier is not None:
            return _created_answer(earlier, replayed=True), "duplicate"
        return await _direct(backend, ticket, key, fallback=False), "direct"

    return await _counted(request, intake)


async def queue_stats(request: web.Request) -> web.Response:
    """GET /api/freshdesk-queue/stats (admin): counts by status, zeros included, plus extras."""
    stats = await request.app[BACKEND].query(store.stats)
    return web.json_response({"success": True, "stats": stats.as_dict()})


async def process_queue(request: web.Request) -> web.Response:
    """POST /api/freshdesk-queue/process?batch_size=N (admin): deliver up to N due rows now.

    The same delivery code as the worker, under a claim token of this call's own; claims
    skip rows others hold, so running it beside workers is safe.
    """
    size = batch_size(request)
    backend = request.app[BACKEND]
    deliverer = backend.deliverer()
    token = f"api:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    try:
        counts = await process_batch(deliverer, size, token, backend.settings.concurrency)
    except DATABASE_ERRORS as exc:
        log.warning("manual processing failed", error=f"{type(exc).__name__}: {exc}")
        raise _database_unavailable() from exc
    log.info(
        f"Freshdesk queue processing: {counts.successful} successful, {counts.failed} failed",
        trigger="api",
        batch_size=size,
        **counts.as_dict(),
    )
    return web.json_response(
        {
            "success": True,
            **counts.as_dict(),
            "message": f"Processed {counts.processed} ticket(s): {counts.successful} "
            f"successful, {counts.failed} failed",
        }
    )


async def ticket_status(request: web.Request) -> web.Response:
    """GET /api/freshdesk-queue/tickets/{public_id}: one submission's status, nothing personal."""
    try:
        public_id = uuid.UUID(request.match_info["public_id"])
    except ValueError:
        raise ApiError(404, "not_found", "No such submission.") from None
    row = await request.app[BACKEND].query(lambda pool: store.get_by_public_id(pool, public_id))
    if row is None:
        raise ApiError(404, "not_found", "No such submission.")
    return web.json_response({"success": True, **status_view(row)})


def status_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """The public fields of a row: no ticket body, no requester, a short error if failed."""
    status = row["status"]
    error = row["error_message"] if status == "failed" else None
    return {
        "id": str(row["public_id"]),
        "queue_id": row["id"],
        "status": status,
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "freshdesk_ticket_id": _ticket_number(row["freshdesk_ticket_id"]),
        "next_attempt_at": _iso(row["next_attempt_at"]) if status == "pending" else None,
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "processed_at": _iso(row["processed_at"]),
        "error": None if error is None else clip(str(error), 200),
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _ticket_number(stored: str | None) -> int | None:
    # The column is VARCHAR (original schema); ours always holds digits.
    return int(stored) if stored is not None and stored.isascii() and stored.isdigit() else None


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while the process serves, whatever the database does."""
    return web.json_response({"success": True, "status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when the database answers, else 503."""
    try:
        await request.app[BACKEND].query(store.ping)
    except ApiError:
        raise ApiError(503, "not_ready", "The database does not answer.") from None
    return web.json_response({"success": True, "status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus exposition; the queue gauges are at most a few seconds old."""
    backend, registry = request.app[BACKEND], request.app[METRICS]

    async def read() -> QueueStats | None:
        try:
            return await backend.query(store.stats)
        except ApiError:
            return None

    await registry.refresh_queue(read)
    body, content_type = registry.render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json: the OpenAPI 3.1 document of these routes."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# --- the app -------------------------------------------------------------------------------


def _freshdesk_client(settings: Settings) -> FreshdeskClient | None:
    try:
        base_url, api_key = settings.require_freshdesk()
    except ConfigError as exc:
        log.warning(
            "Freshdesk is not configured: intake queues only; direct creation answers 503",
            problem=str(exc),
        )
        return None
    return FreshdeskClient(
        base_url,
        api_key,
        timeout=settings.http_timeout,
        connect_timeout=settings.http_connect_timeout,
        max_in_flight=settings.concurrency,
    )


def _pool_opener(settings: Settings) -> PoolOpener:
    dsn = settings.require_database()

    async def open_pool() -> asyncpg.Pool:
        return await store.create_pool(
            dsn,
            max_size=settings.db_pool_max,
            statement_cache_size=settings.db_statement_cache_size,
            connect_timeout=settings.db_connect_timeout,
        )

    return open_pool


async def _backend_context(app: web.Application) -> AsyncIterator[None]:
    backend = app[BACKEND]
    backend.database.start()
    yield
    await backend.close()


def create_app(
    settings: Settings,
    *,
    pool: asyncpg.Pool | None = None,
    client: FreshdeskClient | None = None,
) -> web.Application:
    """The API application.

    A given `pool` or `client` is used as is and left open at cleanup; otherwise they are
    made from `settings` and closed with the app. The pool then opens in the background
    (DATABASE_URL is required, else ConfigError); a missing Freshdesk configuration only
    disables direct creation.
    """
    database = Database(pool=pool) if pool is not None else Database(opener=_pool_opener(settings))
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            metrics_middleware,
            cors_middleware(settings.cors_origins),
            error_middleware,
            admin_middleware,
        ],
    )
    app[SETTINGS] = settings
    app[BACKEND] = Backend(
        settings=settings,
        database=database,
        client=client if client is not None else _freshdesk_client(settings),
        owns_client=client is None,
    )
    app[METRICS] = ApiMetrics()
    app[OPENAPI] = json.dumps(openapi_document()).encode()
    app.cleanup_ctx.append(_backend_context)
    _add_routes(app.router)
    return app


def _add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/api/create-freshdesk-ticket", create_ticket, name="create_ticket")
    router.add_post(
        "/api/create-freshdesk-ticket-direct", create_ticket_direct, name="create_ticket_direct"
    )
    router.add_get("/api/freshdesk-queue/stats", queue_stats, name="queue_stats")
    router.add_post("/api/freshdesk-queue/process", process_queue, name="queue_process")
    router.add_get("/api/freshdesk-queue/tickets/{public_id}", ticket_status, name="ticket_status")
    router.add_get("/healthz", healthz, name="healthz")
    router.add_get("/readyz", readyz, name="readyz")
    router.add_get("/metrics", metrics, name="metrics")
    router.add_get("/api/openapi.json", openapi, name="openapi")


# --- the server ----------------------------------------------------------------------------


def activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), or None.

    `LISTEN_PID`/`LISTEN_FDS` are systemd's protocol with this very process, read here and
    then removed so that no child mistakes the socket for its own (sd_listen_fds(3)).
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not count.isdigit() or int(count) < 1:
        return None
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def _site(runner: web.AppRunner, settings: Settings) -> web.BaseSite:
    passed = activated_socket()
    if passed is not None:
        return web.SockSite(runner, passed)
    return web.TCPSite(runner, settings.host, settings.port)


def _describe(addresses: Iterable[Any]) -> str:
    return ", ".join(
        f"{a[0]}:{a[1]}" if isinstance(a, tuple) and len(a) >= 2 else str(a) for a in addresses
    )


async def serve_api(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, then stop gracefully; returns the exit status (0).

    READY=1 goes to systemd only once the port is bound (or the passed socket is served);
    the watchdog is pinged from the event loop; on a signal, STOPPING=1, the listening
    socket closes and in-flight requests get FDQUEUE_SHUTDOWN_GRACE seconds to finish.
    """
    if not faulthandler.is_enabled():
        faulthandler.enable()  # a watchdog abort then shows the stuck Python stack
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        create_app(settings), handle_signals=False, shutdown_timeout=settings.shutdown_grace
    )
    pinger: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        await _site(runner, settings).start()
        where = _describe(runner.addresses)
        sdnotify.ready(f"serving on {where}")
        log.info("api started", listen=where)
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            pinger = asyncio.create_task(sdnotify.watchdog_loop(interval))
        await stop.wait()
        sdnotify.stopping("stopping: finishing in-flight requests")
        log.info("stopping: finishing in-flight requests", grace_seconds=settings.shutdown_grace)
    finally:
        await runner.cleanup()
        if pinger is not None:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("api stopped")
    return 0
