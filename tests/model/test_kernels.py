"""Tests for jaxgpt.model.kernels: every implementation that runs on a CPU against textbook forms,
and the switch."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import hardware
from jaxgpt.config import ModelConfig
from jaxgpt.errors import ConfigError
from jaxgpt.model.gpt import GPT
from jaxgpt.model.kernels import attention, choice, head_loss, matmul, norm

IMPLS = ["cpu", "xla"]  # what runs on a CPU; "auto" resolves to "cpu" there (test_resolve_on_cpu)


def reference_attention(q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS):
    """fp32 softmax attention with kv heads repeated and -inf masking; rows with no key output 0."""
    G = q_BxHxLxE.shape[1] // k_BxKxSxE.shape[1]
    k_BxHxSxE, v_BxHxSxE = jnp.repeat(k_BxKxSxE, G, axis=1), jnp.repeat(v_BxKxSxE, G, axis=1)
    scores_BxHxLxS = (jnp.einsum("bhle,bhse->bhls", q_BxHxLxE, k_BxHxSxE)
                      / np.sqrt(q_BxHxLxE.shape[-1]))
    has_keys_BxLx1 = mask_BxLxS.any(-1, keepdims=True)
    # a row with no key may attend to all (no NaN in its softmax, nor in the gradients), then is
    # zeroed
    mask_Bx1xLxS = (mask_BxLxS | ~has_keys_BxLx1)[:, None]
    probs_BxHxLxS = jax.nn.softmax(jnp.where(mask_Bx1xLxS, scores_BxHxLxS, -jnp.inf), axis=-1)
    out_BxHxLxE = jnp.einsum("bhls,bhse->bhle", probs_BxHxLxS, v_BxHxSxE)
    return jnp.where(has_keys_BxLx1[:, None], out_BxHxLxE, 0.0)


def packed_mask(segments, positions):
    """Causal within a segment, never onto segment 0 (padding): the mask model.py builds."""
    seg_BxL, pos_BxL = np.asarray(segments), np.asarray(positions)
    same = seg_BxL[:, :, None] == seg_BxL[:, None, :]
    causal = pos_BxL[:, :, None] >= pos_BxL[:, None, :]
    return jnp.asarray(same & causal & (seg_BxL[:, None, :] != 0))


# Two documents then padding in one row, a single document in the other.
SEGMENTS = [[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
POSITIONS = [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
PAD_ROW, PAD_POSITIONS = 0, slice(5, 7)


def test_packed_mask_is_the_models_mask():
    from jaxgpt.model.gpt import attention_mask, positions_from_segments
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    pos = positions_from_segments(seg)
    np.testing.assert_array_equal(np.asarray(pos), POSITIONS)
    np.testing.assert_array_equal(np.asarray(attention_mask(seg, pos, seg, pos)),
                                  np.asarray(packed_mask(SEGMENTS, POSITIONS)))


def qkv_and_cotangent(H, K, L, S, E=8, seed=0):
    rng = np.random.default_rng(seed)
    B = len(SEGMENTS)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32)
            for s in [(B, H, L, E), (B, K, S, E), (B, K, S, E), (B, H, L, E)]]


def values_and_grads(fn, q, k, v, mask, dout):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return (out, *vjp(dout))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_matches_reference_on_packed_rows_with_padding(impl, K):
    """Values and q, k, v gradients, with K kv heads serving H = 4 query heads."""
    L = len(SEGMENTS[0])
    q, k, v, dout = qkv_and_cotangent(4, K, L, L)
    mask = packed_mask(SEGMENTS, POSITIONS)
    got = jax.jit(values_and_grads, static_argnums=0)(lambda *a: attention.attention(impl, *a),
                                                      q, k, v, mask, dout)
    want = values_and_grads(reference_attention, q, k, v, mask, dout)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=False):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)
    out, dq, dk, dv = (np.asarray(x[PAD_ROW]) for x in got)
    # padding queries output exactly 0 and move nothing; padding keys are attended by no one
    assert np.all(out[:, PAD_POSITIONS] == 0) and np.all(dq[:, PAD_POSITIONS] == 0)
    assert np.all(dk[:, PAD_POSITIONS] == 0) and np.all(dv[:, PAD_POSITIONS] == 0)
    assert np.abs(out[:, :5]).min() > 0  # while the real tokens' outputs are not zero


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_attention_without_a_mask_is_the_causal_mask(impl):
    """No mask with causal=True (rows of one document): the values and gradients of the lower-
    triangular mask, bit for bit on cpu; no mask without causal is refused."""
    L = len(SEGMENTS[0])
    q, k, v, dout = qkv_and_cotangent(4, 2, L, L, seed=3)
    tril = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (len(SEGMENTS), L, L))
    got = values_and_grads(lambda *a: attention.attention(impl, *a[:3], None, causal=True),
                           q, k, v, None, dout)
    want = values_and_grads(lambda *a: attention.attention(impl, *a, causal=True),
                            q, k, v, tril, dout)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=False):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0 if impl == "cpu" else 1e-6,
                                   atol=0 if impl == "cpu" else 1e-6, err_msg=name)
    with pytest.raises(ValueError, match="causal"):
        attention.attention(impl, q, k, v, None)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_with_fewer_queries_than_keys(impl):
    """Decoding against a KV cache: L new queries, S cached keys, an arbitrary mask, one empty
    row."""
    L, S = 3, 7
    q, k, v, dout = qkv_and_cotangent(4, 2, L, S, seed=1)
    mask = jnp.asarray(np.random.default_rng(2).random((2, L, S)) < 0.6).at[1, 2].set(False)
    got = jax.jit(values_and_grads, static_argnums=0)(lambda *a: attention.attention(impl, *a),
                                                      q, k, v, mask, dout)
    want = values_and_grads(reference_attention, q, k, v, mask, dout)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=False):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)
    assert np.all(np.asarray(got[0][1, :, 2]) == 0) and np.all(np.asarray(got[1][1, :, 2]) == 0)


def plain_normalize(x, scale, bias, eps, center):
    if center:
        x = x - x.mean(-1, keepdims=True)
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale + bias


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
def test_normalize_matches_plain_jnp(impl, center):
    rng = np.random.default_rng(3)
    x, dy = (jnp.asarray(rng.standard_normal((3, 5, 16)) * 2 + 1, jnp.float32) for _ in range(2))
    scale, bias = (jnp.asarray(rng.standard_normal(16), jnp.float32) for _ in range(2))
    def with_grads(fn):
        y, vjp = jax.vjp(lambda x, s, b: fn(x, s, b, 1e-5, center), x, scale, bias)
        return (y, *vjp(dy))

    got = with_grads(lambda *a: norm.normalize(impl, *a))
    want = with_grads(plain_normalize)
    for name, g, w in zip(["y", "dx", "dscale", "dbias"], got, want, strict=False):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
def test_normalize_off_the_cpu_keeps_the_row_statistics_for_the_backward_pass(center):
    """xla: the backward pass gets x and each row's mean and 1/std (mean and mean square in one read
    of x), never a normalized copy of x; the values hold where the mean is far from 0 (mean 20,
    std 1)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)) + 20, jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(16), jnp.float32) for _ in range(2))
    y, vjp = jax.vjp(lambda x, s, b: norm.normalize("xla", x, s, b, 1e-5, center), x, scale, bias)
    kept = sorted(leaf.shape for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape"))
    assert kept == sorted([(3, 5, 1), (3, 5, 1), (3, 5, 16), (16,)])
    assert any(leaf is x for leaf in jax.tree.leaves(vjp))  # x itself, not a copy made from it
    np.testing.assert_allclose(np.asarray(y),
                               np.asarray(plain_normalize(x, scale, bias, 1e-5, center)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(6, 4, 9), (6, 9, 4)], ids=["wide", "tall"])
def test_matmul_matches_plain_jnp(impl, shape):
    """Both orientations of the cpu weight gradient (K <= N and K > N) equal x^T dy."""
    M, K, N = shape
    rng = np.random.default_rng(4)
    x, w, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(M, K), (K, N), (M, N)])
    y, vjp = jax.vjp(lambda x, w: matmul.matmul(impl, x, w), x, w)
    dx, dw = vjp(dy)
    for name, g, want in [("y", y, x @ w), ("dx", dx, dy @ w.T), ("dw", dw, x.T @ dy)]:
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6, atol=1e-6,
                                   err_msg=name)


