"""Closed-loop HTTP load from Debian's `wrk` (C, its own process) with a Lua script that POSTs.

    result = await post_load(url, {"email": ...}, connections=64, seconds=20)
    result.rate, result.p50_ms, result.p99_ms

wrk keeps `connections` requests in flight for `seconds` and times each one; the Lua
script counts the 202 answers apart from every other status and prints one JSON line.
A Python client on this 2-core kind of machine would take the CPU the api needs; wrk
costs a fraction of it. Install it with `apt-get install wrk`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

# setup() runs once per thread in the main Lua state, so done() can sum the threads' counts.
LUA_SCRIPT: Final = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%BODY%]==]
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) accepted = 0; other = 0 end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, o = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("accepted"); o = o + t:get("other") end
  local e = summary.errors
  io.write(string.format(
    'WRK-JSON {"requests":%d,"duration_us":%d,"accepted":%d,"other":%d,"errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, a, o, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
MARK: Final = "WRK-JSON "


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One wrk run: 202s, other answers, socket errors and timeouts, latency percentiles."""

    seconds: float
    accepted: int
    other: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        """202 answers per second."""
        return self.accepted / self.seconds


def wrk_path() -> str:
    """The wrk binary; RuntimeError with the install command when it is missing."""
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk not found: install it with `apt-get install wrk`")
    return found


async def wrk_version() -> str:
    """wrk's own version line (it prints it on -v, then exits 1)."""
    process = await asyncio.create_subprocess_exec(
        wrk_path(), "-v", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    return out.decode().splitlines()[0].split(" Copyright")[0].strip()


async def post_load(
    url: str, body: Mapping[str, Any], *, connections: int, seconds: float
) -> LoadResult:
    """POST `body` to `url` on `connections` connections for `seconds` (one wrk thread).

    Raises RuntimeError when wrk fails or prints no summary.
    """
    with tempfile.TemporaryDirectory(prefix="fdqueue-wrk-") as folder:
        script = Path(folder) / "post.lua"
        script.write_text(LUA_SCRIPT.replace("%BODY%", json.dumps(body)), encoding="utf-8")
        process = await asyncio.create_subprocess_exec(
            wrk_path(),
            "--threads=1",
            f"--connections={connections}",
            f"--duration={max(1, round(seconds))}s",
            "--timeout=10s",
            f"--script={script}",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith(MARK)), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text[-2000:]}")
    figures = json.loads(line.removeprefix(MARK))
    return LoadResult(
        seconds=figures["duration_us"] / 1e6,
        accepted=figures["accepted"],
        other=figures["other"],
        errors=figures["errors"],
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
    )
