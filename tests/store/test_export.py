"""Tests for jaxgpt.export: params-only exports, and fine-tuning from a run (train.init_from)."""
import json

import jax
import numpy as np
from conftest import leaves_equal

from jaxgpt import config as config_lib
from jaxgpt import export as export_command
from jaxgpt.store import runs
from jaxgpt.train import loop
from jaxgpt.train import trainer as trainer_lib


def test_export_cli_writes_what_the_run_holds(tiny_run, tmp_path, capsys):
    run, rows = tiny_run
    out = tmp_path / "exported"
    export_command.main([str(run), str(out)])
    assert json.loads(capsys.readouterr().out) == {"export": str(out), "step": rows[-1]["step"]}
    exported, final = runs.load(out), runs.load(run / "export")
    assert (leaves_equal(exported.params, final.params)
            and exported.tokenizer.fingerprint == final.tokenizer.fingerprint)
    assert exported.cfg.to_dict() == json.loads((run / "config.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "config.json", "params",
                                                     "tokenizer.json"]


def test_state_around_params_has_a_fresh_optimizer(tiny_run, make_config, tmp_path):
    run, _ = tiny_run
    trainer = trainer_lib.Trainer(make_config(tmp_path / "ft", optim={"lr": 1e-4}),
                                  jax.devices()[:1])
    params, _, _ = runs.load_params(run, trainer.cfg, trainer.params_sharding)
    state = trainer.state_around(params)
    assert int(state.step) == 0 and leaves_equal(state.params, runs.load(run).params)
    # zero moments and counts
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))


def test_training_with_init_from_starts_from_those_params(tiny_run, make_config, tmp_path):
    run, _ = tiny_run
    cfg = make_config(tmp_path / "ft", train={"steps": 1, "log_every": 1, "eval_every": 0})
    cfg = config_lib.apply_overrides(cfg, [f"train.init_from={run}"])
    logged = loop.train(cfg, devices=jax.devices()[:1])
    trainer = trainer_lib.Trainer(cfg, jax.devices()[:1])
    params, _, _ = runs.load_params(run, trainer.cfg, trainer.params_sharding)
    _, metrics = trainer.step(trainer.state_around(params), trainer.batch(0))
    assert logged["step"] == 1 and logged["loss"] == float(metrics["loss"])
    fresh = trainer.step(trainer.init_state(), trainer.batch(0))[1]
    # the trained params, not a fresh init
    assert float(metrics["loss"]) < float(fresh["loss"]) - 0.5
