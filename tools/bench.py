"""`make bench`: fdqueue's real processes measured against baselines taken in the same run.

    python -m tools.bench [--quick] [--profile] [--out DIR]

Starts a PostgreSQL database of its own (a fresh database on the server DATABASE_URL names,
dropped afterwards; else an embedded, durable one), the Freshdesk simulator, `fdqueue api`
and `fdqueue worker` as processes (`tools.system`), runs the scenarios of issue 7 in three
rounds each, prints one table (median, min-max) and writes DIR/benchmarks.md and
DIR/benchmarks.json. The machine is shared and noisy, so every target is a ratio against a
baseline of the same run. `--profile` installs py-spy into .venv and samples the api and the
worker during the first round of scenarios 1 and 3 (DIR/profile-*.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from fdqueue import store
from fdqueue.config import load_settings
from fdqueue.freshdesk import marker_for
from fdqueue.models import TicketIn
from tools.loadgen import post_load, wrk_version
from tools.system import Service, System

# One valid submission, as a web form sends it; the worker creates it as is.
SUBMISSION: Final = {
    "email": "bench@example.com",
    "subject": "Printer on fire",
    "description": "<p>The printer on the third floor is on fire.</p>",
    "priority": 2,
}
TICKET_DATA: Final = TicketIn.model_validate(SUBMISSION).ticket_data()
MAX_ATTEMPTS: Final = 3

# The targets of issue 7.
INTAKE_RATIO: Final = 1.0
INTAKE_P99_MS: Final = 50.0
PICKUP_RATIO: Final = 2.0
DELIVERY_LATENCY: Final = 0.05
DELIVERY_CONCURRENCY: Final = 50
DELIVERY_SHARE: Final = 0.95
FAST_CONCURRENCY: Final = 10
PACING_LIMIT: Final = 40
PACING_WINDOW: Final = 5
PACING_SHARE: Final = 0.95
PACING_429_SHARE: Final = 0.01
SCALE_SHARE: Final = 0.90
RSS_MB: Final = 80.0

# The bench's own SQL: setup and clean-up of its private database, and what it reads back.
DELETE_ABOVE = "DELETE FROM freshdesk_ticket_queue WHERE id > $1"
VACUUM = "VACUUM ANALYZE freshdesk_ticket_queue"
MAX_ID = "SELECT coalesce(max(id), 0) FROM freshdesk_ticket_queue"
# Old deliveries as a long-running service keeps them: completed, each with its ticket id.
INSERT_COMPLETED = """
INSERT INTO freshdesk_ticket_queue
    (ticket_data, status, attempts, processed_at, freshdesk_ticket_id, last_http_status)
SELECT $1::jsonb, 'completed', 1, now() - make_interval(secs => g), g::text, 201
FROM generate_series(1, $2) AS g
"""
TRANSACTIONS = """
SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()
"""
SETTINGS: Final = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "full_page_writes",
    "commit_delay",
    "shared_buffers",
    "max_connections",
)
SHOW_SETTINGS = "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])"


@dataclass(frozen=True, slots=True)
class Plan:
    """How big each scenario runs: the full run or `--quick`."""

    name: str
    intake_seconds: float
    baseline_seconds: float
    pickup_tickets: int
    delivery_rows: int
    fast_rows: int
    pacing_backlog: int
    scale_rows: int
    rounds: int = 3
    clients: int = 64
    baseline_connections: int = 8
    pickup_gap: float = 0.02


FULL: Final = Plan("full", 20, 5, 200, 10_000, 5_000, 400, 1_000_000)
QUICK: Final = Plan("quick", 3, 2, 50, 1_000, 1_000, 60, 100_000)


# --- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Series:
    """One figure over the rounds."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self, digits: int = 0) -> str:
        """`median (min-max)`."""
        low, high = min(self.values), max(self.values)
        return f"{self.median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


@dataclass(frozen=True, slots=True)
class Line:
    """One line of the table; `ratio` is value ÷ baseline (medians), `met` None to report."""

    number: str
    scenario: str
    metric: str
    value: Series
    digits: int = 0
    baseline: Series | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: str = "report"
    met: bool | None = None


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (`share` in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share / 100 * len(ordered)) - 1)]


