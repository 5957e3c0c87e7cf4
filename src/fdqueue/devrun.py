"""`fdqueue dev`: embedded PostgreSQL, the Freshdesk simulator, api and worker in one command."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import asyncpg

from fdqueue.config import Settings
from fdqueue.embedded import EmbeddedPostgres, free_port
from fdqueue.logs import mask_secrets
from fdqueue.migrate import migrate

READY_TIMEOUT = 60.0  # seconds for every process to come up
STOP_MARGIN = 10.0  # seconds beyond the children's own FDQUEUE_SHUTDOWN_GRACE, then SIGKILL
DEMO_TIMEOUT = 300.0  # seconds for the demo's submissions to reach a final status
SIMULATOR_PORT = 8089  # the simulator's usual port, taken when free
# Freshdesk's Enterprise plan (reference section 4): the worker paces itself to 280 creates a
# minute, so the demo's samples flow in seconds rather than the 80/min plan's minute.
SIMULATOR_PLAN = ("--account-limit", "700", "--create-limit", "280", "--list-limit", "200")
EX_FAILED = 1
FINAL_STATUSES = ("completed", "failed")
WORKER_READY = "worker started"
SIMULATOR_READY = "Freshdesk simulator listening"
EXAMPLE_TICKET = {
    "email": "ada@example.com",
    "subject": "Printer on fire",
    "description": "It is on fire. Please send help.",
}
# Our own relation with systemd: a child that inherited these would notify systemd, or take
# a passed socket, in our name.
_PARENT_ONLY = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)
_LINE_LIMIT = 1 << 20  # a child's longest output line, in bytes


# --- Decisions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DevPlan:
    """What `fdqueue dev` starts, decided from the settings alone."""

    data_dir: Path
    api_host: str
    api_port: int
    embedded_database: bool
    simulator: bool
    console_logs: bool

    @property
    def api_url(self) -> str:
        return f"http://{url_host(self.api_host)}:{self.api_port}"


def plan_dev(settings: Settings, data_dir: str | Path) -> DevPlan:
    """Start a database unless DATABASE_URL is set, the simulator unless Freshdesk is set."""
    return DevPlan(
        data_dir=Path(data_dir).resolve(),
        api_host=settings.host,
        api_port=settings.port or free_port(),
        embedded_database=settings.database_url is None,
        simulator=settings.freshdesk_url is None or settings.freshdesk_api_key is None,
        console_logs=settings.log_format == "auto",
    )


def child_environment(plan: DevPlan, inherited: Mapping[str, str]) -> dict[str, str]:
    """The environment every child starts from: ours, with the API address and log format."""
    env = {key: value for key, value in inherited.items() if key not in _PARENT_ONLY}
    env["FDQUEUE_HOST"] = plan.api_host
    env["FDQUEUE_PORT"] = str(plan.api_port)
    env["PYTHONUNBUFFERED"] = "1"
    if plan.console_logs:
        env["FDQUEUE_LOG_FORMAT"] = "console"
    return env


def url_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (a wildcard means loopback)."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could bind `host:port` now (with SO_REUSEADDR, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def remembered_port(path: Path) -> int:
    """The port saved in `path` while it is still free, else a new free one, saved there."""
    try:
        port = int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        port = 0
    if 0 < port < 65536 and port_free(port):
        return port
    port = free_port()
    path.write_text(f"{port}\n", encoding="ascii")
    return port


def load_samples() -> list[dict[str, Any]]:
    """The bundled sample submissions (`samples.json`, shipped inside the package)."""
    text = (resources.files("fdqueue") / "samples.json").read_text(encoding="utf-8")
    submissions: list[dict[str, Any]] = json.loads(text)["submissions"]
    return submissions


# --- Output -----------------------------------------------------------------------------


class Console:
    """Our stdout: one line per call, behind a fixed-width label, flushed at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def line(self, label: str, text: str) -> None:
        self.write(f"{label:<6} | {text}\n")

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def readable(line: str) -> str:
    """A JSON log line as `time [level] event [logger] key=value...`; other lines unchanged."""
    if not line.startswith("{"):
        return line
    try:
        data = json.loads(line)
    except ValueError:
        return line
    if not isinstance(data, dict) or "event" not in data:
        return line
    stamp = data.pop("timestamp", "")
    level = data.pop("level", "info")
    event = data.pop("event")
    logger = data.pop("logger", None)
    where = f" [{logger}]" if logger else ""
    rest = "".join(f" {key}={value}" for key, value in data.items())
    return f"{stamp} [{level:<9}] {event}{where}{rest}".lstrip()


