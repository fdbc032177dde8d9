"""x @ w for the model's projections and output head, with the backward passes each
implementation runs best, and the MLP's activation applied to a product (`activate`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from jaxgpt import hardware
from jaxgpt.model.kernels.choice import HALF_DTYPES

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),   # GPT-2's tanh form
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu2": lambda h: jnp.square(jax.nn.relu(h)),
}


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


def activation(impl: str, name: str, y, b=None) -> jax.Array:
    """The MLP's activation of its first product plus bias, `name` one of ACTIVATIONS.

    Off the CPU the backward pass recomputes it from y and b, which are kept anyway (y is what the
    matmul wrote), instead of keeping a [B, L, F] value from inside it (gelu's tanh). When XLA:GPU's
    matmuls are all cuBLAS calls (hardware.library_matmuls) the bias is added first, so that
    cuBLASLt adds it and applies the gelu in the matmul's epilogue, writing y + b for the backward
    pass beside the activation; Triton's matmuls write the bare product, for which this order would
    cost a kernel more. XLA:CPU keeps its own order (the golden values).
    """
    def forward(y, b):
        return ACTIVATIONS[name](y if b is None else y + b.astype(y.dtype))
    if impl == "cpu":
        return forward(y, b)
    if b is not None and hardware.library_matmuls():
        y, b = y + b.astype(y.dtype), None
    return jax.checkpoint(forward)(y, b)


def row_major(x) -> jax.Array:
    """x stored in its own axis order (a transpose copied, not left a strided view)."""
    return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


# Autodiff of an fp32-accumulated half-precision product gives its two backward products an fp32
# cotangent, which run as fp32 matmuls; rounding it to the operands' dtype first, as mixed
# precision does, keeps all three on the half-precision units (a GPU's tensor cores).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rounded_matmul(x_MxK, w_KxN, out_dtype):
    # asked for in the dtype it is used in: a GPU's matmul sums in fp32 and rounds as it writes,
    # where a later convert would write and read the fp32 result again
    return jnp.dot(x_MxK, w_KxN, preferred_element_type=out_dtype)


def _rounded_matmul_fwd(x_MxK, w_KxN, out_dtype):
    return _rounded_matmul(x_MxK, w_KxN, out_dtype), (x_MxK, w_KxN)


def _rounded_matmul_bwd(out_dtype, residuals, dy_MxN):
    x_MxK, w_KxN = residuals
    return dot_grads(x_MxK, w_KxN, dy_MxN.astype(x_MxK.dtype), w_KxN.dtype)


_rounded_matmul.defvjp(_rounded_matmul_fwd, _rounded_matmul_bwd)


def dot_grads(x_MxK, w_KxN, dy_MxN, dw_dtype):
    """(dy @ w^T in x's dtype, x^T @ dy in dw_dtype), each summed in fp32, written in its dtype."""
    return (jnp.dot(dy_MxN, w_KxN.T, preferred_element_type=x_MxK.dtype),
            jnp.dot(x_MxK.T, dy_MxN, preferred_element_type=dw_dtype))


def _dot(x_MxK, w_KxN, out_dtype) -> jax.Array:
    """x @ w; in bf16/fp16 as an fp32 product rounded once, which XLA:CPU runs on its bf16 units
    (YNNPACK / oneDNN) and the half-precision-output dot, several times slower, does not. A single
    row is padded to two: XLA:CPU runs a half-precision matvec (M = 1, every decode step of one
    sequence) by first converting the whole weight to fp32."""
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
        return half_matmul_grads(x_MxK, w_KxN, dy_MxN.astype(x_MxK.dtype))
    K, N = w_KxN.shape
    if K > N:
        # XLA:CPU (YNNPACK) runs x^T dy slower when the result is tall and narrow (the MLP's [4D, D]
        # down-projection): compute dy^T x and transpose that small result; the barrier stops XLA
        # from folding the transpose back into the product.
        dw_KxN = jax.lax.optimization_barrier(dy_MxN.T @ x_MxK).T
    else:
        dw_KxN = x_MxK.T @ dy_MxN
    return dy_MxN @ w_KxN.T, dw_KxN


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def half_matmul_grads(x_MxK, w_KxN, dy_MxN, dw_dtype=None):
    """The backward products in half precision (dw rounded to dw_dtype, default w's), in the two
    forms XLA:CPU gives to its bf16 units (YNNPACK takes a dot whose left operand is contracted on
    its last axis; any other form XLA:CPU converts to fp32 first). dx: dy against w's rows, as one
    dot_general (written as dy @ w.T, XLA:CPU converted it). dw: x^T materialized row-major by a
    layout constraint (x.T alone becomes a transposed view, the form it converts)."""
    dx_MxK = jax.lax.dot_general(dy_MxN, w_KxN, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    x_KxM = row_major(x_MxK.T)
    dw_KxN = jnp.dot(x_KxM, dy_MxN, preferred_element_type=jnp.float32)
    return dx_MxK.astype(x_MxK.dtype), dw_KxN.astype(dw_dtype or w_KxN.dtype)
