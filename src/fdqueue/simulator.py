"""The Freshdesk simulator: an in-memory fake of the v2 API for development, tests, benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import contextlib
import html
import json
import math
import random
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, Literal

import structlog
from aiohttp import BodyPartReader, web

log = structlog.get_logger(__name__)

# --- Freshdesk's fixed values (reference §2.3, §3.4) -------------------------------------

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
API_VERSION = "latest=v2; requested=v2"
PRIORITIES = (1, 2, 3, 4)
SOURCES = (1, 2, 3, 7, 9, 10)
CONTACT_ID_BASE = 80_000_000_000
ATTACHMENT_ID_BASE = 80_500_000_000
FIELD_ID_BASE = 80_900_000_000
HANG_SECONDS = 3600.0
SEARCH_PAGE_SIZE = 30
SEARCH_MAX_PAGE = 10
SEARCH_MAX_QUERY = 512
LIST_WINDOW_SECONDS = 30 * 86400.0
MAX_PER_PAGE = 100

INVALID_CREDENTIALS = {
    "code": "invalid_credentials",
    "message": "You have to be logged in to perform this action.",
}
ACCESS_DENIED = {
    "code": "access_denied",
    "message": "You are not authorized to perform this action.",
}
INVALID_JSON = {"code": "invalid_json", "message": "Request body has invalid json format"}
INTERNAL_ERROR = {"code": "internal_error", "message": "We're sorry, but something went wrong."}
# The bodies below are not published anywhere (reference §3.1, §4); clients must not rely on them.
NOT_ACCEPTABLE = {
    "code": "invalid_accept_header",
    "message": "This request only supports application/json in the Accept header.",
}
UNSUPPORTED_MEDIA = {
    "code": "invalid_content_type",
    "message": "Content-Type header should be application/json or multipart/form-data.",
}
TOO_MANY_REQUESTS = {
    "code": "too_many_requests",
    "message": "You have exceeded the limit of requests per minute.",
}

MSG_STRING = "It should be a/an String"
MSG_INVALID_FIELD = "Unexpected/invalid field in request"
MSG_BLANK = "It should not be blank as this is a mandatory field"
MSG_NOT_FILE = "It should contain elements of type valid file format only"
MSG_STRINGS = "It should contain elements of type String only"
MSG_EMAIL = "It should be in the 'valid email address' format"
MSG_EMAILS = "It should contain elements that are in the 'valid email address' format"
MSG_DATE = "It should be in the 'yyyy-mm-dd' format"
MSG_DATETIME = "It should be in the 'yyyy-mm-ddThh:mm:ss±hh:mm' format"
MSG_NO_REQUESTER = (
    "Please fill at least 1 of requester_id, phone, email, twitter_id, facebook_id, "
    "unique_external_id fields"
)

EDGE_PAGES = {
    500: (
        "<!DOCTYPE html>\n<html><head><title>We're sorry, but something went wrong (500)</title>"
        '</head><body><div class="dialog"><h1>We\'re sorry, but something went wrong.</h1>'
        "</div></body></html>\n"
    ),
    502: "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
    "</h1></center></body></html>\n",
    503: "<html><head><title>503 Service Temporarily Unavailable</title></head><body><center>"
    "<h1>503 Service Temporarily Unavailable</h1></center></body></html>\n",
    504: "<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway "
    "Time-out</h1></center></body></html>\n",
}

CREATE_FIELDS = frozenset(
    {
        "name", "requester_id", "email", "facebook_id", "phone", "twitter_id",
        "unique_external_id", "subject", "type", "status", "priority", "description",
        "responder_id", "attachments", "cc_emails", "custom_fields", "due_by",
        "email_config_id", "fr_due_by", "group_id", "parent_id", "product_id", "source",
        "tags", "company_id", "internal_agent_id", "internal_group_id", "lookup_parameter",
        "related_ticket_ids",
    }
)  # fmt: skip
INTEGER_FIELDS = (
    "responder_id", "group_id", "company_id", "product_id", "email_config_id", "parent_id",
    "internal_agent_id", "internal_group_id",
)  # fmt: skip
TEXT_FIELDS = ("name", "phone", "twitter_id", "facebook_id", "unique_external_id")
REQUESTER_KEYS = (
    "requester_id",
    "email",
    "phone",
    "twitter_id",
    "facebook_id",
    "unique_external_id",
)

# ASCII only and no '*' in the local part: Freshdesk rejects both (reference §2.2). Kept apart
# from models.py on purpose: a fake that shared the client's rules would hide the client's bugs.
_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}",
    re.ASCII,
)
_NAMED_EMAIL = re.compile(r"^.*<([^<>]+)>\s*$")
_HTML_TAG = re.compile(r"<[A-Za-z/!][^>]*>")
_BREAK = re.compile(r"<br\s*/?>|</(?:div|p)>", re.IGNORECASE)
_INTEGER_TEXT = re.compile(r"-?\d{1,18}")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_CUSTOM_PART = re.compile(r"custom_fields\[([^\[\]]+)\](.*)")
_TICKET_PATH = re.compile(r"/api/v2/tickets/([^/]+)")


# --- Configuration ------------------------------------------------------------------------

FieldType = Literal["text", "number", "checkbox", "dropdown", "date"]


@dataclass(frozen=True, slots=True)
class TicketField:
    """One custom ticket field of the account: `name` is the `cf_*` API name."""

    name: str
    type: FieldType = "text"
    label: str = ""
    choices: tuple[str, ...] = ()
    required_for_agents: bool = False


def default_ticket_fields() -> list[TicketField]:
    """A small realistic account: none required, so ordinary tickets pass."""
    return [
        TicketField("cf_submission_id", "text", "Submission ID"),
        TicketField("cf_order_id", "number", "Order ID"),
        TicketField("cf_category", "dropdown", "Category", ("Billing", "Technical", "Other")),
        TicketField("cf_vip", "checkbox", "VIP customer"),
        TicketField("cf_purchase_date", "date", "Purchase date"),
    ]


@dataclass
class SimulatorConfig:
    """Everything that varies between Freshdesk accounts or that tests shorten."""

    api_keys: set[str] = field(default_factory=lambda: {"test-key"})
    forbidden_keys: set[str] = field(default_factory=set)
    account_limit: int = 200
    create_limit: int = 80
    list_limit: int = 20
    window_seconds: float = 60.0
    latency: float = 0.0
    latency_jitter: float = 0.0
    search_index_delay: float = 150.0
    statuses: tuple[int, ...] = (2, 3, 4, 5)
    ticket_fields: list[TicketField] = field(default_factory=default_ticket_fields)
    ticket_types: tuple[str, ...] = ("Question", "Incident", "Problem", "Feature Request", "Refund")
    count_429: bool = False
    ratelimit_headers_on_429: bool = False
    text_field_max: int = 255
    attachment_limit_bytes: int = 20 * 1024 * 1024
    sla_delay: float | None = 5.0
    contacts: list[dict[str, Any]] = field(default_factory=list)
    request_log_limit: int = 200_000
    seed: int | None = None
    clock: Callable[[], float] = time.time


# Settable at runtime through POST /_simulator/config, with the type each one takes.
_RUNTIME_SETTINGS: dict[str, type] = {
    "api_keys": set,
    "forbidden_keys": set,
    "account_limit": int,
    "create_limit": int,
    "list_limit": int,
    "window_seconds": float,
    "latency": float,
    "latency_jitter": float,
    "search_index_delay": float,
    "count_429": bool,
    "ratelimit_headers_on_429": bool,
    "sla_delay": float,
}


def _setting_value(name: str, value: Any) -> Any:
    """Convert one runtime setting from JSON, raising ValueError on a wrong type."""
    kind = _RUNTIME_SETTINGS.get(name)
    if kind is None:
        raise ValueError(f"unknown setting {name!r}")
    if kind is set:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{name} must be a list of strings")
        return set(value)
    if name == "sla_delay" and value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    return int(value) if kind is int else float(value)


# --- Small helpers ------------------------------------------------------------------------


def _timestamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _type_name(value: Any) -> str:
    """The type word Freshdesk puts in `Value set is of type X` messages."""
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "Boolean"
    if isinstance(value, int):
        return "Integer"
    if isinstance(value, float):
        return "Float"
    if isinstance(value, str):
        return "String"
    if isinstance(value, dict):
        return "key/value pair"
    return "Array"


def _values(items: Iterable[object]) -> str:
    return ",".join(str(item) for item in items)


def _one_of(items: Iterable[object]) -> str:
    return f"It should be one of these values: '{_values(items)}'"


def _mismatch(value: Any, expected: str) -> str:
    # No space after the period: that is how Freshdesk writes it (reference §3.4).
    return f"Value set is of type {_type_name(value)}.It should be {expected}"


def _too_long(text: str, limit: int) -> str:
    return f"Has {len(text)} characters, it can have maximum of {limit} characters"


def _is_email(text: str) -> bool:
    return len(text) <= 254 and _EMAIL.fullmatch(text) is not None


def _description_html(text: str) -> str:
    """HTML is kept; plain text comes back wrapped in a div, as Freshdesk does."""
    if _HTML_TAG.search(text):
        return text
    return "<div>" + html.escape(text, quote=False).replace("\n", "<br>") + "</div>"


def _description_text(markup: str) -> str:
    return html.unescape(_HTML_TAG.sub("", _BREAK.sub("\n", markup))).strip()


def _parse_datetime(text: str) -> datetime | None:
    """Freshdesk's accepted date-time inputs; a missing zone means UTC."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _is_day(text: str) -> bool:
    if not _DAY.fullmatch(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


# --- Validation of a create -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """An uploaded file: only its name, type and size are kept."""

    name: str
    content_type: str
    size: int


@dataclass(slots=True)
class CreateInput:
    """A create request's body, from JSON or from multipart form data."""

    payload: dict[str, Any]
    form: bool = False
    attachments: list[Attachment] = field(default_factory=list)
    bad_attachment_part: bool = False
    nested_custom_field: bool = False


def _int_value(value: Any, form: bool) -> int | None:
    """The integer in `value`, or None; form values are strings, so "2" counts there."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if form and isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        return int(value)
    return None


CheckResult = tuple[Any, tuple[str, str] | None]  # (clean value, (message, code) of the error)
CustomCheck = Callable[[TicketField, Any, bool, int], CheckResult]


def _check_text(spec: TicketField, value: Any, form: bool, limit: int) -> CheckResult:
    if not isinstance(value, str):
        return None, (_mismatch(value, "a/an String"), "datatype_mismatch")
    if len(value) > limit:
        return None, (_too_long(value, limit), "invalid_value")
    return value, None


def _check_number(spec: TicketField, value: Any, form: bool, limit: int) -> CheckResult:
    number = _int_value(value, form)
    if number is None:
        # This one message has a space and a final period (NET #412).
        return None, (
            f"Value set is of type {_type_name(value)}. It should be a/an Integer.",
            "datatype_mismatch",
        )
    return number, None


def _check_checkbox(spec: TicketField, value: Any, form: bool, limit: int) -> CheckResult:
    if isinstance(value, bool):
        return value, None
    if form and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1"), None
    return None, (_mismatch(value, "a/an Boolean"), "datatype_mismatch")


def _check_dropdown(spec: TicketField, value: Any, form: bool, limit: int) -> CheckResult:
    if isinstance(value, str) and value in spec.choices:
        return value, None
    return None, (_one_of(spec.choices), "invalid_value")


def _check_date(spec: TicketField, value: Any, form: bool, limit: int) -> CheckResult:
    if isinstance(value, str) and _is_day(value):
        return value, None
    return None, (MSG_DATE, "invalid_value")


_CUSTOM_CHECKS: dict[str, CustomCheck] = {
    "text": _check_text,
    "number": _check_number,
    "checkbox": _check_checkbox,
    "dropdown": _check_dropdown,
    "date": _check_date,
}
_REQUIRED_MESSAGES = {
    "text": MSG_STRING,
    "number": "It should be a/an Integer",
    "checkbox": "It should be a/an Boolean",
    "date": MSG_DATE,
}


class _CreateValidator:
    """Checks a create body the way Freshdesk does: every problem is collected, none stops it."""

    def __init__(self, config: SimulatorConfig, contacts: ContactBook, body: CreateInput) -> None:
        self.config = config
        self.contacts = contacts
        self.payload = body.payload
        self.form = body.form
        self.errors: list[dict[str, str]] = []
        self.clean: dict[str, Any] = {}

    def error(self, name: str, message: str, code: str) -> None:
        self.errors.append({"field": name, "message": message, "code": code})

    def run(self) -> None:
        for key in self.payload:
            if key not in CREATE_FIELDS:
                self.error(key, MSG_INVALID_FIELD, "invalid_field")
        for name in ("subject", "description"):
            self._required_text(name)
        self._choice("status", self.config.statuses, required=True)
        self._choice("priority", PRIORITIES, required=True)
        self._choice("source", SOURCES, required=False)
        for name in (*INTEGER_FIELDS, "requester_id"):
            self._integer(name)
        for name in TEXT_FIELDS:
            self._optional_text(name)
        self._email()
        self._tags()
        self._cc_emails()
        self._ticket_type()
        for name in ("due_by", "fr_due_by"):
            self._datetime(name)
        self._custom_fields()
        self._requester()

    def _required_text(self, name: str) -> None:
        if name not in self.payload:
            self.error(name, MSG_STRING, "missing_field")
            return
        value = self.payload[name]
        if not isinstance(value, str):
            self.error(name, _mismatch(value, "a/an String"), "datatype_mismatch")
        elif not value.strip():
            self.error(name, MSG_BLANK, "invalid_value")
        elif name == "subject" and len(value) > self.config.text_field_max:
            self.error(name, _too_long(value, self.config.text_field_max), "invalid_value")
        else:
            self.clean[name] = value

    def _choice(self, name: str, allowed: Sequence[int], required: bool) -> None:
        if name not in self.payload:
            if required:
                self.error(name, _one_of(allowed), "missing_field")
            return
        value = self.payload[name]
        number = _int_value(value, self.form)
        if number is None:
            expected = f"one of these values: '{_values(allowed)}'"
            self.error(name, _mismatch(value, expected), "datatype_mismatch")
        elif number not in allowed:
            self.error(name, _one_of(allowed), "invalid_value")
        else:
            self.clean[name] = number

    def _integer(self, name: str) -> None:
        value = self.payload.get(name)
        if value is None:
            return
        number = _int_value(value, self.form)
        if number is None:
            self.error(name, _mismatch(value, "a/an Integer"), "datatype_mismatch")
        else:
            self.clean[name] = number

    def _optional_text(self, name: str) -> None:
        value = self.payload.get(name)
        if value is None:
            return
        if not isinstance(value, str):
            self.error(name, _mismatch(value, "a/an String"), "datatype_mismatch")
        elif len(value) > self.config.text_field_max:
            self.error(name, _too_long(value, self.config.text_field_max), "invalid_value")
        elif value.strip():
            self.clean[name] = value.strip()

    def _email(self) -> None:
        value = self.payload.get("email")
        if value is None:
            return
        if not isinstance(value, str):
            self.error("email", _mismatch(value, "a/an String"), "datatype_mismatch")
        elif not _is_email(value.strip()):
            self.error("email", MSG_EMAIL, "invalid_value")
        else:
            self.clean["email"] = value.strip()

    def _array(self, name: str) -> list[Any] | None:
        if name not in self.payload:
            return []
        value = self.payload[name]
        if not isinstance(value, list):
            self.error(name, _mismatch(value, "a/an Array"), "datatype_mismatch")
            return None
        return value

    def _tags(self) -> None:
        tags = self._array("tags")
        if tags is None:
            return
        if not all(isinstance(tag, str) for tag in tags):
            self.error("tags", MSG_STRINGS, "datatype_mismatch")
            return
        self.clean["tags"] = [tag.strip() for tag in tags if tag.strip()]

    def _cc_emails(self) -> None:
        emails = self._array("cc_emails")
        if emails is None:
            return
        if not all(isinstance(item, str) for item in emails):
            self.error("cc_emails", MSG_STRINGS, "datatype_mismatch")
            return
        # `"Name" <a@b.c>` is accepted: only the address inside the brackets is checked.
        addresses = [_NAMED_EMAIL.sub(r"\1", item).strip() for item in emails]
        if not all(_is_email(item) for item in addresses):
            self.error("cc_emails", MSG_EMAILS, "invalid_value")
            return
        self.clean["cc_emails"] = addresses

    def _ticket_type(self) -> None:
        value = self.payload.get("type")
        if value is None:
            return
        if value not in self.config.ticket_types:
            self.error("type", _one_of(self.config.ticket_types), "invalid_value")
        else:
            self.clean["type"] = value

    def _datetime(self, name: str) -> None:
        value = self.payload.get(name)
        if value is None:
            return
        parsed = _parse_datetime(value) if isinstance(value, str) else None
        if parsed is None:
            self.error(name, MSG_DATETIME, "invalid_value")
        else:
            self.clean[name] = parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _custom_fields(self) -> None:
        raw = self.payload.get("custom_fields", {})
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.error("custom_fields", _mismatch(raw, "a/an key/value pair"), "datatype_mismatch")
            raw = {}
        specs = {spec.name: spec for spec in self.config.ticket_fields}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            spec = specs.get(key)
            if spec is None:
                self.error(f"custom_fields.{key}", MSG_INVALID_FIELD, "invalid_field")
            elif value is not None:
                values[key] = self._custom_value(spec, value)
        for spec in self.config.ticket_fields:
            if spec.required_for_agents and raw.get(spec.name) is None:
                message = (
                    _one_of(spec.choices)
                    if spec.type == "dropdown"
                    else _REQUIRED_MESSAGES[spec.type]
                )
                self.error(f"custom_fields.{spec.name}", message, "missing_field")
        self.clean["custom_fields"] = {
            spec.name: values.get(spec.name) for spec in self.config.ticket_fields
        }

    def _custom_value(self, spec: TicketField, value: Any) -> Any:
        check = _CUSTOM_CHECKS[spec.type]
        clean, problem = check(spec, value, self.form, self.config.text_field_max)
        if problem is not None:
            self.error(f"custom_fields.{spec.name}", problem[0], problem[1])
        return clean

    def _requester(self) -> None:
        if all(self.payload.get(key) in (None, "") for key in REQUESTER_KEYS):
            self.error("requester_id", MSG_NO_REQUESTER, "missing_field")
            return
        requester_id = self.clean.get("requester_id")
        if requester_id is not None and self.contacts.by_id(requester_id) is None:
            self.error(
                "requester_id",
                "There is no contact matching the given requester_id",
                "invalid_value",
            )
        facebook_id = self.clean.get("facebook_id")
        if facebook_id is not None and self.contacts.find("facebook_id", facebook_id) is None:
            self.error(
                "facebook_id", "There is no contact matching the given facebook_id", "invalid_value"
            )
        if "phone" in self.clean and "email" not in self.clean and "name" not in self.clean:
            self.error("name", MSG_STRING, "missing_field")


def _attachment_errors(body: CreateInput, config: SimulatorConfig) -> list[dict[str, str]]:
    """Attachments: multipart file parts only, within the account's total size limit."""
    value = body.payload.get("attachments")
    if body.bad_attachment_part or (isinstance(value, list) and value):
        return [{"field": "attachments", "message": MSG_NOT_FILE, "code": "datatype_mismatch"}]
    if value is not None and not isinstance(value, list):
        return [
            {
                "field": "attachments",
                "message": _mismatch(value, "a/an Array"),
                "code": "datatype_mismatch",
            }
        ]
    total = sum(item.size for item in body.attachments)
    if total > config.attachment_limit_bytes:
        limit_mb = config.attachment_limit_bytes / (1024 * 1024)
        message = f"The cumulative attachment size should not exceed {limit_mb:g} MB"
        return [{"field": "attachments", "message": message, "code": "invalid_value"}]
    return []


def validate_create(
    body: CreateInput, config: SimulatorConfig, contacts: ContactBook
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Return the cleaned fields and every validation error of a create body (none: valid)."""
    validator = _CreateValidator(config, contacts, body)
    validator.run()
    return validator.clean, validator.errors + _attachment_errors(body, config)


# --- Contacts -----------------------------------------------------------------------------


@dataclass(slots=True)
class Contact:
    """A requester; ids are large numbers like real contact ids."""

    id: int
    name: str
    created_at: str
    email: str | None = None
    phone: str | None = None
    twitter_id: str | None = None
    facebook_id: str | None = None
    unique_external_id: str | None = None
    company_id: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "phone": self.phone,
            "mobile": None,
            "twitter_id": self.twitter_id,
            "facebook_id": self.facebook_id,
            "unique_external_id": self.unique_external_id,
            "company_id": self.company_id,
            "active": False,
            "address": None,
            "description": None,
            "job_title": None,
            "language": "en",
            "time_zone": "UTC",
            "tags": [],
            "other_emails": [],
            "custom_fields": {},
            "created_at": self.created_at,
            "updated_at": self.created_at,
        }


_CONTACT_KEYS = ("email", "phone", "twitter_id", "unique_external_id", "facebook_id")


class ContactBook:
    """Contacts indexed by id and by each identifier, so lookups never scan."""

    def __init__(self) -> None:
        self._by_id: dict[int, Contact] = {}
        self._index: dict[str, dict[str, Contact]] = {key: {} for key in _CONTACT_KEYS}

    def __len__(self) -> int:
        return len(self._by_id)

    def by_id(self, contact_id: int) -> Contact | None:
        return self._by_id.get(contact_id)

    def find(self, key: str, value: str) -> Contact | None:
        return self._index[key].get(value.lower() if key == "email" else value)

    def all(self) -> list[Contact]:
        return list(self._by_id.values())

    def add(self, identity: Mapping[str, Any], created_at: str) -> Contact:
        contact_id = CONTACT_ID_BASE + len(self._by_id) + 1
        name = identity.get("name") or _default_name(identity)
        contact = Contact(contact_id, str(name), created_at)
        for key in _CONTACT_KEYS:
            value = identity.get(key)
            if isinstance(value, str) and value:
                setattr(contact, key, value)
                self._index[key][value.lower() if key == "email" else value] = contact
        if isinstance(identity.get("company_id"), int):
            contact.company_id = identity["company_id"]
        self._by_id[contact_id] = contact
        return contact

    def resolve(self, clean: Mapping[str, Any], created_at: str) -> Contact:
        """The requester of a valid create: an existing contact, or a new one (reference §2.2)."""
        if clean.get("requester_id") is not None:
            return self._by_id[clean["requester_id"]]
        for key in _CONTACT_KEYS:
            value = clean.get(key)
            if value is not None and (found := self.find(key, value)) is not None:
                return found
        return self.add(clean, created_at)


def _default_name(identity: Mapping[str, Any]) -> str:
    email = identity.get("email")
    if isinstance(email, str):
        return email.split("@")[0]
    for key in ("phone", "twitter_id", "unique_external_id"):
        if identity.get(key):
            return str(identity[key])
    return "Unknown"


# --- Rate limiting ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quota:
    """What the X-Ratelimit-* headers report: one bucket after this call."""

    total: int
    remaining: int
    cost: int

    def headers(self) -> dict[str, str]:
        return {
            "X-Ratelimit-Total": str(self.total),
            "X-Ratelimit-Remaining": str(self.remaining),
            "X-Ratelimit-Used-Currentrequest": str(self.cost),
        }


class RateLimiter:
    """Fixed windows shared by every bucket of the account; a window opens at its first call."""

    def __init__(self) -> None:
        self._start = -math.inf
        self._used: dict[str, int] = {}

    def reset(self) -> None:
        self._start = -math.inf
        self._used.clear()

    def _roll(self, now: float, window: float) -> None:
        if now >= self._start + window:
            self._start = now
            self._used.clear()

    def fits(self, limits: Mapping[str, int], cost: int, now: float, window: float) -> bool:
        """Whether a call of `cost` credits fits every bucket in `limits`."""
        self._roll(now, window)
        return all(self._used.get(name, 0) + cost <= limit for name, limit in limits.items())

    def charge(self, limits: Mapping[str, int], cost: int, now: float, window: float) -> None:
        self._roll(now, window)
        for name in limits:
            self._used[name] = self._used.get(name, 0) + cost

    def quota(self, name: str, limit: int, cost: int) -> Quota:
        return Quota(limit, max(0, limit - self._used.get(name, 0)), cost)

    def retry_after(self, now: float, window: float) -> int:
        """Whole seconds until the current window ends, at least 1."""
        return max(1, math.ceil(self._start + window - now))


# --- Fault injection ----------------------------------------------------------------------

EDGE_FAULTS = {"500_html": 500, "502_html": 502, "503_html": 503, "504_html": 504}
AFTER_CREATE = frozenset({"500_json", "reset", "hang", "201_text_plain", "201_empty", *EDGE_FAULTS})
FAULT_KINDS = frozenset(
    {"latency", "500_json", "429", "reset", "hang", "create_then_fail", "respond", *EDGE_FAULTS}
)
_FAULT_KEYS = frozenset(
    {"fault", "match", "seconds", "retry_after", "then", "status", "headers", "body", "count", "p"}
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected misbehaviour; see docs/simulator.md for what each kind does."""

    kind: str
    match: Literal["any", "create"] = "any"
    seconds: float | None = None
    retry_after: int | None = 1
    then: str = "504_html"
    status: int = 500
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""

    def applies_to(self, is_create: bool) -> bool:
        return self.match == "any" or is_create

    def after_create(self) -> Fault:
        """The failure a `create_then_fail` answers with once the ticket exists."""
        return Fault(self.then, seconds=self.seconds, retry_after=self.retry_after)

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> Fault:
        """Build a fault from its control-surface JSON; raises ValueError when malformed."""
        unknown = set(spec) - _FAULT_KEYS
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        kind = spec.get("fault")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault must be one of {sorted(FAULT_KINDS)}")
        match = spec.get("match", "any")
        if match not in ("any", "create"):
            raise ValueError("match must be 'any' or 'create'")
        then = spec.get("then", "504_html")
        if then not in AFTER_CREATE:
            raise ValueError(f"then must be one of {sorted(AFTER_CREATE)}")
        return cls(
            kind=str(kind),
            match=match,
            seconds=_optional_number(spec, "seconds"),
            retry_after=_retry_after(spec),
            then=str(then),
            status=int(spec.get("status", 500)),
            headers={str(key): str(value) for key, value in dict(spec.get("headers", {})).items()},
            body=str(spec.get("body", "")),
        )


def _optional_number(spec: Mapping[str, Any], key: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key} must be a non-negative number")
    return float(value)


def _retry_after(spec: Mapping[str, Any]) -> int | None:
    """`retry_after` absent: 1 second; explicit null: the 429 carries no Retry-After."""
    if "retry_after" not in spec:
        return 1
    value = _optional_number(spec, "retry_after")
    return None if value is None else int(value)


class FaultPlan:
    """The scripted FIFO, the random rates and the outage switch, consulted once per API call."""

    def __init__(self, seed: int | None = None) -> None:
        self.script: list[Fault] = []
        self.rates: list[tuple[float, Fault]] = []
        self.down = False
        self.rng = random.Random(seed)

    def clear(self) -> None:
        self.script.clear()
        self.rates.clear()
        self.down = False

    def next_for(self, is_create: bool) -> Fault | None:
        """Take the first scripted fault that matches, else draw one from the rates."""
        for position, fault in enumerate(self.script):
            if fault.applies_to(is_create):
                return self.script.pop(position)
        if not self.rates:
            return None
        draw = self.rng.random()
        for probability, fault in self.rates:
            draw -= probability
            if draw < 0:
                return fault if fault.applies_to(is_create) else None
        return None

    def load(self, payload: Mapping[str, Any]) -> None:
        """Apply a POST /_simulator/faults body; raises ValueError, leaving the plan unchanged."""
        script = [fault for spec in _list(payload, "script") for fault in _repeat(spec)]
        rates = _rates(payload) if "rates" in payload else None
        seed = payload.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        if payload.get("clear"):
            self.clear()
        if seed is not None:
            self.rng.seed(seed)
        if "down" in payload:
            self.down = bool(payload["down"])
        self.script.extend(script)
        if rates is not None:
            self.rates = rates

    def describe(self) -> dict[str, Any]:
        return {
            "script": [fault.kind for fault in self.script],
            "rates": {fault.kind: probability for probability, fault in self.rates},
            "down": self.down,
        }


def _list(payload: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = payload.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"{key} must be a list of objects")
    return value


def _repeat(spec: Mapping[str, Any]) -> list[Fault]:
    count = spec.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    return [Fault.from_json(spec)] * count


def _rates(payload: Mapping[str, Any]) -> list[tuple[float, Fault]]:
    """`{"kind": p}` or `{"kind": {"p": p, ...fault options}}`; probabilities sum to at most 1."""
    raw = payload["rates"]
    if not isinstance(raw, dict):
        raise ValueError("rates must be an object")
    rates: list[tuple[float, Fault]] = []
    for kind, value in sorted(raw.items()):
        spec = dict(value) if isinstance(value, dict) else {"p": value}
        probability = spec.pop("p", None)
        if isinstance(probability, bool) or not isinstance(probability, int | float):
            raise ValueError(f"rate of {kind} must be a number")
        spec.setdefault("match", payload.get("match", "any"))
        rates.append((float(probability), Fault.from_json({"fault": kind, **spec})))
    if sum(probability for probability, _ in rates) > 1.0 + 1e-9:
        raise ValueError("rates must sum to at most 1")
    return rates


# --- Search query language (reference §5) ----------------------------------------------

Predicate = Callable[[Mapping[str, Any]], bool]
_SEARCH_TOKEN = re.compile(
    r"\s*(?:(?P<paren>[()])|(?P<join>AND|OR)(?![A-Za-z0-9_])|"
    r"(?P<field>[A-Za-z_][A-Za-z0-9_]*)\s*:\s*(?P<op>[<>]?)\s*"
    r"(?P<value>'[^']*'|-?\d+(?:\.\d+)?|null|true|false))"
)
_SEARCH_DATES = ("due_by", "fr_due_by", "created_at", "updated_at")
_SEARCH_PLAIN = {"agent_id": "responder_id", "group_id": "group_id", "priority": "priority",
                 "status": "status", "type": "type"}  # fmt: skip


class SearchError(ValueError):
    """A query Freshdesk would answer with 400 Validation failed; args: field, message, code."""


def _search_tokens(query: str) -> list[tuple[str, ...]]:
    tokens: list[tuple[str, ...]] = []
    position = 0
    while position < len(query):
        if not query[position:].strip():
            break
        match = _SEARCH_TOKEN.match(query, position)
        if match is None:
            raise SearchError("query", "Given query is invalid", "invalid_value")
        if match["paren"]:
            tokens.append((match["paren"],))
        elif match["join"]:
            tokens.append((match["join"],))
        else:
            tokens.append(("cond", match["field"], match["op"], match["value"]))
        position = match.end()
    return tokens


def _literal(text: str) -> Any:
    if text.startswith("'"):
        return text[1:-1]
    if text in ("null", "true", "false"):
        return {"null": None, "true": True, "false": False}[text]
    return float(text) if "." in text else int(text)


def _compare(actual: Any, op: str, expected: Any) -> bool:
    if op == "" or expected is None:
        return bool(actual == expected)
    if actual is None or isinstance(actual, bool) != isinstance(expected, bool):
        return False
    try:
        return bool(actual >= expected) if op == ">" else bool(actual <= expected)
    except TypeError:
        return False


class _SearchParser:
    """Recursive descent over `cond (AND|OR) cond`, parentheses, AND binding tighter."""

    def __init__(self, tokens: list[tuple[str, ...]], fields: Sequence[TicketField]) -> None:
        self.tokens = tokens
        self.position = 0
        self.fields = {spec.name: spec for spec in fields}

    def parse(self) -> Predicate:
        predicate = self._or()
        if self.position != len(self.tokens):
            raise SearchError("query", "Given query is invalid", "invalid_value")
        return predicate

    def _peek(self) -> str | None:
        return self.tokens[self.position][0] if self.position < len(self.tokens) else None

    def _or(self) -> Predicate:
        parts = [self._and()]
        while self._peek() == "OR":
            self.position += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else lambda ticket: any(part(ticket) for part in parts)

    def _and(self) -> Predicate:
        parts = [self._atom()]
        while self._peek() == "AND":
            self.position += 1
            parts.append(self._atom())
        return parts[0] if len(parts) == 1 else lambda ticket: all(part(ticket) for part in parts)

    def _atom(self) -> Predicate:
        token = self.tokens[self.position] if self.position < len(self.tokens) else ("end",)
        self.position += 1
        if token[0] == "(":
            inner = self._or()
            if self._peek() != ")":
                raise SearchError("query", "Given query is invalid", "invalid_value")
            self.position += 1
            return inner
        if token[0] != "cond":
            raise SearchError("query", "Given query is invalid", "invalid_value")
        return self._condition(token[1], token[2], _literal(token[3]))

    def _condition(self, name: str, op: str, expected: Any) -> Predicate:
        if name == "tag":
            return lambda ticket: expected in ticket["tags"]
        if name in _SEARCH_PLAIN:
            key = _SEARCH_PLAIN[name]
            return lambda ticket: _compare(ticket[key], op, expected)
        if name in _SEARCH_DATES:
            return lambda ticket: _compare((ticket[name] or "")[:10] or None, op, expected)
        if name == "custom_string":
            texts = [spec.name for spec in self.fields.values() if spec.type == "text"]
            return lambda ticket: any(ticket["custom_fields"][key] == expected for key in texts)
        key = name if name in self.fields else f"cf_{name}"
        if key not in self.fields:
            raise SearchError(name, MSG_INVALID_FIELD, "invalid_field")
        return lambda ticket: _compare(ticket["custom_fields"][key], op, expected)


def parse_search(query: str | None, fields: Sequence[TicketField]) -> Predicate:
    """Turn a `query` parameter into a ticket predicate; raises SearchError like Freshdesk."""
    if query is None:
        raise SearchError("query", MSG_STRING, "missing_field")
    if len(query) > SEARCH_MAX_QUERY:
        raise SearchError("query", _too_long(query, SEARCH_MAX_QUERY), "invalid_value")
    if len(query) < 2 or not (query.startswith('"') and query.endswith('"')):
        raise SearchError("query", "It should be enclosed in double quotes", "invalid_value")
    return _SearchParser(_search_tokens(query[1:-1]), fields).parse()


# --- State --------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """One API call as the simulator saw it; `status` is None while in flight or when dropped."""

    method: str
    path: str
    time: float
    request_id: str
    status: int | None = None
    ticket_id: int | None = None
    fault: str | None = None
    submission_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Simulator:
    """The account's state: tickets, contacts, the request log, rate windows and faults.

    Tests reach it in-process through `app[SIMULATOR_KEY]` or `RunningSimulator.state`.
    Ticket `n` is `tickets[n - 1]`, the exact JSON the create answered with.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        # A copy: runtime changes must not leak into a config object the caller shares.
        self.config = replace(config) if config is not None else SimulatorConfig()
        self.faults = FaultPlan(self.config.seed)
        self.limiter = RateLimiter()
        self.tickets: list[dict[str, Any]] = []
        self.contacts = ContactBook()
        self.requests: deque[RequestRecord] = deque(maxlen=self.config.request_log_limit)
        self._created: list[float] = []
        self._by_requester: dict[int, list[int]] = {}
        self._next_attachment = ATTACHMENT_ID_BASE
        self.closing = asyncio.Event()
        self.reset()

    def now(self) -> float:
        return self.config.clock()

    def reset(self) -> None:
        """Forget tickets, contacts (back to the seeded ones), requests, faults and windows."""
        self.tickets.clear()
        self._created.clear()
        self._by_requester.clear()
        self.requests.clear()
        self.faults.clear()
        self.limiter.reset()
        self.contacts = ContactBook()
        for seeded in self.config.contacts:
            self.contacts.add(seeded, _timestamp(self.now()))

    def configure(self, changes: Mapping[str, Any]) -> None:
        """Change runtime settings (POST /_simulator/config); raises ValueError, changes nothing."""
        converted = {name: _setting_value(name, value) for name, value in changes.items()}
        for name, value in converted.items():
            setattr(self.config, name, value)
        if converted.keys() & {"account_limit", "create_limit", "list_limit", "window_seconds"}:
            self.limiter.reset()

    def latency(self) -> float:
        jitter = self.config.latency_jitter
        return self.config.latency + (self.faults.rng.uniform(0, jitter) if jitter > 0 else 0.0)

    async def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`; returns False when the server shuts down first."""
        if seconds <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.closing.wait()
            return False
        return True

    def record(self, method: str, path: str) -> RequestRecord:
        entry = RequestRecord(method, path, self.now(), str(uuid.uuid4()))
        self.requests.append(entry)
        return entry

    def create_ticket(
        self, clean: Mapping[str, Any], attachments: Sequence[Attachment]
    ) -> dict[str, Any]:
        """Store a validated ticket and return its JSON; creates the requester contact if new."""
        now = self.now()
        stamp = _timestamp(now)
        requester = self.contacts.resolve(clean, stamp)
        ticket = _ticket_json(len(self.tickets) + 1, clean, requester, stamp)
        ticket["attachments"] = [self._attachment_json(item, stamp) for item in attachments]
        self.tickets.append(ticket)
        self._created.append(now)
        self._by_requester.setdefault(requester.id, []).append(len(self.tickets) - 1)
        return ticket

    def _attachment_json(self, item: Attachment, stamp: str) -> dict[str, Any]:
        self._next_attachment += 1
        return {
            "id": self._next_attachment,
            "name": item.name,
            "content_type": item.content_type,
            "size": item.size,
            "attachment_url": f"https://attachments.invalid/{self._next_attachment}/{item.name}",
            "created_at": stamp,
            "updated_at": stamp,
        }

    def ticket(self, ticket_id: int) -> dict[str, Any] | None:
        """The stored ticket, with SLA dates filled once `sla_delay` has passed."""
        if not 1 <= ticket_id <= len(self.tickets):
            return None
        self._settle_sla(ticket_id - 1)
        return self.tickets[ticket_id - 1]

    def _settle_sla(self, index: int) -> None:
        ticket = self.tickets[index]
        delay = self.config.sla_delay
        if (
            ticket["due_by"] is not None
            or delay is None
            or self.now() - self._created[index] < delay
        ):
            return
        created = self._created[index]
        ticket["fr_due_by"] = ticket["fr_due_by"] or _timestamp(created + 86400)
        ticket["due_by"] = _timestamp(created + 3 * 86400)

    def recent(self, since: float) -> range:
        """Indexes of tickets created at or after `since` (creation times only grow)."""
        return range(bisect.bisect_left(self._created, since), len(self.tickets))

    def indexed(self, until: float) -> range:
        """Indexes of tickets the search index already holds: created at or before `until`."""
        return range(bisect.bisect_right(self._created, until))

    def by_requester(self, contact_id: int) -> list[int]:
        return self._by_requester.get(contact_id, [])

    def created_at(self, index: int) -> float:
        return self._created[index]


def _ticket_json(
    ticket_id: int, clean: Mapping[str, Any], requester: Contact, stamp: str
) -> dict[str, Any]:
    """The full ticket object of reference §2.5: blank values are null, never omitted."""
    description = _description_html(clean["description"])
    cc_emails = list(clean.get("cc_emails", []))
    return {
        "id": ticket_id,
        "subject": clean["subject"],
        "description": description,
        "description_text": _description_text(description),
        "status": clean["status"],
        "priority": clean["priority"],
        "source": clean.get("source", 2),
        "type": clean.get("type"),
        "requester_id": requester.id,
        "responder_id": clean.get("responder_id"),
        "group_id": clean.get("group_id"),
        "company_id": clean.get("company_id", requester.company_id),
        "product_id": clean.get("product_id"),
        "email_config_id": clean.get("email_config_id"),
        "cc_emails": cc_emails,
        "fwd_emails": [],
        "reply_cc_emails": list(cc_emails),
        "ticket_cc_emails": list(cc_emails),
        "to_emails": None,
        "support_email": None,
        "fr_escalated": False,
        "is_escalated": False,
        "spam": False,
        "association_type": None,
        "due_by": clean.get("due_by"),
        "fr_due_by": clean.get("fr_due_by"),
        "custom_fields": clean["custom_fields"],
        "tags": clean.get("tags", []),
        "attachments": [],
        "source_additional_info": None,
        "created_at": stamp,
        "updated_at": stamp,
    }


# --- HTTP: answers and endpoints ------------------------------------------------------


@dataclass(slots=True)
class Answer:
    """What an endpoint replies; `body` None means an empty body."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    ticket_id: int | None = None


def _invalid(errors: list[dict[str, str]]) -> Answer:
    return Answer(400, {"description": "Validation failed", "errors": errors})


def _field_error(name: str, message: str, code: str) -> Answer:
    return _invalid([{"field": name, "message": message, "code": code}])


Handler = Callable[[Simulator, web.Request, str], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One verb on one resource: its handler, its rate-limit bucket and what each include costs."""

    handler: Handler
    bucket: str | None = None
    include_cost: int = 0


def _includes(request: web.Request) -> list[str]:
    return [item.strip() for item in request.query.get("include", "").split(",") if item.strip()]


def _paging(query: Mapping[str, str], max_page: int | None = None) -> tuple[int, int] | Answer:
    """`page` and `per_page` (default 30, at most 100), or the 400 Freshdesk gives."""
    numbers: dict[str, int] = {"page": 1, "per_page": 30}
    for name in numbers:
        text = query.get(name)
        if text is None:
            continue
        value = int(text) if _INTEGER_TEXT.fullmatch(text) else 0
        upper = MAX_PER_PAGE if name == "per_page" else max_page
        if value < 1 or (upper is not None and value > upper):
            bound = f" less than or equal to {upper}" if upper is not None else ""
            return _field_error(name, f"It should be a/an Positive Integer{bound}", "invalid_value")
        numbers[name] = value
    return numbers["page"], numbers["per_page"]


def _unknown_params(query: Mapping[str, str], allowed: frozenset[str]) -> Answer | None:
    errors = [
        {"field": name, "message": MSG_INVALID_FIELD, "code": "invalid_field"}
        for name in query
        if name not in allowed
    ]
    return _invalid(errors) if errors else None


def _next_link(request: web.Request, page: int) -> dict[str, str]:
    return {"Link": f'<{request.url.update_query(page=page + 1)}>;rel="next"'}


def _requester_json(contact: Contact | None) -> dict[str, Any] | None:
    if contact is None:
        return None
    return {
        "id": contact.id,
        "name": contact.name,
        "email": contact.email,
        "mobile": None,
        "phone": contact.phone,
    }


def _stats_json(ticket: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "agent_responded_at": None,
        "requester_responded_at": None,
        "first_responded_at": None,
        "status_updated_at": ticket["created_at"],
        "reopened_at": None,
        "resolved_at": None,
        "closed_at": None,
        "pending_since": None,
    }


def _list_item(
    sim: Simulator, ticket: Mapping[str, Any], includes: Sequence[str]
) -> dict[str, Any]:
    """A ticket as list and search show it: no description unless `include=description`."""
    item = {
        key: value
        for key, value in ticket.items()
        if key not in ("description", "description_text", "attachments")
    }
    if "description" in includes:
        item["description"] = ticket["description"]
        item["description_text"] = ticket["description_text"]
    if "requester" in includes:
        item["requester"] = _requester_json(sim.contacts.by_id(ticket["requester_id"]))
    if "stats" in includes:
        item["stats"] = _stats_json(ticket)
    return item


# POST /api/v2/tickets -------------------------------------------------------------------


async def _create_ticket(sim: Simulator, request: web.Request, _: str) -> Answer:
    body = await _read_create_body(request)
    if isinstance(body, Answer):
        return body
    if body.nested_custom_field:
        # Badly nested custom fields in form data made Freshdesk fail with a 500 (NF PR #147).
        return Answer(500, INTERNAL_ERROR)
    clean, errors = validate_create(body, sim.config, sim.contacts)
    if errors:
        return _invalid(errors)
    ticket = sim.create_ticket(clean, body.attachments)
    location = str(request.url.with_path(f"/api/v2/tickets/{ticket['id']}").with_query(None))
    return Answer(201, ticket, {"Location": location}, ticket_id=ticket["id"])


async def _read_create_body(request: web.Request) -> CreateInput | Answer:
    if request.content_type == "multipart/form-data":
        return await _read_multipart(request)
    if request.content_type != "application/json":
        return Answer(415, UNSUPPORTED_MEDIA)
    try:
        payload = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return Answer(400, INVALID_JSON)
    if not isinstance(payload, dict):
        return Answer(400, INVALID_JSON)
    return CreateInput(payload)


async def _read_multipart(request: web.Request) -> CreateInput:
    """Form fields as strings, `name[]` as arrays, `custom_fields[x]`, `attachments[]` files."""
    body = CreateInput({}, form=True)
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if isinstance(part, BodyPartReader):
            await _take_part(body, part)
    return body


async def _take_part(body: CreateInput, part: BodyPartReader) -> None:
    name = part.name or ""
    if part.filename is not None:
        size = 0
        while chunk := await part.read_chunk():
            size += len(chunk)
        content_type = part.headers.get("Content-Type")
        # A text field sent as a file part is simply not seen (FS #37, #78).
        if name == "attachments[]" and content_type:
            body.attachments.append(Attachment(part.filename, content_type, size))
        elif name == "attachments[]":
            body.bad_attachment_part = True
        return
    text = await part.text()
    if name == "attachments[]":
        body.bad_attachment_part = True
    elif custom := _CUSTOM_PART.fullmatch(name):
        body.nested_custom_field = body.nested_custom_field or bool(custom[2])
        body.payload.setdefault("custom_fields", {})[custom[1]] = text
    elif name.endswith("[]"):
        body.payload.setdefault(name[:-2], []).append(text)
    else:
        body.payload[name] = text


# GET /api/v2/tickets/{id} ---------------------------------------------------------------

_VIEW_INCLUDES = ("conversations", "requester", "company", "stats")


async def _view_ticket(sim: Simulator, request: web.Request, ticket_ref: str) -> Answer:
    ticket = sim.ticket(int(ticket_ref)) if ticket_ref.isdigit() else None
    if ticket is None:
        return Answer(404)
    includes = _includes(request)
    if any(item not in _VIEW_INCLUDES for item in includes):
        return _field_error("include", _one_of(_VIEW_INCLUDES), "invalid_value")
    body = dict(ticket)
    if "conversations" in includes:
        body["conversations"] = []
    if "requester" in includes:
        body["requester"] = _requester_json(sim.contacts.by_id(ticket["requester_id"]))
    if "company" in includes:
        company_id = ticket["company_id"]
        body["company"] = (
            None if company_id is None else {"id": company_id, "name": f"Company {company_id}"}
        )
    if "stats" in includes:
        body["stats"] = _stats_json(ticket)
    return Answer(200, body, ticket_id=ticket["id"])


# GET /api/v2/tickets ----------------------------------------------------------------------

_LIST_PARAMS = frozenset(
    {"requester_id", "email", "unique_external_id", "company_id", "updated_since", "order_by",
     "order_type", "page", "per_page", "include", "filter"}
)  # fmt: skip
_LIST_INCLUDES = ("description", "requester", "stats")
_ORDER_BY = ("created_at", "due_by", "updated_at", "status")
_FILTERS = ("new_and_my_open", "watching", "spam", "deleted")


@dataclass(slots=True)
class _ListQuery:
    page: int = 1
    per_page: int = 30
    requester_ids: list[int] | None = None
    company_id: int | None = None
    since: float | None = None
    order_by: str = "created_at"
    descending: bool = True
    filter: str | None = None
    includes: list[str] = field(default_factory=list)


def _parse_list_query(sim: Simulator, request: web.Request) -> _ListQuery | Answer:
    query = request.query
    problem = _unknown_params(query, _LIST_PARAMS) or _list_choices(query, request)
    if problem is not None:
        return problem
    paging = _paging(query)
    if isinstance(paging, Answer):
        return paging
    parsed = _ListQuery(paging[0], paging[1], includes=_includes(request))
    parsed.order_by = query.get("order_by", "created_at")
    parsed.descending = query.get("order_type", "desc") == "desc"
    parsed.filter = query.get("filter")
    return _list_filters(sim, query, parsed)


def _list_choices(query: Mapping[str, str], request: web.Request) -> Answer | None:
    checks = (
        ("order_by", _ORDER_BY),
        ("order_type", ("asc", "desc")),
        ("filter", _FILTERS),
    )
    for name, allowed in checks:
        if name in query and query[name] not in allowed:
            return _field_error(name, _one_of(allowed), "invalid_value")
    if any(item not in _LIST_INCLUDES for item in _includes(request)):
        return _field_error("include", _one_of(_LIST_INCLUDES), "invalid_value")
    return None


def _list_filters(
    sim: Simulator, query: Mapping[str, str], parsed: _ListQuery
) -> _ListQuery | Answer:
    for name in ("requester_id", "company_id"):
        if name in query and not _INTEGER_TEXT.fullmatch(query[name]):
            return _field_error(name, _mismatch(query[name], "a/an Integer"), "datatype_mismatch")
    if "requester_id" in query:
        parsed.requester_ids = [int(query["requester_id"])]
    for key in ("email", "unique_external_id"):
        if key in query:
            contact = sim.contacts.find(key, query[key])
            parsed.requester_ids = [contact.id] if contact is not None else []
    if "company_id" in query:
        parsed.company_id = int(query["company_id"])
    if "updated_since" in query:
        since = _parse_datetime(query["updated_since"])
        if since is None:
            return _field_error("updated_since", MSG_DATETIME, "invalid_value")
        parsed.since = since.timestamp()
    return parsed


def _list_candidates(sim: Simulator, query: _ListQuery) -> list[int]:
    """Ticket indexes in creation order, narrowed by requester and by the time window."""
    since = query.since if query.since is not None else sim.now() - LIST_WINDOW_SECONDS
    if query.requester_ids is None:
        return list(sim.recent(since))
    indexes = sorted(index for rid in query.requester_ids for index in sim.by_requester(rid))
    return [index for index in indexes if sim.created_at(index) >= since]


def _matches_list(ticket: Mapping[str, Any], query: _ListQuery) -> bool:
    if query.company_id is not None and ticket["company_id"] != query.company_id:
        return False
    if query.filter == "new_and_my_open":
        return bool(ticket["status"] == 2)
    # Nothing is ever spam, deleted or watched in the simulator.
    return query.filter is None


def _sort_key(order_by: str) -> Callable[[Mapping[str, Any]], Any]:
    if order_by == "status":
        return lambda ticket: ticket["status"]
    if order_by == "due_by":
        return lambda ticket: ticket["due_by"] or ""
    return lambda ticket: ticket["id"]  # created_at and updated_at follow the id sequence


async def _list_tickets(sim: Simulator, request: web.Request, _: str) -> Answer:
    query = _parse_list_query(sim, request)
    if isinstance(query, Answer):
        return query
    tickets = [
        ticket
        for index in _list_candidates(sim, query)
        if (ticket := sim.ticket(index + 1)) is not None and _matches_list(ticket, query)
    ]
    tickets.sort(key=_sort_key(query.order_by), reverse=query.descending)
    start = (query.page - 1) * query.per_page
    page = tickets[start : start + query.per_page]
    headers = _next_link(request, query.page) if start + query.per_page < len(tickets) else {}
    return Answer(200, [_list_item(sim, ticket, query.includes) for ticket in page], headers)


# GET /api/v2/search/tickets ---------------------------------------------------------------


async def _search_tickets(sim: Simulator, request: web.Request, _: str) -> Answer:
    problem = _unknown_params(request.query, frozenset({"query", "page"}))
    if problem is not None:
        return problem
    paging = _paging({"page": request.query.get("page", "1")}, max_page=SEARCH_MAX_PAGE)
    if isinstance(paging, Answer):
        return paging
    try:
        predicate = parse_search(request.query.get("query"), sim.config.ticket_fields)
    except SearchError as exc:
        return _field_error(*exc.args)
    # Freshdesk indexes asynchronously: a ticket is findable only some minutes after creation.
    visible = sim.indexed(sim.now() - sim.config.search_index_delay)
    found = [sim.tickets[index] for index in reversed(visible) if predicate(sim.tickets[index])]
    start = (paging[0] - 1) * SEARCH_PAGE_SIZE
    results = [_list_item(sim, ticket, ()) for ticket in found[start : start + SEARCH_PAGE_SIZE]]
    return Answer(200, {"results": results, "total": len(found)})


# GET /api/v2/ticket_fields, GET /api/v2/contacts -------------------------------------------


def _field_json(position: int, name: str, label: str, kind: str, choices: Any) -> dict[str, Any]:
    return {
        "id": FIELD_ID_BASE + position,
        "name": name,
        "label": label,
        "label_for_customers": label,
        "description": None,
        "position": position,
        "type": kind,
        "default": kind.startswith("default_"),
        "choices": choices,
        "required_for_closure": False,
        "required_for_agents": False,
        "required_for_customers": False,
        "customers_can_edit": False,
        "displayed_to_customers": False,
    }


async def _ticket_fields(sim: Simulator, request: web.Request, _: str) -> Answer:
    config = sim.config
    defaults: list[tuple[str, str, str, Any]] = [
        ("requester", "Search a requester", "default_requester", []),
        ("subject", "Subject", "default_subject", []),
        ("ticket_type", "Type", "default_ticket_type", list(config.ticket_types)),
        ("source", "Source", "default_source", {str(code): code for code in SOURCES}),
        (
            "status",
            "Status",
            "default_status",
            {str(code): [str(code)] for code in config.statuses},
        ),
        ("priority", "Priority", "default_priority", {str(code): code for code in PRIORITIES}),
        ("description", "Description", "default_description", []),
    ]
    fields = [_field_json(position, *item) for position, item in enumerate(defaults, start=1)]
    for position, spec in enumerate(config.ticket_fields, start=len(defaults) + 1):
        item = _field_json(
            position, spec.name, spec.label or spec.name, f"custom_{spec.type}", list(spec.choices)
        )
        item["required_for_agents"] = spec.required_for_agents
        fields.append(item)
    return Answer(200, fields)


_CONTACT_PARAMS = frozenset({"email", "phone", "mobile", "unique_external_id", "page", "per_page"})


async def _list_contacts(sim: Simulator, request: web.Request, _: str) -> Answer:
    query = request.query
    problem = _unknown_params(query, _CONTACT_PARAMS)
    paging = problem or _paging(query)
    if isinstance(paging, Answer):
        return paging
    contacts = sim.contacts.all()
    for key in ("email", "phone", "unique_external_id"):
        if key in query:
            found = sim.contacts.find(key, query[key])
            contacts = [contact for contact in contacts if contact is found]
    if "mobile" in query:
        contacts = []  # contacts never carry a mobile number here
    page, per_page = paging
    start = (page - 1) * per_page
    headers = _next_link(request, page) if start + per_page < len(contacts) else {}
    return Answer(
        200, [contact.as_json() for contact in contacts[start : start + per_page]], headers
    )


# --- HTTP: routing and the request pipeline -------------------------------------------------

_ROUTES: list[tuple[re.Pattern[str], dict[str, Endpoint]]] = [
    (re.compile(r"/api/v2/tickets"), {
        "GET": Endpoint(_list_tickets, "list", include_cost=2),
        "POST": Endpoint(_create_ticket, "create"),
    }),
    (_TICKET_PATH, {"GET": Endpoint(_view_ticket, None, include_cost=1)}),
    (re.compile(r"/api/v2/search/tickets"), {"GET": Endpoint(_search_tickets)}),
    (re.compile(r"/api/v2/ticket_fields"), {"GET": Endpoint(_ticket_fields)}),
    (re.compile(r"/api/v2/contacts"), {"GET": Endpoint(_list_contacts, "contacts")}),
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a request landed: its endpoint (None: 404 or 405), the verbs allowed there, the id."""

    endpoint: Endpoint | None
    allowed: tuple[str, ...]
    argument: str = ""

    @property
    def is_create(self) -> bool:
        return self.endpoint is not None and self.endpoint.handler is _create_ticket


def _resolve(method: str, path: str) -> _Route:
    for pattern, verbs in _ROUTES:
        match = pattern.fullmatch(path.rstrip("/") if path != "/" else path)
        if match is not None:
            argument = match.group(1) if match.groups() else ""
            return _Route(verbs.get(method), tuple(verbs), argument)
    return _Route(None, ())


def _bucket_limits(config: SimulatorConfig, bucket: str | None) -> dict[str, int]:
    limits = {"account": config.account_limit}
    if bucket is not None:
        limits[bucket] = {
            "create": config.create_limit,
            "list": config.list_limit,
            "contacts": config.list_limit,
        }[bucket]
    return limits


def _api_key(request: web.Request) -> str | None:
    """The key (Basic auth user name) or None when the header is missing or not base64."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


def _accepts_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept")
    if not accept:
        return True
    media = {item.split(";")[0].strip().lower() for item in accept.split(",")}
    return bool(media & {"application/json", "*/*", "application/*", "multipart/form-data"})


def _json_response(answer: Answer, record: RequestRecord, quota: Quota | None) -> web.Response:
    headers = {
        "Content-Type": JSON_TYPE,
        "X-Request-Id": record.request_id,
        "X-Freshdesk-Api-Version": API_VERSION,
        "Cache-Control": "no-cache, no-store, max-age=0, must-revalidate",
    }
    if quota is not None:
        headers.update(quota.headers())
    headers.update(answer.headers)
    record.ticket_id = answer.ticket_id
    body = b"" if answer.body is None else json.dumps(answer.body, separators=(",", ":")).encode()
    return web.Response(status=answer.status, body=body, headers=headers)


async def _freshdesk(
    sim: Simulator, request: web.Request, route: _Route, record: RequestRecord
) -> web.Response:
    """The faithful path: auth, rate limit, routing, Accept, then the endpoint (reference spec)."""
    config = sim.config
    endpoint = route.endpoint
    bucket = endpoint.bucket if endpoint is not None else None
    limits = _bucket_limits(config, bucket)
    cost = 1 + (endpoint.include_cost * len(_includes(request)) if endpoint is not None else 0)
    now = sim.now()
    key = _api_key(request)
    if key is None or (key not in config.api_keys and key not in config.forbidden_keys):
        answer = Answer(401, INVALID_CREDENTIALS)
    elif key in config.forbidden_keys:
        answer = Answer(403, ACCESS_DENIED)
    elif not sim.limiter.fits(limits, cost, now, config.window_seconds):
        return _rate_limited(sim, record, limits, bucket, cost, now)
    else:
        answer = await _route_answer(sim, request, route)
    # Every answer but a 429 spends credits, invalid ones included (reference §4).
    sim.limiter.charge(limits, cost, now, config.window_seconds)
    header_bucket = bucket or "account"
    return _json_response(
        answer, record, sim.limiter.quota(header_bucket, limits[header_bucket], cost)
    )


async def _route_answer(sim: Simulator, request: web.Request, route: _Route) -> Answer:
    if route.endpoint is None and not route.allowed:
        return Answer(404)
    if route.endpoint is None:
        message = f"{request.method} method is not allowed. It should be one of these method(s): "
        return Answer(405, {"message": message + ", ".join(route.allowed)})
    if not _accepts_json(request):
        return Answer(406, NOT_ACCEPTABLE)
    return await route.endpoint.handler(sim, request, route.argument)


def _rate_limited(
    sim: Simulator,
    record: RequestRecord,
    limits: Mapping[str, int],
    bucket: str | None,
    cost: int,
    now: float,
) -> web.Response:
    config = sim.config
    retry_after = sim.limiter.retry_after(now, config.window_seconds)
    if config.count_429:
        sim.limiter.charge(limits, cost, now, config.window_seconds)
    header_bucket = bucket or "account"
    quota = (
        sim.limiter.quota(header_bucket, limits[header_bucket], cost)
        if config.ratelimit_headers_on_429
        else None
    )
    answer = Answer(429, TOO_MANY_REQUESTS, {"Retry-After": str(retry_after)})
    return _json_response(answer, record, quota)


# --- HTTP: faults -----------------------------------------------------------------------------


def _drop(request: web.Request, record: RequestRecord) -> web.Response:
    """Close the connection without an answer; the client sees the server disconnect."""
    record.status = None
    if request.transport is not None:
        request.transport.abort()
    # aiohttp's attempt to write this to the aborted transport fails quietly.
    return web.Response(status=499)


def _fault_response(request: web.Request, record: RequestRecord, fault: Fault) -> web.Response:
    """The answer of an edge fault: HTML pages, a 500 JSON, a 429, or a scripted response."""
    if fault.kind in EDGE_FAULTS:
        status = EDGE_FAULTS[fault.kind]
        headers = {"Content-Type": HTML_TYPE}
        if status == 500:
            headers["X-Request-Id"] = record.request_id
        return web.Response(status=status, text=EDGE_PAGES[status], headers=headers)
    if fault.kind == "429":
        retry = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        return _json_response(Answer(429, TOO_MANY_REQUESTS, retry), record, None)
    if fault.kind == "500_json":
        return _json_response(Answer(500, INTERNAL_ERROR), record, None)
    headers = {"Content-Type": JSON_TYPE, "X-Request-Id": record.request_id, **fault.headers}
    # body as bytes: the scripted Content-Type is sent exactly as given, no charset added.
    return web.Response(status=fault.status, body=fault.body.encode(), headers=headers)


async def _apply_fault(
    sim: Simulator, request: web.Request, record: RequestRecord, fault: Fault
) -> web.Response:
    if fault.kind == "hang":
        await sim.pause(fault.seconds if fault.seconds is not None else HANG_SECONDS)
        return _drop(request, record)
    if fault.kind == "reset":
        return _drop(request, record)
    return _fault_response(request, record, fault)


async def _fail_after_create(
    sim: Simulator, request: web.Request, record: RequestRecord, fault: Fault, created: web.Response
) -> web.Response:
    """The ticket exists now; the client is told something else (or nothing)."""
    then = fault.after_create()
    if then.kind == "201_text_plain":
        created.headers["Content-Type"] = "text/plain; charset=utf-8"
        return created
    if then.kind == "201_empty":
        headers = {
            key: value for key, value in created.headers.items() if key.lower() != "content-length"
        }
        return web.Response(status=created.status, headers=headers)
    return await _apply_fault(sim, request, record, then)


async def _answer(sim: Simulator, request: web.Request, record: RequestRecord) -> web.Response:
    route = _resolve(request.method, request.path)
    fault = Fault("503_html") if sim.faults.down else sim.faults.next_for(route.is_create)
    record.fault = fault.kind if fault is not None else None
    if not await sim.pause(sim.latency()):
        return _drop(request, record)
    if fault is not None and fault.kind == "latency":
        if not await sim.pause(fault.seconds if fault.seconds is not None else 1.0):
            return _drop(request, record)
    elif fault is not None and fault.kind != "create_then_fail":
        return await _apply_fault(sim, request, record, fault)
    response = await _freshdesk(sim, request, route, record)
    if route.is_create and record.ticket_id is not None:
        record.submission_id = _submission_id(sim.tickets[record.ticket_id - 1])
    if fault is not None and fault.kind == "create_then_fail" and record.ticket_id is not None:
        # Only a create that made its ticket can lose its answer; a refused one (400, 401...)
        # is answered as Freshdesk answers it.
        return await _fail_after_create(sim, request, record, fault, response)
    return response


def _submission_id(ticket: Mapping[str, Any]) -> str | None:
    value = ticket["custom_fields"].get("cf_submission_id")
    return value if isinstance(value, str) else None


async def _api_entry(request: web.Request) -> web.StreamResponse:
    """Every path outside /_simulator: Freshdesk's API as the account would answer."""
    sim = request.app[SIMULATOR_KEY]
    record = sim.record(request.method, request.path)
    response = await _answer(sim, request, record)
    if response.status != 499:
        record.status = response.status
    return response


# --- The control surface (/_simulator/*, not part of Freshdesk, no auth) ---------------


def _control_json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


async def _control_tickets(request: web.Request) -> web.Response:
    return _control_json(request.app[SIMULATOR_KEY].tickets)


async def _control_requests(request: web.Request) -> web.Response:
    return _control_json([entry.as_json() for entry in request.app[SIMULATOR_KEY].requests])


async def _control_body(request: web.Request) -> dict[str, Any]:
    try:
        payload = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be JSON"}), content_type="application/json"
        ) from exc
    if not isinstance(payload, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be a JSON object"}),
            content_type="application/json",
        )
    return payload


async def _control_faults(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    if request.method == "POST":
        try:
            sim.faults.load(await _control_body(request))
        except (ValueError, TypeError) as exc:
            return _control_json({"error": str(exc)}, 400)
    return _control_json(sim.faults.describe())


async def _control_config(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    if request.method == "POST":
        try:
            sim.configure(await _control_body(request))
        except ValueError as exc:
            return _control_json({"error": str(exc)}, 400)
    return _control_json(_public_config(sim.config))


def _public_config(config: SimulatorConfig) -> dict[str, Any]:
    """The runtime settings, keys replaced by their count: secrets never leave the process."""
    shown = {name: getattr(config, name) for name in _RUNTIME_SETTINGS}
    shown["api_keys"] = len(config.api_keys)
    shown["forbidden_keys"] = len(config.forbidden_keys)
    return shown


async def _control_reset(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    sim.reset()
    return _control_json({"reset": True})


async def _control_health(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    return _control_json(
        {"status": "ok", "tickets": len(sim.tickets), "requests": len(sim.requests)}
    )


# --- Application, server, CLI ---------------------------------------------------------------

SIMULATOR_KEY = web.AppKey("simulator", Simulator)


async def _on_startup(app: web.Application) -> None:
    # A fresh event per run: hangs and latencies wait on it and end when the server stops.
    app[SIMULATOR_KEY].closing = asyncio.Event()


async def _on_shutdown(app: web.Application) -> None:
    app[SIMULATOR_KEY].closing.set()


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    """The simulator as an aiohttp application; its state is `app[SIMULATOR_KEY]`."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIMULATOR_KEY] = Simulator(config)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/_simulator/tickets", _control_tickets)
    app.router.add_get("/_simulator/requests", _control_requests)
    app.router.add_route("GET", "/_simulator/faults", _control_faults)
    app.router.add_route("POST", "/_simulator/faults", _control_faults)
    app.router.add_route("GET", "/_simulator/config", _control_config)
    app.router.add_route("POST", "/_simulator/config", _control_config)
    app.router.add_post("/_simulator/reset", _control_reset)
    app.router.add_get("/_simulator/health", _control_health)
    app.router.add_route("*", "/{tail:.*}", _api_entry)
    return app


@dataclass
class RunningSimulator:
    """A simulator serving on a real socket; `close()` stops it and ends hanging requests."""

    url: str
    state: Simulator
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_simulator(
    host: str = "127.0.0.1", port: int = 0, config: SimulatorConfig | None = None
) -> RunningSimulator:
    """Serve the simulator on host:port (0 picks a free port); the caller must `close()` it."""
    app = build_app(config)
    # handler_cancellation: a client that gives up on a slow answer frees its handler at once.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return RunningSimulator(f"http://{host}:{bound_port}", app[SIMULATOR_KEY], runner)


CLI_DESCRIPTION = """\
Run a fake Freshdesk API v2 (in memory) for development, end-to-end tests and benchmarks.
Authenticate with HTTP Basic auth, user = one of the --api-key values, any password.

Freshdesk routes:
  POST /api/v2/tickets              create (JSON or multipart/form-data with attachments[])
  GET  /api/v2/tickets/{id}         view (include=conversations,requester,company,stats)
  GET  /api/v2/tickets              list (requester_id, email, unique_external_id, company_id,
                                    updated_since, order_by, order_type, page, per_page)
  GET  /api/v2/search/tickets       search, query="tag:'x' AND status:2" (after --search-delay)
  GET  /api/v2/ticket_fields        the account's ticket fields
  GET  /api/v2/contacts?email=...   contacts

Control surface (not Freshdesk; no auth):
  GET  /_simulator/tickets          every ticket created, in order
  GET  /_simulator/requests         every API request: method, path, status, time, ticket id
  POST /_simulator/faults           {"script":[{"fault":"503_html","match":"create"}],
                                     "rates":{"500_json":0.3}, "seed":1, "down":false} or
                                    {"clear":true}; kinds: latency 500_json 500_html 502_html
                                    503_html 504_html 429 reset hang create_then_fail respond
  POST /_simulator/config           {"create_limit":5, "window_seconds":1, "latency":0.2, ...}
  POST /_simulator/reset            forget tickets, requests, faults and rate windows
  GET  /_simulator/health           liveness

See docs/simulator.md for every option.
"""


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `fake-freshdesk`; its `func` runs the server until SIGINT/SIGTERM and returns 0."""
    parser = subparsers.add_parser(
        "fake-freshdesk",
        help="run the Freshdesk API simulator",
        description=CLI_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8089, help="port (default 8089; 0 picks one)")
    parser.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="a valid API key (repeatable; default test-key)",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every API answer"
    )
    parser.add_argument(
        "--window", type=float, default=60.0, help="rate-limit window in seconds (default 60)"
    )
    parser.add_argument(
        "--create-limit", type=int, default=80, help="ticket creates per window (default 80)"
    )
    parser.add_argument(
        "--account-limit", type=int, default=200, help="API calls per window (default 200)"
    )
    parser.add_argument(
        "--list-limit", type=int, default=20, help="list calls per window (default 20)"
    )
    parser.add_argument(
        "--search-delay",
        type=float,
        default=150.0,
        help="seconds before a ticket is searchable (default 150)",
    )
    parser.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        api_keys=set(args.api_key or ["test-key"]),
        latency=args.latency,
        window_seconds=args.window,
        create_limit=args.create_limit,
        account_limit=args.account_limit,
        list_limit=args.list_limit,
        search_index_delay=args.search_delay,
    )


def run_cli(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; exit status 0."""
    asyncio.run(_serve_until_signal(args.host, args.port, config_from_args(args)))
    return 0


async def _serve_until_signal(host: str, port: int, config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    running = await start_simulator(host, port, config)
    log.info("Freshdesk simulator listening", url=running.url, api_keys=len(config.api_keys))
    try:
        await stop.wait()
    finally:
        log.info("Freshdesk simulator stopping", tickets=len(running.state.tickets))
        await running.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
