"""Tokenizing a source into a prepared directory: token shards `{split}_{i:06d}.bin` (uint16 when
the vocabulary fits, else uint32; every document ends with the end-of-text token), the tokenizer
files, and `meta.json`, written last, so that a directory without it is never mistaken for a
finished one.

Documents go to train or val by a seeded hash of their index; worker processes tokenize pieces of
about CHUNK_BYTES in order; a run that stopped resumes after its last finished shard. The command
line is `python -m jaxgpt.data prepare prepare.source=... prepare.tokenizer=... prepare.out=DIR`
(config.PrepareConfig holds the settings).
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import tqdm

from jaxgpt.config import PrepareCommand, PrepareConfig, overrides
from jaxgpt.data.sources import CHUNK_BYTES, Source, decode, limited, open_source
from jaxgpt.data.tokenizer import Tokenizer, parse_spec
from jaxgpt.errors import DataError
from jaxgpt.files import read_json, sha256, write_json

CACHE = Path(os.environ.get("JAXGPT_CACHE", Path.home() / ".cache" / "jaxgpt"))
FORMAT = "jaxgpt-data/1"
SPLITS = ("train", "val")


def token_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 2 ** 16 else np.uint32


# ---- tokenizing in worker processes ----

_WORKER: tuple | None = None  # (tokenizer, seed, val_fraction, dtype) in each worker


def _steady_malloc() -> None:
    """Keep glibc's mmap threshold fixed. By default it rises as big blocks are freed, and then
    every ~1 MB text piece and id array lands on the heap, which fragments: a process grows by
    hundreds of MB over a large corpus. Fixed, big blocks go back to the OS as soon as they are
    freed."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 18)  # M_MMAP_THRESHOLD = 256 KiB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _init_worker(tokenizer_dir: str, seed: int, val_fraction: float, dtype: str) -> None:
    global _WORKER
    _steady_malloc()
    _WORKER = (Tokenizer.load(tokenizer_dir), seed, val_fraction, np.dtype(dtype))


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer: a cheap, well-spread hash of 64-bit integers (wraps on overflow).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def doc_is_val(doc_index: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """Which documents go to val: a pure function of (seed, index), so workers need not
    coordinate."""
    z = _mix64(np.asarray(doc_index, np.uint64) + _mix64(np.array([seed % 2 ** 64], np.uint64)))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < val_fraction


def _encode_task(task) -> dict:
    """(first document index, pieces) -> split -> (ids with an eot after each document, documents,
    bytes)."""
    first_doc, pieces = task
    tokenizer, seed, val_fraction, dtype = _WORKER
    ends = np.array([e for _, e in pieces], bool)
    doc = first_doc + np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    is_val = doc_is_val(doc, seed, val_fraction)
    eot = np.array([tokenizer.eot_id], dtype)
    out = {}
    for split, mask in zip(SPLITS, (~is_val, is_val), strict=False):
        parts = []
        for i in np.flatnonzero(mask):
            parts += [tokenizer.encode_np(pieces[i][0]).astype(dtype)] + ([eot] if ends[i] else [])
        n_bytes = sum(len(pieces[i][0].encode("utf-8")) for i in np.flatnonzero(mask))
        out[split] = (np.concatenate(parts) if parts else np.zeros(0, dtype), int(ends[mask].sum()),
                      n_bytes)
    return out


def tasks(pieces, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, list]]:
    """Group pieces into tasks of about chunk_bytes characters: (index of the first piece's
    document, pieces)."""
    batch, size, first_doc, n_docs = [], 0, 0, 0
    for text, ends in pieces:
        batch.append((text, ends))
        size, n_docs = size + len(text), n_docs + ends
        if size >= chunk_bytes:
            yield first_doc, batch
            batch, size, first_doc = [], 0, n_docs
    if batch:
        yield first_doc, batch


