"""experiments/quickstart.py's sizing of a stage by its time budget (the stages' training is
train.py's, tested there)."""
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import quickstart  # noqa: E402
from conftest import tiny  # noqa: E402

from jaxgpt import config as config_lib  # noqa: E402
from jaxgpt.train import trainer as trainer_lib  # noqa: E402


@pytest.fixture
def timed(monkeypatch):
    """bench.bench_train replaced by a fixed timing that takes 0.3 s: 250 ms a step, 10 s to
    compile; counts its calls."""
    calls = []

    def bench_train(cfg, steps, warmup, batches=None):
        calls.append((steps, warmup))
        time.sleep(0.3)
        return {"ms_per_iter": 250.0, "compile_s": 10.0}
    monkeypatch.setattr(quickstart.bench, "bench_train", bench_train)
    return calls


@pytest.fixture
def run_data(text_file):
    """A tiny run's config and its opened data: 8 validation batches of the training batch's 8 rows
    (train.eval_max_tokens=2048 of 256-token batches)."""
    cfg, batches = trainer_lib.open_run_batches(tiny(text_file))
    return config_lib.apply_overrides(cfg, ["train.steps=900"]), batches


def test_a_stage_trains_the_steps_its_budget_buys_and_keeps_the_plan(tmp_path, timed, run_data):
    cfg, batches = run_data
    sized = quickstart.sized(cfg, tmp_path, "3_pretrain", 400, batches)
    plan = json.loads((tmp_path / "3_pretrain.plan.json").read_text())
    # off the budget: the timing's wall time, two evaluations (8 batches each at a third of a
    # step) ...
    assert 0.3 <= plan["timing_s"] < 5
    assert plan["evaluations_s"] == pytest.approx(2 * 8 * 0.25 / 3)
    assert plan["steps_s"] == pytest.approx(400 - plan["timing_s"] - plan["evaluations_s"])
    # ... then the run's compile (10 s): steps of 1.05 x 0.25 s (a run's steps drift past their
    # timing) in the rest
    steps = int((plan["steps_s"] - 10) / (1.05 * 0.25))
    assert 1457 < steps < 1480
    # the middle and the end
    assert (sized.train.steps, sized.train.eval_every) == (steps, -(-steps // 2))
    # a slowed stage ends there
    assert sized.train.time_limit_s == pytest.approx(1.1 * plan["steps_s"], abs=1e-3)
    assert timed == [(10, 3)]
    assert ((plan["steps"], plan["config_steps"], plan["budget_s"], plan["ms_per_step"])
            == (steps, 900, 400, 250.0))
    # a re-run (after an interruption) trains the same schedule, without timing the step again
    assert (quickstart.sized(cfg, tmp_path, "3_pretrain", 10, batches).train.steps == steps
            and len(timed) == 1)


def test_a_plan_from_before_the_time_around_the_steps_was_counted_resumes_as_planned(
        tmp_path, timed, run_data):
    cfg, batches = run_data
    (tmp_path / "5_sft.plan.json").write_text(json.dumps(
        {"steps": 527, "config_steps": 600, "budget_s": 100, "ms_per_step": 177.0, "host": "x"}))
    sized = quickstart.sized(cfg, tmp_path, "5_sft", 125, batches)
    assert ((sized.train.steps, sized.train.eval_every, sized.train.time_limit_s) == (527, 264, 110)
            and not timed)


def test_steps_for_a_budget_of_steps_alone_count_the_compile(timed):
    # experiments/sweep.py's budget: the steps' seconds (its variants compared at the same training
    # time)
    assert quickstart.steps_for(config_lib.Config(), 400, 10) == (1560, {"ms_per_iter": 250.0,
                                                                          "compile_s": 10.0})


def test_without_a_budget_the_config_files_steps_stand(tmp_path, timed):
    cfg = config_lib.apply_overrides(config_lib.Config(), ["train.steps=900"])
    assert quickstart.sized(cfg, tmp_path, "5_sft", None, batches=None) is cfg
    assert timed == [] and not list(tmp_path.iterdir())


def test_a_budget_shorter_than_the_compile_still_trains_a_few_steps(tmp_path, timed, run_data):
    cfg, batches = run_data
    assert quickstart.steps_for(config_lib.Config(), 5, 10)[0] == 40
    assert quickstart.sized(cfg, tmp_path, "5_sft", 5, batches).train.steps == 40


def test_an_odd_step_count_is_evaluated_at_its_middle_and_end_only(tmp_path, run_data):
    cfg, batches = run_data
    (tmp_path / "3_pretrain.plan.json").write_text(json.dumps(
        {"steps": 1561, "config_steps": 900, "budget_s": 400, "timing_s": 0.3, "evaluations_s": 1.3,
         "steps_s": 398.4, "compile_s": 10.0, "ms_per_step": 250.0, "host": "x"}))
    sized = quickstart.sized(cfg, tmp_path, "3_pretrain", 400, batches)
    # 781 and 1561, not 780, 1560 and 1561
    assert (sized.train.steps, sized.train.eval_every) == (1561, 781)