def bf16_round(*xs):
    return [x.astype(jnp.bfloat16) for x in xs]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(64, 16, 48), (64, 48, 16)], ids=["wide", "tall"])
def test_half_matmul_is_the_fp32_product_of_rounded_inputs(impl, shape):
    """bf16 inputs, fp32 out: each product is the fp32 product of the rounded operands, the
    gradients returned in the inputs' dtype (so within bf16 rounding of that product: sums of 16-48
    terms of size 1 here)."""
    M, K, N = shape
    rng = np.random.default_rng(5)
    x, w, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(M, K), (K, N), (M, N)])
    xh, wh, dyh = bf16_round(x, w, dy)
    y, vjp = jax.vjp(lambda x, w: matmul.matmul(impl, x, w, jnp.float32), xh, wh)
    dx, dw = vjp(dy)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    assert y.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16
    for name, got, want in [("y", y, f32(xh) @ f32(wh)), ("dx", dx, f32(dyh) @ f32(wh).T),
                            ("dw", dw, f32(xh).T @ f32(dyh))]:
        np.testing.assert_allclose(f32(got), want, rtol=2e-2, atol=5e-2, err_msg=name)


def compiled_dots(fn, *args) -> list[str]:
    """The operand types of every dot XLA:CPU compiled fn's gradient into."""
    grad = jax.grad(lambda *a: jnp.square(fn(*a).astype(jnp.float32)).sum(),
                    argnums=tuple(range(len(args))))
    hlo = jax.jit(grad).lower(*args).compile().as_text()
    params = dict(re.findall(r"%(\S+) = (\w+)\[[^\]]*\]\S* parameter", hlo))
    return [params.get(a, "?") + "," + params.get(b, "?")
            for a, b in re.findall(r" dot\(%([^,\s]+), %([^)\s]+)\)", hlo)]


