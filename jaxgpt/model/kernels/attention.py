"""Softmax attention with grouped-query heads: cuDNN's or XLA's fused form through
jax.nn.dot_product_attention, or on "cpu" a hand-written backward pass (`_attend`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.model.kernels.choice import HALF_DTYPES
from jaxgpt.model.kernels.matmul import row_major

NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, never NaN


def attention(impl: str, q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS,
              causal: bool = False) -> jax.Array:
    """Softmax attention with grouped-query heads (K kv heads shared by G = H/K queries).

    mask True: the query may attend to the key. A query with no allowed key (padding) outputs 0
    and gets gradient 0. causal: the mask allows no key past its query's index (a training row,
    L = S), so cuDNN may skip the blocks above the diagonal instead of computing them all and
    masking half. No mask with causal: causality is the whole mask (rows of one document, no
    padding), and cuDNN reads none. Heads come first ([B, H, L, E]): the cpu path's matmuls then
    need no transposes, and a KV cache kept as [B, K, S, E] plugs in unchanged.
    """
    if mask_BxLxS is None and not causal:
        raise ValueError("attention needs a mask, or causal=True")
    if impl == "cpu":
        return _attention_cpu(q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)
    # jax.nn.dot_product_attention takes [B, L, heads, E] and does the grouping itself; its softmax
    # over a fully masked row is uniform, so padding rows are zeroed here (zeroing their gradient)
    q_BxLxHxE, k_BxSxKxE, v_BxSxKxE = (x.transpose(0, 2, 1, 3)
                                       for x in (q_BxHxLxE, k_BxKxSxE, v_BxKxSxE))
    if mask_BxLxS is None:  # causal alone: cuDNN reads no mask at all, every query has keys
        out_BxLxHxE = jax.nn.dot_product_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, is_causal=True,
                                                   implementation=impl)
        return out_BxLxHxE.transpose(0, 2, 1, 3)
    out_BxLxHxE = jax.nn.dot_product_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE,
                                               mask=mask_BxLxS[:, None],
                                               is_causal=causal and impl == "cudnn",
                                               implementation=impl)
    has_keys_BxHxLx1 = mask_BxLxS.any(-1)[:, None, :, None]
    return jnp.where(has_keys_BxHxLx1, out_BxLxHxE.transpose(0, 2, 1, 3), 0)


def _attention_cpu(q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS) -> jax.Array:
    B, H, L, E = q_BxHxLxE.shape
    K = k_BxKxSxE.shape[1]
    if mask_BxLxS is None:  # causal alone, the same for every row
        mask_BxLxS = jnp.tril(jnp.ones((1, L, k_BxKxSxE.shape[2]), bool))
    bias_BxLxS = jnp.where(mask_BxLxS, 0.0, NEG_INF).astype(jnp.float32)
    # a query with nothing to attend to (padding) gets zero probabilities: output 0, gradient 0
    has_keys_BxLx1 = mask_BxLxS.any(-1, keepdims=True).astype(jnp.float32)
    out_BxKxGxLxE = _attend(q_BxHxLxE.reshape(B, K, H // K, L, E), k_BxKxSxE, v_BxKxSxE,
                            bias_BxLxS, has_keys_BxLx1)
    return out_BxKxGxLxE.reshape(B, H, L, E)


# A hand-written backward: autodiff's softmax backward reduces p * dp over the keys inside a fused
# matmul; this one reduces do * o over the head dim instead, as FlashAttention does, and adds no
# transposes. It keeps the fp32 probabilities: fine at CPU sizes (cuDNN's flash attention does not).
@jax.custom_vjp
def _attend(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, has_keys_BxLx1):
    return _attend_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, has_keys_BxLx1)[0]


def _attend_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, has_keys_BxLx1):
    scale = q_BxKxGxLxE.shape[-1] ** -0.5
    scores_BxKxGxLxS = jnp.einsum("bkgle,bkse->bkgls", q_BxKxGxLxE, k_BxKxSxE,
                                  preferred_element_type=jnp.float32) * scale
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS + bias_BxLxS[:, None, None], axis=-1)
    probs_BxKxGxLxS = probs_BxKxGxLxS * has_keys_BxLx1[:, None, None]
    out_BxKxGxLxE = _einsum("bkgls,bkse->bkgle", probs_BxKxGxLxS.astype(v_BxKxSxE.dtype),
                            v_BxKxSxE)
    return out_BxKxGxLxE, (q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, probs_BxKxGxLxS, out_BxKxGxLxE)


def _attend_bwd(residuals, dout_BxKxGxLxE):
    q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, probs_BxKxGxLxS, out_BxKxGxLxE = residuals
    scale = q_BxKxGxLxE.shape[-1] ** -0.5
    dv_BxKxSxE = _contract_queries(probs_BxKxGxLxS.astype(dout_BxKxGxLxE.dtype), dout_BxKxGxLxE)
    dprobs_BxKxGxLxS = jnp.einsum("bkgle,bkse->bkgls", dout_BxKxGxLxE, v_BxKxSxE,
                                  preferred_element_type=jnp.float32)
    # sum_s p * dp = sum_e do * o: the softmax backward's row sum, over E instead of S
    rowsum_BxKxGxLx1 = jnp.sum(dout_BxKxGxLxE.astype(jnp.float32)
                               * out_BxKxGxLxE.astype(jnp.float32), axis=-1, keepdims=True)
    dscores_BxKxGxLxS = (probs_BxKxGxLxS * (dprobs_BxKxGxLxS - rowsum_BxKxGxLx1)
                         * scale).astype(q_BxKxGxLxE.dtype)
    dq_BxKxGxLxE = _einsum("bkgls,bkse->bkgle", dscores_BxKxGxLxS, k_BxKxSxE)
    dk_BxKxSxE = _contract_queries(dscores_BxKxGxLxS, q_BxKxGxLxE)
    return dq_BxKxGxLxE, dk_BxKxSxE, dv_BxKxSxE, None, None  # the mask gets no gradient


_attend.defvjp(_attend_fwd, _attend_bwd)


def _einsum(spec: str, a, b) -> jax.Array:
    """einsum in a's dtype; half-precision products summed in fp32 and rounded once."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _contract_queries(a_BxKxGxLxS, b_BxKxGxLxE) -> jax.Array:
    """sum over the queries (g, l) of a^T b: [B, K, S, E], the form of dv and dk. In half precision
    a^T is made a row-major array first: XLA:CPU runs a product contracted over its left
    operand's leading axis in fp32 (see matmul.half_matmul_grads)."""
    if a_BxKxGxLxS.dtype not in HALF_DTYPES:
        return jnp.einsum("bkgls,bkgle->bkse", a_BxKxGxLxS, b_BxKxGxLxE)
    B, K, G, L, S = a_BxKxGxLxS.shape
    a_BxKxSxN = row_major(a_BxKxGxLxS.reshape(B, K, G * L, S).swapaxes(-1, -2))
    return _einsum("bksn,bkne->bkse", a_BxKxSxN, b_BxKxGxLxE.reshape(B, K, G * L, -1))