def ratio_line(
    head: tuple[str, str, str],
    value: Series,
    baseline: Series,
    baseline_name: str,
    *,
    target: str,
    holds: Callable[[float], bool],
    digits: int = 0,
) -> Line:
    """A line whose target is a bound on value ÷ baseline (medians)."""
    ratio = value.median / baseline.median
    return Line(
        *head, value, digits, baseline, baseline_name, ratio, target=target, met=holds(ratio)
    )


# --- the database --------------------------------------------------------------------------


class BenchSystem(System):
    """`tools.system.System`, but on a fresh database of a configured server when one is
    given (created at start, dropped at close), else on a durable embedded PostgreSQL."""

    def __init__(self, root: Path, server_url: str | None) -> None:
        super().__init__(root, durable=True)
        self.server_url = server_url
        self.fresh_url: str | None = None

    @property
    def db_url(self) -> str:
        return self.fresh_url or self.database.url

    @property
    def kind(self) -> str:
        if self.server_url is None:
            return "embedded PostgreSQL (pgserver binaries), durable: fsync and synchronous commit"
        return f"the configured server, in a fresh database {urlsplit(self.db_url).path[1:]}"

    async def start_database(self) -> None:
        if self.server_url is None:
            await super().start_database()
        else:
            self.fresh_url = await create_database(self.server_url)

    async def close(self) -> None:
        await super().close()
        if self.server_url is not None and self.fresh_url is not None:
            await drop_database(self.server_url, self.fresh_url)


async def create_database(server_url: str) -> str:
    """Create a fresh database on `server_url`'s server; return its URL."""
    name = f"fdqueue_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return urlsplit(server_url)._replace(path=f"/{name}").geturl()


async def drop_database(server_url: str, fresh_url: str) -> None:
    """Drop the database `create_database` made (cutting any session left in it)."""
    name = urlsplit(fresh_url).path[1:]
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- the bench: the system, its state between rounds, and what it measured ---------------------