def banner(plan: DevPlan, *, simulator_url: str | None, database_url: str | None) -> str:
    """The one message a new user needs: where everything is and two commands to try."""
    api = plan.api_url
    if simulator_url is not None:
        freshdesk = f"{simulator_url}  (simulator; tickets: {simulator_url}/_simulator/tickets)"
    else:
        freshdesk = "your Freshdesk account (FRESHDESK_DOMAIN / FDQUEUE_FRESHDESK_BASE_URL)"
    if database_url is not None:
        database = f"{database_url}  (embedded; data in {plan.data_dir / 'pg'})"
    else:
        database = "from DATABASE_URL"
    rule = "=" * 78
    lines = [
        "",
        rule,
        "  fdqueue is running",
        f"    API         {api}",
        f"    Freshdesk   {freshdesk}",
        f"    PostgreSQL  {database}",
        "",
        "  Submit a ticket:",
        f"    curl -sS -X POST {api}/api/create-freshdesk-ticket \\",
        "      -H 'Content-Type: application/json' \\",
        f"      -d {shlex.quote(json.dumps(EXAMPLE_TICKET))}",
        "  Read the stats:",
        f"    curl -sS {api}/api/freshdesk-queue/stats",
    ]
    if database_url is not None:
        lines += [
            "  Admin CLI on this database:",
            f"    DATABASE_URL={database_url} {Path(sys.executable).parent / 'fdqueue'} stats",
        ]
    lines += ["", "  Ctrl-C to stop.", rule, ""]
    return "\n".join(lines) + "\n"


# --- Processes --------------------------------------------------------------------------


