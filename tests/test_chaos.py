"""Short versions of the chaos scenarios (tools/chaos.py), each against real processes."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools.chaos import (
    TEST,
    Context,
    Result,
    database_outage,
    freshdesk_misbehaves,
    hostile_input,
    secrets_check,
    several_workers,
    stop_and_start,
    table,
    worker_crashes,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def ctx() -> Iterator[Context]:
    """A run directory of this test's own (not tmp_path: PostgreSQL's user must reach it)."""
    root = Path(tempfile.mkdtemp(prefix="fdqueue-chaos-test-"))
    try:
        yield Context(root, TEST, f"chaos-key-{secrets.token_hex(12)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def assert_holds(result: Result) -> None:
    assert result.ok, "\n" + table([result])


async def test_b07_worker_killed_mid_delivery_loses_and_duplicates_nothing(ctx: Context) -> None:
    """B07: kill -9 and restart the worker during delivery; every 202 ends delivered once."""
    assert_holds(await worker_crashes(ctx))


async def test_b09_workers_and_manual_route_never_deliver_twice(ctx: Context) -> None:
    """B09: three workers and the manual-process route under NOTIFY storms: no duplicates."""
    assert_holds(await several_workers(ctx))


async def test_b01_database_restart_and_terminated_backends(ctx: Context) -> None:
    """B01: PostgreSQL restarted and every backend terminated mid-load: each 202 has its row,
    the worker survives, LISTENs again and catches up."""
    assert_holds(await database_outage(ctx))


async def test_b18_freshdesk_faults_outage_and_recovery(ctx: Context) -> None:
    """B16/B18: 5xx, hangs, create-then-fail, 429s, resets and a total outage: nothing lost,
    nothing duplicated, only Freshdesk's 400s fail."""
    assert_holds(await freshdesk_misbehaves(ctx))


async def test_b22_sigterm_mid_load_then_start_again(ctx: Context) -> None:
    """B22: SIGTERM both services mid-load: exit 0, no row left processing, all delivered."""
    assert_holds(await stop_and_start(ctx))


async def test_hostile_input_never_gets_a_500(ctx: Context) -> None:
    """Hostile bodies (nesting, sizes, types, Unicode, slow bodies): no 5xx but 503, no 202
    without a row, the API stays up."""
    assert_holds(await hostile_input(ctx))


async def test_secrets_stay_out_of_logs_and_admin_routes_are_guarded(ctx: Context) -> None:
    """Neither the API key nor ticket text in any log; admin routes refuse non-loopback
    clients without the token."""
    assert_holds(await secrets_check(ctx))
