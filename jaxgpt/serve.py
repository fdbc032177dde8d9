"""An OpenAI-compatible HTTP server over a trained model (FastAPI + uvicorn).

    python -m jaxgpt.serve RUN_OR_EXPORT [serve.host=127.0.0.1 serve.port=8000 serve.slots=4
                                          serve.api_key=KEY sample.temperature=0.8 screen.* ...]

    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}'

Endpoints: POST /v1/chat/completions and /v1/completions (plain JSON, or server-sent events with
"stream": true, ending with `data: [DONE]`), GET /v1/models and /health, and a chat page at /.
Any OpenAI client works (base_url http://HOST:PORT/v1). A request that omits a sampling field gets
the run's `sample` section (temperature, top_k, top_p, ...), one without a seed a fresh random seed
as at OpenAI, one without max_tokens sample.max_new_tokens or what the context leaves, if less;
unknown fields are ignored. Errors come in OpenAI's shape, {"error": {"message", "type", "param",
"code"}}, with `param` naming the field to fix. Not yet: logprobs, tools, batched prompts.

All generation goes through one `replies.Service` (one engine thread, serve.slots requests decoding
together, the screen on every reply); the HTTP side only parses, waits and formats. The API key is
serve.api_key or the JAXGPT_API_KEY environment variable; without one the server is open, which is
why it listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxgpt import chat, cli, runs
from jaxgpt.config import Config
from jaxgpt.errors import ConfigError, JaxgptError
from jaxgpt.generate import Engine, SamplingParams
from jaxgpt.model import GPT
from jaxgpt.replies import Reply, Service, Stream
from jaxgpt.screen import Screen
from jaxgpt.tokenizer import Tokenizer


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


@dataclass(frozen=True)
class ServeCommand(Config):
    """The run's sections (sample, screen, model.dtype ...) plus the server's own."""
    serve: ServeConfig = field(default_factory=ServeConfig)


# ---- errors, in OpenAI's shape ----

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _field_of(message: str, fallback: str) -> str:
    """The field a ValueError names: replies and SamplingParams.problem start their messages with it."""
    m = re.match(r"(\w+)[=:]", message)
    return m.group(1) if m else fallback


# ---- the request body: OpenAI's fields, checked by hand so every mistake names its field ----

INT, NUMBER = "an integer", "a number"
# the sampling fields a request may set (SamplingParams' names, OpenAI's where it has them)
FIELDS = {"temperature": NUMBER, "top_p": NUMBER, "top_k": INT, "min_p": NUMBER, "presence_penalty": NUMBER,
         "frequency_penalty": NUMBER, "repetition_penalty": NUMBER, "n": INT}


def _get(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked to be of `kind` (an absent field or null: default)."""
    value = body.get(name)
    if value is None:
        return default
    ok = {INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
          NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "a boolean": lambda v: isinstance(v, bool),
          "a string": lambda v: isinstance(v, str),
          "an object": lambda v: isinstance(v, dict)}[kind]
    if not ok(value):
        raise ApiError(400, f"{name}: expected {kind}, got {json.dumps(value)[:80]}", name, code="invalid_type")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ApiError(400, "stop: expected a string or a list of strings", "stop", code="invalid_type")


