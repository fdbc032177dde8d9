"""The tiny decoders the model tests share: a config per preset and random token rows."""
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig

V = 37  # an odd vocabulary: nothing may assume a power of two


def model_cfg(preset="gpt2", **kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2 if preset == "llama" else 0,
                d_model=32, seq_len=16)
    return ModelConfig(preset=preset, **{**base, **kw}).resolved()


def tokens(B=2, L=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, L)), jnp.int32)
