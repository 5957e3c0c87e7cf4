"""Fault scenarios against the real processes; prints one table of counts, exits 1 on a breach.

    python -m tools.chaos [--quick] [--only NAME ...] [--keep] [--root DIR]

Scenarios (issue 8; docs/chaos.md): crashes, compete, outage, freshdesk, restart, hostile,
secrets. Each starts its own `tools.system.System` (private PostgreSQL, simulator, apis,
workers), runs its load and faults, waits for the queue to settle and checks the
invariant of `tools.system.Invariant`; some add checks of their own (exit codes, 5xx, logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import io
import json
import logging
import random
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from tools.system import (
    CANARY_BODY,
    CANARY_SUBJECT,
    UNLIMITED_SIMULATOR,
    Counts,
    Invariant,
    Load,
    Service,
    System,
    check_settled,
    find_in_logs,
    submission,
)


@dataclass(frozen=True, slots=True)
class Scale:
    """How big each scenario runs: the full run, `--quick`, or the test suite's short one."""

    name: str
    crash_submissions: int
    crash_kills: int
    compete_submissions: int
    outage_submissions: int
    freshdesk_submissions: int
    down_seconds: float
    restart_submissions: int
    restarts: int
    fuzz_cases: int
    slow_seconds: float
    settle_seconds: float


FULL: Final = Scale("full", 1000, 10, 2000, 600, 600, 60.0, 600, 2, 3000, 10.0, 240.0)
QUICK: Final = Scale("quick", 200, 4, 400, 200, 200, 5.0, 200, 1, 300, 3.0, 90.0)
TEST: Final = Scale("test", 60, 2, 60, 60, 60, 3.0, 60, 1, 0, 1.5, 60.0)


@dataclass(frozen=True, slots=True)
class Context:
    """What every scenario gets: where to write, how big, and the run's one API key."""

    root: Path
    scale: Scale
    api_key: str


@dataclass(slots=True)
class Result:
    """A scenario's invariant counts plus its own checks (`failures`) and remarks (`notes`)."""

    name: str
    counts: Counts = field(default_factory=Counts)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.counts.ok and not self.failures

    def require(self, condition: bool, failure: str) -> None:
        if not condition:
            self.failures.append(failure)


async def verdict(
    ctx: Context, system: System, load: Load, result: Result, *, final: bool = False
) -> None:
    """Wait for the queue to settle, then check the invariant into `result.counts`."""
    timeout = ctx.scale.settle_seconds
    if not await system.settle(timeout, final=final):
        result.notes.append(f"queue not settled after {timeout:.0f} s")
    rows, tickets = await system.rows(), await system.tickets()
    result.counts = Invariant(load.answers.values(), rows, tickets).check()


def system_for(ctx: Context, name: str, env: dict[str, str], **kwargs: Any) -> System:
    return System(ctx.root / name, env=env, api_key=ctx.api_key, **kwargs)


def answer_mix(load: Load) -> str:
    mix = Counter(answer.status for answer in load.answers.values())
    return "answers " + ", ".join(f"{status or 'none'}: {n}" for status, n in sorted(mix.items()))


def require_alive(result: Result, services: list[Service]) -> None:
    for service in services:
        result.require(service.running, f"{service.name} is not running at the end")


# --- 1. worker crashes -----------------------------------------------------------------------


async def worker_crashes(ctx: Context) -> Result:
    """kill -9 the worker at random moments during delivery, restart it each time."""
    result = Result("crashes")
    env = {"FDQUEUE_LEASE": "4", "FDQUEUE_BATCH_SIZE": "5", "FDQUEUE_CONCURRENCY": "5"}
    args = (*UNLIMITED_SIMULATOR, "--latency", "0.05")
    rng = random.Random(1)
    async with system_for(ctx, "crashes", env, simulator_args=args) as system:
        await system.start(workers=1, apis=1)
        worker = system.workers[0]
        count = ctx.scale.crash_submissions
        async with Load(system.api_urls(), run="crash") as load:
            feeding = asyncio.create_task(load.run(count, rate=count / 8))
            for _ in range(ctx.scale.crash_kills):
                await asyncio.sleep(rng.uniform(0.2, 1.2))
                code = await worker.kill()
                result.require(code == -9, f"worker exit after SIGKILL was {code}")
                await worker.start()
            await feeding
            await verdict(ctx, system, load, result)
        reclaimed = worker.count_in_log("reclaimed a row whose lease expired")
        result.notes.append(f"{ctx.scale.crash_kills} kills; {reclaimed} rows reclaimed")
        require_alive(result, system.services())
    return result


