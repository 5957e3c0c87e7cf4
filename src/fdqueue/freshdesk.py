"""Freshdesk v2 HTTP client: build the payload, send one request, type whatever comes back."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
from multidict import CIMultiDictProxy

from fdqueue import __version__
from fdqueue.models import (
    PRIORITIES,
    SOURCES,
    STATUSES,
    FreshdeskError,
    FreshdeskReply,
    SendResult,
    TransportFailure,
)

MARKER_PREFIX: Final = "fdq-"
TICKETS_PATH: Final = "/api/v2/tickets"
# Freshdesk stamps `updated_since` and `created_at` with its own clock; the margin absorbs
# skew between that clock and ours so a ticket created "just before" is still listed.
LOOKUP_MARGIN: Final = timedelta(minutes=5)
LOOKUP_PAGE_SIZE: Final = 100
LOOKUP_MAX_PAGES: Final = 10
SNIPPET_CHARS: Final = 300
# A ticket reply is a few kB and a list page of 100 tickets well under 1 MB; anything past
# this is not Freshdesk talking, and reading it all would only cost memory.
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
_MAX_ERRORS: Final = 50
# The identifiers that `GET /api/v2/tickets` can filter on, most precise first.
_REQUESTER_FILTERS: Final = ("requester_id", "email", "unique_external_id")
_NEVER_SENT: Final = frozenset({"chatbot_id", "user_id"})
# ASCII digits only: str.isdigit() accepts "²", which int() then refuses.
_DIGITS = re.compile(r"^[0-9]+$")
_TICKET_PATH_ID = re.compile(r"/tickets/([0-9]+)/?$")
_SECONDS = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def marker_for(public_id: uuid.UUID) -> str:
    """The per-submission tag, e.g. `fdq-kniytlg36ffqbe5djapy4722bi` (30 characters).

    The UUID is written in lowercase base32 rather than hex because Freshdesk rejects
    tags longer than 32 characters (`It should only contain elements that have maximum
    of 32 characters`), and `fdq-` plus 32 hex digits would be 36.
    """
    encoded = base64.b32encode(public_id.bytes).decode("ascii").rstrip("=").lower()
    return f"{MARKER_PREFIX}{encoded}"


# --- payload -----------------------------------------------------------------------------


def build_payload(
    ticket_data: Mapping[str, Any],
    marker: str,
    *,
    marker_field: str | None = None,
    default_tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON body of `POST /api/v2/tickets` for one stored submission.

    Always carries subject, description, status, priority and source, the codes as JSON
    numbers (stored rows from older versions may hold `"2"` or `"high"`; B17). Null values
    are left out, `chatbot_id`/`user_id` never go out, and the marker joins the tags (and
    `custom_fields[marker_field]` when a marker field is configured).
    """
    payload = {
        key: value
        for key, value in ticket_data.items()
        if key not in _NEVER_SENT and value is not None
    }
    payload.setdefault("subject", "")
    payload.setdefault("description", "")
    payload["status"] = _code(payload.get("status"), STATUSES, default=2)
    payload["priority"] = _code(payload.get("priority"), PRIORITIES, default=1)
    payload["source"] = _code(payload.get("source"), SOURCES, default=2)
    payload["tags"] = _tags(payload.get("tags"), default_tags, marker)
    if "custom_fields" in payload or marker_field is not None:
        payload["custom_fields"] = _custom_fields(
            payload.get("custom_fields"), marker_field, marker
        )
    return payload


def _code(value: Any, names: Mapping[str, int], *, default: int) -> Any:
    """Freshdesk's integer code for `value`; a value that cannot be read is sent as it is.

    Sending an unreadable value unchanged lets Freshdesk answer 400, so the row fails with
    Freshdesk's own message instead of silently going out with a guessed code.
    """
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if _DIGITS.match(text):
            return int(text)
        return names.get(text, value)
    return value


