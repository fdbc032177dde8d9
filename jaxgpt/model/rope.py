"""Rotary position embedding (RoPE): each pair of a head's dims turned by an angle that grows with
the token's position, at the frequencies of Hugging Face's rope types (none, linear, llama3)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxgpt.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """RoPE's angle per position for each pair of a head's dims: theta^(-2i/E), stretched as
    cfg.rope_scaling says (Hugging Face's linear and llama3 rope types give the same values)."""
    E = cfg.head_dim
    inv_freq_E2 = cfg.rope_theta ** -(jnp.arange(0, E, 2, dtype=jnp.float32) / E)
    if cfg.rope_scaling == "linear":  # positions p read as p / factor
        return inv_freq_E2 / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        # turns of each frequency over the pretraining context: past high_freq_factor turns it is
        # kept, below low_freq_factor divided by the factor (stretched), blended between
        turns_E2 = cfg.rope_original_context / (2 * math.pi / inv_freq_E2)
        kept_E2 = jnp.clip((turns_E2 - cfg.rope_low_freq_factor)
                           / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor), 0.0, 1.0)
        return (1 - kept_E2) * inv_freq_E2 / cfg.rope_factor + kept_E2 * inv_freq_E2
    return inv_freq_E2


def rope(x_BxHxLxE: jax.Array, positions_BxL: jax.Array, inv_freq_E2: jax.Array,
         length: int) -> jax.Array:
    """Rotary position embedding, rotating the two halves of each head (the GPT-NeoX layout) by
    position * inv_freq (rope_frequencies), for positions below `length`. When the rows hold more
    positions than that (training), sin and cos come from a [length, E/2] table looked up by
    position: computed per (row, position), XLA:CPU fused them into every head's rotation and into
    the backward pass again, a large share of a small model's step. A decoding step's few positions
    are cheaper than a table of the whole context. Both give the same values: sin and cos of
    float32(position) * inv_freq."""
    if positions_BxL.size > length:
        angles_TxE2 = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_E2
        sin_Bx1xLxE2, cos_Bx1xLxE2 = (table[positions_BxL][:, None]
                                      for table in (jnp.sin(angles_TxE2), jnp.cos(angles_TxE2)))
    else:
        angles_Bx1xLxE2 = positions_BxL[:, None, :, None].astype(jnp.float32) * inv_freq_E2
        sin_Bx1xLxE2, cos_Bx1xLxE2 = jnp.sin(angles_Bx1xLxE2), jnp.cos(angles_Bx1xLxE2)
    x1, x2 = jnp.split(x_BxHxLxE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_Bx1xLxE2 - x2 * sin_Bx1xLxE2,
                           x2 * cos_Bx1xLxE2 + x1 * sin_Bx1xLxE2], axis=-1)
    return out.astype(x_BxHxLxE.dtype)
