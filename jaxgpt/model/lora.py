"""Low-rank adapters (LoRA) and weights stored in int8 / int4 (QLoRA's frozen base), as plain
pytrees beside the model's params.

A targeted matrix w (a Dense layer's "w", [*in, *out], seen as K x N) gains two trainable leaves
beside it, lora_a [K, r] and lora_b [r, N] (b starts at zero, so the model starts as the base), and
a frozen lora_scale = alpha / r; the layer computes x @ w + scale * (x @ a) @ b (layers.Dense), so
the base's weight gradient is never formed. Stacked (scanned) layers carry their layer axis first
on every leaf. `merge` folds the adapters into w for an export: w + scale * a @ b.

    adapters = init_adapters(rng, params, logical_axes, rank=8, targets=DEFAULT_TARGETS)
    base = with_scales(quantize_tree(params, "int4", 64, targets), adapters, alpha=16)
    logits = model.apply(combine(base, adapters), tokens)

Quantized storage (`quantize_tree`): w becomes w_q (int8 or int4, w's shape, so w's sharding
applies) and w_scale [K // group, N] (fp32 absmax scales, one per group of `group` input rows), read
back by `dequantize` inside the layer (model/quant.py holds the math).
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxgpt.config import TrainConfig
from jaxgpt.errors import ConfigError
from jaxgpt.model.quant import (  # noqa: F401 - the quantization math, also lora's names
    QMAX,
    QTYPES,
    dequantize,
    path_name,
    quantize,
    split_dims,
)

# attention's q, kv and output projections and the MLP's matrices, in any block
DEFAULT_TARGETS = TrainConfig.lora_targets
ADAPTER_NAMES = ("lora_a", "lora_b")


def _targets(params, logical_axes, targets: str) -> dict[str, tuple]:
    """{path: (stack shape, K, N)} of the matrices `targets` (a regex over paths) matches."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ConfigError(f"train.lora_targets={targets!r}: not a regular expression ({e})") from e
    specs = {path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        logical_axes, is_leaf=lambda s: isinstance(s, P))}
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path_name(path)
        if name.endswith("/w") and pattern.search(name):
            stack, K, N = split_dims(specs[name], leaf.shape)
            found[name] = (leaf.shape[:stack], K, N)
    if not found:
        raise ConfigError(f"train.lora_targets={targets!r} matches no weight matrix (paths look "
                          "like blocks/attn/wq/w or block_0/mlp/w_up/w)")
    return found


def _set(tree: dict, name: str, key: str, value) -> None:
    node = tree
    for part in name.split("/")[:-1]:
        node = node.setdefault(part, {})
    node[key] = value


def init_adapters(rng, params, logical_axes, rank: int, targets: str = DEFAULT_TARGETS) -> dict:
    """The adapters of every targeted matrix: a uniform in +-1/sqrt(K) (as PEFT), b zero."""
    adapters: dict = {}
    for i, (name, (stack, K, N)) in enumerate(sorted(_targets(params, logical_axes,
                                                              targets).items())):
        bound = 1.0 / math.sqrt(K)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*stack, K, rank), jnp.float32,
                               -bound, bound)
        _set(adapters, name, "lora_a", a)
        _set(adapters, name, "lora_b", jnp.zeros((*stack, rank, N), jnp.float32))
    return adapters


def abstract_adapters(params, logical_axes, rank: int, targets: str = DEFAULT_TARGETS) -> dict:
    """The adapters' shapes and dtypes (checkpoint and export read targets)."""
    return jax.eval_shape(lambda: init_adapters(jax.random.key(0), params, logical_axes, rank,
                                                targets))


def frozen_base(params, logical_axes, adapters, t: TrainConfig) -> dict:
    """What a LoRA run (`t`: its train section) keeps frozen beside its adapters (or their
    shapes): the base's params, quantized as t.lora_base says, with the adapters' scales."""
    quantized = quantize_tree(params, logical_axes, t.lora_base, t.lora_group, t.lora_targets)
    return with_scales(quantized, adapters, t.lora_alpha)