class Bench:
    """The running system plus the helpers scenarios share; collects lines and raw figures."""

    def __init__(self, system: BenchSystem, plan: Plan, profile_dir: Path | None) -> None:
        self.system = system
        self.plan = plan
        self.profile_dir = profile_dir
        self.lines: list[Line] = []
        self.raw: dict[str, Any] = {}
        self.peak_rss_mb: dict[str, float] = {"api": 0.0, "worker": 0.0}
        self.keep_up_to = 0  # rows with id <= this survive `reset` (the scale scenario's)
        self._conn: asyncpg.Connection | None = None

    @property
    def api(self) -> Service:
        return self.system.apis[0]

    async def conn(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.system.db_url, timeout=10)
            await store.init_connection(self._conn)
        return self._conn

    async def close(self) -> None:
        self.note_rss(self.api, "api")
        await self.stop_workers()
        if self._conn is not None:
            await self._conn.close()

    async def reset(self) -> None:
        """Delete the rows of the last round (vacuumed) and forget the simulator's tickets."""
        conn = await self.conn()
        await conn.execute(DELETE_ABOVE, self.keep_up_to)
        await conn.execute(VACUUM)
        async with self.system.http().post(f"{self.system.sim_url}/_simulator/reset") as reply:
            reply.raise_for_status()

    async def use_worker(self, **env: str) -> Service:
        """Stop the running worker, start one with `env` (FDQUEUE_ variables)."""
        await self.stop_workers()
        return await self.system.add_worker(env)

    async def stop_workers(self) -> None:
        for worker in self.system.workers:
            if worker.running:
                self.note_rss(worker, "worker")
                await worker.terminate()

    def note_rss(self, service: Service, kind: str) -> None:
        """Keep the process's peak RSS (VmHWM) before it ends."""
        if service.pid is None:
            return
        status = Path(f"/proc/{service.pid}/status").read_text(encoding="ascii")
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if found:
            megabytes = int(found.group(1)) * 1024 / 1e6
            self.peak_rss_mb[kind] = max(self.peak_rss_mb[kind], megabytes)

    async def enqueue(self, count: int) -> None:
        """`count` due rows in one statement and one commit (the intake's own group commit)."""
        tickets = [store.NewTicket(TICKET_DATA, MAX_ATTEMPTS) for _ in range(count)]
        await store.enqueue_many(await self.conn(), tickets)

    async def wait_for_tickets(self, count: int, within: float) -> None:
        """Until the simulator holds `count` tickets; RuntimeError after `within` seconds."""
        deadline = time.monotonic() + within
        url = f"{self.system.sim_url}/_simulator/health"
        while time.monotonic() < deadline:
            async with self.system.http().get(url) as reply:
                if (await reply.json())["tickets"] >= count:
                    return
            await asyncio.sleep(0.1)
        log_tail = self.system.workers[-1].log_tail() if self.system.workers else ""
        raise RuntimeError(f"the simulator did not get {count} tickets in {within} s\n{log_tail}")

    async def creates(self) -> list[dict[str, Any]]:
        """The simulator's ticket-create calls of this round, in arrival order."""
        return [
            r
            for r in await self.system.requests()
            if r["method"] == "POST" and r["path"] == "/api/v2/tickets"
        ]

    async def create_rate(self) -> float:
        """The round's creates answered 201 per second, from the first to the last."""
        times = [float(r["time"]) for r in await self.creates() if r["status"] == 201]
        return (len(times) - 1) / (max(times) - min(times))

    async def configure(self, **changes: float) -> None:
        await self.system.configure_simulator(changes)

    @contextlib.asynccontextmanager
    async def profiled(self, service: Service, name: str, seconds: float) -> AsyncIterator[None]:
        """With --profile: sample `service` with py-spy while the block runs."""
        if self.profile_dir is None or service.pid is None or not name:
            yield
            return
        raw = self.profile_dir / f"profile-{name}.raw"
        spy = await asyncio.create_subprocess_exec(
            *py_spy_command(service.pid, seconds, raw),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            yield
        finally:
            await spy.wait()
        if raw.exists():
            raw.with_suffix(".txt").write_text(summarise_profile(raw), encoding="utf-8")
            raw.unlink()


# --- scenario 1: intake --------------------------------------------------------------------


async def bare_insert_rate(url: str, connections: int, seconds: float) -> float:
    """Rows per second of `connections` asyncpg loops of one INSERT + NOTIFY per transaction.

    `store.enqueue` is the product's one-row statement; its trigger sends the NOTIFY.
    """
    done = 0

    async def loop(deadline: float) -> None:
        nonlocal done
        conn = await asyncpg.connect(url, timeout=10)
        await store.init_connection(conn)
        try:
            while time.monotonic() < deadline:
                await store.enqueue(conn, TICKET_DATA, max_attempts=MAX_ATTEMPTS)
                done += 1
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(loop(started + seconds) for _ in range(connections)))
    return done / (time.monotonic() - started)


async def intake_round(bench: Bench, name: str) -> dict[str, float]:
    """wrk POSTs to the api at fixed concurrency; its 202s per second and latency."""
    url = f"{bench.api.url}/api/create-freshdesk-ticket"
    seconds = bench.plan.intake_seconds
    async with bench.profiled(bench.api, name, seconds):
        result = await post_load(url, SUBMISSION, connections=bench.plan.clients, seconds=seconds)
    if result.other or result.errors:
        print(f"  warning: {result.other} answers other than 202, {result.errors} socket errors")
    return {"rate": result.rate, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms}


async def intake_rounds(bench: Bench, name: str, *, with_baseline: bool) -> dict[str, Series]:
    """Rounds of the api (and, interleaved, of the bare loop), no worker running."""
    await bench.stop_workers()
    figures: dict[str, list[float]] = {"rate": [], "p50_ms": [], "p99_ms": [], "baseline": []}
    plan = bench.plan
    for round_ in range(plan.rounds):
        if with_baseline:
            rate = await bare_insert_rate(
                bench.system.db_url, plan.baseline_connections, plan.baseline_seconds
            )
            figures["baseline"].append(rate)
            await bench.reset()
        profile_name = f"{name}-api" if round_ == 0 else ""
        for key, value in (await intake_round(bench, profile_name)).items():
            figures[key].append(value)
        await bench.reset()
        progress(name, round_, figures)
    return {key: Series(tuple(values)) for key, values in figures.items() if values}


