"""The admin CLI on a real database: every subcommand, its exit codes and its `--json` output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from fdqueue import __version__
from fdqueue.cli import main
from fdqueue.config import EX_CONFIG
from fdqueue.embedded import free_port
from fdqueue.migrate import load_migrations
from tests.pg import replace_database

API_KEY = "cli-test-key-7f3a91"
DB_PASSWORD = "cli-test-pw-52c8e0"
BODY_TEXT = "the body of a ticket that no admin command prints"
EX_TEMPFAIL = 75


@dataclass(frozen=True, slots=True)
class Run:
    """What one `fdqueue ...` invocation did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def fdqueue(*args: str, env: dict[str, str] | None = None) -> Run:
    """Run `python -m fdqueue.cli ARGS` with only `env` configured, as an operator would."""
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FDQUEUE_", "FRESHDESK_")) and key != "DATABASE_URL"
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fdqueue.cli",
        *args,
        env={**base, "FDQUEUE_LOG_FORMAT": "json", **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


INSERT_ROW = """
INSERT INTO freshdesk_ticket_queue (ticket_data, status, attempts, processed_at, error_message)
VALUES ($1::jsonb, $2, $3, now() - make_interval(days => $4::int), $5)
RETURNING id, public_id
"""


async def insert_row(
    pool: asyncpg.Pool, status: str, *, days_ago: int | None = None, error: str | None = None
) -> tuple[int, uuid.UUID]:
    """One row in `status`, processed `days_ago` days ago (None: not processed)."""
    ticket = {"email": "ada@example.com", "subject": "Help", "description": BODY_TEXT}
    attempts = 0 if status == "pending" else 1
    row = await pool.fetchrow(INSERT_ROW, ticket, status, attempts, days_ago, error)
    assert row is not None
    return row["id"], row["public_id"]


async def statuses_by_id(pool: asyncpg.Pool) -> dict[int, str]:
    rows = await pool.fetch("SELECT id, status FROM freshdesk_ticket_queue ORDER BY id")
    return {row["id"]: row["status"] for row in rows}


@pytest.fixture
def db_env(db_url: str) -> dict[str, str]:
    return {"DATABASE_URL": db_url}


@pytest.fixture
async def empty_db_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A new database with no schema at all, dropped afterwards."""
    name = f"fdqueue_cli_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield replace_database(pg_admin_url, name)
    finally:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# --- migrate ----------------------------------------------------------------------------------


async def test_migrate_applies_then_says_up_to_date(empty_db_url: str) -> None:
    """`migrate` on an empty database applies every file; run again, it says up to date."""
    first = await fdqueue("migrate", env={"DATABASE_URL": empty_db_url})
    expected = "".join(f"applied {m.name}\n" for m in load_migrations())
    assert (first.code, first.out) == (0, expected), first.err
    second = await fdqueue("migrate", env={"DATABASE_URL": empty_db_url})
    assert (second.code, second.out) == (0, "schema is up to date\n"), second.err


async def test_unreachable_database_exits_75_with_one_line() -> None:
    """A database nobody listens on: exit 75 (try again later) and one line saying so."""
    dead = f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{free_port()}/postgres"
    run = await fdqueue("stats", env={"DATABASE_URL": dead})
    assert run.code == EX_TEMPFAIL
    assert run.err.startswith("fdqueue: database unreachable:")
    assert len(run.err.strip().splitlines()) == 1
    assert DB_PASSWORD not in run.err


async def test_missing_database_url_exits_78_naming_it() -> None:
    """An admin command without DATABASE_URL: exit 78 and one line naming the variable."""
    run = await fdqueue("stats")
    assert run.code == EX_CONFIG
    assert run.err.strip().splitlines() == [
        "fdqueue: invalid configuration: DATABASE_URL: required setting missing"
        " (a postgresql:// URL)"
    ]


# --- stats ------------------------------------------------------------------------------------


async def test_stats_counts_rows_by_status(pool: asyncpg.Pool, db_env: dict[str, str]) -> None:
    """`stats --json` counts every status (zeros included); `stats` prints the same for people."""
    for status in ("pending", "pending", "completed", "failed"):
        await insert_row(pool, status, days_ago=None if status == "pending" else 0)
    run = await fdqueue("stats", "--json", env=db_env)
    assert run.code == 0, run.err
    stats = run.json()
    assert {k: stats[k] for k in ("pending", "processing", "completed", "failed")} == {
        "pending": 2,
        "processing": 0,
        "completed": 1,
        "failed": 1,
    }
    assert stats["due"] == 2
    human = await fdqueue("stats", env=db_env)
    assert human.code == 0
    lines = {
        line.split(":")[0].strip(): line.split(":")[1].strip() for line in human.out.splitlines()
    }
    assert (lines["pending"], lines["processing"], lines["failed"]) == ("2", "0", "1")


async def test_stats_on_an_empty_queue(db_env: dict[str, str]) -> None:
    """An empty queue: every count is zero and the oldest due age is null, not an error."""
    run = await fdqueue("stats", "--json", env=db_env)
    assert run.code == 0, run.err
    assert run.json() == {
        "pending": 0,
        "processing": 0,
        "completed": 0,
        "failed": 0,
        "due": 0,
        "oldest_due_age_seconds": None,
    }


# --- show -------------------------------------------------------------------------------------


async def test_show_by_queue_id_and_by_public_id(
    pool: asyncpg.Pool, db_env: dict[str, str]
) -> None:
    """`show` finds one row by queue id or public uuid, prints its fields but never its body."""
    queue_id, public_id = await insert_row(pool, "failed", days_ago=0, error="400: invalid_value")
    by_id = await fdqueue("show", str(queue_id), "--json", env=db_env)
    by_uuid = await fdqueue("show", str(public_id), "--json", env=db_env)
    assert by_id.code == by_uuid.code == 0, by_id.err + by_uuid.err
    assert by_id.json() == by_uuid.json()
    row = by_id.json()
    assert (row["id"], row["public_id"], row["status"]) == (queue_id, str(public_id), "failed")
    assert row["error_message"] == "400: invalid_value"
    human = await fdqueue("show", str(queue_id), env=db_env)
    assert human.code == 0
    assert any(line.split() == ["status:", "failed"] for line in human.out.splitlines())
    for run in (by_id, by_uuid, human):
        assert BODY_TEXT not in run.out
        assert "ada@example.com" not in run.out


@pytest.mark.parametrize("key", ["999999", "00000000-0000-4000-8000-000000000000", "nonsense"])
async def test_show_unknown_id_exits_1(db_env: dict[str, str], key: str) -> None:
    """An id, uuid or word that matches no row: exit 1, a message on stderr, nothing on stdout."""
    run = await fdqueue("show", key, "--json", env=db_env)
    assert run.code == 1
    assert run.out == ""
    assert f"no queued ticket {key!r}" in run.err


# --- retry-failed -------------------------------------------------------------------------------


async def test_retry_failed_one_then_all(pool: asyncpg.Pool, db_env: dict[str, str]) -> None:
    """`--id` sends back one failed row (exit 1 when it is not failed); without it, all of them."""
    first, _ = await insert_row(pool, "failed", days_ago=0, error="boom")
    second, _ = await insert_row(pool, "failed", days_ago=0, error="boom")
    done, _ = await insert_row(pool, "completed", days_ago=0)

    one = await fdqueue("retry-failed", "--id", str(first), "--json", env=db_env)
    assert (one.code, one.json()) == (0, {"retried": 1}), one.err
    assert await statuses_by_id(pool) == {first: "pending", second: "failed", done: "completed"}
    row = await pool.fetchrow(
        "SELECT attempts, error_message FROM freshdesk_ticket_queue WHERE id = $1", first
    )
    assert row is not None
    assert (row["attempts"], row["error_message"]) == (0, None)

    not_failed = await fdqueue("retry-failed", "--id", str(done), env=db_env)
    assert not_failed.code == 1
    assert "is not failed" in not_failed.err

    rest = await fdqueue("retry-failed", env=db_env)
    assert (rest.code, rest.out) == (0, "1 failed ticket(s) sent back to pending\n")
    assert await statuses_by_id(pool) == {first: "pending", second: "pending", done: "completed"}
    nothing = await fdqueue("retry-failed", "--json", env=db_env)
    assert (nothing.code, nothing.json()) == (0, {"retried": 0})


# --- purge --------------------------------------------------------------------------------------


async def test_purge_deletes_only_final_rows_older_than_the_cutoff(
    pool: asyncpg.Pool, db_env: dict[str, str]
) -> None:
    """`purge --older-than 7d` deletes completed and failed rows processed before then, only."""
    old_done, _ = await insert_row(pool, "completed", days_ago=10)
    old_failed, _ = await insert_row(pool, "failed", days_ago=10)
    recent, _ = await insert_row(pool, "completed", days_ago=1)
    waiting, _ = await insert_row(pool, "pending")
    await pool.execute(
        "UPDATE freshdesk_ticket_queue SET created_at = now() - interval '30 days' WHERE id = $1",
        waiting,
    )
    run = await fdqueue("purge", "--older-than", "7d", "--json", env=db_env)
    assert run.code == 0, run.err
    assert run.json() == {"deleted": 2, "older_than_seconds": 7 * 86400}
    assert await statuses_by_id(pool) == {recent: "completed", waiting: "pending"}
    assert old_done not in await statuses_by_id(pool)
    assert old_failed not in await statuses_by_id(pool)
    again = await fdqueue("purge", "--older-than", "12h", env=db_env)
    assert (again.code, again.out) == (
        0,
        "deleted 1 completed/failed ticket(s) older than 0.5 days\n",
    )


async def test_purge_defaults_to_the_retention_setting(
    pool: asyncpg.Pool, db_env: dict[str, str]
) -> None:
    """Without `--older-than`, purge uses FDQUEUE_RETENTION_DAYS."""
    await insert_row(pool, "completed", days_ago=3)
    keep = await fdqueue("purge", "--json", env=db_env)
    assert keep.json()["deleted"] == 0
    short = await fdqueue("purge", "--json", env={**db_env, "FDQUEUE_RETENTION_DAYS": "2"})
    assert short.json() == {"deleted": 1, "older_than_seconds": 2 * 86400}


# --- configuration ------------------------------------------------------------------------------

VALID = {
    "DATABASE_URL": f"postgresql://fdqueue:{DB_PASSWORD}@127.0.0.1:5432/fdqueue",
    "FRESHDESK_DOMAIN": "acme",
    "FRESHDESK_API_KEY": API_KEY,
}


async def test_check_config_valid_exits_0() -> None:
    """A complete configuration: exit 0, without touching the database or Freshdesk."""
    run = await fdqueue("check-config", env=VALID)
    assert (run.code, run.out, run.err) == (0, "configuration is valid\n", "")


@pytest.mark.parametrize(
    ("override", "variable"),
    [
        ({"FRESHDESK_API_KEY": ""}, "FRESHDESK_API_KEY"),
        ({"FRESHDESK_API_KEY": "   "}, "FRESHDESK_API_KEY"),
        ({"FRESHDESK_DOMAIN": ""}, "FRESHDESK_DOMAIN"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"FDQUEUE_BATCH_SIZE": "lots"}, "FDQUEUE_BATCH_SIZE"),
        ({"FDQUEUE_MAX_ATTEMPTS": "0"}, "FDQUEUE_MAX_ATTEMPTS"),
    ],
)
async def test_check_config_invalid_exits_78_naming_the_variable(
    override: dict[str, str], variable: str
) -> None:
    """B25: an empty or invalid setting: exit 78 and ONE line naming the variable, no trace."""
    run = await fdqueue("check-config", env={**VALID, **override})
    assert run.code == EX_CONFIG
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith(f"fdqueue: invalid configuration: {variable}: ")


async def test_show_config_masks_every_secret() -> None:
    """`show-config` (both forms) prints the settings but never the API key or DB password."""
    env = {**VALID, "FDQUEUE_ADMIN_TOKEN": "cli-admin-token-0a9d", "FDQUEUE_BATCH_SIZE": "25"}
    as_json = await fdqueue("show-config", "--json", env=env)
    human = await fdqueue("show-config", env=env)
    assert as_json.code == human.code == 0, as_json.err + human.err
    config = as_json.json()
    assert config["batch_size"] == 25
    assert config["freshdesk_domain"] == "acme"
    assert config["freshdesk_api_key"] == "**********"
    assert config["admin_token"] == "**********"
    assert "**********" in str(config["database_url"])
    for secret in (API_KEY, DB_PASSWORD, "cli-admin-token-0a9d"):
        assert secret not in as_json.out + as_json.err
        assert secret not in human.out + human.err
    assert "batch_size: 25" in human.out


# --- help and version (in-process: argparse answers before anything runs) -----------------------

COMMANDS = [
    "api",
    "worker",
    "dev",
    "migrate",
    "stats",
    "show",
    "retry-failed",
    "purge",
    "check-config",
    "show-config",
    "fake-freshdesk",
]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`fdqueue --help` lists every subcommand and exits 0."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    listed = out.split("commands:", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"(?m)^    (\S+)", listed) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`fdqueue COMMAND --help` describes the command and exits 0 without doing anything."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: fdqueue {command}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`fdqueue --version` prints the package version."""
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fdqueue {__version__}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Bare `fdqueue`: the help text, exit status 2 (a usage error)."""
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`purge --older-than soon`: argparse refuses it (exit 2) naming the accepted forms."""
    with pytest.raises(SystemExit) as exit_:
        main(["purge", "--older-than", "soon"])
    assert exit_.value.code == 2
    assert "not a duration: 'soon'" in capsys.readouterr().err
