"""`fdqueue dev` as a new user runs it, the bundled samples, and the pieces it is made of."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fdqueue.config import Settings
from fdqueue.devrun import load_samples, plan_dev, readable, remembered_port
from fdqueue.embedded import free_port
from fdqueue.freshdesk import FreshdeskClient, marker_for
from fdqueue.models import FreshdeskReply, TicketIn
from fdqueue.simulator import SimulatorConfig, start_simulator

BANNER_END = "Ctrl-C to stop."
STARTED = re.compile(r"^dev +\| started (\w+) \(pid (\d+)\)$")
POSTGRES_READY = re.compile(r"^dev +\| PostgreSQL ready \(pid (\d+)\)$")
DEMO_ACCEPTED = re.compile(r"^demo +\| (\d+) of (\d+) sample submissions accepted")
DEMO_DONE = re.compile(r"^demo +\| (\d+) of (\d+) completed, (\d+) failed")


# --- a user's terminal --------------------------------------------------------------------


def _fdqueue_command() -> list[str]:
    """The installed console script, as `make run` calls it (else the module)."""
    script = Path(sys.executable).with_name("fdqueue")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fdqueue.cli"]


def _fresh_environment(api_port: int) -> dict[str, str]:
    """Our environment without any database or Freshdesk setting: a fresh machine."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FDQUEUE_", "FRESHDESK_")) and key != "DATABASE_URL"
    }
    env["FDQUEUE_PORT"] = str(api_port)
    return env


class DevRun:
    """`fdqueue dev` in a subprocess, its output collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, data_dir: Path, api_port: int, *args: str) -> DevRun:
        process = await asyncio.create_subprocess_exec(
            *_fdqueue_command(),
            "dev",
            "--data-dir",
            str(data_dir),
            *args,
            env=_fresh_environment(api_port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, pattern: str | re.Pattern[str], within: float = 90.0) -> str:
        """The first output line matching `pattern`; fails when the process ends first."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + within
        while True:
            found = next((line for line in self.lines if regex.search(line)), None)
            if found is not None:
                return found
            if self._reader.done() or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {regex.pattern!r}:\n{self.output()}")
            self._changed.clear()
            await asyncio.wait([asyncio.ensure_future(self._changed.wait())], timeout=1.0)

    async def banner(self) -> list[str]:
        """The banner's lines, once it is printed."""
        await self.wait_for_line(BANNER_END)
        end = self.lines.index(next(line for line in self.lines if BANNER_END in line))
        start = max(i for i in range(end) if self.lines[i].startswith("====="))
        return self.lines[start:end]

    def pids(self) -> dict[str, int]:
        """Every process `fdqueue dev` said it started (api, worker, sim, postgres)."""
        found = {}
        for line in self.lines:
            if match := STARTED.match(line):
                found[match.group(1)] = int(match.group(2))
            elif match := POSTGRES_READY.match(line):
                found["postgres"] = int(match.group(1))
        return found

    async def stop(self, within: float = 60.0) -> int:
        """SIGTERM, as systemd or `kill` would send it; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return await self.wait(within)

    async def wait(self, within: float = 60.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout=within)
        await asyncio.wait_for(self._reader, timeout=10)
        return code

    async def kill(self) -> None:
        """Last resort after a failed test: no process may outlive it."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await asyncio.gather(self._reader, return_exceptions=True)

    def output(self) -> str:
        return "\n".join(self.lines)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


async def _none_alive(pids: dict[str, int], within: float = 10.0) -> list[str]:
    """The names of the processes still running after up to `within` seconds."""
    for _ in range(int(within / 0.1)):
        if not any(_alive(pid) for pid in pids.values()):
            break
        await asyncio.sleep(0.1)
    return [name for name, pid in pids.items() if _alive(pid)]


@dataclass(frozen=True, slots=True)
class Curl:
    """What a curl command line from the banner asks for."""

    method: str
    url: str
    headers: dict[str, str]
    data: str | None


def _parse_curl(command: str) -> Curl:
    words = shlex.split(command)
    assert words[0] == "curl", command
    method, url, headers, data = "GET", "", {}, None
    rest = iter(words[1:])
    for word in rest:
        if word == "-X":
            method = next(rest)
        elif word == "-H":
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = next(rest)
        elif word.startswith("http"):
            url = word
    return Curl(method, url, headers, data)


def _curls(banner: list[str]) -> list[Curl]:
    """Every curl in the banner, continuation lines joined as a shell would."""
    text = "\n".join(banner).replace("\\\n", " ")
    return [_parse_curl(line.strip()) for line in text.splitlines() if "curl " in line]


async def _run(http: aiohttp.ClientSession, curl: Curl) -> tuple[int, Any]:
    async with http.request(curl.method, curl.url, headers=curl.headers, data=curl.data) as r:
        return r.status, await r.json(content_type=None)


