"""The real fdqueue system as processes, a load generator, and the delivery invariant checker.

Used by `tools.chaos` (fault scenarios) and meant for benchmarks too:

    async with System(root, env={"FDQUEUE_BATCH_SIZE": "20"}) as system:
        await system.start(workers=3, apis=2)          # PostgreSQL, simulator, apis, workers
        async with Load(system.api_urls(), run="demo") as load:
            await load.run(500, rate=200)              # every answer kept in load.answers
        await system.settle(timeout=60)
        counts = Invariant(load.answers.values(), await system.rows(),
                           await system.tickets()).check()

Every child is `python -m fdqueue.cli ...` with its output appended to `root/logs/NAME.log`
(`FDQUEUE_LOG_FORMAT=json`); PostgreSQL is a private `EmbeddedPostgres` under `root/pgdata`,
so a scenario may stop, restart or kill it. Nothing here touches any other server.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import asyncpg

from fdqueue.embedded import EmbeddedPostgres, free_port
from fdqueue.freshdesk import marker_for

# Short time units so that a scenario takes seconds; JSON logs so they can be scanned.
DEFAULT_ENV: Final = {
    "FDQUEUE_LOG_FORMAT": "json",
    "FDQUEUE_HTTP_TIMEOUT": "2",
    "FDQUEUE_HTTP_CONNECT_TIMEOUT": "1",
    "FDQUEUE_LEASE": "5",
    "FDQUEUE_BACKOFF_UNIT": "0.1",
    "FDQUEUE_POLL_INTERVAL": "5",
    "FDQUEUE_RATE_LIMIT_DEFAULT_WAIT": "1",
    "FDQUEUE_AUTH_PAUSE": "1",
    "FDQUEUE_SHUTDOWN_GRACE": "5",
    "FDQUEUE_DB_CONNECT_TIMEOUT": "3",
}
# Freshdesk's per-minute limits would make every run a rate-limit test; scenarios that want
# 429s script them.
UNLIMITED_SIMULATOR: Final = (
    "--create-limit",
    "1000000",
    "--account-limit",
    "1000000",
    "--list-limit",
    "1000000",
)
# Variables of the parent that must not leak into a child: its configuration comes from here.
_PARENT_ONLY: Final = frozenset(
    {
        "DATABASE_URL",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "JOURNAL_STREAM",
        "CREDENTIALS_DIRECTORY",
    }
)
READY_TIMEOUT: Final = 60.0


# --- one child process -----------------------------------------------------------------------

ReadyCheck = Callable[["Service"], Awaitable[bool]]


class Service:
    """One `python -m fdqueue.cli ARGS` child; stdout and stderr appended to `log_path`."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        ready: ReadyCheck | None = None,
        url: str | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = dict(env)
        self.log_path = log_path
        self.url = url
        self._ready = ready
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running and self.process is not None else None

    async def start(self, *, wait_ready: bool = True) -> None:
        """Start the process; with `wait_ready`, return once its ready check holds.

        Raises RuntimeError when it is already running, exits early or is not ready in time.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fdqueue.cli",
                *self.args,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of the orchestrator is not sent to children
            )
        if wait_ready:
            await self.wait_ready()

    async def wait_ready(self, within: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while self._ready is not None and not await self._ready(self):
            if not self.running:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {within} s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def terminate(self, grace: float = 30.0) -> int | None:
        """SIGTERM, as `systemctl stop` does; SIGKILL after `grace` s. Returns the exit status."""
        return await self._stop(signal.SIGTERM, grace)

    async def kill(self) -> int | None:
        """SIGKILL, as the OOM killer or a crash would; returns the exit status."""
        return await self._stop(signal.SIGKILL, 30.0)

    async def restart(self, *, wait_ready: bool = True) -> None:
        await self.terminate()
        await self.start(wait_ready=wait_ready)

    async def _stop(self, signum: signal.Signals, grace: float) -> int | None:
        process = self.process
        if process is None or process.returncode is not None:
            return None
        process.send_signal(signum)
        try:
            code = await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            code = await process.wait()
        self.exit_codes.append(code)
        return code

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def count_in_log(self, text: str) -> int:
        return sum(text in line for line in self.log_lines())


def http_ready(path: str) -> ReadyCheck:
    """Ready once GET `service.url + path` answers 200."""

    async def check(service: Service) -> bool:
        assert service.url is not None
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(service.url + path) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    return check


def logged_ready(event: str) -> ReadyCheck:
    """Ready once the log holds `event` once per start (the log file is appended to)."""

    async def check(service: Service) -> bool:
        return service.count_in_log(f'"{event}"') >= service.starts

    return check


# --- the whole system ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One queue row as the invariant needs it; `due_in`/`lease_left` are seconds from now."""

    id: int
    public_id: uuid.UUID
    status: str
    ticket_id: str | None
    error: str | None
    attempts: int
    due_in: float | None
    lease_left: float | None
    subject: str | None


