"""Tests for experiments/load_test.py: it serves a run, loads it through the openai client and
reports what it measured (the numbers themselves are timings: only their shape is checked)."""
import json
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

SCRIPT = REPO / "experiments/load_test.py"


def load_test(args, run_env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_both_modes_against_a_trained_run(tiny_run, run_env, tmp_path):
    # a char tokenizer: the prompts are in its letters and fit its 32-token context
    run_dir, _ = tiny_run
    proc = load_test([run_dir, "--clients", 2, "--max-tokens", 8, "--mode", "both",
                      "--out", tmp_path / "r.jsonl"], run_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["mode"] for r in reports] == ["sequential", "concurrent"]
    assert reports == [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    for r in reports:
        assert r["failed"] == 0 and "first_error" not in r, r
        assert r["requests"] == 2 and r["clients"] == 2 and r["slots"] == 2 and r["model"] == "tiny"
        assert r["tokens_per_s"] > 0 and 0 < r["mean_reply_tokens"] <= 8
        assert r["ttft_p50_s"] is not None and 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] <= r["wall_s"]
        assert r["cpu"] and r["cpu_cores"] >= 1


def test_random_init_refuses_a_vocabulary_smaller_than_the_tokenizer(tiny_run, run_env):
    from jaxgpt.data.tokenizer import Tokenizer
    run_dir, _ = tiny_run
    proc = load_test(["--random-init", "shakespeare_char", "--tokenizer-from", run_dir,
                      "--set", "model.vocab_size=8"], run_env)
    n_vocab = Tokenizer.load(run_dir).n_vocab
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("load_test: --random-init shakespeare_char: model.vocab_size=8 is "
                           f"smaller than the {n_vocab} tokens of {run_dir}'s tokenizer\n")
