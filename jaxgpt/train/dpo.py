"""Preference tuning (DPO): the loss over pairs of replies, and the pair batches it trains on.

    python -m jaxgpt.train experiments/configs/chat_dpo.py train.init_from=runs/chat_sft \\
        data.preferences=jsonl:pairs.jsonl [data.preferences_val=jsonl:val_pairs.jsonl dpo.beta=0.1]

A pair is a context (messages that end with a user turn) and two replies to it, one preferred: JSONL
rows `{"messages": [...], "chosen": "...", "rejected": "..."}` (what `jaxgpt.feedback export` writes).
Each reply is rendered after its context with the chat template (chat.py), the loss mask on the reply
and its <|assistant_end|> only. Both sequences of a pair go into one row, as segments 2k+1 (chosen)
and 2k+2 (rejected) of the row's k-th pair; a row holds as many pairs as fit (first fit), and the
model's segment mask keeps every sequence from seeing any other. A context too long for the pair to
fit in seq_len + 1 tokens loses its oldest exchanges (chat.render_prompt).

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
import json
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.data import chat
from jaxgpt.data import dialogs
from jaxgpt.train import evaluate
from jaxgpt.store import runs
from jaxgpt.parallel import sharding
from jaxgpt.config import Config
from jaxgpt.data.dialogs import ChatDataError
from jaxgpt.model.gpt import GPT, token_losses
from jaxgpt.data.tokenizer import Tokenizer

EVAL_METRICS = ("margin", "accuracy", "chosen_reward", "rejected_reward", "pairs", "chat_loss")  # as val_*
PAIR_FORM = '{"messages": [...context, ending with a user turn...], "chosen": str, "rejected": str}'


# ---- pairs on disk ----

def check_pair(record) -> str | None:
    """What is wrong with a pairs row, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return f"expected {PAIR_FORM}"
    if (problem := dialogs.check(record["messages"], trainable=False)) is not None:
        return f"messages: {problem}"
    if record["messages"][-1]["role"] != "user":
        return "messages: the context must end with a user turn (the two replies answer it)"
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            return f'"{key}" is missing or not a string; expected {PAIR_FORM}'
    return None


def read_pairs(source: str) -> tuple[list[dict], list[str]]:
    """(pairs, ids) of `jsonl:PATH`; a pair's id is its context, so a held-out split keeps the pairs
    of one context together. A bad row stops it, naming the file and line."""
    kind, _, path = source.partition(":")
    if kind != "jsonl" or not path:
        raise ChatDataError(f"preference pairs {source!r}: expected jsonl:PATH")
    pairs, ids = [], []
    for where, _, record in dialogs._json_records(Path(path)):
        problem = str(record) if isinstance(record, dialogs._Bad) else check_pair(record)
        if problem is not None:
            raise ChatDataError(f"{where}: {problem}")
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        pairs.append({"messages": messages, "chosen": record["chosen"], "rejected": record["rejected"]})
        ids.append(json.dumps(messages, sort_keys=True))
    if not pairs:
        raise ChatDataError(f"{path}: no pairs in it")
    return pairs, ids


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def render_pair(pair: dict, tokenizer: Tokenizer, seq_len: int):
    """[(ids, mask) of context + chosen, (ids, mask) of context + rejected], each as chat.render gives
    the conversation with the reply as its last assistant turn, the mask on that reply (and its
    <|assistant_end|>) alone; the context's oldest exchanges dropped until both fit in seq_len + 1
    tokens together. None when even the last user turn leaves no room."""
    replies = [tokenizer.encode(pair[key]) for key in ("chosen", "rejected")]
    end = chat.layout(tokenizer).end["assistant"]
    room = (seq_len + 1 - sum(len(r) + len(end) for r in replies)) // 2  # for each copy of the prompt
    prompt = chat.render_prompt(pair["messages"], tokenizer, room) if room > 0 else None
    if prompt is None:
        return None
    out = []
    for reply in replies:
        ids = np.concatenate([prompt, np.asarray(reply, np.int32), np.asarray(end, np.int32)]).astype(np.int32)
        mask = np.zeros(len(ids), np.bool_)
        mask[len(prompt):] = True
        out.append((ids, mask))
    return out


