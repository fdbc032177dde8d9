"""The model's hot spots (attention, normalization, matmul, the output head's loss), one
implementation per backend.

    impl = resolve(cfg.attention, cfg.dtype)   # "cpu" | "xla" | "cudnn"
    out_BxHxLxE = attention(impl, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)
    y = normalize(impl, x, scale_D, bias_D, eps, center)
    y_MxN = matmul(impl, x_MxK, w_KxN)
    loss = head_loss(impl, x_BxLxD, w_DxV, targets_BxL, weights_BxL, chunks, matmul_dtype)

"cpu": hand-written backward passes, each measured faster on XLA:CPU than autodiff's (the
golden values in tests/test_model.py are this path's numbers). "xla": plain jnp, differentiated
by autodiff, which leaves the compiler free to fuse (TPU, and a GPU in fp32); a half-precision
matmul's backward only rounds its cotangent first (_rounded_matmul), the norm's backward is given
each row's statistics, and the MLP's activation is recomputed (each measured in bytes a step by
XLA:GPU's own plan: `bench compile bench.target=h100`, aot.py). "cudnn": cuDNN's
fused flash attention (a GPU in bf16/fp16), which never stores the probabilities; norms and
matmuls as "xla". Shapes in names as in model.py: B batch, H query heads, K kv heads, G = H/K,
L query length, S key length, E head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from jaxgpt import hardware
from jaxgpt.errors import ConfigError

NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, never NaN
HALF_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN flash attention computes in


def resolve(choice: str, dtype) -> str:
    """The implementation `model.attention` names: auto is cpu on CPU, cudnn on a GPU in bf16/fp16,
    else xla. An explicit cudnn where it cannot run is a ConfigError, not a crash inside XLA."""
    if choice not in ("auto", "cpu", "xla", "cudnn"):
        raise ConfigError(f"model.attention={choice!r}: expected one of auto, xla, cudnn, cpu")
    backend = hardware.compute_platform()
    cudnn_ok = backend == "gpu" and jnp.dtype(dtype) in HALF_DTYPES
    if choice == "auto":
        return "cpu" if backend == "cpu" else "cudnn" if cudnn_ok else "xla"
    if choice == "cudnn" and not cudnn_ok:
        raise ConfigError(f"model.attention=cudnn needs a GPU and model.dtype=bfloat16 (here: {backend}, "
                          f"{jnp.dtype(dtype).name}); use model.attention=auto or xla")
    return choice


def resolve_cache_window(choice: str) -> str:
    """What model.cache_window names: auto is whole on a GPU (a lax.switch per layer would stop the
    host at every layer of every decoding step: hardware.branches_sync_host), chunks elsewhere."""
    if choice == "auto":
        return "whole" if hardware.branches_sync_host() else "chunks"
    return choice


def attention(impl: str, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS, causal: bool = False) -> jax.Array:
    """Softmax attention with grouped-query heads (K kv heads shared by G = H/K queries).

    mask True: the query may attend to the key. A query with no allowed key (padding) outputs 0
    and gets gradient 0. causal: the mask allows no key past its query's index (a training row,
    L = S), so cuDNN may skip the blocks above the diagonal (gpt2_124m on an H200: the attention
    kernels computed every block, the mask only adding -inf to half of them). No mask with causal:
    causality is the whole mask (rows of one document, no padding), and cuDNN reads none. Heads
    come first ([B, H, L, E]): the cpu path's matmuls then need no transposes, and a KV cache kept
    as [B, K, S, E] plugs in unchanged.
    """
    if mask_BxLxS is None and not causal:
        raise ValueError("attention needs a mask, or causal=True")
    if impl == "cpu":
        B, H, L, E = q_BxHxLxE.shape
        K = k_BxKxSxE.shape[1]
        if mask_BxLxS is None:  # causal alone, the same for every row
            mask_BxLxS = jnp.tril(jnp.ones((1, L, k_BxKxSxE.shape[2]), bool))
        bias_BxLxS = jnp.where(mask_BxLxS, 0.0, NEG_INF).astype(jnp.float32)
        # a query with nothing to attend to (padding) gets zero probabilities: output 0, gradient 0
        has_keys_BxLx1 = mask_BxLxS.any(-1, keepdims=True).astype(jnp.float32)
        out_BxKxGxLxE = _attend(q_BxHxLxE.reshape(B, K, H // K, L, E), k_BxKxSxE, v_BxKxSxE, bias_BxLxS,
                                has_keys_BxLx1)
        return out_BxKxGxLxE.reshape(B, H, L, E)
    # jax.nn.dot_product_attention takes [B, L, heads, E] and does the grouping itself; its softmax
    # over a fully masked row is uniform, so padding rows are zeroed here (which also zeroes their
    # gradient)
    q_BxLxHxE, k_BxSxKxE, v_BxSxKxE = (x.transpose(0, 2, 1, 3) for x in (q_BxHxLxE, k_BxKxSxE, v_BxKxSxE))
    if mask_BxLxS is None:  # causal alone: cuDNN reads no mask at all, every query has keys
        out_BxLxHxE = jax.nn.dot_product_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, is_causal=True,
                                                   implementation=impl)
        return out_BxLxHxE.transpose(0, 2, 1, 3)
    out_BxLxHxE = jax.nn.dot_product_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask=mask_BxLxS[:, None],
                                               is_causal=causal and impl == "cudnn", implementation=impl)
    has_keys_BxHxLx1 = mask_BxLxS.any(-1)[:, None, :, None]
    return jnp.where(has_keys_BxHxLx1, out_BxLxHxE.transpose(0, 2, 1, 3), 0)


# A hand-written backward: autodiff's version of softmax attention cost XLA:CPU 3 ms more per
# step (its softmax backward reduces p * dp over the keys inside a fused matmul; the form below
# reduces do * o over the head dim instead, as FlashAttention does, and adds no transposes).
# It stores the fp32 probabilities for the backward pass: fine at CPU sizes, the memory that
# cuDNN's flash attention saves on a GPU.
@jax.custom_vjp
def _attend(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, has_keys_BxLx1):
    return _attend_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, has_keys_BxLx1)[0]


def _attend_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, has_keys_BxLx1):
    scale = q_BxKxGxLxE.shape[-1] ** -0.5
    scores_BxKxGxLxS = jnp.einsum("bkgle,bkse->bkgls", q_BxKxGxLxE, k_BxKxSxE,
                                  preferred_element_type=jnp.float32) * scale
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS + bias_BxLxS[:, None, None], axis=-1)
    probs_BxKxGxLxS = probs_BxKxGxLxS * has_keys_BxLx1[:, None, None]
    out_BxKxGxLxE = _einsum("bkgls,bkse->bkgle", probs_BxKxGxLxS.astype(v_BxKxSxE.dtype), v_BxKxSxE)
    return out_BxKxGxLxE, (q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, probs_BxKxGxLxS, out_BxKxGxLxE)


def _attend_bwd(residuals, dout_BxKxGxLxE):
    q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, probs_BxKxGxLxS, out_BxKxGxLxE = residuals
    scale = q_BxKxGxLxE.shape[-1] ** -0.5
    dv_BxKxSxE = _contract_queries(probs_BxKxGxLxS.astype(dout_BxKxGxLxE.dtype), dout_BxKxGxLxE)
    dprobs_BxKxGxLxS = jnp.einsum("bkgle,bkse->bkgls", dout_BxKxGxLxE, v_BxKxSxE,
                                  preferred_element_type=jnp.float32)
    # sum_s p * dp = sum_e do * o: the softmax backward's row sum, over E instead of S
    rowsum_BxKxGxLx1 = jnp.sum(dout_BxKxGxLxE.astype(jnp.float32) * out_BxKxGxLxE.astype(jnp.float32),
                               axis=-1, keepdims=True)
    dscores_BxKxGxLxS = (probs_BxKxGxLxS * (dprobs_BxKxGxLxS - rowsum_BxKxGxLx1) * scale).astype(q_BxKxGxLxE.dtype)
    dq_BxKxGxLxE = _einsum("bkgls,bkse->bkgle", dscores_BxKxGxLxS, k_BxKxSxE)
    dk_BxKxSxE = _contract_queries(dscores_BxKxGxLxS, q_BxKxGxLxE)
    return dq_BxKxGxLxE, dk_BxKxSxE, dv_BxKxSxE, None, None  # the mask gets no gradient


_attend.defvjp(_attend_fwd, _attend_bwd)


def _einsum(spec: str, a, b) -> jax.Array:
    """einsum in a's dtype; half-precision products summed in fp32 and rounded once (see _dot)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _contract_queries(a_BxKxGxLxS, b_BxKxGxLxE) -> jax.Array:
    """sum over the queries (g, l) of a^T b: [B, K, S, E], the form of dv and dk. In half precision
    a^T is made a row-major array first: XLA:CPU runs a product contracted over its left
    operand's leading axis in fp32 (see _half_matmul_bwd)."""
    if a_BxKxGxLxS.dtype not in HALF_DTYPES:
        return jnp.einsum("bkgls,bkgle->bkse", a_BxKxGxLxS, b_BxKxGxLxE)
    B, K, G, L, S = a_BxKxGxLxS.shape
    a_BxKxSxN = _row_major(a_BxKxGxLxS.reshape(B, K, G * L, S).swapaxes(-1, -2))
    return _einsum("bksn,bkne->bkse", a_BxKxSxN, b_BxKxGxLxE.reshape(B, K, G * L, -1))


