"""The output head fused with its cross-entropy loss, one piece of the rows' positions at a time,
with each piece's gradients made in the forward pass (a custom VJP)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgpt.model.kernels.attention import NEG_INF
from jaxgpt.model.kernels.choice import HALF_DTYPES
from jaxgpt.model.kernels.matmul import dot_grads, half_matmul_grads, matmul


def head_loss(impl: str, x_BxLxD, w_DxV, targets_BxL, weights_BxL, chunks: int, matmul_dtype,
              softcap: float = 0.0, logits_dtype=jnp.float32) -> jax.Array:
    """sum(weights * cross-entropy(x @ w, targets)): the output head and its loss fused, `chunks`
    pieces of the rows' positions at a time, so the [B, L, V] fp32 logits never exist whole.

    Under differentiation each piece's gradients are made as soon as its logits are (the softmax
    minus the targets' one-hot, rounded to the matmul dtype, against x and w), so the backward pass
    only scales them: the head's three products are done once each, and of the logits only one
    piece is ever held. w is the fp32 parameter, cast here, so its gradient sums the pieces in
    fp32. The pieces cut the length axis: each keeps every row, so a batch sharded over devices
    stays spread over all of them. The logits are written in logits_dtype and read into fp32 by
    the softmax (bfloat16: half their bytes, torch autocast's numerics).
    """
    return _head_loss(x_BxLxD, w_DxV, targets_BxL, weights_BxL, impl,
                      _pieces(x_BxLxD.shape[1], chunks), jnp.dtype(matmul_dtype), softcap,
                      jnp.dtype(logits_dtype))


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
    lse_M = (jax.nn.logsumexp(logits_MxV, axis=-1) if impl == "cpu"
             else _logsumexp_one_pass(logits_MxV))
    target_M = jnp.take_along_axis(logits_MxV, targets_BxC.reshape(B * C, 1), axis=-1)[:, 0]
    return x_MxD, logits_MxV, lse_M, target_M


def _logsumexp_one_pass(x_MxV) -> jax.Array:
    """log(sum(exp(x))) over the last axis in one read of x: a reduction of (running max, sum of exp
    below it) pairs, where logsumexp's max and then its sum read the [M, V] logits twice. Not
    differentiated (the fused head's forward)."""
    def merge(a, b):
        (max_a, sum_a), (max_b, sum_b) = a, b
        top = jnp.maximum(max_a, max_b)
        return top, sum_a * jnp.exp(max_a - top) + sum_b * jnp.exp(max_b - top)
    # an element is the pair (x, 1); the start (NEG_INF, 0) is finite: two starts merge to no NaN
    start = (jnp.float32(NEG_INF), jnp.float32(0))
    top_M, total_M = jax.lax.reduce((x_MxV, jnp.ones_like(x_MxV)), start, merge, (x_MxV.ndim - 1,))
    return top_M + jnp.log(total_M)


def _piece(x_BxLxD, i, n):
    C = x_BxLxD.shape[1] // n
    return jax.lax.dynamic_slice_in_dim(x_BxLxD, i * C, C, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _head_loss(x_BxLxD, w_DxV, targets_BxL, weights_BxL, impl, n, matmul_dtype, softcap,
               logits_dtype):
    w_DxV = w_DxV.astype(matmul_dtype)

    def body(i, total):
        _, _, lse_M, target_M = _piece_logits(_piece(x_BxLxD, i, n), w_DxV,
                                              _piece(targets_BxL, i, n), impl, softcap,
                                              logits_dtype)
        return total + jnp.sum((lse_M - target_M) * _piece(weights_BxL, i, n).reshape(-1))
    return jax.lax.fori_loop(0, n, body, jnp.zeros((), jnp.float32))


def _head_loss_fwd(x_BxLxD, w_DxV, targets_BxL, weights_BxL, impl, n, matmul_dtype, softcap,
                   logits_dtype):
    B, L, D = x_BxLxD.shape
    w_m_DxV = w_DxV.astype(matmul_dtype)

    def body(i, carry):
        total, dx_BxLxD, dw_DxV = carry
        targets_BxC, weights_BxC = _piece(targets_BxL, i, n), _piece(weights_BxL, i, n)
        x_MxD, logits_MxV, lse_M, target_M = _piece_logits(_piece(x_BxLxD, i, n), w_m_DxV,
                                                           targets_BxC, impl, softcap, logits_dtype)
        weights_M = weights_BxC.reshape(-1).astype(jnp.float32)
        total = total + jnp.sum((lse_M - target_M) * weights_M)
        # d loss / d logits: softmax - one-hot, each row scaled by its weight (and the cap's slope)
        is_target_MxV = jnp.arange(logits_MxV.shape[1]) == targets_BxC.reshape(-1, 1)
        dlogits_MxV = (jnp.exp(logits_MxV - lse_M[:, None]) - is_target_MxV) * weights_M[:, None]
        if softcap > 0:
            dlogits_MxV = dlogits_MxV * (1 - jnp.square(logits_MxV / softcap))
        dlogits_MxV = dlogits_MxV.astype(matmul_dtype)
        dx_MxD, dw_piece_DxV = _product_grads(impl, x_MxD, w_m_DxV, dlogits_MxV)
        dx_BxCxD = dx_MxD.reshape(B, -1, D).astype(dx_BxLxD.dtype)
        dx_BxLxD = jax.lax.dynamic_update_slice_in_dim(dx_BxLxD, dx_BxCxD, i * (L // n), axis=1)
        return total, dx_BxLxD, dw_DxV + dw_piece_DxV

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros_like(x_BxLxD),
             jnp.zeros(w_DxV.shape, jnp.float32))  # dw: fp32 sums
    total, dx_BxLxD, dw_DxV = jax.lax.fori_loop(0, n, body, zeros)
    return total, (dx_BxLxD, dw_DxV.astype(w_DxV.dtype))


def _product_grads(impl, x_MxK, w_KxN, dy_MxN):
    """(dy @ w^T, x^T @ dy summed in fp32) in the forms each implementation runs fastest."""
    if impl == "cpu" and x_MxK.dtype in HALF_DTYPES:  # the forms XLA:CPU keeps on its bf16 units
        return half_matmul_grads(x_MxK, w_KxN, dy_MxN, jnp.float32)
    return dot_grads(x_MxK, w_KxN, dy_MxN, jnp.float32)


def _head_loss_bwd(impl, n, matmul_dtype, softcap, logits_dtype, residuals, g):
    dx_BxLxD, dw_DxV = residuals  # made by the forward pass for a cotangent of 1 (the loss's own)
    return dx_BxLxD * g.astype(dx_BxLxD.dtype), dw_DxV * g.astype(dw_DxV.dtype), None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
