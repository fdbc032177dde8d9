"""Sampling: a request's settings (SamplingParams), and turning a batch of logits into tokens with
per-row settings inside a jitted loop (temperature, top-k, top-p, min-p, penalties, top log-probs).

The engine (engine.py) holds every slot's settings as arrays of KNOBS, so requests with different
settings share one decode step; rows set to IDLE_KNOBS sample greedily and cost nothing extra.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows
MAX_STOP = 4  # stop strings a request may give, as OpenAI's API allows
MAX_REPETITION_PENALTY = 100.0  # far past any useful value: a logit divided by it is near zero


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1.0: off
    min_p: float = 0.0               # keep tokens with p >= min_p * p_max; 0: off
    seed: int = 0                    # sample i > 0 of n draws with seed_of(seed, i)
    n: int = 1                       # samples of the prompt, sharing its prefill
    stop_ids: tuple[int, ...] = ()   # end the request (the stop id itself is not returned)
    stop: tuple[str, ...] = ()       # stop strings, matched on the text by jaxgpt.replies
    # > 1 discourages every prompt or generated token (CTRL / HF style)
    repetition_penalty: float = 1.0
    # subtracted once from each generated token's logit (OpenAI style)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0   # subtracted per occurrence among the generated tokens
    # also keep the k most likely tokens and their log-probabilities
    top_logprobs: int = 0

    @classmethod
    def from_config(cls, cfg, **overrides) -> "SamplingParams":
        """From a SampleConfig (max_tokens from max_new_tokens, n from num_samples)."""
        fields = dict(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, min_p=cfg.min_p, seed=cfg.seed, n=cfg.num_samples,
                      repetition_penalty=cfg.repetition_penalty,
                      presence_penalty=cfg.presence_penalty,
                      frequency_penalty=cfg.frequency_penalty)
        return cls(**{**fields, **overrides})

    def problem(self, slots: int) -> tuple[str, str] | None:
        """(field, why) for the first out-of-range setting, else None; a server answers it with a
        400."""
        checks = [
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            # OpenAI's documented ranges where it has the field; jaxgpt's own within what their
            # arrays hold (top_k an int32, penalties finite)
            ("temperature", 0 <= self.temperature <= 2, "must be in [0, 2]"),
            ("top_k", 0 <= self.top_k < 2 ** 31, "must be in [0, 2**31) (0: off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("seed", 0 <= self.seed < 2 ** 32, "must be in [0, 2**32)"),
            ("n", 1 <= self.n <= slots, f"must be in [1, {slots}] (the engine's slots)"),
            ("repetition_penalty", 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1: off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            ("stop", len(self.stop) <= MAX_STOP
             and all(isinstance(s, str) and s for s in self.stop),
             f"must be at most {MAX_STOP} non-empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                return name, f"{name}={getattr(self, name)!r} {why}"
        return None


def seed_of(seed: int, sample: int) -> int:
    """The seed of sample i of n: sample 0 keeps the request's seed, so n=1 is the plain case."""
    # ints hash the same in every process
    return seed if sample == 0 else hash((seed, sample)) & 0x7FFFFFFF


KNOBS = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32,
         "seed": np.uint32, "repetition_penalty": np.float32, "presence_penalty": np.float32,
         "frequency_penalty": np.float32}


# An idle slot's knobs: greedy with every filter and penalty off, so that it never makes a step do
# more (a top_p below 1 in any row, even an unused one, sorts the whole vocabulary every step).
IDLE_KNOBS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0,
              "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}

TOP_K_MAX = 64  # a row with 1 <= top_k <= this finds its cutoff among its TOP_K_MAX largest logits