async def scenario_intake(bench: Bench) -> None:
    found = await intake_rounds(bench, "intake", with_baseline=True)
    bench.raw["1_intake"] = found
    name = f"bare asyncpg INSERT + NOTIFY, {bench.plan.baseline_connections} connections"
    head = ("1", f"intake, {bench.plan.clients} clients", "202 answers/s")
    bench.lines += [
        ratio_line(
            head,
            found["rate"],
            found["baseline"],
            name,
            target=f"≥ {INTAKE_RATIO:.1f}x baseline",
            holds=lambda r: r >= INTAKE_RATIO,
        ),
        Line("1", "intake", "p50 ms", found["p50_ms"], 1),
        Line(
            "1",
            "intake",
            "p99 ms",
            found["p99_ms"],
            1,
            target=f"≤ {INTAKE_P99_MS:.0f} ms",
            met=found["p99_ms"].median <= INTAKE_P99_MS,
        ),
    ]


# --- scenario 2: pickup latency --------------------------------------------------------------


async def notify_latencies(url: str, count: int, gap: float) -> list[float]:
    """Milliseconds from sending an INSERT to a LISTEN connection hearing its NOTIFY."""
    listener = await asyncpg.connect(url, timeout=10)
    inserter = await asyncpg.connect(url, timeout=10)
    await store.init_connection(inserter)
    heard: asyncio.Queue[float] = asyncio.Queue()
    await listener.add_listener(store.NOTIFY_CHANNEL, lambda *_: heard.put_nowait(time.monotonic()))
    latencies = []
    try:
        for _ in range(count):
            sent = time.monotonic()
            await store.enqueue(inserter, TICKET_DATA, max_attempts=MAX_ATTEMPTS)
            latencies.append((await asyncio.wait_for(heard.get(), 10) - sent) * 1000)
            await asyncio.sleep(max(0.0, sent + gap - time.monotonic()))
    finally:
        await listener.close()
        await inserter.close()
    return latencies


async def post_spaced(api_url: str, count: int, gap: float) -> dict[str, float]:
    """POST `count` tickets `gap` seconds apart; {marker: wall-clock time of its 202}."""
    answered: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            sent = time.monotonic()
            async with http.post(f"{api_url}/api/create-freshdesk-ticket", json=SUBMISSION) as r:
                body = await r.json()
                if r.status == 202:
                    answered[marker_for(uuid.UUID(body["id"]))] = time.time()
            await asyncio.sleep(max(0.0, sent + gap - time.monotonic()))
    return answered


async def pickup_latencies(bench: Bench) -> list[float]:
    """Milliseconds from each 202 to the simulator receiving that ticket's create."""
    plan = bench.plan
    answered = await post_spaced(bench.api.url or "", plan.pickup_tickets, plan.pickup_gap)
    await bench.wait_for_tickets(len(answered), within=60)
    arrived = {r["ticket_id"]: r["time"] for r in await bench.creates() if r["ticket_id"]}
    latencies = []
    for ticket in await bench.system.tickets():
        marker = next((t for t in ticket["tags"] if t in answered), None)
        if marker is not None:
            latencies.append((arrived[ticket["id"]] - answered[marker]) * 1000)
    return latencies


def spread(latencies: Sequence[float]) -> dict[str, float]:
    return {f"p{p}": percentile(latencies, p) for p in (50, 95, 99)}


async def scenario_pickup(bench: Bench) -> None:
    plan = bench.plan
    await bench.stop_workers()  # the baseline's rows must not be delivered
    base: list[dict[str, float]] = []
    for _ in range(plan.rounds):
        base.append(
            spread(
                await notify_latencies(bench.system.db_url, plan.pickup_tickets, plan.pickup_gap)
            )
        )
        await bench.reset()
    await bench.use_worker()
    system: list[dict[str, float]] = []
    for _ in range(plan.rounds):
        system.append(spread(await pickup_latencies(bench)))
        await bench.system.settle(within=30)
        await bench.reset()
    print(f"  pickup p99 ms: {[s['p99'] for s in system]}, baseline {[b['p99'] for b in base]}")
    bench.raw["2_pickup"] = {"system": system, "baseline": base}
    baseline_name = "asyncpg LISTEN consumer, INSERT sent → NOTIFY heard"
    for p in ("p50", "p95", "p99"):
        value = Series(tuple(s[p] for s in system))
        baseline = Series(tuple(b[p] for b in base))
        head = ("2", "pickup, 202 → create at Freshdesk", f"{p} ms")
        if p == "p99":
            bench.lines.append(
                ratio_line(
                    head,
                    value,
                    baseline,
                    baseline_name,
                    target=f"≤ {PICKUP_RATIO:.0f}x baseline",
                    holds=lambda r: r <= PICKUP_RATIO,
                    digits=1,
                )
            )
        else:
            ratio = value.median / baseline.median
            bench.lines.append(Line(*head, value, 1, baseline, baseline_name, ratio))


