"""Token data: a text file tokenized once into train/val memmaps, and batches drawn from them.

A batch is a dict of [B, L] numpy arrays: `inputs`, `targets`, `segment_ids` (0 = padding) and
`loss_mask`. The batch at a step is a pure function of (seed, step), so a run is reproducible and
can resume at any step without replaying data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
from pathlib import Path

import numpy as np

from jaxgpt.config import DataConfig
from jaxgpt.errors import DataError
from jaxgpt.tokenizer import Tokenizer

CACHE = Path(os.environ.get("JAXGPT_CACHE", Path.home() / ".cache" / "jaxgpt"))


@dataclasses.dataclass
class TokenData:
    train: np.ndarray            # 1-D token ids (a read-only memmap)
    val: np.ndarray
    tokenizer: Tokenizer
    bytes_per_token: dict        # split -> UTF-8 bytes of text per token, for bits per byte

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise DataError(f"unknown split {name!r}: expected train or val")
        return self.train if name == "train" else self.val


def token_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 2 ** 16 else np.uint32


def _write_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def tokenize_text_file(path: str | Path, tokenizer_spec: str, val_fraction: float) -> Path:
    """Tokenize a text file into a cache directory (reused when the file and settings match).

    The split is by characters, as nanoGPT does: the last `val_fraction` of the text is val.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (for Tiny Shakespeare run experiments/download.py)")
    raw = path.read_bytes()
    key = hashlib.sha256(raw + f"|{tokenizer_spec}|{val_fraction}".encode()).hexdigest()[:16]
    out = CACHE / "tokens" / f"{path.stem}-{key}"
    if (out / "meta.json").is_file():
        return out
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte offset {e.start}") from None
    if not text:
        raise DataError(f"{path}: the file is empty")
    tokenizer = Tokenizer.from_spec(tokenizer_spec, corpus=text)
    n_train_chars = int(len(text) * (1 - val_fraction))
    parts = {"train": text[:n_train_chars], "val": text[n_train_chars:]}
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": str(path), "tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint,
            "n_vocab": tokenizer.n_vocab, "dtype": np.dtype(token_dtype(tokenizer.n_vocab)).name, "splits": {}}
    for name, part in parts.items():
        ids = tokenizer.encode_np(part).astype(token_dtype(tokenizer.n_vocab))
        _write_atomic(out / f"{name}.bin", ids)
        meta["splits"][name] = {"tokens": int(ids.size), "bytes": len(part.encode("utf-8"))}
    tokenizer.save(out)
    (out / "meta.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(out / "meta.tmp", out / "meta.json")  # written last: its presence means complete
    return out


def load_dir(directory: str | Path) -> TokenData:
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{directory}: no meta.json (prepare the data first)")
    meta = json.loads(meta_path.read_text())
    tokenizer = Tokenizer.load(directory)
    arrays = {}
    for name, info in meta["splits"].items():
        arrays[name] = np.memmap(directory / f"{name}.bin", dtype=meta["dtype"], mode="r")
        if arrays[name].size != info["tokens"]:
            raise DataError(f"{directory / (name + '.bin')}: {arrays[name].size} tokens, meta.json says {info['tokens']}")
    bpt = {name: info["bytes"] / max(info["tokens"], 1) for name, info in meta["splits"].items()}
    return TokenData(arrays["train"], arrays["val"], tokenizer, bpt)


def load(cfg: DataConfig) -> TokenData:
    if cfg.dir:
        return load_dir(cfg.dir)
    if cfg.path:
        return load_dir(tokenize_text_file(cfg.path, cfg.tokenizer, cfg.val_fraction))
    raise DataError("no data: set data.path=FILE.txt or data.dir=PREPARED_DIR")


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.n_vocab > vocab_size:
        raise DataError(f"the data's tokenizer {tokenizer.name} has {tokenizer.n_vocab} tokens but "
                        f"model.vocab_size={vocab_size}")


def check_same_tokenizer(data_tokenizer: Tokenizer, model_tokenizer: Tokenizer) -> None:
    if data_tokenizer.fingerprint != model_tokenizer.fingerprint:
        raise DataError(f"the data was tokenized with {data_tokenizer.name} ({data_tokenizer.n_vocab} tokens) "
                        f"but the model uses {model_tokenizer.name} ({model_tokenizer.n_vocab} tokens)")


def batch_at(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int,
             sampling: str = "random") -> dict:
    """The global batch for a step: random windows (seeded by (seed, step)) or consecutive windows."""
    n_windows = len(tokens) - seq_len - 1
    if n_windows < 1:
        raise DataError(f"only {len(tokens)} tokens: too few for windows of {seq_len + 1}")
    if sampling == "random":
        starts = np.random.default_rng([seed, step]).integers(0, n_windows + 1, size=batch_size)
    else:
        starts = ((step * batch_size + np.arange(batch_size)) * seq_len) % n_windows
    idx = starts[:, None] + np.arange(seq_len + 1)
    window = np.asarray(tokens[idx], dtype=np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": window[:, :-1], "targets": window[:, 1:], "segment_ids": ones,
            "loss_mask": ones.astype(np.float32)}


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