# ---- the loss ----

def segment_sums(x_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, L]: column s of row b sums x over the positions of segment s (column 0: padding)."""
    L = x_BxL.shape[1]
    return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=L))(x_BxL, segment_ids_BxL)


def sequence_logps(model: GPT, params, batch: dict, dropout_rng=None) -> jax.Array:
    """[B, L] float32: column s of row b is the summed log-probability of segment s's trained tokens."""
    logits_BxLxV = model.apply(params, batch["inputs"], batch["segment_ids"], batch.get("positions"),
                               dropout_rng=dropout_rng)
    logp_BxL = -token_losses(logits_BxLxV, batch["targets"]) * batch["loss_mask"].astype(jnp.float32)
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
    losses_BxK = -(1 - label_smoothing) * jax.nn.log_sigmoid(h_BxK) - label_smoothing * jax.nn.log_sigmoid(-h_BxK)
    sums = {"margin": (h_BxK * valid_BxK).sum(), "accuracy": ((h_BxK > 0) * valid_BxK).sum(),
            "chosen_reward": (chosen_BxK * valid_BxK).sum(), "rejected_reward": (rejected_BxK * valid_BxK).sum()}
    return (losses_BxK * valid_BxK).sum(), (valid_BxK.sum(), sums)


# ---- pair batches: a batch source (see data.py) ----

