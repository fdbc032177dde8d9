"""Preference pairs as training data: the JSONL rows on disk, each pair rendered with the chat
template, and the packed pair batches DPO trains on (the loss: jaxgpt/train/dpo.py).

A pair is a context (messages that end with a user turn) and two replies to it, one preferred: JSONL
rows `{"messages": [...], "chosen": "...", "rejected": "..."}` (what `jaxgpt.feedback export`
writes). Each reply is rendered after its context with the chat template (chat.py), the loss mask on
the reply and its <|assistant_end|> only. Both sequences of a pair go into one row, as segments 2k+1
(chosen) and 2k+2 (rejected) of the row's k-th pair; a row holds as many pairs as fit (first fit),
and the model's segment mask keeps every sequence from seeing any other. A context too long for the
pair to fit in seq_len + 1 tokens loses its oldest exchanges (chat.render_prompt).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxgpt.config import Config
from jaxgpt.data import chat, dialogs
from jaxgpt.data.dialogs import ChatDataError
from jaxgpt.data.tokenizer import Tokenizer

PAIR_FORM = '{"messages": [...context, ending with a user turn...], "chosen": str, "rejected": str}'


# ---- pairs on disk ----

def check_pair(record) -> str | None:
    """What is wrong with a pairs row, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return f"expected {PAIR_FORM}"
    if (problem := dialogs.problem_with(record["messages"], trainable=False)) is not None:
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
    for where, _, record in dialogs.json_records(Path(path)):
        problem = str(record) if isinstance(record, dialogs.BadRecord) else check_pair(record)
        if problem is not None:
            raise ChatDataError(f"{where}: {problem}")
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        pairs.append({"messages": messages, "chosen": record["chosen"],
                      "rejected": record["rejected"]})
        ids.append(json.dumps(messages, sort_keys=True))
    if not pairs:
        raise ChatDataError(f"{path}: no pairs in it")
    return pairs, ids


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                    encoding="utf-8")
    return path


def render_pair(pair: dict, tokenizer: Tokenizer, seq_len: int):
    """[(ids, mask) of context + chosen, (ids, mask) of context + rejected], each as chat.render
    gives the conversation with the reply as its last assistant turn, the mask on that reply (and
    its <|assistant_end|>) alone; the context's oldest exchanges dropped until both fit in
    seq_len + 1 tokens together. None when even the last user turn leaves no room."""
    replies = [tokenizer.encode(pair[key]) for key in ("chosen", "rejected")]
    end = chat.layout(tokenizer).end["assistant"]
    # for each copy of the prompt
    room = (seq_len + 1 - sum(len(r) + len(end) for r in replies)) // 2
    prompt = chat.render_prompt(pair["messages"], tokenizer, room) if room > 0 else None
    if prompt is None:
        return None
    out = []
    for reply in replies:
        ids = np.concatenate([prompt, np.asarray(reply, np.int32),
                              np.asarray(end, np.int32)]).astype(np.int32)
        mask = np.zeros(len(ids), np.bool_)
        mask[len(prompt):] = True
        out.append((ids, mask))
    return out


# ---- pair batches: a batch source (see tokens.py) ----

