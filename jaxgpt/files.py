"""Files written whole or not at all, JSON in and out, and content hashes: the one copy of each.

A write goes to `NAME.tmp` beside the target and is renamed over it, so a reader (or a kill at any
moment) sees the old file or the new one, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jaxgpt.errors import DataError


def atomic_write(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8) to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON in `path`, None when there is no such file; an unreadable one is a DataError naming
    it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in 8 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()