class Encoder:
    """Tokenizes tasks in `workers` processes (in this one when workers <= 1), results in task
    order.

    At most 2 * workers tasks are in flight (Pool.imap would read the whole corpus ahead), so memory
    stays bounded however large the corpus is."""

    def __init__(self, tokenizer_dir, workers: int = 1, seed: int = 0, val_fraction: float = 0.0,
                 dtype="uint32"):
        args = (str(tokenizer_dir), seed, val_fraction, np.dtype(dtype).name)
        self.workers, self.pool = workers, None
        if workers > 1:  # spawn: forking a process that may hold threads (tqdm, jax) is unsafe
            self.pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, args)
        else:
            _init_worker(*args)

    def map(self, indexed_tasks) -> Iterator[tuple[int, dict]]:
        if self.pool is None:
            yield from ((i, _encode_task(task)) for i, task in indexed_tasks)
            return
        pending = collections.deque()
        for i, task in indexed_tasks:
            pending.append((i, self.pool.apply_async(_encode_task, (task,))))
            if len(pending) >= 2 * self.workers:
                i, result = pending.popleft()
                yield i, result.get()
        while pending:
            i, result = pending.popleft()
            yield i, result.get()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---- writing a prepared directory ----

class _ShardWriter:
    """Appends ids to `{split}_{index:06d}.bin.tmp`, hashing as it goes; a full shard is renamed
    into place."""

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int, index: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens, self.index, self.file = shard_tokens, index, None

    def write(self, ids: np.ndarray) -> dict | None:
        """Append; returns the shard's record when this write filled it (shards end at task
        ends)."""
        if ids.size:
            if self.file is None:
                self.name = f"{self.split}_{self.index:06d}.bin"
                self.file = open(self.directory / (self.name + ".tmp"), "wb")
                self.hash, self.tokens = hashlib.sha256(), 0
            raw = ids.astype(self.dtype, copy=False).tobytes()
            self.file.write(raw)
            self.hash.update(raw)
            self.tokens += ids.size
        return self.close() if self.file is not None and self.tokens >= self.shard_tokens else None

    def close(self) -> dict | None:
        if self.file is None:
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.directory / (self.name + ".tmp"), self.directory / self.name)
        self.file, self.index = None, self.index + 1
        return {"file": self.name, "tokens": self.tokens, "sha256": self.hash.hexdigest()}


def _shards_complete(directory: Path, record: dict, itemsize: int) -> bool:
    return all((directory / s["file"]).is_file()
               and (directory / s["file"]).stat().st_size == s["tokens"] * itemsize
               for split in record["splits"].values() for s in split["shards"])


