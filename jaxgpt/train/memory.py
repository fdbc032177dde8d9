"""Memory planning: what one train step needs on each device, known before the step is compiled.

    plan = memory.estimate(trainer)         # by tracing: seconds even for GPT-2 small
    plan.per_device                         # bytes: params, optimizer, gradients, activations,
                                            # batch, reference (DPO's, in the step), total
    memory.check_fits(trainer)              # raises OutOfMemory naming the knobs that would fit
    trainer = memory.trainer_for(cfg, devices)  # a config's trainer with no data: shapes only

(perf/aot.py's `analyze` sets the estimate beside XLA's analysis of the compiled step.)

The estimate adds up what a step holds at once on one device: its shard of the params and of the
optimizer state (exact: their shardings' shard shapes), the gradients (fp32, sharded like the
params; twice with optim.grad_accum > 1, the running sum beside one micro-batch's), the values the
backward pass keeps from the forward for one micro-batch (the residuals of `jax.vjp`, found by
tracing the loss, nothing computed: activations and the compute-dtype copies of the weights), each
at the size of its shard (saved_for_backward), the batch, and what the step reads frozen beside
the state (LoRA's base; a DPO or GRPO run's reference params when its step reads them). XLA's own
figure for the compiled step is the one that decides; `python -m jaxgpt.bench compile` prints both,
so the gap is visible (see RESULTS.md).
The limit is mesh.device_memory_gb, else what the device reports (GPUs and TPUs do, a CPU does not:
there the check is off unless the config states a memory).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt import config as config_lib
from jaxgpt.data import tokenizer
from jaxgpt.errors import ConfigError, JaxgptError
from jaxgpt.parallel import sharding
from jaxgpt.train.trainer import Trainer

GB = 1e9
BATCH_KEYS = (("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
              ("loss_mask", jnp.float32))


class OutOfMemory(JaxgptError):
    pass


class Plan(NamedTuple):
    cfg: config_lib.Config
    mesh: dict              # axis -> size
    # bytes per device: params, optimizer, gradients, activations, batch, frozen, total
    per_device: dict


def _shard_bytes(abstract_tree, shardings) -> int:
    """Bytes of the largest shard of each leaf, summed: what one device holds of the tree."""
    return sum(_nbytes(s.shard_shape(x.shape), x.dtype)
               for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings),
                               strict=False))


def abstract_batch(cfg: config_lib.Config, mesh=None) -> dict:
    """The shapes of a global batch ([B, L] arrays), placed batch-sharded on `mesh` when given; a
    DPO run's scored beforehand (dpo.reference=precompute) also carry the reference's
    log-probabilities."""
    shape = (cfg.data.batch_size, cfg.model.seq_len)
    where = sharding.batch_sharding(mesh) if mesh is not None else None
    keys = BATCH_KEYS + ((("ref_logps", jnp.float32),) if _dpo_reference(cfg) == "precompute"
                         else ())
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=where) for k, dtype in keys}


def _dpo_reference(cfg: config_lib.Config) -> str | None:
    """Where a DPO run's reference log-probabilities come from (dpo.reference), None for other
    runs."""
    return cfg.dpo.reference if cfg.data.preferences else None


def frozen_params(trainer, placed: bool = False) -> tuple:
    """The shapes of what the train step reads beside the state: LoRA's frozen base, DPO's
    reference params with dpo.reference=step (placed as the step places them when `placed`)."""
    if not placed:
        return trainer.frozen_shapes
    return tuple(sharding.placed(shape, s) for shape, s in zip(trainer.frozen_shapes,
                                                               trainer.frozen_shardings,
                                                               strict=True))


def saved_for_backward(loss, params, batch, mesh=None) -> int:
    """Bytes per device that the backward pass of `loss` keeps from its forward pass (its residuals,
    the values `jax.vjp` closes over), less those that are its inputs themselves (an fp32 model's
    weights are kept, but they are the params, counted once already). The matmuls' reshaped weights
    still count: copies in bf16, in fp32 views that XLA usually need not copy (an overcount of about
    the params' size there).

    `params` and `batch` are shapes placed on `mesh` (None: one device). Without tensor parallelism
    every residual splits over the batch's devices, so tracing alone gives the answer. With it, the
    heads' and the MLP's values split over `tensor` too while the residual stream does not, so the
    residuals are compiled for the mesh (the forward pass alone) and each counted at its shard's
    size, where dividing by data x fsdp would overcount them about tensor-fold
    (experiments/RESULTS.md, "Memory plans")."""
    def residuals(params, batch):
        inputs = {id(x) for x in jax.tree.leaves((params, batch))}
        saved = jax.tree.leaves(jax.vjp(lambda p: loss(p, batch), params)[1])
        return [x for x in saved if id(x) not in inputs]

    if mesh is None or mesh.shape["tensor"] == 1:
        shards = 1 if mesh is None else sharding.data_shards(mesh)
        return sum(_nbytes(x.shape, x.dtype)
                   for x in jax.eval_shape(residuals, params, batch)) // shards
    with sharding.on_mesh(mesh):
        lowered = jax.jit(residuals).lower(params, batch)
        shardings = lowered.compile().output_shardings
    return sum(_nbytes(s.shard_shape(x.shape), x.dtype)
               for x, s in zip(lowered.out_info, shardings, strict=False))


def _nbytes(shape, dtype) -> int:
    # int4 (QLoRA's base) is stored two to a byte, though numpy's itemsize says 1
    bits = 4 if jnp.dtype(dtype) in (jnp.int4, jnp.uint4) else 8 * jnp.dtype(dtype).itemsize
    return math.prod(shape) * bits // 8


def with_pretrained_vocab(cfg: config_lib.Config) -> config_lib.Config:
    """cfg with model.vocab_size known without opening the data: as set, or a pretrained
    tokenizer's size."""
    if cfg.model.vocab_size:
        return cfg
    if tokenizer.parse_spec(cfg.data.tokenizer).kind != "pretrained":
        raise ConfigError(f"model.vocab_size=0 and data.tokenizer={cfg.data.tokenizer} is built "
                          "from the data: set model.vocab_size to plan without the data")
    n_vocab = tokenizer.Tokenizer.from_spec(cfg.data.tokenizer).n_vocab
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=n_vocab))


