"""Tests for experiments/download.py: checksums, --from, the offline error, an existing file left
alone."""
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments/download.py"
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"  # present on the team's machines only

spec = importlib.util.spec_from_file_location("download", SCRIPT)
download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download)


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch):
    """A registered data set whose 'official' file is a local one (served from file://)."""
    source = tmp_path / "source.txt"
    source.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setitem(download.DATASETS, "tiny", ("tiny.txt", source.as_uri(), digest))
    return source


def test_downloads_and_verifies(tiny_dataset, tmp_path):
    out = download.fetch("tiny", tmp_path / "data")
    assert out == tmp_path / "data/tiny.txt" and out.read_bytes() == tiny_dataset.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["tiny.txt"]  # no temporary files left


def test_from_copies_a_local_file(tiny_dataset, tmp_path):
    copy = tmp_path / "elsewhere.txt"
    copy.write_bytes(tiny_dataset.read_bytes())
    out = download.fetch("tiny", tmp_path / "data", source=str(copy),
                         url="http://127.0.0.1:9/never-used")
    assert out.read_bytes() == tiny_dataset.read_bytes()


def test_wrong_checksum_is_refused(tiny_dataset, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("not the file\n")
    with pytest.raises(download.DownloadError, match="sha256 .* is not the expected"):
        download.fetch("tiny", tmp_path / "data", source=str(bad))
    assert list((tmp_path / "data").iterdir()) == []


def test_an_existing_good_file_is_kept(tiny_dataset, tmp_path, capsys):
    download.fetch("tiny", tmp_path)
    # no network needed the second time
    download.fetch("tiny", tmp_path, url="http://127.0.0.1:9/unreachable")
    assert "already there" in capsys.readouterr().out


def test_offline_error_names_the_alternatives(tmp_path):
    # port 9 on localhost: a real connection that is refused, as on a machine without network
    proc = subprocess.run([sys.executable, str(SCRIPT), "shakespeare", "--out", str(tmp_path),
                           "--url", "http://127.0.0.1:9/input.txt"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot download http://127.0.0.1:9/input.txt")
    assert "--from PATH" in line and "data.path=PATH" in line
    assert not (tmp_path / "tinyshakespeare.txt").exists()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="no local copy of Tiny Shakespeare")
def test_real_shakespeare_checksum(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "shakespeare", "--out", str(tmp_path),
                           "--from", str(SHAKESPEARE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tinyshakespeare.txt").stat().st_size == 1115394
