"""Data shapes shared by every module: the intake body, rows, Freshdesk replies and outcomes."""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)


class Status(enum.StrEnum):
    """The life of a queued submission."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


# Freshdesk's codes (reference §2.3); names are accepted at intake and normalised to numbers.
PRIORITIES = {"low": 1, "medium": 2, "high": 3, "urgent": 4}
STATUSES = {"open": 2, "pending": 3, "resolved": 4, "closed": 5}
SOURCES = {
    "email": 1,
    "portal": 2,
    "phone": 3,
    "chat": 7,
    "feedback_widget": 9,
    "outbound_email": 10,
}

# Stricter than RFC 5322 on purpose: Freshdesk rejects non-ASCII and '*' in the local part
# (reference §2.2), so such an address must fail at intake, not three retries later.
_EMAIL = re.compile(
    r"^[A-Za-z0-9!#$%&'+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'+/=?^_`{|}~-]+)*"
    r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_CUSTOM_FIELD = re.compile(r"^cf_[a-z0-9_]{1,120}$")


def _code(names: dict[str, int], label: str) -> Any:
    """Build a validator that maps a name or a numeric string to Freshdesk's integer code."""

    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be one of {_choices(names)}")
        if isinstance(value, str):
            text = value.strip().lower()
            if text in names:
                return names[text]
            if text.isdigit():
                return int(text)
            raise ValueError(f"must be one of {_choices(names)}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    convert.__name__ = f"convert_{label}"
    return convert


def _choices(names: dict[str, int]) -> str:
    return ", ".join(f"{code} ({name})" for name, code in names.items())


def _email(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        if len(value) > 254 or not _EMAIL.match(value):
            raise ValueError("is not an email address Freshdesk accepts (ASCII, no '*')")
    return value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


Email = Annotated[str, BeforeValidator(_email)]
Id = Annotated[int, BeforeValidator(_not_bool), Field(ge=1)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Scalar = str | int | float | bool | None


class TicketIn(BaseModel):
    """A validated ticket submission, already in Freshdesk's v2 shape (numbers for codes)."""

    model_config = ConfigDict(extra="forbid", str_max_length=100_000)

    email: Email | None = None
    requester_id: Id | None = None
    phone: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=40)] | None
    ) = None
    twitter_id: Annotated[Text, StringConstraints(max_length=255)] | None = None
    facebook_id: Annotated[Text, StringConstraints(max_length=255)] | None = None
    unique_external_id: Annotated[Text, StringConstraints(max_length=255)] | None = None
    name: Annotated[Text, StringConstraints(max_length=255)] | None = None

    subject: Annotated[Text, StringConstraints(max_length=255)]
    description: Annotated[Text, StringConstraints(max_length=100_000)]
    priority: Annotated[int, BeforeValidator(_code(PRIORITIES, "priority")), Field(ge=1, le=4)] = 1
    status: Annotated[int, BeforeValidator(_code(STATUSES, "status")), Field(ge=2, le=5)] = 2
    source: Annotated[int, BeforeValidator(_code(SOURCES, "source"))] = 2
    type: Annotated[Text, StringConstraints(max_length=255)] | None = None

    # Freshdesk refuses tags longer than 32 characters.
    tags: list[Annotated[Text, StringConstraints(max_length=32)]] = Field(
        default_factory=list, max_length=100
    )
    cc_emails: list[Email] = Field(default_factory=list, max_length=50)
    custom_fields: dict[str, Scalar] = Field(default_factory=dict, max_length=200)
    group_id: Id | None = None
    responder_id: Id | None = None
    product_id: Id | None = None
    company_id: Id | None = None

    # Stored in their own columns for the operators, never sent to Freshdesk.
    chatbot_id: Annotated[Text, StringConstraints(max_length=255)] | None = None
    user_id: Annotated[Text, StringConstraints(max_length=255)] | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: int) -> int:
        if value not in SOURCES.values():
            raise ValueError(f"must be one of {_choices(SOURCES)}")
        return value

    @field_validator("custom_fields")
    @classmethod
    def _custom_field_names(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        for key, item in value.items():
            if not _CUSTOM_FIELD.match(key):
                raise ValueError(f"key {key[:60]!r} must be a field name like cf_order_id")
            if isinstance(item, str) and len(item) > 10_000:
                raise ValueError(f"value of {key} is longer than 10000 characters")
        return value

    @model_validator(mode="after")
    def _has_requester(self) -> TicketIn:
        identifiers = (
            self.email,
            self.requester_id,
            self.phone,
            self.twitter_id,
            self.facebook_id,
            self.unique_external_id,
        )
        if all(item is None for item in identifiers):
            raise ValueError(
                "a requester is required: email, requester_id, phone, twitter_id, "
                "facebook_id or unique_external_id"
            )
        if self.phone is not None and self.email is None and self.name is None:
            raise ValueError("name is required when phone is given without email")
        return self

    def ticket_data(self) -> dict[str, Any]:
        """The JSON stored in `ticket_data`: Freshdesk's fields only, unset ones left out."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"chatbot_id", "user_id"})


@dataclass(frozen=True, slots=True)
class ClaimedTicket:
    """A row this worker holds under a lease; `token` guards every write back."""

    id: int
    public_id: uuid.UUID
    ticket_data: dict[str, Any]
    attempts: int
    max_attempts: int
    outcome_unknown: bool
    created_at: datetime
    token: str
    reclaimed: bool = False
    last_error: str | None = None
    last_http_status: int | None = None
    lookup_failures: int = 0


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Row counts by status plus what an operator wants to know about the backlog."""

    pending: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    due: int = 0
    oldest_due_age_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "processing": self.processing,
            "completed": self.completed,
            "failed": self.failed,
            "due": self.due,
            "oldest_due_age_seconds": self.oldest_due_age_seconds,
        }