ROWS: Final = """
SELECT id, public_id, status, freshdesk_ticket_id AS ticket_id, error_message AS error, attempts,
       extract(epoch FROM next_attempt_at - now())::float8 AS due_in,
       extract(epoch FROM locked_until - now())::float8 AS lease_left,
       ticket_data->>'subject' AS subject
FROM freshdesk_ticket_queue
"""
UNSETTLED: Final = """
SELECT count(*) FILTER (WHERE status = 'processing') AS processing,
       count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()) AS due,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM freshdesk_ticket_queue
"""
# Every client backend but ours: what an administrator's "kill all sessions" does.
TERMINATE_BACKENDS: Final = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
"""
# Distinct payloads: PostgreSQL folds identical notifications of one transaction into one.
NOTIFY_STORM: Final = (
    "SELECT count(pg_notify('fdqueue_due', g::text)) FROM generate_series(1, $1) g"
)


class System:
    """A private PostgreSQL, the Freshdesk simulator, and any number of apis and workers.

    `env` overrides DEFAULT_ENV for every api and worker; `simulator_args` are extra
    `fdqueue fake-freshdesk` options (e.g. `("--latency", "0.05")`). `close()` (or leaving
    the `async with`) terminates every child and stops PostgreSQL.
    """

    def __init__(
        self,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        simulator_args: Sequence[str] = UNLIMITED_SIMULATOR,
        api_key: str | None = None,
        durable: bool = False,
    ) -> None:
        self.root = root
        self.logs = root / "logs"
        self.api_key = api_key or f"chaos-key-{secrets.token_hex(12)}"
        self.env = dict(env or {})
        self.database = EmbeddedPostgres(root / "pgdata", durable=durable)
        sim_port = free_port()
        self.simulator = Service(
            "simulator",
            ["fake-freshdesk", "--port", str(sim_port), "--api-key", self.api_key],
            self._base_env(),
            self.logs / "simulator.log",
            ready=http_ready("/_simulator/health"),
            url=f"http://127.0.0.1:{sim_port}",
        )
        self.simulator.args += list(simulator_args)
        self.apis: list[Service] = []
        self.workers: list[Service] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def sim_url(self) -> str:
        assert self.simulator.url is not None
        return self.simulator.url

    @property
    def db_url(self) -> str:
        return self.database.url

    def api_urls(self) -> list[str]:
        return [api.url for api in self.apis if api.url is not None]

    def services(self) -> list[Service]:
        return [self.simulator, *self.apis, *self.workers]

    def log_files(self) -> list[Path]:
        """Every log this system wrote: the children's and PostgreSQL's."""
        return [*sorted(self.logs.glob("*.log")), self.database.data_dir / "server.log"]

    async def start(self, *, workers: int = 1, apis: int = 1) -> None:
        """Start PostgreSQL, migrate, start the simulator, `apis` apis and `workers` workers."""
        await self.start_database()
        await self.migrate()
        await self.simulator.start()
        for _ in range(apis):
            await self.add_api()
        for _ in range(workers):
            await self.add_worker()

    async def start_database(self) -> None:
        """Start the embedded PostgreSQL (a subclass may use another server instead)."""
        await asyncio.to_thread(self.database.start)

    async def close(self) -> None:
        """Terminate every child (SIGKILL when one hangs), then stop PostgreSQL."""
        for service in [*self.apis, *self.workers, self.simulator]:
            await service.terminate(grace=15.0)
        if self._http is not None:
            await self._http.close()
            self._http = None
        await asyncio.to_thread(self.database.stop)

    def _base_env(self) -> dict[str, str]:
        return {
            name: value
            for name, value in os.environ.items()
            if name not in _PARENT_ONLY and not name.startswith(("FDQUEUE_", "FRESHDESK_"))
        }

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of an api or worker: defaults, the system's `env`, then `extra`."""
        return {
            **self._base_env(),
            **DEFAULT_ENV,
            "DATABASE_URL": self.db_url,
            "FDQUEUE_FRESHDESK_BASE_URL": self.sim_url,
            "FRESHDESK_API_KEY": self.api_key,
            **self.env,
            **(extra or {}),
        }

    async def migrate(self) -> None:
        """`fdqueue migrate`, as an operator runs it; raises RuntimeError when it fails."""
        migrate = Service("migrate", ["migrate"], self.child_env(), self.logs / "migrate.log")
        await migrate.start(wait_ready=False)
        assert migrate.process is not None
        code = await migrate.process.wait()
        if code != 0:
            raise RuntimeError(f"fdqueue migrate exited {code}:\n{migrate.log_tail()}")

    async def add_worker(
        self, env: Mapping[str, str] | None = None, *, wait_ready: bool = True
    ) -> Service:
        """Start one more `fdqueue worker` (ready once it logs "worker started")."""
        name = f"worker{len(self.workers) + 1}"
        worker = Service(
            name,
            ["worker"],
            self.child_env(env),
            self.logs / f"{name}.log",
            ready=logged_ready("worker started"),
        )
        self.workers.append(worker)
        await worker.start(wait_ready=wait_ready)
        return worker

    async def add_api(
        self,
        env: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        wait_ready: bool = True,
    ) -> Service:
        """Start one more `fdqueue api` on `host` and a free port (ready once /healthz is 200)."""
        name = f"api{len(self.apis) + 1}"
        port = free_port()
        api = Service(
            name,
            ["api"],
            self.child_env({"FDQUEUE_HOST": host, "FDQUEUE_PORT": str(port), **(env or {})}),
            self.logs / f"{name}.log",
            ready=http_ready("/healthz"),
            url=f"http://{host}:{port}",
        )
        self.apis.append(api)
        await api.start(wait_ready=wait_ready)
        return api

    # --- PostgreSQL ---------------------------------------------------------------------------

    async def restart_database(self, down_for: float = 0.0) -> None:
        """Stop PostgreSQL (fast shutdown: sessions are cut), wait `down_for`, start it."""
        await asyncio.to_thread(self.database.stop)
        await asyncio.sleep(down_for)
        await asyncio.to_thread(self.database.start)

    async def terminate_backends(self) -> int:
        """`pg_terminate_backend` on every other session of this private server; the count."""
        return int(await self._fetchval(TERMINATE_BACKENDS))

    async def notify_storm(self, count: int) -> None:
        """`count` NOTIFYs on the queue channel in one burst (one transaction)."""
        await self._fetchval(NOTIFY_STORM, count)

    async def rows(self) -> list[Row]:
        conn = await asyncpg.connect(self.db_url, timeout=10)
        try:
            return [Row(**dict(record)) for record in await conn.fetch(ROWS)]
        finally:
            await conn.close()

    async def unsettled(self) -> dict[str, int]:
        """Rows `processing`, `due` (pending, due now) and `pending` (due or not)."""
        conn = await asyncpg.connect(self.db_url, timeout=10)
        try:
            record = await conn.fetchrow(UNSETTLED)
            assert record is not None
            return dict(record)
        finally:
            await conn.close()

    async def settle(self, within: float, *, final: bool = False) -> bool:
        """Wait until no row is processing or due (with `final`: none pending at all).

        Returns False when that did not happen within `within` seconds; database errors
        while waiting (an outage still healing) count as not settled yet.
        """
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                left = await self.unsettled()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                left = {"processing": 1}
            busy = left.get("processing", 0) + left.get("due", 0)
            if not busy and not (final and left.get("pending", 0)):
                return True
            await asyncio.sleep(0.5)
        return False

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.db_url, timeout=10)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    # --- the simulator's control surface ------------------------------------------------------

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self._http

    async def faults(self, payload: Mapping[str, Any]) -> None:
        """POST /_simulator/faults (script, rates, down, clear; see docs/simulator.md)."""
        await self._control("faults", payload)

    async def configure_simulator(self, payload: Mapping[str, Any]) -> None:
        """POST /_simulator/config (latency, limits, window, ...)."""
        await self._control("config", payload)

    async def tickets(self) -> list[dict[str, Any]]:
        """Every ticket the simulator holds, in creation order."""
        async with self.http().get(f"{self.sim_url}/_simulator/tickets") as response:
            response.raise_for_status()
            tickets: list[dict[str, Any]] = await response.json()
            return tickets

    async def requests(self) -> list[dict[str, Any]]:
        """Every Freshdesk API call the simulator saw."""
        async with self.http().get(f"{self.sim_url}/_simulator/requests") as response:
            response.raise_for_status()
            records: list[dict[str, Any]] = await response.json()
            return records

    async def _control(self, what: str, payload: Mapping[str, Any]) -> None:
        url = f"{self.sim_url}/_simulator/{what}"
        async with self.http().post(url, json=payload) as response:
            if response.status != 200:
                raise RuntimeError(f"simulator {what}: {response.status} {await response.text()}")


