"""Document sources for `prepare`: text files, JSON lines, Hugging Face datasets and the packaged
chat corpora, each streamed as (text, ends_document) pieces so that a corpus of any size reads in
bounded memory.

    open_source("text:books/")           every .txt under books/, one document per file
    open_source("jsonl:rows.jsonl:body") the "body" field of each row
    open_source("hf:roneneldan/TinyStories")  a Hub dataset, streamed (or a save_to_disk directory)
    open_source("chitchat") / open_source("chatterbot")   the corpora that ship as PyPI packages
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

from jaxgpt.config import PrepareConfig
from jaxgpt.errors import DataError

# text read, and work handed to a worker, in pieces of about this size
CHUNK_BYTES = PrepareConfig.chunk_bytes
SOURCES = "text:PATH, jsonl:PATH[:field], hf:NAME[:config], chitchat or chatterbot"


@dataclasses.dataclass
class Source:
    spec: str
    files: list[Path]                         # hashed into the reuse key
    identity: str                             # what else names the input (a remote dataset's name)
    total_bytes: int | None                   # for the progress bar, when known
    pieces: Callable[[], Iterator[tuple[str, bool]]]  # a fresh stream on every call (one per pass)


def decode(raw: bytes, path, offset: int, errors: str, warned: set,
           fix: str = "prepare.errors=replace") -> str:
    """UTF-8 text; invalid bytes stop with an error that suggests the setting `fix` (strict), or
    become U+FFFD."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}: invalid UTF-8 at byte offset {offset + e.start}"
        if errors == "strict":
            raise DataError(f"{where} ({fix} substitutes U+FFFD)") from None
        if path not in warned:
            warned.add(path)
            print(f"warning: {where}; replaced with U+FFFD (and any later ones)", file=sys.stderr)
        return raw.decode("utf-8", "replace")


# Pieces of a file are cut right after a match. "file": a newline before a printable ASCII
# character other than "/", where no pre-token of the gpt2, cl100k or o200k patterns can span
# (o200k's punctuation run may swallow newlines and slashes), so a document read in pieces gets
# exactly the ids of the whole text. "line"/"paragraph": at document boundaries.
_CUTS = {"file": re.compile(rb"\n(?=[!-.0-~])"), "line": re.compile(rb"\n"),
         "paragraph": re.compile(rb"\n\r?\n")}
_DOC_SEPS = {"line": re.compile(r"\n"), "paragraph": re.compile(r"\n\s*\n")}


def _read_pieces(path: Path, errors: str, cut: re.Pattern, chunk_bytes: int) -> Iterator[str]:
    offset, carry, warned = 0, b"", set()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            data, end, i = carry + block, None, len(carry) + len(block)
            while end is None and (i := data.rfind(b"\n", 0, i)) >= 0:
                end = m.end() if (m := cut.match(data, i)) else None
            if end is None:
                # no cut point yet: read on, but never without bound
                if len(data) < 16 * chunk_bytes:
                    carry = data
                    continue
                end = len(data) - 4  # forced: step back to the start of a UTF-8 character
                while end > 1 and data[end] & 0xC0 == 0x80:
                    end -= 1
            yield decode(data[:end], path, offset, errors, warned)
            offset, carry = offset + end, data[end:]
    if carry:
        yield decode(carry, path, offset, errors, warned)


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
                yield from ((doc.strip("\r\n"), True)
                            for doc in _DOC_SEPS[doc_split].split(text) if doc.strip())


def _jsonl_pieces(files, field, errors):
    for path in files:
        offset, warned = 0, set()
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line, offset = decode(raw, path, offset, errors, warned), offset + len(raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or field not in row:
                    fields = (f" (it has {', '.join(map(repr, row))})" if isinstance(row, dict)
                              else "")
                    raise DataError(f"{path}:{lineno}: no field {field!r}{fields}; "
                                    "choose one with prepare.field=NAME")
                if not isinstance(row[field], str):
                    raise DataError(f"{path}:{lineno}: field {field!r} is a "
                                    f"{type(row[field]).__name__}, not text")
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
        raise DataError(f"prepare.source={spec}: no {suffix} files at {pattern}")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p}: the file is empty")
    return files


def _need(module: str, package: str, spec: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"prepare.source={spec} needs the {package} package: "
                        f"pip install {package}") from None


def _hf_source(spec: str, rest: str, field: str, split: str) -> Source:
    datasets = _need("datasets", "datasets", spec)
    name, _, config = rest.partition(":")
    local = Path(name).is_dir()  # a dataset saved with save_to_disk; else a Hub name, streamed

    def rows():
        try:
            ds = datasets.load_from_disk(name) if local else \
                datasets.load_dataset(name, config or None, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, not a saved dataset: one remedy
            raise DataError(f"prepare.source={spec}: cannot open the dataset "
                            f"({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split {split!r} (it has {', '.join(ds)}); "
                                f"choose one with prepare.hf_split=NAME")
            ds = ds[split]
        return ds

    def pieces():
        for i, row in enumerate(rows()):
            if not isinstance(row.get(field), str):
                raise DataError(f"{spec} row {i}: no text field {field!r} "
                                f"(it has {', '.join(row)}); use prepare.field=NAME")
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
    corpus, yaml = (_need("chatterbot_corpus.corpus", "chatterbot-corpus", spec),
                    _need("yaml", "pyyaml", spec))
    files = sorted(Path(corpus.DATA_DIRECTORY).glob("*/*.yml"))  # every language

    def pieces():  # one conversation per document, one statement per line
        for path in files:
            data = yaml.load(path.read_text(encoding="utf-8"),
                             Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
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
        return Source(spec, files, f"jsonl:{field}", None,
                      lambda: _jsonl_pieces(files, field, errors))
    if kind == "hf" and rest:
        return _hf_source(spec, rest, field, hf_split)
    if spec == "chitchat":
        return _chitchat_source(spec)
    if spec == "chatterbot":
        return _chatterbot_source(spec)
    raise DataError(f"prepare.source={spec}: unknown source; expected {SOURCES}")


def limited(pieces, limit: int):
    """Stop after `limit` documents (0: all)."""
    n = 0
    for text, ends in pieces:
        yield text, ends
        n += ends
        if limit and n >= limit:
            return

