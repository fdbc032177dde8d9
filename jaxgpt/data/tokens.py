"""Token data: prepared token shards loaded, and the batch sources the train loop and evaluate draw
from.

    python -m jaxgpt.data prepare prepare.source=text:books/ prepare.tokenizer=bpe:4096 \\
        prepare.out=data/books
    python -m jaxgpt.data prepare prepare.source=chitchat prepare.tokenizer=gpt2 \\
        prepare.out=data/chitchat prepare.workers=2

A prepared directory holds token shards `{split}_{i:06d}.bin` (uint16 when the vocabulary fits, else
uint32; every document ends with the end-of-text token), the tokenizer files, and `meta.json`,
written last: a directory without it is never mistaken for a finished one. Documents go to train or
val by a seeded hash of their index. A batch is a dict of [B, L] numpy arrays: `inputs`, `targets`,
`segment_ids` (0 = padding) and `loss_mask`; the batch at a step is a pure function of (seed, step),
so a run is reproducible and resumes at any step without replaying data.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
from pathlib import Path

import numpy as np

from jaxgpt import cli
from jaxgpt.config import DataConfig, PrepareCommand
from jaxgpt.data import chat, dialogs, pairs
from jaxgpt.data.prepare import (
    FORMAT,
    SPLITS,
    prepare,
    read_text_file,
    split_text,
    token_dtype,
    tokenize_text_file,
)
from jaxgpt.data.sources import SOURCES
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import DataError
from jaxgpt.files import read_json, sha256


@dataclasses.dataclass
class TokenData:
    train: np.ndarray            # 1-D token ids (a read-only memmap, or ShardedTokens over several)
    val: np.ndarray
    tokenizer: Tokenizer
    bytes_per_token: dict        # split -> UTF-8 bytes of text per token, for bits per byte
    meta: dict = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> np.ndarray:
        """The tokens of `train`, `val`, or `all` (train then val: every token of the data)."""
        if name == "all":
            return ShardedTokens([self.train, self.val], self.train.dtype)
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: expected train, val or all")
        tokens = self.train if name == "train" else self.val
        if len(tokens) == 0:
            raise DataError(f"the {name} split of {self.meta.get('dir', 'the data')} is empty "
                            "(prepare it with prepare.val_fraction > 0 and more than one document)")
        return tokens


# ---- loading ----

class ShardedTokens:
    """The shards of one split read as one 1-D sequence: windows may cross from one shard into the
    next."""

    def __init__(self, arrays: list[np.ndarray], dtype):
        self.arrays, self.dtype = arrays, np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            parts = [a[max(start - s0, 0):max(stop - s0, 0)]
                     for a, s0 in zip(self.arrays, self.starts, strict=False)]
            return np.concatenate(parts or [np.zeros(0, self.dtype)])[::step]
        idx = np.asarray(idx)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(idx.shape, self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.arrays[s][idx[mask] - self.starts[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        return self[:].astype(dtype or self.dtype)


def _open_shard(path: Path, info: dict, dtype: np.dtype, verify: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: shard missing (meta.json lists it)")
    size, expected = path.stat().st_size, info["tokens"] * dtype.itemsize
    if size != expected:
        raise DataError(f"{path}: {size} bytes but meta.json says {info['tokens']} {dtype.name} "
                        f"tokens ({expected} bytes): a truncated or replaced shard; "
                        "prepare the data again")
    if verify and sha256(path) != info["sha256"]:
        raise DataError(f"{path}: checksum mismatch (sha256 differs from meta.json); "
                        "prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r")


def load_dir(directory: str | Path, verify: bool = True) -> TokenData:
    """A prepared directory's splits (sizes always checked, sha256 checksums when `verify`)."""
    directory = Path(directory)
    meta = read_json(directory / "meta.json")
    if meta is None:
        raise DataError(f"{directory}: no meta.json (prepare it with python -m jaxgpt.data "
                        "prepare; an unfinished prepare leaves none)")
    if meta.get("format") != FORMAT:
        raise DataError(f"{directory / 'meta.json'}: not a jaxgpt data directory "
                        f"(format {meta.get('format')!r})")
    try:  # every field read before any shard is opened: an edited or damaged meta.json is named
        fingerprint, dtype = meta["tokenizer_fingerprint"], np.dtype(meta["dtype"])
        shard_infos = {name: [(s["file"], s) for s in meta["splits"][name]["shards"]]
                       for name in SPLITS}
        for infos in shard_infos.values():
            for _, info in infos:
                int(info["tokens"]), str(info["sha256"])  # present, and a count
        bpt = {name: info["bytes"] / max(info["tokens"], 1)
               for name, info in meta["splits"].items()}
    except KeyError as e:
        raise DataError(f"{directory / 'meta.json'}: no {e.args[0]!r} field; "
                        "prepare the data again") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{directory / 'meta.json'}: malformed ({type(e).__name__}: {e}); "
                        "prepare the data again") from None
    tokenizer = Tokenizer.load(directory)
    if tokenizer.fingerprint != fingerprint:
        raise DataError(f"{directory}: the tokenizer files do not match meta.json "
                        "(fingerprint differs)")
    arrays = {}
    for name, infos in shard_infos.items():
        shards = [_open_shard(directory / file, info, dtype, verify) for file, info in infos]
        arrays[name] = shards[0] if len(shards) == 1 else ShardedTokens(shards, dtype)
    return TokenData(arrays["train"], arrays["val"], tokenizer, bpt,
                     {**meta, "dir": str(directory)})