# --- 2. several workers and the manual route ---------------------------------------------------


async def several_workers(ctx: Context) -> Result:
    """Three workers and the API's manual-process route compete, under NOTIFY storms."""
    result = Result("compete")
    env = {"FDQUEUE_BATCH_SIZE": "2", "FDQUEUE_CONCURRENCY": "4"}
    async with system_for(ctx, "compete", env) as system:
        await system.start(workers=3, apis=1)
        done = asyncio.Event()
        manual = asyncio.create_task(_manual_processing(system, done))
        storm = asyncio.create_task(_notify_storms(system, done))
        async with Load(system.api_urls(), run="compete", concurrency=24) as load:
            await load.run(ctx.scale.compete_submissions)
            await verdict(ctx, system, load, result)
        done.set()
        calls, processed, refused = await manual
        storms = await storm
        result.require(refused == 0, f"manual process route refused {refused} calls")
        result.notes.append(
            f"{calls} manual process calls delivered {processed} rows; {storms} NOTIFY storms"
        )
        require_alive(result, system.services())
    return result


async def _manual_processing(system: System, done: asyncio.Event) -> tuple[int, int, int]:
    """POST /api/freshdesk-queue/process in a loop; (calls, rows processed, non-200 answers)."""
    calls = processed = refused = 0
    url = f"{system.api_urls()[0]}/api/freshdesk-queue/process?batch_size=5"
    while not done.is_set():
        async with system.http().post(url) as response:
            calls += 1
            if response.status == 200:
                processed += int((await response.json()).get("processed", 0))
            else:
                refused += 1
        await asyncio.sleep(0.02)
    return calls, processed, refused


async def _notify_storms(system: System, done: asyncio.Event) -> int:
    storms = 0
    while not done.is_set():
        await system.notify_storm(200)
        storms += 1
        await asyncio.sleep(0.05)
    return storms


# --- 3. database outage ----------------------------------------------------------------------


async def database_outage(ctx: Context) -> Result:
    """Restart PostgreSQL, then terminate every backend, during intake and delivery."""
    result = Result("outage")
    # A long timer: rows posted after the outage reach a worker only if it LISTENs again.
    env = {"FDQUEUE_POLL_INTERVAL": "600", "FDQUEUE_DB_CONNECT_TIMEOUT": "2"}
    args = (*UNLIMITED_SIMULATOR, "--latency", "0.02")
    async with system_for(ctx, "outage", env, simulator_args=args) as system:
        await system.start(workers=1, apis=1)
        count = ctx.scale.outage_submissions
        feed_seconds = max(3.0, count / 50)
        async with Load(system.api_urls(), run="outage") as load:
            feeding = asyncio.create_task(load.run(count, rate=count / feed_seconds))
            await asyncio.sleep(feed_seconds * 0.2)
            await system.restart_database(down_for=feed_seconds * 0.15)
            await asyncio.sleep(feed_seconds * 0.2)
            terminated = await system.terminate_backends()
            await asyncio.sleep(feed_seconds * 0.15)
            terminated += await system.terminate_backends()
            await feeding
            await _catch_up(system, load, result)
            await verdict(ctx, system, load, result)
        result.notes.append(f"{answer_mix(load)}; {terminated} backends terminated")
        _require_relisten(result, system.workers[0], expected=3)
        crashed = system.workers[0].count_in_log('"Freshdesk delivery crashed"')
        result.notes.append(f"worker logged {crashed} 'Freshdesk delivery crashed' errors")
        require_alive(result, system.services())
    return result


async def _catch_up(system: System, load: Load, result: Result) -> None:
    """Once the API is ready again, a few more submissions: all must be queued (202)."""
    await system.apis[0].wait_ready()
    for _ in range(150):  # up to about 30 s
        if await _ready(system):
            break
        await asyncio.sleep(0.2)
    after = await load.run(10)
    queued = sum(answer.status == 202 for answer in after)
    result.require(queued == 10, f"after the outage only {queued}/10 submissions were queued")


async def _ready(system: System) -> bool:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with system.http().get(f"{system.api_urls()[0]}/readyz") as response:
            return response.status == 200
    return False


def _require_relisten(result: Result, worker: Service, expected: int) -> None:
    again = worker.count_in_log("LISTEN connection re-established")
    result.require(again >= 1, "the worker never re-established its LISTEN connection")
    result.notes.append(f"worker re-LISTENed {again} times (outages: {expected})")


