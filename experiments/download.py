"""Fetch the data sets the experiment configs expect, checked by sha256.

    python experiments/download.py shakespeare                 # -> data/tinyshakespeare.txt
    python experiments/download.py shakespeare --out data/
    # offline: copy a local file
    python experiments/download.py shakespeare --from /path/to/tinyshakespeare.txt

Only the standard library: it runs before anything else is set up. A file already in place with the
right checksum is left alone.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

DATASETS = {
    # name: (file name, url, sha256 of the file)
    "shakespeare": (
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


class DownloadError(Exception):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, out_dir: Path, source: str | None = None, url: str | None = None) -> Path:
    """Put data set `name` into out_dir (from `source`, a local file, or else from the web)."""
    file_name, default_url, expected = DATASETS[name]
    url = url or default_url
    target = out_dir / file_name
    if target.is_file() and sha256(target) == expected:
        print(f"{target} is already there (sha256 ok)")
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # write beside the target and rename, so an interrupted copy never looks complete
    with tempfile.NamedTemporaryFile(dir=out_dir, prefix=f".{file_name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            if source:
                if not Path(source).is_file():
                    raise DownloadError(f"--from {source}: no such file")
                with open(source, "rb") as f:
                    shutil.copyfileobj(f, tmp)
            else:
                print(f"downloading {url}")
                try:
                    with urllib.request.urlopen(url, timeout=60) as response:
                        shutil.copyfileobj(response, tmp)
                except (urllib.error.URLError, OSError) as e:
                    reason = getattr(e, "reason", e)
                    raise DownloadError(
                        f"cannot download {url} ({reason}); offline, copy a local file with "
                        f"--from PATH, or train on it directly with data.path=PATH") from None
            tmp.close()
            got = sha256(tmp_path)
            if got != expected:
                raise DownloadError(f"{source or url}: sha256 {got} is not the expected {expected} "
                                    f"(a different or damaged file)")
            tmp_path.chmod(0o644)  # a temporary file starts private
            tmp_path.replace(target)
        finally:
            tmp_path.unlink(missing_ok=True)
    print(f"wrote {target} ({target.stat().st_size:,} bytes, sha256 ok)")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python experiments/download.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--out", default="data", help="directory to write into (default: data/)")
    parser.add_argument("--from", dest="source", metavar="PATH",
                        help="copy this local file instead of downloading")
    parser.add_argument("--url", help="download from this mirror instead (same checksum)")
    args = parser.parse_args(argv)
    try:
        fetch(args.dataset, Path(args.out), args.source, args.url)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