async def _until_completed(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Poll the status URL (the way a frontend would) until the row is final."""
    deadline = time.monotonic() + 60.0
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        async with http.get(url) as response:
            body = await response.json()
        if body["status"] in ("completed", "failed"):
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} not final in time: {body}")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh `--data-dir` (not pytest's tmp_path, which pytest prunes while servers run)."""
    directory = Path(tempfile.mkdtemp(prefix="fdqueue-dev-test-"))
    try:
        yield directory / "data"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def _submit_banner_ticket(
    http: aiohttp.ClientSession, banner: list[str], api_url: str
) -> float:
    """Run the banner's submit curl, check it completes; returns seconds from 202 to done."""
    submit = next(c for c in _curls(banner) if c.method == "POST")
    status, body = await _run(http, submit)
    assert status == 202, body
    accepted = time.monotonic()
    assert body["queue_id"] >= 1
    assert body["status_url"] == f"/api/freshdesk-queue/tickets/{body['id']}"
    final = await _until_completed(http, api_url + body["status_url"])
    took = time.monotonic() - accepted
    assert final["status"] == "completed", final
    assert isinstance(final["freshdesk_ticket_id"], int)
    return took


# --- fdqueue dev, end to end ----------------------------------------------------------------


@pytest.mark.slow
async def test_new_user_runs_dev_and_the_banner_curl_completes(
    data_dir: Path, http: aiohttp.ClientSession
) -> None:
    """Nothing configured: the banner shows the port, its curl gets 202, the ticket reaches the
    simulator and completes; SIGTERM stops api, worker, simulator and PostgreSQL, exit 0."""
    port = free_port()
    dev = await DevRun.start(data_dir, port)
    pids: dict[str, int] = {}
    try:
        banner = await dev.banner()
        api_url = f"http://127.0.0.1:{port}"
        assert any(f"API         {api_url}" in line for line in banner), banner
        took = await _submit_banner_ticket(http, banner, api_url)
        print(f"202 -> completed in {took * 1000:.0f} ms")
        stats = next(c for c in _curls(banner) if c.url.endswith("/stats"))
        status, body = await _run(http, stats)
        assert (status, body["stats"]["completed"]) == (200, 1)
        tickets_url = re.search(r"tickets: (\S+/_simulator/tickets)", "\n".join(banner))
        assert tickets_url is not None
        async with http.get(tickets_url.group(1)) as response:
            assert [t["subject"] for t in await response.json()] == ["Printer on fire"]
        pids = dev.pids()
        assert set(pids) == {"api", "worker", "sim", "postgres"}
        assert _children_of(dev.process.pid) <= set(pids.values())
        assert await dev.stop() == 0, dev.output()
    finally:
        await dev.kill()
    assert await _none_alive(pids) == []
    assert "dev    | stopped" in dev.lines


@pytest.mark.slow
async def test_demo_posts_every_sample_and_all_complete(data_dir: Path) -> None:
    """`fdqueue dev --demo`: every bundled sample is accepted (202) and completes."""
    total = len(load_samples())
    dev = await DevRun.start(data_dir, free_port(), "--demo")
    pids: dict[str, int] = {}
    try:
        accepted = DEMO_ACCEPTED.search(await dev.wait_for_line(DEMO_ACCEPTED))
        done = DEMO_DONE.search(await dev.wait_for_line(DEMO_DONE, within=100.0))
        assert accepted is not None
        assert done is not None
        assert accepted.groups() == (str(total), str(total))
        assert done.groups() == (str(total), str(total), "0"), dev.output()
        pids = dev.pids()
        assert await dev.stop() == 0, dev.output()
    finally:
        await dev.kill()
    assert await _none_alive(pids) == []


@pytest.mark.slow
async def test_second_start_reuses_the_data_dir_and_port(
    data_dir: Path, http: aiohttp.ClientSession
) -> None:
    """A second `fdqueue dev` on the same data dir starts fast, on the same PostgreSQL port,
    with the schema up to date and the first run's rows still there."""
    first = await DevRun.start(data_dir, free_port())
    try:
        banner = await first.banner()
        await _submit_banner_ticket(http, banner, _api_url(banner))
        assert await first.stop() == 0, first.output()
    finally:
        await first.kill()
    started = time.monotonic()
    second = await DevRun.start(data_dir, free_port())
    try:
        again = await second.banner()
        print(f"second start: banner after {time.monotonic() - started:.1f} s")
        assert _postgres_url(again) == _postgres_url(banner)
        assert "dev    | schema is up to date" in second.lines
        stats = next(c for c in _curls(again) if c.url.endswith("/stats"))
        assert (await _run(http, stats))[1]["stats"]["completed"] == 1
        assert await second.stop() == 0, second.output()
    finally:
        await second.kill()
    assert _entries(data_dir) == ["pg", "pg.port"]  # nothing else written


@pytest.mark.slow
async def test_a_child_that_dies_stops_everything_with_a_message(data_dir: Path) -> None:
    """When the worker dies on its own, dev names it, stops the rest and exits non-zero."""
    dev = await DevRun.start(data_dir, free_port())
    pids: dict[str, int] = {}
    try:
        await dev.banner()
        pids = dev.pids()
        os.kill(pids["worker"], signal.SIGKILL)
        assert await dev.wait() == 1
    finally:
        await dev.kill()
    assert "worker exited unexpectedly" in dev.output()
    assert await _none_alive(pids) == []


async def test_api_port_in_use_is_named_and_nothing_starts(data_dir: Path) -> None:
    """A taken FDQUEUE_PORT: one message naming it, exit 1, no data dir written."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        dev = await DevRun.start(data_dir, busy.getsockname()[1])
        try:
            assert await dev.wait() == 1
        finally:
            await dev.kill()
    assert "FDQUEUE_PORT" in dev.output()
    assert _entries(data_dir.parent) == []


def _entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _api_url(banner: list[str]) -> str:
    match = re.search(r"API +(http://\S+)", "\n".join(banner))
    assert match is not None
    return match.group(1)


def _postgres_url(banner: list[str]) -> str:
    match = re.search(r"PostgreSQL +(postgresql://\S+)", "\n".join(banner))
    assert match is not None
    return match.group(1)


# --- the samples ------------------------------------------------------------------------------


def test_samples_are_many_and_varied() -> None:
    """At least 50 samples covering every priority and source, HTML, scripts, custom fields."""
    samples = load_samples()
    tickets = [TicketIn.model_validate(sample) for sample in samples]
    assert len(samples) >= 50
    assert {t.priority for t in tickets} == {1, 2, 3, 4}
    assert {t.source for t in tickets} == {1, 2, 3, 7, 9, 10}
    assert {type(s["priority"]) for s in samples} == {int, str}  # numbers and names
    assert any("<p>" in t.description for t in tickets)
    assert any("<" not in t.description for t in tickets)
    text = json.dumps(samples, ensure_ascii=False)
    for sample_of_script in ("ログイン", "مشكلة", "Здравствуйте", "नमस्ते", "🎉"):
        assert sample_of_script in text
    fields = {key for t in tickets for key in t.custom_fields}
    assert fields == {
        "cf_submission_id",
        "cf_order_id",
        "cf_category",
        "cf_vip",
        "cf_purchase_date",
    }
    assert any(t.cc_emails for t in tickets)
    assert any(t.chatbot_id and t.user_id for t in tickets)
    assert max(len(tag) for t in tickets for tag in t.tags) <= 32


async def test_every_sample_is_accepted_by_the_simulator() -> None:
    """Each sample, validated by TicketIn and sent as the worker sends it, gets a 201."""
    config = SimulatorConfig(account_limit=10**6, create_limit=10**6, list_limit=10**6)
    sim = await start_simulator(config=config)
    try:
        async with FreshdeskClient(sim.url, "test-key") as client:
            for number, sample in enumerate(load_samples(), 1):
                ticket = TicketIn.model_validate(sample)
                reply = await client.create_ticket(ticket.ticket_data(), marker_for(uuid.uuid4()))
                assert isinstance(reply, FreshdeskReply), (number, reply)
                assert reply.status == 201, (number, reply.errors)
    finally:
        await sim.close()


# --- the pieces -------------------------------------------------------------------------------


def test_plan_starts_only_what_is_not_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATABASE_URL skips the embedded PostgreSQL; a Freshdesk URL and key skip the simulator."""
    for name in list(os.environ):
        if name.startswith(("FDQUEUE_", "FRESHDESK_")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    bare = plan_dev(Settings(), tmp_path)
    assert (bare.embedded_database, bare.simulator, bare.console_logs) == (True, True, True)
    configured = Settings(
        database_url="postgresql://u:p@127.0.0.1/db",
        freshdesk_domain="acme",
        freshdesk_api_key="key",
        log_format="json",
    )
    plan = plan_dev(configured, tmp_path)
    assert (plan.embedded_database, plan.simulator, plan.console_logs) == (False, False, False)
    assert plan_dev(Settings(freshdesk_domain="acme"), tmp_path).simulator  # no key: simulator


def test_remembered_port_is_kept_while_free(tmp_path: Path) -> None:
    """The saved PostgreSQL port is reused while free and replaced (and saved) once taken."""
    path = tmp_path / "pg.port"
    first = remembered_port(path)
    assert remembered_port(path) == first
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", first))
        busy.listen()
        second = remembered_port(path)
    assert second != first
    assert path.read_text().strip() == str(second)


def test_json_log_lines_are_made_readable() -> None:
    """A JSON log line reads like the console format; any other line is left alone."""
    line = json.dumps(
        {"event": "listening", "level": "info", "logger": "sim", "timestamp": "T", "url": "u"}
    )
    assert readable(line) == "T [info     ] listening [sim] url=u"
    assert readable("plain text") == "plain text"
    assert readable("{not json") == "{not json"
