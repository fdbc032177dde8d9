"""Generation against a KV cache: a fixed set of slots decoding together (continuous batching).

    engine = Engine(model, params, tokenizer, slots=4)
    rid = engine.submit(prompt_ids, SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=64))
    while engine.busy:
        for rid, new_ids in engine.step().items(): ...
    engine.generate([prompt_a, prompt_b], SamplingParams(temperature=0))  # -> [ids_a, ids_b]

The cache is static: per layer k, v of [slots, K, S, E] (S = cfg.seq_len). A prompt is prefilled
into one free slot (its length padded to a power-of-two bucket, so a few compiles serve every
length); one decode step then feeds every busy slot's last token at that slot's own position,
with the cache donated. Sampling runs inside the jitted step on per-slot arrays, so requests with
different settings share the step; a request's i-th token is drawn with fold_in(key(seed), i),
which makes its reply independent of what else is in the batch. A finished request frees its slot
at once, and the next step admits a waiting one. When a sequence fills the cache (S tokens) it is
re-prefilled from its last S // 2 tokens (a context shift) and goes on.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.model import GPT

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1.0: off
    min_p: float = 0.0               # keep tokens with p >= min_p * p_max; 0: off
    seed: int = 0
    stop_ids: tuple[int, ...] = ()   # end the request (the stop id itself is not returned)
    repetition_penalty: float = 1.0  # > 1 discourages every prompt or generated token (CTRL / HF style)
    presence_penalty: float = 0.0    # subtracted once from each generated token's logit (OpenAI style)
    frequency_penalty: float = 0.0   # subtracted per occurrence among the generated tokens

    @classmethod
    def from_config(cls, cfg, **overrides) -> "SamplingParams":
        """From a SampleConfig (max_tokens from max_new_tokens)."""
        fields = dict(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, min_p=cfg.min_p, seed=cfg.seed,
                      repetition_penalty=cfg.repetition_penalty, presence_penalty=cfg.presence_penalty,
                      frequency_penalty=cfg.frequency_penalty)
        return cls(**{**fields, **overrides})


KNOBS = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32,
         "seed": np.uint32, "repetition_penalty": np.float32, "presence_penalty": np.float32,
         "frequency_penalty": np.float32}


def sample_tokens(logits_BxV, knobs, counts_BxV, seen_BxV, step_B, n_valid: int) -> jax.Array:
    """One token per row under that row's knobs ([B] arrays named as SamplingParams' fields).

    counts: how often each token was generated so far; seen: tokens of the prompt. Order: penalties,
    then temperature, top-k, top-p over what top-k kept, min-p; temperature 0 is the argmax.
    """
    B, V = logits_BxV.shape
    col = lambda name: knobs[name][:, None]  # noqa: E731
    logits_BxV = logits_BxV.astype(jnp.float32)
    logits_BxV = jnp.where(jnp.arange(V) < n_valid, logits_BxV, -jnp.inf)
    rep = col("repetition_penalty")
    penalized_BxV = jnp.where(logits_BxV > 0, logits_BxV / rep, logits_BxV * rep)
    logits_BxV = jnp.where(seen_BxV | (counts_BxV > 0), penalized_BxV, logits_BxV)
    logits_BxV = (logits_BxV - col("frequency_penalty") * counts_BxV
                  - col("presence_penalty") * (counts_BxV > 0))
    greedy_B = jnp.argmax(logits_BxV, axis=-1)

    scaled_BxV = logits_BxV / jnp.maximum(col("temperature"), 1e-6)
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
    k_Bx1 = jnp.where(col("top_k") > 0, jnp.minimum(col("top_k"), V), V)
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, k_Bx1 - 1, axis=-1)
    sorted_BxV = jnp.where(jnp.arange(V) < k_Bx1, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # keep while the mass before is < top_p
    nucleus_Bx1 = jnp.min(jnp.where((before_BxV < col("top_p")) | (col("top_p") >= 1.0), sorted_BxV, jnp.inf),
                          axis=-1, keepdims=True)
    min_p_Bx1 = sorted_BxV[:, :1] + jnp.log(col("min_p"))  # p >= min_p * p_max, in logits; log 0 = -inf
    cutoff_Bx1 = jnp.maximum(jnp.maximum(kth_Bx1, nucleus_Bx1), min_p_Bx1)
    filtered_BxV = jnp.where(scaled_BxV < cutoff_Bx1, -jnp.inf, scaled_BxV)
    keys_B = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(knobs["seed"], step_B)
    sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV)
    return jnp.where(knobs["temperature"] == 0, greedy_B, sampled_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _prefill(model: GPT, n_valid: int, params, state, tokens_1xL, length, slot, fresh, knobs, step_1):
    """Prompt tokens[:length] into cache row `slot` (from position 0); the first new token."""
    L = tokens_1xL.shape[1]
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)  # noqa: E731
    put = lambda x, row: jax.lax.dynamic_update_slice_in_dim(x, row, slot, axis=0)  # noqa: E731
    segments_1xL = (jnp.arange(L) < length).astype(jnp.int32)[None]
    positions_1xL = jnp.arange(L, dtype=jnp.int32)[None]
    logits_1xLxV, cache_1 = model.apply(params, tokens_1xL, segments_1xL, positions_1xL,
                                        cache=jax.tree.map(take, state["cache"]))
    logits_1xV = jax.lax.dynamic_index_in_dim(logits_1xLxV, length - 1, axis=1, keepdims=False)
    V = logits_1xV.shape[-1]
    # a fresh request starts its penalty counts; a context shift keeps them
    prompt_1xV = jnp.zeros((1, V), bool).at[0, tokens_1xL[0]].max(segments_1xL[0] > 0)
    seen_1xV = jnp.where(fresh, prompt_1xV, take(state["seen"]))
    counts_1xV = jnp.where(fresh, 0, take(state["counts"]))
    token_1 = sample_tokens(logits_1xV, knobs, counts_1xV, seen_1xV, step_1, n_valid)
    counts_1xV = counts_1xV + jax.nn.one_hot(token_1, V, dtype=jnp.int32)
    state = {"cache": jax.tree.map(put, state["cache"], cache_1), "counts": put(state["counts"], counts_1xV),
             "seen": put(state["seen"], seen_1xV)}
    return token_1, logits_1xV, state


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode(model: GPT, n_valid: int, params, state, tokens_B, positions_B, active_B, knobs, step_B):
    """Every slot's last token at its position; the next token of each slot."""
    logits_Bx1xV, cache = model.apply(params, tokens_B[:, None], jnp.ones_like(tokens_B)[:, None],
                                      positions_B[:, None], cache=state["cache"])
    logits_BxV = logits_Bx1xV[:, 0]
    token_B = sample_tokens(logits_BxV, knobs, state["counts"], state["seen"], step_B, n_valid)
    counts_BxV = state["counts"] + jax.nn.one_hot(token_B, logits_BxV.shape[-1], dtype=jnp.int32) * active_B[:, None]
    return token_B, logits_BxV, {"cache": cache, "counts": counts_BxV, "seen": state["seen"]}


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated, stop id excluded
    finish_reason: str | None = None                             # "stop" | "length"
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)  # with keep_logits: one per token
    slot: int | None = None
    position: int = 0    # where the last sampled token will be written in the cache
    last: int = 0        # the last sampled token, fed at the next decode step


