"""Token data: prepared token shards loaded, and the batches drawn from them.

    python -m jaxgpt.data prepare --source text:books/ --tokenizer bpe:4096 --out data/books
    python -m jaxgpt.data prepare --source chitchat --tokenizer gpt2 --out data/chitchat --workers 2

A prepared directory holds token shards `{split}_{i:06d}.bin` (uint16 when the vocabulary fits, else
uint32; every document ends with the end-of-text token), the tokenizer files, and `meta.json`, written
last: a directory without it is never mistaken for a finished one. Documents go to train or val by a
seeded hash of their index. A batch is a dict of [B, L] numpy arrays: `inputs`, `targets`,
`segment_ids` (0 = padding) and `loss_mask`; the batch at a step is a pure function of (seed, step), so
a run is reproducible and resumes at any step without replaying data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import threading
from pathlib import Path

import numpy as np

from jaxgpt.config import DataConfig
from jaxgpt.errors import DataError
from jaxgpt.prepare import FORMAT, SHARD_TOKENS, SPLITS, prepare, read_json, sha256, tokenize_text_file
from jaxgpt.sources import SOURCES
from jaxgpt.tokenizer import Tokenizer


@dataclasses.dataclass
class TokenData:
    train: np.ndarray            # 1-D token ids (a read-only memmap, or ShardedTokens over several)
    val: np.ndarray
    tokenizer: Tokenizer
    bytes_per_token: dict        # split -> UTF-8 bytes of text per token, for bits per byte
    meta: dict = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: expected train or val")
        tokens = self.train if name == "train" else self.val
        if len(tokens) == 0:
            raise DataError(f"the {name} split of {self.meta.get('dir', 'the data')} is empty "
                            f"(prepare it with --val-fraction > 0 and more than one document)")
        return tokens


# ---- loading ----

class ShardedTokens:
    """The shards of one split read as one 1-D sequence: windows may cross from one shard into the next."""

    def __init__(self, arrays: list[np.ndarray], dtype):
        self.arrays, self.dtype = arrays, np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            parts = [a[max(start - s0, 0):max(stop - s0, 0)] for a, s0 in zip(self.arrays, self.starts)]
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
        raise DataError(f"{path}: {size} bytes but meta.json says {info['tokens']} {dtype.name} tokens "
                        f"({expected} bytes): a truncated or replaced shard; prepare the data again")
    if verify and sha256(path) != info["sha256"]:
        raise DataError(f"{path}: checksum mismatch (sha256 differs from meta.json); prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r")


def load_dir(directory: str | Path, verify: bool = True) -> TokenData:
    """A prepared directory's splits (sizes always checked, sha256 checksums when `verify`)."""
    directory = Path(directory)
    meta = read_json(directory / "meta.json")
    if meta is None:
        raise DataError(f"{directory}: no meta.json (prepare it with python -m jaxgpt.data prepare; "
                        f"an unfinished prepare leaves none)")
    if meta.get("format") != FORMAT:
        raise DataError(f"{directory / 'meta.json'}: not a jaxgpt data directory (format {meta.get('format')!r})")
    tokenizer = Tokenizer.load(directory)
    if tokenizer.fingerprint != meta["tokenizer_fingerprint"]:
        raise DataError(f"{directory}: the tokenizer files do not match meta.json (fingerprint differs)")
    dtype, arrays = np.dtype(meta["dtype"]), {}
    for name in SPLITS:
        shards = [_open_shard(directory / s["file"], s, dtype, verify) for s in meta["splits"][name]["shards"]]
        arrays[name] = shards[0] if len(shards) == 1 else ShardedTokens(shards, dtype)
    bpt = {name: info["bytes"] / max(info["tokens"], 1) for name, info in meta["splits"].items()}
    return TokenData(arrays["train"], arrays["val"], tokenizer, bpt, {**meta, "dir": str(directory)})