def merged_params(params, logical_axes, adapters, t: TrainConfig) -> dict:
    """Full params from the base's and a LoRA run's adapters, the base quantized first as in
    training (QLoRA's adapters were trained against that base)."""
    return jax.jit(merge)(frozen_base(params, logical_axes, adapters, t), adapters)


def combine(*trees: dict) -> dict:
    """One params tree from trees with disjoint leaves (base, scales, adapters)."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = combine(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _modules(tree: dict, prefix: str = ""):
    """(path, node) of every dict holding lora_a."""
    if "lora_a" in tree:
        yield prefix, tree
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _modules(value, f"{prefix}/{key}" if prefix else key)


def with_scales(base: dict, adapters: dict, alpha: float) -> dict:
    """base with lora_scale = alpha / r beside each adapted matrix (frozen, like the base)."""
    scales: dict = {}
    for path, node in _modules(adapters):
        stack, rank = node["lora_a"].shape[:-2], node["lora_a"].shape[-1]
        _set(scales, f"{path}/w", "lora_scale", jnp.full(stack, alpha / rank, jnp.float32))
    return combine(base, scales)


def _map_matrices(tree: dict, fn, prefix: str = "") -> dict:
    """tree with each layer's dict that holds a matrix (w, or w_q) replaced by fn(path, dict)."""
    if "w" in tree or "w_q" in tree:
        return fn(prefix, tree)
    return {key: _map_matrices(value, fn, f"{prefix}/{key}" if prefix else key)
            if isinstance(value, dict) else value for key, value in tree.items()}


def quantize_tree(params: dict, logical_axes, qtype: str, group: int,
                  targets: str = DEFAULT_TARGETS) -> dict:
    """params with each targeted w stored as w_q + w_scale (qtype "float32": unchanged)."""
    if qtype == "float32":
        return params
    found = _targets(params, logical_axes, targets)

    def quantized(path: str, node: dict) -> dict:
        if f"{path}/w" not in found:
            return node
        stack, K, N = found[f"{path}/w"]
        w = node["w"]
        q, scale = jax.jit(quantize, static_argnums=(1, 2))(w.reshape(*stack, K, N), qtype, group)
        rest = {k: v for k, v in node.items() if k != "w"}
        return {**rest, "w_q": q.reshape(w.shape), "w_scale": scale}
    return _map_matrices(params, quantized)


def merge(base: dict, adapters: dict) -> dict:
    """Full params: every adapted w replaced by w + scale * a @ b (a quantized w dequantized
    first, in fp32); the lora_scale leaves gone."""
    deltas = {path: node for path, node in _modules(adapters)}
    dropped = ("w", "w_q", "w_scale", "lora_scale", *ADAPTER_NAMES)

    def merged(path: str, node: dict) -> dict:
        rest = {k: v for k, v in node.items() if k not in dropped}
        return {**rest, "w": _merged(node, deltas.get(path))}
    return _map_matrices(base, merged)


def _merged(node: dict, adapter: dict | None) -> jax.Array:
    w = node.get("w")
    shape = (w if w is not None else node["w_q"]).shape
    if w is None:  # quantized: dequantized per layer of a stack
        q, s = node["w_q"], node["w_scale"]
        G, N = s.shape[-2:]
        K = math.prod(shape) // (math.prod(s.shape[:-2]) * N)
        flat_q, flat_s = q.reshape(-1, K, N), s.reshape(-1, G, N)
        w = jnp.stack([dequantize(a, b, jnp.float32) for a, b in zip(flat_q, flat_s, strict=True)])
    w = jnp.asarray(w, jnp.float32)
    if adapter is None:
        return w.reshape(shape)
    a, b = adapter["lora_a"], adapter["lora_b"]
    scale = node["lora_scale"][..., None, None]
    K, N = a.shape[-2], b.shape[-1]
    delta = scale * jnp.einsum("...kr,...rn->...kn", a, b, precision="highest")
    return (w.reshape(*a.shape[:-2], K, N) + delta).reshape(shape)
