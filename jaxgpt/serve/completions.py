"""The two generating endpoints' work (POST /v1/chat/completions and /v1/completions): a checked
request submitted to the service under an admission ticket, its replies answered as one JSON object
or as OpenAI's server-sent events."""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from jaxgpt.generate.service import Stream
from jaxgpt.serve import openai_api
from jaxgpt.serve.admission import ClosingStreamingResponse, Ticket
from jaxgpt.serve.feedback import stored
from jaxgpt.serve.openai_api import ApiError, Asked, LogprobFormat, sse
from jaxgpt.serve.state import AppState


async def generation(request: Request, state: AppState, body: dict, kind: str, received: float):
    """A chat ("chat") or text ("completion") completion of the request's `body`."""
    asked = openai_api.asked(body, kind)
    scores = LogprobFormat(state.tokenizer, kind) if asked.top_logprobs is not None else None
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
    if kind == "chat":
        ticket = submit_chat(state, body, asked, rid, received)
    else:
        ticket = submit_completion(state, body, asked, received)
    return await respond(request, state, ticket, rid, asked, scores)  # it closes the ticket


def submit_chat(state: AppState, body: dict, asked: Asked, rid: str, received: float) -> Ticket:
    messages = openai_api.chat_messages(body)
    max_tokens = asked.max_tokens
    reply_tokens = state.defaults.max_tokens if max_tokens is None else max_tokens
    params = openai_api.sampling_params(body, state.defaults, reply_tokens, asked.top_logprobs or 0)
    openai_api.check_sampling(params, asked.max_field, state.service.engine.slots)
    store = stored(body)  # {source, replaces} if the request asks to be recorded
    # drop_old_turns=False: a conversation that does not fit is refused, never silently cut;
    # without a max_tokens, the reply gets what the context leaves, at most the run's default
    ticket = submit(state, lambda: state.service.chat(messages, params, drop_old_turns=False,
                                                      shrink_max_tokens=max_tokens is None),
                    "messages", received)
    feedback = state.feedback
    if feedback is not None and store is not None:  # queued before anyone can know the id
        feedback.start(rid, messages, model=state.model_id, sampling=params, n=params.n, **store)
        ticket.stream.add_done_callback(lambda stream: feedback.finish(rid, stream.replies))
    return ticket


def submit_completion(state: AppState, body: dict, asked: Asked, received: float) -> Ticket:
    ids = openai_api.prompt_ids(body, state.tokenizer)
    max_tokens, seq_len = asked.max_tokens, state.seq_len
    if max_tokens is None:
        max_tokens = min(state.defaults.max_tokens, max(seq_len - len(ids), 0))
    if len(ids) + max_tokens > seq_len:
        raise ApiError(400, f"prompt: {len(ids)} prompt tokens plus {asked.max_field}={max_tokens} "
                            f"exceed the model's context of {seq_len} tokens", "prompt",
                       code="context_length_exceeded")
    params = openai_api.sampling_params(body, state.defaults, max_tokens, asked.top_logprobs or 0)
    openai_api.check_sampling(params, asked.max_field, state.service.engine.slots)
    return submit(state, lambda: state.service.complete(ids, params), "prompt", received)


def submit(state: AppState, call, param: str, received: float) -> Ticket:
    """call() (a submission to the service), if the server takes on one more request."""
    ticket = state.admission.enter()
    try:
        ticket.stream = openai_api.as_400(call, param)
    except BaseException:
        ticket.close()
        raise
    metrics = state.metrics
    ticket.stream.add_done_callback(lambda stream: metrics.finished_stream(stream, received))
    return ticket


async def respond(request: Request, state: AppState, ticket: Ticket, rid: str, asked: Asked,
                  logprobs: LogprobFormat | None):
    """The finished replies as one JSON object, or the stream as server-sent events."""
    stream, chat = ticket.stream, asked.kind == "chat"
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": state.model_id}
    if asked.stream:
        return ClosingStreamingResponse(events(stream, head, asked, logprobs), ticket,
                                        media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache",
                                                 "X-Accel-Buffering": "no"})
    try:
        while not stream.done:  # polled, so that a caller who hangs up stops costing slots
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the finally cancels it
            await asyncio.sleep(0.02)
    finally:
        ticket.close()
    replies = stream.result()
    if failed := next((r for r in replies if r.error), None):
        raise ApiError(500, f"generation failed: {failed.error}", type="server_error")
    choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text}} if chat
               else {"index": r.index, "text": r.text} for r in replies]
    for choice, r in zip(choices, replies, strict=False):
        choice.update(logprobs=logprobs and logprobs(r.token_ids, r.logprobs, r.top_logprobs),
                      finish_reason=r.finish_reason)
    return {**head, "choices": choices, "usage": openai_api.usage(stream.prompt_tokens, replies)}


async def events(stream: Stream, head: dict, asked: Asked,
                 logprobs: LogprobFormat | None) -> AsyncIterator[str]:
    """OpenAI's chunks: per choice a first one (the role, for chat), one per piece of text and
    one with the finish_reason; then the usage if asked, then [DONE]. A chunk's logprobs are
    those of the tokens that came with it (text is held back at a stop string's possible start
    or a screened phrase, so they need not line up with its text)."""
    kind = asked.kind
    head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
    extra = {"usage": None} if asked.include_usage else {}
    offsets = [0] * stream.n  # text sent so far per choice (completions' text_offset)
    if kind == "chat":
        for i in range(stream.n):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            yield sse({**head, "choices": [role], **extra})
    try:
        async for delta in iterate_in_threadpool(iter(stream)):
            if delta.finish_reason == "error":  # a failed step ends every reply in flight
                yield await failure(stream)
                break
            if delta.text or delta.token_ids:
                scores = None
                if logprobs and delta.token_ids:
                    scores = logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs,
                                      offsets[delta.index])
                yield chunk(head, kind, extra, delta.index, delta.text, scores=scores)
                offsets[delta.index] += len(delta.text)
            if delta.finish_reason is not None:
                yield chunk(head, kind, extra, delta.index, None, delta.finish_reason)
        else:
            if asked.include_usage:
                replies = await run_in_threadpool(stream.result, 30)
                counts = openai_api.usage(stream.prompt_tokens, replies)
                yield sse({**head, "choices": [], "usage": counts})
    except Exception as e:  # noqa: BLE001 - the client still gets an answer it can parse
        yield sse(ApiError(500, f"{type(e).__name__}: {e}", type="server_error").body())
    yield sse("[DONE]")


def chunk(head: dict, kind: str, extra: dict, index: int, text: str | None,
          finish_reason: str | None = None, scores: dict | None = None) -> str:
    """One choice's piece of text (None: none) as a chunk's event."""
    if kind == "chat":
        choice = {"index": index, "delta": {} if text is None else {"content": text}}
    else:
        choice = {"index": index, "text": text or ""}
    return sse({**head, "choices": [{**choice, "logprobs": scores, "finish_reason": finish_reason}],
                **extra})


async def failure(stream: Stream) -> str:
    """The error event of a failed step (which ends every reply in flight)."""
    stream.cancel()
    replies = await run_in_threadpool(stream.result, 30)
    message = next((r.error for r in replies if r.error), "generation failed")
    return sse(ApiError(500, f"generation failed: {message}", type="server_error").body())