def load(cfg: DataConfig) -> TokenData:
    if cfg.dir:
        data = load_dir(cfg.dir, verify=cfg.verify)
    elif cfg.path:
        data = load_dir(tokenize_text_file(cfg.path, cfg.tokenizer, cfg.val_fraction))
    else:
        raise DataError("no data: set data.path=FILE.txt or data.dir=PREPARED_DIR")
    if len(data.train) == 0:
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
        raise DataError(f"the data was tokenized with {data_tokenizer.name} ({data_tokenizer.n_vocab} tokens) "
                        f"but the model uses {model_tokenizer.name} ({model_tokenizer.n_vocab} tokens)")


def batch_at(tokens, seed: int, step: int, batch_size: int, seq_len: int, sampling: str = "random", *,
             eot_id: int | None = None, segments: bool = False, process_index: int = 0,
             process_count: int = 1) -> dict:
    """This process's rows of the global batch for a step: random windows (seeded by (seed, step)) or
    consecutive windows packed in order. Process p holds rows [p*B/P, (p+1)*B/P), so the processes
    together hold exactly the batch one process draws, and each reads only its own windows.

    segments: segment ids start at 1 and grow by one after each end-of-text token, so packed
    documents do not attend to each other; off, they are all ones (nanoGPT's plain packing)."""
    n_windows = len(tokens) - seq_len - 1
    if n_windows < 1:
        raise DataError(f"only {len(tokens)} tokens: too few for windows of {seq_len + 1}")
    if batch_size % process_count:
        raise DataError(f"data.batch_size={batch_size} does not split evenly over {process_count} processes")
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


class Prefetcher:
    """Builds and places the batches for steps [start, stop) in a background thread, `depth` ahead."""

    def __init__(self, make_batch, start: int, stop: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = threading.Thread(target=self._run, args=(make_batch, start, stop), daemon=True)
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
    from jaxgpt import cli

    parser = argparse.ArgumentParser(prog="python -m jaxgpt.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a source into token shards + meta.json")
    p.add_argument("--source", required=True, help=SOURCES)
    p.add_argument("--tokenizer", required=True,
                   help="gpt2 | cl100k_base | o200k_base | FILE.tiktoken | byte | char | bpe:N")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents for val")
    p.add_argument("--seed", type=int, default=0, help="seeds the train/val split")
    p.add_argument("--errors", default="strict", choices=("strict", "replace"), help="on invalid UTF-8")
    p.add_argument("--field", default="text", help="the text field of jsonl rows and hf datasets")
    p.add_argument("--doc-split", default="file", choices=("file", "paragraph", "line"),
                   help="text sources: one document per file, per blank-line paragraph or per line")
    p.add_argument("--limit", type=int, default=0, help="only the first N documents (0: all)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"))
    p.add_argument("--hf-split", default="train", help="the split of an hf source to read")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
    p.add_argument("--overwrite", action="store_true", help="replace a directory prepared with other settings")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def run(_):
        meta = prepare(args.source, args.tokenizer, args.out, workers=args.workers, val_fraction=args.val_fraction,
                       seed=args.seed, errors=args.errors, field=args.field, doc_split=args.doc_split,
                       limit=args.limit, dtype=args.dtype, hf_split=args.hf_split, shard_tokens=args.shard_tokens,
                       overwrite=args.overwrite, progress=not args.no_progress)
        keys = ("source", "tokenizer", "n_vocab", "dtype", "tokens", "documents", "bytes", "reused", "seconds",
                "mb_per_s", "tokenizer_train_s")
        print(json.dumps({"out": str(args.out), **{k: meta.get(k) for k in keys},
                          **{f"{s}_tokens": meta["splits"][s]["tokens"] for s in SPLITS}}))

    cli.run(run, ["prepare"], usage="python -m jaxgpt.data prepare --source SOURCE --tokenizer NAME --out DIR")


if __name__ == "__main__":
    main()
