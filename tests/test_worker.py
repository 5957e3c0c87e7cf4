"""The worker end to end: real PostgreSQL, the real loop and listener, the simulator over HTTP."""

from __future__ import annotations

import asyncio
import itertools
import random

import aiohttp
import asyncpg
import pytest
import structlog

from fdqueue import store
from fdqueue.migrate import migrate
from fdqueue.simulator import RunningSimulator
from tests.harness import (
    TICKET,
    RunningWorker,
    all_completed,
    creates,
    insert_tickets,
    make_settings,
    markers,
    running_worker,
    sim_faults,
    statuses,
    wait_until,
)
from tests.pg import EmbeddedPostgres


async def test_b03a_backlog_is_delivered_at_start_up(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B03 (a): 30 rows queued while no worker ran reach Freshdesk after start, without NOTIFY."""
    for _ in range(30):
        await store.enqueue(pool, TICKET, max_attempts=3)
    async with running_worker(make_settings(db_url, sim.url), pool):
        await wait_until(lambda: all_completed(pool, 30), within=20)
    assert len(creates(sim)) == 30
    assert len(set(markers(sim))) == 30


async def test_b03b_one_notification_many_rows(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B03 (b): 50 rows committed with one NOTIFY are all delivered (drain until empty)."""
    async with running_worker(make_settings(db_url, sim.url, batch_size=7), pool):
        await insert_tickets(pool, 50)
        await wait_until(lambda: all_completed(pool, 50))
    assert len(creates(sim)) == 50


async def test_b03c_timer_delivers_without_notify(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B03 (c): with no LISTEN at all, the poll timer still delivers rows."""
    settings = make_settings(db_url, sim.url, poll_interval=0.3)
    async with running_worker(settings, pool, listen=False):
        await asyncio.sleep(0.1)
        await insert_tickets(pool, 3)
        await wait_until(lambda: all_completed(pool, 3))


async def test_notify_wakes_idle_worker_before_timer(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """A ticket inserted while the worker idles reaches Freshdesk without waiting for the timer."""
    async with running_worker(make_settings(db_url, sim.url, poll_interval=3600), pool):
        await asyncio.sleep(0.2)
        await store.enqueue(pool, TICKET, max_attempts=3)
        await wait_until(lambda: all_completed(pool, 1), within=10)


async def test_b01_listener_reconnects_after_its_backend_is_killed(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B01: pg_terminate_backend on the LISTEN connection; it reconnects and NOTIFY works again."""
    settings = make_settings(db_url, sim.url, poll_interval=3600)
    with structlog.testing.capture_logs() as logs:
        async with running_worker(settings, pool) as running:
            assert running.listener is not None
            await pool.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
            )
            await wait_until(lambda: _reconnected(running), within=15)
            await store.enqueue(pool, TICKET, max_attempts=3)
            await wait_until(lambda: all_completed(pool, 1), within=10)
    assert any(e["event"] == "LISTEN connection lost; reconnecting" for e in logs)


async def _reconnected(running: RunningWorker) -> bool:
    assert running.listener is not None
    return running.listener.reconnects >= 2 and running.listener.connected.is_set()


async def test_b01_worker_survives_database_restart(
    embedded_pg: EmbeddedPostgres, sim: RunningSimulator
) -> None:
    """B01: restart PostgreSQL under a running worker; it re-LISTENs and catches up, no timer."""
    await migrated(embedded_pg.url)
    settings = make_settings(embedded_pg.url, sim.url, poll_interval=3600)
    pool = await store.create_pool(embedded_pg.url, max_size=4)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_worker(settings, pool) as running:
                embedded_pg.stop()
                await asyncio.sleep(0.5)
                embedded_pg.start()
                await wait_until(lambda: _reconnected(running), within=30)
                await store.enqueue(pool, TICKET, max_attempts=3)
                await wait_until(lambda: all_completed(pool, 1), within=15)
        assert any(e["event"] == "LISTEN connection lost; reconnecting" for e in logs)
    finally:
        await pool.close()


async def migrated(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def test_b05_self_probe_warns_when_notify_cannot_arrive(
    db_url: str, pool: asyncpg.Pool, pg_admin_url: str, sim: RunningSimulator
) -> None:
    """B05: a listener that cannot hear the pool's NOTIFY (as behind PgBouncer) is detected."""
    from fdqueue.listener import Listener

    # NOTIFY is per database: listening on another database stands in for a pooler that
    # hands LISTEN and NOTIFY different sessions.
    elsewhere = Listener(pg_admin_url, lambda: None)
    task = asyncio.create_task(elsewhere.run())
    try:
        await asyncio.wait_for(elsewhere.connected.wait(), timeout=10)
        assert not await elsewhere.probe(pool, wait=0.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    here = Listener(db_url, lambda: None)
    task = asyncio.create_task(here.run())
    try:
        await asyncio.wait_for(here.connected.wait(), timeout=10)
        assert await here.probe(pool, wait=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_b05_worker_without_notify_still_delivers_by_timer(
    db_url: str, pool: asyncpg.Pool, pg_admin_url: str, sim: RunningSimulator
) -> None:
    """B05: with NOTIFY never arriving, the statement-cache-free pool and the timer deliver."""
    settings = make_settings(db_url, sim.url, poll_interval=0.3, db_statement_cache_size=0)
    nocache = await store.create_pool(db_url, statement_cache_size=0)
    try:
        running = RunningWorker(settings, nocache, listen_dsn=pg_admin_url)
        await running.start()
        try:
            await insert_tickets(nocache, 20)
            await wait_until(lambda: all_completed(nocache, 20))
        finally:
            await running.stop()
    finally:
        await nocache.close()


async def test_b06_claim_commits_before_http_and_no_interface_errors(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B06: concurrent deliveries never share a connection; no idle-in-transaction during HTTP."""
    sim.state.config.latency = 0.03
    sim.state.config.latency_jitter = 0.02
    settings = make_settings(db_url, sim.url, batch_size=10, concurrency=10)
    with structlog.testing.capture_logs() as logs:
        async with running_worker(settings, pool):
            for round_ in range(1, 51):
                await insert_tickets(pool, 10)
                for _ in range(5):
                    await pool.execute("SELECT pg_notify('fdqueue_due', '')")
                await wait_until(lambda n=round_: all_completed(pool, 10 * n))  # type: ignore[misc]
            sim.state.config.latency = 2.0
            await insert_tickets(pool, 10)
            await asyncio.sleep(1.0)
            idle_in_tx = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'idle in transaction'"
            )
            assert idle_in_tx == 0
            await wait_until(lambda: all_completed(pool, 510))
    assert not [e for e in logs if "InterfaceError" in str(e)]


async def test_b07_rows_of_a_dead_worker_are_delivered_after_the_lease(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B07: rows claimed by a worker that died are reclaimed after the lease and delivered once."""
    await insert_tickets(pool, 3)
    dead = await store.claim_due(pool, 3, 0.5, "dead-worker")
    assert len(dead) == 3
    settings = make_settings(db_url, sim.url, poll_interval=3600)
    with structlog.testing.capture_logs() as logs:
        async with running_worker(settings, pool):
            await wait_until(lambda: all_completed(pool, 3))
    assert len(creates(sim)) == 3
    reclaimed = [e for e in logs if e["event"] == "reclaimed a row whose lease expired"]
    assert len(reclaimed) == 3


async def test_b07_slow_but_live_delivery_is_not_reclaimed(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B07 counter-check: a slow call within the HTTP timeout is never handed to another worker."""
    sim.state.config.latency = 1.5
    settings = make_settings(db_url, sim.url, http_timeout=3.0, http_connect_timeout=1.0)
    assert settings.lease_seconds > 4.0
    await insert_tickets(pool, 2)
    async with running_worker(settings, pool), running_worker(settings, pool):
        await wait_until(lambda: all_completed(pool, 2))
    assert len(creates(sim)) == 2


async def test_b09_three_workers_deliver_each_row_once(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B09: three workers with small batches and a NOTIFY storm send 500 creates, no duplicate."""
    settings = make_settings(db_url, sim.url, batch_size=3, concurrency=5)
    async with (
        running_worker(settings, pool),
        running_worker(settings, pool),
        running_worker(settings, pool),
    ):
        for _ in range(10):
            await insert_tickets(pool, 50)
            await pool.execute("SELECT pg_notify('fdqueue_due', '')")
        await wait_until(lambda: all_completed(pool, 500), within=60)
    assert len(creates(sim)) == 500
    assert len(set(markers(sim))) == 500


async def test_b11_backoff_spacing_and_failure_after_three_attempts(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B11: always 503: attempts 2 and 3 wait 2 and 4 units, then failed with exactly 3 creates."""
    unit = 0.3
    await sim_faults(sim, {"rates": {"503_html": 1.0}, "match": "create"})
    settings = make_settings(db_url, sim.url, backoff_unit=unit, poll_interval=0.05)
    await store.enqueue(pool, TICKET, max_attempts=3)
    async with running_worker(settings, pool):
        for _ in range(20):  # NOTIFYs and timer ticks during the waits must not retry early
            await pool.execute("SELECT pg_notify('fdqueue_due', '')")
            await asyncio.sleep(0.05)
        await wait_until(lambda: _status_is(pool, "failed"), within=30)
    sent = creates(sim)
    assert len(sent) == 3
    gaps = [b.time - a.time for a, b in itertools.pairwise(sent)]
    assert gaps[0] >= 2 * unit
    assert gaps[1] >= 4 * unit
    row = await pool.fetchrow(
        "SELECT attempts, error_message, last_http_status FROM freshdesk_ticket_queue"
    )
    assert row is not None
    assert row["attempts"] == 3
    assert row["last_http_status"] == 503


async def _status_is(pool: asyncpg.Pool, status: str) -> bool:
    found: str | None = await pool.fetchval("SELECT status FROM freshdesk_ticket_queue LIMIT 1")
    return found == status


async def test_b14_pool_queueing_never_times_out(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B14: 40 rows, concurrency 20, 5 connections, slow Freshdesk: all complete on attempt 1."""
    from fdqueue.freshdesk import FreshdeskClient
    from fdqueue.worker import Worker, WorkerOptions, build_deliverer

    sim.state.config.latency = 0.4
    settings = make_settings(db_url, sim.url, http_timeout=1.0, concurrency=20, batch_size=20)
    await insert_tickets(pool, 40)
    async with FreshdeskClient(sim.url, "test-key", timeout=1.0, max_in_flight=5) as client:
        worker = Worker(
            build_deliverer(settings, pool, client), WorkerOptions.from_settings(settings)
        )
        counts = await worker.drain()
    assert counts.successful == 40
    assert await pool.fetchval("SELECT max(attempts) FROM freshdesk_ticket_queue") == 1


async def test_b16_429_pauses_all_sends_and_uses_no_attempt(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B16: three 429s with Retry-After: no row failed, rows wait, all 10 complete, one warning."""
    await sim_faults(
        sim, {"script": [{"fault": "429", "retry_after": 1, "match": "create", "count": 3}]}
    )
    settings = make_settings(db_url, sim.url, concurrency=3, batch_size=10)
    await insert_tickets(pool, 10)
    with structlog.testing.capture_logs() as logs:
        async with running_worker(settings, pool):
            await wait_until(lambda: all_completed(pool, 10), within=30)
    sent = creates(sim)
    limited = [r for r in sent if r.status == 429]
    assert len(limited) == 3
    after = [r for r in sent if r.status == 201]
    assert min(r.time for r in after) >= max(r.time for r in limited) + 0.9
    assert await pool.fetchval("SELECT max(attempts) FROM freshdesk_ticket_queue") == 1
    warnings = [e for e in logs if e["event"] == "Freshdesk rate limit reached; pausing sends"]
    assert warnings
    assert {"ratelimit_total", "ratelimit_remaining", "retry_after"} <= warnings[0].keys()


async def test_b16_missing_retry_after_falls_back_to_default(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B16 variant: a 429 without Retry-After waits the configured default, then delivers."""
    await sim_faults(sim, {"script": [{"fault": "429", "retry_after": None, "match": "create"}]})
    settings = make_settings(db_url, sim.url, rate_limit_default_wait=0.5)
    await insert_tickets(pool, 1)
    async with running_worker(settings, pool):
        await wait_until(lambda: all_completed(pool, 1), within=20)
    sent = creates(sim)
    assert [r.status for r in sent] == [429, 201]
    assert sent[1].time - sent[0].time >= 0.45


async def test_b17b_validation_failure_fails_at_once(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B17 (b): a 400 'Validation failed' makes the row failed with no retry, errors stored."""
    bad = {**TICKET, "custom_fields": {"cf_does_not_exist": "x"}}
    await insert_tickets(pool, 1, bad)
    with structlog.testing.capture_logs() as logs:
        async with running_worker(make_settings(db_url, sim.url), pool):
            await wait_until(lambda: _status_is(pool, "failed"))
    row = await pool.fetchrow(
        "SELECT attempts, error_message, last_http_status FROM freshdesk_ticket_queue"
    )
    assert row is not None
    assert (row["attempts"], row["last_http_status"]) == (1, 400)
    assert "custom_fields.cf_does_not_exist" in row["error_message"]
    assert "invalid_field" in row["error_message"]
    assert len(creates(sim)) == 1
    failed = [e for e in logs if e["event"] == "Freshdesk ticket failed"]
    assert failed[0]["category"] == "FRESHDESK_ERROR"
    assert failed[0]["error_codes"] == ["custom_fields.cf_does_not_exist:invalid_field"]


@pytest.mark.parametrize("then", ["502_html", "reset", "201_text_plain", "201_empty", "500_json"])
async def test_create_then_fail_ends_with_exactly_one_ticket(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator, then: str
) -> None:
    """B18 and unknown outcomes: the ticket exists but the answer is lost or odd: one ticket."""
    await sim_faults(
        sim, {"script": [{"fault": "create_then_fail", "then": then, "match": "create"}]}
    )
    await insert_tickets(pool, 1)
    async with running_worker(make_settings(db_url, sim.url, backoff_unit=0.05), pool):
        await wait_until(lambda: all_completed(pool, 1))
    assert len(sim.state.tickets) == 1
    assert await pool.fetchval("SELECT freshdesk_ticket_id FROM freshdesk_ticket_queue") == "1"


async def test_b18_html_5xx_is_retried(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B18: a 502 HTML page from the edge is transient: the row is retried and completes."""
    await sim_faults(sim, {"script": [{"fault": "502_html", "match": "create"}]})
    await insert_tickets(pool, 1)
    with structlog.testing.capture_logs() as logs:
        async with running_worker(make_settings(db_url, sim.url, backoff_unit=0.05), pool):
            await wait_until(lambda: all_completed(pool, 1))
    retried = [e for e in logs if e["event"] == "Freshdesk delivery failed; will retry"]
    assert retried[0]["http_status"] == 502
    assert len(sim.state.tickets) == 1


async def test_401_pauses_without_using_attempts_until_key_is_fixed(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """401 leaves rows pending with attempts unchanged; with the key fixed they are delivered."""
    await insert_tickets(pool, 30)
    wrong = make_settings(
        db_url, sim.url, freshdesk_api_key="wrong-key", auth_pause=30, concurrency=2
    )
    with structlog.testing.capture_logs() as logs:
        async with running_worker(wrong, pool):
            await wait_until(lambda: _none_processing(pool))
            await asyncio.sleep(0.3)
    assert (await statuses(pool)) == {"pending": 30}
    assert await pool.fetchval("SELECT max(attempts) FROM freshdesk_ticket_queue") == 0
    assert len(creates(sim)) <= 4  # the pause stopped the rest from being sent
    assert any(e["log_level"] == "error" and "FRESHDESK_API_KEY" in e["event"] for e in logs)
    # Restarted with the right key: the paused rows go at once, not after the 30 s pause.
    async with running_worker(make_settings(db_url, sim.url), pool):
        await wait_until(lambda: all_completed(pool, 30))


async def _none_processing(pool: asyncpg.Pool) -> bool:
    return not await pool.fetchval(
        "SELECT count(*) FROM freshdesk_ticket_queue WHERE status = 'processing'"
    ) and bool(
        await pool.fetchval(
            "SELECT count(*) FROM freshdesk_ticket_queue WHERE error_message IS NOT NULL"
        )
    )


async def test_original_log_messages_carry_their_fields(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """The spec's log lines appear as event text, with queue and ticket ids as fields."""
    await insert_tickets(pool, 2)
    from fdqueue.freshdesk import FreshdeskClient
    from fdqueue.worker import Worker, WorkerOptions, build_deliverer

    settings = make_settings(db_url, sim.url)
    with structlog.testing.capture_logs() as logs:
        async with FreshdeskClient(sim.url, "test-key") as client:
            worker = Worker(build_deliverer(settings, pool, client), WorkerOptions())
            await worker.drain()
    done = [e for e in logs if e["event"].startswith("Freshdesk ticket completed: queue_id=")]
    assert {(e["queue_id"], e["ticket_id"]) for e in done} == {(1, 1), (2, 2)} or len(done) == 2
    assert all(
        e["event"]
        == f"Freshdesk ticket completed: queue_id={e['queue_id']}, ticket_id={e['ticket_id']}"
        for e in done
    )
    summary = [
        e for e in logs if e["event"] == "Freshdesk queue processing: 2 successful, 0 failed"
    ]
    assert summary[0]["successful"] == 2
    assert summary[0]["failed"] == 0


async def test_cleanup_runs_in_one_worker_only(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B13: the daily cleanup deletes old final rows; a second worker at the same time skips."""
    await pool.execute(
        "INSERT INTO freshdesk_ticket_queue (ticket_data, status, processed_at)"
        " SELECT '{}', 'completed', now() - interval '8 days' FROM generate_series(1, 2500)"
    )
    from fdqueue.freshdesk import FreshdeskClient
    from fdqueue.worker import Worker, WorkerOptions, build_deliverer

    settings = make_settings(db_url, sim.url)
    async with FreshdeskClient(sim.url, "test-key") as client:
        workers = [
            Worker(build_deliverer(settings, pool, client), WorkerOptions(cleanup_batch=100))
            for _ in range(2)
        ]
        results = await asyncio.gather(*(w.cleanup() for w in workers))
    assert sorted(results, key=lambda r: -1 if r is None else r) in ([None, 2500], [0, 2500])
    assert await pool.fetchval("SELECT count(*) FROM freshdesk_ticket_queue") == 0


def test_next_daily_cleanup_time() -> None:
    """The cleanup runs at the next local 03:00, tomorrow when today's has passed."""
    from datetime import datetime, timedelta, timezone

    from fdqueue.worker import next_daily

    tz = timezone(timedelta(hours=2))
    assert next_daily((3, 0), datetime(2026, 1, 1, 2, 0, tzinfo=tz)) == datetime(
        2026, 1, 1, 3, 0, tzinfo=tz
    )
    assert next_daily((3, 0), datetime(2026, 1, 1, 3, 0, tzinfo=tz)) == datetime(
        2026, 1, 2, 3, 0, tzinfo=tz
    )


_ = random


async def test_pacing_follows_the_account_limit_with_almost_no_429(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """A backlog is sent at the account's rate (X-RateLimit-Total per window), not in 429 bursts."""
    sim.state.configure({"create_limit": 10, "window_seconds": 1.0})
    settings = make_settings(db_url, sim.url, freshdesk_rate_window=1.0, concurrency=10)
    await insert_tickets(pool, 35)
    async with running_worker(settings, pool):
        await wait_until(lambda: all_completed(pool, 35), within=60)
    sent = creates(sim)
    limited = [r for r in sent if r.status == 429]
    assert len(limited) <= 1
    assert len(sent) - len(limited) == 35


async def test_own_rate_cap_spaces_creates(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """FDQUEUE_FRESHDESK_MAX_PER_MINUTE caps creates even when Freshdesk would allow more."""
    settings = make_settings(db_url, sim.url, freshdesk_max_per_minute=60)  # one a second
    await insert_tickets(pool, 3)
    async with running_worker(settings, pool):
        await wait_until(lambda: all_completed(pool, 3))
    times = sorted(r.time for r in creates(sim))
    # Slots are a second apart; scheduling noise is milliseconds, so a lower bound well
    # under 2 s only fails when the cap is not applied (unpaced, all three go at once).
    assert times[-1] - times[0] >= 1.5


async def test_b13_cleanup_during_delivery_leaves_live_rows(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """B13 (b): a batched purge of 20k old rows runs beside deliveries; live rows are untouched."""
    await pool.execute(
        "INSERT INTO freshdesk_ticket_queue (ticket_data, status, processed_at)"
        " SELECT '{}', 'completed', now() - interval '30 days' FROM generate_series(1, 20000)"
    )
    settings = make_settings(db_url, sim.url, cleanup_batch=500)
    async with running_worker(settings, pool) as running:
        await insert_tickets(pool, 100)
        deleted = await running.worker.cleanup()
        await wait_until(lambda: all_completed(pool, 100))
    assert deleted == 20000
    assert await pool.fetchval("SELECT count(*) FROM freshdesk_ticket_queue") == 100


async def test_worker_metrics_count_deliveries_and_rate_limits(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """The worker's /metrics reports deliveries by outcome, Freshdesk latency and 429s."""
    from fdqueue.embedded import free_port
    from fdqueue.freshdesk import FreshdeskClient
    from fdqueue.worker import Worker, WorkerOptions, build_deliverer
    from fdqueue.worker_metrics import WorkerMetrics, start_metrics_server

    await sim_faults(sim, {"script": [{"fault": "429", "retry_after": 1, "match": "create"}]})
    await insert_tickets(pool, 3)
    metrics = WorkerMetrics()
    port = free_port()
    exporter = await start_metrics_server(metrics, port)
    settings = make_settings(db_url, sim.url, concurrency=1)
    try:
        async with FreshdeskClient(sim.url, "test-key", max_in_flight=1) as client:
            worker = Worker(build_deliverer(settings, pool, client, metrics), WorkerOptions())
            await worker.drain()
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as response,
            ):
                text = await response.text()
    finally:
        await exporter.cleanup()
    assert 'fdqueue_deliveries_total{outcome="retry"} 1.0' in text
    assert "fdqueue_freshdesk_rate_limited_total 1.0" in text
    assert 'fdqueue_freshdesk_request_seconds_count{status="429"} 1.0' in text


async def test_b07_send_never_outlives_the_lease(
    db_url: str, pool: asyncpg.Pool, sim: RunningSimulator
) -> None:
    """A look-up that would eat the lease ends as failed and nothing is sent: a second
    worker reclaiming the row could otherwise send it twice."""
    from fdqueue.freshdesk import FreshdeskClient
    from fdqueue.worker import Worker, WorkerOptions, build_deliverer

    sim.state.config.latency = 2.0  # every call, the look-up included, takes 2 s
    settings = make_settings(db_url, sim.url, http_timeout=2.5, http_connect_timeout=0.5, lease=3.5)
    await insert_tickets(pool, 1)
    await pool.execute("UPDATE freshdesk_ticket_queue SET outcome_unknown = true")
    async with FreshdeskClient(sim.url, "test-key", timeout=2.5, connect_timeout=0.5) as client:
        worker = Worker(build_deliverer(settings, pool, client), WorkerOptions())
        counts = await worker.drain()
    assert counts.retried == 1
    assert creates(sim) == []
    row = await pool.fetchrow(
        "SELECT status, attempts, outcome_unknown FROM freshdesk_ticket_queue"
    )
    assert row is not None
    assert (row["status"], row["attempts"], row["outcome_unknown"]) == ("pending", 0, True)
