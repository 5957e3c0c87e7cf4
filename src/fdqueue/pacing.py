"""The send gate: pauses after 429 and account errors, and paces creates to the account's rate."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fdqueue.models import FreshdeskReply, SendResult


@dataclass(slots=True)
class Pause:
    """Why and until when (monotonic seconds) every send waits."""

    until: float
    reason: str


class SendGate:
    """Shared by every delivery of one process, so a 429 pauses all sends, not just one (B16).

    Pacing spreads creates evenly at `limit` per `window` seconds, where `limit` is the lower
    of the own cap and the `X-RateLimit-Total` Freshdesk reports. Even spacing never bursts
    past a fixed window, so a sustained backlog goes out at the account's rate without 429s.
    """

    def __init__(
        self, *, max_per_minute: int | None = None, window: float = 60.0, margin: float = 1.02
    ) -> None:
        self._own_cap = max_per_minute
        self._window = window
        self._margin = margin
        self._reported_total: int | None = None
        self._next_slot = 0.0
        self._pause: Pause | None = None
        self._lock = asyncio.Lock()

    @property
    def interval(self) -> float:
        """Seconds between two creates (0 when no limit is known)."""
        limits = [n for n in (self._own_cap, self._reported_total) if n]
        if not limits:
            return 0.0
        return self._window / min(limits) * self._margin

    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when sends may go)."""
        if self._pause is None:
            return 0.0
        return max(self._pause.until - time.monotonic(), 0.0)

    @property
    def pause_reason(self) -> str | None:
        return self._pause.reason if self.paused_for() > 0 and self._pause else None

    def pause(self, seconds: float, reason: str) -> None:
        """Hold every send for `seconds` (a longer pause already in force wins)."""
        until = time.monotonic() + seconds
        if self._pause is None or until > self._pause.until or self.paused_for() == 0:
            self._pause = Pause(until, reason)

    def observe(self, result: SendResult) -> None:
        """Learn the account's limit from a reply's headers."""
        if isinstance(result, FreshdeskReply) and result.ratelimit_total:
            self._reported_total = result.ratelimit_total

    async def slot(self, max_wait: float) -> bool:
        """Wait for this send's turn; False when that would take longer than `max_wait`."""
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next_slot, self._pause.until if self._pause else 0.0)
            if start - now > max_wait:
                return False
            self._next_slot = start + self.interval
        await asyncio.sleep(start - now)
        # A 429 that arrived while this send waited moves its turn again.
        return self.paused_for() == 0 or await self.slot(max_wait)
