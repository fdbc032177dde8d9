"""The OpenAI-compatible HTTP API over a trained model (FastAPI): make_app, its routes, errors in
OpenAI's shape, the API key and body checks, and the chat page. (The command: jaxgpt.serve.server.)

Endpoints: POST /v1/chat/completions and /v1/completions (plain JSON, or server-sent events with
"stream": true, ending with `data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus' text
format), a chat page at /, and POST /v1/feedback.

Feedback (`jaxgpt.feedback`, serve.feedback=true by default): a chat completion sent with OpenAI's
`"store": true` (the page sends it unless its settings say otherwise) is recorded in
serve.feedback_db (default: feedback.db in the run directory of RUN, RUN/export or
RUN/checkpoints/STEP; beside any other export directory), with `metadata` {"source": "page",
"replaces": ID} telling the page's requests and regenerated replies apart; POST /v1/feedback
{"completion_id": ID, "rating": "up" | "down"}, {"completion_id": ID, "better_than": OTHER_ID} or
{"completion_id": ID, "edit": TEXT} (and "index" / "better_than_index" for a choice of n > 1)
judges one, 404 for an id not recorded. serve.feedback=false records nothing. Text completions are
never recorded.

Any OpenAI client works (base_url http://HOST:PORT/v1). A request that omits a sampling field gets
the run's `sample` section (temperature, top_k, top_p, ...), one without a seed a fresh random seed
as at OpenAI, one without max_tokens sample.max_new_tokens or what the context leaves, if less;
fields it does not know are ignored. Errors come in OpenAI's shape, {"error": {"message", "type",
"param", "code"}}, with `param` naming the field to fix: 400 for any field out of its type or range,
a body that is not one UTF-8 JSON object (jaxgpt.serve.intake) or OpenAI fields it cannot honour
(tools, JSON output, logit_bias, echo, suffix, best_of > n, several prompts at once); 413 past
serve.max_body_bytes, 415 for a Content-Type other than JSON, 404 / 405 for unknown paths and
methods, 401 without the key; 429 (queue full) and 503 (shutting down) carry Retry-After.

All generation goes through one `replies.Service` (one engine thread, serve.slots requests decoding
together, the screen on every reply); the HTTP side only parses, waits and formats, in OpenAI's wire
format (jaxgpt.serve.openai_api); the generating endpoints' work is in jaxgpt.serve.completions.
"""
from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.service import Service
from jaxgpt.serve import completions, intake
from jaxgpt.serve.admission import Admission
from jaxgpt.serve.feedback import Feedback, FeedbackError
from jaxgpt.serve.metrics import CountRequests, Metrics
from jaxgpt.serve.openai_api import ApiError
from jaxgpt.serve.state import AppState, ServeConfig, state_of

PAGE = Path(__file__).with_name("static") / "chat.html"

# (method, path, handler) of each route, in the order they are matched; each app adds them all
ROUTES: list[tuple[str, str, Callable]] = []


def route(method: str, path: str):
    def register(handler: Callable) -> Callable:
        ROUTES.append((method, path, handler))
        return handler
    return register


def make_app(service: Service, tokenizer: Tokenizer, cfg: ServeConfig = ServeConfig(),
             model_id: str = "jaxgpt", defaults: SamplingParams = SamplingParams(),
             feedback: Feedback | None = None) -> FastAPI:
    """The API over `service`; `defaults` fills the sampling fields a request leaves out; stored
    replies and judgements go to `feedback` (None: none are recorded, POST /v1/feedback is a 404).
    app.state.admission.drain() turns new requests away with 503 (what SIGTERM does)."""
    app = FastAPI(title="jaxgpt", docs_url=None, redoc_url=None, openapi_url=None)
    admission = app.state.admission = Admission(cfg.slots + cfg.max_queue, cfg.retry_after_s)
    metrics = app.state.metrics = Metrics(service, admission)
    app.state.serve = AppState(service, tokenizer, cfg, model_id, defaults, feedback, admission,
                               metrics)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(FeedbackError, feedback_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)  # a bug: still a body clients can parse
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    app.add_middleware(CountRequests, metrics=metrics, routes=app.router.routes)
    return app


# ---- errors, all in OpenAI's shape ----

