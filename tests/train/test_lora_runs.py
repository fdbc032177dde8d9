"""LoRA and QLoRA runs (jaxgpt/train/lora.py): adapters train through the same step over a frozen
base, alone in the optimizer state and checkpoints, and load back merged or separate."""
import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny

from jaxgpt.config import ExportConfig, validate
from jaxgpt.errors import ConfigError
from jaxgpt.model import lora
from jaxgpt.model.gpt import GPT
from jaxgpt.store import runs
from jaxgpt.train.loop import train
from jaxgpt.train.trainer import Trainer


def _lora_cfg(text_file, base, out_dir, steps=6, **train_kw):
    cfg = tiny(text_file, out_dir, train=dict(steps=steps, init_from=str(base), lora_rank=4,
                                              lora_alpha=8.0, eval_every=0, **train_kw),
               optim=dict(lr=1e-2, warmup_steps=0, schedule="constant"))
    # init_from: the model section is the base's (as the command line's loader makes it)
    return validate(cfg)


def _logits(model, params):
    toks = np.arange(32, dtype=np.int32).reshape(1, 32) % model.cfg.vocab_size
    return np.asarray(model.apply(params, toks))


@pytest.fixture(scope="module")
def lora_run(text_file, tiny_run, tmp_path_factory):
    base, _ = tiny_run
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = _lora_cfg(text_file, base, out)
    last = train(cfg)
    return cfg, out, last


def test_only_the_adapters_train_and_are_checkpointed(lora_run, tiny_run):
    cfg, out, last = lora_run
    assert np.isfinite(last["loss"])
    step_dir = out / "checkpoints" / "6" / "state"
    stored = ocp.PyTreeCheckpointer().metadata(step_dir)
    tree = getattr(stored, "item_metadata", stored)
    names = {lora.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        dict(tree)["params"])}
    assert names and all(n.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for n in names)
    opt_leaves = {lora.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        dict(tree)["opt_state"])}
    assert not any(n.endswith("/w") or "wte" in n for n in opt_leaves)


def test_the_merged_export_is_base_plus_adapters(lora_run, tiny_run):
    cfg, out, _ = lora_run
    base = runs.load(tiny_run[0])
    loaded = runs.load(out / "export")        # merged: a whole model
    from_ckpt = runs.load(out)                # the checkpoint: adapters on init_from's base
    model = GPT(loaded.cfg.model)
    np.testing.assert_allclose(_logits(model, loaded.params), _logits(model, from_ckpt.params),
                               atol=1e-5, rtol=0)
    # base + adapters as the step applies them
    trainer = Trainer(cfg)
    state = trainer.abstract_state()
    restored = ocp.PyTreeCheckpointer().restore(out / "checkpoints" / "6" / "state")
    adapters = restored["params"]
    applied = trainer.model_params(jax.tree.map(np.asarray, adapters))
    np.testing.assert_allclose(_logits(model, applied), _logits(model, loaded.params),
                               atol=1e-5, rtol=0)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    # the adapters moved the model, and the base's own weights are where they were
    assert np.abs(_logits(model, loaded.params) - _logits(model, base.params)).max() > 1e-3
    assert np.array_equal(trainer.frozen[0]["wte"], base.params["wte"])


def test_a_separate_export_loads_on_its_base(text_file, tiny_run, lora_run, tmp_path):
    base, _ = tiny_run
    cfg = dataclasses.replace(_lora_cfg(text_file, base, tmp_path / "sep"),
                              export=ExportConfig(lora="separate"))
    train(cfg)
    export_dir = tmp_path / "sep" / "export"
    note = json.loads((export_dir / "lora.json").read_text())
    assert note["base"] == str(base.absolute())
    separate, merged = runs.load(export_dir), runs.load(lora_run[1] / "export")
    model = GPT(merged.cfg.model)
    # the same seed and data: the same adapters as the merged run's
    np.testing.assert_allclose(_logits(model, separate.params), _logits(model, merged.params),
                               atol=1e-5, rtol=0)


