"""Generation against a KV cache: a fixed set of slots decoding together (continuous batching).

    engine = Engine(model, params, tokenizer, slots=4)
    [rid] = engine.submit(prompt_ids, SamplingParams(temperature=0.7, top_p=0.9, seed=1,
                                                     max_tokens=64))
    while engine.busy:
        for rid, new_ids in engine.step().items(): ...
    engine.generate([prompt_a, prompt_b], SamplingParams(temperature=0))  # -> [ids_a, ids_b]

The cache holds per layer k, v of [slots, K, C, E]: C positions per slot, a power of two from
256 above the longest row's (model/cache.py capacity), grown as rows reach it and shrunk when they
end, so start-up, memory and each step's reads follow the rows in use rather than the model's
context (model.cache_window=whole: C = the context, cfg.seq_len = S). A prompt is prefilled apart
(its length padded to a power-of-two bucket, so a few compiles serve every length) and its row
placed into one free slot; its first token comes out at once. A decode call then feeds every busy
slot's last token at that slot's own position, and each new token back, for up to DECODE_STEPS
steps in one jitted loop, with the cache donated.
Sampling runs inside the loop on per-slot arrays, so requests with different settings share the
step; a request's i-th token is drawn with fold_in(key(seed), i), which makes its reply independent
of what else is in the batch, and of how many steps a call takes. A finished request frees its slot
when its call returns, and the next call admits a waiting one. The n samples of one request are
admitted together: the prompt is prefilled once and its cache row copied to the other samples'
slots. When a sequence fills the cache (S tokens) it is re-prefilled from its last S // 2 tokens (a
context shift) and goes on.

This class is single-threaded and knows ids only; `jaxgpt.replies` drives it from a thread for
many callers and turns ids into screened text (stop strings, UTF-8, the blocklist).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.errors import ConfigError
from jaxgpt.generate import programs
from jaxgpt.generate.sampling import (
    IDLE_KNOBS,
    KNOBS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    sampling_paths,
    seed_of,
)
from jaxgpt.model import cache as cache_lib
from jaxgpt.model import quant
from jaxgpt.model.cache import CACHE_AXES
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding

MIN_BUCKET = 16
# Decode steps per call: each call costs the host a dispatch, the state's transfers and a wait for
# the result, which one token's arithmetic does not cover, on a GPU nor for a small model on a CPU
# (experiments/RESULTS.md, "Decode speed").
DECODE_STEPS = 8
@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    sample: int = 0                                              # which of the request's n samples
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated, stop id excluded
    # the model's, of each token in tokens
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # with params.top_logprobs
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length", or what cancel() was given
    # (the stop id that ended it, its log-probability): GRPO trains on it too
    stopped_by: tuple[int, float] | None = None
    # with keep_logits: one per token
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    slot: int | None = None
    position: int = 0    # where the last sampled token will be written in the cache
    last: int = 0        # the last sampled token, fed at the next decode step


class Engine:
    """mesh: decode on a device mesh, params and cache placed by the logical-axis rules (slots over
    data x fsdp, heads over tensor); None: one device."""

    def __init__(self, model: GPT, params, tokenizer=None, slots: int = 4,
                 keep_logits: bool = False, mesh: jax.sharding.Mesh | None = None,
                 decode_steps: int = DECODE_STEPS):
        model, params = model.for_decoding(params)  # a scan_layers model decodes layer by layer
        if mesh is not None and model.cfg.weights != "float":  # no logical axes for the integers
            raise ConfigError(f"model.weights={model.cfg.weights} decodes on one device; on a "
                              "mesh use model.weights=float")
        params = quant.decode_params(model, params)
        if mesh is not None:
            params = jax.device_put(params,
                                    sharding.logical_to_mesh(model.logical_axes, params, mesh))
        self.model, self.params, self.slots = model, params, slots
        self.keep_logits, self.mesh = keep_logits, mesh
        self.decode_steps = max(1, decode_steps)
        V = model.cfg.vocab_size
        # never sample padding ids
        self.n_valid = min(V, tokenizer.n_vocab) if tokenizer is not None else V
        self.requests: dict[int, Request] = {}
        self._next_id = 0
        self.reset()

    def reset(self) -> None:
        """An empty cache and no requests in flight (those unfinished end with "error"): after a
        failed step, whose donated state may be gone."""
        for request in self.requests.values():
            request.finish_reason = request.finish_reason or "error"
            request.slot = None
        V = self.model.cfg.vocab_size
        cfg = self.model.cfg
        self.capacity = cache_lib.capacity(1, cfg.seq_len, cfg.cache_window)
        self.state = {"cache": self.model.init_cache(self.slots, self.capacity),
                      "counts": jnp.zeros((self.slots, V), jnp.int32),
                      "seen": jnp.zeros((self.slots, V), bool)}
        self.state = self._placed(self.state)
        self.slot_request: list[Request | None] = [None] * self.slots
        self.knobs = {name: np.full(self.slots, IDLE_KNOBS[name], dtype)
                      for name, dtype in KNOBS.items()}
        # the n samples of a request
        self.waiting: collections.deque[list[Request]] = collections.deque()

    def _placed(self, state):
        """state committed to the device, or placed on the mesh by the logical-axis rules: as the
        jitted steps' outputs are, else the next call sees a differently placed state and compiles
        again."""
        if self.mesh is None:
            return jax.device_put(state, jax.devices()[0])
        axes = {"cache": [{"k": CACHE_AXES, "v": CACHE_AXES}] * self.model.cfg.n_layer,
                "counts": ("batch", "vocab"), "seen": ("batch", "vocab")}
        specs = jax.tree.map(lambda names: jax.sharding.PartitionSpec(*names), axes,
                             is_leaf=lambda x: isinstance(x, tuple))
        return jax.device_put(state, sharding.logical_to_mesh(specs, state, self.mesh))

    def _fit(self, need: int) -> None:
        """The cache resized to hold `need` positions per row (and every busy row's): grown to the
        capacity that holds them, or shrunk to it once that is a quarter of the size or less."""
        cfg = self.model.cfg
        busy = [r.position for r in self.slot_request if r is not None]
        target = cache_lib.capacity(max([need, *busy]), cfg.seq_len, cfg.cache_window)
        if target > self.capacity or 4 * target <= self.capacity:
            with self._on_mesh():
                self.state = self._placed(programs.resize(self.state, target))
            self.capacity = target

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slot_request)

    def submit(self, prompt_ids, params: SamplingParams = SamplingParams()) -> list[int]:
        """Queue a prompt; the ids of its params.n samples (each a Request in self.requests)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("an empty prompt: give at least one token (e.g. the end-of-text id)")
        if problem := params.problem(self.slots):
            raise ValueError(problem[1])
        group = []
        for i in range(params.n):
            sample_params = dataclasses.replace(params, seed=seed_of(params.seed, i))
            group.append(Request(self._next_id, prompt, sample_params, sample=i))
            self.requests[self._next_id] = group[-1]
            self._next_id += 1
        if params.max_tokens <= 0:
            for request in group:
                request.finish_reason = "length"
        else:
            self.waiting.append(group)
        return [r.id for r in group]

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """End a request now (waiting or decoding), freeing its slot; a finished one is left as it
        is."""
        request = self.requests.get(request_id)
        if request is None or request.finish_reason is not None:
            return
        request.finish_reason = reason
        self._free_slot(request)
        for group in self.waiting:
            if request in group:
                group.remove(request)
        self.waiting = collections.deque(g for g in self.waiting if g)

    def step(self) -> dict[int, list[int]]:
        """Admit waiting requests into free slots, then one decode step: {request id: new
        tokens}."""
        out: dict[int, list[int]] = {}
        S = self.model.cfg.seq_len
        free = [s for s in range(self.slots) if self.slot_request[s] is None]
        if len(free) == self.slots:
            self._fit(1)  # nothing decoding: back to the smallest cache
        admitted = bool(self.waiting) and len(self.waiting[0]) <= len(free)
        while self.waiting and len(self.waiting[0]) <= len(free):  # first come, first served
            group = self.waiting.popleft()
            for request in group:
                request.slot = free.pop(0)
                self.slot_request[request.slot] = request
                for name in KNOBS:
                    self.knobs[name][request.slot] = getattr(request.params, name)
            # kept: the first sample may finish (and free it) at its first token
            src = group[0].slot
            logits_1xV = self._prefill(group[0], group[0].prompt[-S:], fresh=True, out=out)
            if len(group) > 1:
                self._fork(src, group, logits_1xV, out)
        for request in self.slot_request:
            # the context is full: shift it
            if request is not None and request.position >= S:
                context = (request.prompt + request.tokens)[-(S // 2):]
                self._prefill(request, context, fresh=False, out=out)
        busy = [r for r in self.slot_request if r is not None]
        if busy and not admitted:  # a new reply's first token goes out at once
            tokens, positions, active, steps = (np.zeros(self.slots, np.int32) for _ in range(4))
            for r in busy:
                tokens[r.slot], positions[r.slot] = r.last, r.position
                active[r.slot], steps[r.slot] = 1, len(r.tokens)
            K = self._steps(busy)
            self._fit(max(r.position for r in busy) + K)
            with self._on_mesh():
                token_KxB, logits_KxBxV, scores, self.state = programs.decode(
                    self.model, self.n_valid, self._top_n(busy), self._paths(self.knobs), K,
                    self.keep_logits, self.params, self.state, tokens, positions, active,
                    self.knobs, steps)
            token_KxB, scores = np.asarray(token_KxB), jax.tree.map(np.asarray, scores)
            logits_KxBxV = np.asarray(logits_KxBxV) if self.keep_logits else None
            slots = [(r, r.slot) for r in busy]
            # in order; a request that ends (stop id, max_tokens) drops its later tokens
            for k in range(K):
                scores_k = jax.tree.map(lambda x: x[k], scores)  # noqa: B023 (used at once)
                for r, slot in slots:
                    if r.finish_reason is None:
                        r.position += 1
                        self._emit(r, int(token_KxB[k, slot]), _row(scores_k, slot),
                                   None if logits_KxBxV is None else logits_KxBxV[k, slot], out)
        return out

    def _steps(self, busy) -> int:
        """Decode steps in the next call: decode_steps while every busy row has that many positions
        left in the context, else 1 (a row about to shift its context). A row that ends within
        the call (a stop, max_tokens) computes the rest for nothing, at most decode_steps - 1
        steps a reply, so that one decode program serves every reply (warm_up compiles it, and a
        reply's last tokens compile nothing); a request submitted meanwhile waits for the call's
        end."""
        K, S = self.decode_steps, self.model.cfg.seq_len
        return K if K > 1 and all(r.position + K <= S for r in busy) else 1

    def _on_mesh(self):
        """Trace under the mesh and the rules, so the model's logical constraints take effect."""
        return sharding.on_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _paths(self, knobs: dict[str, np.ndarray]) -> tuple[bool, bool]:
        return sampling_paths(knobs, self.model.cfg.vocab_size)

    def _top_n(self, requests) -> int:
        """Top log-probabilities are computed (a second compile) only while someone asks for
        them."""
        return MAX_TOP_LOGPROBS if any(r.params.top_logprobs for r in requests) else 0

    def _prefill(self, request: Request, context: list[int], fresh: bool, out) -> jax.Array:
        n = len(context)
        bucket = min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), self.model.cfg.seq_len)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = context
        slot = request.slot
        knobs = {name: arr[slot:slot + 1] for name, arr in self.knobs.items()}
        with self._on_mesh():
            token_1, logits_1xV, scores, row = programs.prefill(
                self.model, self.n_valid, self._top_n([request]), self._paths(knobs), self.params,
                self.state["seen"], self.state["counts"], tokens, np.int32(n), np.int32(slot),
                np.bool_(fresh), knobs, np.array([len(request.tokens)], np.int32))
            self._fit(bucket)
            self.state = programs.place(self.state, row, np.int32(slot))
        request.position = n
        self._emit(request, int(token_1[0]), _row(jax.tree.map(np.asarray, scores), 0),
                   np.asarray(logits_1xV[0]) if self.keep_logits else None, out)
        return logits_1xV

    def _fork(self, src: int, group: list[Request], logits_1xV, out) -> None:
        first, rest = group[0], group[1:]
        dsts = np.array([r.slot for r in rest], np.int32)
        knobs = {name: arr[dsts] for name, arr in self.knobs.items()}
        with self._on_mesh():
            token_F, scores, self.state = programs.fork(
                self.model, self.n_valid, self._top_n(group), self._paths(knobs), self.state,
                logits_1xV, np.int32(src), dsts, knobs, np.zeros(len(rest), np.int32))
        token_F, scores = np.asarray(token_F), jax.tree.map(np.asarray, scores)
        logits_V = np.asarray(logits_1xV[0]) if self.keep_logits else None
        for i, r in enumerate(rest):
            r.position = first.position
            self._emit(r, int(token_F[i]), _row(scores, i), logits_V, out)

    def _emit(self, request: Request, token: int, score, logits_V, out) -> None:
        logprob, top = score
        if logits_V is not None:
            request.logits.append(logits_V)
        if token in request.params.stop_ids:
            request.finish_reason, request.stopped_by = "stop", (token, logprob)
        else:
            request.tokens.append(token)
            request.logprobs.append(logprob)
            if request.params.top_logprobs:
                request.top_logprobs.append(top[:request.params.top_logprobs])
            request.last = token
            out.setdefault(request.id, []).append(token)
            if len(request.tokens) >= request.params.max_tokens:
                request.finish_reason = "length"
        if request.finish_reason is not None:  # free the slot at once
            self._free_slot(request)

    def _free_slot(self, request: Request) -> None:
        """The request's slot, if it holds one, free again and idle (IDLE_KNOBS)."""
        if request.slot is None:
            return
        for name, value in IDLE_KNOBS.items():
            self.knobs[name][request.slot] = value
        self.slot_request[request.slot], request.slot = None, None

    def generate(self, prompts: list,
                 params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[list[int]]:
        """The generated ids of each prompt's samples, in order (stop ids excluded), stepping until
        all are done."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [i for p, sp in zip(prompts, params, strict=False) for i in self.submit(p, sp)]
        while any(self.requests[i].finish_reason is None for i in ids):
            self.step()
        return [self.requests.pop(i).tokens for i in ids]


def _row(scores, b: int):
    """(logprob, [(id, logprob), ...] or None) of row b of what _scores returned (as numpy)."""
    chosen_B, top = scores
    if top is None:
        return float(chosen_B[b]), None
    ids_BxN, top_BxN = top
    return float(chosen_B[b]), [(int(i), float(p))
                                for i, p in zip(ids_BxN[b], top_BxN[b], strict=False)]
