"""Preference tuning (DPO): the loss over pairs of replies, its reference, and its held-out metrics.

    python -m jaxgpt.train experiments/configs/chat_dpo.py train.init_from=runs/chat_sft \\
        data.preferences=jsonl:pairs.jsonl [data.preferences_val=jsonl:val_pairs.jsonl dpo.beta=0.1]

The pairs, their rendering and their batches are jaxgpt/data/pairs.py's.

DPO (Rafailov et al. 2023), against a frozen reference model: the starting params (train.init_from).
With log p(y) the summed log-probabilities of a reply's tokens,

    h = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)      eps: dpo.label_smoothing (cDPO)

The loss returns (sum of pair losses, number of pairs) as GPT.loss returns its (sum, count), so the
train step's gradient accumulation, non-finite guard, sharding and checkpoints serve it unchanged;
beside them the sums of the margin h, of the pairs ranked right (h > 0) and of the two rewards
(beta * log-ratio), which the step divides by the number of pairs.

The reference log-probabilities (`dpo.reference`): `precompute` scores every pair once when the
trainer is built, in a packing fixed by the pair list, so each value is a function of its pair alone
(a resumed run gets the same ones, and the batch of step i stays a function of (seed, step));
`step` scores each batch in the train step, with the reference params kept frozen beside the state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import Config
from jaxgpt.data import dialogs
from jaxgpt.model.gpt import GPT, token_losses
from jaxgpt.parallel import sharding
from jaxgpt.store import runs
from jaxgpt.train import evaluate

# as val_*
EVAL_METRICS = ("margin", "accuracy", "chosen_reward", "rejected_reward", "pairs", "chat_loss")


# ---- the loss ----

def segment_sums(x_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, L]: column s of row b sums x over the positions of segment s (column 0: padding)."""
    L = x_BxL.shape[1]
    return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=L))(x_BxL, segment_ids_BxL)


def sequence_logps(model: GPT, params, batch: dict, dropout_rng=None) -> jax.Array:
    """[B, L] float32: column s of row b is the summed log-probability of segment s's trained
    tokens."""
    logits_BxLxV = model.apply(params, batch["inputs"], batch["segment_ids"],
                               batch.get("positions"), dropout_rng=dropout_rng)
    logp_BxL = (-token_losses(logits_BxLxV, batch["targets"])
                * batch["loss_mask"].astype(jnp.float32))
    return segment_sums(logp_BxL, batch["segment_ids"])


def dpo_loss(policy_BxL, reference_BxL, present_BxL, beta: float, label_smoothing: float = 0.0):
    """(sum of pair losses, (number of pairs, sums of the metrics)) from per-segment log-probs
    ([B, L], segment s in column s; pair k of a row: chosen 2k+1, rejected 2k+2). `present`: the
    segments that hold a sequence (columns without one are not pairs)."""
    K = (policy_BxL.shape[1] - 1) // 2
    chosen, rejected = slice(1, 2 * K + 1, 2), slice(2, 2 * K + 2, 2)
    ratio = (policy_BxL - reference_BxL).astype(jnp.float32)
    chosen_BxK, rejected_BxK = beta * ratio[:, chosen], beta * ratio[:, rejected]
    h_BxK = chosen_BxK - rejected_BxK
    valid_BxK = present_BxL[:, chosen].astype(jnp.float32)
    losses_BxK = (-(1 - label_smoothing) * jax.nn.log_sigmoid(h_BxK)
                  - label_smoothing * jax.nn.log_sigmoid(-h_BxK))
    sums = {"margin": (h_BxK * valid_BxK).sum(), "accuracy": ((h_BxK > 0) * valid_BxK).sum(),
            "chosen_reward": (chosen_BxK * valid_BxK).sum(),
            "rejected_reward": (rejected_BxK * valid_BxK).sum()}
    return (losses_BxK * valid_BxK).sum(), (valid_BxK.sum(), sums)


def held_out_chats(cfg: Config) -> list:
    if cfg.data.chat_val:
        return dialogs.load(cfg.data.chat_val).conversations
    if not cfg.train.init_from:
        return []
    source = runs.saved_config(cfg.train.init_from)
    if source.data.chat_val:
        return dialogs.load(source.data.chat_val).conversations
    if source.data.chat and source.data.val_fraction:
        loaded = dialogs.load(source.data.chat)
        return dialogs.split(loaded.conversations, source.data.val_fraction, source.train.seed,
                             loaded.ids)[1]
    return []