def test_half_matmul_and_attention_backwards_stay_in_bf16_on_cpu():
    """XLA:CPU converts a bf16 product to fp32 unless its left operand is contracted on its last
    axis: the cpu backwards are written so that none of them is (weight gradients included)."""
    rng = np.random.default_rng(6)
    x, w = bf16_round(*(jnp.asarray(rng.standard_normal(s), jnp.float32)
                        for s in [(256, 64), (64, 96)]))
    dots = compiled_dots(lambda x, w: matmul.matmul("cpu", x, w, jnp.float32), x, w)
    assert len(dots) == 3 and set(dots) == {"bf16,bf16"}, dots
    q, k, v, _ = qkv_and_cotangent(4, 2, 64, 64)
    mask = jnp.tril(jnp.ones((2, 64, 64), bool))
    dots = compiled_dots(lambda q, k, v: attention.attention("cpu", q, k, v, mask),
                         *bf16_round(q, k, v))
    assert len(dots) == 6 and set(dots) == {"bf16,bf16"}, dots


def test_xla_half_matmul_backward_multiplies_half_precision_operands():
    """The cotangent of an fp32 output (the head's logits) is rounded before the backward products:
    autodiff alone multiplied it in fp32 against bf16 operands, an fp32 matmul (on a GPU, off the
    tensor cores: gpt2_124m's step on an H200 went from 132 to 87 ms with this)."""
    x, w = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((16, 32), jnp.bfloat16)
    for out_dtype in (jnp.float32, jnp.bfloat16):
        grad = jax.grad(lambda x, w, out_dtype=out_dtype:
                        matmul.matmul("xla", x, w, out_dtype).astype(jnp.float32).sum(), (0, 1))
        jaxpr = jax.make_jaxpr(grad)(x, w)
        # the backward's two
        dots = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
        operand_dtypes = {tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in dots}
        assert len(dots) == 2 and operand_dtypes == {("bfloat16", "bfloat16")}, str(jaxpr)
        assert {str(eqn.outvars[0].aval.dtype) for eqn in dots} == {"bfloat16"}, str(jaxpr)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_xla_half_matmul_writes_its_output_dtype(out_dtype):
    """The product comes out of the dot in the dtype asked for, not as fp32 rounded by a convert of
    its own (on a GPU, a second pass over every activation at twice its bytes)."""
    x, w = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((16, 32), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, w: matmul.matmul("xla", x, w, out_dtype))(x, w)
    names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    inner = jaxpr.jaxpr.eqns[names.index("custom_vjp_call")].params["call_jaxpr"].jaxpr
    assert [eqn.primitive.name for eqn in inner.eqns] == ["dot_general"], str(jaxpr)
    assert inner.eqns[0].outvars[0].aval.dtype == out_dtype