@dataclass(slots=True)
class Child:
    """A process we started: its label, and whether it has logged its ready line."""

    label: str
    process: asyncio.subprocess.Process
    ready_marker: str | None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _send(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _answers(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class DevSession:
    """One `fdqueue dev` run: start in order, wait until ready, stop in reverse order."""

    def __init__(
        self,
        plan: DevPlan,
        settings: Settings,
        environ: Mapping[str, str],
        *,
        demo: bool = False,
        console: Console | None = None,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.demo = demo
        self.console = console or Console()
        self.env = child_environment(plan, environ)
        self.children: dict[str, Child] = {}
        self.database: EmbeddedPostgres | None = None
        self.database_url = ""
        self.simulator_url: str | None = None
        self.halt = asyncio.Event()  # a signal, a failure or a child's death: stop
        self.hurry = asyncio.Event()  # a second signal: stop waiting for clean exits
        self.signalled = False
        self.stopping = False
        self.failure: str | None = None
        self.unclean: list[str] = []  # children that did not stop cleanly when asked
        self.api_ready = False
        self._demo: asyncio.Task[None] | None = None

    async def run(self) -> int:
        """Run until a signal or a failure; returns the exit status (0: stopped on request)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            if await self._start() and await self._until_ready():
                self.console.write(self._banner())
                if self.demo:
                    self._demo = asyncio.create_task(self._run_demo())
                await self.halt.wait()
        finally:
            await self._shutdown()
        return self._exit_status()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.halt.is_set():
            self.console.line("dev", f"{name} again: killing what is still running")
            self.hurry.set()
            return
        self.signalled = True
        self.console.line("dev", f"{name} received: stopping (Ctrl-C again to kill at once)")
        self.halt.set()

    def _fail(self, message: str) -> bool:
        """Record why we stop (the first reason wins, a requested stop is no failure)."""
        if self.failure is None and not self.signalled:
            self.failure = message
            self.console.line("dev", message)
        self.halt.set()
        return False

    # --- start ------------------------------------------------------------------------

    async def _start(self) -> bool:
        """Simulator, database, migrations, api, worker; False when stopped on the way."""
        if not port_free(self.plan.api_port, self.plan.api_host):
            return self._fail(
                f"FDQUEUE_PORT: port {self.plan.api_port} on {self.plan.api_host} is in use "
                "(another fdqueue dev?); set FDQUEUE_PORT to a free port"
            )
        if self.plan.simulator:
            await self._start_simulator()
        if not await self._start_database() or self.halt.is_set():
            return False
        if not await self._migrate() or self.halt.is_set():
            return False
        await self._spawn("api", ["api"], None)
        await self._spawn("worker", ["worker"], WORKER_READY)
        return True

    async def _start_simulator(self) -> None:
        port = SIMULATOR_PORT if port_free(SIMULATOR_PORT) else free_port()
        key = f"dev-{secrets.token_hex(12)}"  # a fresh key per run, known only to us
        args = ["fake-freshdesk", "--host", "127.0.0.1", "--port", str(port), "--api-key", key]
        args += SIMULATOR_PLAN
        await self._spawn("sim", args, SIMULATOR_READY)
        self.simulator_url = f"http://127.0.0.1:{port}"
        self.env.pop("FDQUEUE_FRESHDESK_API_KEY", None)
        self.env["FDQUEUE_FRESHDESK_BASE_URL"] = self.simulator_url
        self.env["FRESHDESK_API_KEY"] = key

    async def _start_database(self) -> bool:
        if not self.plan.embedded_database:
            self.database_url = self.settings.require_database()
            return True
        self.plan.data_dir.mkdir(parents=True, exist_ok=True)
        directory = self.plan.data_dir / "pg"
        left_over = EmbeddedPostgres(directory)
        if left_over.running():  # an earlier run was killed before it could stop it
            self.console.line("dev", "stopping the PostgreSQL an earlier run left running")
            await asyncio.to_thread(left_over.stop)
        server = EmbeddedPostgres(directory, remembered_port(self.plan.data_dir / "pg.port"))
        self.database = server
        self.console.line("dev", f"starting PostgreSQL on 127.0.0.1:{server.port} ({directory})")
        try:
            await asyncio.to_thread(server.start)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return self._fail(f"the embedded PostgreSQL did not start: {exc}")
        self.console.line("dev", f"PostgreSQL ready (pid {server.pid()})")
        self.database_url = server.url
        self.env.pop("FDQUEUE_DATABASE_URL", None)
        self.env["DATABASE_URL"] = server.url
        return True

    async def _migrate(self) -> bool:
        try:
            conn = await asyncpg.connect(
                self.database_url, timeout=self.settings.db_connect_timeout
            )
            try:
                applied = await migrate(conn)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            return self._fail(f"migrations failed: {type(exc).__name__}: {mask_secrets(str(exc))}")
        done = ", ".join(applied)
        self.console.line("dev", f"migrations applied: {done}" if done else "schema is up to date")
        return True

    async def _spawn(self, label: str, args: Sequence[str], ready_marker: str | None) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fdqueue.cli",
            *args,
            env=dict(self.env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: Ctrl-C on the terminal reaches us alone, and we stop the
            # children in order (api and worker before the simulator and the database).
            start_new_session=True,
            preexec_fn=_die_with_parent,
            limit=_LINE_LIMIT,
        )
        child = Child(label, process, ready_marker)
        child.tasks = [
            asyncio.create_task(self._copy_output(child)),
            asyncio.create_task(self._watch(child)),
        ]
        self.children[label] = child
        self.console.line("dev", f"started {label} (pid {process.pid})")

    async def _copy_output(self, child: Child) -> None:
        stream = child.process.stdout
        assert stream is not None
        # The simulator logs JSON whatever FDQUEUE_LOG_FORMAT says; make it read like the rest.
        render = child.label == "sim" and self.plan.console_logs
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # longer than _LINE_LIMIT: dropped, and we read on
                self.console.line(child.label, "(a line too long to show was dropped)")
                continue
            if not raw:
                return
            text = raw.decode("utf-8", errors="replace").rstrip()
            if child.ready_marker is not None and child.ready_marker in text:
                child.ready.set()
            self.console.line(child.label, readable(text) if render else text)

    async def _watch(self, child: Child) -> None:
        code = await child.process.wait()
        if not self.stopping:
            self._fail(f"{child.label} exited unexpectedly with status {code}")

    # --- ready ------------------------------------------------------------------------

    async def _until_ready(self) -> bool:
        """Wait for /readyz and every ready line; False on a stop, a death or the timeout."""
        waits: list[Awaitable[Any]] = [self._wait_api_ready()]
        waits += [c.ready.wait() for c in self.children.values() if c.ready_marker]
        everything: asyncio.Future[Any] = asyncio.gather(*waits)
        halted: asyncio.Future[Any] = asyncio.ensure_future(self.halt.wait())
        done, _ = await asyncio.wait(
            {everything, halted}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        await _cancel(everything, halted)
        if self.halt.is_set():
            return False
        if not done:
            return self._fail(
                f"not ready after {READY_TIMEOUT:g} s; still waiting for "
                f"{', '.join(self._not_ready())} (see the lines above)"
            )
        return True

    async def _wait_api_ready(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                if await _answers(http, f"{self.plan.api_url}/readyz"):
                    self.api_ready = True
                    return
                await asyncio.sleep(0.1)

    def _not_ready(self) -> list[str]:
        waiting = [] if self.api_ready else ["api (GET /readyz)"]
        for child in self.children.values():
            if child.ready_marker and not child.ready.is_set():
                waiting.append(f"{child.label} ({child.ready_marker!r})")
        return waiting

    def _banner(self) -> str:
        embedded = self.database_url if self.plan.embedded_database else None
        return banner(self.plan, simulator_url=self.simulator_url, database_url=embedded)

    # --- stop -------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Children first (api and worker, then the simulator), the database last."""
        self.stopping = True
        if self._demo is not None:
            await _cancel(self._demo)
        daemons = [c for c in self.children.values() if c.label != "sim"]
        await self._terminate(daemons)
        await self._terminate([c for c in self.children.values() if c.label == "sim"])
        tasks = [task for child in self.children.values() for task in child.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)  # the output up to end of file
            await _cancel(*tasks)
        if self.database is not None:
            await self._stop_database(self.database)

    async def _terminate(self, children: list[Child]) -> None:
        """SIGTERM; up to the grace period (or a second Ctrl-C) to exit; then SIGKILL."""
        live = [c for c in children if c.process.returncode is None]
        if not live:
            return
        for child in live:
            _send(child.process, signal.SIGTERM)
        exits: asyncio.Future[Any] = asyncio.gather(*(c.process.wait() for c in live))
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self.hurry.wait())
        limit = self.settings.shutdown_grace + STOP_MARGIN
        await asyncio.wait({exits, hurry}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        await _cancel(hurry)
        for child in live:
            if child.process.returncode is None:
                self.console.line("dev", f"{child.label} did not stop in time: killing it")
                _send(child.process, signal.SIGKILL)
        await exits
        for child in live:
            if child.process.returncode != 0:
                self.unclean.append(f"{child.label} stopped with status {child.process.returncode}")

    async def _stop_database(self, server: EmbeddedPostgres) -> None:
        try:
            await asyncio.to_thread(server.stop)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.unclean.append(f"the embedded PostgreSQL did not stop: {exc}")
            return
        self.console.line("dev", "PostgreSQL stopped")

    def _exit_status(self) -> int:
        problems = [self.failure] if self.failure is not None else []
        problems += self.unclean
        if problems:
            print(f"fdqueue dev: {'; '.join(problems)}", file=sys.stderr, flush=True)
            return EX_FAILED
        self.console.line("dev", "stopped")
        return 0

    # --- demo -------------------------------------------------------------------------

    async def _run_demo(self) -> None:
        """POST every sample; report how many were accepted, then how many completed."""
        samples = load_samples()
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                urls = await self._submit_all(http, samples)
                self.console.line(
                    "demo", f"{len(urls)} of {len(samples)} sample submissions accepted (202)"
                )
                final = await self._await_final(http, urls)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.console.line("demo", f"stopped: {type(exc).__name__}: {exc}")
            return
        counts = Counter(final.values())
        open_ = len(urls) - counts["completed"] - counts["failed"]
        self.console.line(
            "demo",
            f"{counts['completed']} of {len(urls)} completed, {counts['failed']} failed, "
            f"{open_} still open, in {time.monotonic() - started:.1f} s",
        )

    async def _submit_all(
        self, http: aiohttp.ClientSession, samples: list[dict[str, Any]]
    ) -> list[str]:
        """The status URL of every accepted sample; refusals are reported, not raised."""
        urls = []
        for number, sample in enumerate(samples, 1):
            url = f"{self.plan.api_url}/api/create-freshdesk-ticket"
            async with http.post(url, json=sample) as response:
                body = await response.json(content_type=None)
            if response.status == 202:
                urls.append(f"{self.plan.api_url}{body['status_url']}")
            else:
                code = body.get("error", {}).get("code") if isinstance(body, dict) else None
                self.console.line("demo", f"sample {number} refused: {response.status} {code}")
        return urls

    async def _await_final(self, http: aiohttp.ClientSession, urls: list[str]) -> dict[str, str]:
        """Poll each status URL until completed or failed (or DEMO_TIMEOUT); url -> status."""
        status = dict.fromkeys(urls, "pending")
        deadline = time.monotonic() + DEMO_TIMEOUT
        while time.monotonic() < deadline:
            waiting = [url for url, now in status.items() if now not in FINAL_STATUSES]
            if not waiting:
                break
            for url in waiting:
                async with http.get(url) as response:
                    status[url] = str((await response.json(content_type=None)).get("status"))
            await asyncio.sleep(0.5)
        return status


def run_dev(settings: Settings, *, data_dir: str = ".fdqueue", demo: bool = False) -> int:
    """Run the whole system locally until Ctrl-C or SIGTERM; returns the exit status.

    Starts what is not configured: an embedded PostgreSQL under `data_dir/pg` unless
    DATABASE_URL is set (its port remembered in `data_dir/pg.port`), the simulator unless
    a Freshdesk URL and key are. Applies the migrations, runs `fdqueue api` and `fdqueue
    worker` as child processes with their output labelled on stdout, prints one banner
    once all are ready and, with `demo`, posts the bundled samples. On a signal: SIGTERM
    to the children (SIGKILL after the grace), then the database is stopped. Returns 0
    after a requested stop, 1 when something failed or a child died on its own.
    """
    # The environment is only handed down to the children; the decisions come from settings.
    session = DevSession(plan_dev(settings, data_dir), settings, os.environ, demo=demo)
    return asyncio.run(session.run())


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when `fdqueue dev` dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the children then outlive a killed parent, as before