def text_in_memory(path: str | Path, tokenizer: Tokenizer, val_fraction: float,
                   errors: str = "strict") -> TokenData:
    """A text file tokenized by a given tokenizer (a trained model's), in memory: nothing is
    written. The split is `tokenize_text_file`'s (prepare.split_text), so both give the same
    tokens."""
    parts = split_text(read_text_file(path), path, val_fraction, errors)
    dtype = token_dtype(tokenizer.n_vocab)
    train, val = (tokenizer.encode_np(part).astype(dtype) for part in parts)
    bpt = {name: len(part.encode("utf-8")) / max(len(ids), 1)
           for name, part, ids in zip(SPLITS, parts, (train, val), strict=False)}
    return TokenData(train, val, tokenizer, bpt, {"dir": str(path)})


def load(cfg: DataConfig, tokenizer: Tokenizer | None = None, training: bool = True) -> TokenData:
    """The token data of `data.dir` or `data.path`. A given `tokenizer` (the model's) tokenizes a
    text file in memory and must match a prepared directory's; else data.tokenizer applies."""
    if cfg.dir:
        data = load_dir(cfg.dir, verify=cfg.verify)
    elif cfg.path and tokenizer is not None:
        data = text_in_memory(cfg.path, tokenizer, cfg.val_fraction, cfg.errors)
    elif cfg.path:
        data = load_dir(tokenize_text_file(cfg.path, cfg.tokenizer, cfg.val_fraction, cfg.errors))
    else:
        raise DataError("no data: set data.path=FILE.txt, data.dir=PREPARED_DIR or "
                        "data.chat=SOURCE")
    if tokenizer is not None:
        check_same_tokenizer(data.tokenizer, tokenizer)
    if training and len(data.train) == 0:
        raise DataError(f"{cfg.dir or cfg.path}: the train split is empty")
    if cfg.val_dir:  # a separately prepared held-out set replaces the val split
        held_out = load_dir(cfg.val_dir, verify=cfg.verify)
        check_same_tokenizer(held_out.tokenizer, data.tokenizer)
        data.val, data.bytes_per_token["val"] = held_out.train, held_out.bytes_per_token["train"]
    return data


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.n_vocab > vocab_size:
        raise DataError(f"the data's tokenizer {tokenizer.name} has {tokenizer.n_vocab} tokens but "
                        f"model.vocab_size={vocab_size}")


def check_same_tokenizer(data_tokenizer: Tokenizer, model_tokenizer: Tokenizer) -> None:
    if data_tokenizer.fingerprint != model_tokenizer.fingerprint:
        raise DataError(f"the data was tokenized with {data_tokenizer.name} "
                        f"({data_tokenizer.n_vocab} tokens) but the model uses "
                        f"{model_tokenizer.name} ({model_tokenizer.n_vocab} tokens)")