# --- scenarios 3 and 4: delivery throughput ----------------------------------------------------


async def delivery_round(bench: Bench, rows: int, name: str = "") -> float:
    """Creates per second while the worker drains `rows` rows that became due at once."""
    ideal = DELIVERY_CONCURRENCY / DELIVERY_LATENCY
    worker = bench.system.workers[-1]
    async with bench.profiled(worker, name, rows / ideal):
        await bench.enqueue(rows)
        await bench.wait_for_tickets(rows, within=rows / ideal * 10 + 30)
    rate = await bench.create_rate()
    await bench.system.settle(within=60)
    await bench.reset()
    return rate


async def delivery_rounds(bench: Bench, name: str) -> Series:
    await bench.configure(latency=DELIVERY_LATENCY)
    await bench.use_worker(FDQUEUE_CONCURRENCY=str(DELIVERY_CONCURRENCY))
    rates = []
    for round_ in range(bench.plan.rounds):
        profile_name = f"{name}-worker" if round_ == 0 else ""
        rates.append(await delivery_round(bench, bench.plan.delivery_rows, profile_name))
        print(f"  {name} round {round_ + 1}: {rates[-1]:,.0f} creates/s")
    await bench.configure(latency=0)
    return Series(tuple(rates))


async def scenario_delivery(bench: Bench) -> None:
    rates = await delivery_rounds(bench, "delivery")
    bench.raw["3_delivery"] = rates
    ideal = DELIVERY_CONCURRENCY / DELIVERY_LATENCY
    head = (
        "3",
        f"delivery, latency {DELIVERY_LATENCY * 1000:.0f} ms, concurrency {DELIVERY_CONCURRENCY}",
        "creates/s",
    )
    bench.lines.append(
        ratio_line(
            head,
            rates,
            Series((ideal,)),
            "ideal: concurrency ÷ latency",
            target=f"≥ {DELIVERY_SHARE:.0%} of ideal",
            holds=lambda r: r >= DELIVERY_SHARE,
        )
    )


async def fast_round(bench: Bench, rows: int) -> tuple[float, float]:
    """Creates per second at latency 0, and database transactions per delivered ticket.

    A fresh worker per round, stopped before counting: a backend flushes its statistics
    when it ends, so pg_stat_database then holds every transaction of the round.
    """
    conn = await bench.conn()
    before = await conn.fetchval(TRANSACTIONS)
    await bench.use_worker(FDQUEUE_CONCURRENCY=str(FAST_CONCURRENCY))
    await bench.enqueue(rows)
    await bench.wait_for_tickets(rows, within=120)
    rate = await bench.create_rate()
    await bench.system.settle(within=60)
    await bench.stop_workers()
    await asyncio.sleep(0.5)
    spent = float(await conn.fetchval(TRANSACTIONS) - before)
    await bench.reset()
    return rate, spent / rows


async def scenario_fast(bench: Bench) -> None:
    rates, statements = [], []
    for round_ in range(bench.plan.rounds):
        rate, per_ticket = await fast_round(bench, bench.plan.fast_rows)
        rates.append(rate)
        statements.append(per_ticket)
        print(f"  fast round {round_ + 1}: {rate:,.0f} creates/s, {per_ticket:.2f} txn/ticket")
    bench.raw["4_fast"] = {"rates": rates, "transactions_per_ticket": statements}
    title = f"delivery, latency 0, concurrency {FAST_CONCURRENCY}"
    bench.lines += [
        Line("4", title, "creates/s", Series(tuple(rates))),
        Line("4", title, "SQL transactions per ticket", Series(tuple(statements)), 2),
    ]


# --- scenario 5: pacing ----------------------------------------------------------------------


