"""Generation against a KV cache: a fixed set of slots decoding together (continuous batching).

    engine = Engine(model, params, tokenizer, slots=4)
    [rid] = engine.submit(prompt_ids, SamplingParams(temperature=0.7, top_p=0.9, seed=1,
                                                     max_tokens=64))
    while engine.busy:
        for rid, new_ids in engine.step().items(): ...
    engine.generate([prompt_a, prompt_b], SamplingParams(temperature=0))  # -> [ids_a, ids_b]

The cache is static: per layer k, v of [slots, K, S, E] (S = cfg.seq_len). A prompt is prefilled
into one free slot (its length padded to a power-of-two bucket, so a few compiles serve every
length); a decode call then feeds every busy slot's last token at that slot's own position, and
each new token back, for up to DECODE_STEPS steps in one jitted loop, with the cache donated.
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
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.generate import sampling
from jaxgpt.generate.sampling import (
    IDLE_KNOBS,
    KNOBS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    sample_tokens,
    sampling_paths,
    seed_of,
)
from jaxgpt.model import quant
from jaxgpt.model.cache import CACHE_AXES
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding

MIN_BUCKET = 16
# Decode steps per call: each call costs the host a dispatch, the state's transfers and a wait for
# the result, which one token's arithmetic does not cover, on a GPU nor for a small model on a CPU
# (experiments/RESULTS.md, "Decode speed").
DECODE_STEPS = 8
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _prefill(model: GPT, n_valid: int, top_n: int, paths: tuple[bool, bool], params, state,
             tokens_1xL, length, slot, fresh, knobs, step_1):
    """Prompt tokens[:length] into cache row `slot` (from position 0); the first new token."""
    L = tokens_1xL.shape[1]
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)  # noqa: E731
    put = lambda x, row: jax.lax.dynamic_update_slice_in_dim(x, row, slot, axis=0)  # noqa: E731
    segments_1xL = (jnp.arange(L) < length).astype(jnp.int32)[None]
    positions_1xL = jnp.arange(L, dtype=jnp.int32)[None]
    # The prompt starts at position 0, so it attends over a fresh L-long cache, written into the
    # slot's first L positions afterwards. (Taking the slot's S-long row out of the donated cache
    # and putting it back made XLA copy the whole cache twice.)
    logits_1xLxV, cache_1 = model.apply(params, tokens_1xL, segments_1xL, positions_1xL,
                                        cache=model.init_cache(1, L))
    logits_1xV = jax.lax.dynamic_index_in_dim(logits_1xLxV, length - 1, axis=1, keepdims=False)
    V = logits_1xV.shape[-1]
    # a fresh request starts its penalty counts; a context shift keeps them
    prompt_1xV = jnp.zeros((1, V), bool).at[0, tokens_1xL[0]].max(segments_1xL[0] > 0)
    seen_1xV = jnp.where(fresh, prompt_1xV, take(state["seen"]))
    counts_1xV = jnp.where(fresh, 0, take(state["counts"]))
    token_1 = sample_tokens(logits_1xV, knobs, counts_1xV, seen_1xV, step_1, n_valid, paths)
    counts_1xV = counts_1xV + jax.nn.one_hot(token_1, V, dtype=jnp.int32)
    write = lambda x, row_1xKxLxE: jax.lax.dynamic_update_slice(  # noqa: E731
        x, row_1xKxLxE, (slot, 0, 0, 0))
    state = {"cache": jax.tree.map(write, state["cache"], cache_1),
             "counts": put(state["counts"], counts_1xV), "seen": put(state["seen"], seen_1xV)}
    return token_1, logits_1xV, sampling.scores(logits_1xV, token_1, top_n, n_valid), state


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _fork(model: GPT, n_valid: int, top_n: int, paths: tuple[bool, bool], state, logits_1xV,
          src, dsts_F, knobs, step_F):
    """Copy slot src's freshly prefilled cache row to slots dsts and draw their first tokens from
    the same prompt logits: the n samples of one request share one prefill."""
    F = dsts_F.shape[0]
    copy = lambda x: x.at[dsts_F].set(jnp.broadcast_to(x[src], (F, *x.shape[1:])))  # noqa: E731
    seen_FxV = jnp.broadcast_to(state["seen"][src], (F, logits_1xV.shape[-1]))
    logits_FxV = jnp.broadcast_to(logits_1xV, seen_FxV.shape)
    token_F = sample_tokens(logits_FxV, knobs, jnp.zeros(seen_FxV.shape, jnp.int32), seen_FxV,
                            step_F, n_valid, paths)
    counts_FxV = jax.nn.one_hot(token_F, seen_FxV.shape[-1], dtype=jnp.int32)
    state = {"cache": jax.tree.map(copy, state["cache"]), "seen": copy(state["seen"]),
             "counts": state["counts"].at[dsts_F].set(counts_FxV)}
    return token_F, sampling.scores(logits_FxV, token_F, top_n, n_valid), state


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(7,))
def _decode(model: GPT, n_valid: int, top_n: int, paths: tuple[bool, bool], steps: int,
            keep_logits: bool, params, state, tokens_B, positions_B, active_B, knobs, step_B):
    """`steps` decode steps in one call: every slot's last token at its position, each new token
    fed back at the next. Per step (stacked on a leading K axis): the tokens, the logits when kept,
    the scores."""
    def one(carry, j):
        state, tokens_B = carry
        logits_Bx1xV, cache = model.apply(params, tokens_B[:, None],
                                          jnp.ones_like(tokens_B)[:, None],
                                          (positions_B + j)[:, None], cache=state["cache"])
        logits_BxV = logits_Bx1xV[:, 0]
        token_B = sample_tokens(logits_BxV, knobs, state["counts"], state["seen"], step_B + j,
                                n_valid, paths)
        counts_BxV = state["counts"] + jax.nn.one_hot(token_B, logits_BxV.shape[-1],
                                                      dtype=jnp.int32) * active_B[:, None]
        state = {"cache": cache, "counts": counts_BxV, "seen": state["seen"]}
        return (state, token_B), (token_B, logits_BxV if keep_logits else None,
                                  sampling.scores(logits_BxV, token_B, top_n, n_valid))

    if steps == 1:  # no loop around a single step
        (state, _), out = one((state, tokens_B), 0)
        return (*jax.tree.map(lambda x: x[None], out), state)
    (state, _), (token_KxB, logits_KxBxV, scores) = jax.lax.scan(one, (state, tokens_B),
                                                                 jnp.arange(steps))
    return token_KxB, logits_KxBxV, scores, state


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
        self.state = {"cache": self.model.init_cache(self.slots),
                      "counts": jnp.zeros((self.slots, V), jnp.int32),
                      "seen": jnp.zeros((self.slots, V), bool)}
        if self.mesh is None:  # committed, as the jitted steps' outputs are: else the first prefill
            # after a decode step sees a differently placed state and compiles again
            self.state = jax.device_put(self.state, jax.devices()[0])
        else:
            axes = {"cache": [{"k": CACHE_AXES, "v": CACHE_AXES}] * self.model.cfg.n_layer,
                    "counts": ("batch", "vocab"), "seen": ("batch", "vocab")}
            specs = jax.tree.map(lambda names: jax.sharding.PartitionSpec(*names), axes,
                                 is_leaf=lambda x: isinstance(x, tuple))
            self.state = jax.device_put(self.state,
                                        sharding.logical_to_mesh(specs, self.state, self.mesh))
        self.slot_request: list[Request | None] = [None] * self.slots
        self.knobs = {name: np.full(self.slots, IDLE_KNOBS[name], dtype)
                      for name, dtype in KNOBS.items()}
        # the n samples of a request
        self.waiting: collections.deque[list[Request]] = collections.deque()

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
            # the cache is full: shift the context
            if request is not None and request.position >= S:
                context = (request.prompt + request.tokens)[-(S // 2):]
                self._prefill(request, context, fresh=False, out=out)
        busy = [r for r in self.slot_request if r is not None]
        if busy:
            tokens, positions, active, steps = (np.zeros(self.slots, np.int32) for _ in range(4))
            for r in busy:
                tokens[r.slot], positions[r.slot] = r.last, r.position
                active[r.slot], steps[r.slot] = 1, len(r.tokens)
            K = 1 if admitted else self._steps(busy)  # a new reply's first tokens out at once
            with self._on_mesh():
                token_KxB, logits_KxBxV, scores, self.state = _decode(
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
        left in the cache and one of them that many tokens to make, else 1 (and 1 in a step that
        admitted a request, so that its first tokens come out at once). A row that ends within the
        call computes the rest for nothing (less than decode_steps tokens); a request submitted
        meanwhile waits for the call's end."""
        K, S = self.decode_steps, self.model.cfg.seq_len
        if K > 1 and all(r.position + K <= S for r in busy) and \
                max(r.params.max_tokens - len(r.tokens) for r in busy) >= K:
            return K
        return 1

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
            token_1, logits_1xV, scores, self.state = _prefill(
                self.model, self.n_valid, self._top_n([request]), self._paths(knobs), self.params,
                self.state, tokens, np.int32(n), np.int32(slot), np.bool_(fresh), knobs,
                np.array([len(request.tokens)], np.int32))
        request.position = n
        self._emit(request, int(token_1[0]), _row(jax.tree.map(np.asarray, scores), 0),
                   np.asarray(logits_1xV[0]) if self.keep_logits else None, out)
        return logits_1xV

    def _fork(self, src: int, group: list[Request], logits_1xV, out) -> None:
        first, rest = group[0], group[1:]
        dsts = np.array([r.slot for r in rest], np.int32)
        knobs = {name: arr[dsts] for name, arr in self.knobs.items()}
        with self._on_mesh():
            token_F, scores, self.state = _fork(
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
