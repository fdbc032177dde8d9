"""Tests for jaxgpt.model.layers' MLP: each activation is its formula, and SwiGLU's two halves
are multiplied apart."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.model.kernels.choice import choose
from jaxgpt.model.layers import Mlp


def model_cfg(preset="gpt2", **kw) -> ModelConfig:
    base = dict(vocab_size=37, n_layer=2, n_head=4, n_kv_head=2 if preset == "llama" else 0,
                d_model=32, seq_len=16)
    return ModelConfig(preset=preset, **{**base, **kw}).resolved()


def mlp(cfg: ModelConfig) -> Mlp:
    """The MLP layer on this host's kernels, as GPT(cfg) builds it."""
    return Mlp(cfg, choose(cfg))


def test_gelu_exact_is_the_erf_form():
    """mlp=gelu_exact (PyTorch's nn.GELU) and mlp=gelu (GPT-2's tanh form) share params, not
    values."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 32)) * 3, jnp.float32)
    exact, tanh = model_cfg(mlp="gelu_exact"), model_cfg()
    params = nn.meta.unbox(mlp(tanh).init(jax.random.key(0), x))
    params["params"]["w_up"]["w"] *= 50  # pre-activations of order 1, where the two forms differ
    params["params"]["w_down"]["w"] *= 50
    w_up, w_down = params["params"]["w_up"], params["params"]["w_down"]
    h = x @ w_up["w"] + w_up["b"]
    erf_gelu = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))
    np.testing.assert_allclose(np.asarray(mlp(exact).apply(params, x)),
                               np.asarray(erf_gelu @ w_down["w"] + w_down["b"]),
                               rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(mlp(exact).apply(params, x) - mlp(tanh).apply(params, x)).max()) > 1e-3


def test_relu2_is_relu_squared_between_two_matrices():
    """mlp=relu2 (Primer's squared ReLU): relu(x @ w_up + b)^2 @ w_down + b, with gelu's params."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3, 32)), jnp.float32)
    relu2 = model_cfg(mlp="relu2")
    params = nn.meta.unbox(mlp(relu2).init(jax.random.key(0), x))
    gelu_params = nn.meta.unbox(mlp(model_cfg()).init(jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, gelu_params)
    params["params"]["w_up"]["b"] = jnp.full_like(params["params"]["w_up"]["b"], 0.01)
    w_up, w_down = params["params"]["w_up"], params["params"]["w_down"]
    h = np.maximum(np.asarray(x @ w_up["w"] + w_up["b"]), 0) ** 2
    np.testing.assert_allclose(np.asarray(mlp(relu2).apply(params, x)),
                               h @ np.asarray(w_down["w"]) + np.asarray(w_down["b"]),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_is_silu_gate_times_up_with_the_gradient_of_the_formula(bias):
    """mlp=swiglu (llama): silu(x @ w_up[:, 0] + b[0]) * (x @ w_up[:, 1] + b[1]) @ w_down + b, from
    one [D, 2, F] weight whose two halves are multiplied apart (Dense(split=True))."""
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, 32)), jnp.float32)
    cfg = model_cfg("llama", bias=bias)
    params = nn.meta.unbox(mlp(cfg).init(jax.random.key(0), x))
    assert params["params"]["w_up"]["w"].shape == (32, 2, cfg.d_ff)
    if bias:
        assert params["params"]["w_up"]["b"].shape == (2, cfg.d_ff)
        noise = np.random.default_rng(8).standard_normal((2, cfg.d_ff)) * 0.1
        params["params"]["w_up"]["b"] = jnp.asarray(noise, jnp.float32)

    def formula(p, x):
        w_up, w_down = p["params"]["w_up"], p["params"]["w_down"]
        gate, up = (x @ w_up["w"][:, i] + (w_up["b"][i] if bias else 0) for i in range(2))
        return (jax.nn.silu(gate) * up) @ w_down["w"] + (w_down["b"] if bias else 0)

    np.testing.assert_allclose(np.asarray(mlp(cfg).apply(params, x)),
                               np.asarray(formula(params, x)), rtol=1e-5, atol=1e-6)
    loss = lambda fn: jax.grad(lambda p, x: jnp.square(fn(p, x)).sum(), argnums=(0, 1))  # noqa: E731
    for a, b in zip(jax.tree.leaves(loss(mlp(cfg).apply)(params, x)),
                    jax.tree.leaves(loss(formula)(params, x)), strict=False):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the two halves' gradients are written apart: the compiled backward pads no [B, L, 2, F]
    # activation gradient (the weight's own [D, 2, F] gradient is small)
    hlo = jax.jit(loss(mlp(cfg).apply)).lower(params, x).compile().as_text()
    # the weight gradient, as the pattern below writes it
    assert re.search(r"= f32\[32,2,%d\]" % cfg.d_ff, hlo)
    assert not re.search(r"= f32\[2,3,2,%d\]\S* pad\(" % cfg.d_ff, hlo)