def _tags(stored: Any, default_tags: Iterable[str], marker: str) -> list[str]:
    """User tags, then the configured ones, then the marker; each once, order kept."""
    if isinstance(stored, str):
        stored = [stored]
    user_tags = [str(tag) for tag in stored] if isinstance(stored, list) else []
    return list(dict.fromkeys([*user_tags, *default_tags, marker]))


def _custom_fields(stored: Any, marker_field: str | None, marker: str) -> Any:
    """Custom fields minus nulls, plus the marker; non-objects go as is for Freshdesk to reject."""
    if stored is not None and not isinstance(stored, Mapping):
        return stored
    # A null custom field broke creates in one integration (reference §7.3): leave it out.
    fields = {key: value for key, value in (stored or {}).items() if value is not None}
    if marker_field is not None:
        fields[marker_field] = marker
    return fields


# --- replies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Response:
    """What came back on the wire: the status line and headers, and as much body as was read."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    body_problem: str | None = None


def _reply(response: _Response) -> FreshdeskReply:
    """Read a Freshdesk answer of any shape (JSON under any content type, HTML, text, empty)."""
    document = _json(response.body)
    headers = response.headers
    success = 200 <= response.status < 300
    return FreshdeskReply(
        status=response.status,
        ticket_id=_ticket_id(document, headers) if success else None,
        errors=() if success else _errors(document),
        retry_after=_retry_after(headers),
        ratelimit_total=_int_header(headers, "X-RateLimit-Total"),
        ratelimit_remaining=_int_header(headers, "X-RateLimit-Remaining"),
        request_id=headers.get("X-Request-Id"),
        body_snippet=_snippet(response, document),
    )


def _json(body: bytes) -> Any:
    """The decoded JSON document, or None: aiohttp's `.json()` refuses text/html (B18)."""
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return None


def _ticket_id(document: Any, headers: CIMultiDictProxy[str]) -> int | None:
    """The new ticket's id from the body's `id`, else from `Location: …/tickets/<id>`."""
    if isinstance(document, dict):
        found = _positive_int(document.get("id"))
        if found is not None:
            return found
    match = _TICKET_PATH_ID.search(headers.get("Location", "").split("?", 1)[0])
    return int(match.group(1)) if match else None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and _DIGITS.match(value):
        return int(value) or None
    return None


def _errors(document: Any) -> tuple[FreshdeskError, ...]:
    """Freshdesk's errors: the validation list, or the flat `{"code","message"}` of 401/403."""
    if not isinstance(document, dict):
        return ()
    listed = document.get("errors")
    if isinstance(listed, list):
        return tuple(_error(item) for item in listed[:_MAX_ERRORS] if isinstance(item, dict))
    if "code" in document or "message" in document or "description" in document:
        return (_error(document),)
    return ()


def _error(item: Mapping[str, Any]) -> FreshdeskError:
    field = item.get("field")
    message = item.get("message") or item.get("description") or ""
    return FreshdeskError(
        code=str(item.get("code") or "error")[:100],
        message=str(message)[:500],
        field=str(field)[:200] if field is not None else None,
    )


