"""Tests for logs.py: journald priorities, one record per event, JSON, redaction, detection."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from fdqueue.logs import MASK, configure_logging, get_logger, resolve_format


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave structlog and the root logger exactly as the test found them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


class _FlushCounter(io.StringIO):
    """A stream that remembers how often it was flushed."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def _capture(fmt: str, level: str = "debug") -> _FlushCounter:
    stream = _FlushCounter()
    configure_logging(fmt, level, stream=stream)
    return stream


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def _raise_and_log(message: str) -> None:
    try:
        raise RuntimeError(message)
    except RuntimeError:
        get_logger("fdqueue.test").exception("Freshdesk delivery crashed", queue_id=7)


def test_b23_priority_prefix_per_level() -> None:
    """Under journald: debug 7, info 6, warning 4, error 3, critical 2 as the `<N>` prefix."""
    stream = _capture("journald")
    log = get_logger("fdqueue.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert [line[:3] for line in _lines(stream)] == ["<7>", "<6>", "<4>", "<3>", "<2>"]


def test_b23_traceback_stays_one_record_at_priority_3() -> None:
    """An exception with its traceback is one line at priority 3, newlines escaped inside logfmt."""
    stream = _capture("journald")
    _raise_and_log("database went away")
    lines = _lines(stream)
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith('<3>level=error event="Freshdesk delivery crashed"')
    assert 'exception="Traceback (most recent call last):\\n' in line
    assert "RuntimeError: database went away" in line
    assert "queue_id=7" in line


def test_b23_stdlib_loggers_go_through_the_same_chain() -> None:
    """aiohttp and asyncpg stdlib records get the same format, priorities, one-line tracebacks."""
    stream = _capture("journald")
    logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /healthz HTTP/1.1" %s', 200)
    logging.getLogger("asyncpg").warning("connection lost")
    try:
        raise ConnectionResetError("reset by peer")
    except ConnectionResetError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    access, warning, error = _lines(stream)
    assert access.startswith("<6>level=info")
    assert "200" in access
    assert "logger=aiohttp.access" in access
    assert warning.startswith('<4>level=warning event="connection lost" logger=asyncpg')
    assert error.startswith("<3>level=error")
    assert "ConnectionResetError: reset by peer" in error


def test_access_log_only_at_debug_level() -> None:
    """aiohttp's access lines cost CPU on every request: shown at debug, silent at info."""
    access = logging.getLogger("aiohttp.access")
    try:
        stream = _capture("json", "info")
        access.info('127.0.0.1 "GET /healthz HTTP/1.1" %s', 200)
        assert _lines(stream) == []
        stream = _capture("json", "debug")
        access.info('127.0.0.1 "GET /healthz HTTP/1.1" %s', 200)
        assert len(_lines(stream)) == 1
    finally:
        access.setLevel(logging.NOTSET)


def test_b23_every_event_is_flushed_at_once() -> None:
    """Each record is flushed as it is written, so journald shows it without delay."""
    stream = _capture("journald")
    get_logger("fdqueue.test").info("Freshdesk ticket queued successfully")
    assert stream.flushes >= 1
    assert stream.getvalue().endswith("\n")


def test_journald_format_has_no_timestamp_and_json_has_iso_utc() -> None:
    """journald stamps entries itself; JSON lines carry an ISO-8601 UTC timestamp."""
    journald = _capture("journald")
    get_logger("fdqueue.test").info("tick")
    assert "timestamp" not in journald.getvalue()
    as_json = _capture("json")
    get_logger("fdqueue.test").info("tick")
    record = json.loads(_lines(as_json)[0])
    assert record["timestamp"].endswith("Z")
    assert "T" in record["timestamp"]


def test_json_mode_renders_one_valid_object_per_line() -> None:
    """In JSON mode every line parses, including one carrying a traceback."""
    stream = _capture("json")
    get_logger("fdqueue.test").warning("rate limited", retry_after=30)
    _raise_and_log("boom")
    logging.getLogger("asyncpg").info("pool ready")
    records = [json.loads(line) for line in _lines(stream)]
    assert [r["level"] for r in records] == ["warning", "error", "info"]
    assert records[0]["retry_after"] == 30
    assert "RuntimeError: boom" in records[1]["exception"]
    assert records[2]["logger"] == "asyncpg"


def test_level_filters_lower_events() -> None:
    """With level=warning, info and debug events from structlog and stdlib are dropped."""
    stream = _capture("journald", level="warning")
    get_logger("fdqueue.test").info("hidden")
    logging.getLogger("asyncpg").debug("hidden too")
    get_logger("fdqueue.test").warning("shown")
    assert len(_lines(stream)) == 1
    assert "shown" in stream.getvalue()


def test_configure_twice_writes_each_event_once() -> None:
    """A second configure_logging replaces the first handler instead of adding another."""
    first = _capture("json")
    second = _capture("journald")
    get_logger("fdqueue.test").info("once")
    assert first.getvalue() == ""
    assert len(_lines(second)) == 1


def test_redaction_masks_secret_keys_and_ticket_bodies() -> None:
    """API keys, passwords, tokens and ticket bodies never reach the line, even nested."""
    stream = _capture("json")
    get_logger("fdqueue.test").info(
        "config loaded",
        freshdesk_api_key="fd-key-123",
        admin_token="adm-456",
        Authorization="Basic Zm9vOlg=",
        ticket_data={"subject": "s", "description": "my card number"},
        body="raw body",
        settings={"database_password": "pw-789", "max_body_bytes": 1024},
    )
    text = stream.getvalue()
    for secret in ("fd-key-123", "adm-456", "Zm9vOlg=", "my card number", "raw body", "pw-789"):
        assert secret not in text
    record = json.loads(text)
    assert record["freshdesk_api_key"] == MASK
    assert record["ticket_data"] == MASK
    assert record["settings"] == {"database_password": MASK, "max_body_bytes": 1024}


def test_redaction_masks_dsn_passwords_in_text_and_tracebacks() -> None:
    """A postgresql:// password is masked in values, event text and rendered tracebacks."""
    stream = _capture("journald")
    log = get_logger("fdqueue.test")
    log.info("connecting to postgresql://fdqueue:s3cret@db.local/fdqueue")
    log.info("connecting", dsn="postgres://fdqueue:s3cret@db.local:5432/fdqueue")
    log.info("libpq style", dsn="host=db password=s3cret dbname=fdqueue")
    _raise_and_log("cannot reach postgresql://fdqueue:s3cret@db.local/fdqueue")
    text = stream.getvalue()
    assert "s3cret" not in text
    assert f"postgresql://fdqueue:{MASK}@db.local/fdqueue" in text
    assert len(_lines(stream)) == 4


def test_redaction_applies_to_stdlib_records() -> None:
    """A DSN in a third-party library's message is masked as well."""
    stream = _capture("journald")
    logging.getLogger("asyncpg").error("bad dsn %s", "postgresql://u:hunter2@h/d")
    assert "hunter2" not in stream.getvalue()


def test_auto_picks_journald_when_journal_stream_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto selects journald when $JOURNAL_STREAM names the file behind the stream."""
    with (tmp_path / "stderr").open("w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert resolve_format("auto", stream) == "journald"
        configure_logging("auto", "info", stream=stream)
        get_logger("fdqueue.test").error("visible to journalctl -p err")
    assert (tmp_path / "stderr").read_text().startswith("<3>")


def test_auto_ignores_a_journal_stream_for_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inherited or malformed $JOURNAL_STREAM does not switch a pipe or file to journald."""
    with (tmp_path / "out").open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        assert resolve_format("auto", stream) == "json"
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert resolve_format("auto", stream) == "json"
        monkeypatch.delenv("JOURNAL_STREAM")
        assert resolve_format("auto", stream) == "json"
    assert resolve_format("auto", io.StringIO()) == "json"


def test_auto_picks_console_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto selects the console renderer when the stream is a terminal."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            assert resolve_format("auto", tty) == "console"
    finally:
        os.close(primary)
        os.close(secondary)


def test_explicit_format_wins_and_unknown_values_are_rejected() -> None:
    """An explicit format is used as given; a bad format or level raises ValueError."""
    assert resolve_format("json", io.StringIO()) == "json"
    with pytest.raises(ValueError, match="log format"):
        configure_logging("syslog", stream=io.StringIO())
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "verbose", stream=io.StringIO())


def test_console_mode_is_plain_text_without_colours_off_a_tty() -> None:
    """Console output to a non-terminal carries no ANSI escapes."""
    stream = _capture("console")
    get_logger("fdqueue.test").warning("careful", n=1)
    line = _lines(stream)[0]
    assert "careful" in line
    assert "\x1b[" not in line


def test_get_logger_defaults_to_the_callers_module() -> None:
    """Without a name the logger is named after the calling module."""
    stream = _capture("json")
    get_logger().info("named")
    assert json.loads(stream.getvalue())["logger"] == __name__


def test_capture_logs_still_sees_events_after_configuration() -> None:
    """Module loggers are not cached, so structlog.testing.capture_logs keeps working."""
    _capture("journald")
    log = get_logger("fdqueue.test")
    log.info("before")
    with structlog.testing.capture_logs() as captured:
        log.info("Freshdesk ticket queued successfully", queue_id=1)
    assert captured == [
        {"event": "Freshdesk ticket queued successfully", "queue_id": 1, "log_level": "info"}
    ]
