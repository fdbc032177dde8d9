"""An OpenAI-compatible HTTP server over a trained model (FastAPI + uvicorn).

    python -m jaxgpt.serve RUN_OR_EXPORT [serve.host=127.0.0.1 serve.port=8000 serve.slots=4
                                          serve.api_key=KEY sample.temperature=0.8 screen.* ...]

    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}'

Endpoints: POST /v1/chat/completions and /v1/completions (plain JSON, or server-sent events with
"stream": true, ending with `data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus' text
format), a chat page at /, and POST /v1/feedback.

Feedback (`jaxgpt.feedback`, serve.feedback=true by default): a chat completion sent with OpenAI's
`"store": true` (the page sends it unless its settings say otherwise) is recorded in serve.feedback_db
(default: feedback.db in the run directory of RUN, RUN/export or RUN/checkpoints/STEP; beside any
other export directory), with `metadata` {"source": "page", "replaces": ID} telling the page's
requests and regenerated replies apart; POST /v1/feedback {"completion_id": ID, "rating": "up" |
"down"}, {"completion_id": ID, "better_than": OTHER_ID} or {"completion_id": ID, "edit": TEXT} (and
"index" / "better_than_index" for a choice of n > 1) judges one, 404 for an id not recorded.
serve.feedback=false records nothing. Text completions are never recorded.
Any OpenAI client works (base_url http://HOST:PORT/v1). A request that omits a sampling field gets
the run's `sample` section (temperature, top_k, top_p, ...), one without a seed a fresh random seed
as at OpenAI, one without max_tokens sample.max_new_tokens or what the context leaves, if less;
unknown fields are ignored. Errors come in OpenAI's shape, {"error": {"message", "type", "param",
"code"}}, with `param` naming the field to fix; 429 (queue full) and 503 (shutting down) carry
Retry-After. SIGTERM drains: requests in flight finish, new ones get 503, then the server exits.
Not yet: tools, response_format, logit_bias, batched prompts.

All generation goes through one `replies.Service` (one engine thread, serve.slots requests decoding
together, the screen on every reply); the HTTP side only parses, waits and formats, in OpenAI's wire
format (jaxgpt.openai_api). The API key is serve.api_key or the JAXGPT_API_KEY environment variable;
without one the server is open, which is why it listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from jaxgpt import cli
from jaxgpt.serve import openai_api
from jaxgpt.store import runs
from jaxgpt.config import Config
from jaxgpt.errors import ConfigError, JaxgptError
from jaxgpt.serve.feedback import Feedback, FeedbackError, default_path, stored
from jaxgpt.generate.engine import Engine, SamplingParams
from jaxgpt.model.gpt import GPT
from jaxgpt.serve.openai_api import ApiError, LogprobFormat
from jaxgpt.generate.service import Service, Stream
from jaxgpt.generate.screen import Screen
from jaxgpt.data.tokenizer import Tokenizer


PAGE = Path(__file__).with_name("static") / "chat.html"


@dataclass(frozen=True)
class ServeConfig:
    """`python -m jaxgpt.serve`: where to listen and how much to take on."""
    host: str = "127.0.0.1"          # 0.0.0.0 to listen on every interface (set an api_key then)
    port: int = 8000
    slots: int = 4                   # requests (samples) decoding together; also the largest n
    api_key: str | None = None       # clients send `Authorization: Bearer KEY`; default $JAXGPT_API_KEY
    max_body_bytes: int = 1_000_000  # a larger request body is refused with 413
    max_queue: int = 64              # requests waiting beyond the slots before new ones get 429
    model_name: str = ""             # the model id clients name; default: the run directory's name
    retry_after_s: int = 1           # the Retry-After of a 429 (queue full) or 503 (draining)
    drain_timeout_s: float = 120.0   # on SIGTERM, how long requests in flight may take to finish
    feedback: bool = True            # record chat completions sent with "store": true, take POST /v1/feedback
    feedback_db: str = ""            # the SQLite file; default: feedback.db in the run directory (see above)


@dataclass(frozen=True)
class ServeCommand(Config):
    """The run's sections (sample, screen, model.dtype ...) plus the server's own."""
    serve: ServeConfig = field(default_factory=ServeConfig)


# ---- taking requests on: a bounded number at a time, none while draining ----

class Admission:
    """Requests taken on (decoding or waiting for a slot): past `limit` a new one is refused at once
    (429) rather than left to wait minutes behind the others; after drain() every new one gets 503."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after = limit, {"Retry-After": str(retry_after_s)}
        self.count, self.draining = 0, False
        self._lock = threading.Lock()

    def enter(self) -> "Ticket":
        with self._lock:
            if self.draining:
                raise ApiError(503, "the server is shutting down; send the request to another one",
                               type="server_unavailable", code="shutting_down", headers=self.retry_after)
            if self.count >= self.limit:
                raise ApiError(429, f"the server is busy ({self.limit} requests taken on); try again",
                               type="server_busy", code="server_busy", headers=self.retry_after)
            self.count += 1
        return Ticket(self)

    def drain(self) -> None:
        self.draining = True

    def _leave(self) -> None:
        with self._lock:
            self.count -= 1


