"""From token ids to the text a person reads, for every front end (terminal chat, server, web page).

    service = Service(engine, tokenizer, Screen(cfg.screen))   # a thread steps the engine
    stream = service.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=64))
    for delta in stream:          # safe to show as it comes
        print(delta.text, end="", flush=True)
    [reply] = stream.result()     # text, finish_reason, mean_logprob, flagged, tokens, logprobs
    stream.cancel()               # from any thread: frees the slot at the next step

Each sample's text comes through `generate/text.py`'s TextStream (whole UTF-8 characters, stop
strings, the screen). A stop string ends the reply with finish_reason "stop"; a screened phrase
ends it, and its decoding, with the configured refusal and "content_filter".

`Service` is the thread-safe face of the single-threaded `generate.Engine`: submit and cancel
from any thread, one background thread that admits, steps and routes; a failing step ends the
requests in flight with finish_reason "error" and the engine starts afresh, so one bad request
never takes the others' service down.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from typing import Callable, Iterator

from jaxgpt.config import ScreenConfig
from jaxgpt.data import chat, dialogs
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import JaxgptError
from jaxgpt.generate.engine import Engine, Request
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen
from jaxgpt.generate.text import TextStream

# warm_up's user message, of a first message's usual length: its prompt bucket is most first
# messages' (after a chat model's default system message, "hi" can fall in the bucket below)
WARM_UP_MESSAGE = "Hello! How are you today?"


@dataclasses.dataclass
class Delta:
    """New output of one sample: text safe to show and the tokens behind it (not aligned to it)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None = None  # stop | length | content_filter | cancelled | error


@dataclasses.dataclass
class Reply:
    """A finished sample."""
    index: int
    text: str
    finish_reason: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    mean_logprob: float | None  # of the reply's tokens under the model; None for no tokens
    flagged: bool               # below screen.min_mean_logprob
    screened: str | None        # why the screen blocked it, if it did
    prompt_tokens: int
    error: str | None = None


