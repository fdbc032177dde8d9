"""The KV cache: its layout and dtype, writing each row's new keys and values in place, and
attending over only the part of it that can hold anything.

With a KV cache (S = cfg.seq_len slots per row) each row's new keys and values are written at
their absolute positions (a row's new tokens are contiguous) and the queries attend over the
static cache, causally: a key at position <= the query's was written by this sequence, at this
call or an earlier one, so nothing else marks which cache entries are valid.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig
from jaxgpt.model.kernels import attention
from jaxgpt.model.kernels.choice import HALF_DTYPES, Kernels

CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # [B, K, S, E], sharded as activations
KV_CHUNK = 128  # decoding attends over the cache in multiples of this many positions


def cache_dtype(cfg: ModelConfig, kernels: Kernels):
    """What a KV cache stores: the compute dtype, or on XLA:CPU a half-precision one's 16-bit
    patterns as uint16. XLA:CPU runs a bf16 scatter or dynamic-update-slice by converting the
    whole operand to fp32 and back, so every in-place write would read and write the whole cache;
    on integers it writes in place."""
    if kernels.impl == "cpu" and jnp.dtype(cfg.dtype) in HALF_DTYPES:
        return jnp.uint16
    return cfg.dtype


def write_cache(cache_BxKxSxE, x_BxKxLxE, start_B) -> jax.Array:
    """Each row's new keys (or values) into its cache row from its position on, in place (one
    scatter)."""
    if cache_BxKxSxE.dtype == jnp.uint16:  # half-precision values as their bits (cache_dtype)
        x_BxKxLxE = jax.lax.bitcast_convert_type(x_BxKxLxE, jnp.uint16)
    write = jax.vmap(lambda c_KxSxE, x_KxLxE, p:
                     jax.lax.dynamic_update_slice(c_KxSxE, x_KxLxE, (0, p, 0)))
    return write(cache_BxKxSxE, x_BxKxLxE.astype(cache_BxKxSxE.dtype), start_B)


def attend_cache(impl: str, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS, positions_BxL,
                 window: str = "chunks") -> jax.Array:
    """Attention over a KV cache's first n positions only (window "chunks"): n the smallest
    multiple of KV_CHUNK (or S) above every query's position, so past it the causal mask allows
    nothing anyway; or over all S of them (window "whole", Kernels.cache_window).

    A decode step otherwise reads the whole static cache while the rows hold a few hundred tokens,
    most of a CPU's step. One program holds a branch per n (lax.switch on the largest position),
    so a growing row never recompiles.
    """
    S = k_BxKxSxE.shape[2]
    sizes = [min(S, KV_CHUNK * (i + 1)) for i in range(-(-S // KV_CHUNK))]
    if len(sizes) == 1 or window == "whole":
        return _attend_first(S, impl, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)
    chunk = jnp.minimum(jnp.max(positions_BxL) // KV_CHUNK, len(sizes) - 1)
    return jax.lax.switch(chunk, [functools.partial(_attend_first, n, impl) for n in sizes],
                          q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)


def _attend_first(n, impl, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS) -> jax.Array:
    """Attention over the cache's first n positions."""
    k_BxKxNxE, v_BxKxNxE = k_BxKxSxE[:, :, :n], v_BxKxSxE[:, :, :n]
    if k_BxKxNxE.dtype == jnp.uint16:  # half-precision bits (cache_dtype): XLA:CPU's half-precision
        # batched dots convert their operands to fp32 anyway; fused with the slice, only n positions
        k_BxKxNxE, v_BxKxNxE = (jax.lax.bitcast_convert_type(x, q_BxHxLxE.dtype).astype(jnp.float32)
                                for x in (k_BxKxNxE, v_BxKxNxE))
        out_BxHxLxE = attention.attention(impl, q_BxHxLxE.astype(jnp.float32), k_BxKxNxE,
                                          v_BxKxNxE, mask_BxLxS[..., :n])
        return out_BxHxLxE.astype(q_BxHxLxE.dtype)
    return attention.attention(impl, q_BxHxLxE, k_BxKxNxE, v_BxKxNxE, mask_BxLxS[..., :n])
