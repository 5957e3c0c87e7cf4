"""Prometheus metrics of the API: queue depth, intake outcomes, request latency by route."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from fdqueue.models import QueueStats, Status

# What became of a submission at intake; every label exists from the start (at 0), so a
# rate() over it never starts from a missing series.
INTAKE_OUTCOMES: Final = (
    "queued",  # 202, a new row
    "duplicate",  # 202 again for a repeated Idempotency-Key
    "direct",  # 201 from ?async=false or the admin route
    "fallback",  # 201 created directly because the queue could not be written
    "invalid",  # 4xx: the body or a header was refused
    "freshdesk_rejected",  # Freshdesk refused the ticket on the direct path
    "unavailable",  # 503: neither the queue nor Freshdesk took it
)
# Route label of a request that matched no route: the raw path must never become a label.
UNMATCHED: Final = "unmatched"
QueueReader = Callable[[], Awaitable[QueueStats | None]]


class ApiMetrics:
    """One private registry per app, so two apps (or two tests) never share a series.

    Queue gauges are read from the database at most once per `cache_seconds`, on scrape:
    a scrape storm costs one query, and no background task keeps the database busy.
    """

    def __init__(self, *, cache_seconds: float = 5.0) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.queue_rows = Gauge(
            "fdqueue_queue_rows", "Rows in the queue by status.", ["status"], registry=self.registry
        )
        self.queue_due = Gauge(
            "fdqueue_queue_due_rows", "Pending rows due for delivery now.", registry=self.registry
        )
        self.oldest_due_age = Gauge(
            "fdqueue_queue_oldest_due_age_seconds",
            "How long the oldest due row has waited past its due time (0 when none).",
            registry=self.registry,
        )
        self.queue_up = Gauge(
            "fdqueue_queue_stats_up",
            "1 when the last read of the queue statistics worked, else 0.",
            registry=self.registry,
        )
        self.intake = Counter(
            "fdqueue_intake", "Ticket submissions by outcome.", ["outcome"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "fdqueue_http_request_duration_seconds",
            "HTTP request latency by method, route pattern and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        for outcome in INTAKE_OUTCOMES:
            self.intake.labels(outcome=outcome)
        for status in Status:
            self.queue_rows.labels(status=status.value)
        self._cache_seconds = cache_seconds
        self._read_at = -math.inf
        self._lock = asyncio.Lock()

    def count_intake(self, outcome: str) -> None:
        """Count one submission; `outcome` is one of INTAKE_OUTCOMES."""
        self.intake.labels(outcome=outcome).inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one request under its route pattern (e.g. `/api/.../tickets/{public_id}`)."""
        self.request_seconds.labels(method=method, route=route, status=str(status)).observe(seconds)

    def set_queue(self, stats: QueueStats | None) -> None:
        """Publish queue statistics; None means the read failed (gauges keep their values)."""
        self.queue_up.set(0 if stats is None else 1)
        if stats is None:
            return
        for status in Status:
            self.queue_rows.labels(status=status.value).set(getattr(stats, status.value))
        self.queue_due.set(stats.due)
        self.oldest_due_age.set(stats.oldest_due_age_seconds or 0.0)

    async def refresh_queue(self, read: QueueReader) -> None:
        """Re-read the queue through `read` unless the last read is fresher than the cache."""
        async with self._lock:
            if time.monotonic() - self._read_at < self._cache_seconds:
                return
            self.set_queue(await read())
            self._read_at = time.monotonic()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics when `accept` asks) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