def build_tokenizer(spec: str, source: Source, limit: int = 0) -> Tokenizer:
    """A tokenizer by spec; char and bpe:N come from a first pass over the corpus (streamed, like
    the second)."""
    parsed = parse_spec(spec)
    if parsed.kind not in ("char", "bpe"):
        return Tokenizer.from_spec(spec)
    if parsed.kind == "char":
        chars = set()
        for text, _ in limited(source.pieces(), limit):
            chars.update(text)
        return Tokenizer("char", chars=sorted(chars))
    # rustbpe buffers 8192 texts at a time: feed it short ones so that buffer stays small.
    texts = (text[i:i + 8192] for text, _ in limited(source.pieces(), limit)
             for i in range(0, len(text), 8192))
    return Tokenizer.train_bpe(texts, parsed.vocab_size)


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenize cfg.source into cfg.out; returns meta.json's content plus `reused`, `seconds` and
    `mb_per_s`.

    The same inputs and settings (a content hash) reuse a finished directory, and a run that stopped
    resumes after its last finished shard. More than one worker spawns processes (workers=0: one per
    CPU core but one), so a script calling this must do so under `if __name__ == "__main__":`."""
    t0 = time.perf_counter()
    # types and choices checked (and ints made floats) as the command line's are, for configs built
    # in Python
    cfg = overrides.from_dict({"prepare": dataclasses.asdict(cfg)}, PrepareCommand).prepare
    if not 0 <= cfg.val_fraction < 1:
        raise DataError(f"prepare.val_fraction={cfg.val_fraction}: expected 0 <= fraction < 1")
    _steady_malloc()
    src = open_source(cfg.source, errors=cfg.errors, field=cfg.field, doc_split=cfg.doc_split,
                      hf_split=cfg.hf_split, chunk_bytes=cfg.chunk_bytes)
    out = Path(cfg.out)
    trained = parse_spec(cfg.tokenizer).kind in ("char", "bpe")
    pretrained = None if trained else Tokenizer.from_spec(cfg.tokenizer)
    settings = dict(source=src.identity,
                    tokenizer=cfg.tokenizer if trained else pretrained.fingerprint,
                    **{k: getattr(cfg, k) for k in ("val_fraction", "seed", "errors", "doc_split",
                                                    "limit", "dtype", "shard_tokens",
                                                    "chunk_bytes")}, format=FORMAT)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in src.files:  # the inputs' content, so an edited file is never served from old shards
        key.update(f"{path.name}:{sha256(path)}".encode())
    key = key.hexdigest()

    meta = read_json(out / "meta.json")
    if meta is not None:
        if meta.get("key") == key and _shards_complete(out, meta, np.dtype(meta["dtype"]).itemsize):
            seconds = time.perf_counter() - t0
            return {**meta, "reused": True, "seconds": seconds,
                    "mb_per_s": meta["bytes"] / 1e6 / seconds}
        if not cfg.overwrite:
            raise DataError(f"{out}: holds data prepared from other inputs or settings; "
                            f"use another prepare.out or prepare.overwrite=true")
        (out / "meta.json").unlink()  # from here on the directory no longer looks finished
    out.mkdir(parents=True, exist_ok=True)
    tok, state, tokenizer_s = _started(cfg, out, key, src, pretrained)
    splits = _encoded(cfg, out, src, state)
    meta = {"format": FORMAT, "key": key, "source": cfg.source, "tokenizer": tok.name,
            "tokenizer_fingerprint": tok.fingerprint, "n_vocab": tok.n_vocab, "eot_id": tok.eot_id,
            "dtype": state["dtype"], "tokens": sum(splits[s]["tokens"] for s in SPLITS),
            "documents": sum(splits[s]["documents"] for s in SPLITS),
            "bytes": sum(splits[s]["bytes"] for s in SPLITS),
            "split_rule": {"by": "document", "val_fraction": cfg.val_fraction, "seed": cfg.seed},
            "settings": settings, "splits": splits}
    write_json(out / "meta.json", meta)  # last: its presence means the directory is complete
    (out / "progress.json").unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {**meta, "reused": False, "seconds": seconds, "mb_per_s": meta["bytes"] / 1e6 / seconds,
            "tokenizer_train_s": tokenizer_s}


def _started(cfg: PrepareConfig, out: Path, key: str, src, pretrained
             ) -> tuple[Tokenizer, dict, float]:
    """(tokenizer, progress state, seconds spent training the tokenizer): the progress of an earlier
    run with the same key, else a fresh start (stale shards removed, the tokenizer built and
    saved)."""
    state = read_json(out / "progress.json")
    if (state and state.get("key") == key
            and _shards_complete(out, state, np.dtype(state["dtype"]).itemsize)):
        # one copy: a pretrained one matches the key
        return pretrained or Tokenizer.load(out), state, 0.0
    for stale in out.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].bin*"):
        stale.unlink()
    t_tok = time.perf_counter()
    tok = pretrained or build_tokenizer(cfg.tokenizer, src, cfg.limit)
    tokenizer_s = time.perf_counter() - t_tok
    np_dtype = np.dtype(token_dtype(tok.n_vocab) if cfg.dtype == "auto" else cfg.dtype)
    if tok.n_vocab > np.iinfo(np_dtype).max + 1:
        raise DataError(f"{out}: tokenizer {tok.name} has {tok.n_vocab} ids, too many for "
                        f"prepare.dtype={cfg.dtype} (at most {np.iinfo(np_dtype).max + 1}); "
                        "use prepare.dtype=auto")
    tok.save(out)
    state = {"key": key, "dtype": np_dtype.name, "splits": {
        s: {"shards": [], "open_from": 0, "documents": 0, "bytes": 0} for s in SPLITS}}
    write_json(out / "progress.json", state)  # after the tokenizer, so a resume can trust it
    return tok, state, tokenizer_s


def _encoded(cfg: PrepareConfig, out: Path, src, state: dict) -> dict:
    """Encode the source's pieces into shards, from the first task not in a finished shard on; the
    splits' entries of meta.json (shards, documents, bytes, tokens)."""
    workers = cfg.workers or max(1, (os.cpu_count() or 1) - 1)
    np_dtype, splits = np.dtype(state["dtype"]), state["splits"]
    writers = {s: _ShardWriter(out, s, np_dtype, cfg.shard_tokens, len(splits[s]["shards"]))
               for s in SPLITS}
    counts = {s: {"documents": splits[s]["documents"], "bytes": splits[s]["bytes"]} for s in SPLITS}
    start = min(splits[s]["open_from"] for s in SPLITS)  # tasks before it are in finished shards
    pieces = limited(src.pieces(), cfg.limit)
    indexed = ((i, t) for i, t in enumerate(tasks(pieces, cfg.chunk_bytes)) if i >= start)
    bar = tqdm.tqdm(total=src.total_bytes if not start else None, unit="B", unit_scale=True,
                    disable=not cfg.progress, desc=f"tokenizing {cfg.source}", file=sys.stderr,
                    dynamic_ncols=True)
    with Encoder(out, workers, cfg.seed, cfg.val_fraction, np_dtype) as encoder:
        for i, result in encoder.map(indexed):
            for s in SPLITS:
                ids, n_docs, n_bytes = result[s]
                bar.update(n_bytes)
                if i < splits[s]["open_from"]:
                    continue
                counts[s]["documents"] += n_docs
                counts[s]["bytes"] += n_bytes
                if shard := writers[s].write(ids):
                    splits[s]["shards"].append(shard)
                    splits[s].update(counts[s], open_from=i + 1)
                    write_json(out / "progress.json", state)
    bar.close()
    for s in SPLITS:
        if shard := writers[s].close():
            splits[s]["shards"].append(shard)
        splits[s].update(counts[s])
        splits[s]["tokens"] = sum(shard["tokens"] for shard in splits[s]["shards"])
        del splits[s]["open_from"]
    if not splits["train"]["tokens"]:
        raise DataError(f"prepare.source={cfg.source}: the train split is empty "
                        f"({splits['val']['documents']} documents, all drawn for val); use more "
                        "documents or a smaller prepare.val_fraction")
    if cfg.val_fraction and not splits["val"]["tokens"]:
        print(f"warning: {out}: the val split is empty ({splits['train']['documents']} documents); "
              f"with one large file use prepare.doc_split=paragraph or line", file=sys.stderr)
    return splits


