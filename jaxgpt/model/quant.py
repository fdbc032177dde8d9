"""Weights in int8 / int4: the quantization math (QLoRA's frozen base, the decoding engine, GGUF's
blocks kept as they are) and the matmul that reads them, and the engine's weights (model.weights).

A quantized matrix is a dict beside (or instead of) its fp32 w, read in w's [K, N] orientation:
    q      int8 (or jnp.int4, QLoRA's) of w's shape             w = q * scale (+ min)
    q4     int8 [K // 2, N], two int4 nibbles a byte: in each group of g rows, row j in the low
           nibble and row j + g/2 in the high one (GGUF's Q4_0 / Q4_1 block order)
    scale  [G, N] fp32, one per group of K // G rows (G = 1: per output channel)
    min    [G, N] fp32, optional: an offset per group, q4's nibbles then unsigned 0..15 (GGUF's
           Q4_1: w = d q + m)
A Dense layer stores them as w_q / w_q4 / w_scale / w_min; the tied embedding as wte_q ... in its
own [V, D] orientation (the head multiplies by its transpose: `rows=True`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxgpt import hardware

QMAX = {"int8": 127, "int4": 7}
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
KEYS = ("q", "q4", "scale", "min")
# model.weights=int4's group: GGUF's Q4 block (kept blocks and ours share a layout); groups of 32
# and 64 rows ran alike in experiments/quant_probe.py, and 32 rounds closer
INT4_GROUP = 32
# XLA:CPU converts a dot's integer operand to fp32 first (a fusion writing it whole): chunks of
# this many fp32 bytes stay in a core's cache between that write and the dot's read
CHUNK_BYTES = 4 << 20


def quantize(w_KxN: jax.Array, qtype: str, group: int) -> tuple[jax.Array, jax.Array]:
    """(q [K, N] int8/int4, scale [K // group, N] fp32): symmetric absmax per group of rows; a
    group that does not divide K falls back to one group (per output channel)."""
    K, N = w_KxN.shape[-2:]
    g = group if 0 < group <= K and K % group == 0 else K
    w_GxgxN = w_KxN.reshape(*w_KxN.shape[:-2], K // g, g, N).astype(jnp.float32)
    scale = jnp.max(jnp.abs(w_GxgxN), axis=-2) / QMAX[qtype]
    q = jnp.round(w_GxgxN / jnp.where(scale == 0, 1.0, scale)[..., None, :])
    q = jnp.clip(q, -QMAX[qtype], QMAX[qtype]).astype(QTYPES[qtype])
    return q.reshape(w_KxN.shape), scale


def dequantize(q_KxN: jax.Array, scale_GxN: jax.Array, dtype) -> jax.Array:
    """q * its group's scale, [K, N] in `dtype`."""
    K, N = q_KxN.shape
    G = scale_GxN.shape[0]
    w = q_KxN.reshape(G, K // G, N).astype(jnp.float32) * scale_GxN[:, None, :]
    return w.reshape(K, N).astype(dtype)


def pack_int4(q_KxN: jax.Array, scale_GxN: jax.Array) -> dict:
    """{"q4", "scale"} of int4 values q (-8..7, any integer dtype), packed in the group order."""
    K, N = q_KxN.shape
    G = scale_GxN.shape[0]
    q_Gx2xhxN = q_KxN.astype(jnp.int8).reshape(G, 2, K // G // 2, N)
    lo, hi = q_Gx2xhxN[:, 0], q_Gx2xhxN[:, 1]
    return {"q4": ((lo & 0xF) | (hi << 4)).reshape(K // 2, N), "scale": scale_GxN}


def nibbles(q4: jax.Array, unsigned: bool = False) -> tuple[jax.Array, jax.Array]:
    """The low and high int4 values of packed bytes, as int8, by int8 shifts (jnp.int4 ran 5-10x
    slower in XLA:CPU's matvec, experiments/quant_probe.py); unsigned: 0..15 (with a min)."""
    if unsigned:
        return q4 & 0xF, (q4 >> 4) & 0xF
    return (q4 << 4) >> 4, q4 >> 4


def _dot(x_MxK, w_KxN, rows: bool) -> jax.Array:
    dims = (((1,), (1,)), ((), ())) if rows else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(x_MxK, w_KxN, dims, preferred_element_type=jnp.float32)


def _matmul(x_MxK: jax.Array, w: dict, rows: bool) -> jax.Array:
    """x @ w in fp32 for one chunk of w's columns (see matmul)."""
    M, K = x_MxK.shape
    scale = w["scale"]
    N, G = scale.shape if rows else scale.shape[::-1]
    if "q4" not in w and "min" not in w and G == 1:  # per channel: the scale after the dot
        return _dot(x_MxK, w["q"].reshape((N, K) if rows else (K, N)).astype(jnp.float32),
                    rows) * scale.reshape(N)
    if "q4" in w:  # each group's low halves, then its high halves
        q4 = w["q4"].reshape((N, G, -1) if rows else (G, -1, N))
        parts, x_MxGxPxh = nibbles(q4, "min" in w), x_MxK.reshape(M, G, 2, -1)
        xs = [x_MxGxPxh[:, :, i].reshape(M, -1) for i in range(2)]
    else:
        parts, xs = [w["q"].reshape((N, G, -1) if rows else (G, -1, N))], [x_MxK]
    expand = (lambda a: a[:, :, None]) if rows else (lambda a: a[:, None, :])  # noqa: E731
    y_MxN = jnp.zeros((M, N), jnp.float32)
    for x_part, q_part in zip(xs, parts, strict=True):
        w_part = q_part.astype(jnp.float32) * expand(scale)
        if "min" in w:
            w_part = w_part + expand(w["min"])
        y_MxN = y_MxN + _dot(x_part, w_part.reshape((N, -1) if rows else (-1, N)), rows)
    return y_MxN


def matmul(x_MxK: jax.Array, w: dict, out_dtype, rows: bool = False) -> jax.Array:
    """x @ w in fp32 (rows: x @ w.T, w stored [N, K] with scale [N, G]). XLA:CPU converts an
    integer operand before its dot, so each chunk of CHUNK_BYTES of fp32 weights is dequantized
    just before its dot and read back from cache: a step reads the int8/int4 bytes from memory."""
    x_MxK = x_MxK.astype(jnp.float32)
    M, K = x_MxK.shape
    N = w["scale"].shape[0 if rows else 1]
    if "q" in w and not rows:  # a Dense layer's q has its w's shape
        w = {**w, "q": w["q"].reshape(K, N)}
    n = -(-N // -(-K * N * 4 // CHUNK_BYTES))  # columns a chunk
    # off the CPU one dot: XLA:GPU can fuse the conversion into its matmul (not measured here)
    if n >= N or hardware.compute_platform() != "cpu":
        return _matmul(x_MxK, w, rows).astype(out_dtype)
    axis = lambda v: 0 if rows else v.ndim - 1  # noqa: E731

    def chunk(start, size):
        part = {k: jax.lax.dynamic_slice_in_dim(v, start, size, axis(v)) for k, v in w.items()}
        return _matmul(x_MxK, part, rows)
    y_CxMxn = jax.lax.map(lambda c: chunk(c * n, n), jnp.arange(N // n))
    parts = [y_CxMxn.transpose(1, 0, 2).reshape(M, -1)]
    if N % n:  # the last, shorter chunk
        parts.append(chunk(N - N % n, N % n))
    return jnp.concatenate(parts, axis=1).astype(out_dtype)


def embed(w: dict, tokens) -> jax.Array:
    """Rows `tokens` of a [V, D] table stored in rows=True's layout, dequantized in fp32: only the
    gathered rows are converted."""
    scale_TxG = w["scale"][tokens]
    G = scale_TxG.shape[-1]
    if "q4" in w:
        q4_TxGxh = w["q4"][tokens].reshape(-1, G, w["q4"].shape[-1] // G)
        q_TxGxg = jnp.concatenate(nibbles(q4_TxGxh, "min" in w), axis=-1)
    else:
        q_TxGxg = w["q"][tokens].reshape(-1, G, w["q"].shape[-1] // G)
    x = q_TxGxg.reshape(*tokens.shape, G, -1).astype(jnp.float32) * scale_TxG[..., None]
    if "min" in w:
        x = x + w["min"][tokens][..., None]
    return x.reshape(*x.shape[:-2], -1)


def dequantized(w: dict, rows: bool = False) -> jax.Array:
    """The fp32 values of a quantized matrix, as stored: [K, N] (rows: [N, K])."""
    scale = w["scale"]
    N, G = scale.shape if rows else scale.shape[::-1]
    if "q4" in w:
        q4 = w["q4"].reshape((N, G, -1) if rows else (G, -1, N))
        q = jnp.concatenate(nibbles(q4, "min" in w), axis=-1 if rows else 1)
    else:
        q = w["q"].reshape((N, G, -1) if rows else (G, -1, N))
    expand = (lambda a: a[:, :, None]) if rows else (lambda a: a[:, None, :])  # noqa: E731
    x = q.astype(jnp.float32) * expand(scale) + (expand(w["min"]) if "min" in w else 0.0)
    return x.reshape((N, -1) if rows else (-1, N))


def float_params(params: dict, shapes: dict) -> dict:
    """params with every quantized matrix back in fp32 as its float param (shapes: the model's
    abstract params), e.g. to train from or write out a model kept quantized."""
    def walk(tree: dict, like: dict) -> dict:
        out = {k: walk(v, like[k]) if isinstance(v, dict) else v for k, v in tree.items()
               if not any(k == f"{n}_{key}" for n in ("w", "wte", "lm_head") for key in KEYS)}
        for name in ("w", "wte", "lm_head"):
            if (w := stored(tree, name)) is not None:
                out[name] = dequantized(w, rows=name == "wte").reshape(like[name].shape)
        return out
    return walk(params, shapes)


def stored(params: dict, name: str) -> dict | None:
    """The quantized matrix `name` (w, wte, lm_head) of a params dict: {"q", "scale", ...}."""
    found = {key: params[f"{name}_{key}"] for key in KEYS if f"{name}_{key}" in params}
    return found if "scale" in found else None


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def split_dims(spec: P, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(stacked layers, K, N) of a matrix from its logical axes: its first named axis is the input
    one when it is "embed" (x_D @ w[D, ...]), else the last ("embed") is the output."""
    stack = 1 if spec and spec[0] == "layers" else 0
    dims, names = shape[stack:], tuple(spec)[stack:]
    if names[0] == "embed":
        return stack, dims[0], math.prod(dims[1:])
    return stack, math.prod(dims[:-1]), dims[-1]


def quantized_matrix(w_KxN: jax.Array, weights: str) -> dict:
    """model.weights' layout of one matrix: int8 per output channel (symmetric), or int4 packed in
    groups with a min, GGUF's Q4_1 (16 levels from each group's min to its max: the symmetric
    form's 15 around zero cost 0.2 bits per byte on SmolLM2, experiments/quant_quality.py)."""
    if weights == "int8":
        q, scale = quantize(w_KxN, "int8", w_KxN.shape[0])
        return {"q": q, "scale": scale}
    K, N = w_KxN.shape
    g = INT4_GROUP if K % INT4_GROUP == 0 else K
    w_GxgxN = w_KxN.reshape(K // g, g, N).astype(jnp.float32)
    low_GxN, high_GxN = w_GxgxN.min(axis=1), w_GxgxN.max(axis=1)
    scale_GxN = (high_GxN - low_GxN) / 15
    q = jnp.round((w_GxgxN - low_GxN[:, None]) / jnp.where(scale_GxN == 0, 1.0, scale_GxN)[:, None])
    return {**pack_int4(jnp.clip(q, 0, 15).reshape(K, N), scale_GxN), "min": low_GxN}


def quantize_params(params: dict, logical_axes, weights: str) -> dict:
    """Unscanned params with every fp32 projection and the output head in `weights` (int8 |
    int4), the head (the tied embedding's rows) int8 in both; matrices already quantized (a
    GGUF's blocks kept) stay as they are."""
    specs = {path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        logical_axes, is_leaf=lambda s: isinstance(s, P))}
    one = jax.jit(quantized_matrix, static_argnums=1)

    def walk(tree: dict, prefix: str) -> dict:
        out = {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                out[key] = walk(value, name + "/")
            elif key == "w" and value.ndim >= 2:
                stack, K, N = split_dims(specs[name], value.shape)
                assert stack == 0, "decoding runs unscanned layers (GPT.for_decoding)"
                qm = one(value.reshape(K, N), weights)
                if "q" in qm:
                    qm["q"] = qm["q"].reshape(value.shape)
                out.update({f"w_{k}": v for k, v in qm.items()})
            elif key == "wte":  # the tied head reads it as [D, V]: its rows quantized
                qm = one(value.T, "int8")
                out.update({"wte_q": qm["q"].T, "wte_scale": qm["scale"].T})
            elif key == "lm_head":
                out.update({f"lm_head_{k}": v for k, v in one(value, "int8").items()})
            else:
                out[key] = value
        return out
    return walk(params, "")


def decode_params(model, params) -> dict:
    """params as the engine keeps them: quantized as model.weights says, the other matrices in the
    compute dtype once (in bf16 a step would otherwise convert 500 MB of fp32 weights; the model
    casts them to the compute dtype anyway, so nothing changes)."""
    if model.cfg.weights != "float":
        params = quantize_params(params, model.logical_axes, model.cfg.weights)
    compute = jnp.dtype(model.cfg.dtype)

    def cast(path, x):
        kept = path_name(path).endswith(("_scale", "_min"))  # read in fp32 by matmul
        if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and not kept:
            return x.astype(compute)
        return x
    return jax.tree_util.tree_map_with_path(cast, params)