class PairBatches:
    """Packed pair batches: `batch_at(step)` is a pure function of (seed, step), as ChatBatches'.

    Every pair is rendered once; each epoch shuffles the pairs (seeded by (seed, epoch)), first-fits
    them whole into rows of seq_len + 1 tokens and shuffles the rows. The held-out pairs (`val`, or
    a `val_fraction` split by context) and `chats` (held-out conversations, for the assistant-token
    bits per byte) are packed in order. A batch holds `ref_logps` ([B, L], segment s in column s)
    once `reference` has each split's [N, 2] (chosen, rejected) reference log-probabilities."""

    def __init__(self, pairs: Sequence[dict], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 seed: int, *, val: Sequence[dict] = (), val_fraction: float = 0.0,
                 ids: Sequence[str] | None = None, chats: Sequence[dialogs.Conversation] = (),
                 chat_windows: bool = True):
        if val_fraction and val:
            raise ChatDataError("give held-out pairs (val) or a val_fraction, not both")
        if val_fraction:
            pairs, val = dialogs.split(pairs, val_fraction, seed, ids)
        self.tokenizer, self.token_bytes = tokenizer, tokenizer.token_byte_lengths()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train, self.val = (self._render(p) for p in (pairs, val))
        if not len(self.train):
            raise ChatDataError(f"none of the {len(pairs)} training pairs fits in seq_len + 1 = "
                                f"{seq_len + 1} tokens (both replies after the last user turn)")
        # scored as evaluate scores them
        self.chats = chat.ChatBatches([], tokenizer, seq_len, batch_size, seed, val=chats,
                                      windows=chat_windows, training=False) if chats else None
        self.reference: dict[str, np.ndarray] = {}
        self._epoch_starts, self._epochs = [0], {}

    def _render(self, pairs: Sequence[dict]) -> chat.Rendered:
        """Item 2i is pair i's chosen sequence, 2i+1 its rejected one; `dropped` counts pairs that
        do not fit."""
        rendered = [render_pair(p, self.tokenizer, self.seq_len) for p in pairs]
        return chat.Rendered.of([seq for r in rendered if r is not None for seq in r],
                                sum(r is None for r in rendered))

    @staticmethod
    def pair_lengths(data: chat.Rendered) -> np.ndarray:
        return data.lengths[0::2] + data.lengths[1::2]

    def split_data(self, split: str) -> chat.Rendered:
        if split not in ("train", "val"):
            raise ChatDataError(f"unknown split {split!r} of preference pairs: "
                                "expected train or val")
        return self.train if split == "train" else self.val

    def assemble(self, split: str, rows: Sequence[Sequence[int]]) -> dict:
        """The batch of rows of pair indices (an empty row is padding)."""
        batch = chat.assemble(self.split_data(split),
                              [[j for i in row for j in (2 * i, 2 * i + 1)] for row in rows],
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
            rows = chat.shuffled_rows(np.random.default_rng([self.seed, 2, epoch]),
                                      self.pair_lengths(self.train), self.seq_len + 1)
            self._epochs = {e: r for e, r in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = rows
        return self._epochs[epoch]

    def batch_at(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """Process p's rows [p*B/P, (p+1)*B/P) of the global batch of `step`."""
        return self.assemble("train", chat.step_rows(self, step, process_index, process_count))

    def ordered(self, split: str, batch_size: int) -> Iterator[tuple[list[list[int]], dict]]:
        """(rows, batch) covering every pair of the split once, packed in order (the last batch
        padded)."""
        rows = chat.first_fit(self.pair_lengths(self.split_data(split)), self.seq_len + 1)
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            yield chunk, self.assemble(split, chunk + [[]] * (batch_size - len(chunk)))

    def eval_batches(self, split: str = "val", batch_size: int = 0, stride: int = 0,
                     max_tokens: int = 0):
        return (batch for _, batch in self.ordered(split, batch_size or self.batch_size))


def open_batches(cfg: Config, tokenizer: Tokenizer, chats: Sequence[dialogs.Conversation] = ()
                 ) -> PairBatches:
    """The pair batches of data.preferences (held out: data.preferences_val, else data.val_fraction
    of the pairs, by context), with `chats`, held-out conversations to score beside them."""
    d = cfg.data
    pairs, ids = read_pairs(d.preferences)
    val = read_pairs(d.preferences_val)[0] if d.preferences_val else ()
    if not val and not d.val_fraction:
        raise ChatDataError(f"data.preferences={d.preferences}: no held-out pairs to measure the "
                            "preference accuracy on; set data.preferences_val=jsonl:PATH or "
                            "data.val_fraction > 0")
    return PairBatches(pairs, tokenizer, cfg.model.seq_len, d.batch_size, cfg.train.seed, val=val,
                       val_fraction=0.0 if val else d.val_fraction, ids=ids, chats=chats,
                       chat_windows=d.chat_windows)
