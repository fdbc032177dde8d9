"""Tests for jaxgpt.export: params-only exports, inference loading, and fine-tuning from a run."""
import json
import shutil

import jax
import numpy as np
import pytest

from conftest import leaves_equal
from jaxgpt import config as config_lib, export, train as train_lib
from jaxgpt.errors import CheckpointError


def test_export_cli_and_inference_from_a_run_without_export(tiny_run, tmp_path, capsys):
    run, rows = tiny_run
    out = tmp_path / "exported"
    export.main([str(run), str(out)])
    assert json.loads(capsys.readouterr().out) == {"export": str(out), "step": rows[-1]["step"]}
    cfg, params, tokenizer = export.load_for_inference(out, [])
    _, final_params, final_tokenizer = export.load_for_inference(run / "export", [])
    assert leaves_equal(params, final_params) and tokenizer.fingerprint == final_tokenizer.fingerprint
    assert cfg.to_dict() == json.loads((run / "config.json").read_text())
    copy = tmp_path / "no-export"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "export")  # e.g. killed before the end: the newest checkpoint serves instead
    cfg, params, _ = export.load_for_inference(copy, ["sample.temperature=0"])
    assert leaves_equal(params, final_params) and cfg.sample.temperature == 0
    with pytest.raises(CheckpointError, match="neither an export nor a run directory"):
        export.load_for_inference(tmp_path / "nothing", [])


def test_init_from_gives_params_only_with_a_fresh_optimizer(tiny_run, make_config, tmp_path):
    run, _ = tiny_run
    trainer = train_lib.Trainer(make_config(tmp_path / "ft", optim={"lr": 1e-4}), jax.devices()[:1])
    state = export.init_from(str(run), trainer)
    _, params, _ = export.load_for_inference(run, [])
    assert int(state.step) == 0 and leaves_equal(state.params, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))  # zero moments and counts


def test_training_with_init_from_starts_from_those_params(tiny_run, make_config, tmp_path):
    run, _ = tiny_run
    cfg = make_config(tmp_path / "ft", train={"steps": 1, "log_every": 1, "eval_every": 0})
    cfg = config_lib.apply_overrides(cfg, [f"train.init_from={run}"])
    logged = train_lib.train(cfg, devices=jax.devices()[:1])
    trainer = train_lib.Trainer(cfg, jax.devices()[:1])
    _, metrics = trainer.step(export.init_from(str(run), trainer), trainer.batch(0))
    assert logged["step"] == 1 and logged["loss"] == float(metrics["loss"])
    fresh = trainer.step(trainer.init_state(), trainer.batch(0))[1]
    assert float(metrics["loss"]) < float(fresh["loss"]) - 0.5  # the trained params, not a fresh init
