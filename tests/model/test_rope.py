"""Tests for jaxgpt.model.rope: the table and per-position forms agree, and the scaled frequencies
are Hugging Face's."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from tiny_models import model_cfg, tokens

from jaxgpt.model.gpt import GPT
from jaxgpt.model.rope import rope, rope_frequencies


def test_rope_from_its_table_equals_rope_per_position():
    """Many positions (training) look sin and cos up in a table, few (a decoding step) compute them:
    the same values to the bit, and a rotation keeps each pair's norm."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 16, 8))
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 20, (2, 16)), jnp.int32)
    inv_freq = 10000.0 ** -(jnp.arange(0, 8, 2) / 8)
    from_table = jax.jit(lambda x, p: rope(x, p, inv_freq, 20))(x, positions)  # 32 positions > 20
    per_position = jax.jit(lambda x, p: rope(x, p, inv_freq, 64))(x, positions)  # 32 <= 64
    assert np.array_equal(np.asarray(from_table), np.asarray(per_position))
    pair_norm = lambda y: np.hypot(*np.split(np.asarray(y), 2, axis=-1))  # noqa: E731
    np.testing.assert_allclose(pair_norm(from_table), pair_norm(x), rtol=1e-5)


def test_rope_frequencies_scaled_linear_and_llama3():
    """theta^(-2i/E) unscaled; linear: each divided by the factor; llama3, by each frequency's turns
    over the original context: past high_freq_factor kept, below low_freq_factor divided, blended
    between."""
    cfg = model_cfg("llama", d_model=64, n_head=4, rope_theta=500.0)  # head dim 16: 8 frequencies
    plain = 500.0 ** -(np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(np.asarray(rope_frequencies(cfg)), plain, rtol=1e-6)
    linear = dataclasses.replace(cfg, rope_scaling="linear", rope_factor=4.0)
    np.testing.assert_allclose(np.asarray(rope_frequencies(linear)), plain / 4, rtol=1e-6)
    llama3 = dataclasses.replace(cfg, rope_scaling="llama3", rope_factor=4.0,
                                 rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                 rope_original_context=64)
    turns = 64 * plain / (2 * math.pi)  # 10.2, 4.7, 2.2, 0.99, 0.46, ...
    assert (turns[:2] > 4).all() and 1 < turns[2] < 4 and (turns[3:] < 1).all()
    blend = (turns[2] - 1) / (4 - 1)
    want = np.concatenate([plain[:2], [plain[2] * (blend + (1 - blend) / 4)], plain[3:] / 4])
    np.testing.assert_allclose(np.asarray(rope_frequencies(llama3)), want, rtol=1e-6)
    # the model rotates by the scaled frequencies (same params, other logits)
    x = tokens(1, 16)
    for scaled in (linear, llama3):
        params = GPT(cfg).init(jax.random.key(0))
        assert not np.allclose(GPT(cfg).apply(params, x), GPT(scaled).apply(params, x))
