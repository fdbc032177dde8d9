"""Tests for model/quant.py: int8 / int4 weights, their matmul and the engine's weights."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.model import quant
from jaxgpt.model.gpt import GPT


def test_quantize_rounds_each_group_to_its_absmax_and_packs_int4_in_gguf_block_order():
    w_KxN = jnp.asarray([[1.0, -2.0], [0.5, 4.0], [-3.5, 0.0], [7.0, 1.0]])
    q, scale = quant.quantize(w_KxN, "int4", 2)  # -2 / (4/7) rounds to -3: -3.4999998 in fp32
    np.testing.assert_array_equal(scale, np.float32([[1, 4], [7, 1]]) / np.float32(7))
    np.testing.assert_array_equal(np.asarray(q, np.int8), [[7, -3], [3, 7], [-4, 0], [7, 7]])
    packed = quant.pack_int4(q, scale)
    # per group of 2 rows: row 0 in the low nibble, row 1 in the high one
    np.testing.assert_array_equal(np.asarray(packed["q4"]).view(np.uint8),
                                  [[0x37, 0x7D], [0x7C, 0x70]])
    np.testing.assert_array_equal(quant.dequantized(packed),
                                  quant.dequantize(q, scale, jnp.float32))
    q8, scale8 = quant.quantize(w_KxN, "int8", 4)  # one group: per output channel
    np.testing.assert_array_equal(scale8, np.float32([[7, 4]]) / np.float32(127))
    np.testing.assert_array_equal(q8[:, 0], [18, 9, -64, 127])


def _layouts(w_KxN):
    K = w_KxN.shape[0]
    q, scale = quant.quantize(w_KxN, "int4", 16)
    offsets = jnp.linspace(-0.1, 0.1, scale.size).reshape(scale.shape)
    return {"int8_channel": dict(zip(("q", "scale"), quant.quantize(w_KxN, "int8", K),
                                     strict=True)),
            "int8_groups": dict(zip(("q", "scale"), quant.quantize(w_KxN, "int8", 16),
                                    strict=True)),
            "int4": quant.pack_int4(q, scale),
            "int4_min": {**quant.pack_int4(q, scale), "min": offsets}}


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 1024])
@pytest.mark.parametrize("layout", ["int8_channel", "int8_groups", "int4", "int4_min"])
def test_matmul_equals_dequantize_then_matmul(monkeypatch, layout, chunk_bytes):
    monkeypatch.setattr(quant, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    w_KxN = jnp.asarray(rng.normal(size=(64, 26)), jnp.float32)  # 1024 B: 5 + 1 chunks
    x_MxK = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    w = _layouts(w_KxN)[layout]
    want = np.asarray(x_MxK) @ np.asarray(quant.dequantized(w), np.float64)
    np.testing.assert_allclose(quant.matmul(x_MxK, w, jnp.float32), want, rtol=1e-5, atol=1e-5)
    rows = {k: v.T for k, v in w.items()} if "q4" not in w else None
    if rows is not None:  # the tied head's [N, K] rows
        np.testing.assert_allclose(quant.matmul(x_MxK, rows, jnp.float32, rows=True), want,
                                   rtol=1e-5, atol=1e-5)
        tokens = jnp.asarray([[3, 0], [25, 3]])
        np.testing.assert_array_equal(quant.embed(rows, tokens),
                                      np.asarray(quant.dequantized(w)).T[tokens])


def test_int4_rows_embed_and_head_read_their_own_packing():
    w_NxK = jnp.asarray(np.random.default_rng(1).normal(size=(10, 64)), jnp.float32)
    q, scale = quant.quantize(w_NxK.T, "int4", 32)
    cols = quant.pack_int4(q, scale)
    # rows layout: each row's K values packed along the row, GGUF's way
    q_NxGx2xh = np.asarray(q, np.int8).T.reshape(10, 2, 2, 16)
    packed = (q_NxGx2xh[:, :, 0] & 0xF) | (q_NxGx2xh[:, :, 1] << 4)
    rows = {"q4": jnp.asarray(packed.reshape(10, 32)), "scale": scale.T}
    np.testing.assert_array_equal(quant.dequantized(rows, rows=True), quant.dequantized(cols).T)
    np.testing.assert_array_equal(quant.embed(rows, jnp.asarray([4, 9])),
                                  np.asarray(quant.dequantized(cols)).T[[4, 9]])
    x = jnp.ones((1, 64))
    np.testing.assert_allclose(quant.matmul(x, rows, jnp.float32, rows=True),
                               quant.matmul(x, cols, jnp.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_a_quantized_model_runs_as_its_dequantized_weights(preset, weights):
    cfg = ModelConfig(preset=preset, vocab_size=40, n_layer=2, n_head=2, d_model=64,
                      seq_len=16, weights=weights).resolved()
    model = GPT(cfg)
    params = model.init(jax.random.key(0))
    quantized = quant.decode_params(model, params)
    attn = quantized["block_0"]["attn"]["wq"]
    assert "w" not in attn and ("w_q" if weights == "int8" else "w_q4") in attn
    assert quantized["wte_q"].dtype == jnp.int8 and "wte" not in quantized
    if preset == "llama":
        assert quantized["lm_head_q"].dtype == jnp.int8
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    back = quant.float_params(quantized, shapes)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 16)), jnp.int32)
    np.testing.assert_allclose(model.apply(quantized, tokens), model.apply(back, tokens),
                               rtol=1e-4, atol=1e-4)
    error = np.abs(np.asarray(model.apply(back, tokens) - model.apply(params, tokens))).max()
    assert 0 < error < (0.05 if weights == "int8" else 0.2)


def test_float_weights_keep_the_params_cast_to_the_compute_dtype():
    cfg = dataclasses.replace(ModelConfig(vocab_size=40, n_layer=1, n_head=2, d_model=32,
                                          seq_len=8).resolved(), dtype="bfloat16")
    model = GPT(cfg)
    params = model.init(jax.random.key(0))
    kept = quant.decode_params(model, params)
    assert kept["wte"].dtype == jnp.bfloat16 and kept["norm_out"]["scale"].dtype == jnp.float32
    q = quant.decode_params(GPT(dataclasses.replace(cfg, weights="int8")), params)
    assert q["wte_scale"].dtype == jnp.float32 and q["wpe"].dtype == jnp.bfloat16


def test_model_weights_int4_spans_each_group_from_its_min_to_its_max():
    """model.weights=int4: 16 levels per group of 32 rows from its min (stored) to its max, so both
    ends come back exactly and every value within half a level."""
    w_KxN = jnp.asarray(np.random.default_rng(3).normal(size=(64, 5)), jnp.float32)
    w = quant.quantized_matrix(w_KxN, "int4")
    assert w["q4"].shape == (32, 5) and w["scale"].shape == w["min"].shape == (2, 5)
    groups_GxgxN = np.asarray(w_KxN).reshape(2, 32, 5)
    np.testing.assert_array_equal(w["min"], groups_GxgxN.min(axis=1))
    np.testing.assert_allclose(w["scale"], np.ptp(groups_GxgxN, axis=1) / 15, rtol=1e-6)
    back_GxgxN = np.asarray(quant.dequantized(w)).reshape(2, 32, 5)
    np.testing.assert_allclose(back_GxgxN.max(axis=1), groups_GxgxN.max(axis=1), rtol=1e-5)
    assert np.all(np.abs(back_GxgxN - groups_GxgxN) <= np.asarray(w["scale"])[:, None] / 2 + 1e-6)