# --- the load generator ----------------------------------------------------------------------

# Every description and subject carries a canary: none may ever reach a log line.
CANARY_BODY: Final = "canary-body-4c1d9e"
CANARY_SUBJECT: Final = "canary-subject-77ab"
EMAIL_DOMAIN: Final = "chaos.example.com"
_TOKEN: Final = re.compile(r"\[chaos ([A-Za-z0-9_-]+)\]")


def token_of(subject: str | None) -> str | None:
    """The submission token in a subject written by `submission`, or None."""
    match = _TOKEN.search(subject or "")
    return match.group(1) if match else None


def submission(run: str, n: int) -> dict[str, Any]:
    """Submission `n` of `run`: its own requester, so a marker look-up reads one short list."""
    key = f"{run}-{n:06d}"
    return {
        "email": f"{key}@{EMAIL_DOMAIN}",
        "subject": f"[chaos {key}] {CANARY_SUBJECT} printer on fire",
        "description": f"<p>{CANARY_BODY}: the printer of {key} is on fire.</p>",
        "priority": n % 4 + 1,
    }


@dataclass(frozen=True, slots=True)
class Answer:
    """What the api answered to submission `token`; status 0 when no HTTP answer came."""

    token: str
    status: int
    body: Mapping[str, Any] | None = None
    error: str | None = None

    @property
    def public_id(self) -> uuid.UUID | None:
        if self.status != 202 or self.body is None:
            return None
        return uuid.UUID(str(self.body["id"]))

    @property
    def ticket_id(self) -> int | None:
        if self.status != 201 or self.body is None:
            return None
        return int(self.body["ticket_id"])