def test_qlora_trains_on_an_int4_base_and_exports_what_it_trained(text_file, tiny_run, tmp_path):
    base, _ = tiny_run
    cfg = _lora_cfg(text_file, base, tmp_path / "q", steps=4, lora_base="int4", lora_group=16)
    last = train(cfg)
    assert np.isfinite(last["loss"])
    trainer = Trainer(cfg)
    frozen = trainer.frozen[0]
    assert frozen["block_0"]["attn"]["wq"]["w_q"].dtype == lora.QTYPES["int4"]
    restored = ocp.PyTreeCheckpointer().restore(tmp_path / "q" / "checkpoints" / "4" / "state")
    applied = trainer.model_params(jax.tree.map(np.asarray, restored["params"]))
    model = trainer.model
    exported = runs.load(tmp_path / "q" / "export").params
    np.testing.assert_allclose(_logits(model, applied), _logits(model, exported), atol=1e-5,
                               rtol=0)


def test_a_lora_run_resumes_with_the_losses_of_an_unbroken_one(text_file, tiny_run, lora_run,
                                                               tmp_path):
    base, _ = tiny_run
    train(_lora_cfg(text_file, base, tmp_path / "r", steps=3))
    last = train(_lora_cfg(text_file, base, tmp_path / "r", steps=6))
    unbroken = [json.loads(r) for r in (lora_run[1] / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if "loss" in r][-1] == pytest.approx(
        [r["loss"] for r in unbroken if "loss" in r][-1], rel=1e-6)
    assert np.isfinite(last["loss"])


def test_lora_needs_a_base_and_the_adamw_optimizer(text_file, tiny_run):
    with pytest.raises(ConfigError, match="train.init_from"):
        tiny(text_file, train=dict(lora_rank=4))
    with pytest.raises(ConfigError, match="adamw"):
        tiny(text_file, train=dict(lora_rank=4, init_from=str(tiny_run[0])),
             optim=dict(name="muon"))
    with pytest.raises(ConfigError, match="train.lora_base"):
        tiny(text_file, train=dict(lora_base="int4"))


def test_the_memory_plan_counts_adapters_as_trained_and_the_base_as_frozen(text_file, tiny_run):
    from jaxgpt.train import memory
    base, _ = tiny_run
    vocab = runs.saved_config(base).model.vocab_size

    def planned(cfg):  # shapes only: the vocabulary given, no data opened
        return memory.trainer_for(dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)))
    plans = {q: memory.estimate(planned(_lora_cfg(text_file, base, "", lora_base=q,
                                                  lora_group=16))).per_device
             for q in ("float32", "int4")}
    full = memory.estimate(planned(tiny(text_file))).per_device
    trainer = planned(_lora_cfg(text_file, base, ""))
    adapters = sum(x.size * 4 for x in jax.tree.leaves(trainer.lora.abstract))
    frozen = dict(jax.tree_util.tree_leaves_with_path(trainer.lora.abstract_base))
    named = {lora.path_name(p): x for p, x in frozen.items()}
    lora_scales = 4 * sum(x.size for n, x in named.items() if n.endswith("lora_scale"))
    assert plans["float32"]["params"] == adapters
    # two moments per adapter, and adam's step counters
    assert 0 <= plans["float32"]["optimizer"] - 2 * adapters < 64
    assert plans["float32"]["frozen"] == full["params"] + lora_scales
    # int4: the targeted matrices at half a byte each, plus an fp32 scale per 16 rows
    matrices = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(trainer.abstract_params)
                   if lora.path_name(p).endswith("/w"))
    int4 = planned(_lora_cfg(text_file, base, "", lora_base="int4", lora_group=16))
    scales = sum(x.size * 4 for p, x in jax.tree_util.tree_leaves_with_path(
        int4.lora.abstract_base) if lora.path_name(p).endswith("w_scale"))
    assert scales > 0
    assert plans["int4"]["frozen"] == (full["params"] - 4 * matrices + matrices // 2 + scales
                                       + lora_scales)
