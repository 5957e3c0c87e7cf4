"""The delivery daemon: wait for a wake, the timer or stop; drain due rows, boundedly concurrent."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import structlog

from fdqueue import sdnotify, store
from fdqueue.config import Settings
from fdqueue.delivery import Deliverer
from fdqueue.freshdesk import FreshdeskClient
from fdqueue.listener import CONNECTION_ERRORS, Listener
from fdqueue.models import ClaimedTicket, DrainCounts
from fdqueue.pacing import SendGate
from fdqueue.policy import RetryPolicy
from fdqueue.worker_metrics import WorkerMetrics, start_metrics_server

log = structlog.get_logger("fdqueue.worker")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """The numbers the loop runs on (from Settings)."""

    batch_size: int = 10
    concurrency: int = 10
    poll_interval: float = 60.0
    shutdown_grace: float = 20.0
    retention_seconds: float = 7 * 86400
    cleanup_at: tuple[int, int] = (3, 0)
    cleanup_batch: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerOptions:
        return cls(
            batch_size=settings.batch_size,
            concurrency=settings.concurrency,
            poll_interval=settings.poll_interval,
            shutdown_grace=settings.shutdown_grace,
            retention_seconds=settings.retention_days * 86400,
            cleanup_at=(settings.cleanup_at.hour, settings.cleanup_at.minute),
            cleanup_batch=settings.cleanup_batch,
        )


class Worker:
    """Claims due rows and delivers them; `drain()` is the unit of work tests and the API call."""

    def __init__(self, deliverer: Deliverer, options: WorkerOptions) -> None:
        self.deliverer = deliverer
        self.options = options
        # New for every start: a restarted worker never mistakes an old claim for its own.
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake_event = asyncio.Event()
        self.stopping = asyncio.Event()
        self._inflight: dict[asyncio.Task[str], ClaimedTicket] = {}
        self._next_cleanup = next_daily(options.cleanup_at, _local_now())

    @property
    def pool(self) -> asyncpg.Pool:
        return self.deliverer.pool

    def wake(self) -> None:
        self.wake_event.set()

    async def drain(self) -> DrainCounts:
        """Claim and deliver until nothing is due; returns what it did.

        Keeps up to `concurrency` deliveries in flight and claims more as slots free up, so a
        slow Freshdesk answer never holds back the rest of a batch. Each claim commits before
        any HTTP call (case B06). Stops claiming at once when the worker is stopping.
        """
        counts = DrainCounts()
        while not self.stopping.is_set():
            free = self.options.concurrency - len(self._inflight)
            wanted = min(self.options.batch_size, free)
            claimed = await self._claim(wanted) if wanted > 0 else []
            for ticket in claimed:
                task = asyncio.create_task(self.deliverer.deliver(ticket))
                self._inflight[task] = ticket
            if not self._inflight:
                break
            if wanted == 0 or len(claimed) < wanted:
                # Every slot busy, or nothing more is due: wait for a delivery to finish.
                await self._collect(counts)
        await self._finish(counts)
        if counts.processed:
            log.info(
                "Freshdesk queue processing: "
                f"{counts.successful} successful, {counts.failed} failed",
                **counts.as_dict(),
            )
        return counts

    async def _claim(self, limit: int) -> list[ClaimedTicket]:
        if self.deliverer.gate.paused_for() > 0:
            return []
        return await store.claim_due(self.pool, limit, self.deliverer.lease_seconds, self.token)

    async def _collect(self, counts: DrainCounts) -> None:
        """Wait until one delivery finishes (or the worker is told to stop); count results."""
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([*self._inflight, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        self._count_done(counts)

    def _count_done(self, counts: DrainCounts) -> None:
        for task in [t for t in self._inflight if t.done()]:
            self._inflight.pop(task)
            if not task.cancelled():
                counts.add(task.result())

    async def _finish(self, counts: DrainCounts) -> None:
        """Let in-flight deliveries end; when stopping, only for the grace period (then release)."""
        if not self._inflight:
            return
        grace = self.options.shutdown_grace if self.stopping.is_set() else None
        if grace is not None:
            sdnotify.status(f"stopping: finishing {len(self._inflight)} deliveries")
        _, late = await asyncio.wait(self._inflight, timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task in late:
            await self._release(self._inflight.pop(task))
        self._count_done(counts)

    async def run(self) -> None:
        """Loop until `stopping` is set: drain, then sleep until a wake, the timer or stop."""
        self.wake()  # start-up: rows that arrived while no worker ran (case B03)
        await self._resume_account_pauses()
        while not self.stopping.is_set():
            self.wake_event.clear()
            try:
                await self.drain()
                timeout = await self._sleep_for()
            except CONNECTION_ERRORS as exc:
                timeout = min(self.options.poll_interval, 5.0) * (1 + random.random())
                log.warning(
                    "database unavailable; will retry",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_seconds=round(timeout, 2),
                )
            self._maybe_cleanup()
            sdnotify.status(self._status_text())
            await _wait_any(self.wake_event, self.stopping, timeout)

    async def _resume_account_pauses(self) -> None:
        """A restart is how a fixed key takes effect: rows paused by 401/403/404 go now."""
        try:
            resumed = await store.resume_account_pauses(self.pool)
        except CONNECTION_ERRORS as exc:
            log.warning("could not resume paused rows", error=f"{type(exc).__name__}: {exc}")
            return
        if resumed:
            log.info("rows paused by a Freshdesk account error are due again", rows=resumed)

    async def _sleep_for(self) -> float:
        """Until the timer, the next scheduled retry, the next lease expiry or a pause's end."""
        candidates = [self.options.poll_interval]
        for probe in (store.seconds_until_next_due, store.seconds_until_lease_expiry):
            seconds = await probe(self.pool)
            if seconds is not None:
                candidates.append(max(seconds, 0.0) + 0.01)
        paused = self.deliverer.gate.paused_for()
        if paused > 0:
            candidates.append(paused)
        until_cleanup = (self._next_cleanup - _local_now()).total_seconds()
        candidates.append(max(until_cleanup, 0.0))
        return max(min(candidates), 0.01)

    def _maybe_cleanup(self) -> None:
        if _local_now() < self._next_cleanup:
            return
        self._next_cleanup = next_daily(self.options.cleanup_at, _local_now())
        task = asyncio.create_task(self.cleanup())
        task.add_done_callback(_log_task_error)

    async def cleanup(self) -> int | None:
        """Delete old final rows unless another worker holds the cleanup lock (case B13)."""
        deleted = await store.purge_exclusive(
            self.pool, self.options.retention_seconds, self.options.cleanup_batch
        )
        if deleted is not None:
            log.info("Freshdesk queue cleanup finished", deleted=deleted)
        return deleted

    async def _release(self, ticket: ClaimedTicket) -> None:
        """Hand a cancelled delivery's row back now; it may have been sent, so look up first."""
        await self.deliverer.hand_back(
            ticket, delay=0, reason="worker stopped during delivery", give_back=True
        )

    def _status_text(self) -> str:
        paused = self.deliverer.gate.paused_for()
        if paused > 0:
            return f"paused {paused:.0f}s: {self.deliverer.gate.pause_reason}"
        return f"idle; delivered {self.deliverer.outcomes.get('completed', 0)} tickets"


