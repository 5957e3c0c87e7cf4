"""Fixtures: a real PostgreSQL (configured or embedded), a migrated template, a database each."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from fdqueue import store
from fdqueue.logs import configure_logging, get_logger
from fdqueue.migrate import migrate
from fdqueue.simulator import RunningSimulator, SimulatorConfig, start_simulator
from tests.pg import PREFIX, EmbeddedPostgres, claim_folder, reap_orphans, replace_database

# What must never reach a log line: the Freshdesk key and ticket bodies used by the tests.
SECRETS = ("test-key", "It is on fire.", "Printer on fire")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """Every log line of the whole in-process test run goes to one file, then is searched for
    the test API key and ticket bodies (rule: secrets and bodies never reach a log line)."""
    fd, name = tempfile.mkstemp(prefix="fdqueue-test-log-", suffix=".jsonl")
    path = Path(name)
    with os.fdopen(fd, "w", encoding="utf-8") as sink:
        configure_logging("json", "debug", stream=sink)
        get_logger("fdqueue.tests").info("test session started")
        yield
    text = path.read_text(encoding="utf-8")
    path.unlink()
    leaked = [secret for secret in SECRETS if secret in text]
    assert "test session started" in text, "the log capture is broken"
    assert not leaked, f"secrets or ticket bodies in the test run's logs: {leaked}"


def _configured_url() -> str | None:
    for name in ("FDQUEUE_TEST_DATABASE_URL", "DATABASE_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


@contextlib.contextmanager
def _embedded_server() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's tmp_path: pytest prunes old base directories, and a concurrent
    # pytest run would delete a live server's data directory.
    reap_orphans()  # servers of earlier runs that were killed before their clean-up
    directory = Path(tempfile.mkdtemp(prefix=PREFIX))
    claim_folder(directory)
    server = EmbeddedPostgres(directory / "data", durable=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A server the tests may create databases on: $DATABASE_URL's, or an embedded one."""
    configured = _configured_url()
    if configured:
        yield configured
        return
    with _embedded_server() as server:
        yield server.url


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _build_template(admin_url: str, name: str) -> None:
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(replace_database(admin_url, name))
    try:
        await migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> Iterator[str]:
    """Name of a database built by running `sql/` through the real migrator; dropped at the end."""
    name = f"fdqueue_tpl_{uuid.uuid4().hex[:10]}"
    asyncio.run(_build_template(pg_admin_url, name))
    try:
        yield name
    finally:
        asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db_url(pg_admin_url: str, pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone, dropped afterwards."""
    name = f"fdqueue_t_{uuid.uuid4().hex[:12]}"
    await _admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    try:
        yield replace_database(pg_admin_url, name)
    finally:
        await _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's database."""
    pool = await store.create_pool(db_url, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def embedded_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, which the test may stop, restart or cut off."""
    with _embedded_server() as server:
        yield server


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """The Freshdesk simulator over real HTTP, with limits high enough never to pace."""
    config = SimulatorConfig(account_limit=10**6, create_limit=10**6, list_limit=10**6)
    running = await start_simulator(config=config)
    try:
        yield running
    finally:
        await running.close()
