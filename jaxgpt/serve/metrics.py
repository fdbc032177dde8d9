"""What /metrics shows, in Prometheus' text format: request counts by endpoint and status (the
CountRequests middleware), tokens, finished replies, time to first token, slots and queue gauges,
and the reply screen's decisions (Metrics, one prometheus_client registry per app)."""
from __future__ import annotations

from starlette.routing import Match

from jaxgpt.generate.service import Service, Stream
from jaxgpt.serve.admission import Admission


class Metrics:
    """The app's Prometheus metrics, in their own registry."""

    TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self, service: Service, admission: Admission):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("jaxgpt_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("jaxgpt_prompt_tokens", "prompt tokens of finished requests",
                                     registry=registry)
        self.completion_tokens = Counter("jaxgpt_completion_tokens", "tokens generated",
                                         registry=registry)
        self.finished = Counter("jaxgpt_replies", "replies finished, by finish_reason",
                                ["finish_reason"], registry=registry)
        self.ttft = Histogram("jaxgpt_time_to_first_token_seconds",
                              "from the request's arrival to its first generated token",
                              buckets=self.TTFT_BUCKETS, registry=registry)
        self._gauges(service, admission)
        registry.register(ScreenCollector(service))

    def _gauges(self, service: Service, admission: Admission) -> None:
        from prometheus_client import Gauge

        for name, doc, read in (
                ("jaxgpt_slots", "requests the engine decodes together",
                 lambda: service.engine.slots),
                ("jaxgpt_busy_slots", "slots decoding now", lambda: service.load()["busy_slots"]),
                ("jaxgpt_queue_depth", "requests waiting for a slot",
                 lambda: service.load()["queued"]),
                ("jaxgpt_requests_in_flight", "requests taken on and not yet answered",
                 lambda: admission.count)):
            Gauge(name, doc, registry=self.registry).set_function(read)

    def finished_stream(self, stream: Stream, received: float) -> None:
        """A request's replies are all in (called on the engine's thread)."""
        replies = [r for r in stream.replies if r is not None]
        self.prompt_tokens.inc(stream.prompt_tokens)
        self.completion_tokens.inc(sum(len(r.token_ids) for r in replies))
        for r in replies:
            self.finished.labels(r.finish_reason).inc()
        if stream.first_token_at is not None:
            self.ttft.observe(stream.first_token_at - received)

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class ScreenCollector:
    """The screen keeps its own counts; they are read when scraped."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("jaxgpt_screen_decisions", "the reply screen's decisions",
                                     labels=["decision"])
        for decision, count in self.service.screen.counts().items():
            family.add_metric([decision], count)
        yield family


class CountRequests:
    """ASGI middleware: each response's status by endpoint (the route's path, "other" for none, so
    that made-up paths cannot blow up the number of series)."""

    def __init__(self, app, metrics: Metrics, routes: list):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = next((r.path for r in self.routes if r.matches(scope)[0] == Match.FULL), "other")
        counted = False

        async def send_counted(message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)
        try:
            await self.app(scope, receive, send_counted)
        except Exception:  # the 500 that the app's outermost handler then answers
            if not counted:
                self.metrics.requests.labels(endpoint, "500").inc()
            raise