class Stream:
    """The replies to one submission, as they come: iterate for Deltas, result() for Replies."""

    def __init__(self, service: "Service", n: int, prompt_tokens: int):
        self._service, self.n, self.prompt_tokens = service, n, prompt_tokens
        self._deltas: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self.replies: list[Reply | None] = [None] * n
        self._done = threading.Event()
        self._callbacks: list[Callable[[Stream], None]] = []
        self._lock = threading.Lock()
        self.request_ids: list[int] = []
        self.first_token_at: float | None = None  # time.monotonic() when the first token came out

    def __iter__(self) -> Iterator[Delta]:
        finished = 0
        while finished < self.n:
            try:
                # a timeout, so that Ctrl-C reaches the caller
                delta = self._deltas.get(timeout=0.2)
            except queue.Empty:
                continue
            finished += delta.finish_reason is not None
            yield delta

    def cancel(self) -> None:
        self._service._inbox.put(("cancel", self))
        self._service._wake.set()

    def result(self, timeout: float | None = None) -> list[Reply]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"no reply within {timeout} s")
        return list(self.replies)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[Stream], None]) -> None:
        """fn(stream) once every reply is in (at once if they are): on the engine's thread, so keep
        it short."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _put(self, delta: Delta, reply: Reply | None = None) -> None:
        if self.first_token_at is None and delta.token_ids:
            self.first_token_at = time.monotonic()
        self._deltas.put(delta)
        if reply is not None:
            self.replies[reply.index] = reply
            if all(r is not None for r in self.replies):
                with self._lock:
                    self._done.set()
                    callbacks, self._callbacks = self._callbacks, []
                for fn in callbacks:
                    fn(self)


@dataclasses.dataclass
class _Tracked:
    stream: Stream
    request: Request
    text: TextStream
    seen: int = 0  # tokens of request.tokens already routed


class Service:
    """Drives one Engine from a background thread for any number of callers."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, screen: Screen | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.screen = screen if screen is not None else Screen(ScreenConfig(enabled=False))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tracked: dict[int, _Tracked] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="jaxgpt-engine", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread once what is in flight has finished (or after timeout seconds)."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    # -- what callers use (any thread) --
    def complete(self, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> Stream:
        """Continue token ids; ValueError naming the field for an out-of-range setting."""
        if problem := params.problem(self.engine.slots):
            raise ValueError(problem[1])
        if not prompt_ids:
            raise ValueError("prompt: empty")
        stream = Stream(self, params.n, len(prompt_ids))
        self._inbox.put(("submit", stream, list(prompt_ids), params))
        self._wake.set()
        return stream

    def warm_up(self, system: str = "", top_logprobs: tuple[int, ...] = (0,),
                params: SamplingParams = SamplingParams()) -> None:
        """Compile before the first request: the prefill of a first message's usual prompt
        bucket (system message, a short user message) and the decode call per top_logprobs
        setting, on the sampling path of `params` (greedy or not, a full sort or not: each a
        program of its own). Else the first reply waits for them."""
        ids = self._warm_up_prompt(system)
        for n in top_logprobs:  # never stopping early: the decode call runs
            self.complete(ids, dataclasses.replace(
                params, max_tokens=2, top_logprobs=n, n=1, stop_ids=(), stop=())).result()

    def _warm_up_prompt(self, system: str) -> list[int]:
        """The system message and WARM_UP_MESSAGE in the chat template, or what of them the
        tokenizer can spell ("hi", no system message, the end-of-text token alone)."""
        for turns in ([{"role": "system", "content": system}] if system else [], []):
            for message in (WARM_UP_MESSAGE, "hi"):
                with contextlib.suppress(ValueError, JaxgptError):
                    return chat.render([*turns, {"role": "user", "content": message}],
                                       self.tokenizer, for_generation=True)[0].tolist()
        return [self.tokenizer.eot_id]

    def chat(self, messages: list[dict], params: SamplingParams = SamplingParams(),
             drop_old_turns: bool = True, shrink_max_tokens: bool = False) -> Stream:
        """The assistant's reply to a conversation (its last message the user's). Old turns are
        dropped to leave room for params.max_tokens (or half the context, if less) unless
        drop_old_turns=False, which raises ValueError("messages: ...") instead, or, with
        shrink_max_tokens, lowers max_tokens to what the context leaves. A user message the
        screen blocks gets the refusal at once, with no generation."""
        dialogs.require_valid(messages, trainable=False)
        if messages[-1]["role"] != "user":
            raise ValueError("messages: the last message must be the user's")
        if (self.screen.active and self.screen.cfg.user
                and (why := self.screen.check(messages[-1]["content"]))):
            return self._refused(params.n, 0, why)  # before tokenizing: nothing of it is processed
        seq_len = self.engine.model.cfg.seq_len
        full = None  # the whole conversation rendered, where it is needed
        if drop_old_turns:
            ids = chat.render_prompt(messages, self.tokenizer,
                                     seq_len - min(params.max_tokens, seq_len // 2))
        else:
            full = chat.render(messages, self.tokenizer, for_generation=True)[0]
            if shrink_max_tokens and len(full) < seq_len:
                params = dataclasses.replace(params,
                                             max_tokens=min(params.max_tokens, seq_len - len(full)))
            ids = full if len(full) + params.max_tokens <= seq_len else None
        if ids is None:
            n = len(full if full is not None
                    else chat.render(messages, self.tokenizer, for_generation=True)[0])
            raise ValueError(f"messages: {n} prompt tokens plus max_tokens={params.max_tokens} "
                             f"exceed the model's context of {seq_len} tokens")
        stop_ids = params.stop_ids + chat.layout(self.tokenizer).stop_ids
        return self.complete(ids.tolist(), dataclasses.replace(params, stop_ids=stop_ids))

    def load(self) -> dict:
        """What a metrics endpoint shows: busy slots, queue depth, screening decisions."""
        engine = self.engine
        # read beside the engine's thread, which may change its queue while it is counted
        while True:
            try:
                queued = sum(map(len, engine.waiting))
                break
            except RuntimeError:  # "deque mutated during iteration": count again
                continue
        return {"slots": engine.slots,
                "busy_slots": sum(r is not None for r in engine.slot_request),
                "queued": queued + self._inbox.qsize(), "screen": self.screen.counts()}

    def _refused(self, n: int, prompt_tokens: int, why: str) -> Stream:
        self.screen.record("blocked_user")
        stream = Stream(self, n, prompt_tokens)
        for i in range(n):
            stream._put(Delta(i, self.screen.cfg.refusal, [], [], [], "content_filter"),
                        Reply(i, self.screen.cfg.refusal, "content_filter", [], [], [], None,
                              False, why, prompt_tokens))
        return stream

    # -- the engine's thread --
    def _loop(self) -> None:
        while True:
            self._take_inbox()
            if self._closing and not self.engine.busy and not self._tracked:
                return
            if not self.engine.busy and not self._tracked:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                if self.engine.busy:
                    self.engine.step()
                self._route()
            except Exception as e:  # noqa: BLE001 - whatever broke, the callers get an answer
                self._fail_all(f"{type(e).__name__}: {e}")

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "cancel":
                for rid in item[1].request_ids:
                    self.engine.cancel(rid)
                continue
            _, stream, prompt_ids, params = item
            try:
                ids = self.engine.submit(prompt_ids, params)
            except Exception as e:  # noqa: BLE001
                for i in range(stream.n):
                    stream._put(Delta(i, "", [], [], [], "error"),
                                Reply(i, "", "error", [], [], [], None, False, None,
                                      stream.prompt_tokens, str(e)))
                continue
            stream.request_ids = ids
            hold = (self.screen.cfg.min_mean_logprob is not None
                    and self.screen.cfg.low_confidence == "refuse")
            for rid in ids:
                text = TextStream(self.tokenizer, params.stop,
                                  self.screen.stream() if self.screen.active else None,
                                  self.screen.cfg.refusal, hold_all=hold)
                self._tracked[rid] = _Tracked(stream, self.engine.requests[rid], text)

    def _route(self) -> None:
        for rid, t in list(self._tracked.items()):
            r = t.request
            new = r.tokens[t.seen:]
            delta = Delta(r.sample, t.text.add(new) if new else "", new, r.logprobs[t.seen:],
                          r.top_logprobs[t.seen:])
            t.seen = len(r.tokens)
            if t.text.finish_reason is not None and r.finish_reason is None:
                # stop string or screened: decode no further
                self.engine.cancel(rid, t.text.finish_reason)
            if r.finish_reason is None:
                if delta.text or new:
                    t.stream._put(delta)
                continue
            mean = sum(r.logprobs) / len(r.logprobs) if r.logprobs else None
            verdict = self.screen.confidence(mean) if mean is not None else None
            delta.text += t.text.finish(refuse=verdict == "refuse")
            screened = t.text.screen.blocked if t.text.screen is not None else None
            if self.screen.active:
                self.screen.record("blocked_reply" if screened else "passed")
            if verdict:
                self.screen.record("low_confidence_refused" if verdict == "refuse"
                                   else "low_confidence_flagged")
            delta.finish_reason = t.text.finish_reason or r.finish_reason
            reply = Reply(r.sample, t.text.text, delta.finish_reason, list(r.tokens),
                          list(r.logprobs), list(r.top_logprobs), mean, verdict is not None,
                          screened or ("low confidence" if verdict == "refuse" else None),
                          len(r.prompt))
            t.stream._put(delta, reply)
            del self._tracked[rid]
            self.engine.requests.pop(rid, None)

    def _fail_all(self, message: str) -> None:
        """A step failed: answer everyone in flight with the error and start the engine afresh."""
        for t in list(self._tracked.values()):
            r = t.request
            t.stream._put(Delta(r.sample, "", [], [], [], "error"),
                          Reply(r.sample, t.text.text, "error", list(r.tokens), list(r.logprobs),
                                [], None, False, None, len(r.prompt), message))
        self._tracked.clear()
        self.engine.reset()
