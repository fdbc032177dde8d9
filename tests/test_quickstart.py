"""experiments/quickstart.py's sizing of a stage by its time budget (the stages' training is train.py's,
tested there)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import quickstart  # noqa: E402

from jaxgpt import config as config_lib  # noqa: E402


@pytest.fixture
def timed(monkeypatch):
    """bench.bench_train replaced by a fixed timing: 250 ms a step, 10 s to compile; counts its calls."""
    calls = []

    def bench_train(cfg, steps, warmup, batches=None):
        calls.append((steps, warmup))
        return {"ms_per_iter": 250.0, "compile_s": 10.0}
    monkeypatch.setattr(quickstart.bench, "bench_train", bench_train)
    return calls


def test_a_stage_trains_the_steps_its_budget_buys_and_keeps_the_plan(tmp_path, timed):
    cfg = config_lib.apply_overrides(config_lib.Config(), ["train.steps=900"])
    sized = quickstart.sized(cfg, tmp_path, "3_pretrain", 400)
    # (400 s - 10 s of compile) / 0.25 s a step; the schedule's evaluations at its half and its end
    assert (sized.train.steps, sized.train.eval_every) == (1560, 780)
    assert sized.train.time_limit_s == 440  # 1.1 x the budget: a stage slowed after its timing ends there
    assert timed == [(10, 3)]
    plan = json.loads((tmp_path / "3_pretrain.plan.json").read_text())
    assert (plan["steps"], plan["config_steps"], plan["budget_s"], plan["ms_per_step"]) == (1560, 900, 400, 250.0)
    # a re-run (after an interruption) trains the same schedule, without timing the step again
    assert quickstart.sized(cfg, tmp_path, "3_pretrain", 10).train.steps == 1560 and len(timed) == 1


def test_without_a_budget_the_config_files_steps_stand(tmp_path, timed):
    cfg = config_lib.apply_overrides(config_lib.Config(), ["train.steps=900"])
    assert quickstart.sized(cfg, tmp_path, "5_sft", None) is cfg
    assert timed == [] and not list(tmp_path.iterdir())


def test_a_budget_shorter_than_the_compile_still_trains_a_few_steps(timed):
    assert quickstart.steps_for(config_lib.Config(), 5, 10)[0] == 40


def test_an_odd_step_count_is_evaluated_at_its_middle_and_end_only(tmp_path, timed):
    cfg = config_lib.apply_overrides(config_lib.Config(), ["train.steps=900"])
    sized = quickstart.sized(cfg, tmp_path, "3_pretrain", 400.25)  # (400.25 - 10) / 0.25 = 1561 steps
    assert (sized.train.steps, sized.train.eval_every) == (1561, 781)  # 781 and 1561, not 780, 1560 and 1561
