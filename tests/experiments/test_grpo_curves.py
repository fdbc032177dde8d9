"""experiments/grpo_curves.py: a GRPO run's metrics.jsonl into a PNG of reward and KL (the run
itself is tests/train/test_grpo.py's)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import grpo_curves  # noqa: E402


def test_the_running_mean_is_over_the_last_n():
    assert grpo_curves.running_mean([1.0, 0.0, 0.0, 1.0], 2) == [1.0, 0.5, 0.0, 0.5]


def test_a_run_becomes_a_png(tmp_path):
    rows = [{"step": i, "loss": 0.0, "reward": i / 10, "kl": i / 1000,
             **({"val_accuracy": i / 10} if i % 5 == 0 else {})} for i in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.json").write_text(json.dumps({"grpo": {"task": "spelling"}}))
    out = tmp_path / "curves.png"
    grpo_curves.main([str(tmp_path), "--out", str(out), "--smooth", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_rewards_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(SystemExit, match="no GRPO rows"):
        grpo_curves.main([str(tmp_path)])