# --- 4. Freshdesk misbehaves -----------------------------------------------------------------

AFTER_CREATE: Final = ("504_html", "reset", "hang", "500_json", "201_empty", "201_text_plain")


def fault_rates(then: str) -> dict[str, Any]:
    """30 % 5xx (JSON and HTML), 10 % hangs past the timeout, 10 % create-then-fail, 5 % resets."""
    return {
        "rates": {
            "500_json": 0.15,
            "502_html": 0.08,
            "503_html": 0.07,
            "hang": {"p": 0.10, "seconds": 4},
            "create_then_fail": {"p": 0.10, "then": then, "seconds": 4},
            "reset": 0.05,
        }
    }


def freshdesk_submission(run: str, n: int) -> dict[str, Any]:
    """Like `submission`, but one in 25 carries a value Freshdesk refuses (400: must fail)."""
    ticket = submission(run, n)
    if n % 25 == 7:
        ticket["custom_fields"] = {"cf_order_id": "not-a-number"}
    return ticket


async def freshdesk_misbehaves(ctx: Context) -> Result:
    """5xx, hangs, create-then-fail, 429 bursts, resets; then a total outage; then recovery."""
    result = Result("freshdesk")
    env = {
        "FDQUEUE_MAX_ATTEMPTS": "20",
        "FDQUEUE_BACKOFF_UNIT": "0.05",
        "FDQUEUE_BACKOFF_JITTER": "0.2",
        "FDQUEUE_HTTP_TIMEOUT": "2",
    }
    async with system_for(ctx, "freshdesk", env) as system:
        await system.start(workers=2, apis=1)
        count = ctx.scale.freshdesk_submissions
        make = freshdesk_submission
        async with Load(system.api_urls(), run="freshdesk", make=make) as load:
            feeding = asyncio.create_task(load.run(count, rate=count / 8))
            await _misbehave_while(system, feeding)
            await system.faults({"clear": True, "down": True})
            await asyncio.sleep(ctx.scale.down_seconds)
            await system.faults({"clear": True})
            await verdict(ctx, system, load, result, final=True)
        await _require_sane_failures(system, result)
        require_alive(result, system.services())
    return result


async def _misbehave_while(system: System, feeding: asyncio.Task[Any]) -> None:
    """Rotate the create-then-fail flavour every second; a 429 burst every other second."""
    for step in range(10_000):
        await system.faults(fault_rates(AFTER_CREATE[step % len(AFTER_CREATE)]))
        if step % 2 == 0:
            retry_after: int | None = 1 if step % 4 == 0 else None
            burst = {"fault": "429", "retry_after": retry_after, "count": 5}
            await system.faults({"script": [burst]})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(feeding), 1.0)
        if feeding.done():
            return


async def _require_sane_failures(system: System, result: Result) -> None:
    """Only Freshdesk's 400 may fail a row here; never a 429 or a transient error."""
    reasons = Counter(
        (row.error or "")[:60] for row in await system.rows() if row.status == "failed"
    )
    odd = {reason: n for reason, n in reasons.items() if "cf_order_id" not in reason}
    result.require(not odd, f"rows failed for other reasons than the 400: {odd}")
    result.notes.append(f"failed rows (Freshdesk 400 on cf_order_id): {sum(reasons.values())}")


# --- 5. stop and start -----------------------------------------------------------------------


async def stop_and_start(ctx: Context) -> Result:
    """SIGTERM the api and the workers mid-load (as `systemctl stop`), start them again."""
    result = Result("restart")
    args = (*UNLIMITED_SIMULATOR, "--latency", "0.3")
    env = {"FDQUEUE_SHUTDOWN_GRACE": "5"}
    async with system_for(ctx, "restart", env, simulator_args=args) as system:
        await system.start(workers=2, apis=1)
        count = ctx.scale.restart_submissions
        async with Load(system.api_urls(), run="restart") as load:
            feeding = asyncio.create_task(load.run(count, rate=count / 8))
            for _ in range(ctx.scale.restarts):
                await asyncio.sleep(8 / (ctx.scale.restarts + 1))
                await _stop_all(system, result)
                await asyncio.sleep(0.5)
                for service in [*system.apis, *system.workers]:
                    await service.start()
            await feeding
            await verdict(ctx, system, load, result)
        result.notes.append(answer_mix(load))
        require_alive(result, system.services())
    return result