async def pacing_round(bench: Bench) -> tuple[float, float]:
    """Creates per second and the share of create calls answered 429, for the backlog."""
    backlog = bench.plan.pacing_backlog
    await bench.enqueue(backlog)
    await bench.wait_for_tickets(backlog, within=backlog / PACING_LIMIT * PACING_WINDOW * 3 + 30)
    calls = await bench.creates()
    rate = await bench.create_rate()
    await bench.system.settle(within=60)
    await bench.reset()
    return rate, sum(r["status"] == 429 for r in calls) / len(calls)


async def scenario_pacing(bench: Bench) -> None:
    await bench.configure(create_limit=PACING_LIMIT, window_seconds=PACING_WINDOW)
    await bench.use_worker(FDQUEUE_FRESHDESK_RATE_WINDOW=str(PACING_WINDOW))
    rates, refused = [], []
    for round_ in range(bench.plan.rounds):
        rate, share = await pacing_round(bench)
        rates.append(rate)
        refused.append(share * 100)
        print(f"  pacing round {round_ + 1}: {rate:.2f} creates/s, {share:.1%} answered 429")
    await bench.configure(create_limit=1_000_000, window_seconds=60)
    bench.raw["5_pacing"] = {"rates": rates, "percent_429": refused}
    limit = PACING_LIMIT / PACING_WINDOW
    title = f"pacing, backlog {bench.plan.pacing_backlog}, {PACING_LIMIT} per {PACING_WINDOW} s"
    percent = Series(tuple(refused))
    bench.lines += [
        ratio_line(
            ("5", title, "creates/s"),
            Series(tuple(rates)),
            Series((limit,)),
            "the limit's rate",
            target=f"≥ {PACING_SHARE:.0%} of the limit",
            holds=lambda r: r >= PACING_SHARE,
            digits=2,
        ),
        Line(
            "5",
            title,
            "% of creates answered 429",
            percent,
            2,
            target=f"≤ {PACING_429_SHARE:.0%}",
            met=percent.median <= PACING_429_SHARE * 100,
        ),
    ]


# --- scenario 6: the same with a million completed rows ---------------------------------------


async def scenario_scale(bench: Bench) -> None:
    await bench.stop_workers()
    conn = await bench.conn()
    started = time.monotonic()
    await conn.execute(INSERT_COMPLETED, TICKET_DATA, bench.plan.scale_rows)
    await conn.execute(VACUUM)
    bench.keep_up_to = await conn.fetchval(MAX_ID)
    print(f"  {bench.plan.scale_rows:,} completed rows in {time.monotonic() - started:.0f} s")
    intake = await intake_rounds(bench, "scale-intake", with_baseline=False)
    delivery = await delivery_rounds(bench, "scale-delivery")
    bench.raw["6_scale"] = {"intake": intake, "delivery": delivery}
    empty = {line.metric: line.value for line in bench.lines if line.number in ("1", "3")}
    title = f"scale: {bench.plan.scale_rows:,} completed rows in the table"
    for metric, value in (("202 answers/s", intake["rate"]), ("creates/s", delivery)):
        bench.lines.append(
            ratio_line(
                ("6", title, metric),
                value,
                empty[metric],
                "the same on the empty table",
                target=f"≥ {SCALE_SHARE:.0%} of empty",
                holds=lambda r: r >= SCALE_SHARE,
            )
        )


def memory_lines(bench: Bench) -> list[Line]:
    return [
        Line(
            "7",
            "memory: peak RSS over the run",
            f"{kind} MB",
            Series((megabytes,)),
            1,
            target=f"≤ {RSS_MB:.0f} MB",
            met=megabytes <= RSS_MB,
        )
        for kind, megabytes in bench.peak_rss_mb.items()
    ]


SCENARIOS: Final[list[tuple[str, Callable[[Bench], Awaitable[None]]]]] = [
    ("1 intake", scenario_intake),
    ("2 pickup", scenario_pickup),
    ("3 delivery", scenario_delivery),
    ("4 delivery at latency 0", scenario_fast),
    ("5 pacing", scenario_pacing),
    ("6 scale", scenario_scale),
]


# --- profiling (--profile) -------------------------------------------------------------------


