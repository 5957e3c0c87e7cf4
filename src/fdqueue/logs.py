"""Logging setup: one structlog line per event on stderr, for journald, a terminal or a pipe."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

FORMATS: Final = ("auto", "console", "json", "journald")
LEVELS: Final = ("debug", "info", "warning", "error", "critical")

# structlog level name -> syslog priority; journald reads a leading "<N>" (sd-daemon(3)).
_PRIORITY: Final = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
    "notset": 7,
}

MASK: Final = "**********"
# Any key containing one of these is a credential: `freshdesk_api_key`, `admin_token`, ...
_SECRET_KEY_PARTS: Final = (
    "api_key",
    "apikey",
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "cookie",
    "credential",
)
# Ticket content, matched exactly so that e.g. `max_body_bytes` still shows its number.
_BODY_KEYS: Final = frozenset({"ticket_data", "description", "description_text", "body"})
_SECRET_PATTERNS: Final = (
    # postgresql://user:PASSWORD@host (also postgres:// and driver suffixes)
    (re.compile(r"(?i)(\bpostgres(?:ql)?(?:\+\w+)?://[^:/@\s]*:)[^@\s]+(@)"), rf"\1{MASK}\2"),
    # libpq keyword DSNs: "host=db password=PASSWORD"
    (re.compile(r"(?i)(\bpassword\s*=\s*)[^\s'\"]+"), rf"\1{MASK}"),
    # an HTTP Authorization header value that slipped into a message
    (
        re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer)\s+)\S+"),
        rf"\1{MASK}",
    ),
)


class _FdqueueHandler(logging.StreamHandler[TextIO]):
    """The one root handler fdqueue installs; its class lets a re-configuration replace it."""


def resolve_format(fmt: str, stream: TextIO) -> str:
    """The concrete format for `fmt`: `auto` becomes journald, console or json.

    journald is chosen when `$JOURNAL_STREAM` names the very file behind `stream`
    (systemd.exec(5) warns that "is it set" alone is not enough: a child of a service
    inherits it while writing elsewhere). Otherwise console on a TTY, else JSON.
    Raises ValueError for an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}, expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if journal_stream_connected(stream):
        return "journald"
    return "console" if _isatty(stream) else "json"


def journal_stream_connected(stream: TextIO) -> bool:
    """True when `$JOURNAL_STREAM` (`<dev>:<inode>`) is the file `stream` writes to."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":", 1))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError):
        # unset, malformed, or a stream without a file descriptor (StringIO)
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):  # closed or detached stream
        return False


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask credentials and ticket bodies anywhere in the event: the last line of defence.

    Keys named like a secret (`api_key`, `password`, `token`, `authorization`...) or like
    ticket content (`ticket_data`, `description`, `body`) get their value replaced by a mask,
    in nested mappings and lists too; passwords inside DSNs and Authorization values inside
    any string (the event text and rendered tracebacks included) are masked as well.
    """
    return {key: _redact_item(key, value) for key, value in event_dict.items()}


def _redact_item(key: str, value: Any) -> Any:
    if _is_sensitive_key(key) and value is not None:
        return MASK
    return _redact_value(value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, Mapping):
        return {k: _redact_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    return value


def _is_sensitive_key(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in _BODY_KEYS or any(part in name for part in _SECRET_KEY_PARTS)


# Every pattern above needs one of these words: most log values have none, and a substring
# test is far cheaper than three regular expressions (logging was 39 % of the API's CPU).
_SECRET_TRIGGERS: Final = ("postgres", "password", "authorization")


def mask_secrets(text: str) -> str:
    """`text` with DSN passwords and Authorization values replaced by a mask."""
    lowered = text.lower()
    if not any(word in lowered for word in _SECRET_TRIGGERS):
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class JournaldRenderer:
    """logfmt on one physical line, prefixed with `<N>` so journald sets PRIORITY.

    A traceback rendered into the `exception` key keeps its newlines escaped as `\\n`,
    so `journalctl -p err` shows the error and its traceback as one entry.
    """

    def __init__(self) -> None:
        self._logfmt = structlog.processors.LogfmtRenderer(
            key_order=["level", "event", "logger"], drop_missing=True, bool_as_flag=False
        )

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        level = str(event_dict.get("level", method_name)).lower()
        priority = _PRIORITY.get(level, 6)
        # logfmt already escapes newlines in values; keys or \r must not split the record either
        line = self._logfmt(logger, method_name, event_dict)
        return f"<{priority}>" + line.replace("\r", "\\r").replace("\n", "\\n")


def _renderer(fmt: str, stream: TextIO) -> Processor:
    if fmt == "journald":
        return JournaldRenderer()
    if fmt == "json":
        return structlog.processors.JSONRenderer(default=str)
    return structlog.dev.ConsoleRenderer(colors=_isatty(stream))


def _formatter_chain(fmt: str, stream: TextIO) -> list[Processor]:
    """What every record (structlog or stdlib) goes through just before it is written."""
    chain: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt != "journald":  # journald stamps every entry itself
        chain.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    # tracebacks become a string value, so redaction sees them and logfmt/JSON keep one line
    chain += [structlog.processors.format_exc_info, redact, _renderer(fmt, stream)]
    return chain


# Runs on records from stdlib loggers (aiohttp.access, aiohttp.server, asyncpg...).
_FOREIGN_PRE_CHAIN: Final[list[Processor]] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.StackInfoRenderer(),
]

# Runs on structlog events; independent of the format, so a re-configuration only swaps
# the handler and loggers bound earlier keep working.
_STRUCTLOG_CHAIN: Final[list[Processor]] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.PositionalArgumentsFormatter(),
    structlog.processors.StackInfoRenderer(),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]


def configure_logging(
    fmt: str = "auto", level: str = "info", *, stream: TextIO | None = None
) -> None:
    """Send every log event, structlog and stdlib alike, through one chain to `stream`.

    `stream` defaults to stderr. Each event is written as one line and flushed at once
    (journald sees it immediately). Calling it again replaces the previous set-up; handlers
    installed by others on the root logger are left alone. Raises ValueError for an unknown
    format or level.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}, expected one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stderr
    concrete = resolve_format(fmt, out)
    handler = _FdqueueHandler(out)  # StreamHandler flushes after every record
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_FOREIGN_PRE_CHAIN, processors=_formatter_chain(concrete, out)
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _FdqueueHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # One access line per request cost a quarter of the API's CPU at full intake, and intake
    # already logs its own line: the access log shows only at debug level (aiohttp then
    # skips formatting it altogether).
    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
    structlog.configure(
        processors=_STRUCTLOG_CHAIN,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # no caching: structlog.testing.capture_logs() must still reach module-level loggers
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger named `name` (default: the caller's module), safe at import time.

    Its methods are the stdlib ones (`debug`, `info`, `warning`, `error`, `exception`,
    `critical`) taking an event text plus key/value pairs. Before `configure_logging` runs it
    uses structlog's defaults, which is what `structlog.testing.capture_logs()` relies on.
    """
    if name is None:
        name = str(sys._getframe(1).f_globals.get("__name__", "fdqueue"))
    return structlog.stdlib.get_logger(name)
