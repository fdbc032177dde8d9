"""A run directory written by jaxgpt before its modules moved into folders (tests/fixtures/old_run,
made by its make_fixture.py with the code of commit 972d60e) still loads, evaluates and resumes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import config as config_lib
from jaxgpt.model.gpt import GPT
from jaxgpt.store import runs
from jaxgpt.train import loop

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_run"


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A copy of the fixture, the working directory there (its config names its data relatively)."""
    shutil.copytree(FIXTURE, tmp_path / "old_run")
    monkeypatch.chdir(tmp_path / "old_run")
    return tmp_path / "old_run"


def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def test_the_old_export_gives_the_logits_it_gave_then(old_run):
    loaded = runs.load("run/export")
    want = expected()
    assert loaded.tokenizer.encode(want["text"]) == want["ids"]
    logits = GPT(loaded.cfg.model).apply(loaded.params, jnp.asarray([want["ids"]], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[0, -1], np.float64), want["logits_last"], rtol=0,
                               atol=1e-6)


def test_the_old_checkpoint_holds_the_exported_params(old_run):
    from_checkpoint, from_export = runs.load("run"), runs.load("run/export")
    assert from_checkpoint.step == 4 and from_export.step is None
    for a, b in zip(jax.tree.leaves(from_checkpoint.params), jax.tree.leaves(from_export.params),
                    strict=False):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_evaluating_the_old_run_reproduces_its_logged_val_loss(old_run):
    """To the last digit, so with XLA's default flags, as the run had (the tests' faster compile
    changes the last bits)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-m", "jaxgpt.evaluate", "run", "eval.max_tokens=256"],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert json.loads(out.splitlines()[-1])["loss"] == expected()["metrics_last"]["val_loss"]


def test_the_old_run_resumes_from_its_checkpoint(old_run):
    cfg = config_lib.validate(config_lib.apply_overrides(
        config_lib.load_file("run/config.json"), ["train.steps=6", "train.log_every=1"]))
    last = loop.train(cfg)
    rows = [json.loads(line)
            for line in (old_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5, 6]  # resumed after step 4, the old rows kept
    old_rows = (FIXTURE / "run" / "metrics.jsonl").read_text().splitlines()
    assert rows[:2] == [json.loads(line) for line in old_rows]
    assert last["step"] == 6 and np.isfinite(last["loss"])
