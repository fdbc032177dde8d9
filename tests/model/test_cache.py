"""Tests for jaxgpt.model.cache: the cache's size (capacity), resizing it, and decoding against a
cache that grows and shrinks with the same logits as the full forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import model_cfg, tokens

from jaxgpt.model import cache
from jaxgpt.model.gpt import GPT
from jaxgpt.model.kernels import attention


def test_capacity_is_a_power_of_two_from_the_minimum_up_to_the_context():
    assert cache.MIN_CAPACITY == 256
    assert [cache.capacity(n, 8192) for n in (1, 256, 257, 512, 513, 5000, 8192, 9000)] == [
        256, 256, 512, 512, 1024, 8192, 8192, 8192]
    assert cache.capacity(100, 64) == 64  # a context under the minimum: the context
    assert cache.capacity(1, 8192, "whole") == 8192


def test_resize_keeps_the_first_positions_and_pads_with_zeros():
    x = jnp.arange(2 * 1 * 4 * 3, dtype=jnp.float32).reshape(2, 1, 4, 3)
    layers = [{"k": x, "v": x + 1}]
    grown = cache.resize(layers, 6)
    assert grown[0]["k"].shape == (2, 1, 6, 3)
    assert np.array_equal(grown[0]["k"][:, :, :4], x) and not np.any(grown[0]["k"][:, :, 4:])
    cut = cache.resize(grown, 2)
    assert np.array_equal(cut[0]["v"], (x + 1)[:, :, :2])


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_decoding_against_a_resized_cache_gives_the_full_forward_logits(preset):
    """Prefill 20 positions into a 32-long cache, decode to 32, grow it to 64 and decode on, then
    cut it to 48 (every row below that) and decode to 46: each step's logits are the full forward
    pass's."""
    model = GPT(model_cfg(preset, seq_len=64))
    params = model.init(jax.random.key(0))
    ids = tokens(B=2, L=46, seed=3)
    expected = np.asarray(jax.jit(model.apply)(params, ids))
    cached = jax.jit(lambda params, ids, pos, cache: model.apply(params, ids, jnp.ones_like(ids),
                                                                 pos, cache=cache))
    layers = model.init_cache(2, 32)
    pos = jnp.arange(20, dtype=jnp.int32)[None].repeat(2, 0)
    logits, layers = cached(params, ids[:, :20], pos, layers)
    np.testing.assert_allclose(np.asarray(logits), expected[:, :20], atol=1e-5, rtol=1e-5)
    for t in range(20, 46):
        if t == 32:
            layers = cache.resize(layers, 64)
        if t == 40:
            layers = cache.resize(layers, 48)
        logits, layers = cached(params, ids[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), layers)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), expected[:, t], atol=1e-5, rtol=1e-5)
    assert layers[0]["k"].shape[2] == 48


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_step_reads_the_written_blocks_alone_as_full_attention_would(dtype):
    """A row with no keys, one a position into the second block, one further into it: the blocked
    read gives full attention's output, and the positions past the last written block (NaN here)
    are never read."""
    B, H, K, E, C = 3, 4, 2, 8, 4 * cache.READ_BLOCK
    fills = jnp.array([0, cache.READ_BLOCK + 1, cache.READ_BLOCK + 70])
    mask_Bx1xC = (jnp.arange(C)[None] < fills[:, None])[:, None]
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype)
               for i, shape in enumerate([(B, H, 1, E), (B, K, C, E), (B, K, C, E)]))
    read = 2 * cache.READ_BLOCK
    want = attention.attention("cpu", *(x.astype(jnp.float32) for x in (q, k[:, :, :read],
                                                                        v[:, :, :read])),
                               mask_Bx1xC[..., :read])
    k, v = (x.at[:, :, read:].set(jnp.nan) for x in (k, v))
    if dtype == "bfloat16":  # kept as its bits on the CPU (cache.cache_dtype)
        k, v = (jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k, v))
    got = jax.jit(cache.attend_cache, static_argnums=0)("cpu", q, k, v, mask_Bx1xC)
    assert got.dtype == q.dtype
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol)
    assert not np.any(np.asarray(got[0], np.float32))  # no keys: zeros, as attention gives