def _retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    """`Retry-After` in seconds: a number, or an HTTP date measured from the reply's `Date`."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return None
    if _SECONDS.match(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    until = _http_date(value)
    if until is None:
        return None
    # The server's own Date header, when readable, cancels any skew with our clock.
    now = _http_date(headers.get("Date", "")) or datetime.now(UTC)
    return max((until - now).total_seconds(), 0.0)


def _http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _int_header(headers: CIMultiDictProxy[str], name: str) -> int | None:
    value = headers.get(name, "").strip()
    return int(value) if _DIGITS.match(value) else None


def _snippet(response: _Response, document: Any) -> str:
    """A short diagnostic excerpt of the body.

    Empty for a 2xx JSON body: that is the created ticket echoed back, i.e. the submission
    itself, which must never reach a log line.
    """
    if response.body_problem is not None:
        return f"[body unreadable: {response.body_problem}]"[:SNIPPET_CHARS]
    if 200 <= response.status < 300 and document is not None:
        return ""
    text = response.body[: SNIPPET_CHARS * 4].decode("utf-8", errors="replace")
    return " ".join(text.split())[:SNIPPET_CHARS]


# --- transport failures ------------------------------------------------------------------

# The connection was never established, so the request cannot have reached Freshdesk:
# refused, DNS failure, TLS handshake failure (all ClientConnectorError subclasses),
# sock_connect timeout (ConnectionTimeoutError), or a URL aiohttp would not even try.
_NEVER_SENT_ERRORS: Final = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.InvalidURL,
)


def _transport_failure(exc: BaseException) -> TransportFailure:
    """Map an exception raised before the status line arrived to `never_sent` or `unknown`.

    Everything that is not provably pre-connection is `unknown`: a read timeout or our
    overall deadline (SocketTimeoutError, TimeoutError), the server closing or resetting the
    socket (ServerDisconnectedError, ClientOSError), a garbled answer (ClientResponseError).
    The request may have been written and acted on; aiohttp never silently re-sends a POST
    on a dropped keep-alive connection (only idempotent methods), so one call is one try.
    """
    if isinstance(exc, _NEVER_SENT_ERRORS):
        return TransportFailure(kind="never_sent", detail=_describe(exc))
    return TransportFailure(kind="unknown", detail=_describe(exc))


def _describe(exc: BaseException) -> str:
    """Class name and message; never the request (the URL may hold a requester's email)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        text = f"{exc.status} {exc.message}"
    else:
        text = str(exc) or "no detail"
    return f"{type(exc).__name__}: {text}"[:SNIPPET_CHARS]


# --- look-up -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """What `find_ticket_by_marker` learned; read it through `found`, `not_found`, `failed`.

    - found: `ticket_id` holds the ticket that carries the marker.
    - not found: every ticket that could carry the marker was read and none does, so the
      submission was never created and sending it again makes no duplicate.
    - failed: the look-up could not finish. `failure` is the reply or transport failure that
      stopped it (feed it to `policy.classify` to learn about a 429 or a bad key); it is None
      when the page bound was reached first (`truncated`). Do not send again yet.
    """

    ticket_id: int | None = None
    failure: SendResult | None = None
    truncated: bool = False
    pages: int = 0

    @property
    def found(self) -> bool:
        return self.ticket_id is not None

    @property
    def not_found(self) -> bool:
        return self.ticket_id is None and self.failure is None and not self.truncated

    @property
    def failed(self) -> bool:
        return self.failure is not None or self.truncated


@dataclass(frozen=True, slots=True)
class _Search:
    """The fixed parts of one look-up."""

    marker: str
    marker_field: str | None
    since: datetime
    requester_filter: str | None


def _requester_params(ticket_data: Mapping[str, Any]) -> dict[str, str]:
    """The one list filter that narrows the look-up to this submission's requester."""
    for name in _REQUESTER_FILTERS:
        value = ticket_data.get(name)
        if value is not None and str(value).strip():
            return {name: str(value).strip()}
    return {}  # phone / twitter / facebook requesters: the time window alone must do


def _freshdesk_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _scan_page(response: _Response | TransportFailure, search: _Search, page: int) -> Lookup | None:
    """The look-up's answer after reading `page`, or None to read the next page."""
    if isinstance(response, TransportFailure):
        return Lookup(failure=response, pages=page)
    reply = _reply(response)
    if reply.status != 200:
        if _no_such_requester(reply, search.requester_filter):
            return Lookup(pages=page)
        return Lookup(failure=reply, pages=page)
    items = _json(response.body)
    if not isinstance(items, list):
        unreadable = replace(reply, body_snippet="ticket list unreadable")
        return Lookup(failure=unreadable, pages=page)
    tickets = [item for item in items if isinstance(item, dict)]
    for ticket in tickets:
        ticket_id = _positive_int(ticket.get("id"))
        if ticket_id is not None and _carries_marker(ticket, search):
            return Lookup(ticket_id=ticket_id, pages=page)
    if len(items) < LOOKUP_PAGE_SIZE or _reached_older(tickets, search.since):
        return Lookup(pages=page)
    return None


def _no_such_requester(reply: FreshdeskReply, requester_filter: str | None) -> bool:
    """True for Freshdesk's 400 "There is no contact matching the given email".

    Creating a ticket creates its requester, so when the requester does not exist the
    ticket was never created either: that is a conclusive "not found".
    """
    if reply.status != 400 or requester_filter is None:
        return False
    return any(
        error.field == requester_filter and error.code == "invalid_value" for error in reply.errors
    )


def _carries_marker(ticket: Mapping[str, Any], search: _Search) -> bool:
    tags = ticket.get("tags")
    if isinstance(tags, list) and search.marker in tags:
        return True
    custom_fields = ticket.get("custom_fields")
    return (
        search.marker_field is not None
        and isinstance(custom_fields, dict)
        and custom_fields.get(search.marker_field) == search.marker
    )


def _reached_older(tickets: Sequence[Mapping[str, Any]], since: datetime) -> bool:
    """True once the newest-first list shows a ticket created before the window opened."""
    for ticket in reversed(tickets):
        created = ticket.get("created_at")
        if not isinstance(created, str):
            continue
        try:
            created_at = datetime.fromisoformat(created)
        except ValueError:
            continue
        if created_at.tzinfo is not None:
            return created_at < since
    return False


# --- the client --------------------------------------------------------------------------


class FreshdeskClient:
    """Creates and finds tickets over one shared aiohttp session; never retries on its own.

    Timeouts (B14): at most `max_in_flight` requests run at once, gated by a semaphore no
    larger than the connector's limit, so a request never waits in aiohttp's pool with its
    clock running. Each request then gets `connect_timeout` to connect (aiohttp's
    `sock_connect`; the pool-inclusive `connect` and `total` are off), `timeout` between
    reads (`sock_read`), and an overall deadline of `connect_timeout + timeout` that starts
    only once the semaphore is held, so a trickling server cannot stretch a call past the
    worker's lease.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_in_flight: int = 10,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Prepare the client; a session of its own is made on first use when none is given."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._base_url = base_url.rstrip("/")
        self._headers = {
            "Authorization": _basic_auth(api_key),
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"fdqueue/{__version__}",
        }
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout, sock_read=timeout
        )
        self._deadline = connect_timeout + timeout
        self._max_in_flight = max_in_flight
        self._session = session
        self._owns_session = session is None
        self._slots = asyncio.Semaphore(_slot_count(max_in_flight, session))

    def __repr__(self) -> str:
        # Spelled out so that no debugger or log ever shows the Authorization header.
        return f"FreshdeskClient({self._base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client made it; a session passed in stays open."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def create_ticket(
        self,
        ticket_data: Mapping[str, Any],
        marker: str,
        *,
        marker_field: str | None = None,
        default_tags: Sequence[str] = (),
    ) -> SendResult:
        """`POST /api/v2/tickets` once. Never raises for anything the server or network does.

        Returns a FreshdeskReply whenever a status line arrived (even if the body was HTML,
        empty or cut short), else a TransportFailure; `policy.classify` decides what it means.
        """
        payload = build_payload(
            ticket_data, marker, marker_field=marker_field, default_tags=default_tags
        )
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        response = await self._send("POST", TICKETS_PATH, data=body)
        return response if isinstance(response, TransportFailure) else _reply(response)

    async def view_ticket(self, ticket_id: int) -> SendResult:
        """`GET /api/v2/tickets/<id>` once; a 200 carries the id, a 404 means no such ticket."""
        response = await self._send("GET", f"{TICKETS_PATH}/{int(ticket_id)}")
        return response if isinstance(response, TransportFailure) else _reply(response)

    async def find_ticket_by_marker(
        self,
        ticket_data: Mapping[str, Any],
        marker: str,
        *,
        created_after: datetime,
        marker_field: str | None = None,
    ) -> Lookup:
        """Find the ticket an earlier, unanswered create may have made. Never raises for IO.

        Lists `GET /api/v2/tickets` (read-after-write, unlike search's indexing delay) for the
        submission's requester, updated since `created_after` minus LOOKUP_MARGIN, newest
        first, 100 a page, at most LOOKUP_MAX_PAGES pages, and matches the marker in `tags`
        or in `custom_fields[marker_field]`. `created_after` must be timezone-aware: the
        moment before the first send (e.g. the row's `created_at`). Costs one list call
        per page read.
        """
        if created_after.tzinfo is None:
            raise ValueError("created_after must be timezone-aware")
        requester = _requester_params(ticket_data)
        search = _Search(
            marker=marker,
            marker_field=marker_field,
            since=created_after - LOOKUP_MARGIN,
            requester_filter=next(iter(requester), None),
        )
        params = {
            **requester,
            "updated_since": _freshdesk_time(search.since),
            "order_by": "created_at",
            "order_type": "desc",
            "per_page": str(LOOKUP_PAGE_SIZE),
        }
        for page in range(1, LOOKUP_MAX_PAGES + 1):
            response = await self._send("GET", TICKETS_PATH, params={**params, "page": str(page)})
            found = _scan_page(response, search, page)
            if found is not None:
                return found
        return Lookup(truncated=True, pages=LOOKUP_MAX_PAGES)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> _Response | TransportFailure:
        """One request under the in-flight cap, every failure caught and typed."""
        session = self._open_session()
        async with self._slots:
            deadline = asyncio.get_running_loop().time() + self._deadline
            try:
                async with asyncio.timeout_at(deadline):
                    response = await session.request(
                        method,
                        f"{self._base_url}{path}",
                        params=params,
                        data=data,
                        headers=self._headers,
                        timeout=self._timeout,
                        # A redirect would carry the key to wherever it points; Freshdesk's
                        # API does not redirect, so a 3xx is reported as it is.
                        allow_redirects=False,
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return _transport_failure(exc)
            async with response:
                body, problem = await _read_body(response, deadline)
            return _Response(response.status, response.headers, body, problem)

    def _open_session(self) -> aiohttp.ClientSession:
        # Made lazily: aiohttp wants its session created inside the running event loop.
        if self._session is None or (self._owns_session and self._session.closed):
            connector = aiohttp.TCPConnector(limit=self._max_in_flight)
            self._session = aiohttp.ClientSession(connector=connector)
            self._owns_session = True
        return self._session


def _basic_auth(api_key: str) -> str:
    """Freshdesk's Basic auth: the key as user name and `X` as the (ignored) password."""
    token = base64.b64encode(f"{api_key}:X".encode()).decode("ascii")
    return f"Basic {token}"


def _slot_count(max_in_flight: int, session: aiohttp.ClientSession | None) -> int:
    """`max_in_flight`, lowered to a given session's connector limits when those are smaller."""
    if session is None or session.connector is None:
        return max_in_flight
    limits = [session.connector.limit, session.connector.limit_per_host]
    return min([max_in_flight, *(limit for limit in limits if limit > 0)])


async def _read_body(response: aiohttp.ClientResponse, deadline: float) -> tuple[bytes, str | None]:
    """Up to MAX_BODY_BYTES of body, and what went wrong if it could not be read whole.

    The status line has arrived by now, so a body lost to a reset, a truncation or the
    deadline still leaves a FreshdeskReply: a 201 stays a 201 (B18), a 5xx stays a 5xx.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            while size <= MAX_BODY_BYTES:
                chunk = await response.content.read(64 * 1024)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return b"".join(chunks), _describe(exc)
    if size > MAX_BODY_BYTES:
        return b"".join(chunks)[:MAX_BODY_BYTES], f"body larger than {MAX_BODY_BYTES} bytes"
    return b"".join(chunks), None