Make = Callable[[str, int], dict[str, Any]]


class Load:
    """POSTs submissions to the apis (round robin, one Idempotency-Key each), keeping answers.

    No retries: each submission is sent once, so every answer is exactly what a client saw.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        run: str | None = None,
        concurrency: int = 16,
        timeout: float = 20.0,
        make: Make = submission,
    ) -> None:
        self.urls = list(urls)
        self.run_id = run or secrets.token_hex(4)
        self.answers: dict[str, Answer] = {}
        self._make = make
        self._limit = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._sent = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # force_close: a restarted api must not cost answers on dead keep-alive sockets.
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def run(self, count: int, *, rate: float | None = None) -> list[Answer]:
        """Send `count` more submissions, at most `rate` per second; returns their answers."""
        started = time.monotonic()
        tasks: list[asyncio.Task[Answer]] = []
        for i in range(count):
            if rate is not None:
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            await self._limit.acquire()
            tasks.append(asyncio.create_task(self._one(self._sent)))
            self._sent += 1
        return list(await asyncio.gather(*tasks))

    async def _one(self, n: int) -> Answer:
        try:
            return await self.submit(n)
        finally:
            self._limit.release()

    async def submit(self, n: int) -> Answer:
        """Send submission `n` once and record the answer."""
        key = f"{self.run_id}-{n:06d}"
        url = f"{self.urls[n % len(self.urls)]}/api/create-freshdesk-ticket"
        try:
            async with self.session().post(
                url, json=self._make(self.run_id, n), headers={"Idempotency-Key": key}
            ) as response:
                body = await response.json(content_type=None)
                answer = Answer(key, response.status, body if isinstance(body, dict) else None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            answer = Answer(key, 0, error=f"{type(exc).__name__}: {exc}")
        self.answers[key] = answer
        return answer


# --- the invariant ---------------------------------------------------------------------------

MAX_PROBLEMS: Final = 20


@dataclass(slots=True)
class Counts:
    """The invariant's tally; `ok` when nothing is lost, duplicated, stuck or inconsistent.

    accepted: 202 answers. delivered: 202 whose row is completed with the one ticket that
    carries its marker. failed: 202 whose row failed with a reason and no ticket exists.
    pending: 202 whose row waits for a future attempt. direct: 201 answers (ticket created
    at once). refused: any other answer (503, 4xx, no answer). duplicates: submissions with
    more than one ticket (or row). lost: a 202 without a row, or a completed row or 201
    without its ticket. stuck: rows processing after their lease, or pending and due
    after the run settled. in_flight: rows still processing under a live lease. wrong: a
    row whose state contradicts Freshdesk (failed yet created, completed with another id).
    orphans: rows of submissions that were not answered 202 (allowed: 503 queue_uncertain).
    """

    submitted: int = 0
    accepted: int = 0
    delivered: int = 0
    failed: int = 0
    pending: int = 0
    direct: int = 0
    refused: int = 0
    duplicates: int = 0
    lost: int = 0
    stuck: int = 0
    in_flight: int = 0
    wrong: int = 0
    orphans: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.stuck or self.in_flight or self.wrong)

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


class Invariant:
    """For every 202: exactly one ticket and the row completed with its id, or no ticket and
    the row failed with a reason, or pending with a future attempt. No row stuck.

    Tickets are matched to 202s by the marker tag (`marker_for(public_id)`), and to every
    submission (201 and refused ones too) by the token `submission` writes in the subject.
    """

    def __init__(
        self,
        answers: Iterable[Answer],
        rows: Iterable[Row],
        tickets: Iterable[Mapping[str, Any]],
    ) -> None:
        self.answers = list(answers)
        self.rows = list(rows)
        self.by_public_id = {row.public_id: row for row in self.rows}
        self.rows_by_token: dict[str, list[Row]] = defaultdict(list)
        for row in self.rows:
            key = token_of(row.subject)
            if key is not None:
                self.rows_by_token[key].append(row)
        self.by_marker: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        self.tickets_by_token: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for ticket in tickets:
            for tag in ticket.get("tags") or []:
                if isinstance(tag, str) and tag.startswith("fdq-"):
                    self.by_marker[tag].append(ticket)
            key = token_of(ticket.get("subject"))
            if key is not None:
                self.tickets_by_token[key].append(ticket)

    def check(self) -> Counts:
        counts = Counts(submitted=len(self.answers))
        for answer in self.answers:
            self._submission(answer, counts)
        ours = {answer.token for answer in self.answers}
        check_settled([row for row in self.rows if token_of(row.subject) in ours], counts)
        return counts

    def _submission(self, answer: Answer, counts: Counts) -> None:
        tickets = self.tickets_by_token.get(answer.token, [])
        rows = self.rows_by_token.get(answer.token, [])
        if len(tickets) > 1 or len(rows) > 1:
            counts.duplicates += 1
            ids = [t.get("id") for t in tickets]
            counts.problem(f"{answer.token}: {len(tickets)} tickets {ids}, {len(rows)} rows")
        if answer.status == 202:
            self._accepted(answer, counts)
        elif answer.status == 201:
            self._direct(answer, tickets, counts)
        else:
            counts.refused += 1
            if rows:
                counts.orphans += 1

    def _accepted(self, answer: Answer, counts: Counts) -> None:
        counts.accepted += 1
        public_id = answer.public_id
        assert public_id is not None
        row = self.by_public_id.get(public_id)
        if row is None:
            counts.lost += 1
            counts.problem(f"{answer.token}: 202 (id {public_id}) without a row")
            return
        marked = self.by_marker.get(marker_for(public_id), [])
        if row.status == "completed":
            self._completed(answer, row, marked, counts)
        elif row.status == "failed":
            self._failed(answer, row, marked, counts)
        elif row.status == "pending" and (row.due_in or 0.0) > 0:
            counts.pending += 1

    def _completed(
        self, answer: Answer, row: Row, marked: Sequence[Mapping[str, Any]], counts: Counts
    ) -> None:
        if not marked:
            counts.lost += 1
            counts.problem(f"{answer.token}: row {row.id} completed, no ticket has its marker")
        elif len(marked) == 1 and str(marked[0].get("id")) == row.ticket_id:
            counts.delivered += 1
        elif len(marked) == 1:
            counts.wrong += 1
            counts.problem(
                f"{answer.token}: row {row.id} completed as {row.ticket_id}, "
                f"its ticket is {marked[0].get('id')}"
            )
        # more than one marked ticket: already counted as a duplicate

    def _failed(
        self, answer: Answer, row: Row, marked: Sequence[Mapping[str, Any]], counts: Counts
    ) -> None:
        if marked:
            counts.wrong += 1
            ids = [t.get("id") for t in marked]
            counts.problem(f"{answer.token}: row {row.id} failed, yet Freshdesk has {ids}")
        elif not row.error:
            counts.wrong += 1
            counts.problem(f"{answer.token}: row {row.id} failed without a reason")
        else:
            counts.failed += 1

    def _direct(self, answer: Answer, tickets: Sequence[Mapping[str, Any]], counts: Counts) -> None:
        counts.direct += 1
        if not any(str(t.get("id")) == str(answer.ticket_id) for t in tickets):
            counts.lost += 1
            counts.problem(f"{answer.token}: 201 with ticket {answer.ticket_id} not in Freshdesk")


def check_settled(rows: Iterable[Row], counts: Counts) -> None:
    """Count rows processing after their lease, or pending and due, as stuck (in `counts`)."""
    for row in rows:
        if row.status == "processing":
            if (row.lease_left or 0.0) <= 0:
                counts.stuck += 1
                counts.problem(f"row {row.id}: processing after its lease")
            else:
                counts.in_flight += 1
                counts.problem(f"row {row.id}: still processing at the end")
        elif row.status == "pending" and (row.due_in or 0.0) <= 0:
            counts.stuck += 1
            counts.problem(f"row {row.id}: pending and due, yet no worker took it")


# --- logs ------------------------------------------------------------------------------------


def find_in_logs(paths: Iterable[Path], needles: Iterable[str]) -> dict[str, list[str]]:
    """For each needle, the `file:line` places where it occurs (empty lists when clean)."""
    wanted = [needle for needle in needles if needle]
    hits: dict[str, list[str]] = {needle: [] for needle in wanted}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for needle in wanted:
                if needle in line:
                    hits[needle].append(f"{path.name}:{number}")
    return hits
