"""The migrator on a real PostgreSQL: order, idempotence, concurrency, the NOTIFY trigger."""

from __future__ import annotations

import asyncio

import asyncpg

from fdqueue import store
from fdqueue.migrate import load_migrations, migrate, pending_migrations

RECOVERY_SQL = """
UPDATE freshdesk_ticket_queue
SET status = 'pending',
    attempts = 0,
    next_attempt_at = NOW()
WHERE status = 'failed' AND attempts < max_attempts;
"""


async def test_migrations_apply_once_in_order(db_url: str) -> None:
    """A migrated database has every version recorded, and a second run applies nothing."""
    conn = await asyncpg.connect(db_url)
    try:
        assert await migrate(conn) == []
        assert await pending_migrations(conn) == []
        versions = [
            r["version"]
            for r in await conn.fetch(
                "SELECT version FROM fdqueue_schema_migrations ORDER BY version"
            )
        ]
        assert versions == [m.version for m in load_migrations()]
    finally:
        await conn.close()


async def test_two_concurrent_migrators_apply_each_file_once(pg_admin_url: str) -> None:
    """Two processes migrating an empty database at once serialise on the advisory lock."""
    from tests.pg import replace_database

    name = "fdqueue_mig_race"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = replace_database(pg_admin_url, name)
        conns = [await asyncpg.connect(url) for _ in range(2)]
        results = await asyncio.gather(*(migrate(c) for c in conns))
        for conn in conns:
            await conn.close()
        applied = sorted(len(r) for r in results)
        assert applied == [0, len(load_migrations())]
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_original_recovery_sql_notifies_listeners(db_url: str, pool: asyncpg.Pool) -> None:
    """The spec's manual 'Retry Failed Tickets' UPDATE wakes a LISTEN connection."""
    await pool.execute(
        "INSERT INTO freshdesk_ticket_queue (ticket_data, status, attempts, processed_at)"
        " VALUES ('{}', 'failed', 1, now())"
    )
    listener = await asyncpg.connect(db_url)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(store.NOTIFY_CHANNEL, lambda *args: got.put_nowait(args[2]))
    try:
        await pool.execute(RECOVERY_SQL)
        assert await asyncio.wait_for(got.get(), timeout=10) == store.NOTIFY_CHANNEL
    finally:
        await listener.close()


async def test_insert_notifies_once_per_statement(db_url: str, pool: asyncpg.Pool) -> None:
    """Fifty rows inserted in one statement produce a single notification."""
    listener = await asyncpg.connect(db_url)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(store.NOTIFY_CHANNEL, lambda *args: got.put_nowait(args[2]))
    try:
        await pool.execute(
            "INSERT INTO freshdesk_ticket_queue (ticket_data)"
            " SELECT '{}' FROM generate_series(1, 50)"
        )
        await asyncio.wait_for(got.get(), timeout=10)
        await pool.execute("SELECT pg_notify('fdqueue_probe', '')")  # a barrier on the server
        await asyncio.sleep(0.2)
        assert got.empty()
    finally:
        await listener.close()


def test_servers_of_killed_test_runs_are_reaped() -> None:
    """An embedded server whose pytest was SIGKILLed is stopped and removed by the next run."""
    import subprocess
    import tempfile
    from pathlib import Path

    from tests.pg import PREFIX, EmbeddedPostgres, reap_orphans

    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    server = EmbeddedPostgres(folder / "data", durable=False)
    server.start()
    try:
        gone = subprocess.Popen(["sleep", "0"])
        gone.wait()
        (folder / "owner.pid").write_text(str(gone.pid))
        assert reap_orphans() >= 1
        assert not server.running()
        assert not folder.exists()
    finally:
        if server.running():
            server.stop()