class Ticket:
    """One admitted request; close() (idempotent, from whichever path ends the response first)
    cancels its generation if still running and gives the place back."""

    def __init__(self, admission: Admission):
        self.admission, self.stream, self._closed = admission, None, False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.stream is not None and not self.stream.done:
            self.stream.cancel()
        self.admission._leave()


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its ticket however it ends: finished, failed, or the client
    gone. A hang-up is watched for from the start: a request still waiting for a slot sends nothing,
    so no failed write would tell (and a body whose generator never started has no finally to run)."""

    def __init__(self, content, ticket: Ticket, **kwargs):
        super().__init__(content, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.ticket.close()  # cancels the generation, so the body ends at the next step

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                await super().__call__(scope, receive, send)
                tasks.cancel_scope.cancel()
        finally:
            self.ticket.close()


# ---- metrics ----

class Metrics:
    """What /metrics shows, in Prometheus' text format (prometheus_client, one registry per app)."""

    TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self, service: Service, admission: Admission):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("jaxgpt_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("jaxgpt_prompt_tokens", "prompt tokens of finished requests", registry=registry)
        self.completion_tokens = Counter("jaxgpt_completion_tokens", "tokens generated", registry=registry)
        self.finished = Counter("jaxgpt_replies", "replies finished, by finish_reason", ["finish_reason"],
                                registry=registry)
        self.ttft = Histogram("jaxgpt_time_to_first_token_seconds", "from the request's arrival to its first "
                              "generated token", buckets=self.TTFT_BUCKETS, registry=registry)
        for name, doc, read in (
                ("jaxgpt_slots", "requests the engine decodes together", lambda: service.engine.slots),
                ("jaxgpt_busy_slots", "slots decoding now", lambda: service.load()["busy_slots"]),
                ("jaxgpt_queue_depth", "requests waiting for a slot", lambda: service.load()["queued"]),
                ("jaxgpt_requests_in_flight", "requests taken on and not yet answered", lambda: admission.count)):
            Gauge(name, doc, registry=registry).set_function(read)

        class ScreenCollector:  # the screen keeps its own counts; read them when scraped
            def collect(self):
                family = CounterMetricFamily("jaxgpt_screen_decisions", "the reply screen's decisions",
                                             labels=["decision"])
                for decision, count in service.screen.counts().items():
                    family.add_metric([decision], count)
                yield family
        registry.register(ScreenCollector())

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
        await self.app(scope, receive, send_counted)


# ---- the app ----

def make_app(service: Service, tokenizer: Tokenizer, cfg: ServeConfig = ServeConfig(), model_id: str = "jaxgpt",
             defaults: SamplingParams = SamplingParams(), feedback: Feedback | None = None) -> FastAPI:
    """The API over `service`; `defaults` fills the sampling fields a request leaves out; stored
    replies and judgements go to `feedback` (None: none are recorded, POST /v1/feedback is a 404).
    app.state.admission.drain() turns new requests away with 503 (what SIGTERM does)."""
    app = FastAPI(title="jaxgpt", docs_url=None, redoc_url=None, openapi_url=None)
    seq_len = service.engine.model.cfg.seq_len
    created = int(time.time())
    admission = app.state.admission = Admission(cfg.slots + cfg.max_queue, cfg.retry_after_s)
    metrics = app.state.metrics = Metrics(service, admission)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(FeedbackError)  # bad or unknown judgements (400 / 404), a failed write (500)
    async def feedback_error(request: Request, e: FeedbackError) -> JSONResponse:
        kind = "server_error" if e.status >= 500 else "invalid_request_error"
        return await api_error(request, ApiError(e.status, str(e), e.field, kind, "not_found" if e.status == 404 else None))

    @app.exception_handler(StarletteHTTPException)  # unknown paths and methods, in the same shape
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     code=kind).body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "a missing or wrong API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        """The JSON object sent, read no further than max_body_bytes (whatever Content-Length claims)."""
        too_big = ApiError(413, f"the request body is over {cfg.max_body_bytes} bytes", code="request_too_large")
        if int(request.headers.get("content-length") or 0) > cfg.max_body_bytes:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > cfg.max_body_bytes:
                raise too_big
        try:
            body = json.loads(data)
        except ValueError as e:  # also invalid UTF-8
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        if (model := openai_api.typed_field(body, "model", "a string")) is not None and model != model_id:
            raise ApiError(404, f"model {model!r} does not exist; this server has {model_id!r}", "model",
                           code="model_not_found")
        return body

    def as_400(call, param: str):
        """call(), turning what the tokenizer or the service refuses into a 400 that names the field."""
        try:
            return call()
        except ValueError as e:
            code = "context_length_exceeded" if "model's context" in str(e) else None
            raise ApiError(400, str(e), openai_api.field_of(str(e), param), code=code) from None
        except JaxgptError as e:  # a malformed conversation, characters the tokenizer lacks
            raise ApiError(400, f"{param}: {e}", param) from None

    async def respond(request: Request, ticket: Ticket, rid: str, kind: str, streaming: bool, include_usage: bool,
                      logprobs: LogprobFormat | None):
        """The finished replies as one JSON object, or the stream as server-sent events."""
        stream = ticket.stream
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model_id}
        if streaming:
            return ClosingStreamingResponse(_events(stream, head, kind, include_usage, logprobs), ticket,
                                            media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while not stream.done:  # polled, so that a caller who hangs up stops costing slots
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally cancels the generation
                await asyncio.sleep(0.02)
        finally:
            ticket.close()
        replies = stream.result()
        if failed := next((r for r in replies if r.error), None):
            raise ApiError(500, f"generation failed: {failed.error}", type="server_error")
        choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text}} if kind == "chat"
                   else {"index": r.index, "text": r.text} for r in replies]
        for choice, r in zip(choices, replies):
            choice.update(logprobs=logprobs and logprobs(r.token_ids, r.logprobs, r.top_logprobs),
                          finish_reason=r.finish_reason)
        return {**head, "choices": choices, "usage": openai_api.usage(stream.prompt_tokens, replies)}

    async def _events(stream: Stream, head: dict, kind: str, include_usage: bool,
                      logprobs: LogprobFormat | None) -> AsyncIterator[str]:
        """OpenAI's chunks: per choice a first one (the role, for chat), one per piece of text and
        one with the finish_reason; then the usage if asked, then [DONE]. A chunk's logprobs are
        those of the tokens that came with it (text is held back at a stop string's possible start
        or a screened phrase, so they need not line up with its text)."""
        head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
        extra = {"usage": None} if include_usage else {}
        offsets = [0] * stream.n  # text sent so far per choice (completions' text_offset)

        def chunk(index: int, text: str | None, finish_reason: str | None = None, scores: dict | None = None) -> str:
            if kind == "chat":
                choice = {"index": index, "delta": {} if text is None else {"content": text}}
            else:
                choice = {"index": index, "text": text or ""}
            return openai_api.sse({**head, "choices": [{**choice, "logprobs": scores, "finish_reason": finish_reason}],
                         **extra})
        if kind == "chat":
            for i in range(stream.n):
                yield openai_api.sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **extra})
        try:
            async for delta in iterate_in_threadpool(iter(stream)):
                if delta.finish_reason == "error":  # a failed step ends every reply in flight
                    stream.cancel()
                    replies = await run_in_threadpool(stream.result, 30)
                    message = next((r.error for r in replies if r.error), "generation failed")
                    yield openai_api.sse(ApiError(500, f"generation failed: {message}", type="server_error").body())
                    break
                if delta.text or delta.token_ids:
                    scores = None
                    if logprobs and delta.token_ids:
                        scores = logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs, offsets[delta.index])
                    yield chunk(delta.index, delta.text, scores=scores)
                    offsets[delta.index] += len(delta.text)
                if delta.finish_reason is not None:
                    yield chunk(delta.index, None, delta.finish_reason)
            else:
                if include_usage:
                    replies = await run_in_threadpool(stream.result, 30)
                    counts = openai_api.usage(stream.prompt_tokens, replies)
                    yield openai_api.sse({**head, "choices": [], "usage": counts})
        except Exception as e:  # noqa: BLE001 - the client still gets an answer it can parse
            yield openai_api.sse(ApiError(500, f"{type(e).__name__}: {e}", type="server_error").body())
        yield openai_api.sse("[DONE]")

    def submit(call, param: str, received: float) -> Ticket:
        """call() (a submission to the service), if the server takes on one more request."""
        ticket = admission.enter()
        try:
            ticket.stream = as_400(call, param)
        except BaseException:
            ticket.close()
            raise
        ticket.stream.add_done_callback(lambda stream: metrics.finished_stream(stream, received))
        return ticket

    async def generation(request: Request, kind: str):
        received = time.monotonic()
        authorize(request)
        body = await read_body(request)
        max_tokens, max_field = openai_api.requested_max_tokens(body)
        streaming = openai_api.typed_field(body, "stream", "a boolean", False)
        include_usage = openai_api.typed_field(body, "stream_options", "an object", {}).get("include_usage") is True
        top_logprobs = openai_api.logprob_request(body, kind)
        scores = LogprobFormat(tokenizer, kind) if top_logprobs is not None else None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        if kind == "chat":
            messages = openai_api.chat_messages(body)
            reply_tokens = defaults.max_tokens if max_tokens is None else max_tokens
            params = openai_api.sampling_params(body, defaults, reply_tokens, top_logprobs or 0)
            check(params, max_field)
            store = stored(body)  # {source, replaces} if the request asks to be recorded
            # drop_old_turns=False: a conversation that does not fit is refused, never silently cut;
            # without a max_tokens, the reply gets what the context leaves, at most the run's default
            ticket = submit(lambda: service.chat(messages, params, drop_old_turns=False,
                                                 shrink_max_tokens=max_tokens is None), "messages", received)
            if feedback is not None and store is not None:  # queued before anyone can know the id
                feedback.start(rid, messages, model=model_id, sampling=params, n=params.n, **store)
                ticket.stream.add_done_callback(lambda stream: feedback.finish(rid, stream.replies))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = as_400(lambda: tokenizer.encode(prompt), "prompt") or [tokenizer.eot_id]
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             and 0 <= t < tokenizer.n_vocab for t in prompt):
                ids = list(prompt)  # token ids, as OpenAI's API takes them too
            else:
                raise ApiError(400, "prompt: expected a string or a list of token ids", "prompt",
                               code="invalid_type" if prompt is not None else "missing_required_parameter")
            if max_tokens is None:
                max_tokens = min(defaults.max_tokens, max(seq_len - len(ids), 0))
            if len(ids) + max_tokens > seq_len:
                raise ApiError(400, f"prompt: {len(ids)} prompt tokens plus {max_field}={max_tokens} exceed the "
                                    f"model's context of {seq_len} tokens", "prompt", code="context_length_exceeded")
            params = openai_api.sampling_params(body, defaults, max_tokens, top_logprobs or 0)
            check(params, max_field)
            ticket = submit(lambda: service.complete(ids, params), "prompt", received)
        return await respond(request, ticket, rid, kind, streaming, include_usage, scores)  # it closes the ticket

    def check(params: SamplingParams, max_field: str) -> None:
        if problem := params.problem(service.engine.slots):
            name, message = problem
            if name == "max_tokens":
                name, message = max_field, message.replace("max_tokens", max_field, 1)
            raise ApiError(400, message, name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, "completion")

    @app.post("/v1/feedback")  # a judgement of a stored reply; it answers once the write has landed
    async def post_feedback(request: Request):
        authorize(request)
        body = await read_body(request)
        if feedback is None:
            raise ApiError(404, "this server records no feedback (serve.feedback=false)", code="feedback_off")
        return await run_in_threadpool(feedback.judge_request, body)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "jaxgpt"}]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != model_id:
            raise ApiError(404, f"model {name!r} does not exist; this server has {model_id!r}", "model",
                           code="model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "jaxgpt"}

    @app.get("/")  # the chat page; it sends the key the person types, so it is served without one
    async def page():
        if not PAGE.is_file():
            raise ApiError(404, "this installation has no chat page (jaxgpt/static/chat.html)", code="not_found")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")  # no key needed: what a load balancer polls; 503 tells it to stop sending
    async def health():
        load = service.load()
        if admission.draining:
            return JSONResponse({"status": "draining", "model": model_id, "in_flight": admission.count, **load},
                                status_code=503, headers=admission.retry_after)
        return {"status": "ok", "model": model_id, "in_flight": admission.count, "feedback": feedback is not None,
                **load}

    @app.get("/metrics")  # no key needed, as /health: counts and timings, no content
    async def metrics_page():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(CountRequests, metrics=metrics, routes=app.router.routes)
    return app


def draining_server(app: FastAPI, config, drain_timeout_s: float = ServeConfig.drain_timeout_s) -> "uvicorn.Server":
    """A uvicorn server whose first SIGTERM or Ctrl-C drains: new requests get 503 (and /health
    says "draining") while those in flight finish, for at most drain_timeout_s; then it exits as
    uvicorn does. A second signal exits at once."""
    import uvicorn

    admission: Admission = app.state.admission

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if admission.draining:
                return super().handle_exit(sig, frame)
            admission.drain()
            print(f"jaxgpt serve: {signal.Signals(sig).name}: draining {admission.count} requests in flight",
                  file=sys.stderr, flush=True)

            def wait_then_exit() -> None:
                deadline = time.monotonic() + drain_timeout_s
                while admission.count and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.should_exit = True  # (not handle_exit: uvicorn would re-raise the signal at the end)
            threading.Thread(target=wait_then_exit, name="jaxgpt-drain", daemon=True).start()
    return DrainingServer(config)


def model_id_of(source: str) -> str:
    """A run's directory name ("out/shakespeare/export" -> "shakespeare")."""
    path = Path(source).absolute()
    return path.parent.name if path.name == "export" else path.name


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        import uvicorn  # here, so that importing this module for make_app does not need it

        cfg = cli.tool_config(ServeCommand, settings)  # every key checked, serve.* included
        for key, ok in (("port", 0 <= cfg.serve.port < 65536), ("slots", cfg.serve.slots >= 1),
                        ("max_body_bytes", cfg.serve.max_body_bytes > 0), ("max_queue", cfg.serve.max_queue >= 0),
                        ("retry_after_s", cfg.serve.retry_after_s >= 0), ("drain_timeout_s", cfg.serve.drain_timeout_s >= 0)):
            if not ok:
                raise ConfigError(f"serve.{key}={getattr(cfg.serve, key)} is out of range")
        loaded = runs.load(operands[0], [s for s in settings if not s.lstrip("-").startswith("serve.")])
        serve = dataclasses.replace(cfg.serve, api_key=cfg.serve.api_key or os.environ.get("JAXGPT_API_KEY") or None,
                                    model_name=cfg.serve.model_name or model_id_of(operands[0]))
        tokenizer = loaded.tokenizer
        engine = Engine(GPT(loaded.cfg.model), loaded.params, tokenizer, slots=serve.slots)
        feedback_db = Path(serve.feedback_db or default_path(operands[0]))
        with (Feedback(feedback_db) if serve.feedback else contextlib.nullcontext()) as feedback, \
                Service(engine, tokenizer, Screen(loaded.cfg.screen)) as service:  # (closed before feedback)
            for top_logprobs in (0, 1):  # compile both kinds of step before listening
                service.complete([tokenizer.eot_id], SamplingParams(max_tokens=2, top_logprobs=top_logprobs)).result()
            app = make_app(service, tokenizer, serve, serve.model_name,
                           SamplingParams.from_config(loaded.cfg.sample, n=1), feedback)
            print(f"jaxgpt serve: {loaded.where} (step {loaded.step}, context {loaded.cfg.model.seq_len} tokens) "
                  f"as {serve.model_name!r} on http://{serve.host}:{serve.port}/v1"
                  f"{'' if serve.api_key else ' (no API key)'}; feedback: {feedback_db if feedback else 'off'}",
                  flush=True)
            config = uvicorn.Config(app, host=serve.host, port=serve.port, log_level="info")
            draining_server(app, config, serve.drain_timeout_s).run()

    cli.run("python -m jaxgpt.serve", cli.Command(
        run, usage="RUN_OR_EXPORT [serve.port=8000 serve.slots=4 serve.api_key=KEY sample.temperature=0.8 ...]",
        root=ServeCommand, sections=("serve", "sample", "screen", "model")), argv)


if __name__ == "__main__":
    main()
