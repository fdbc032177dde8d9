"""Tests for jaxgpt.model.cache: decoding against the KV cache, read by chunks or whole."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import model_cfg, tokens

from jaxgpt.model.gpt import GPT


@pytest.mark.parametrize("window", ["chunks", "whole"])
def test_decoding_reads_the_cache_by_chunks_or_whole_with_the_same_logits(window):
    """model.cache_window: past a KV_CHUNK (128) boundary and before it, decoding against the cache
    gives the full forward pass's logits either way; only "chunks" branches (a lax.switch on the
    largest position), which a GPU pays for with a host sync per layer."""
    model = GPT(model_cfg("llama", seq_len=256, cache_window=window))
    params = model.init(jax.random.key(0))
    ids = tokens(B=2, L=200, seed=3)
    expected = np.asarray(jax.jit(model.apply)(params, ids))
    cached = jax.jit(lambda params, ids, pos, cache: model.apply(params, ids, jnp.ones_like(ids),
                                                                 pos, cache=cache))
    cache = model.init_cache(2)
    pos = jnp.arange(100, dtype=jnp.int32)[None].repeat(2, 0)
    logits, cache = cached(params, ids[:, :100], pos, cache)
    np.testing.assert_allclose(np.asarray(logits), expected[:, :100], atol=1e-5, rtol=1e-5)
    for t in range(100, 200):  # the window grows past 128 at t = 128
        logits, cache = cached(params, ids[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), expected[:, t], atol=1e-5, rtol=1e-5)
    step = jax.make_jaxpr(cached)(params, ids[:, :1], jnp.full((2, 1), 150, jnp.int32), cache)
    assert (" cond[" in str(step)) == (window == "chunks")
