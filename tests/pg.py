"""Test helpers for PostgreSQL URLs and the embedded server."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fdqueue.embedded import EmbeddedPostgres

PREFIX = "fdqueue-test-pg-"
OWNER = "owner.pid"


def reap_orphans() -> int:
    """Stop and remove embedded servers whose test run died without cleaning up (SIGKILL).

    Each test server's folder records the pid of the pytest process that owns it; a folder
    whose owner is gone is a leftover. Returns how many were reaped.
    """
    reaped = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((folder / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        server = EmbeddedPostgres(folder / "data")
        if server.running():
            server.kill()
        shutil.rmtree(folder, ignore_errors=True)
        reaped += 1
    return reaped


def claim_folder(folder: Path) -> None:
    """Mark `folder` as owned by this test process (see reap_orphans)."""
    (folder / OWNER).write_text(str(os.getpid()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def database_url(url: str) -> str:
    return url


__all__ = ["EmbeddedPostgres", "claim_folder", "database_url", "reap_orphans", "replace_database"]