def py_spy_command(pid: int, seconds: float, raw: Path) -> list[str]:
    """py-spy from .venv, installed there on first use (a profiling tool, not a dependency)."""
    binary = Path(sys.executable).with_name("py-spy")
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    duration = str(max(1, round(seconds)))
    options = f"--pid {pid} --duration {duration} --rate 200 --nonblocking --format raw"
    return [str(binary), "record", *options.split(), "--output", str(raw)]


def summarise_profile(raw: Path, top: int = 40) -> str:
    """The functions holding most samples, inclusive and self, from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [
            re.sub(r"\(/\S*?/(site-packages|lib/python3\.\d+)/", "(", f) for f in stack.split(";")
        ]
        total += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
        own[frames[-1]] += int(count)
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    out += ["", "self:"] + [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(out) + "\n"


# --- the report ------------------------------------------------------------------------------


def progress(name: str, round_: int, figures: dict[str, list[float]]) -> None:
    shown = ", ".join(f"{key} {values[-1]:,.1f}" for key, values in figures.items() if values)
    print(f"  {name} round {round_ + 1}: {shown}")


def table(lines: Sequence[Line]) -> str:
    """The Markdown table of every line."""
    out = [
        "| # | scenario | metric | median (min-max) | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        baseline = ""
        if line.baseline is not None:
            baseline = f"{line.baseline.text(line.digits)}: {line.baseline_name}"
        ratio = "" if line.ratio is None else f"{line.ratio:.2f}"
        met = {True: "yes", False: "**no**", None: "—"}[line.met]
        out.append(
            f"| {line.number} | {line.scenario} | {line.metric} | {line.value.text(line.digits)} "
            f"| {baseline} | {ratio} | {line.target} | {met} |"
        )
    return "\n".join(out)


async def machine_note(bench: Bench) -> dict[str, Any]:
    """Cores, CPU, memory, load, PostgreSQL version and settings, tools."""
    conn = await bench.conn()
    rows = await conn.fetch(SHOW_SETTINGS, list(SETTINGS))
    settings = {r["name"]: f"{r['setting']}{' x ' + r['unit'] if r['unit'] else ''}" for r in rows}
    cpu = re.search(r"^model name\s*:\s*(.+)$", read_proc("cpuinfo"), re.MULTILINE)
    memory = re.search(r"^MemTotal:\s+(\d+) kB", read_proc("meminfo"), re.MULTILINE)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "memory_gb": round(int(memory.group(1)) / 1024 / 1024, 1) if memory else None,
        "load_average": [bench.raw.pop("load_average_at_start", None), os.getloadavg()],
        "python": platform.python_version(),
        "postgresql": await conn.fetchval("SELECT version()"),
        "postgresql_settings": settings,
        "database": bench.system.kind,
        "load_generator": await wrk_version() + ", 1 thread, Lua script (tools/loadgen.py)",
        "fdqueue": git_describe(),
    }


def read_proc(name: str) -> str:
    return Path("/proc", name).read_text(encoding="ascii", errors="replace")


def git_describe() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


NOTES: Final = [
    "1. No worker runs. wrk keeps 64 POSTs of one valid ticket in flight on the api; the "
    "baseline, interleaved round by round, is 8 asyncpg connections in the bench process each "
    "looping `store.enqueue` (one row, its trigger's NOTIFY, one commit) on the same table.",
    "2. The baseline first, with no worker: an asyncpg LISTEN connection times each INSERT "
    "from sending it to hearing its NOTIFY, 20 ms apart. Then one idle worker (default "
    "settings): from the bench receiving each 202 to the simulator receiving its create "
    "(simulator request log, same clock).",
    "3. 4. One statement makes the rows due at once (`store.enqueue_many`); the rate is the "
    "creates the simulator answered 201, first to last. Scenario 4 starts a fresh worker per "
    "round and stops it before reading pg_stat_database (a backend flushes its statistics as "
    "it ends): one claim per batch and one record per ticket (fdqueue's pool skips asyncpg's "
    "reset query on release, which used to double the count).",
    "5. The simulator allows 40 creates per 5 s window; the worker runs with "
    "FDQUEUE_FRESHDESK_RATE_WINDOW=5 and learns the limit from X-Ratelimit-Total.",
    "6. Completed rows inserted in one statement and vacuumed; each round's own rows are "
    "deleted after it, so every round starts from the same table.",
    "7. VmHWM of the api (one process all run) and of every worker process, read before "
    "each stops.",
]


def markdown(report: dict[str, Any], lines: Sequence[Line]) -> str:
    machine = report["machine"]
    settings = ", ".join(f"{k} = {v}" for k, v in machine["postgresql_settings"].items())
    start, end = machine["load_average"]
    quick = " --quick" if report["plan"]["name"] == "quick" else ""
    missed = [f"{line.number} ({line.metric})" for line in lines if line.met is False]
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"Written by `python -m tools.bench{quick}` "
            f"on {report['finished']} in {report['seconds']:.0f} s. Each figure is the median of "
            f"{report['plan']['rounds']} rounds with the minimum and maximum beside it; each "
            "ratio is median ÷ median of a baseline measured in the same run. See "
            "`tools/bench.py` for what each scenario does.",
            "",
            "## Machine",
            "",
            f"- {machine['cores']} cores ({machine['cpu']}), {machine['memory_gb']} GB of memory, "
            f"load average {load_text(start)} at the start, {load_text(end)} at the end "
            "(1, 5, 15 min; a shared machine)",
            f"- {machine['postgresql']}",
            f"- database: {machine['database']}",
            f"- settings: {settings}",
            f"- load generator: {machine['load_generator']}; Python {machine['python']}; "
            f"fdqueue {machine['fdqueue']}",
            "",
            "## Results",
            "",
            table(lines),
            "",
            "Targets missed: " + (", ".join(missed) if missed else "none") + ".",
            "",
            "## What each scenario does",
            "",
            *NOTES,
            "",
            "## Raw figures",
            "",
            "```json",
            json.dumps(report["raw"], indent=2),
            "```",
            "",
        ]
    )


def load_text(average: Sequence[float] | None) -> str:
    return "/".join(f"{x:.1f}" for x in average or ())


def to_json(value: Any) -> Any:
    if isinstance(value, Series):
        return list(value.values)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


# --- the run ---------------------------------------------------------------------------------


async def run_scenarios(bench: Bench, only: Sequence[str]) -> None:
    for name, scenario in SCENARIOS:
        if only and name.split()[0] not in only:
            continue
        started = time.monotonic()
        print(f"scenario {name}", flush=True)
        await scenario(bench)
        bench.raw.setdefault("seconds", {})[name] = round(time.monotonic() - started, 1)


async def run(plan: Plan, *, profile_dir: Path | None, only: Sequence[str]) -> Bench:
    """Start the system, run the scenarios (all, or those numbered in `only`), stop it."""
    settings = load_settings()
    server_url = None if settings.database_url is None else settings.database_url.get_secret_value()
    with tempfile.TemporaryDirectory(prefix="fdqueue-bench-") as root:
        async with BenchSystem(Path(root), server_url) as system:
            await system.start(workers=0, apis=1)
            bench = Bench(system, plan, profile_dir)
            bench.raw["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
            try:
                await run_scenarios(bench, only)
                bench.raw["machine"] = await machine_note(bench)
            finally:
                await bench.close()
    return bench


def write_report(bench: Bench, out: Path, seconds: float) -> None:
    """Print the table; write OUT/benchmarks.json and OUT/benchmarks.md."""
    lines = bench.lines + memory_lines(bench)
    raw = dict(bench.raw)
    report = {
        "plan": asdict(bench.plan),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
        "machine": raw.pop("machine"),
        "lines": [to_json(asdict(line)) for line in lines],
        "raw": to_json({**raw, "peak_rss_mb": bench.peak_rss_mb}),
    }
    print(table(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "benchmarks.md").write_text(markdown(report, lines), encoding="utf-8")
    print(f"\n{seconds:.0f} s in all; written to {out}/benchmarks.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short rounds (under 2 minutes)")
    parser.add_argument("--profile", action="store_true", help="sample api and worker with py-spy")
    parser.add_argument(
        "--out", type=Path, help="where to write (default docs/, quick: .fdqueue/bench)"
    )
    parser.add_argument("--only", nargs="+", default=[], help="scenario numbers (6 needs 1, 3)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = args.out or Path(".fdqueue/bench" if args.quick else "docs")
    started = time.monotonic()
    bench = asyncio.run(run(plan, profile_dir=out if args.profile else None, only=args.only))
    write_report(bench, out, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
