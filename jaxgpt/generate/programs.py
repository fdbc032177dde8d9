"""The engine's jitted programs: a prompt's prefill (compiled per prompt bucket), placing its row
into a slot, resizing the cache, forking a prefilled row into the n samples' slots, and a call of
decode steps (compiled per cache size). Each takes the model and the sampling paths as static
arguments and the engine's state (the cache, per-slot penalty counts and seen tokens) donated."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt.generate import sampling
from jaxgpt.generate.sampling import sample_tokens
from jaxgpt.model import cache as cache_lib
from jaxgpt.model.gpt import GPT


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def prefill(model: GPT, n_valid: int, top_n: int, paths: tuple[bool, bool], params, seen_SxV,
             counts_SxV, tokens_1xL, length, slot, fresh, knobs, step_1):
    """Prompt tokens[:length] as if in cache row `slot`: its L-long cache row (from position 0),
    the slot's penalty counts after it and the first new token. Compiled per prompt bucket L
    alone, whatever the cache's size: `place` writes the row in."""
    L = tokens_1xL.shape[1]
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)  # noqa: E731
    segments_1xL = (jnp.arange(L) < length).astype(jnp.int32)[None]
    positions_1xL = jnp.arange(L, dtype=jnp.int32)[None]
    # The prompt starts at position 0, so it attends over a fresh L-long cache. (Taking the slot's
    # row out of the donated cache and putting it back made XLA copy the whole cache twice.)
    logits_1xLxV, cache_1 = model.apply(params, tokens_1xL, segments_1xL, positions_1xL,
                                        cache=model.init_cache(1, L))
    logits_1xV = jax.lax.dynamic_index_in_dim(logits_1xLxV, length - 1, axis=1, keepdims=False)
    V = logits_1xV.shape[-1]
    # a fresh request starts its penalty counts; a context shift keeps them
    prompt_1xV = jnp.zeros((1, V), bool).at[0, tokens_1xL[0]].max(segments_1xL[0] > 0)
    seen_1xV = jnp.where(fresh, prompt_1xV, take(seen_SxV))
    counts_1xV = jnp.where(fresh, 0, take(counts_SxV))
    token_1 = sample_tokens(logits_1xV, knobs, counts_1xV, seen_1xV, step_1, n_valid, paths)
    counts_1xV = counts_1xV + jax.nn.one_hot(token_1, V, dtype=jnp.int32)
    row = {"cache": cache_1, "counts": counts_1xV, "seen": seen_1xV}
    return token_1, logits_1xV, sampling.scores(logits_1xV, token_1, top_n, n_valid), row


@functools.partial(jax.jit, donate_argnums=(0,))
def place(state, row, slot):
    """A prefilled row (cache from position 0, counts, seen) into slot `slot` of the state."""
    put = lambda x, row_1: jax.lax.dynamic_update_slice(  # noqa: E731
        x, row_1.astype(x.dtype), (slot,) + (0,) * (x.ndim - 1))
    return jax.tree.map(put, state, row)


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(0,))
def resize(state, length: int):
    return {**state, "cache": cache_lib.resize(state["cache"], length)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def fork(model: GPT, n_valid: int, top_n: int, paths: tuple[bool, bool], state, logits_1xV,
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
def decode(model: GPT, n_valid: int, top_n: int, paths: tuple[bool, bool], steps: int,
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
