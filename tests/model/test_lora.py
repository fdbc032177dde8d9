"""LoRA adapters and int8 / int4 weights (jaxgpt/model/lora.py) in the decoder's layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import model_cfg, tokens

from jaxgpt.errors import ConfigError
from jaxgpt.model import lora
from jaxgpt.model.gpt import GPT

CASES = [("gpt2", False), ("llama", False), ("llama", True)]  # (preset, scan_layers)


def _model(preset, scan):
    model = GPT(model_cfg(preset, scan_layers=scan))
    return model, model.init(jax.random.key(0))


def _trained_adapters(model, params, rank=4, seed=1):
    """Adapters with b drawn too (fresh ones have b = 0), so the product is not zero."""
    adapters = lora.init_adapters(jax.random.key(seed), params, model.logical_axes, rank)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape)
                      if str(p[-1].key) == "lora_b" else x), adapters)


def _loss(model, params, toks):
    batch = {"inputs": toks, "targets": jnp.roll(toks, -1, 1), "segment_ids": jnp.ones_like(toks),
             "loss_mask": jnp.ones_like(toks)}
    total, count = model.loss(params, batch)
    return total / count


@pytest.mark.parametrize("preset,scan", CASES)
def test_fresh_adapters_leave_the_model_unchanged(preset, scan):
    model, params = _model(preset, scan)
    adapters = lora.init_adapters(jax.random.key(1), params, model.logical_axes, rank=4)
    combined = lora.combine(lora.with_scales(params, adapters, alpha=8.0), adapters)
    np.testing.assert_array_equal(model.apply(combined, tokens()), model.apply(params, tokens()))


@pytest.mark.parametrize("preset,scan", CASES)
def test_adapters_equal_their_merged_weights(preset, scan):
    model, params = _model(preset, scan)
    adapters = _trained_adapters(model, params)
    base = lora.with_scales(params, adapters, alpha=8.0)
    merged = lora.merge(base, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(model.apply(lora.combine(base, adapters), tokens()),
                               model.apply(merged, tokens()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,scan", CASES)
def test_adapter_gradients_equal_those_through_the_merged_weights(preset, scan):
    """The layer's x @ w + s (x @ a) @ b is differentiated as w + s a @ b would be."""
    model, params = _model(preset, scan)
    adapters = _trained_adapters(model, params)
    base = lora.with_scales(params, adapters, alpha=8.0)
    toks = tokens()
    unmerged = jax.grad(lambda a: _loss(model, lora.combine(base, a), toks))(adapters)
    via_merge = jax.grad(lambda a: _loss(model, lora.merge(base, a), toks))(adapters)
    for got, want in zip(jax.tree.leaves(unmerged), jax.tree.leaves(via_merge), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)


def test_default_targets_are_attention_and_mlp_matrices():
    model, params = _model("llama", False)
    adapters = lora.init_adapters(jax.random.key(1), params, model.logical_axes, rank=3)
    names = {lora.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    want = {f"block_{i}/{m}/{k}" for i in range(2)
            for m in ("attn/wq", "attn/wkv", "attn/wo", "mlp/w_up", "mlp/w_down")
            for k in ("lora_a", "lora_b")}
    assert names == want
    cfg = model.cfg  # K x r and r x N of each: wkv maps D to 2 x K x E, w_up D to 2 x F
    a = adapters["block_0"]["attn"]["wkv"]
    assert a["lora_a"].shape == (cfg.d_model, 3)
    assert a["lora_b"].shape == (3, 2 * cfg.n_kv_head * cfg.head_dim)
    assert adapters["block_0"]["mlp"]["w_down"]["lora_a"].shape == (cfg.d_ff, 3)
    assert not np.any(a["lora_b"]) and np.all(np.abs(a["lora_a"]) <= cfg.d_model ** -0.5)


def test_targets_that_match_nothing_are_refused():
    model, params = _model("gpt2", False)
    with pytest.raises(ConfigError, match="matches no weight matrix"):
        lora.init_adapters(jax.random.key(1), params, model.logical_axes, 4, r"nothing/w$")
    with pytest.raises(ConfigError, match="not a regular expression"):
        lora.init_adapters(jax.random.key(1), params, model.logical_axes, 4, "(")


@pytest.mark.parametrize("qtype,qmax", [("int8", 127), ("int4", 7)])
def test_quantize_rounds_each_group_to_its_absmax_scale(qtype, qmax):
    w = jax.random.normal(jax.random.key(0), (64, 5))
    q, scale = lora.quantize(w, qtype, 16)
    assert q.dtype == lora.QTYPES[qtype] and scale.shape == (4, 5)
    np.testing.assert_allclose(scale, np.abs(np.asarray(w)).reshape(4, 16, 5).max(1) / qmax,
                               rtol=1e-6)
    back = lora.dequantize(q, scale, jnp.float32)
    # within half a step of its group's grid, and each group's largest weight exact
    assert np.all(np.abs(back - w) <= np.repeat(scale, 16, axis=0) / 2 + 1e-7)
    np.testing.assert_allclose(np.abs(back).reshape(4, 16, 5).max(1),
                               np.abs(w).reshape(4, 16, 5).max(1), rtol=1e-6)
    assert np.array_equal(np.asarray(lora.quantize(back, qtype, 16)[0], np.int8),
                          np.asarray(q, np.int8))


def test_a_group_that_does_not_divide_the_rows_is_one_group_per_column():
    q, scale = lora.quantize(jnp.ones((24, 3)), "int8", 16)
    assert scale.shape == (1, 3)


@pytest.mark.parametrize("preset,scan", CASES)
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_a_quantized_base_runs_as_its_dequantized_weights(preset, scan, qtype):
    model, params = _model(preset, scan)
    adapters = _trained_adapters(model, params)
    quantized = lora.quantize_tree(params, model.logical_axes, qtype, 8)
    wq = (quantized["blocks"] if scan else quantized["block_0"])["attn"]["wq"]
    assert "w" not in wq and wq["w_q"].dtype == lora.QTYPES[qtype]
    base = lora.with_scales(quantized, adapters, alpha=8.0)
    merged = lora.merge(base, adapters)  # fp32, dequantized
    np.testing.assert_allclose(model.apply(lora.combine(base, adapters), tokens()),
                               model.apply(merged, tokens()), atol=1e-5, rtol=0)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    # and the quantization moved the model, by about its rounding
    drift = np.abs(model.apply(merged, tokens()) - model.apply(lora.merge(
        lora.with_scales(params, adapters, 8.0), adapters), tokens())).max()
    assert 0 < drift < (0.05 if qtype == "int8" else 0.5)
