"""The worker's Prometheus metrics and the small loopback HTTP endpoint that serves them."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class WorkerMetrics:
    """Counters the delivery path updates; a private registry per worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "fdqueue_deliveries_total",
            "Deliveries by what happened to the row",
            ["outcome"],
            registry=self.registry,
        )
        self.freshdesk_seconds = Histogram(
            "fdqueue_freshdesk_request_seconds",
            "Duration of Freshdesk create calls",
            ["status"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "fdqueue_freshdesk_rate_limited_total", "429 answers", registry=self.registry
        )
        self.pauses = Counter(
            "fdqueue_send_pauses_total",
            "Times all sends were paused",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def start_metrics_server(metrics: WorkerMetrics, port: int) -> web.AppRunner:
    """Serve `/metrics` and `/healthz` on 127.0.0.1:`port`; the caller cleans the runner up."""

    async def scrape(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"success": True, "status": "alive"})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