async def _wait_any(wake: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.create_task(wake.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _local_now() -> datetime:
    return datetime.now().astimezone()


def next_daily(at: tuple[int, int], now: datetime) -> datetime:
    """The next local `at` (hour, minute) strictly after `now` (timezone-aware)."""
    candidate = now.replace(hour=at[0], minute=at[1], second=0, microsecond=0)
    if candidate <= now:
        candidate += timedelta(days=1)
    return candidate


def _log_task_error(task: asyncio.Task[int | None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Freshdesk queue cleanup failed", error=repr(task.exception()))


# --- The daemon ------------------------------------------------------------------------


def build_deliverer(
    settings: Settings,
    pool: asyncpg.Pool,
    client: FreshdeskClient,
    metrics: WorkerMetrics | None = None,
) -> Deliverer:
    """The delivery machinery configured from Settings (shared by worker and API)."""
    return Deliverer(
        pool=pool,
        client=client,
        rules=RetryPolicy(settings.backoff_unit, settings.backoff_jitter, settings.auth_pause),
        gate=SendGate(
            max_per_minute=settings.freshdesk_max_per_minute, window=settings.freshdesk_rate_window
        ),
        lease_seconds=settings.lease_seconds,
        send_seconds=settings.http_timeout + settings.http_connect_timeout,
        default_retry_after=settings.rate_limit_default_wait,
        marker_field=settings.freshdesk_marker_field,
        default_tags=tuple(settings.default_tags),
        metrics=metrics,
    )


async def connect_with_retry(settings: Settings, stop: asyncio.Event) -> asyncpg.Pool | None:
    """Open the pool, retrying with logged backoff while the database is down (case B22)."""
    failures = 0
    while not stop.is_set():
        try:
            return await store.create_pool(
                settings.require_database(),
                max_size=settings.db_pool_max,
                statement_cache_size=settings.db_statement_cache_size,
                connect_timeout=settings.db_connect_timeout,
            )
        except CONNECTION_ERRORS as exc:
            failures += 1
            delay = min(30.0, 2.0**failures) * (1 + random.random() * 0.25)
            log.warning(
                "database unreachable at start-up; retrying",
                error=f"{type(exc).__name__}: {exc}",
                retry_in_seconds=round(delay, 1),
            )
            sdnotify.status(f"waiting for the database (attempt {failures})")
            await _wait_any(asyncio.Event(), stop, delay)
    return None


async def serve_worker(settings: Settings) -> int:
    """Run the worker daemon until SIGTERM/SIGINT; return the exit status (0: clean stop)."""
    settings.check_required()
    base_url, api_key = settings.require_freshdesk()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog = sdnotify.watchdog_interval()
    pinger = asyncio.create_task(sdnotify.watchdog_loop(watchdog)) if watchdog else None
    pool = await connect_with_retry(settings, stop)
    if pool is None:
        return 0
    client = FreshdeskClient(
        base_url,
        api_key,
        timeout=settings.http_timeout,
        connect_timeout=settings.http_connect_timeout,
        max_in_flight=settings.concurrency,
    )
    try:
        await _run_until_stopped(settings, pool, client, stop)
    finally:
        await client.close()
        await pool.close()
        if pinger is not None:
            pinger.cancel()
    log.info("worker stopped")
    return 0


async def _run_until_stopped(
    settings: Settings, pool: asyncpg.Pool, client: FreshdeskClient, stop: asyncio.Event
) -> None:
    metrics = WorkerMetrics()
    deliverer = build_deliverer(settings, pool, client, metrics)
    worker = Worker(deliverer, WorkerOptions.from_settings(settings))
    exporter = None
    if settings.worker_metrics_port:
        exporter = await start_metrics_server(metrics, settings.worker_metrics_port)
    listen_dsn = settings.listener_database_url or settings.database_url
    assert listen_dsn is not None
    listener = Listener(
        listen_dsn.get_secret_value(), worker.wake, connect_timeout=settings.db_connect_timeout
    )
    listening = asyncio.create_task(listener.run(), name="the LISTEN connection")
    runner = asyncio.create_task(worker.run(), name="the worker loop")
    try:
        await _wait_any(listener.connected, stop, settings.db_connect_timeout * 3)
        if listener.connected.is_set() and not await listener.probe(pool):
            log.warning(
                "NOTIFY does not reach the LISTEN connection (a transaction-mode pooler such as "
                "PgBouncer?); set FDQUEUE_LISTENER_DATABASE_URL to a direct connection. "
                "Falling back to the FDQUEUE_POLL_INTERVAL timer."
            )
        sdnotify.ready("ready; waiting for tickets")
        log.info(
            "worker started",
            token=worker.token,
            batch_size=settings.batch_size,
            concurrency=settings.concurrency,
            poll_interval=settings.poll_interval,
        )
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, runner, listening], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        for task in (runner, listening):
            if task.done():
                # A bug ended the loop or the listener (which never ends by itself): raise
                # it, exit non-zero, and let systemd restart a whole worker.
                task.result()
                raise RuntimeError(f"{task.get_name()} ended on its own")
        sdnotify.stopping("stopping: finishing in-flight deliveries")
        log.info("stopping: finishing in-flight deliveries")
        worker.stopping.set()
        await runner
    finally:
        for task in (runner, listening):
            task.cancel()
        await asyncio.gather(runner, listening, return_exceptions=True)
        if exporter is not None:
            await exporter.cleanup()
