"""Apply the numbered `sql/NNNN_*.sql` files in order, once each, under an advisory lock."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

# Any constant works as long as every fdqueue process uses the same one.
MIGRATION_LOCK = 0x6664_7175_6575  # "fdqueue"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

CREATE_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS fdqueue_schema_migrations (
    version    TEXT PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
APPLIED_VERSIONS = "SELECT version FROM fdqueue_schema_migrations"
RECORD_VERSION = "INSERT INTO fdqueue_schema_migrations (version) VALUES ($1)"


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str


def sql_directory() -> Path:
    """The migrations: packaged inside fdqueue when installed, else the repository's `sql/`."""
    packaged = resources.files("fdqueue") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every migration file, sorted by version."""
    folder = directory or sql_directory()
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(match.group(1), path.name, path.read_text(encoding="utf-8")))
    if not found:
        raise FileNotFoundError(f"no migrations found in {folder}")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations in one transaction; return the names applied.

    Concurrent callers serialise on an advisory lock, so running it from two processes
    at once, or twice, applies each file exactly once.
    """
    migrations = load_migrations(directory)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(CREATE_VERSIONS_TABLE)
        applied = {row["version"] for row in await conn.fetch(APPLIED_VERSIONS)}
        done = []
        for migration in migrations:
            if migration.version in applied:
                continue
            await conn.execute(migration.sql)
            await conn.execute(RECORD_VERSION, migration.version)
            done.append(migration.name)
    return done


async def pending_migrations(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Names of migrations not yet applied (an empty list means the schema is current)."""
    exists = await conn.fetchval("SELECT to_regclass('fdqueue_schema_migrations') IS NOT NULL")
    applied = {r["version"] for r in await conn.fetch(APPLIED_VERSIONS)} if exists else set()
    return [m.name for m in load_migrations(directory) if m.version not in applied]