def _row_major(x) -> jax.Array:
    """x stored in its own axis order (a transpose copied, not left a strided view)."""
    return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


def normalize(impl: str, x, scale_D, bias_D, eps: float, center: bool) -> jax.Array:
    """(x - mean) / std * scale + bias over the last axis (LayerNorm); without centering, RMSNorm."""
    if impl == "cpu":
        return _normalize(x, scale_D, bias_D, eps, center)
    return _normalize_keeping_stats(x, scale_D, bias_D, eps, center)


# Off the CPU the backward pass gets x and each row's mean and 1/std, and makes the normalized x
# again where it needs it. Under autodiff XLA recomputed the row statistics inside the kernel that
# multiplies dy by the normalized x, which made it a reduction over each row; it then wrote that fp32
# product out for the scale's gradient (a reduction over the rows, which it cannot fuse with one over
# each row) and read it back. gpt2_124m at batch 32, XLA:GPU's plan for an H100: 6.2 GB a step less.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize_keeping_stats(x, scale_D, bias_D, eps: float, center: bool):
    return _stats_fwd(x, scale_D, bias_D, eps, center)[0]


def _stats_fwd(x, scale_D, bias_D, eps, center):
    # mean and mean square in one read of x (sibling reductions: one kernel), taken about each row's
    # first element so that a mean far from 0 does not cancel the variance away (shifted data)
    if center:
        shift = x[..., :1]
        d = x - shift
        offset = d.mean(-1, keepdims=True)
        mean = shift + offset
        variance = jnp.maximum((d * d).mean(-1, keepdims=True) - offset * offset, 0.0)
    else:
        mean = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
        variance = (x * x).mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(variance + eps)
    # the statistics made here and kept: without the barrier XLA folds their making into the backward's
    # kernels again (and writes the fp32 product as before)
    mean, rstd = jax.lax.optimization_barrier((mean, rstd))
    return (x - mean) * rstd * scale_D + bias_D, (x, mean, rstd, scale_D)