# ---- the objective of a run ----

class DPO:
    """A run's DPO objective (the trainer builds it with data.preferences): the loss its train step
    minimizes, the reference log-probabilities of its pairs, and its held-out metrics. It is given
    what it works on (the model, the mesh, the params' sharding, the pair batches), not the
    trainer."""

    def __init__(self, cfg: Config, model: GPT, *, mesh=None, params_sharding=None, batches=None):
        self.cfg, self.model = cfg, model
        self.mesh, self.params_sharding, self.batches = mesh, params_sharding, batches
        self.in_step = cfg.dpo.reference == "step"
        self._eval = None

    def loss(self, params, batch: dict, dropout_rng=None, ref_params=None):
        """(sum of pair losses, (pairs, metric sums)); the reference's log-probabilities from
        ref_params (dpo.reference=step) or the batch's precomputed ref_logps."""
        policy_BxL = sequence_logps(self.model, params, batch, dropout_rng)
        if ref_params is not None:
            reference_BxL = jax.lax.stop_gradient(sequence_logps(self.model, ref_params, batch))
        else:
            reference_BxL = batch["ref_logps"]
        present_BxL = segment_sums(batch["loss_mask"].astype(jnp.float32), batch["segment_ids"]) > 0
        return dpo_loss(policy_BxL, reference_BxL, present_BxL, self.cfg.dpo.beta,
                        self.cfg.dpo.label_smoothing)

    def reference_logps(self, params) -> dict[str, np.ndarray]:
        """Per split, every pair's [N, 2] (chosen, rejected) log-probabilities under `params`,
        scored in the split's fixed packing (so each value depends on its pair alone)."""
        mesh, batches = self.mesh, self.batches
        with sharding.on_mesh(mesh):
            score = jax.jit(functools.partial(sequence_logps, self.model),
                            in_shardings=(self.params_sharding, sharding.batch_sharding(mesh)),
                            out_shardings=sharding.replicated(mesh))
        out = {}
        for split in ("train", "val"):
            ref = np.zeros((len(batches.split_data(split)) // 2, 2), np.float32)
            for rows, batch in batches.ordered(split, self.cfg.eval_batch_size):
                with sharding.on_mesh(mesh):
                    batch = sharding.put_batch(sharding.padded(batch, mesh), mesh)
                    out_BxL = np.asarray(score(params, batch))
                for b, row in enumerate(rows):
                    for k, i in enumerate(row):
                        ref[i] = out_BxL[b, 2 * k + 1], out_BxL[b, 2 * k + 2]
            out[split] = ref
        return out

    def evaluate(self, params, frozen: tuple, eval_step, split: str = "val") -> dict:
        """Held-out pairs: DPO loss, margin, accuracy (ranked right), rewards; held-out chats: the
        assistant-token loss and bits per byte (with `eval_step`, the model's loss)."""
        mesh, batches = self.mesh, self.batches
        out = {}
        if len(batches.split_data(split)):
            if self._eval is None:
                with sharding.on_mesh(mesh):
                    self._eval = jax.jit(lambda p, b, *f: self.loss(p, b, None, *f),
                                         in_shardings=(self.params_sharding,
                                                       sharding.batch_sharding(mesh),
                                                       *(self.params_sharding,) * len(frozen)),
                                         out_shardings=sharding.replicated(mesh))
            total, count, sums = 0.0, 0.0, {}
            for batch in batches.eval_batches(split, self.cfg.eval_batch_size):
                with sharding.on_mesh(mesh):
                    batch = sharding.put_batch(sharding.padded(batch, mesh), mesh)
                    loss_sum, (n, got) = jax.device_get(self._eval(params, batch, *frozen))
                total, count = total + float(loss_sum), count + float(n)
                sums = {k: sums.get(k, 0.0) + float(v) for k, v in got.items()}
            out = {"loss": total / max(count, 1), "pairs": int(count),
                   **{k: v / max(count, 1) for k, v in sums.items()}}
        if batches.chats is not None and split == "val":
            got = evaluate.evaluate_source(batches.chats, self.cfg, eval_step, params, mesh,
                                           "val", 0)
            out.update(chat_loss=got["loss"], bits_per_byte=got["bits_per_byte"])
        return out
