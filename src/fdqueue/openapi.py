"""The OpenAPI 3.1 document of `fdqueue api`, served at `/api/openapi.json`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from fdqueue import __version__
from fdqueue.models import PRIORITIES, SOURCES, STATUSES, TicketIn

MAX_BATCH_SIZE: Final = 100
DEFAULT_BATCH_SIZE: Final = 5
IDEMPOTENCY_KEY_CHARS: Final = 200

JSON: Final = "application/json"
_ADMIN: Final[list[dict[str, list[str]]]] = [{"adminToken": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _reply(description: str, schema: str = "Error", **headers: str) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "description": description,
        "content": {JSON: {"schema": _ref(schema)}},
    }
    if headers:
        reply["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return reply


_ERRORS: Final = {
    "400": _reply("The body is not JSON (`invalid_json`)."),
    "413": _reply("The body is larger than FDQUEUE_MAX_BODY_BYTES (`body_too_large`)."),
    "415": _reply("The body is not `application/json` (`unsupported_media_type`)."),
    "422": _reply("Invalid fields, each named in `error.fields` (`validation_error`)."),
}
_ADMIN_ERRORS: Final = {
    "401": _reply("FDQUEUE_ADMIN_TOKEN is set and the bearer token is missing or wrong."),
    "403": _reply("No admin token is configured and the client is not on loopback."),
}
_DB_DOWN: Final = {"503": _reply("The database is unreachable (`database_unavailable`).")}
_DIRECT_ERRORS: Final = {
    "422": _reply(
        "Invalid fields, ours (`validation_error`) or Freshdesk's (`freshdesk_validation_error`)."
    ),
    "502": _reply("Freshdesk refused the ticket for another reason (`freshdesk_rejected`)."),
    "503": _reply(
        "Freshdesk is rate limiting, unreachable, refusing this server's credentials, or "
        "not configured.",
        **{"Retry-After": "Seconds to wait, when Freshdesk said."},
    ),
}

_TICKET_BODY: Final = {
    "required": True,
    "content": {JSON: {"schema": _ref("TicketIn")}},
}
_IDEMPOTENCY_KEY: Final = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "A repeat with the same key returns the first answer and stores nothing new.",
    "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_CHARS},
}


def _intake() -> dict[str, Any]:
    return {
        "summary": "Submit a ticket: queued (202), or created at once with ?async=false (201)",
        "operationId": "createTicket",
        "parameters": [
            {
                "name": "async",
                "in": "query",
                "required": False,
                "description": "`false` creates the ticket in Freshdesk now instead of queueing.",
                "schema": {"type": "string", "enum": ["true", "false"], "default": "true"},
            },
            _IDEMPOTENCY_KEY,
        ],
        "requestBody": _TICKET_BODY,
        "responses": {
            "202": _reply(
                "Queued: the row is committed.",
                "Queued",
                Location="The status URL of the submission.",
            ),
            "201": _reply(
                "Created in Freshdesk now (`?async=false`, or `fallback` when the queue is down).",
                "Created",
            ),
            **_ERRORS,
            **_DIRECT_ERRORS,
        },
    }


def _direct() -> dict[str, Any]:
    return {
        "summary": "Create the ticket in Freshdesk now (admin)",
        "operationId": "createTicketDirect",
        "security": _ADMIN,
        "parameters": [_IDEMPOTENCY_KEY],
        "requestBody": _TICKET_BODY,
        "responses": {
            "201": _reply("Created in Freshdesk.", "Created"),
            **_ERRORS,
            **_ADMIN_ERRORS,
            **_DIRECT_ERRORS,
        },
    }


def _stats() -> dict[str, Any]:
    return {
        "summary": "Queue statistics (admin)",
        "operationId": "queueStats",
        "security": _ADMIN,
        "responses": {"200": _reply("Counts by status.", "Stats"), **_ADMIN_ERRORS, **_DB_DOWN},
    }


def _process() -> dict[str, Any]:
    return {
        "summary": "Deliver up to batch_size due rows now (admin)",
        "operationId": "processQueue",
        "security": _ADMIN,
        "parameters": [
            {
                "name": "batch_size",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_BATCH_SIZE,
                    "default": DEFAULT_BATCH_SIZE,
                },
            }
        ],
        "responses": {
            "200": _reply("What the run did.", "ProcessResult"),
            "422": _reply("batch_size is not an integer from 1 to 100."),
            **_ADMIN_ERRORS,
            "503": _reply("The database is unreachable or Freshdesk is not configured."),
        },
    }


def _ticket_status() -> dict[str, Any]:
    return {
        "summary": "One submission's delivery status (no personal data)",
        "operationId": "ticketStatus",
        "parameters": [
            {
                "name": "public_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            }
        ],
        "responses": {
            "200": _reply("The submission's status.", "TicketStatus"),
            "404": _reply("No such submission (also for a malformed id)."),
            **_DB_DOWN,
        },
    }


def _ops(summary: str, operation_id: str, schema: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation_id,
        "responses": {"200": _reply("OK", schema)},
    }


def _metrics() -> dict[str, Any]:
    text = {"description": "Prometheus text exposition.", "content": {"text/plain": {}}}
    return {"summary": "Prometheus metrics", "operationId": "metrics", "responses": {"200": text}}


def _paths() -> dict[str, dict[str, Any]]:
    readyz = _ops("Readiness: the database answers", "readyz", "Health")
    readyz["responses"]["503"] = _reply("The database does not answer.")
    return {
        "/api/create-freshdesk-ticket": {"post": _intake()},
        "/api/create-freshdesk-ticket-direct": {"post": _direct()},
        "/api/freshdesk-queue/stats": {"get": _stats()},
        "/api/freshdesk-queue/process": {"post": _process()},
        "/api/freshdesk-queue/tickets/{public_id}": {"get": _ticket_status()},
        "/healthz": {"get": _ops("Liveness: the process is running", "healthz", "Health")},
        "/readyz": {"get": readyz},
        "/metrics": {"get": _metrics()},
        "/api/openapi.json": {"get": _ops("This document", "openapi", "Document")},
    }


# --- schemas -------------------------------------------------------------------------------


def _obj(properties: Mapping[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties), "required": list(required)}


_NULLABLE_INT: Final = {"type": ["integer", "null"]}
_NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_SUCCESS: Final = {"type": "boolean"}


def _code_schema(names: Mapping[str, int], default: int) -> dict[str, Any]:
    """A Freshdesk code field: the number, its name, or the number as a string."""
    return {
        "oneOf": [
            {"type": "integer", "enum": sorted(names.values())},
            {"type": "string", "enum": [*names, *(str(code) for code in sorted(names.values()))]},
        ],
        "default": default,
        "description": ", ".join(f"{code} = {name}" for name, code in names.items()),
    }


def ticket_in_schema() -> dict[str, Any]:
    """`TicketIn`'s JSON schema, with the code fields showing the names intake accepts."""
    schema = TicketIn.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    properties = schema["properties"]
    properties["priority"] = _code_schema(PRIORITIES, 1)
    properties["status"] = _code_schema(STATUSES, 2)
    properties["source"] = _code_schema(SOURCES, 2)
    return dict(schema)


