"""Probe: which int8 / int4 weight layout XLA:CPU multiplies fastest at batch 1 (90 matrix-vector
products 576x1536 in one jitted scan, as a SmolLM2 decode step's MLP), each printed as JSON.

    .venv/bin/python experiments/quant_probe.py [--rows 1] [--reps 20]
    .venv/bin/python experiments/quant_probe.py --hlo    # SmolLM2's decode step, compiled

--hlo: one decode step of a SmolLM2-135M-shaped model (random weights) per model.weights, compiled
for this host; prints the largest fp32 array its program writes (a dequantized copy of a whole
matrix would be >= 576 x 1536 x 2 elements, the head's 576 x 49152) and each matrix chunk's.
"""
from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.model import quant
from jaxgpt.model.gpt import GPT

K, N, LAYERS = 576, 1536, 90


def scan(matvec, w, x_MxK):
    def one(x, w_layer):
        y = matvec(x, w_layer)
        return x + y[:, :K] * 1e-3, None
    return jax.lax.scan(one, x_MxK, w)[0]


def variants(w_LxKxN):
    def int8(group):
        return jax.vmap(lambda w: dict(zip(("q", "scale"), quant.quantize(w, "int8", group),
                                           strict=True)))
    channel, grouped = int8(K), int8(32)
    mm = lambda x, w: quant.matmul(x, w, jnp.float32)  # noqa: E731
    out = {"fp32": (lambda x, w: x @ w, w_LxKxN),
           "int8_channel": (mm, channel(w_LxKxN)), "int8_g32": (mm, grouped(w_LxKxN)),
           "int4_jnp_dequantized_g32": (
               lambda x, w: x @ quant.dequantize(w[0], w[1], jnp.float32),
               jax.vmap(lambda w: quant.quantize(w, "int4", 32))(w_LxKxN))}
    for g in (32, 64):
        out[f"int4_packed_g{g}"] = (mm, jax.vmap(
            lambda w, g=g: quant.pack_int4(*quant.quantize(w, "int4", g)))(w_LxKxN))
    # stored [N, K] (llama.cpp's orientation): converted in the dot, or multiplied by activations
    # quantized to int8 per row, the int32 products scaled after
    rows = channel(w_LxKxN)
    rows = {"q": rows["q"].swapaxes(1, 2), "scale": rows["scale"][:, 0]}
    out["int8_NxK_converted"] = (lambda x, w: _dot_rows(x, w["q"].astype(jnp.float32))
                                 * w["scale"], rows)
    out["int8_NxK_int8_activations"] = (_int8_activations, rows)
    return out


def _dot_rows(x_MxK, w_NxK, out=jnp.float32):
    return jax.lax.dot_general(x_MxK, w_NxK, (((1,), (1,)), ((), ())),
                               preferred_element_type=out)


def _int8_activations(x_MxK, w):
    scale_Mx1 = jnp.max(jnp.abs(x_MxK), axis=1, keepdims=True) / 127
    x_q = jnp.round(x_MxK / jnp.where(scale_Mx1 == 0, 1.0, scale_Mx1)).astype(jnp.int8)
    return _dot_rows(x_q, w["q"], jnp.int32).astype(jnp.float32) * scale_Mx1 * w["scale"]


SMOLLM2 = dict(preset="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
               d_ff=1536, tie_embeddings=True, seq_len=256)


def largest_f32(hlo: str) -> int:
    """Elements of the largest fp32 array any instruction of a compiled program writes."""
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dims in re.findall(r"= f32\[([0-9,]*)\]", hlo)]
    return max(sizes)


def hlo_check() -> None:
    for weights in ("float", "int8", "int4"):
        model = GPT(ModelConfig(**SMOLLM2, weights=weights).resolved())
        params = quant.decode_params(model, model.init(jax.random.key(0)))
        cache = model.init_cache(1)
        step = jax.jit(lambda p, t, c, m=model: m.apply(p, t, None, jnp.zeros_like(t), cache=c))
        hlo = step.lower(params, jnp.zeros((1, 1), jnp.int32), cache).compile().as_text()
        print(json.dumps({"weights": weights, "largest_f32_elements": largest_f32(hlo),
                          "chunk_elements": quant.CHUNK_BYTES // 4,
                          "weight_mb": round(sum(x.nbytes for x in jax.tree.leaves(params))
                                             / 2**20, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hlo", action="store_true")
    args = ap.parse_args()
    if args.hlo:
        return hlo_check()
    w = jax.random.normal(jax.random.key(0), (LAYERS, K, N)) * 0.02
    x = jax.random.normal(jax.random.key(1), (args.rows, K))
    for name, (matvec, weights) in variants(w).items():
        f = jax.jit(lambda x, w, mv=matvec: scan(mv, w, x))
        f(x, weights).block_until_ready()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            f(x, weights).block_until_ready()
            times.append(time.perf_counter() - t0)
        nbytes = sum(a.nbytes for a in jax.tree.leaves(weights))
        print(json.dumps({"layout": name, "rows": args.rows, "ms": round(1e3 * np.median(times), 2),
                          "weight_mb": round(nbytes / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