@pytest.mark.parametrize("impl", IMPLS)
def test_half_attention_is_close_to_fp32(impl):
    L = len(SEGMENTS[0])
    q, k, v, dout = qkv_and_cotangent(4, 2, L, L, seed=7)
    mask = packed_mask(SEGMENTS, POSITIONS)
    got = values_and_grads(lambda *a: attention.attention(impl, *a), *bf16_round(q, k, v), mask,
                           dout.astype(jnp.bfloat16))
    want = values_and_grads(reference_attention,
                            *(x.astype(jnp.float32) for x in bf16_round(q, k, v)), mask, dout)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=False):
        assert g.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=3e-2, rtol=3e-2,
                                   err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_only_cpu_uses_the_hand_written_backwards(impl):
    x, w = jnp.ones((3, 4)), jnp.ones((4, 2))
    q = k = v = jnp.ones((1, 2, 3, 4))
    mask = jnp.ones((1, 3, 3), bool)
    jaxprs = [jax.make_jaxpr(lambda x, w: matmul.matmul(impl, x, w))(x, w),
              jax.make_jaxpr(lambda x: norm.normalize(impl, x, w[:, 0], w[:, 1], 1e-5, True))(x),
              jax.make_jaxpr(lambda q, k, v: attention.attention(impl, q, k, v, mask))(q, k, v)]
    # the norm has a backward of its own on both paths: the cpu one's, and off the CPU one that is
    # given the row statistics
    # (test_normalize_off_the_cpu_keeps_the_row_statistics_for_the_backward_pass)
    assert ["custom_vjp_call" in str(j) for j in jaxprs] == [impl == "cpu", True, impl == "cpu"]


def test_resolve_on_cpu():
    assert jax.default_backend() == "cpu"
    for dtype in ["float32", "bfloat16", jnp.float32]:
        assert choice.resolve("auto", dtype) == "cpu"
        assert choice.resolve("cpu", dtype) == "cpu"
        assert choice.resolve("xla", dtype) == "xla"
        with pytest.raises(ConfigError, match=r"^model\.kernels=cudnn needs a GPU"):
            choice.resolve("cudnn", dtype)
    with pytest.raises(ConfigError, match="model.kernels='flash'"):
        choice.resolve("flash", "float32")


@pytest.mark.parametrize("backend, dtype, expected", [
    ("gpu", "bfloat16", "cudnn"), ("gpu", jnp.float16, "cudnn"), ("gpu", "float32", "xla"),
    ("tpu", "bfloat16", "xla"), ("tpu", "float32", "xla")])
def test_resolve_auto_elsewhere(monkeypatch, backend, dtype, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert choice.resolve("auto", dtype) == expected
    assert choice.resolve("xla", dtype) == "xla"
    if expected == "cudnn":
        assert choice.resolve("cudnn", dtype) == "cudnn"
    else:
        with pytest.raises(ConfigError, match="model.kernels=cudnn"):
            choice.resolve("cudnn", dtype)


def tiny_llama(attention: str) -> ModelConfig:
    return ModelConfig(preset="llama", vocab_size=37, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                       seq_len=7, qk_norm=True, bias=True, kernels=attention).resolved()


def test_model_follows_the_switch():
    """kernels=xla: no hand-written backward anywhere in the model, and the same loss and
    gradients."""
    model = GPT(tiny_llama("cpu"))
    rng = np.random.default_rng(5)
    # random params of the right shapes: no init program to compile
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, jnp.float32),
                          jax.eval_shape(model.init, jax.random.key(0)))
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    batch = {"inputs": jnp.asarray(rng.integers(0, 37, seg.shape), jnp.int32), "segment_ids": seg,
             "targets": jnp.asarray(rng.integers(0, 37, seg.shape), jnp.int32),
             "loss_mask": (seg != 0) * 1.0}
    results = {}
    for impl in IMPLS:
        m = GPT(dataclasses.replace(model.cfg, kernels=impl))
        jaxpr = str(jax.make_jaxpr(m.apply)(params, batch["inputs"], seg))
        assert ([name in jaxpr for name in ["_attend_bwd", "_normalize_bwd", "_matmul_bwd"]]
                == [impl == "cpu"] * 3)
        results[impl] = jax.jit(jax.value_and_grad(lambda p, m=m: m.loss(p, batch)[0]))(params)
    (loss_cpu, grads_cpu), (loss_xla, grads_xla) = results["cpu"], results["xla"]
    np.testing.assert_allclose(float(loss_xla), float(loss_cpu), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=1e-6, rtol=1e-5),
                 grads_xla, grads_cpu)


