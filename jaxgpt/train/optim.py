"""Optimizers and schedules: optax chains built from an OptimConfig.

AdamW with a weight-decay mask and global-norm clipping, or Muon on the hidden 2-D weight
matrices with AdamW on the rest. Schedules: constant, warmup + cosine, warmup-stable-decay (WSD),
each after a linear warmup and never below `min_lr`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxgpt.config import OptimConfig

EMBEDDINGS = ("wte", "wpe")
MATRICES = ("w", "lm_head")


def schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Learning rate at each step (0-based), as nanoGPT computes it: warmup reaches `peak` at step
    `warmup_steps`, then constant, cosine or WSD decay to `min_lr` at `decay_steps`."""
    peak = cfg.lr if peak is None else peak
    floor = min(cfg.min_lr, peak)
    warmup, end = cfg.warmup_steps, cfg.decay_steps or total_steps

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / (warmup + 1)
        progress = jnp.clip((step - warmup) / max(end - warmup, 1), 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = floor + 0.5 * (1 + jnp.cos(jnp.pi * progress)) * (peak - floor)
        elif cfg.schedule == "wsd":
            decay_start = end - cfg.wsd_decay_fraction * (end - warmup)
            frac = jnp.clip((step - decay_start) / max(end - decay_start, 1), 0.0, 1.0)
            after = peak - frac * (peak - floor)
        else:
            after = jnp.asarray(peak, jnp.float32)
        return jnp.where(step < warmup, warm, after)

    return lr


def _name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params, cfg: OptimConfig):
    """True where weight decay applies: weight matrices, and embeddings only when asked.
    Norm scales and biases never decay. Decided by name, since stacked (scanned) layers make
    every parameter one dimension larger."""
    def decays(path, _):
        name = _name(path)
        return name in MATRICES or (cfg.decay_embeddings and name in EMBEDDINGS)
    return jax.tree_util.tree_map_with_path(decays, params)


def muon_dims(params, logical_axes):
    """Muon's view of each hidden matrix: which axes it reduces over and which it outputs.
    Axes named "layers" or unnamed (the q/k/v or gate/up pairs) are batch axes; embeddings and
    the output head stay with AdamW (None)."""
    def dims(path, spec):
        if _name(path) != "w":
            return None
        named = [i for i, a in enumerate(spec) if a not in (None, "layers")]
        embed = [i for i in named if spec[i] == "embed"]
        rest = tuple(i for i in named if spec[i] != "embed")
        if named[0] in embed:  # x_D @ w[D, ...]: reduce over embed
            return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(embed), output_axis=rest)
        return optax.contrib.MuonDimensionNumbers(reduction_axis=rest, output_axis=tuple(embed))
    return jax.tree_util.tree_map_with_path(dims, logical_axes, is_leaf=lambda s: isinstance(s, P))


def scale_embeddings(params, factor: float) -> optax.GradientTransformation:
    """Multiplies the embedding tables' updates by `factor`: their learning rate is `factor` x lr
    (they do not decay unless optim.decay_embeddings, where the decay scales with it, as a rate
    would)."""
    if factor == 1.0:
        return optax.identity()
    factors = jax.tree_util.tree_map_with_path(
        lambda path, _: factor if _name(path) in EMBEDDINGS else 1.0, params)
    return optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda updates, state, _=None: (jax.tree.map(lambda u, f: u * f if f != 1.0 else u,
                                                     updates, factors), state))


def build(cfg: OptimConfig, total_steps: int, params, logical_axes=None
          ) -> optax.GradientTransformation:
    """The optimizer for this config; `logical_axes` is needed for Muon only."""
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    adam_lr = schedule(cfg, total_steps)
    mask = decay_mask(params, cfg)
    if cfg.name == "muon":
        main = optax.contrib.muon(
            learning_rate=schedule(cfg, total_steps, peak=cfg.muon_lr), beta=cfg.muon_momentum,
            weight_decay=cfg.weight_decay, weight_decay_mask=mask, adam_b1=cfg.b1, adam_b2=cfg.b2,
            adam_weight_decay=cfg.weight_decay, adam_learning_rate=adam_lr,
            muon_weight_dimension_numbers=muon_dims(params, logical_axes))
    else:
        main = optax.adamw(adam_lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask)
    return optax.chain(clip, main, scale_embeddings(params, cfg.embed_lr_scale))
