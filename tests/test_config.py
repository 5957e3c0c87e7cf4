"""Settings: defaults, bounds, empty values (B25), list formats (B24), credentials, errors."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest

from fdqueue.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FDQUEUE_") or name in {
            "DATABASE_URL",
            "FRESHDESK_DOMAIN",
            "FRESHDESK_API_KEY",
            "CREDENTIALS_DIRECTORY",
        }:
            monkeypatch.delenv(name)


def test_defaults_match_the_original_system() -> None:
    """Batch 10, poll 60 s, 3 attempts, 60 s unit, 7 days, 03:00, 127.0.0.1:3000."""
    s = load_settings()
    assert (s.batch_size, s.poll_interval, s.max_attempts, s.backoff_unit) == (10, 60, 3, 60)
    assert (s.retention_days, s.cleanup_at, s.host, s.port) == (7, time(3, 0), "127.0.0.1", 3000)
    assert s.lease_seconds > s.http_timeout + s.http_connect_timeout


def test_original_names_and_prefixed_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATABASE_URL, FRESHDESK_DOMAIN and FRESHDESK_API_KEY keep their names."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@h/db")
    monkeypatch.setenv("FRESHDESK_DOMAIN", "acme")
    monkeypatch.setenv("FDQUEUE_FRESHDESK_API_KEY", "k")
    s = load_settings()
    assert s.require_database() == "postgresql://x@h/db"
    assert s.require_freshdesk() == ("https://acme.freshdesk.com", "k")


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_b25_empty_values_mean_not_set(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    """B25: empty or whitespace-only numbers fall back to defaults; an empty key is missing."""
    monkeypatch.setenv("FDQUEUE_CONCURRENCY", blank)
    monkeypatch.setenv("FDQUEUE_HTTP_TIMEOUT", blank)
    monkeypatch.setenv("FRESHDESK_API_KEY", blank)
    monkeypatch.setenv("FRESHDESK_DOMAIN", blank)
    s = load_settings()
    assert (s.concurrency, s.http_timeout, s.freshdesk_api_key) == (10, 30.0, None)
    with pytest.raises(
        ConfigError, match=r"^FRESHDESK_DOMAIN, FRESHDESK_API_KEY: required settings missing"
    ):
        s.require_freshdesk()
    monkeypatch.setenv("FRESHDESK_DOMAIN", "acme")
    with pytest.raises(ConfigError, match="FRESHDESK_API_KEY: required setting missing"):
        load_settings().require_freshdesk()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a.com,b.com", ["a.com", "b.com"]),
        ('["a.com","b.com"]', ["a.com", "b.com"]),
        ("", []),
        ("only.com", ["only.com"]),
        (" a.com , b.com ", ["a.com", "b.com"]),
    ],
)
def test_b24_list_settings_accept_commas_and_json(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    """B24: list settings take `a,b`, a JSON array, an empty value or a single value."""
    monkeypatch.setenv("FDQUEUE_CORS_ORIGINS", raw)
    assert load_settings().cors_origins == expected


def test_b24_broken_json_list_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed JSON list stops start-up with the variable named."""
    monkeypatch.setenv("FDQUEUE_CORS_ORIGINS", '["a",')
    with pytest.raises(ConfigError, match=r"^FDQUEUE_CORS_ORIGINS: "):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("FDQUEUE_BATCH_SIZE", "abc", "FDQUEUE_BATCH_SIZE: Input should be a valid integer"),
        (
            "FDQUEUE_BATCH_SIZE",
            "0",
            "FDQUEUE_BATCH_SIZE: Input should be greater than or equal to 1",
        ),
        ("FDQUEUE_CONCURRENCY", "100000", "FDQUEUE_CONCURRENCY: Input should be less than"),
        ("FDQUEUE_CLEANUP_AT", "25:00", "FDQUEUE_CLEANUP_AT: "),
        ("FDQUEUE_LOG_FORMAT", "xml", "FDQUEUE_LOG_FORMAT: Input should be"),
        ("FDQUEUE_PORT", "-1", "FDQUEUE_PORT: "),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    """Invalid values give one line that names the variable and what is expected."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_lease_must_outlive_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease shorter than the HTTP timeout would hand live work to a second worker (B07)."""
    monkeypatch.setenv("FDQUEUE_LEASE", "5")
    with pytest.raises(ConfigError, match="FDQUEUE_LEASE"):
        load_settings()


def test_secret_from_credentials_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """systemd's LoadCredential= file provides the API key, and it is masked in dumps."""
    (tmp_path / "freshdesk_api_key").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    s = load_settings()
    assert s.freshdesk_api_key is not None
    assert s.freshdesk_api_key.get_secret_value() == "from-credential"
    assert "from-credential" not in str(s.masked())


def test_full_domain_and_base_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full host is accepted, and FDQUEUE_FRESHDESK_BASE_URL points elsewhere (the simulator)."""
    monkeypatch.setenv("FRESHDESK_DOMAIN", "https://acme.freshdesk.com/")
    assert load_settings().freshdesk_url == "https://acme.freshdesk.com"
    monkeypatch.setenv("FDQUEUE_FRESHDESK_BASE_URL", "http://127.0.0.1:8089/")
    assert load_settings().freshdesk_url == "http://127.0.0.1:8089"


def test_default_tags_respect_freshdesk_tag_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freshdesk refuses tags over 32 characters, so such a default tag is refused at start-up."""
    monkeypatch.setenv("FDQUEUE_DEFAULT_TAGS", "web-form," + "x" * 33)
    with pytest.raises(ConfigError, match=r"^FDQUEUE_DEFAULT_TAGS: tags must be at most 32"):
        load_settings()