def batch_at(tokens, seed: int, step: int, batch_size: int, seq_len: int,
             sampling: str = "random", *, eot_id: int | None = None, segments: bool = False,
             process_index: int = 0, process_count: int = 1) -> dict:
    """This process's rows of the global batch for a step: random windows (seeded by (seed, step))
    or consecutive windows packed in order. Process p holds rows [p*B/P, (p+1)*B/P), so the
    processes together hold exactly the batch one process draws, and each reads only its own
    windows.

    segments: segment ids start at 1 and grow by one after each end-of-text token, so packed
    documents do not attend to each other; off, they are all ones (nanoGPT's plain packing)."""
    n_windows = len(tokens) - seq_len - 1
    if n_windows < 1:
        raise DataError(f"only {len(tokens)} tokens: too few for windows of {seq_len + 1}")
    if batch_size % process_count:
        raise DataError(f"data.batch_size={batch_size} does not split evenly over "
                        f"{process_count} processes")
    if sampling == "random":
        starts = np.random.default_rng([seed, step]).integers(0, n_windows + 1, size=batch_size)
    elif sampling == "sequential":
        starts = ((step * batch_size + np.arange(batch_size)) * seq_len) % n_windows
    else:
        raise DataError(f"data.sampling={sampling!r}: expected random or sequential")
    rows = batch_size // process_count
    starts = starts[process_index * rows:(process_index + 1) * rows]
    window = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    inputs = window[:, :-1]
    segment_ids = np.ones_like(inputs)
    if segments:
        segment_ids[:, 1:] += np.cumsum(inputs[:, :-1] == eot_id, axis=1, dtype=np.int32)
    return {"inputs": inputs, "targets": window[:, 1:], "segment_ids": segment_ids,
            "loss_mask": np.ones(inputs.shape, np.float32)}


def rows_have_segments(cfg: DataConfig) -> bool:
    """Whether a training row may hold more than one document, or padding: packed conversations,
    preference pairs and data.segments do; plain packed text (segment ids all ones) does not."""
    return bool(cfg.chat or cfg.preferences or cfg.segments)


# ---- windows for exact evaluation ----

def windows(n_tokens: int, seq_len: int, stride: int):
    """(start, first scored position) of each window covering targets 1..n_tokens-1 once.

    Windows of `seq_len` tokens start every `stride` tokens; a window scores only the targets that
    no earlier window scored, so with stride < seq_len each token is predicted from at least
    seq_len - stride tokens of context."""
    stride = min(stride or seq_len, seq_len)
    start, covered = 0, 0  # covered: targets with index <= covered are scored
    while covered < n_tokens - 1:
        first = covered - start  # window position whose target is token `covered + 1`
        yield start, first
        covered = min(start + seq_len, n_tokens - 1)
        start += stride