def _stats_bwd(eps, center, residuals, dy):
    x, mean, rstd, scale_D = residuals
    return _normalize_bwd(eps, center, ((x - mean) * rstd, rstd, scale_D), dy)


_normalize_keeping_stats.defvjp(_stats_fwd, _stats_bwd)


# A hand-written backward (two row reductions instead of autodiff's four) saves XLA:CPU
# about 0.5 ms of a 32 ms step.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale_D, bias_D, eps: float, center: bool):
    return _normalize_fwd(x, scale_D, bias_D, eps, center)[0]


def _normalize_fwd(x, scale_D, bias_D, eps, center):
    if center:
        x = x - x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat = x * rstd
    return xhat * scale_D + bias_D, (xhat, rstd, scale_D)


def _normalize_bwd(eps, center, residuals, dy):
    xhat, rstd, scale_D = residuals
    batch_axes = tuple(range(dy.ndim - 1))
    dscale_D = (dy * xhat).sum(batch_axes)
    dbias_D = dy.sum(batch_axes)
    g = dy * scale_D
    dx = g - xhat * (g * xhat).mean(-1, keepdims=True)
    if center:
        dx = dx - g.mean(-1, keepdims=True)
    return dx * rstd, dscale_D, dbias_D


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),   # GPT-2's tanh form
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu2": lambda h: jnp.square(jax.nn.relu(h)),
}


