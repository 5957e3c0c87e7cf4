"""Test helpers for PostgreSQL URLs and the embedded server."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from fdqueue.embedded import EmbeddedPostgres


def replace_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def database_url(url: str) -> str:
    return url


__all__ = ["EmbeddedPostgres", "database_url", "replace_database"]