# --- Freshdesk replies, as the client returns them -------------------------------------


@dataclass(frozen=True, slots=True)
class FreshdeskError:
    """One entry of Freshdesk's `errors` list (or the flat code/message of 401/403)."""

    code: str
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{where}{self.code} ({self.message})"


@dataclass(frozen=True, slots=True)
class FreshdeskReply:
    """An HTTP answer from Freshdesk: whatever its status, it was read without raising."""

    status: int
    ticket_id: int | None = None
    errors: tuple[FreshdeskError, ...] = ()
    retry_after: float | None = None
    ratelimit_total: int | None = None
    ratelimit_remaining: int | None = None
    request_id: str | None = None
    body_snippet: str = ""


TransportKind = Literal["never_sent", "unknown"]


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """No HTTP answer: `never_sent` (connect failed) or `unknown` (sent, answer lost)."""

    kind: TransportKind
    detail: str


SendResult = FreshdeskReply | TransportFailure


# --- Outcomes: what a send means for the row (policy.classify) ---------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    ticket_id: int
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """Freshdesk refused the ticket for a reason retrying cannot fix."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class AccountProblem:
    """401/403/404 on create: the key, role or domain is wrong; pause, keep the attempt."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class RateLimited:
    retry_after: float
    reason: str


@dataclass(frozen=True, slots=True)
class Transient:
    """5xx, timeout or connection error; `maybe_sent` means Freshdesk may hold the ticket."""

    reason: str
    maybe_sent: bool
    status: int | None = None


Outcome = Delivered | Rejected | AccountProblem | RateLimited | Transient


@dataclass(slots=True)
class DrainCounts:
    """What one drain or manual process did."""

    processed: int = 0
    successful: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    lost: int = 0

    def add(self, label: str) -> None:
        """Count one delivery by the label `Deliverer.deliver` returned."""
        self.processed += 1
        if label == "completed":
            self.successful += 1
        elif label == "failed":
            self.failed += 1
        elif label == "retry":
            self.retried += 1
        elif label == "deferred":
            self.deferred += 1
        else:
            self.lost += 1

    def merge(self, other: DrainCounts) -> None:
        for name in ("processed", "successful", "failed", "retried", "deferred", "lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {
            "processed": self.processed,
            "successful": self.successful,
            "failed": self.failed,
            "retried": self.retried,
            "deferred": self.deferred,
            "lost": self.lost,
        }