def activate(impl: str, name: str, y, b=None) -> jax.Array:
    """The MLP's activation of its first product plus bias, `name` one of ACTIVATIONS.

    Off the CPU the backward pass recomputes it from y and b, which are kept anyway (y is what the
    matmul wrote), instead of keeping a [B, L, F] value from inside it: autodiff of GPT-2's gelu kept
    the tanh, one more array written by the forward pass and read by the backward (gpt2_124m, batch 32,
    XLA:GPU's plan for an H100: 0.4 GB a layer). When XLA:GPU's matmuls are all cuBLAS calls
    (hardware.library_matmuls) the bias is added before, so that cuBLASLt adds it and applies the
    gelu in the matmul's epilogue, writing y + b for the backward pass beside the activation: no
    kernel of its own reads y (the same plan, Triton's matmuls off: 2.4 GB less a step; with Triton's
    matmuls, which write the bare product, this order would cost 2.4 GB more). XLA:CPU keeps its own
    order (the golden values).
    """
    def forward(y, b):
        return ACTIVATIONS[name](y if b is None else y + b.astype(y.dtype))
    if impl == "cpu":
        return forward(y, b)
    if b is not None and hardware.library_matmuls():
        y, b = y + b.astype(y.dtype), None
    return jax.checkpoint(forward)(y, b)


def matmul(impl: str, x_MxK, w_KxN, out_dtype=None) -> jax.Array:
    """x @ w, both in one dtype, rounded once to out_dtype (default: theirs). Half-precision inputs
    are multiplied into fp32 sums, which is also how mixed precision (model.matmul_dtype=bfloat16
    with fp32 activations) reaches a CPU's bf16 units. On cpu, the backward pass does the same with
    the gradient rounded to the inputs' dtype, and computes the weight gradient in the orientation
    XLA:CPU runs fastest."""
    out_dtype = jnp.dtype(out_dtype or x_MxK.dtype)
    if impl == "cpu":
        return _matmul(x_MxK, w_KxN, out_dtype)
    if x_MxK.dtype in HALF_DTYPES:
        return _rounded_matmul(x_MxK, w_KxN, out_dtype)
    return jnp.dot(x_MxK, w_KxN).astype(out_dtype)


# Autodiff of an fp32-accumulated half-precision product gives its two backward products an fp32
# cotangent against half-precision operands, which run as fp32 matmuls: the output head's, whose
# logits are fp32 for the loss, and any whose rounding XLA does not see through. Rounding the
# cotangent to the operands' dtype first, as mixed-precision training does, keeps all three
# products on the half-precision units (a GPU's tensor cores). Each product is asked for in the
# dtype it is used in: a GPU's or TPU's matmul sums in fp32 and rounds once as it writes, while an
# fp32 result rounded afterwards is written and read again at twice the bytes by a convert of its
# own (gpt2_124m: every layer's four products, forward and backward).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rounded_matmul(x_MxK, w_KxN, out_dtype):
    return jnp.dot(x_MxK, w_KxN, preferred_element_type=out_dtype)