async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def feedback_error(request: Request, e: FeedbackError) -> JSONResponse:
    """Bad or unknown judgements (400 / 404), a failed write (500)."""
    kind = "server_error" if e.status >= 500 else "invalid_request_error"
    code = "not_found" if e.status == 404 else None
    return await api_error(request, ApiError(e.status, str(e), e.field, kind, code))


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404) and methods (405, with the Allow header)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                 code=code).body(), status_code=e.status_code, headers=e.headers)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks of a route's parameters (a 422 of its shape by default)."""
    first = (e.errors() or [{}])[0]
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return await api_error(request, ApiError(400, f"{param or 'the request'}: "
                                                  f"{first.get('msg', 'invalid')}", param))


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    """What no request should reach. Starlette re-raises it after this answer, for uvicorn to log
    and close the connection: the header tells the client not to reuse it."""
    return await api_error(request, ApiError(500, f"internal error ({type(e).__name__})",
                                             type="server_error", headers={"Connection": "close"}))


# ---- what every API request goes through ----

def authorize(request: Request) -> None:
    api_key = state_of(request).cfg.api_key
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" \
            or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        raise ApiError(401, "a missing or wrong API key: send `Authorization: Bearer KEY`",
                       code="invalid_api_key")


async def read_body(request: Request) -> dict:
    """The JSON object sent, read no further than max_body_bytes (whatever Content-Length says)."""
    state = state_of(request)
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        # what a browser page elsewhere can send without asking first (CORS): never taken
        raise ApiError(415, f"Content-Type {media[:60]!r}: send the body as application/json",
                       code="unsupported_media_type")
    limit = state.cfg.max_body_bytes
    # closing the connection stops a client sending the rest (uvicorn would read and drop it)
    too_big = ApiError(413, f"the request body is over {limit} bytes", code="request_too_large",
                       headers={"Connection": "close"})
    if int(request.headers.get("content-length") or 0) > limit:  # (uvicorn checks it is a number)
        raise too_big
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
    except ClientDisconnect:  # nobody is left to answer; 499 is what the metrics count
        raise ApiError(499, "the client hung up before the body ended",
                       code="client_closed") from None
    return intake.request_body(bytes(data), state.model_id)


# ---- the routes ----

@route("POST", "/v1/chat/completions")
async def chat_completions(request: Request):
    return await generation(request, "chat")


@route("POST", "/v1/completions")
async def text_completions(request: Request):
    return await generation(request, "completion")


async def generation(request: Request, kind: str):
    received = time.monotonic()
    authorize(request)
    body = await read_body(request)
    state = state_of(request)
    intake.refuse_unsupported(body, kind, state.tokenizer.n_vocab)
    return await completions.generation(request, state, body, kind, received)


@route("POST", "/v1/feedback")  # a judgement of a stored reply; answered once the write landed
async def post_feedback(request: Request):
    authorize(request)
    body = await read_body(request)
    feedback = state_of(request).feedback
    if feedback is None:
        raise ApiError(404, "this server records no feedback (serve.feedback=false)",
                       code="feedback_off")
    return await run_in_threadpool(feedback.judge_request, body)


@route("GET", "/v1/models")
async def models(request: Request):
    authorize(request)
    return {"object": "list", "data": [model_card(state_of(request))]}


@route("GET", "/v1/models/{name}")
async def model(name: str, request: Request):
    authorize(request)
    state = state_of(request)
    if name != state.model_id:
        raise ApiError(404, f"model {name!r} does not exist; this server has {state.model_id!r}",
                       "model", code="model_not_found")
    return model_card(state)


def model_card(state: AppState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "jaxgpt"}


@route("GET", "/")  # the chat page; it sends the key the person types, so it is served without one
async def page():
    if not PAGE.is_file():
        raise ApiError(404, "this installation has no chat page (jaxgpt/static/chat.html)",
                       code="not_found")
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@route("GET", "/health")  # no key needed: what a load balancer polls; 503 tells it to stop sending
async def health(request: Request):
    state = state_of(request)
    load, admission = state.service.load(), state.admission
    if admission.draining:
        return JSONResponse({"status": "draining", "model": state.model_id,
                             "in_flight": admission.count, **load},
                            status_code=503, headers=admission.retry_after)
    return {"status": "ok", "model": state.model_id, "in_flight": admission.count,
            "feedback": state.feedback is not None, **load}


@route("GET", "/metrics")  # no key needed, as /health: counts and timings, no content
async def metrics_page(request: Request):
    return Response(state_of(request).metrics.text(),
                     media_type="text/plain; version=0.0.4; charset=utf-8")