def read_text_file(path: str | Path) -> bytes:
    """The bytes of `data.path`, or a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (for Tiny Shakespeare run "
                        "experiments/download.py)")
    return path.read_bytes()


def split_text(raw: bytes, path, val_fraction: float, errors: str) -> tuple[str, str]:
    """(train, val) text of a data.path file: split by characters, as nanoGPT does, the last
    `val_fraction` being val. Invalid UTF-8 stops (errors="strict") or becomes U+FFFD
    ("replace")."""
    text = decode(raw, path, 0, errors, set(), fix="data.errors=replace")
    if not text:
        raise DataError(f"{path}: the file is empty")
    n_train_chars = int(len(text) * (1 - val_fraction))
    return text[:n_train_chars], text[n_train_chars:]


def tokenize_text_file(path: str | Path, tokenizer_spec: str, val_fraction: float,
                       errors: str = "strict") -> Path:
    """Tokenize a text file (data.path) into a cache directory (reused when the file and settings
    match).

    The split is by characters, as nanoGPT does: the last `val_fraction` of the text is val. Invalid
    UTF-8 stops with an error (errors="strict") or becomes U+FFFD ("replace"), as data.errors
    says."""
    path = Path(path)
    raw = read_text_file(path)
    settings = (f"|{tokenizer_spec}|{val_fraction}|{FORMAT}"
                + ("" if errors == "strict" else f"|{errors}"))
    key = hashlib.sha256(raw + settings.encode()).hexdigest()[:16]
    out = CACHE / "tokens" / f"{path.stem}-{key}"
    if (out / "meta.json").is_file():
        return out
    parts = split_text(raw, path, val_fraction, errors)
    tokenizer = Tokenizer.from_spec(tokenizer_spec, corpus="".join(parts))
    dtype = np.dtype(token_dtype(tokenizer.n_vocab))
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, part in zip(SPLITS, parts, strict=False):
        shard = _ShardWriter(out, name, dtype, 0, 0).write(tokenizer.encode_np(part))
        splits[name] = {"tokens": shard["tokens"] if shard else 0, "documents": 1,
                        "bytes": len(part.encode("utf-8")), "shards": [shard] if shard else []}
    tokenizer.save(out)
    write_json(out / "meta.json", {
        "format": FORMAT, "source": str(path), "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint, "n_vocab": tokenizer.n_vocab,
        "eot_id": tokenizer.eot_id, "dtype": dtype.name, "splits": splits})
    return out