def _rounded_matmul_fwd(x_MxK, w_KxN, out_dtype):
    return _rounded_matmul(x_MxK, w_KxN, out_dtype), (x_MxK, w_KxN)


def _rounded_matmul_bwd(out_dtype, residuals, dy_MxN):
    x_MxK, w_KxN = residuals
    return _dot_grads(x_MxK, w_KxN, dy_MxN.astype(x_MxK.dtype), w_KxN.dtype)


def _dot_grads(x_MxK, w_KxN, dy_MxN, dw_dtype):
    """(dy @ w^T in x's dtype, x^T @ dy in dw_dtype), each summed in fp32 and written in its dtype."""
    return (jnp.dot(dy_MxN, w_KxN.T, preferred_element_type=x_MxK.dtype),
            jnp.dot(x_MxK.T, dy_MxN, preferred_element_type=dw_dtype))


_rounded_matmul.defvjp(_rounded_matmul_fwd, _rounded_matmul_bwd)


def _dot(x_MxK, w_KxN, out_dtype) -> jax.Array:
    """x @ w; in bf16/fp16 as an fp32 product rounded once, which XLA:CPU runs on its bf16 units
    (YNNPACK / oneDNN) and the half-precision-output dot does not (AMX host, 4096x128x512: 439 vs
    82 GFLOP/s, fp32 103; AVX-512 host, 2048x768x2304: 750 vs 360). A single row is padded to two:
    XLA:CPU runs a half-precision matvec (M = 1, every decode step of one sequence) by first
    converting the whole weight to fp32 (6.8 vs 25 GFLOP/s)."""
    if x_MxK.dtype not in HALF_DTYPES:
        return (x_MxK @ w_KxN).astype(out_dtype)
    M = x_MxK.shape[0]
    if M == 1:
        x_MxK = jnp.concatenate([x_MxK, jnp.zeros_like(x_MxK)])
    y_MxN = jnp.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32)
    return y_MxN[:M].astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxK, w_KxN, out_dtype):
    return _dot(x_MxK, w_KxN, out_dtype)


def _matmul_fwd(x_MxK, w_KxN, out_dtype):
    return _dot(x_MxK, w_KxN, out_dtype), (x_MxK, w_KxN)


def _matmul_bwd(out_dtype, residuals, dy_MxN):
    x_MxK, w_KxN = residuals
    if x_MxK.dtype in HALF_DTYPES:
        return _half_matmul_bwd(x_MxK, w_KxN, dy_MxN.astype(x_MxK.dtype))
    K, N = w_KxN.shape
    if K > N:
        # XLA:CPU (YNNPACK) runs x^T dy 1.5x slower when the result is tall and narrow (the MLP's
        # [4D, D] down-projection: 1.02 vs 0.65 ms): compute dy^T x and transpose that small
        # result; the barrier stops XLA from folding the transpose back into the product.
        dw_KxN = jax.lax.optimization_barrier(dy_MxN.T @ x_MxK).T
    else:
        dw_KxN = x_MxK.T @ dy_MxN
    return dy_MxN @ w_KxN.T, dw_KxN