def trainer_for(cfg: config_lib.Config, devices=None) -> Trainer:
    """The Trainer of cfg (model, mesh, optimizer, step) with no data opened: shapes only."""
    return Trainer(with_pretrained_vocab(cfg), devices, open_data=False)


def estimate(trainer: Trainer) -> Plan:
    """Per-device bytes of one train step of the trainer's config on its mesh, by tracing only."""
    cfg = trainer.cfg
    mesh = trainer.mesh
    state = trainer.abstract_state()
    shards = sharding.data_shards(mesh)
    trained_sharding = trainer.state_sharding.params
    placed_params = sharding.placed(state.params, trained_sharding)
    micro = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // cfg.optim.grad_accum)
    micro_batch = abstract_batch(dataclasses.replace(cfg, data=micro), mesh)
    # the trained params' residuals; a frozen reference's forward (in the step) keeps none
    residuals = saved_for_backward(lambda p, b: trainer.step_loss(p, b[0], None, *b[1])[0],
                                   placed_params,
                                   (micro_batch, frozen_params(trainer, placed=True)), mesh)
    params = _shard_bytes(state.params, trained_sharding)
    grads_f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), state.params)
    per_device = {
        "params": params,
        "optimizer": _shard_bytes(state.opt_state, trainer.state_sharding.opt_state),
        "gradients": (_shard_bytes(grads_f32, trained_sharding)
                      * (2 if cfg.optim.grad_accum > 1 else 1)),
        "activations": residuals,
        "batch": sum(_nbytes(x.shape, x.dtype) for x in abstract_batch(cfg).values()) // shards,
        # LoRA's base, DPO's reference params: kept beside the state
        "frozen": sum(_shard_bytes(f, s) for f, s in zip(trainer.frozen_shapes,
                                                         trainer.frozen_shardings, strict=True)),
    }
    per_device["total"] = sum(per_device.values())
    return Plan(cfg, dict(mesh.shape), per_device)


