"""Tests for jaxgpt.train.loop (`python -m jaxgpt.train`): an end-to-end tiny run, reproducibility,
the non-finite guard, the time limit, metrics on resume and bad input."""
import dataclasses
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from jaxgpt import config as config_lib
from jaxgpt.train import optim
from jaxgpt.train.loop import NonFiniteLoss, train, truncate_metrics
from jaxgpt.train.trainer import Trainer

# the only fields allowed to differ between identical runs
TIMING = ("tokens_per_s", "mfu", "train_s")


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_run_writes_config_metrics_and_export(tiny_run, make_config):
    run_dir, rows = tiny_run
    cfg = make_config(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert config_lib.from_dict(saved).train == cfg.train
    assert saved["model"]["vocab_size"] > 0  # filled from the data
    # a row every log_every=5 steps; val_loss on the eval steps (every 10, and the last)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped",
                "train_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["skipped"] == 0 and np.isfinite(r["loss"])
        assert ("val_loss" in r) == (r["step"] % 10 == 0)
        # the lr of the row's last step (0-based step - 1)
        lr = float(optim.schedule(cfg.optim, cfg.train.steps)(r["step"] - 1))
        assert r["lr"] == pytest.approx(lr, rel=1e-6)
    # seconds in training steps so far: they grow row by row (the evaluations are not counted)
    assert all(0 < a["train_s"] < b["train_s"] for a, b in zip(rows, rows[1:], strict=False))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    assert rows[-1]["val_loss"] < rows[1]["val_loss"]
    # ASCII: 1 byte/char
    assert rows[-1]["val_bpb"] == pytest.approx(rows[-1]["val_loss"] / np.log(2), rel=1e-6)
    export = run_dir / "export"
    assert ((export / "config.json").is_file() and (export / "params").is_dir()
            and (export / "tokenizer.json").is_file())


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_run, make_config, tmp_path):
    run_dir, rows = tiny_run
    last = train(make_config(tmp_path / "again"))
    again = rows_of(tmp_path / "again")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(again) == strip(rows)  # exactly: batches and init are functions of the seed
    assert {k: v for k, v in last.items() if k not in TIMING} == strip(rows)[-1]


def huge_lr_config(make_config, out_dir, steps=10):
    """lr=1e30: the first update is finite but throws the params to ~1e30, after which every
    gradient is NaN. A real way to a non-finite step, no injected values."""
    return make_config(out_dir, optim={"lr": 1e30, "schedule": "constant", "warmup_steps": 0},
                       train={"steps": steps, "max_nonfinite": 3, "log_every": 1, "eval_every": 0})


@pytest.mark.parametrize("skip_update", ["cond", "select"])
def test_nonfinite_steps_leave_the_state_untouched(make_config, tmp_path, skip_update):
    """train.skip_update: the update skipped by a lax.cond, or computed and not kept (a select, with
    no branch: on a GPU a cond stops the host mid-step), with the same outcome."""
    cfg = huge_lr_config(make_config, tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, skip_update=skip_update))
    trainer = Trainer(cfg, jax.devices()[:1])
    state = trainer.init_state()
    step = jax.make_jaxpr(trainer.train_step)(state, trainer.batch(0))
    assert (" cond[" in str(step)) == (skip_update == "cond")
    history = []
    for step in range(4):
        before = jax.device_get((state.params, state.opt_state))
        state, metrics = trainer.step(state, trainer.batch(step))
        after = jax.device_get((state.params, state.opt_state))
        unchanged = all(np.array_equal(a, b) for a, b in
                        zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=False))
        m = jax.device_get(metrics)
        history.append((unchanged, int(m["skipped"]), int(m["nonfinite_run"]),
                        bool(np.isfinite(m["grad_norm"]))))
    assert history == [(False, 0, 0, True),   # a finite (if ruinous) update is applied
                       (True, 1, 1, False),   # then NaN gradients: skipped, params and moments kept
                       (True, 1, 2, False),
                       (True, 1, 3, False)]
    assert int(state.step) == 4  # skipped steps still count: the data moves on