def test_cudnn_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="model.kernels=cudnn"):
        GPT(tiny_llama("cudnn")).init(jax.random.key(0))


def test_every_auto_is_resolved_once_when_the_model_is_built(monkeypatch):
    """GPT(cfg) picks the host's kernels and matmul dtype; tracing the layers (a
    forward pass, a decoding step, the fused loss) resolves nothing again."""
    cfg = dataclasses.replace(tiny_llama("auto"), loss_chunks=7, matmul_dtype="bfloat16")
    model = GPT(cfg)
    assert model.kernels == choice.Kernels(impl="cpu", matmul_dtype="bfloat16", platform="cpu")

    def refuse(*_):
        raise AssertionError("resolved again while tracing")
    for name in ("resolve", "matmul_dtype"):
        monkeypatch.setattr(choice, name, refuse)
    monkeypatch.setattr(hardware, "compute_platform", refuse)
    params = jax.eval_shape(model.init, jax.random.key(0))
    ids = jnp.zeros((1, 7), jnp.int32)
    batch = {"inputs": ids, "targets": ids, "segment_ids": ids + 1, "loss_mask": ids * 1.0}
    jax.eval_shape(model.loss, params, batch)
    jax.eval_shape(lambda p, c: model.apply(p, ids[:, :1], cache=c), params, model.init_cache(1))


def reference_head_loss(x_BxLxD, w_DxV, targets_BxL, weights_BxL, softcap=0.0):
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD.astype(jnp.float32),
                              w_DxV.astype(jnp.float32))
    if softcap:
        logits_BxLxV = softcap * jnp.tanh(logits_BxLxV / softcap)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], -1)[..., 0]
                    * weights_BxL)


def head_loss_problem(seed, B=3, L=12, D=16, V=40):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (B, L)), jnp.float32).at[0, 0].set(1.0)
    return x, w, targets, weights


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunks", [1, 3, 5])  # 5 does not divide L = 12: 4 pieces
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_head_loss_is_the_weighted_cross_entropy(impl, chunks, softcap):
    """Value and both gradients equal the plain logits -> log-softmax form in fp32, for any piece
    count, with a cotangent other than 1 (the gradients made in the forward pass are scaled by
    it)."""
    x, w, targets, weights = head_loss_problem(8)
    got = jax.value_and_grad(lambda x, w: 2.5 * head_loss.head_loss(impl, x, w, targets, weights,
                                                                  chunks, jnp.float32, softcap),
                             (0, 1))(x, w)
    want = jax.value_and_grad(
        lambda x, w: 2.5 * reference_head_loss(x, w, targets, weights, softcap), (0, 1))(x, w)
    for name, g, r in zip(["loss", "dx", "dw"], jax.tree.leaves(got), jax.tree.leaves(want),
                          strict=False):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5, err_msg=name)
    # without differentiation: the forward alone, the same value
    np.testing.assert_allclose(float(head_loss.head_loss(impl, x, w, targets, weights, chunks,
                                                         jnp.float32, softcap)),
                               float(want[0]) / 2.5, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_half_head_loss_rounds_only_the_products(impl):
    """bf16 matmuls: the loss is the fp32 cross-entropy of the rounded operands' product, the
    input's gradient comes back in its bf16 and the weight's in fp32 (summed over pieces in
    fp32)."""
    x, w, targets, weights = head_loss_problem(9)
    xh = x.astype(jnp.bfloat16)
    (loss, (dx, dw)) = jax.value_and_grad(
        lambda x, w: head_loss.head_loss(impl, x, w, targets, weights, 3, jnp.bfloat16),
        (0, 1))(xh, w)
    want, (dx_want, dw_want) = jax.value_and_grad(reference_head_loss, (0, 1))(
        xh.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32), targets, weights)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_want), rtol=2e-2,
                               atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_loss_with_bf16_logits_is_the_cross_entropy_of_the_rounded_logits(impl):
    """logits_dtype=bfloat16 (torch autocast's numerics): the loss and gradients are those of the
    fp32 product rounded once to bf16 and read back into fp32, not those of the fp32 logits."""
    x, w, targets, weights = head_loss_problem(10, V=300)

    def rounded_reference(x, w):
        logits_BxLxV = jnp.einsum("bld,dv->blv", x, w)
        # rounded in value only: autodiff of the casts would round the logits' gradient to bf16
        # too
        logits_BxLxV += jax.lax.stop_gradient(
            logits_BxLxV.astype(jnp.bfloat16).astype(jnp.float32) - logits_BxLxV)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp_BxLxV, targets[..., None], -1)[..., 0] * weights)

    got = jax.value_and_grad(lambda x, w: head_loss.head_loss(impl, x, w, targets, weights, 3,
                                                            jnp.float32, logits_dtype=jnp.bfloat16),
                             (0, 1))(x, w)
    want = jax.value_and_grad(rounded_reference, (0, 1))(x, w)
    unrounded = jax.value_and_grad(lambda x, w: reference_head_loss(x, w, targets, weights),
                                   (0, 1))(x, w)
    for name, g, r, u in zip(["loss", "dx", "dw"], *map(jax.tree.leaves, (got, want, unrounded)),
                             strict=False):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-4, err_msg=name)
        # the rounding is real
        assert not np.allclose(np.asarray(g), np.asarray(u), rtol=1e-5, atol=1e-4), name