class Engine:
    def __init__(self, model: GPT, params, tokenizer=None, slots: int = 4, keep_logits: bool = False):
        if model.cfg.scan_layers:
            raise NotImplementedError("the generation engine needs model.scan_layers=false")
        self.model, self.params, self.slots, self.keep_logits = model, params, slots, keep_logits
        V = model.cfg.vocab_size
        self.n_valid = min(V, tokenizer.n_vocab) if tokenizer is not None else V  # never sample padding ids
        self.state = {"cache": model.init_cache(slots), "counts": jnp.zeros((slots, V), jnp.int32),
                      "seen": jnp.zeros((slots, V), bool)}
        self.knobs = {name: np.zeros(slots, dtype) for name, dtype in KNOBS.items()}
        self.slot_request: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.requests: dict[int, Request] = {}
        self._next_id = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slot_request)

    def submit(self, prompt_ids, params: SamplingParams = SamplingParams()) -> int:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("an empty prompt: give at least one token (e.g. the end-of-text id)")
        request = Request(self._next_id, prompt, params)
        self._next_id += 1
        self.requests[request.id] = request
        if params.max_tokens <= 0:
            request.finish_reason = "length"
        else:
            self.waiting.append(request)
        return request.id

    def step(self) -> dict[int, list[int]]:
        """Admit waiting requests into free slots, then one decode step: {request id: new tokens}."""
        out: dict[int, list[int]] = {}
        S = self.model.cfg.seq_len
        for slot in range(self.slots):
            if self.slot_request[slot] is None and self.waiting:
                request = self.waiting.popleft()
                request.slot = slot
                self.slot_request[slot] = request
                for name in KNOBS:
                    self.knobs[name][slot] = getattr(request.params, name)
                self._prefill(request, request.prompt[-S:], fresh=True, out=out)
        for request in self.slot_request:
            if request is not None and request.position >= S:  # the cache is full: shift the context
                context = (request.prompt + request.tokens)[-(S // 2):]
                self._prefill(request, context, fresh=False, out=out)
        busy = [r for r in self.slot_request if r is not None]
        if busy:
            tokens, positions, active, steps = (np.zeros(self.slots, np.int32) for _ in range(4))
            for r in busy:
                tokens[r.slot], positions[r.slot], active[r.slot], steps[r.slot] = r.last, r.position, 1, len(r.tokens)
            token_B, logits_BxV, self.state = _decode(self.model, self.n_valid, self.params, self.state, tokens,
                                                      positions, active, self.knobs, steps)
            token_B = np.asarray(token_B)
            logits_BxV = np.asarray(logits_BxV) if self.keep_logits else None
            for r in busy:
                r.position += 1
                self._emit(r, int(token_B[r.slot]), None if logits_BxV is None else logits_BxV[r.slot], out)
        return out

    def _prefill(self, request: Request, context: list[int], fresh: bool, out) -> None:
        n = len(context)
        bucket = min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), self.model.cfg.seq_len)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = context
        slot = request.slot
        knobs = {name: arr[slot:slot + 1] for name, arr in self.knobs.items()}
        token_1, logits_1xV, self.state = _prefill(self.model, self.n_valid, self.params, self.state, tokens,
                                                   np.int32(n), np.int32(slot), np.bool_(fresh), knobs,
                                                   np.array([len(request.tokens)], np.int32))
        request.position = n
        self._emit(request, int(token_1[0]), np.asarray(logits_1xV[0]) if self.keep_logits else None, out)

    def _emit(self, request: Request, token: int, logits_V, out) -> None:
        if logits_V is not None:
            request.logits.append(logits_V)
        if token in request.params.stop_ids:
            request.finish_reason = "stop"
        else:
            request.tokens.append(token)
            request.last = token
            out.setdefault(request.id, []).append(token)
            if len(request.tokens) >= request.params.max_tokens:
                request.finish_reason = "length"
        if request.finish_reason is not None:  # free the slot at once
            self.slot_request[request.slot] = None
            request.slot = None

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[list[int]]:
        """The generated ids of each prompt (stop ids excluded), stepping until all are done."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        while any(self.requests[i].finish_reason is None for i in ids):
            self.step()
        return [self.requests.pop(i).tokens for i in ids]