@pytest.mark.slow
def test_train_stops_after_max_nonfinite_in_a_row(make_config, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss) as e:
        train(huge_lr_config(make_config, out))
    assert str(e.value).startswith("step 4: 3 non-finite losses or gradients in a row "
                                   "(train.max_nonfinite=3)")
    rows = rows_of(out)
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert not (out / "export").exists()  # no export of a broken model


@pytest.mark.slow
def test_a_run_past_its_time_limit_ends_at_the_next_logged_step_as_a_finished_one(
        make_config, tmp_path, capsys):
    out = tmp_path / "timed"
    # any positive limit is spent by the first 3 steps' seconds (a compile among them)
    last = train(make_config(out, train={"steps": 30, "log_every": 3, "eval_every": 10,
                                         "time_limit_s": 1e-6}))
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [3] and last["step"] == 3
    # evaluated, as at a run's end
    assert "val_loss" in rows[0] and last["val_loss"] == rows[0]["val_loss"]
    # the schedule kept its 30-step length: the lr is the one of step 3 of 30
    cfg = make_config(out, train={"steps": 30})
    assert rows[0]["lr"] == pytest.approx(float(optim.schedule(cfg.optim, 30)(2)), rel=1e-6)
    assert (out / "export" / "params").is_dir() and (out / "checkpoints" / "3").is_dir()
    assert re.search(r"^step 3 of 30: \d+ s of training steps reached train.time_limit_s=1e-06; "
                     r"ending the run here$", capsys.readouterr().err, re.M)


def test_truncate_metrics_drops_later_and_torn_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n'
                    '{"step": 3, "loss": 1.5}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n'


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("missing", r"^error: data\.path=\S+nope\.txt: no such file"),
    ("not_utf8", r"^error: \S+bad\.txt: invalid UTF-8 at byte offset 3 "
                 r"\(data\.errors=replace substitutes U\+FFFD\)$"),
    ("batch_over_mesh", r"^error: data\.batch_size=10 does not split over the mesh's 8 "
                        r"data-parallel devices \(mesh\.data=8 x mesh\.fsdp=1\); "
                        r"use a multiple of 8$"),
])
def test_bad_input_is_one_line_and_status_2(case, expected, text_file, tmp_path, run_env):
    """What a new user gets wrong ends in one line on stderr, exit status 2, no traceback (and no
    background checkpoint thread complaining at exit)."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfedef\n")
    data = {"missing": tmp_path / "nope.txt", "not_utf8": bad, "batch_over_mesh": text_file}[case]
    extra = ["data.batch_size=10", "mesh.data=8"] if case == "batch_over_mesh" else []
    env = (run_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
           if case == "batch_over_mesh" else run_env())
    # orbax's start-up thread raced the exit about half the time (before the fix): try it thrice
    for attempt in range(3 if case == "batch_over_mesh" else 1):
        proc = subprocess.run([sys.executable, "-m", "jaxgpt.train",
                               str(REPO / "experiments/configs/shakespeare_char.py"),
                               f"data.path={data}", f"train.out_dir={tmp_path / f'run{attempt}'}",
                               *extra],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(expected, lines[0]), proc.stderr
        assert proc.stdout == ""


def test_steps_over_several_cpu_devices_logged_rarely_do_not_deadlock(text_file, tmp_path, run_env):
    """With no host sync for 200 steps the host ran ahead of 2 CPU devices until XLA:CPU's queue of
    32 computations a device was full, and the step's all-reduce deadlocked (XLA aborts after 40 s);
    the loop now stays train.STEPS_AHEAD steps ahead. (The Tiny Shakespeare model: a step long
    enough for the host to run ahead; the tests' 2-layer one never filled the queue.)"""
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train",
                           str(REPO / "experiments/configs/shakespeare_char.py"),
                           f"data.path={text_file}", f"train.out_dir={tmp_path / 'run'}",
                           "mesh.data=2", "train.steps=200", "train.log_every=200",
                           "train.eval_every=0", "train.samples=0", "train.progress=false"],
                          capture_output=True, text=True, timeout=300,
                          env=run_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [row["step"] for row in rows_of(tmp_path / "run")] == [200]
