"""The KV cache: its layout and dtype, its size, and writing each row's new keys and values in
place.

With a KV cache (C positions per row) each row's new keys and values are written at their absolute
positions (a row's new tokens are contiguous) and the queries attend over the whole cache,
causally: a key at position <= the query's was written by this sequence, at this call or an
earlier one, so nothing else marks which cache entries are valid. C need not be the model's
context: a decoding engine keeps it a power of two above what its rows hold (`capacity`) and
`resize`s it as they grow or end, so its memory and each program it compiles follow the rows'
lengths, not the context a model was trained for; a decode step on the CPU reads only the blocks
of positions the rows have written (`attend_written`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig
from jaxgpt.model.kernels import attention
from jaxgpt.model.kernels.choice import HALF_DTYPES, Kernels

CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # [B, K, C, E], sharded as activations
MIN_CAPACITY = 256  # the fewest positions an engine's cache holds (model.cache_window=chunks)
# a decode step's attention reads the cache in blocks of this many positions, up to the last block
# a row has written (attend_written); a capacity it does not divide is read whole
READ_BLOCK = 128


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


def capacity(need: int, context: int, window: str = "chunks") -> int:
    """The cache length that holds `need` positions: the smallest power of two from MIN_CAPACITY
    up, at most the context; the context itself for window "whole" (model.cache_window). Each
    size is a program of its own, so sizes grow by doubling: a few compiles over a conversation
    (what a step reads is attend_written's)."""
    if window == "whole":
        return context
    return min(context, max(MIN_CAPACITY, 1 << max(0, need - 1).bit_length()))


def resize(cache: list[dict], length: int) -> list[dict]:
    """The cache cut or zero-padded to `length` positions per row (what lies past every row's
    position is never read: the causal mask)."""
    def fit(x_BxKxCxE):
        C = x_BxKxCxE.shape[2]
        if length <= C:
            return x_BxKxCxE[:, :, :length]
        return jnp.pad(x_BxKxCxE, ((0, 0), (0, 0), (0, length - C), (0, 0)))
    return jax.tree.map(fit, cache)


def attend_cache(impl: str, q_BxHxLxE, k_BxKxCxE, v_BxKxCxE, mask_BxLxC) -> jax.Array:
    """Attention over the cache. A half-precision cache held as uint16 bits (cache_dtype) is read
    in fp32: XLA:CPU's half-precision batched dots convert their operands to fp32 anyway."""
    C = k_BxKxCxE.shape[2]
    if impl == "cpu" and q_BxHxLxE.shape[2] == 1 and C > READ_BLOCK and C % READ_BLOCK == 0:
        return attend_written(q_BxHxLxE, k_BxKxCxE, v_BxKxCxE, mask_BxLxC)
    if k_BxKxCxE.dtype == jnp.uint16:
        k_BxKxCxE, v_BxKxCxE = (jax.lax.bitcast_convert_type(x, q_BxHxLxE.dtype).astype(jnp.float32)
                                for x in (k_BxKxCxE, v_BxKxCxE))
        out_BxHxLxE = attention.attention(impl, q_BxHxLxE.astype(jnp.float32), k_BxKxCxE,
                                          v_BxKxCxE, mask_BxLxC)
        return out_BxHxLxE.astype(q_BxHxLxE.dtype)
    return attention.attention(impl, q_BxHxLxE, k_BxKxCxE, v_BxKxCxE, mask_BxLxC)


def _read(x_BxKxCxE, start, dtype) -> jax.Array:
    """READ_BLOCK positions of the cache from `start`, in fp32 (uint16: half-precision bits)."""
    x = jax.lax.dynamic_slice_in_dim(x_BxKxCxE, start, READ_BLOCK, axis=2)
    if x.dtype == jnp.uint16:
        x = jax.lax.bitcast_convert_type(x, dtype)
    return x.astype(jnp.float32)


def attend_written(q_BxHx1xE, k_BxKxCxE, v_BxKxCxE, mask_Bx1xC) -> jax.Array:
    """One new token per row attending over the cache block by block, only up to the last block
    any row has written (an online softmax, as flash-decoding does): a step reads the positions
    in use, not the whole capacity, which may be twice as many (`capacity`). One program for
    every fill, as the loop's length is a value, not a shape."""
    B, H, _, E = q_BxHx1xE.shape
    K, C = k_BxKxCxE.shape[1:3]
    G = H // K
    q_BxKxGxE = q_BxHx1xE.reshape(B, K, G, E).astype(jnp.float32) * E ** -0.5
    mask_BxC = mask_Bx1xC[:, 0]
    written = jnp.max(jnp.where(mask_BxC, jnp.arange(1, C + 1), 0))
    blocks = (written + READ_BLOCK - 1) // READ_BLOCK

    def block(i, carry):
        max_BxKxG, sum_BxKxG, out_BxKxGxE = carry
        start = i * READ_BLOCK
        k_BxKxTxE, v_BxKxTxE = (_read(x, start, q_BxHx1xE.dtype) for x in (k_BxKxCxE, v_BxKxCxE))
        seen_Bx1x1xT = jax.lax.dynamic_slice_in_dim(mask_BxC, start, READ_BLOCK, 1)[:, None, None]
        s_BxKxGxT = jnp.einsum("bkge,bkte->bkgt", q_BxKxGxE, k_BxKxTxE)
        s_BxKxGxT = jnp.where(seen_Bx1x1xT, s_BxKxGxT, attention.NEG_INF)
        new_max_BxKxG = jnp.maximum(max_BxKxG, s_BxKxGxT.max(-1))
        p_BxKxGxT = jnp.where(seen_Bx1x1xT, jnp.exp(s_BxKxGxT - new_max_BxKxG[..., None]), 0.0)
        rescale_BxKxG = jnp.exp(max_BxKxG - new_max_BxKxG)
        out_BxKxGxE = (out_BxKxGxE * rescale_BxKxG[..., None]
                       + jnp.einsum("bkgt,bkte->bkge", p_BxKxGxT, v_BxKxTxE))
        return new_max_BxKxG, sum_BxKxG * rescale_BxKxG + p_BxKxGxT.sum(-1), out_BxKxGxE

    empty = (jnp.full((B, K, G), attention.NEG_INF, jnp.float32), jnp.zeros((B, K, G), jnp.float32),
             jnp.zeros((B, K, G, E), jnp.float32))
    _, sum_BxKxG, out_BxKxGxE = jax.lax.fori_loop(0, blocks, block, empty)
    # a row with no key to attend to (padding) outputs 0, as attention() does
    out_BxKxGxE = out_BxKxGxE / jnp.where(sum_BxKxG > 0, sum_BxKxG, 1.0)[..., None]
    return out_BxKxGxE.reshape(B, H, 1, E).astype(q_BxHx1xE.dtype)