def _schemas() -> dict[str, Any]:
    field = _obj({"field": {"type": "string"}, "message": {"type": "string"}}, ("field", "message"))
    error = _obj(
        {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "fields": {"type": "array", "items": field},
            "request_id": {"type": "string"},
        },
        ("code", "message"),
    )
    counts = {
        name: {"type": "integer"} for name in ("pending", "processing", "completed", "failed")
    }
    return {
        "TicketIn": ticket_in_schema(),
        "Error": _obj({"success": {"const": False}, "error": error}, ("success", "error")),
        "Queued": _obj(
            {
                "success": _SUCCESS,
                "queued": {"const": True},
                "queue_id": {"type": "integer"},
                "id": {"type": "string", "format": "uuid"},
                "status": {"type": "string"},
                "status_url": {"type": "string"},
                "message": {"type": "string"},
            },
            ("success", "queued", "queue_id", "id", "status", "status_url"),
        ),
        "Created": _obj(
            {
                "success": _SUCCESS,
                "queued": {"const": False},
                "ticket_id": _NULLABLE_INT,
                "fallback": {"type": "boolean"},
                "message": {"type": "string"},
            },
            ("success", "queued", "ticket_id"),
        ),
        "Stats": _obj(
            {
                "success": _SUCCESS,
                "stats": _obj(
                    {
                        **counts,
                        "due": {"type": "integer"},
                        "oldest_due_age_seconds": {"type": ["number", "null"]},
                    },
                    ("pending", "processing", "completed", "failed"),
                ),
            },
            ("success", "stats"),
        ),
        "ProcessResult": _obj(
            {
                "success": _SUCCESS,
                **{
                    name: {"type": "integer"}
                    for name in ("processed", "successful", "failed", "retried", "deferred", "lost")
                },
                "message": {"type": "string"},
            },
            ("success", "processed", "successful", "failed"),
        ),
        "TicketStatus": _obj(
            {
                "success": _SUCCESS,
                "id": {"type": "string", "format": "uuid"},
                "queue_id": {"type": "integer"},
                "status": {
                    "type": "string",
                    "enum": ["pending", "processing", "completed", "failed"],
                },
                "attempts": {"type": "integer"},
                "max_attempts": {"type": "integer"},
                "freshdesk_ticket_id": _NULLABLE_INT,
                "next_attempt_at": _NULLABLE_TIME,
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "processed_at": _NULLABLE_TIME,
                "error": {"type": ["string", "null"]},
            },
            ("success", "id", "status", "attempts", "max_attempts"),
        ),
        "Health": _obj({"success": _SUCCESS, "status": {"type": "string"}}, ("success",)),
        "Document": {"type": "object"},
    }


def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fdqueue",
            "version": __version__,
            "description": (
                "Accepts support-ticket submissions at once (202) and delivers them to "
                "Freshdesk through a PostgreSQL queue. Every JSON body carries `success`."
            ),
        },
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "FDQUEUE_ADMIN_TOKEN. Without one configured, admin routes answer "
                        "loopback clients only."
                    ),
                }
            },
        },
    }
