"""Token data: sources prepared into token shards, and batches drawn from them.

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
import collections
import ctypes
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from jaxgpt.config import DataConfig
from jaxgpt.errors import DataError
from jaxgpt.tokenizer import Tokenizer

CACHE = Path(os.environ.get("JAXGPT_CACHE", Path.home() / ".cache" / "jaxgpt"))
FORMAT = "jaxgpt-data/1"
SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 20          # text read, and work handed to a worker, in pieces of about this size
SHARD_TOKENS = 1 << 27         # a shard closes once it holds this many tokens (256 MB of uint16)
SOURCES = "text:PATH, jsonl:PATH[:field], hf:NAME[:config], chitchat or chatterbot"


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


def token_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 2 ** 16 else np.uint32


# ---- sources: documents as (text, ends_document) pieces, streamed ----

@dataclasses.dataclass
class Source:
    spec: str
    files: list[Path]                         # hashed into the reuse key
    identity: str                             # what else names the input (a remote dataset's name)
    total_bytes: int | None                   # for the progress bar, when known
    pieces: Callable[[], Iterator[tuple[str, bool]]]  # a fresh stream on every call (one per pass)


def _decode(raw: bytes, path, offset: int, errors: str, warned: set) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}: invalid UTF-8 at byte offset {offset + e.start}"
        if errors == "strict":
            raise DataError(f"{where} (--errors replace substitutes U+FFFD)") from None
        if path not in warned:
            warned.add(path)
            print(f"warning: {where}; replaced with U+FFFD (and any later ones)", file=sys.stderr)
        return raw.decode("utf-8", "replace")


# Pieces of a file are cut right after a match. "file": a newline before a printable ASCII
# character other than "/", where no pre-token of the gpt2, cl100k or o200k patterns can span
# (o200k's punctuation run may swallow newlines and slashes), so a document read in pieces gets
# exactly the ids of the whole text. "line"/"paragraph": at document boundaries.
_CUTS = {"file": re.compile(rb"\n(?=[!-.0-~])"), "line": re.compile(rb"\n"), "paragraph": re.compile(rb"\n\r?\n")}
_DOC_SEPS = {"line": re.compile(r"\n"), "paragraph": re.compile(r"\n\s*\n")}


def _read_pieces(path: Path, errors: str, cut: re.Pattern, chunk_bytes: int) -> Iterator[str]:
    offset, carry, warned = 0, b"", set()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            data, end, i = carry + block, None, len(carry) + len(block)
            while end is None and (i := data.rfind(b"\n", 0, i)) >= 0:
                end = m.end() if (m := cut.match(data, i)) else None
            if end is None:
                if len(data) < 16 * chunk_bytes:  # no cut point yet: read on, but never without bound
                    carry = data
                    continue
                end = len(data) - 4  # forced: step back to the start of a UTF-8 character
                while end > 1 and data[end] & 0xC0 == 0x80:
                    end -= 1
            yield _decode(data[:end], path, offset, errors, warned)
            offset, carry = offset + end, data[end:]
    if carry:
        yield _decode(carry, path, offset, errors, warned)


def _text_pieces(files, errors, doc_split, chunk_bytes):
    for path in files:
        pieces = _read_pieces(path, errors, _CUTS[doc_split], chunk_bytes)
        if doc_split == "file":  # one document per file: only its last piece ends it
            previous = next(pieces)
            for text in pieces:
                yield previous, False
                previous = text
            yield previous, True
        else:
            for text in pieces:
                yield from ((doc.strip("\r\n"), True) for doc in _DOC_SEPS[doc_split].split(text) if doc.strip())


def _jsonl_pieces(files, field, errors):
    for path in files:
        offset, warned = 0, set()
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line, offset = _decode(raw, path, offset, errors, warned), offset + len(raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or field not in row:
                    fields = f" (it has {', '.join(map(repr, row))})" if isinstance(row, dict) else ""
                    raise DataError(f"{path}:{lineno}: no field {field!r}{fields}; choose one with --field")
                if not isinstance(row[field], str):
                    raise DataError(f"{path}:{lineno}: field {field!r} is a {type(row[field]).__name__}, not text")
                if row[field]:
                    yield row[field], True


def _find_files(pattern: str, suffix: str, spec: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"--source {spec}: no {suffix} files at {pattern}")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p}: the file is empty")
    return files


def _need(module: str, package: str, spec: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"--source {spec} needs the {package} package: pip install {package}") from None


def _hf_source(spec: str, rest: str, field: str, split: str) -> Source:
    datasets = _need("datasets", "datasets", spec)
    name, _, config = rest.partition(":")
    local = Path(name).is_dir()  # a dataset saved with save_to_disk; else a Hub name, streamed

    def rows():
        try:
            ds = datasets.load_from_disk(name) if local else \
                datasets.load_dataset(name, config or None, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, not a saved dataset: one remedy
            raise DataError(f"--source {spec}: cannot open the dataset ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split {split!r} (it has {', '.join(ds)}); choose one with --hf-split")
            ds = ds[split]
        return ds

    def pieces():
        for i, row in enumerate(rows()):
            if not isinstance(row.get(field), str):
                raise DataError(f"{spec} row {i}: no text field {field!r} (it has {', '.join(row)}); use --field")
            if row[field]:
                yield row[field], True

    files = sorted(p for p in Path(name).rglob("*") if p.is_file()) if local else []
    return Source(spec, files, f"hf:{'' if local else name}:{config}:{split}:{field}", None, pieces)


def _chitchat_source(spec: str) -> Source:
    chitchat = _need("chitchat_dataset", "chitchat-dataset", spec)
    path = Path(chitchat.__file__).with_name("dataset.json")

    def pieces():  # one conversation per document, one message (a turn's utterances) per line
        for conversation in chitchat.ConversationDataset(str(path)):
            if text := "\n".join(conversation):
                yield text, True
    return Source(spec, [path], "chitchat", None, pieces)


def _chatterbot_source(spec: str) -> Source:
    corpus, yaml = _need("chatterbot_corpus.corpus", "chatterbot-corpus", spec), _need("yaml", "pyyaml", spec)
    files = sorted(Path(corpus.DATA_DIRECTORY).glob("*/*.yml"))  # every language

    def pieces():  # one conversation per document, one statement per line
        for path in files:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            for conversation in (data or {}).get("conversations") or []:
                lines = conversation if isinstance(conversation, list) else [conversation]
                if text := "\n".join(map(str, lines)):
                    yield text, True
    return Source(spec, files, "chatterbot", None, pieces)


def open_source(spec: str, *, errors: str = "strict", field: str = "text", doc_split: str = "file",
                hf_split: str = "train", chunk_bytes: int = CHUNK_BYTES) -> Source:
    kind, _, rest = spec.partition(":")
    if kind == "text" and rest:
        files = _find_files(rest, ".txt", spec)
        return Source(spec, files, "text", sum(p.stat().st_size for p in files),
                      lambda: _text_pieces(files, errors, doc_split, chunk_bytes))
    if kind == "jsonl" and rest:
        path, _, named = rest.rpartition(":")
        if path and re.fullmatch(r"[A-Za-z_][\w\-]*", named):  # jsonl:PATH:field
            rest, field = path, named
        files = _find_files(rest, ".jsonl", spec)
        return Source(spec, files, f"jsonl:{field}", None, lambda: _jsonl_pieces(files, field, errors))
    if kind == "hf" and rest:
        return _hf_source(spec, rest, field, hf_split)
    if spec == "chitchat":
        return _chitchat_source(spec)
    if spec == "chatterbot":
        return _chatterbot_source(spec)
    raise DataError(f"unknown --source {spec!r}: expected {SOURCES}")


def _limited(pieces, limit: int):
    """Stop after `limit` documents (0: all)."""
    n = 0
    for text, ends in pieces:
        yield text, ends
        n += ends
        if limit and n >= limit:
            return


# ---- tokenizing in worker processes ----

_WORKER: tuple | None = None  # (tokenizer, seed, val_fraction, dtype) in each worker


def _steady_malloc() -> None:
    """Keep glibc's mmap threshold fixed. By default it rises as big blocks are freed, and then every
    ~1 MB text piece and id array lands on the heap, which fragments: a process grows by hundreds of
    MB over a large corpus. Fixed, big blocks go back to the OS as soon as they are freed."""
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
    """Which documents go to val: a pure function of (seed, index), so workers need not coordinate."""
    z = _mix64(np.asarray(doc_index, np.uint64) + _mix64(np.array([seed % 2 ** 64], np.uint64)))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < val_fraction


def _encode_task(task) -> dict:
    """(first document index, pieces) -> split -> (ids with an eot after each document, documents, bytes)."""
    first_doc, pieces = task
    tokenizer, seed, val_fraction, dtype = _WORKER
    ends = np.array([e for _, e in pieces], bool)
    doc = first_doc + np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    is_val = doc_is_val(doc, seed, val_fraction)
    eot = np.array([tokenizer.eot_id], dtype)
    out = {}
    for split, mask in zip(SPLITS, (~is_val, is_val)):
        parts = []
        for i in np.flatnonzero(mask):
            parts += [tokenizer.encode_np(pieces[i][0]).astype(dtype)] + ([eot] if ends[i] else [])
        n_bytes = sum(len(pieces[i][0].encode("utf-8")) for i in np.flatnonzero(mask))
        out[split] = (np.concatenate(parts) if parts else np.zeros(0, dtype), int(ends[mask].sum()), n_bytes)
    return out


def tasks(pieces, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, list]]:
    """Group pieces into tasks of about chunk_bytes characters: (index of the first piece's document, pieces)."""
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
    """Tokenizes tasks in `workers` processes (in this one when workers <= 1), results in task order.

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
    """Appends ids to `{split}_{index:06d}.bin.tmp`, hashing as it goes; a full shard is renamed into place."""

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int, index: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens, self.index, self.file = shard_tokens, index, None

    def write(self, ids: np.ndarray) -> dict | None:
        """Append; returns the shard's record when this write filled it (shards end at task ends)."""
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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _shards_complete(directory: Path, record: dict, itemsize: int) -> bool:
    return all((directory / s["file"]).is_file() and (directory / s["file"]).stat().st_size == s["tokens"] * itemsize
               for split in record["splits"].values() for s in split["shards"])


def build_tokenizer(spec: str, source: Source, limit: int = 0) -> Tokenizer:
    """A tokenizer by name; char and bpe:N come from a first pass over the corpus (streamed, like the second)."""
    if spec != "char" and not spec.startswith("bpe:"):
        return Tokenizer.from_spec(spec)
    if spec == "char":
        chars = set()
        for text, _ in _limited(source.pieces(), limit):
            chars.update(text)
        return Tokenizer("char", chars=sorted(chars))
    try:
        vocab_size = int(spec[4:])
    except ValueError:
        raise DataError(f"--tokenizer {spec}: expected bpe:VOCAB_SIZE, e.g. bpe:4096") from None
    # rustbpe buffers 8192 texts at a time: feed it short ones so that buffer stays small.
    texts = (text[i:i + 8192] for text, _ in _limited(source.pieces(), limit) for i in range(0, len(text), 8192))
    return Tokenizer.train_bpe(texts, vocab_size)


def prepare(source: str, tokenizer: str, out: str | Path, *, workers: int = 1, val_fraction: float = 0.1,
            seed: int = 0, errors: str = "strict", field: str = "text", doc_split: str = "file", limit: int = 0,
            dtype: str = "auto", hf_split: str = "train", shard_tokens: int = SHARD_TOKENS,
            chunk_bytes: int = CHUNK_BYTES, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize a source into `out`; returns meta.json's content plus `reused`, `seconds` and `mb_per_s`.

    The same inputs and settings (a content hash) reuse a finished directory, and a run that stopped
    resumes after its last finished shard. workers > 1 spawns processes, so a script calling this
    must do so under `if __name__ == "__main__":`."""
    t0, tokenizer_s = time.perf_counter(), 0.0
    for name, value, allowed in (("--errors", errors, ("strict", "replace")),
                                 ("--dtype", dtype, ("auto", "uint16", "uint32")),
                                 ("--doc-split", doc_split, ("file", "paragraph", "line"))):
        if value not in allowed:
            raise DataError(f"{name} {value}: expected one of {', '.join(allowed)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: expected 0 <= fraction < 1")
    _steady_malloc()
    src = open_source(source, errors=errors, field=field, doc_split=doc_split, hf_split=hf_split,
                      chunk_bytes=chunk_bytes)
    out = Path(out)
    trained = tokenizer == "char" or tokenizer.startswith("bpe:")
    pretrained = None if trained else Tokenizer.from_spec(tokenizer)
    settings = dict(source=src.identity, tokenizer=tokenizer if trained else pretrained.fingerprint,
                    val_fraction=val_fraction, seed=seed, errors=errors, doc_split=doc_split, limit=limit, dtype=dtype,
                    shard_tokens=shard_tokens, chunk_bytes=chunk_bytes, format=FORMAT)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in src.files:  # the inputs' content, so an edited file is never served from old shards
        key.update(f"{path.name}:{_sha256(path)}".encode())
    key = key.hexdigest()

    meta = _read_json(out / "meta.json")
    if meta is not None:
        if meta.get("key") == key and _shards_complete(out, meta, np.dtype(meta["dtype"]).itemsize):
            seconds = time.perf_counter() - t0
            return {**meta, "reused": True, "seconds": seconds, "mb_per_s": meta["bytes"] / 1e6 / seconds}
        if not overwrite:
            raise DataError(f"{out}: holds data prepared from other inputs or settings; "
                            f"use another --out or --overwrite")
        (out / "meta.json").unlink()  # from here on the directory no longer looks finished
    out.mkdir(parents=True, exist_ok=True)
    state = _read_json(out / "progress.json")
    if not (state and state.get("key") == key and _shards_complete(out, state, np.dtype(state["dtype"]).itemsize)):
        for stale in out.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].bin*"):
            stale.unlink()
        t_tok = time.perf_counter()
        tok = pretrained or build_tokenizer(tokenizer, src, limit)
        tokenizer_s = time.perf_counter() - t_tok
        np_dtype = np.dtype(token_dtype(tok.n_vocab) if dtype == "auto" else dtype)
        if tok.n_vocab > np.iinfo(np_dtype).max + 1:
            raise DataError(f"{out}: tokenizer {tok.name} has {tok.n_vocab} ids, too many for --dtype {dtype} "
                            f"(at most {np.iinfo(np_dtype).max + 1}); use --dtype auto")
        tok.save(out)
        state = {"key": key, "dtype": np_dtype.name, "splits": {
            s: {"shards": [], "open_from": 0, "documents": 0, "bytes": 0} for s in SPLITS}}
        _write_json(out / "progress.json", state)  # after the tokenizer, so a resume can trust it
    else:
        tok = pretrained or Tokenizer.load(out)  # one copy: a pretrained one matches the key's fingerprint
    np_dtype, splits = np.dtype(state["dtype"]), state["splits"]
    writers = {s: _ShardWriter(out, s, np_dtype, shard_tokens, len(splits[s]["shards"])) for s in SPLITS}
    counts = {s: {"documents": splits[s]["documents"], "bytes": splits[s]["bytes"]} for s in SPLITS}
    start = min(splits[s]["open_from"] for s in SPLITS)  # tasks before it are in finished shards
    indexed = ((i, t) for i, t in enumerate(tasks(_limited(src.pieces(), limit), chunk_bytes)) if i >= start)

    import tqdm
    bar = tqdm.tqdm(total=src.total_bytes if not start else None, unit="B", unit_scale=True, disable=not progress,
                    desc=f"tokenizing {source}", file=sys.stderr, dynamic_ncols=True)
    with Encoder(out, workers, seed, val_fraction, np_dtype) as encoder:
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
                    _write_json(out / "progress.json", state)
    bar.close()
    for s in SPLITS:
        if shard := writers[s].close():
            splits[s]["shards"].append(shard)
        splits[s].update(counts[s])
        splits[s]["tokens"] = sum(shard["tokens"] for shard in splits[s]["shards"])
        del splits[s]["open_from"]
    if not splits["train"]["tokens"]:
        raise DataError(f"--source {source}: the train split is empty ({splits['val']['documents']} documents, "
                        f"all drawn for val); use more documents or a smaller --val-fraction")
    if val_fraction and not splits["val"]["tokens"]:
        print(f"warning: {out}: the val split is empty ({splits['train']['documents']} documents); "
              f"with one large file use --doc-split paragraph or line", file=sys.stderr)
    meta = {"format": FORMAT, "key": key, "source": source, "tokenizer": tok.name,
            "tokenizer_fingerprint": tok.fingerprint, "n_vocab": tok.n_vocab, "eot_id": tok.eot_id,
            "dtype": np_dtype.name, "tokens": sum(splits[s]["tokens"] for s in SPLITS),
            "documents": sum(splits[s]["documents"] for s in SPLITS), "bytes": sum(splits[s]["bytes"] for s in SPLITS),
            "split_rule": {"by": "document", "val_fraction": val_fraction, "seed": seed}, "settings": settings,
            "splits": splits}
    _write_json(out / "meta.json", meta)  # last: its presence means the directory is complete
    (out / "progress.json").unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {**meta, "reused": False, "seconds": seconds, "mb_per_s": meta["bytes"] / 1e6 / seconds,
            "tokenizer_train_s": tokenizer_s}


def tokenize_text_file(path: str | Path, tokenizer_spec: str, val_fraction: float) -> Path:
    """Tokenize a text file into a cache directory (reused when the file and settings match).

    The split is by characters, as nanoGPT does: the last `val_fraction` of the text is val."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file (for Tiny Shakespeare run experiments/download.py)")
    raw = path.read_bytes()
    key = hashlib.sha256(raw + f"|{tokenizer_spec}|{val_fraction}|{FORMAT}".encode()).hexdigest()[:16]
    out = CACHE / "tokens" / f"{path.stem}-{key}"
    if (out / "meta.json").is_file():
        return out
    text = _decode(raw, path, 0, "strict", set())
    if not text:
        raise DataError(f"{path}: the file is empty")
    tokenizer = Tokenizer.from_spec(tokenizer_spec, corpus=text)
    dtype = np.dtype(token_dtype(tokenizer.n_vocab))
    n_train_chars = int(len(text) * (1 - val_fraction))
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, part in zip(SPLITS, (text[:n_train_chars], text[n_train_chars:])):
        shard = _ShardWriter(out, name, dtype, 0, 0).write(tokenizer.encode_np(part))
        splits[name] = {"tokens": shard["tokens"] if shard else 0, "documents": 1, "bytes": len(part.encode("utf-8")),
                        "shards": [shard] if shard else []}
    tokenizer.save(out)
    _write_json(out / "meta.json", {"format": FORMAT, "source": str(path), "tokenizer": tokenizer.name,
                                    "tokenizer_fingerprint": tokenizer.fingerprint, "n_vocab": tokenizer.n_vocab,
                                    "eot_id": tokenizer.eot_id, "dtype": dtype.name, "splits": splits})
    return out


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
    if verify and _sha256(path) != info["sha256"]:
        raise DataError(f"{path}: checksum mismatch (sha256 differs from meta.json); prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r")


def load_dir(directory: str | Path, verify: bool = True) -> TokenData:
    """A prepared directory's splits (sizes always checked, sha256 checksums when `verify`)."""
    directory = Path(directory)
    meta = _read_json(directory / "meta.json")
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