class PairBatches:
    """Packed pair batches: `batch_at(step)` is a pure function of (seed, step), as ChatBatches'.

    Every pair is rendered once; each epoch shuffles the pairs (seeded by (seed, epoch)), first-fits
    them whole into rows of seq_len + 1 tokens and shuffles the rows. The held-out pairs (`val`, or a
    `val_fraction` split by context) and `chats` (held-out conversations, for the assistant-token
    bits per byte) are packed in order. A batch holds `ref_logps` ([B, L], segment s in column s)
    once `reference` has each split's [N, 2] (chosen, rejected) reference log-probabilities."""

    def __init__(self, pairs: Sequence[dict], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int, *,
                 val: Sequence[dict] = (), val_fraction: float = 0.0, ids: Sequence[str] | None = None,
                 chats: Sequence[dialogs.Conversation] = (), chat_windows: bool = True):
        if val_fraction and val:
            raise ChatDataError("give held-out pairs (val) or a val_fraction, not both")
        if val_fraction:
            pairs, val = dialogs.split(pairs, val_fraction, seed, ids)
        self.tokenizer, self.token_bytes = tokenizer, tokenizer.token_byte_lengths()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train, self.val = (self._render(p) for p in (pairs, val))
        if not len(self.train):
            raise ChatDataError(f"none of the {len(pairs)} training pairs fits in seq_len + 1 = {seq_len + 1} tokens "
                                f"(both replies after the last user turn)")
        self.chats = chat.ChatBatches([], tokenizer, seq_len, batch_size, seed, val=chats, windows=chat_windows,
                                      training=False) if chats else None  # scored as evaluate scores them
        self.reference: dict[str, np.ndarray] = {}
        self._epoch_starts, self._epochs = [0], {}

    def _render(self, pairs: Sequence[dict]) -> chat.Rendered:
        """Item 2i is pair i's chosen sequence, 2i+1 its rejected one; `dropped` counts pairs that do not fit."""
        rendered = [render_pair(p, self.tokenizer, self.seq_len) for p in pairs]
        return chat.Rendered.of([seq for r in rendered if r is not None for seq in r],
                                sum(r is None for r in rendered))

    @staticmethod
    def pair_lengths(data: chat.Rendered) -> np.ndarray:
        return data.lengths[0::2] + data.lengths[1::2]

    def split_data(self, split: str) -> chat.Rendered:
        if split not in ("train", "val"):
            raise ChatDataError(f"unknown split {split!r} of preference pairs: expected train or val")
        return self.train if split == "train" else self.val

    def assemble(self, split: str, rows: Sequence[Sequence[int]]) -> dict:
        """The batch of rows of pair indices (an empty row is padding)."""
        batch = chat._assemble(self.split_data(split), [[j for i in row for j in (2 * i, 2 * i + 1)] for row in rows],
                               self.seq_len)
        if (ref := self.reference.get(split)) is not None:
            ref_BxL = np.zeros(batch["inputs"].shape, np.float32)
            for b, row in enumerate(rows):
                for k, i in enumerate(row):
                    ref_BxL[b, 2 * k + 1], ref_BxL[b, 2 * k + 2] = ref[i]
            batch["ref_logps"] = ref_BxL
        return batch

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rows = chat.shuffled_rows(np.random.default_rng([self.seed, 2, epoch]), self.pair_lengths(self.train),
                                      self.seq_len + 1)
            self._epochs = {e: r for e, r in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = rows
        return self._epochs[epoch]

    def batch_at(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """Process p's rows [p*B/P, (p+1)*B/P) of the global batch of `step`."""
        return self.assemble("train", chat.step_rows(self, step, process_index, process_count))

    def ordered(self, split: str, batch_size: int) -> Iterator[tuple[list[list[int]], dict]]:
        """(rows, batch) covering every pair of the split once, packed in order (the last batch padded)."""
        rows = chat.first_fit(self.pair_lengths(self.split_data(split)), self.seq_len + 1)
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            yield chunk, self.assemble(split, chunk + [[]] * (batch_size - len(chunk)))

    def eval_batches(self, split: str = "val", batch_size: int = 0, stride: int = 0, max_tokens: int = 0):
        return (batch for _, batch in self.ordered(split, batch_size or self.batch_size))


def open_batches(cfg: Config, tokenizer: Tokenizer) -> PairBatches:
    """The pair batches of data.preferences (held out: data.preferences_val, else data.val_fraction
    of the pairs, by context) and the held-out chats: data.chat_val, else those of the init_from run
    (its data.chat_val, else its data.val_fraction of data.chat, split as that run split it)."""
    d = cfg.data
    pairs, ids = read_pairs(d.preferences)
    val = read_pairs(d.preferences_val)[0] if d.preferences_val else ()
    if not val and not d.val_fraction:
        raise ChatDataError(f"data.preferences={d.preferences}: no held-out pairs to measure the preference accuracy "
                            f"on; set data.preferences_val=jsonl:PATH or data.val_fraction > 0")
    chats = held_out_chats(cfg)
    return PairBatches(pairs, tokenizer, cfg.model.seq_len, d.batch_size, cfg.train.seed, val=val,
                       val_fraction=0.0 if val else d.val_fraction, ids=ids, chats=chats, chat_windows=d.chat_windows)


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
        return dialogs.split(loaded.conversations, source.data.val_fraction, source.train.seed, loaded.ids)[1]
    return []


# ---- the objective of a run ----

def _padded(batch: dict, shards: int) -> dict:
    """Empty rows appended so the batch splits over the data-parallel devices."""
    pad = -len(batch["inputs"]) % shards
    return batch if not pad else {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                                  for k, v in batch.items()}


class DPO:
    """A run's DPO objective (train.Trainer builds it with data.preferences): the loss its train step
    minimizes, the reference it reads, and its held-out metrics."""

    def __init__(self, cfg: Config, model: GPT):
        self.cfg, self.model = cfg, model
        self.in_step = cfg.dpo.reference == "step"

    def loss(self, params, batch: dict, dropout_rng=None, ref_params=None):
        """(sum of pair losses, (pairs, metric sums)); the reference's log-probabilities from
        ref_params (dpo.reference=step) or the batch's precomputed ref_logps."""
        policy_BxL = sequence_logps(self.model, params, batch, dropout_rng)
        if ref_params is not None:
            reference_BxL = jax.lax.stop_gradient(sequence_logps(self.model, ref_params, batch))
        else:
            reference_BxL = batch["ref_logps"]
        present_BxL = segment_sums(batch["loss_mask"].astype(jnp.float32), batch["segment_ids"]) > 0
        return dpo_loss(policy_BxL, reference_BxL, present_BxL, self.cfg.dpo.beta, self.cfg.dpo.label_smoothing)

    def reference_params(self, trainer):
        """The frozen reference: the params a run starts from (init_from's, else the seed's), loaded anew."""
        if self.cfg.train.init_from:
            return runs.params(self.cfg.train.init_from, self.cfg, trainer.params_sharding)[0]
        return trainer.init_state().params

    def attach(self, trainer) -> tuple:
        """Make the reference available: the arrays the train step takes beside the state,
        (reference params,) with dpo.reference=step; else () once every pair is scored."""
        params = self.reference_params(trainer)
        if self.in_step:
            return (params,)
        mesh = trainer.mesh
        with sharding.activate(mesh):
            score = jax.jit(functools.partial(sequence_logps, self.model),
                            in_shardings=(trainer.params_sharding, sharding.batch_sharding(mesh)),
                            out_shardings=sharding.replicated(mesh))
        batches, shards = trainer.batches, mesh.shape["data"] * mesh.shape["fsdp"]
        for split in ("train", "val"):
            ref = np.zeros((len(batches.split_data(split)) // 2, 2), np.float32)
            for rows, batch in batches.ordered(split, self.cfg.eval.batch_size or self.cfg.data.batch_size):
                with sharding.activate(mesh):
                    out_BxL = np.asarray(score(params, sharding.put_batch(_padded(batch, shards), mesh)))
                for b, row in enumerate(rows):
                    for k, i in enumerate(row):
                        ref[i] = out_BxL[b, 2 * k + 1], out_BxL[b, 2 * k + 2]
            batches.reference[split] = ref
        return ()

    def evaluate(self, trainer, params, split: str = "val") -> dict:
        """Held-out pairs: DPO loss, margin, accuracy (ranked right), rewards; held-out chats: the
        assistant-token loss and bits per byte."""
        mesh, batches = trainer.mesh, trainer.batches
        out = {}
        if len(batches.split_data(split)):
            if not hasattr(self, "_eval"):
                frozen = (trainer.params_sharding,) * len(trainer.frozen)
                with sharding.activate(mesh):
                    self._eval = jax.jit(lambda p, b, *f: self.loss(p, b, None, *f),
                                         in_shardings=(trainer.params_sharding, sharding.batch_sharding(mesh), *frozen),
                                         out_shardings=sharding.replicated(mesh))
            shards, total, count, sums = mesh.shape["data"] * mesh.shape["fsdp"], 0.0, 0.0, {}
            for batch in batches.eval_batches(split, self.cfg.eval.batch_size or self.cfg.data.batch_size):
                with sharding.activate(mesh):
                    loss_sum, (n, got) = jax.device_get(self._eval(params, sharding.put_batch(_padded(batch, shards), mesh),
                                                                   *trainer.frozen))
                total, count = total + float(loss_sum), count + float(n)
                sums = {k: sums.get(k, 0.0) + float(v) for k, v in got.items()}
            out = {"loss": total / max(count, 1), "pairs": int(count),
                   **{k: v / max(count, 1) for k, v in sums.items()}}
        if batches.chats is not None and split == "val":
            got = evaluate.evaluate_source(batches.chats, self.cfg, trainer.eval_step, params, mesh, "val", 0)
            out.update(chat_loss=got["loss"], bits_per_byte=got["bits_per_byte"])
        return out