def test_activation_under_cublas_matmuls_adds_the_bias_first_and_keeps_the_sum(monkeypatch):
    """With XLA:GPU's matmuls all cuBLAS calls, the bias is added before the recomputed activation
    (so cuBLASLt's epilogue can add it and apply the gelu), and y + b is what the backward pass
    keeps: the same values and gradients as autodiff's, one [M, F] array kept."""
    y_MxF = jax.random.normal(jax.random.key(0), (64, 96), jnp.bfloat16)
    b_F = jax.random.normal(jax.random.key(1), (96,), jnp.float32)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
    with hardware.target_platform("gpu"):  # traced for a GPU, run here
        out, vjp = jax.vjp(lambda y, b: matmul.activation("xla", "gelu", y, b), y_MxF, b_F)
    h_MxF = y_MxF + b_F.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(matmul.ACTIVATIONS["gelu"](h_MxF), np.float32))
    kept = [x for x in jax.tree.leaves(vjp) if getattr(x, "shape", ()) == y_MxF.shape]
    assert len(kept) == 1 and np.array_equal(np.asarray(kept[0], np.float32),
                                              np.asarray(h_MxF, np.float32))
    want = jax.vjp(lambda y, b: matmul.ACTIVATIONS["gelu"](y + b.astype(y.dtype)), y_MxF, b_F)[1]
    for got, expected in zip(vjp(jnp.ones_like(out)), want(jnp.ones_like(out)), strict=False):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", sorted(matmul.ACTIVATIONS))
@pytest.mark.parametrize("bias", [False, True])
def test_activation_off_the_cpu_keeps_only_its_inputs_for_the_backward_pass(name, bias):
    y_MxF = jax.random.normal(jax.random.key(0), (64, 96), jnp.bfloat16)
    b_F = jax.random.normal(jax.random.key(1), (96,), jnp.float32) if bias else None
    kept = {}
    for impl in ("cpu", "xla"):
        out, vjp = jax.vjp(lambda y, b, impl=impl: matmul.activation(impl, name, y, b), y_MxF, b_F)
        expected = matmul.ACTIVATIONS[name](y_MxF if b_F is None
                                            else y_MxF + b_F.astype(jnp.bfloat16))
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
        grads = vjp(jnp.ones_like(out))
        kept[impl] = grads, [x.shape for x in jax.tree.leaves(vjp)
                             if getattr(x, "shape", ()) == y_MxF.shape]
    for g_cpu, g_xla in zip(kept["cpu"][0], kept["xla"][0], strict=False):
        if g_cpu is not None:
            np.testing.assert_allclose(np.asarray(g_xla, np.float32), np.asarray(g_cpu, np.float32),
                                       rtol=1e-2, atol=1e-2)
    assert kept["xla"][1] == [y_MxF.shape]            # y itself, which the matmul wrote anyway
    assert len(kept["cpu"][1]) >= (2 if name == "relu2" else 3)  # autodiff keeps values from inside
