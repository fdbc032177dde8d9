"""Reinforcement learning on verifiable rewards (GRPO): the loss over sampled replies, their
advantages, the on-policy batches and the held-out accuracy.

    python -m jaxgpt.train experiments/configs/chat_grpo.py train.init_from=RUN_OR_EXPORT \\
        [grpo.task=spelling grpo.group_size=4 grpo.kl_beta=0.02 grpo.reward=module:function]

GRPO (Shao et al. 2024, DeepSeekMath): each step draws P = data.batch_size / G prompts of a
built-in task (data/tasks.py's `sample`: never a held-out one) and samples G replies to each from
the current params with the serving engine; each reply's text, as a user would see it
(train/rollout.py), gets a reward r (grpo.reward, default the task's: 1 when its last number is
the answer). A reply's advantage is its reward against its group's:

    A = (r - mean(r of the group)) / (std(r of the group) + 1e-4)      (std over the G, ddof 0)

so a group whose replies all score alike teaches nothing. The loss, over every reply token t (the
stop id included when the model wrote it), with ratio_t = exp(log pi(t) - log pi_old(t)) against
the log-probability of the params that sampled it (the engine's) and, with grpo.kl_beta > 0, the
k3 estimate of the KL to the reference (train.init_from's params, frozen beside the state):

    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
             + kl_beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)

returned as (sum over reply tokens, (number of reply tokens, metric sums)) like GPT.loss, so the
train step divides once by the batch's reply tokens: its gradient accumulation, non-finite guard,
sharding and checkpoints serve GRPO unchanged (metrics: kl, clip_fraction per reply token).

Batches: one reply per row, prompt then reply, padded on the right to a length fixed for the run
(the longest of 2,000 of the task's prompts plus grpo.max_new_tokens, to a multiple of 16: one
compile), as inputs / targets / segment_ids / loss_mask (the reply's tokens) plus `advantages` and
`old_logps` ([B, L], at the reply's positions). A batch depends on the params (on-policy): the
trainer builds step i's from the state after step i - 1 (Trainer.batch(step, state); loop.run_steps
asks for each after the step before has run, with no prefetch). The prompts of step i are a
function of (train.seed, i), the replies of the params and that seed: a resumed run repeats them.

The ratio is against the sampler's log-probabilities of the raw model (no temperature): at
grpo.temperature != 1 the replies come from the tempered policy, the usual approximation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import Config
from jaxgpt.data import tasks
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model.gpt import GPT, token_losses
from jaxgpt.train.rollout import Reply, Sampler

ADV_EPS = 1e-4
LENGTH_SAMPLE = 2000  # training problems whose longest prompt sets the rows' length
ROW_MULTIPLE = 16
# as val_* (besides accuracy)
EVAL_METRICS = ("reward", "reply_length", "problems")


# ---- the loss ----

def grpo_loss(logp_BxL, old_logp_BxL, adv_BxL, mask_BxL, clip_eps: float, kl_beta: float = 0.0,
              ref_logp_BxL=None):
    """(sum of the token losses, (number of reply tokens, sums of kl and clip_fraction)) over the
    tokens of mask (the module's docstring has the formula)."""
    mask = mask_BxL.astype(jnp.float32)
    # off the reply, zeros: the exps below stay finite where the mask then zeroes them
    ratio = jnp.exp(jnp.where(mask > 0, logp_BxL - old_logp_BxL, 0.0))
    clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    pg_BxL = -jnp.minimum(ratio * adv_BxL, clipped * adv_BxL)
    # where the clipped term is the one taken: the token's gradient is zero
    clip_BxL = (((ratio < 1 - clip_eps) & (adv_BxL < 0))
                | ((ratio > 1 + clip_eps) & (adv_BxL > 0))).astype(jnp.float32)
    if ref_logp_BxL is None:
        kl_BxL = jnp.zeros_like(pg_BxL)
    else:
        delta = jnp.where(mask > 0, ref_logp_BxL - logp_BxL, 0.0)
        kl_BxL = jnp.exp(delta) - delta - 1
    loss_BxL = pg_BxL + kl_beta * kl_BxL
    sums = {"kl": (kl_BxL * mask).sum(), "clip_fraction": (clip_BxL * mask).sum()}
    return (loss_BxL * mask).sum(), (mask.sum(), sums)


def token_logps(model: GPT, params, batch: dict, dropout_rng=None) -> jax.Array:
    """[B, L] float32: the log-probability of each target under params."""
    logits_BxLxV = model.apply(params, batch["inputs"], batch["segment_ids"],
                               batch.get("positions"), dropout_rng=dropout_rng)
    return -token_losses(logits_BxLxV, batch["targets"])


def group_advantages(rewards_PxG: np.ndarray) -> np.ndarray:
    """[P, G]: each reward against its group's mean, over the group's std (+ ADV_EPS)."""
    rewards_PxG = np.asarray(rewards_PxG, np.float32)
    mean_Px1 = rewards_PxG.mean(axis=1, keepdims=True)
    return (rewards_PxG - mean_Px1) / (rewards_PxG.std(axis=1, keepdims=True) + ADV_EPS)


def rows(replies: list[Reply], advantages: list[float], length: int) -> dict:
    """The [B, length] batch of one reply per row (module docstring): target i predicts id i + 1,
    so a reply starting at id P is trained at targets P - 1 on."""
    B = len(replies)
    out = {k: np.zeros((B, length), np.int32) for k in ("inputs", "targets", "segment_ids")}
    for k in ("loss_mask", "advantages", "old_logps"):
        out[k] = np.zeros((B, length), np.float32)
    for b, (reply, adv) in enumerate(zip(replies, advantages, strict=True)):
        ids = reply.prompt + reply.tokens
        n, first = len(ids) - 1, len(reply.prompt) - 1
        out["inputs"][b, :n], out["targets"][b, :n] = ids[:-1], ids[1:]
        out["segment_ids"][b, :n] = 1
        out["loss_mask"][b, first:n] = 1
        out["advantages"][b, first:n] = adv
        out["old_logps"][b, first:n] = reply.logprobs
    return out


def reply_metrics(replies: list[Reply]) -> dict[str, float]:
    return {"reward": float(np.mean([r.reward for r in replies])),
            "accuracy": float(np.mean([r.correct for r in replies])),
            "reply_length": float(np.mean([len(r.tokens) for r in replies]))}


# ---- the data and the objective of a run ----

class TaskPrompts:
    """What a GRPO run has for data: the tokenizer, the task's training problems (drawn anew for
    each step, never held-out ones) and its held-out problems (grpo.val_problems)."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.val = tasks.problems(cfg.grpo.task, "val", cfg.grpo.val_problems)

    def at(self, step: int, n: int) -> tuple[list[tasks.Problem], list[int]]:
        """Step's n prompts and their sampling seeds: functions of (train.seed, step) alone."""
        seed, *seeds = np.random.SeedSequence([self.cfg.train.seed, step]).generate_state(n + 1)
        return tasks.sample(self.cfg.grpo.task, int(seed), n), [int(s) >> 1 for s in seeds]


class GRPO:
    """A run's GRPO objective (the trainer builds it with grpo.task): the loss its step minimizes,
    the on-policy batches and the held-out accuracy. Given what it works on (the model, the task's
    prompts), not the trainer."""

    def __init__(self, cfg: Config, model: GPT, prompts: TaskPrompts | None, mesh=None):
        self.cfg, self.model, self.prompts = cfg, model, prompts
        self.in_step = cfg.grpo.kl_beta > 0  # the reference's params beside the state
        self.last: dict[str, float] = {}     # the latest batch's reply metrics (logged)
        if prompts is not None:
            engine_mesh = mesh if mesh is not None and mesh.devices.size > 1 else None
            self.sampler = Sampler(cfg, model, prompts.tokenizer, cfg.data.batch_size,
                                   engine_mesh)
            problems = tasks.sample(cfg.grpo.task, 0, LENGTH_SAMPLE) + prompts.val
            self.length = self.row_length(max(map(len, map(self.sampler.prompt_ids, problems))))

    def row_length(self, prompt_length: int) -> int:
        """Rows for prompts of this length and the longest replies (one compile serves them)."""
        need = prompt_length + self.cfg.grpo.max_new_tokens - 1
        return min(-(-need // ROW_MULTIPLE) * ROW_MULTIPLE, self.cfg.model.seq_len)

    def loss(self, params, batch: dict, dropout_rng=None, ref_params=None):
        logp_BxL = token_logps(self.model, params, batch, dropout_rng)
        ref_BxL = (None if ref_params is None
                   else jax.lax.stop_gradient(token_logps(self.model, ref_params, batch)))
        return grpo_loss(logp_BxL, batch["old_logps"], batch["advantages"], batch["loss_mask"],
                         self.cfg.grpo.clip_eps, self.cfg.grpo.kl_beta, ref_BxL)

    def sampling(self, n: int, temperature: float, top_p: float) -> SamplingParams:
        return SamplingParams(max_tokens=self.cfg.grpo.max_new_tokens, temperature=temperature,
                              top_p=top_p, n=n)

    def batch(self, step: int, params) -> dict:
        """Step's host batch: G replies to each of its prompts, sampled from params."""
        g = self.cfg.grpo
        problems, seeds = self.prompts.at(step, self.cfg.data.batch_size // g.group_size)
        groups = self.sampler.replies(params, problems,
                                      self.sampling(g.group_size, g.temperature, g.top_p), seeds)
        adv_PxG = group_advantages([[r.reward for r in group] for group in groups])
        replies = [r for group in groups for r in group]
        self.last = reply_metrics(replies)
        # a prompt longer than the run's sample of them: a longer row (and another compile)
        length = max(self.length, self.row_length(max(len(r.prompt) for r in replies)))
        return rows(replies, adv_PxG.reshape(-1).tolist(), length)

    def evaluate(self, params) -> dict:
        """Greedy replies to the held-out problems: accuracy (the task's check), the mean reward
        and reply length; loss is the error rate (1 - accuracy: checkpoint.keep_best keeps the
        most accurate)."""
        val = self.prompts.val
        if not val:
            return {"loss": float("nan")}
        groups = self.sampler.replies(params, val, self.sampling(1, 0.0, 1.0), [0] * len(val))
        got = reply_metrics([g[0] for g in groups])
        return {"loss": 1 - got["accuracy"], "problems": len(val), **got}
