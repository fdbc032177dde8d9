"""LayerNorm and RMSNorm over the last axis, with the backward passes each implementation runs
best: "cpu" a hand-written one, elsewhere one handed each row's statistics."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def normalize(impl: str, x, scale_D, bias_D, eps: float, center: bool) -> jax.Array:
    """(x - mean) / std * scale + bias over the last axis (LayerNorm); uncentered, RMSNorm."""
    if impl == "cpu":
        return _normalize(x, scale_D, bias_D, eps, center)
    return _normalize_keeping_stats(x, scale_D, bias_D, eps, center)


# Off the CPU the backward pass gets x and each row's mean and 1/std. Under autodiff XLA recomputed
# the statistics inside the kernel multiplying dy by the normalized x, then wrote that fp32 product
# out for the scale's gradient and read it back: an fp32 array per norm each step, for nothing.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize_keeping_stats(x, scale_D, bias_D, eps: float, center: bool):
    return _stats_fwd(x, scale_D, bias_D, eps, center)[0]


def _stats_fwd(x, scale_D, bias_D, eps, center):
    # mean and mean square in one read of x (sibling reductions: one kernel), taken about each
    # row's first element so that a mean far from 0 does not cancel the variance away
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
    # the statistics made here are the ones kept: without the barrier XLA folds their making into
    # the backward's kernels again (and writes the fp32 product as before)
    mean, rstd = jax.lax.optimization_barrier((mean, rstd))
    return (x - mean) * rstd * scale_D + bias_D, (x, mean, rstd, scale_D)


def _stats_bwd(eps, center, residuals, dy):
    x, mean, rstd, scale_D = residuals
    return _normalize_bwd(eps, center, ((x - mean) * rstd, rstd, scale_D), dy)


_normalize_keeping_stats.defvjp(_stats_fwd, _stats_bwd)


# A hand-written backward: two row reductions instead of autodiff's four, which XLA:CPU runs faster.
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