def window_batches(tokens, seq_len: int, stride: int, batch_size: int):
    """[B, L] batches of the windows; padding (segment 0, mask 0) fills the tails."""
    rows = []
    for start, first in windows(len(tokens), seq_len, stride):
        chunk = np.asarray(tokens[start:start + seq_len + 1], dtype=np.int32)
        n = len(chunk) - 1
        row = {k: np.zeros(seq_len, dt) for k, dt in
               (("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                ("loss_mask", np.float32))}
        row["inputs"][:n], row["targets"][:n], row["segment_ids"][:n] = chunk[:-1], chunk[1:], 1
        row["loss_mask"][first:n] = 1
        rows.append(row)
        if len(rows) == batch_size:
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            rows = []
    if rows:
        rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - len(rows))
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---- batch sources: what the train loop and evaluate draw from ----
#
# A batch source has `tokenizer`, `token_bytes` (UTF-8 bytes of text per token id, for bits per
# byte), `batch_at(step, process_index, process_count)` (this process's rows of the global batch of
# a step, a pure function of (seed, step)) and `eval_batches(split, batch_size, stride, max_tokens)`
# (batches that score every target of a split exactly once). TokenBatches serves token data,
# chat.ChatBatches conversations (loss on assistant tokens only).

class TokenBatches:
    """Windows of a token sequence: random or sequential for training, exact windows for
    evaluation."""

    def __init__(self, data: TokenData, cfg: DataConfig, seq_len: int, seed: int):
        self.data, self.cfg, self.seq_len, self.seed = data, cfg, seq_len, seed
        self.tokenizer = data.tokenizer
        self.token_bytes = data.tokenizer.token_byte_lengths()

    def batch_at(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        cfg = self.cfg
        return batch_at(self.data.split("train"), self.seed, step, cfg.batch_size, self.seq_len,
                        cfg.sampling, eot_id=self.tokenizer.eot_id, segments=cfg.segments,
                        process_index=process_index, process_count=process_count)

    def eval_batches(self, split: str = "val", batch_size: int = 0, stride: int = 0,
                     max_tokens: int = 0):
        tokens = self.data.split(split)
        if max_tokens:
            tokens = tokens[:max_tokens + 1]
        return window_batches(tokens, self.seq_len, stride, batch_size or self.cfg.batch_size)


def open_batches(cfg, tokenizer: Tokenizer | None = None, training: bool = True, held_out_chats=()):
    """The batch source of a Config's data section: conversations when data.chat (or, to evaluate,
    data.chat_val) is set, else token data (data.dir, else data.path). `tokenizer`: the model's,
    when it exists already (fine-tuning, evaluation); else the data's own, or data.tokenizer.
    data.preferences (training): preference pairs for DPO (pairs.PairBatches), with `held_out_chats`
    (conversations) scored beside them."""
    d = cfg.data
    if d.preferences and training:
        return pairs.open_batches(cfg, tokenizer or Tokenizer.from_spec(d.tokenizer),
                                  held_out_chats)
    if d.chat or (d.chat_val and not training):
        tokenizer = tokenizer or Tokenizer.from_spec(d.tokenizer)
        loaded = dialogs.load(d.chat) if d.chat else dialogs.LoadedDialogs([], [], 0)
        held_out = dialogs.load(d.chat_val).conversations if d.chat_val else ()
        return chat.ChatBatches(loaded.conversations, tokenizer, cfg.model.seq_len, d.batch_size,
                                cfg.train.seed, val=held_out,
                                val_fraction=0.0 if held_out or not d.chat else d.val_fraction,
                                ids=loaded.ids, windows=d.chat_windows, training=training)
    return TokenBatches(load(d, tokenizer, training), d, cfg.model.seq_len, cfg.train.seed)


class Prefetcher:
    """Builds and places the batches for steps [start, stop) in a background thread, `depth`
    ahead."""

    def __init__(self, make_batch, start: int, stop: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = threading.Thread(target=self._run, args=(make_batch, start, stop),
                                        daemon=True)
        self._thread.start()

    def _run(self, make_batch, start, stop):
        try:
            for step in range(start, stop):
                self._queue.put((step, make_batch(step)))
            self._queue.put((None, StopIteration()))
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._queue.put((None, e))

    def __iter__(self):
        return self

    def __next__(self):
        step, batch = self._queue.get()
        if step is None:
            raise batch
        return step, batch


# ---- command line ----

def main(argv: list[str] | None = None) -> None:
    def run(operands: list[str], settings: list[str]) -> None:
        cfg = cli.tool_config(PrepareCommand, settings,
                              ("prepare.source", "prepare.tokenizer", "prepare.out")).prepare
        meta = prepare(cfg)
        keys = ("source", "tokenizer", "n_vocab", "dtype", "tokens", "documents", "bytes", "reused",
                "seconds", "mb_per_s", "tokenizer_train_s")
        print(json.dumps({"out": cfg.out, **{k: meta.get(k) for k in keys},
                          **{f"{s}_tokens": meta["splits"][s]["tokens"] for s in SPLITS}}))

    usage = ("prepare.source=SOURCE prepare.tokenizer=SPEC prepare.out=DIR "
             f"[prepare.KEY=VALUE ...]\n  SOURCE: {SOURCES}\n  SPEC: a tokenizer spec "
             "(char and bpe:N are trained on the source)")
    cli.run("python -m jaxgpt.data",
            {"prepare": cli.Command(run, usage, PrepareCommand, operands=(0, 0))}, argv)


if __name__ == "__main__":
    main()