def _half_matmul_bwd(x_MxK, w_KxN, dy_MxN, dw_dtype=None):
    """The backward products in half precision (dw rounded to dw_dtype, default w's), in the two forms XLA:CPU gives to its bf16 units
    (YNNPACK takes a dot whose left operand is contracted on its last axis; any other form XLA:CPU
    converts to fp32 first). dx: dy against w's rows, as one dot_general (written as dy @ w.T,
    XLA:CPU converted it). dw: x^T materialized row-major by a layout constraint (x.T alone
    becomes a transposed view, the form it converts). 4096x128 by 4096x384 on an AMX host, both
    gradients: 6 ms against 9.5 in fp32."""
    dx_MxK = jax.lax.dot_general(dy_MxN, w_KxN, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    x_KxM = _row_major(x_MxK.T)
    dw_KxN = jnp.dot(x_KxM, dy_MxN, preferred_element_type=jnp.float32)
    return dx_MxK.astype(x_MxK.dtype), dw_KxN.astype(dw_dtype or w_KxN.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def head_loss(impl: str, x_BxLxD, w_DxV, targets_BxL, weights_BxL, chunks: int, matmul_dtype,
              softcap: float = 0.0, logits_dtype=jnp.float32) -> jax.Array:
    """sum(weights * cross-entropy(x @ w, targets)): the output head and its loss fused, one piece of
    the rows' positions at a time (`chunks` pieces), so the [B, L, V] fp32 logits never exist whole.

    Under differentiation each piece's gradients are made as soon as its logits are (the softmax
    minus the targets' one-hot, rounded to the matmul dtype, against x and w), so the backward pass
    only scales them: the head's three products are done once each, and of the logits only one
    piece is ever held (gpt2_124m at batch 32: 6.6 GB of fp32 logits, read and written by separate
    passes of softmax, scale and rounding, besides their gradient). w is the fp32 parameter, cast
    here, so its gradient sums the pieces in fp32. The pieces cut the length axis: each keeps every
    row, so a batch sharded over devices stays spread over all of them. The logits are written in
    logits_dtype and read into fp32 by the softmax (bfloat16: half their bytes, torch autocast's numerics).
    """
    return _head_loss(x_BxLxD, w_DxV, targets_BxL, weights_BxL, impl, _pieces(x_BxLxD.shape[1], chunks),
                      jnp.dtype(matmul_dtype), softcap, jnp.dtype(logits_dtype))


def _pieces(L: int, chunks: int) -> int:
    """The largest count of equal pieces of L positions that is at most `chunks`."""
    return max(n for n in range(1, max(chunks, 1) + 1) if L % n == 0)


def _piece_logits(x_BxCxD, w_DxV, targets_BxC, impl, softcap, logits_dtype):
    """One piece's logits [B*C, V] (written in logits_dtype, read into fp32, capped), their
    log-sum-exp and the targets' logits; x is cast to w's dtype (the matmul dtype, w cast once
    outside the loop over pieces)."""
    B, C, D = x_BxCxD.shape
    x_MxD = x_BxCxD.reshape(B * C, D).astype(w_DxV.dtype)
    # not differentiated: its forward form only. The upcast fuses into the passes that read it.
    logits_MxV = matmul(impl, x_MxD, w_DxV, logits_dtype).astype(jnp.float32)
    if softcap > 0:
        logits_MxV = softcap * jnp.tanh(logits_MxV / softcap)
    lse_M = jax.nn.logsumexp(logits_MxV, axis=-1) if impl == "cpu" else _logsumexp_one_pass(logits_MxV)
    target_M = jnp.take_along_axis(logits_MxV, targets_BxC.reshape(B * C, 1), axis=-1)[:, 0]
    return x_MxD, logits_MxV, lse_M, target_M


def _logsumexp_one_pass(x_MxV) -> jax.Array:
    """log(sum(exp(x))) over the last axis in one read of x: a reduction of (running max, sum of exp
    below it) pairs, where logsumexp's max and then its sum read the [M, V] logits twice (gpt2_124m at
    batch 32: 6.6 GB a step, XLA:GPU's plan for an H100). Not differentiated (the fused head's forward)."""
    def merge(a, b):
        (max_a, sum_a), (max_b, sum_b) = a, b
        top = jnp.maximum(max_a, max_b)
        return top, sum_a * jnp.exp(max_a - top) + sum_b * jnp.exp(max_b - top)
    # an element is the pair (x, 1); the start (NEG_INF, 0) is finite, so merging two starts gives no NaN
    top_M, total_M = jax.lax.reduce((x_MxV, jnp.ones_like(x_MxV)), (jnp.float32(NEG_INF), jnp.float32(0)),
                                    merge, (x_MxV.ndim - 1,))
    return top_M + jnp.log(total_M)


def _piece(x_BxLxD, i, n):
    C = x_BxLxD.shape[1] // n
    return jax.lax.dynamic_slice_in_dim(x_BxLxD, i * C, C, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _head_loss(x_BxLxD, w_DxV, targets_BxL, weights_BxL, impl, n, matmul_dtype, softcap, logits_dtype):
    w_DxV = w_DxV.astype(matmul_dtype)

    def body(i, total):
        _, _, lse_M, target_M = _piece_logits(_piece(x_BxLxD, i, n), w_DxV, _piece(targets_BxL, i, n), impl, softcap,
                                              logits_dtype)
        return total + jnp.sum((lse_M - target_M) * _piece(weights_BxL, i, n).reshape(-1))
    return jax.lax.fori_loop(0, n, body, jnp.zeros((), jnp.float32))


def _head_loss_fwd(x_BxLxD, w_DxV, targets_BxL, weights_BxL, impl, n, matmul_dtype, softcap, logits_dtype):
    B, L, D = x_BxLxD.shape
    w_m_DxV = w_DxV.astype(matmul_dtype)

    def body(i, carry):
        total, dx_BxLxD, dw_DxV = carry
        targets_BxC, weights_BxC = _piece(targets_BxL, i, n), _piece(weights_BxL, i, n)
        x_MxD, logits_MxV, lse_M, target_M = _piece_logits(_piece(x_BxLxD, i, n), w_m_DxV, targets_BxC, impl, softcap,
                                                           logits_dtype)
        weights_M = weights_BxC.reshape(-1).astype(jnp.float32)
        total = total + jnp.sum((lse_M - target_M) * weights_M)
        # d loss / d logits: softmax - one-hot, each row scaled by its weight (and the cap's slope)
        is_target_MxV = jnp.arange(logits_MxV.shape[1]) == targets_BxC.reshape(-1, 1)
        dlogits_MxV = (jnp.exp(logits_MxV - lse_M[:, None]) - is_target_MxV) * weights_M[:, None]
        if softcap > 0:
            dlogits_MxV = dlogits_MxV * (1 - jnp.square(logits_MxV / softcap))
        dlogits_MxV = dlogits_MxV.astype(matmul_dtype)
        dx_MxD, dw_piece_DxV = _product_grads(impl, x_MxD, w_m_DxV, dlogits_MxV)
        dx_BxLxD = jax.lax.dynamic_update_slice_in_dim(dx_BxLxD, dx_MxD.reshape(B, -1, D).astype(dx_BxLxD.dtype),
                                                       i * (L // n), axis=1)
        return total, dx_BxLxD, dw_DxV + dw_piece_DxV

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros_like(x_BxLxD), jnp.zeros(w_DxV.shape, jnp.float32))  # dw: fp32 sums
    total, dx_BxLxD, dw_DxV = jax.lax.fori_loop(0, n, body, zeros)
    return total, (dx_BxLxD, dw_DxV.astype(w_DxV.dtype))


def _product_grads(impl, x_MxK, w_KxN, dy_MxN):
    """(dy @ w^T, x^T @ dy summed in fp32) in the forms each implementation runs fastest."""
    if impl == "cpu" and x_MxK.dtype in HALF_DTYPES:  # the forms XLA:CPU keeps on its bf16 units
        return _half_matmul_bwd(x_MxK, w_KxN, dy_MxN, jnp.float32)
    return _dot_grads(x_MxK, w_KxN, dy_MxN, jnp.float32)


def _head_loss_bwd(impl, n, matmul_dtype, softcap, logits_dtype, residuals, g):
    dx_BxLxD, dw_DxV = residuals  # made by the forward pass for a cotangent of 1 (the loss's own)
    return dx_BxLxD * g.astype(dx_BxLxD.dtype), dw_DxV * g.astype(dw_DxV.dtype), None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
