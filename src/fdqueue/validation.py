"""Turn a request body into a `TicketIn`, or into a list of named field problems."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from fdqueue.models import TicketIn

MAX_PROBLEMS: Final = 100  # a body with 10 000 unknown keys must not get a 10 000-entry answer
FIELD_CHARS: Final = 120
MESSAGE_CHARS: Final = 200
# Longer integers are no ids Freshdesk knows; the bound also spares int() its costly path.
MAX_INT_DIGITS: Final = 30
# Errors of the model as a whole (loc == ()) belong to the field a form would highlight.
_MODEL_ERROR_FIELDS: Final = (
    ("a requester is required", "email"),
    ("name is required", "name"),
)
# TicketIn's requester identifiers. Its requester check runs only once every field is valid,
# so with other errors present this layer adds it: an empty form hears of every field at once.
_REQUESTER_FIELDS: Final = (
    "email",
    "requester_id",
    "phone",
    "twitter_id",
    "facebook_id",
    "unique_external_id",
)
_MESSAGES: Final = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
}
_REPLACEMENT: Final = "\N{REPLACEMENT CHARACTER}"


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One field the client must fix: a dotted path (`custom_fields.cf_x`, `tags.2`) and why."""

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class BodyError(Exception):
    """The body is not JSON at all (answered 400 `invalid_json`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TicketInvalid(Exception):
    """The body is JSON but not a valid ticket (answered 422 `validation_error`)."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__(f"{len(problems)} invalid field(s)")
        self.problems = problems


# --- JSON ----------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, which PostgreSQL's jsonb refuses
        raise ValueError("number out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("number too long")
    return int(text)


def parse_json(raw: bytes) -> Any:
    """Decode a UTF-8 JSON document strictly; raise BodyError with a short reason.

    Strict means what PostgreSQL's jsonb would refuse later is refused now: NaN,
    Infinity and numbers that overflow a float. Nesting deep enough to exhaust the
    parser's recursion is refused too, instead of crashing the request.
    """
    if not raw.strip():
        raise BodyError("the body is empty; send a JSON object")
    try:
        return json.loads(
            raw,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as exc:
        raise BodyError(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise BodyError("the body is not UTF-8 text") from None
    except RecursionError:
        raise BodyError("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # from the parse_* hooks above: our own wording
        raise BodyError(f"invalid JSON: {exc}") from None


# --- the ticket ----------------------------------------------------------------------------


def validate_ticket(document: Any) -> TicketIn:
    """The validated ticket, or TicketInvalid naming every problem (at most MAX_PROBLEMS).

    Besides `TicketIn`'s own rules, strings PostgreSQL cannot store (NUL, unpaired
    surrogates) are refused by field, so no input reaches the database only to fail there.
    """
    if not isinstance(document, dict):
        kind = _json_kind(document)
        raise TicketInvalid([FieldProblem("body", f"must be a JSON object, not {kind}")])
    problems = unstorable_text(document)
    try:
        ticket = TicketIn.model_validate(document)
    except ValidationError as exc:
        problems = merge(field_problems(exc, document), [*problems, *_missing_requester(document)])
    else:
        if not problems:
            return ticket
    raise TicketInvalid(problems[:MAX_PROBLEMS])


def _missing_requester(document: dict[str, Any]) -> list[FieldProblem]:
    if any(document.get(name) is not None for name in _REQUESTER_FIELDS):
        return []
    names = ", ".join(_REQUESTER_FIELDS)
    return [FieldProblem("email", f"a requester is required: {names}")]


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def field_problems(exc: ValidationError, document: Any) -> list[FieldProblem]:
    """pydantic's errors as one problem per field path, in pydantic's order.

    A value that fits none of a union's types (a list as a custom field value) yields one
    error per union member, each with the member's name appended to the path; the path is
    cut back to what exists in the document, so the field is named once.
    """
    problems: list[FieldProblem] = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        message = _message(error["type"], str(error["msg"]))
        path = _document_path(error["loc"], document, error["type"])
        field = dotted(path) if path else _model_error_field(message)
        problems.append(FieldProblem(field, message))
    return merge(problems, [])


def _message(kind: str, text: str) -> str:
    text = _MESSAGES.get(kind, text).removeprefix("Value error, ")
    return clip(text, MESSAGE_CHARS)


def _document_path(loc: tuple[int | str, ...], document: Any, kind: str) -> list[int | str]:
    """The leading part of `loc` that names something in `document` (or a missing key)."""
    path: list[int | str] = []
    node = document
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, dict) and (part in node or (last and kind == "missing")):
            node = node.get(part) if isinstance(part, str) else None
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        path.append(part)
    return path


def _model_error_field(message: str) -> str:
    for start, field in _MODEL_ERROR_FIELDS:
        if message.startswith(start):
            return field
    return "body"


def merge(first: list[FieldProblem], second: list[FieldProblem]) -> list[FieldProblem]:
    """Both lists, one problem per field (the first one seen wins)."""
    seen: dict[str, FieldProblem] = {}
    for problem in [*first, *second]:
        seen.setdefault(problem.field, problem)
    return list(seen.values())


# --- strings PostgreSQL cannot store -------------------------------------------------------


def unstorable_text(document: Any) -> list[FieldProblem]:
    """Problems for every key or string value holding NUL or an unpaired surrogate.

    PostgreSQL's text and jsonb refuse U+0000, and a lone surrogate cannot be encoded as
    UTF-8 at all; either would fail at the INSERT. Walks iteratively: the document may be
    nested as deep as the JSON parser allowed.
    """
    problems: list[FieldProblem] = []
    for path, text in _strings(document):
        reason = _unstorable(text)
        if reason is not None:
            problems.append(FieldProblem(dotted(path), reason))
            if len(problems) >= MAX_PROBLEMS:
                break
    return merge(problems, [])


def _strings(document: Any) -> Iterator[tuple[list[int | str], str]]:
    """Every string of `document` with its path: keys (at their own path) and values."""
    stack: list[tuple[list[int | str], Any]] = [([], document)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            yield path, node
        elif isinstance(node, dict):
            for key, value in node.items():
                yield [*path, key], key
                stack.append(([*path, key], value))
        elif isinstance(node, list):
            stack.extend(([*path, index], item) for index, item in enumerate(node))


def _unstorable(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not text"
    return None


# --- output hygiene ------------------------------------------------------------------------


def dotted(path: list[int | str] | tuple[int | str, ...]) -> str:
    """`["custom_fields", "cf_x"]` → `custom_fields.cf_x`, clipped and safe to print."""
    return clip(".".join(str(part) for part in path), FIELD_CHARS)


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with NUL and surrogates replaced: never echo junk."""
    cleaned = "".join(_REPLACEMENT if _bad_char(ch) else ch for ch in text[: limit + 1])
    if len(cleaned) > limit:
        return cleaned[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"
    return cleaned


def _bad_char(ch: str) -> bool:
    return ch == "\x00" or "\ud800" <= ch <= "\udfff"