async def _stop_all(system: System, result: Result) -> None:
    services = [*system.apis, *system.workers]
    codes = await asyncio.gather(*(service.terminate() for service in services))
    for service, code in zip(services, codes, strict=True):
        result.require(code == 0, f"{service.name} exited {code} after SIGTERM")
    left = await system.unsettled()
    result.require(
        left["processing"] == 0, f"{left['processing']} rows left processing after SIGTERM"
    )


# --- 6. hostile input ------------------------------------------------------------------------

CREATE: Final = "/api/create-freshdesk-ticket"
VALID: Final = {"email": "hostile@chaos.example.com", "subject": "hostile", "description": "d"}
FIELDS: Final = (
    "email", "subject", "description", "priority", "status", "source", "tags", "cc_emails",
    "custom_fields", "type", "name", "group_id", "responder_id", "product_id", "company_id",
    "requester_id", "phone", "twitter_id", "facebook_id", "unique_external_id", "chatbot_id",
    "user_id",
)  # fmt: skip
WRONG_VALUES: Final[tuple[Any, ...]] = (
    None, True, False, 0, -1, 1.5, 2**63, 10**29, "", " ", "x", "\t\n", [], {}, ["x"],
    {"a": 1}, [[]], [None], {"cf_x": [1]},
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Hostile:
    """One hand-made request: raw body bytes, sent as they are."""

    label: str
    body: bytes
    content_type: str | None = "application/json"
    method: str = "POST"
    path: str = CREATE
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Seen:
    """What the API answered to one hostile request (status 0: it closed the connection)."""

    label: str
    status: int
    public_id: uuid.UUID | None = None


def _doc(**changes: Any) -> bytes:
    return json.dumps({**VALID, **changes}, ensure_ascii=False).encode("utf-8", "surrogatepass")


def nesting_cases() -> list[Hostile]:
    deep = 100_000
    return [
        Hostile("deep arrays", b'{"subject":' + b"[" * deep + b"]" * deep + b"}"),
        Hostile("deep objects", b'{"a":' * deep + b"1" + b"}" * deep),
        Hostile(
            "deep custom field", _doc(custom_fields={"cf_x": json.loads("[" * 500 + "]" * 500)})
        ),
        Hostile("deep mixed", b"[{" * 20_000 + b"}]" * 20_000),
    ]


def size_cases(limit: int = 1024 * 1024) -> list[Hostile]:
    base = _doc(subject="")
    fill = limit - len(base)
    exact = base.replace(b'"subject": ""', b'"subject": "' + b"s" * (fill - 0) + b'"')
    return [
        Hostile("body at the limit", exact[:limit] if len(exact) > limit else exact),
        Hostile("body one byte over", exact + b" "),
        Hostile("5 MB body", _doc(description="d" * 5_000_000)),
        Hostile("huge subject", _doc(subject="s" * 900_000)),
        Hostile("huge description", _doc(description="d" * 900_000)),
        Hostile("200k tags", _doc(tags=["a"] * 200_000)),
        Hostile("50k custom fields", _doc(custom_fields={f"cf_{i}": i for i in range(50_000)})),
        Hostile("10k cc", _doc(cc_emails=["a@b.co"] * 10_000)),
        Hostile("huge number", b'{"priority": 1' + b"0" * 5000 + b"}"),
        Hostile("huge float", b'{"priority": 1e400}'),
        Hostile("long key", _doc(**{"k" * 500_000: 1})),
        Hostile("10k unknown keys", _doc(**{f"k{i}": i for i in range(10_000)})),
    ]


def type_cases() -> list[Hostile]:
    cases = [
        Hostile(f"{name}={value!r}"[:60], _doc(**{name: value}))
        for name in FIELDS
        for value in WRONG_VALUES
    ]
    for top in (b"[]", b'"x"', b"1", b"null", b"true", b"[{}]", b"{}"):
        cases.append(Hostile(f"top level {top!r}", top))
    return cases


PLANES: Final = [chr(plane * 0x10000 + 0x100) for plane in range(17)]
ODD_TEXT: Final = (
    "".join(PLANES),
    "\ufffe\uffff\U0010ffff\U000effff",  # noncharacters
    "\ue000\U000f0000",  # private use
    "\ufeffbom",
    "a" + "\u0301" * 5000,  # a pile of combining marks
    "\u202eevil\u202c",
    "\u200b\u200d\u2060",
    "😀" * 1000,
    "\r\n\t\x0b\x0c\x1b[31m",
)


def unicode_cases() -> list[Hostile]:
    cases = []
    for i, text in enumerate(ODD_TEXT):
        for name in ("subject", "description", "name", "tags", "email"):
            value: Any = [text[:32]] if name == "tags" else text
            cases.append(Hostile(f"unicode {i} in {name}", _doc(**{name: value})))
            escaped = json.dumps({**VALID, name: value}).encode()
            cases.append(Hostile(f"unicode {i} escaped in {name}", escaped))
    raw = [
        ("NUL escaped", b'"a\\u0000b"'),
        ("lone high surrogate", b'"a\\ud800b"'),
        ("lone low surrogate", b'"\\udc00"'),
        ("reversed pair", b'"\\udc00\\ud800"'),
        ("invalid utf-8", b'"\xff\xfe"'),
        ("overlong utf-8", b'"\xc0\xaf"'),
        ("encoded surrogate", b'"\xed\xa0\x80"'),
        ("truncated utf-8", b'"\xe2\x82"'),
    ]
    for label, literal in raw:
        for name in ("subject", "description", "custom_fields"):
            value = b'{"cf_x":' + literal + b"}" if name == "custom_fields" else literal
            body = b'{"email":"h@chaos.example.com","subject":"s","description":"d",'
            cases.append(
                Hostile(
                    f"{label} in {name}", body[:-1] + b',"' + name.encode() + b'":' + value + b"}"
                )
            )
        cases.append(Hostile(f"{label} as key", b"{" + literal + b':1,"subject":"s"}'))
    cases.append(Hostile("BOM before JSON", b"\xef\xbb\xbf" + _doc()))
    cases.append(
        Hostile(
            "utf-16 body", json.dumps(VALID).encode("utf-16"), "application/json; charset=utf-16"
        )
    )
    return cases


def protocol_cases() -> list[Hostile]:
    valid = _doc()
    return [
        Hostile(
            "duplicate keys", b'{"email":"a@b.co","email":"c@d.co","subject":"s","description":"d"}'
        ),
        Hostile(
            "duplicate typed keys",
            b'{"subject":"s","subject":{"x":1},"email":"a@b.co","description":"d"}',
        ),
        Hostile("no content type", valid, None),
        Hostile("text/plain", valid, "text/plain"),
        Hostile("form", b"email=a%40b.co&subject=s", "application/x-www-form-urlencoded"),
        Hostile("multipart junk", b"--x\r\n\r\n", "multipart/form-data; boundary=x"),
        Hostile("empty body", b""),
        Hostile("blank body", b" \n\t "),
        Hostile("trailing junk", valid + b"}}}"),
        Hostile("two documents", valid + valid),
        Hostile("NaN", b'{"priority": NaN}'),
        Hostile("PUT", valid, method="PUT"),
        Hostile("DELETE", b"", method="DELETE"),
        Hostile("async=maybe", valid, path=CREATE + "?async=maybe"),
        Hostile("async twice", valid, path=CREATE + "?async=true&async=false"),
        Hostile("batch_size junk", b"", path="/api/freshdesk-queue/process?batch_size=1e9"),
        Hostile("batch_size -1", b"", path="/api/freshdesk-queue/process?batch_size=-1"),
        Hostile("status no uuid", b"", method="GET", path="/api/freshdesk-queue/tickets/%00"),
        Hostile(
            "status huge id", b"", method="GET", path="/api/freshdesk-queue/tickets/" + "9" * 5000
        ),
        Hostile("path traversal", b"", method="GET", path="/api/../../etc/passwd"),
        Hostile("long key header", valid, headers=(("Idempotency-Key", "k" * 7000),)),
        Hostile("ctl key header", valid, headers=(("Idempotency-Key", "a\tb"),)),
        Hostile("request id junk", valid, headers=(("X-Request-Id", "x" * 5000),)),
        Hostile(
            "forwarded admin",
            b"",
            path="/api/freshdesk-queue/stats",
            method="GET",
            headers=(("X-Forwarded-For", "1.2.3.4"),),
        ),
    ]


def hand_made_cases() -> list[Hostile]:
    return [
        *nesting_cases(),
        *size_cases(),
        *type_cases(),
        *unicode_cases(),
        *protocol_cases(),
    ]


async def send_all(api: str, cases: list[Hostile], concurrency: int = 4) -> list[Seen]:
    """Send every case once; answers in order (status 0 when the server hung up)."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def one(case: Hostile) -> Seen:
            async with limit:
                return await send_one(http, api, case)

        return list(await asyncio.gather(*(one(case) for case in cases)))


async def send_one(http: aiohttp.ClientSession, api: str, case: Hostile) -> Seen:
    headers = dict(case.headers)
    skip = []
    if case.content_type is None:
        skip.append("Content-Type")
    else:
        headers["Content-Type"] = case.content_type
    try:
        async with http.request(
            case.method,
            api + case.path,
            data=io.BytesIO(case.body),  # aiohttp warns about large raw bytes bodies
            headers=headers,
            skip_auto_headers=skip,
        ) as response:
            raw = await response.read()
            return Seen(case.label, response.status, _queued_id(response.status, raw))
    except (aiohttp.ClientError, TimeoutError, OSError):
        return Seen(case.label, 0)


def _queued_id(status: int, raw: bytes) -> uuid.UUID | None:
    if status != 202:
        return None
    return uuid.UUID(json.loads(raw)["id"])


def schemathesis_cases(api: str, total: int) -> list[Seen] | None:
    """`total` or so requests generated by schemathesis from /api/openapi.json (positive and
    negative), or None when schemathesis is not installed (the `chaos` extra)."""
    try:
        schemathesis = importlib.import_module("schemathesis")
        hypothesis = importlib.import_module("hypothesis")
        requests = importlib.import_module("requests")
    except ImportError:
        return None
    schema = schemathesis.openapi.from_url(f"{api}/api/openapi.json")
    operations = [found.ok() for found in schema.get_all_operations()]
    weights = {
        "POST /api/create-freshdesk-ticket": 6,
        "POST /api/create-freshdesk-ticket-direct": 2,
    }
    share = total / sum(weights.get(op.label, 1) for op in operations) / 2
    seen: list[Seen] = []
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            examples = max(1, round(share * weights.get(operation.label, 1)))
            _fuzz_one(hypothesis, requests, operation, mode, examples, api, seen)
    return seen


def _fuzz_one(
    hypothesis: Any,
    requests: Any,
    operation: Any,
    mode: Any,
    examples: int,
    api: str,
    seen: list[Seen],
) -> None:
    """Run `examples` generated cases of one operation in one generation mode into `seen`."""
    label = f"schemathesis {operation.label} {mode.value}"

    def call(case: Any) -> None:
        try:
            response = case.call(base_url=api, timeout=30)
        except requests.RequestException:
            seen.append(Seen(label, 0))
            return
        status = response.status_code
        seen.append(Seen(label, status, _queued_id(status, response.content)))

    # Composed by hand rather than as decorators: hypothesis is imported dynamically.
    given = hypothesis.given(operation.as_strategy(generation_mode=mode))(call)
    configured = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )(given)
    # An operation without parameters has no negative cases: hypothesis says Unsatisfiable.
    with contextlib.suppress(hypothesis.errors.Unsatisfiable), contextlib.redirect_stdout(None):
        configured()


@dataclass(slots=True)
class SlowOutcome:
    seen: list[Seen]
    served_meanwhile: bool


async def slow_bodies(api: str, seconds: float, connections: int = 30) -> SlowOutcome:
    """Slowloris, bounded: `connections` trickle headers or bodies for `seconds`, while
    normal submissions must still be answered 202."""
    address = api.removeprefix("http://")
    host, port = address.rsplit(":", 1)
    slow = [_trickle(host, int(port), seconds, headers_only=i % 2 == 0) for i in range(connections)]
    gathered = await asyncio.gather(asyncio.gather(*slow), _serve_meanwhile(api, seconds))
    answered, served = gathered
    return SlowOutcome(list(answered), served)


async def _trickle(host: str, port: int, seconds: float, *, headers_only: bool) -> Seen:
    label = "slow headers" if headers_only else "slow body"
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return Seen(label, 0)
    head = f"POST {CREATE} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    if headers_only:
        payload = "X-Slow: " + "a" * 10_000
    else:  # the headers at once, so the handler is already reading when the body trickles
        writer.write(f"{head}Content-Length: 10000\r\n\r\n".encode())
        payload, head = '{"subject": "' + "s" * 10_000, ""
    writer.write(head.encode())
    try:
        deadline = time.monotonic() + seconds
        for char in payload:
            if time.monotonic() > deadline:
                break
            writer.write(char.encode())
            await writer.drain()
            await asyncio.sleep(0.05)
        first = await asyncio.wait_for(reader.readline(), 10)
    except (OSError, TimeoutError):
        return Seen(label, 0)
    finally:
        writer.close()
    parts = first.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return Seen(label, status)


async def _serve_meanwhile(api: str, seconds: float) -> bool:
    async with Load([api], run="slowloris-neighbour") as load:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await load.run(1)
            await asyncio.sleep(0.2)
        return bool(load.answers) and all(a.status == 202 for a in load.answers.values())


async def hostile_input(ctx: Context) -> Result:
    """Fuzz and hand-made hostile requests: no 5xx but 503, no 202 without a row, still up."""
    result = Result("hostile")
    async with system_for(ctx, "hostile", {}) as system:
        await system.start(workers=1, apis=1)
        api = system.api_urls()[0]
        seen = await send_all(api, hand_made_cases())
        if ctx.scale.fuzz_cases:
            fuzzed = await asyncio.to_thread(schemathesis_cases, api, ctx.scale.fuzz_cases)
            if fuzzed is None:
                result.notes.append("schemathesis not installed (pip install '.[chaos]'): skipped")
            else:
                result.notes.append(f"schemathesis sent {len(fuzzed)} cases")
                seen += fuzzed
        slow = await slow_bodies(api, ctx.scale.slow_seconds)
        seen += slow.seen
        result.require(slow.served_meanwhile, "the API did not serve others during slow bodies")
        await _hostile_verdict(ctx, system, seen, result)
        # A client that hung up cannot see a 500; the API's own log still shows it.
        await asyncio.sleep(1.0)  # the last slow connections closed just now
        failed = system.apis[0].count_in_log('"request failed"')
        result.require(failed == 0, f"the API logged {failed} failed requests (500)")
        require_alive(result, system.services())
    return result


async def _hostile_verdict(ctx: Context, system: System, seen: list[Seen], result: Result) -> None:
    errors = [s for s in seen if s.status >= 500 and s.status != 503]
    result.require(not errors, f"5xx answers: {[f'{s.label}: {s.status}' for s in errors[:10]]}")
    await system.settle(ctx.scale.settle_seconds)
    rows = await system.rows()
    stored = {row.public_id for row in rows}
    missing = [s.label for s in seen if s.public_id is not None and s.public_id not in stored]
    result.require(not missing, f"202 without a row: {missing[:10]}")
    counts = Counts(submitted=len(seen), accepted=sum(s.status == 202 for s in seen))
    counts.lost = len(missing)
    check_settled(rows, counts)
    result.counts = counts
    statuses = Counter(s.status for s in seen)
    result.notes.append(f"{len(seen)} requests; statuses {dict(sorted(statuses.items()))}")


# --- 7. secrets ------------------------------------------------------------------------------


async def secrets_check(ctx: Context) -> Result:
    """After everything, neither the key nor any ticket text in a log; admin routes guarded."""
    result = Result("secrets")
    token = f"chaos-admin-{secrets.token_hex(16)}"
    async with system_for(ctx, "secrets", {}) as system:
        await system.start(workers=1, apis=1)
        await system.faults(fault_rates("504_html"))
        async with Load(system.api_urls(), run="secrets", make=freshdesk_submission) as load:
            await load.run(30)
            await system.faults({"clear": True})
            await verdict(ctx, system, load, result)
        await _admin_guard(system, token, result)
    _scan_logs(ctx.root, [ctx.api_key, token, CANARY_BODY, CANARY_SUBJECT], result)
    return result


def non_loopback_address() -> str | None:
    """This machine's first non-loopback IPv4 address (`hostname -I`), or None."""
    import socket
    import subprocess

    try:
        shown = subprocess.run(
            ["hostname", "-I"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        shown = []
    for address in shown:
        with contextlib.suppress(OSError):
            socket.inet_aton(address)
            if not address.startswith("127."):
                return address
    return None


async def _admin_guard(system: System, token: str, result: Result) -> None:
    address = non_loopback_address()
    if address is None:
        result.notes.append("no non-loopback address: admin checked with a token only")
    else:
        open_api = await system.add_api(host=address)
        codes = await _admin_codes(system, open_api, None)
        result.require(set(codes) == {403}, f"admin from {address} without token: {codes}")
        result.notes.append(f"admin routes from {address}, no token set: {codes}")
    guarded = await system.add_api({"FDQUEUE_ADMIN_TOKEN": token}, host=address or "127.0.0.1")
    without = await _admin_codes(system, guarded, None)
    wrong = await _admin_codes(system, guarded, "Bearer nope")
    right = await _admin_codes(system, guarded, f"Bearer {token}")
    result.require(set(without) == {401} and set(wrong) == {401}, f"token refused? {without}")
    result.require(all(code < 400 for code in right), f"admin with the token: {right}")


async def _admin_codes(system: System, api: Service, authorization: str | None) -> list[int]:
    headers = {"Authorization": authorization} if authorization else {}
    routes = [
        ("GET", "/api/freshdesk-queue/stats", None),
        ("POST", "/api/freshdesk-queue/process?batch_size=1", None),
        ("POST", "/api/create-freshdesk-ticket-direct", submission("admin", 1)),
    ]
    codes = []
    for method, path, body in routes:
        async with system.http().request(
            method, f"{api.url}{path}", json=body, headers=headers
        ) as response:
            codes.append(response.status)
    return codes


def _scan_logs(root: Path, needles: list[str], result: Result) -> None:
    ours = [path for path in root.glob("*/logs/*.log")]
    hits = find_in_logs(ours, needles)
    for needle, places in hits.items():
        label = needle if needle.startswith("canary") else f"{needle[:10]}…"
        result.require(not places, f"{label} found in logs: {places[:5]}")
    postgres = find_in_logs(root.glob("*/pgdata/server.log"), needles[2:])
    leaked = {needle: places[:3] for needle, places in postgres.items() if places}
    if leaked:
        result.notes.append(f"PostgreSQL's own server.log holds ticket text: {leaked}")
    result.notes.append(f"scanned {len(ours)} fdqueue logs for the key, token and ticket text")


# --- the run ---------------------------------------------------------------------------------

Scenario = Callable[[Context], Awaitable[Result]]
SCENARIOS: Final[dict[str, Scenario]] = {
    "crashes": worker_crashes,
    "compete": several_workers,
    "outage": database_outage,
    "freshdesk": freshdesk_misbehaves,
    "restart": stop_and_start,
    "hostile": hostile_input,
    "secrets": secrets_check,
}


async def run_scenario(name: str, ctx: Context) -> Result:
    """One scenario, timed; a crash of the scenario itself is a failed result, not an abort."""
    started = time.monotonic()
    try:
        result = await SCENARIOS[name](ctx)
    except Exception as exc:  # reported in the table: the other scenarios still run
        logging.getLogger("tools.chaos").exception("scenario %s crashed", name)
        result = Result(name, failures=[f"scenario crashed: {type(exc).__name__}: {exc}"])
    result.seconds = time.monotonic() - started
    return result


async def run_all(names: list[str], ctx: Context) -> list[Result]:
    results = []
    for name in names:
        print(f"running {name} ({ctx.scale.name})...", file=sys.stderr, flush=True)
        results.append(await run_scenario(name, ctx))
    return results


COLUMNS: Final = (
    "accepted",
    "delivered",
    "failed",
    "pending",
    "direct",
    "refused",
    "duplicates",
    "lost",
    "stuck",
)


def table(results: list[Result]) -> str:
    """The counts of every scenario, one line each, then its failures and notes."""
    head = f"{'scenario':<10}" + "".join(f"{c:>11}" for c in COLUMNS) + f"{'seconds':>9}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        cells = "".join(f"{getattr(r.counts, c):>11}" for c in COLUMNS)
        lines.append(f"{r.name:<10}{cells}{r.seconds:>9.1f}  {'ok' if r.ok else 'FAILED'}")
    lines.append("")
    for r in results:
        lines.extend(f"{r.name}: {note}" for note in r.notes)
        lines.extend(f"{r.name}: FAILED {text}" for text in [*r.failures, *r.counts.problems])
    return "\n".join(lines)


@contextlib.contextmanager
def run_root(given: str | None, keep: bool) -> Iterator[Path]:
    root = Path(given) if given else Path(tempfile.mkdtemp(prefix="fdqueue-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        if keep or given:
            print(f"logs kept under {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, short outages")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data")
    parser.add_argument("--root", help="directory for data and logs (kept)")
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    started = time.monotonic()
    with run_root(args.root, args.keep) as root:
        ctx = Context(root, QUICK if args.quick else FULL, f"chaos-key-{secrets.token_hex(12)}")
        results = asyncio.run(run_all(names, ctx))
    print(table(results))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
