"""`ruff check` is clean on the whole tree, with the rules pyproject.toml sets (line length 100,
import sorting, pyflakes, bugbear)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed (requirements.txt lists it)")
    return [found]


def test_ruff_is_clean():
    run = subprocess.run([*ruff(), "check", "--output-format", "concise", "."], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_ruff_sees_a_long_line(tmp_path):
    """The check can fail: a line of 101 characters is found with the project's settings."""
    (tmp_path / "long.py").write_text("x = '" + "a" * 95 + "'\n")
    run = subprocess.run([*ruff(), "check", "--config", str(REPO / "pyproject.toml"),
                          "--output-format", "concise", str(tmp_path / "long.py")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "E501" in run.stdout