def _messages(body: dict) -> list[dict]:
    """OpenAI's messages as ours: content given as a list of text parts is joined, and "developer"
    (OpenAI's newer name for the system role) is "system"; the rest is checked by Service.chat."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages: required", "messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", "messages", code="invalid_type")
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise ApiError(400, "messages: only text content parts are supported", "messages")
            m = {**m, "content": "".join(p["text"] for p in parts)}
        if isinstance(m, dict) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        out.append({"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m)
    return out


def _params(body: dict, defaults: SamplingParams, max_tokens: int) -> SamplingParams:
    knobs = {name: _get(body, name, kind, getattr(defaults, name)) for name, kind in FIELDS.items()}
    seed = _get(body, "seed", INT)
    return dataclasses.replace(defaults, **knobs, max_tokens=max_tokens, stop=_stop(body),
                               seed=secrets.randbelow(2 ** 31) if seed is None else seed)


def _max_tokens(body: dict) -> tuple[int | None, str]:
    """The requested reply length and the field it came in (max_completion_tokens is the newer name)."""
    for name in ("max_completion_tokens", "max_tokens"):
        if (value := _get(body, name, INT)) is not None:
            return value, name
    return None, "max_tokens"


def _usage(prompt_tokens: int, replies: list[Reply]) -> dict:
    completion = sum(len(r.token_ids) for r in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


# ---- the app ----

def make_app(service: Service, tokenizer: Tokenizer, cfg: ServeConfig = ServeConfig(), model_id: str = "jaxgpt",
             defaults: SamplingParams = SamplingParams()) -> FastAPI:
    """The API over `service`; `defaults` fills the sampling fields a request leaves out."""
    app = FastAPI(title="jaxgpt", docs_url=None, redoc_url=None, openapi_url=None)
    seq_len = service.engine.model.cfg.seq_len
    created = int(time.time())
    # Requests in the building, decoding or waiting for a slot: past slots + max_queue a new one is
    # refused at once (429) rather than left to wait minutes behind the others.
    admitted = threading.BoundedSemaphore(cfg.slots + cfg.max_queue)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

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
        if (model := _get(body, "model", "a string")) is not None and model != model_id:
            raise ApiError(404, f"model {model!r} does not exist; this server has {model_id!r}", "model",
                           code="model_not_found")
        return body

    def as_400(call, param: str):
        """call(), turning what the tokenizer or the service refuses into a 400 that names the field."""
        try:
            return call()
        except ValueError as e:
            raise ApiError(400, str(e), _field_of(str(e), param)) from None
        except JaxgptError as e:  # a malformed conversation, characters the tokenizer lacks
            raise ApiError(400, f"{param}: {e}", param) from None

    async def respond(request: Request, stream: Stream, kind: str, streaming: bool, include_usage: bool):
        """The finished replies as one JSON object, or the stream as server-sent events."""
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model_id}
        if streaming:
            return StreamingResponse(_events(stream, head, kind, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            hung_up = False
            while not stream.done:  # polled, so that a caller who hangs up stops costing slots
                if not hung_up and await request.is_disconnected():
                    hung_up = True
                    stream.cancel()
                await asyncio.sleep(0.02)
        finally:
            admitted.release()
        replies = stream.result()
        if failed := next((r for r in replies if r.error), None):
            raise ApiError(500, f"generation failed: {failed.error}", type="server_error")
        choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text}} if kind == "chat"
                   else {"index": r.index, "text": r.text} for r in replies]
        for choice, r in zip(choices, replies):
            choice.update(logprobs=None, finish_reason=r.finish_reason)
        return {**head, "choices": choices, "usage": _usage(stream.prompt_tokens, replies)}

    async def _events(stream: Stream, head: dict, kind: str, include_usage: bool) -> AsyncIterator[str]:
        """OpenAI's chunks: per choice a first one (the role, for chat), one per piece of text and
        one with the finish_reason; then the usage if asked, then [DONE]. The finally runs when the
        client hangs up too (the server cancels this generator): the stream is cancelled, freeing its slots."""
        head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str | None, finish_reason: str | None = None) -> str:
            if kind == "chat":
                choice = {"index": index, "delta": {} if text is None else {"content": text}}
            else:
                choice = {"index": index, "text": text or ""}
            return _sse({**head, "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}], **extra})
        try:
            if kind == "chat":
                for i in range(stream.n):
                    yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}], **extra})
            async for delta in iterate_in_threadpool(iter(stream)):
                if delta.finish_reason == "error":  # a failed step ends every reply in flight
                    stream.cancel()
                    replies = await run_in_threadpool(stream.result, 30)
                    message = next((r.error for r in replies if r.error), "generation failed")
                    yield _sse(ApiError(500, f"generation failed: {message}", type="server_error").body())
                    break
                if delta.text:
                    yield chunk(delta.index, delta.text)
                if delta.finish_reason is not None:
                    yield chunk(delta.index, None, delta.finish_reason)
            else:
                if include_usage:
                    replies = await run_in_threadpool(stream.result, 30)
                    yield _sse({**head, "choices": [], "usage": _usage(stream.prompt_tokens, replies)})
        except Exception as e:  # noqa: BLE001 - the client still gets an answer it can parse
            yield _sse(ApiError(500, f"{type(e).__name__}: {e}", type="server_error").body())
        finally:
            if not stream.done:
                stream.cancel()
            admitted.release()
        yield _sse("[DONE]")

    def submit(call, param: str) -> Stream:
        """call() (a submission to the service) if the server takes on one more request: else 429."""
        if not admitted.acquire(blocking=False):
            raise ApiError(429, f"the server is busy ({cfg.slots} slots, {cfg.max_queue} waiting); try again",
                           type="server_busy", code="server_busy")
        try:
            return as_400(call, param)
        except BaseException:
            admitted.release()
            raise

    async def generation(request: Request, kind: str):
        authorize(request)
        body = await read_body(request)
        max_tokens, max_field = _max_tokens(body)
        streaming = _get(body, "stream", "a boolean", False)
        include_usage = _get(body, "stream_options", "an object", {}).get("include_usage") is True
        if kind == "chat":
            messages = _messages(body)
            if max_tokens is None:  # what the context leaves, at most the run's own default
                n = len(as_400(lambda: chat.render(messages, tokenizer, for_generation=True)[0], "messages"))
                if n >= seq_len:
                    raise ApiError(400, f"messages: {n} prompt tokens fill the model's context of {seq_len} "
                                        f"tokens", "messages", code="context_length_exceeded")
                max_tokens = min(defaults.max_tokens, seq_len - n)
            params = _params(body, defaults, max_tokens)
            check(params, max_field)
            # drop_old_turns=False: a conversation that does not fit is refused, never silently cut
            stream = submit(lambda: service.chat(messages, params, drop_old_turns=False), "messages")
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
            params = _params(body, defaults, max_tokens)
            check(params, max_field)
            stream = submit(lambda: service.complete(ids, params), "prompt")
        return await respond(request, stream, kind, streaming, include_usage)  # it releases `admitted`

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

    @app.get("/health")  # no key needed: what a load balancer polls
    async def health():
        for _ in range(3):  # the engine thread may change its queue while it is counted
            try:
                return {"status": "ok", "model": model_id, **service.load()}
            except RuntimeError:
                await asyncio.sleep(0.01)
        return {"status": "ok", "model": model_id}

    return app


def model_id_of(source: str) -> str:
    """A run's directory name ("out/shakespeare/export" -> "shakespeare")."""
    path = Path(source).absolute()
    return path.parent.name if path.name == "export" else path.name


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        import uvicorn  # here, so that importing this module for make_app does not need it

        cfg = cli.tool_config(ServeCommand, settings)  # every key checked, serve.* included
        for key, ok in (("port", 0 <= cfg.serve.port < 65536), ("slots", cfg.serve.slots >= 1),
                        ("max_body_bytes", cfg.serve.max_body_bytes > 0), ("max_queue", cfg.serve.max_queue >= 0)):
            if not ok:
                raise ConfigError(f"serve.{key}={getattr(cfg.serve, key)} is out of range")
        loaded = runs.load(operands[0], [s for s in settings if not s.lstrip("-").startswith("serve.")])
        serve = dataclasses.replace(cfg.serve, api_key=cfg.serve.api_key or os.environ.get("JAXGPT_API_KEY") or None,
                                    model_name=cfg.serve.model_name or model_id_of(operands[0]))
        tokenizer = loaded.tokenizer
        engine = Engine(GPT(loaded.cfg.model), loaded.params, tokenizer, slots=serve.slots)
        with Service(engine, tokenizer, Screen(loaded.cfg.screen)) as service:
            service.complete([tokenizer.eot_id], SamplingParams(max_tokens=2)).result()  # compile before listening
            app = make_app(service, tokenizer, serve, serve.model_name,
                           SamplingParams.from_config(loaded.cfg.sample, n=1))
            print(f"jaxgpt serve: {loaded.where} (step {loaded.step}, context {loaded.cfg.model.seq_len} tokens) "
                  f"as {serve.model_name!r} on http://{serve.host}:{serve.port}/v1"
                  f"{'' if serve.api_key else ' (no API key)'}", flush=True)
            uvicorn.run(app, host=serve.host, port=serve.port, log_level="info")

    cli.run("python -m jaxgpt.serve", cli.Command(
        run, usage="RUN_OR_EXPORT [serve.port=8000 serve.slots=4 serve.api_key=KEY sample.temperature=0.8 ...]",
        root=ServeCommand, sections=("serve", "sample", "screen", "model")), argv)


if __name__ == "__main__":
    main()
