"""The train state and the one jitted train step every objective shares (pretraining, SFT, DPO).

The step takes the global batch, splits it into `optim.grad_accum` micro-batches, and averages the
loss over every masked token of the whole batch (so pretraining and SFT share one loss). A
non-finite loss leaves params and optimizer state untouched; the loop stops a run after too many.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxgpt import hardware
from jaxgpt.model.gpt import GPT


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    nonfinite_run: jax.Array  # consecutive steps skipped for a non-finite loss


# a step's own; the loss's sums besides
STEP_METRICS = ("loss", "grad_norm", "tokens", "skipped", "nonfinite_run")


def resolve_skip_update(choice: str) -> str:
    """What train.skip_update names: auto is select on a GPU (hardware.branches_sync_host), else
    cond."""
    if choice == "auto":
        return "select" if hardware.branches_sync_host() else "cond"
    return choice


def make_train_step(model: GPT, optimizer: optax.GradientTransformation, grad_accum: int,
                    loss_fn=None, skip_update: str = "auto"):
    """train_step(state, batch, *frozen) -> (state, metrics), pure and ready for jit.

    loss_fn(params, batch, dropout_rng, *frozen) -> (loss sum, count), or (loss sum, (count, {name:
    sum})) whose sums become metrics divided by the count like the loss (default: model.loss; DPO's
    in dpo.py). `frozen`: arrays the loss reads beside the state (DPO's reference params).
    skip_update: train.skip_update, how a step with no update keeps the state."""
    loss_fn = loss_fn or model.loss
    skip_update = resolve_skip_update(skip_update)

    def micro_grads(params, micro_batch, rng, frozen):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss_sum, aux), grads = grad_fn(params, micro_batch, rng, *frozen)
        count, sums = aux if isinstance(aux, tuple) else (aux, {})
        return loss_sum, count, sums, grads

    def train_step(state: TrainState, batch: dict, *frozen):
        rng, step_rng = jax.random.split(state.rng)
        dropout_rng = step_rng if model.cfg.dropout > 0 else None
        loss_sum, count, sums, grads = summed_grads(micro_grads, state.params, batch, dropout_rng,
                                                    frozen, grad_accum)
        # Sums over micro-batches divided once by the global count: exact for any masking.
        denom = jnp.maximum(count, 1.0)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        def update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # no update without a finite loss, nor from a batch with no trained token (an SFT batch
        # of prompts only): momentum and weight decay would still move the params
        apply = finite & (count > 0)
        if skip_update == "cond":  # skipped branch costs nothing (a select costs a pass on a CPU)
            params, opt_state = jax.lax.cond(apply, update, lambda p, o: (p, o), state.params,
                                             state.opt_state)
        else:  # the old values kept by a select that XLA fuses into the update's own passes
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                                             update(state.params, state.opt_state),
                                             (state.params, state.opt_state))
        new_state = TrainState(params=params, opt_state=opt_state,
                               step=state.step + 1, rng=rng,
                               nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
                   "skipped": (~finite).astype(jnp.int32), "nonfinite_run": new_state.nonfinite_run,
                   **{name: total / denom for name, total in sums.items()}}
        return new_state, metrics

    return train_step


def summed_grads(micro_grads, params, batch: dict, dropout_rng, frozen: tuple, grad_accum: int):
    """(loss sum, count, metric sums, gradient sums) of micro_grads over the batch's `grad_accum`
    micro-batches, accumulated in a scan."""
    if grad_accum == 1:
        return micro_grads(params, batch, dropout_rng, frozen)
    # micro-batch i is rows i, i + grad_accum, ...: every device holds its share of each one
    # (contiguous blocks would put micro-batch i on a few devices, with collective-permutes between
    # them while the rest sat idle)
    micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, xs):
        micro_batch, i = xs
        r = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        return jax.tree.map(jnp.add, carry, micro_grads(params, micro_batch, r, frozen)), None

    shapes = jax.eval_shape(micro_grads, params, jax.tree.map(lambda x: x[0], micro), dropout_rng,
                            frozen)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))[0]
