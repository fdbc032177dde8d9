"""The weights a decoding engine multiplies with: the matrices in the compute dtype once (not in
every step), or quantized (model.weights)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_params(model, params) -> dict:
    """params as the engine keeps them. In bf16 a step would otherwise convert 500 MB of fp32
    weights; the model casts them to the compute dtype anyway, so nothing changes."""
    compute = jnp.dtype(model.cfg.dtype)
    return jax.tree.map(lambda x: x.astype(compute)
                        if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x, params)