def device_limit(cfg: config_lib.Config, devices=None) -> tuple[float | None, str]:
    """(bytes one device may use, where that figure comes from); None when nothing states one."""
    if cfg.mesh.device_memory_gb > 0:
        return cfg.mesh.device_memory_gb * GB, "mesh.device_memory_gb"
    # one of this process's own devices: another host's cannot report its memory here
    device = next((d for d in devices or () if d.process_index == jax.process_index()),
                  jax.local_devices()[0])
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"]), f"{device.device_kind} memory"
    return None, "no limit known (set mesh.device_memory_gb)"


def _mesh_overrides(cfg: config_lib.Config, fsdp: int, n_devices: int) -> list[str]:
    tensor = cfg.mesh.tensor if cfg.mesh.tensor > 0 else 1
    return [f"mesh.fsdp={fsdp}", f"mesh.data={n_devices // (fsdp * tensor)}"]


def alternatives(trainer: Trainer) -> list[tuple[str, float]]:
    """The knobs that lower a step's memory, each on its own, with the per-device bytes each gives:
    remat, the smallest grad_accum (and the largest fsdp) that fits the limit (else the largest
    tried)."""
    cfg, mesh = trainer.cfg, trainer.mesh
    devices, n = list(mesh.devices.flat), mesh.devices.size
    limit, _ = device_limit(cfg, devices)
    limit = float("inf") if limit is None else limit
    shards = sharding.data_shards(mesh)

    def total(overrides):
        changed = config_lib.validate(config_lib.apply_overrides(cfg, overrides))
        return estimate(trainer_for(changed, devices)).per_device["total"]

    def first_fit(options):
        tried = None
        for overrides in options:
            tried = (" ".join(overrides), total(overrides))
            if tried[1] <= limit:
                break
        return [tried] if tried else []

    out = [] if cfg.model.remat else [("model.remat=true", total(["model.remat=true"]))]
    accum = [a for a in (2, 4, 8, 16, 32, 64)
             if a > cfg.optim.grad_accum and cfg.data.batch_size % (a * shards) == 0]
    out += first_fit([[f"optim.grad_accum={a}"] for a in accum])
    # data x fsdp keeps its size: the batch still splits the same way
    fsdp_max = n // mesh.shape["tensor"]
    fsdp = [f for f in range(mesh.shape["fsdp"] + 1, fsdp_max + 1) if fsdp_max % f == 0]
    out += first_fit([_mesh_overrides(cfg, f, n) for f in fsdp])
    return out


def readable(n_bytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{int(n_bytes)} B"


def check_fits(trainer: Trainer) -> Plan | None:
    """Refuse (OutOfMemory) a trainer whose step would not fit in one device's memory, naming what
    would make it fit; the plan when a limit is known, else None (nothing is traced)."""
    limit, source = device_limit(trainer.cfg, list(trainer.mesh.devices.flat))
    if limit is None:
        return None
    plan = estimate(trainer)
    need = plan.per_device["total"]
    if need <= limit:
        return plan
    parts = ", ".join(f"{k} {readable(v)}" for k, v in plan.per_device.items() if k != "total")
    knobs = alternatives(trainer)
    fitting = [f"{k} ({readable(v)})" for k, v in knobs if v <= limit]
    others = [f"{k} ({readable(v)})" for k, v in knobs if v > limit]
    advice = f"fits with: {'; '.join(fitting)}" if fitting else "no one knob fits alone"
    if others:
        advice += f"; not enough alone: {'; '.join(others)}"
    raise OutOfMemory(f"the train step needs about {readable(need)} per device ({parts}) but "
                      f"{readable(limit)} is available ({source}); {advice}")