def first_argmax(x_BxV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum) as a max and a min-reduce:
    XLA:CPU runs argmax's (value, index) reduce several times slower than the two reduces."""
    V = x_BxV.shape[-1]
    max_Bx1 = x_BxV.max(-1, keepdims=True)
    return jnp.min(jnp.where(x_BxV == max_Bx1, jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)


def _cutoff(sorted_BxN, k_Bx1, top_p_Bx1, min_p_Bx1) -> jax.Array:
    """The smallest logit each row keeps, from the row's N largest logits in descending order
    (N >= k): the k-th, then the top-p nucleus over those k, then min-p."""
    N = sorted_BxN.shape[-1]
    kth_Bx1 = jnp.take_along_axis(sorted_BxN, k_Bx1 - 1, axis=-1)
    sorted_BxN = jnp.where(jnp.arange(N) < k_Bx1, sorted_BxN, -jnp.inf)
    probs_BxN = jax.nn.softmax(sorted_BxN, axis=-1)
    before_BxN = jnp.cumsum(probs_BxN, axis=-1) - probs_BxN  # keep while the mass before is < top_p
    in_nucleus_BxN = (before_BxN < top_p_Bx1) | (top_p_Bx1 >= 1.0)
    nucleus_Bx1 = jnp.min(jnp.where(in_nucleus_BxN, sorted_BxN, jnp.inf), axis=-1, keepdims=True)
    # p >= min_p * p_max, in logits; log 0 = -inf
    min_p_cut_Bx1 = sorted_BxN[:, :1] + jnp.log(min_p_Bx1)
    return jnp.maximum(jnp.maximum(kth_Bx1, nucleus_Bx1), min_p_cut_Bx1)


def _cutoff_source(top_k, top_p, V: int):
    """Per row (numpy on the host or jax on the device): whether its cutoff lies among the TOP_K_MAX
    largest logits (1 <= top_k <= TOP_K_MAX), and whether it needs the full sort instead (top-k past
    that, or top-p without top-k); neither: min-p alone, or no filter."""
    small = (top_k > 0) & (top_k <= min(TOP_K_MAX, V))
    return small, ~small & (((top_k > 0) & (top_k < V)) | (top_p < 1.0))


def sampling_paths(knobs: dict[str, np.ndarray], V: int) -> tuple[bool, bool]:
    """(some row samples, some sampling row's filter needs the full sort), from the knobs as the
    host holds them: the static arguments that leave out of a step the work no row needs. Decided
    here rather than by a lax.cond on the device, which on a GPU stops the host until the device
    catches up at every step (hardware.branches_sync_host)."""
    sampling = knobs["temperature"] != 0
    _, sort = _cutoff_source(knobs["top_k"], knobs["top_p"], V)
    return bool(sampling.any()), bool((sampling & sort).any())


def filter_logits(logits_BxV: jax.Array, knobs: dict, full_sort: bool = True) -> jax.Array:
    """Each row's logits over its temperature, with what its top-k, top-p (over what top-k kept)
    and min-p leave out at -inf; knobs are [B] arrays named as SamplingParams' fields.

    A row's cutoff depends on its own knobs only, never on the other rows': it is computed one way
    for a given top_k (from lax.top_k when 1 <= top_k <= TOP_K_MAX, else from a full sort of the
    vocabulary, which costs more than the decode step). full_sort=False leaves the sort out, for
    when no row whose result is used needs it (sampling_paths); such rows' results are then
    wrong."""
    B, V = logits_BxV.shape
    col = lambda name: knobs[name][:, None]  # noqa: E731
    scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(col("temperature"), 1e-6)
    top_k_Bx1, top_p_Bx1, min_p_Bx1 = col("top_k"), col("top_p"), col("min_p")
    k_Bx1 = jnp.where(top_k_Bx1 > 0, jnp.minimum(top_k_Bx1, V), V)
    N = min(TOP_K_MAX, V)
    # the rows' ways, as sampling_paths sees them
    small_Bx1, sort_Bx1 = _cutoff_source(top_k_Bx1, top_p_Bx1, V)
    # the barrier keeps XLA from folding the slices below into lax.top_k's sort, which then would
    # no longer be rewritten into XLA:CPU's TopK kernel (it would run as a full sort, 8x slower)
    top_BxN = jax.lax.optimization_barrier(jax.lax.top_k(scaled_BxV, N)[0])
    small_cut_Bx1 = _cutoff(top_BxN, jnp.minimum(k_Bx1, N), top_p_Bx1, min_p_Bx1)
    # neither top-k nor top-p: min-p needs the max alone
    max_cut_Bx1 = top_BxN[:, :1] + jnp.log(min_p_Bx1)
    sort_cut_Bx1 = (_cutoff(-jnp.sort(-scaled_BxV, axis=-1), k_Bx1, top_p_Bx1, min_p_Bx1)
                    if full_sort else jnp.full((B, 1), -jnp.inf))
    cutoff_Bx1 = jnp.where(small_Bx1, small_cut_Bx1, jnp.where(sort_Bx1, sort_cut_Bx1, max_cut_Bx1))
    return jnp.where(scaled_BxV < cutoff_Bx1, -jnp.inf, scaled_BxV)


def penalize(logits_BxV, knobs, counts_BxV, seen_BxV, n_valid: int) -> jax.Array:
    """fp32 logits with padding ids at -inf and the repetition, presence and frequency penalties
    applied (counts: how often each token was generated so far; seen: tokens of the prompt)."""
    V = logits_BxV.shape[-1]
    logits_BxV = jnp.where(jnp.arange(V) < n_valid, logits_BxV.astype(jnp.float32), -jnp.inf)
    rep_Bx1 = knobs["repetition_penalty"][:, None]
    penalized_BxV = jnp.where(logits_BxV > 0, logits_BxV / rep_Bx1, logits_BxV * rep_Bx1)
    logits_BxV = jnp.where(seen_BxV | (counts_BxV > 0), penalized_BxV, logits_BxV)
    return (logits_BxV - knobs["frequency_penalty"][:, None] * counts_BxV
            - knobs["presence_penalty"][:, None] * (counts_BxV > 0))


def sample_tokens(logits_BxV, knobs, counts_BxV, seen_BxV, step_B, n_valid: int,
                  paths: tuple[bool, bool] = (True, True)) -> jax.Array:
    """One token per row under that row's knobs: penalties, then filter_logits; temperature 0 is
    the argmax. Row b's draw uses fold_in(key(seed_b), step_b) alone, whatever the other rows are.
    paths: sampling_paths of the knobs (the default computes every path)."""
    logits_BxV = penalize(logits_BxV, knobs, counts_BxV, seen_BxV, n_valid)
    greedy_B = first_argmax(logits_BxV)
    sampling, full_sort = paths
    if not sampling:
        return greedy_B.astype(jnp.int32)
    # jax.random.categorical's draw (argmax of logits + Gumbel noise)
    keys_B = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(knobs["seed"], step_B)
    gumbel_BxV = jax.vmap(lambda key: jax.random.gumbel(key, logits_BxV.shape[-1:],
                                                         jnp.float32))(keys_B)
    sampled_B = first_argmax(filter_logits(logits_BxV, knobs, full_sort) + gumbel_BxV)
    return jnp.where(knobs["temperature"] == 0, greedy_B, sampled_B).astype(jnp.int32)


def scores(logits_BxV, token_B, top_n: int, n_valid: int):
    """The model's log-probability of each chosen token (raw logits: no temperature, penalties or
    filtering, as OpenAI reports them) and, with top_n, the top_n most likely (ids, logprobs)."""
    V = logits_BxV.shape[-1]
    logprobs_BxV = jax.nn.log_softmax(jnp.where(jnp.arange(V) < n_valid,
                                                logits_BxV.astype(jnp.float32), -jnp.inf))
    chosen_B = jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
    if not top_n:
        return chosen_B, None
    top_BxN, ids_BxN = jax.lax.top_k(logprobs_BxV, top_n)
    return chosen_B, (ids_BxN, top_BxN)
