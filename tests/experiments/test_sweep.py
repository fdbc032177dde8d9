"""experiments/sweep.py's table and RESULTS.md blocks (the training it drives is train.py's, tested
there)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import sweep  # noqa: E402


def result(name, overrides, bpb, stage="pretrain", options=None):
    return {"stage": stage, "name": name, "overrides": overrides, "options": options or {},
            "params": 1_836_160, "calibrated_ms_per_step": 250.0, "steps": 400, "tokens": 819_200,
            "train_s": 99.5, "val_bpb": bpb}


def test_table_sorts_by_bpb_and_shows_what_each_variant_stands_on():
    rows = sweep.table([result("base", sweep.TODAY, 1.9),
                        result("muon", [*sweep.TODAY, "optim.name=muon"], 1.85),
                        result("recipe", [], 1.8),
                        result("vocab2048", sweep.TODAY, 1.95, options={"vocab": 2048})])
    header, _, *lines = rows.splitlines()
    assert header.endswith("| held-out bpb | vs base |")
    assert [line.split(" | ")[0] for line in lines] == ["| recipe", "| muon", "| base",
                                                        "| vocab2048"]
    # the old recipe's overrides (TODAY) are named as such, not listed; the config file is named too
    assert [line.split(" | ")[1] for line in lines] == [
        "config file", "old recipe + `optim.name=muon`", "old recipe", "old recipe + `vocab=2048`"]
    assert [line.split(" | ")[-1] for line in lines] == ["-0.1000 |", "-0.0500 |", "+0.0000 |",
                                                         "+0.0500 |"]
    assert lines[1] == ("| muon | old recipe + `optim.name=muon` | 1.84M | 250.0 | 400 | 0.82M | "
                        "99.5 | 1.8500 | -0.0500 |")


def test_without_base_the_rows_are_compared_with_today():
    header, _, *lines = sweep.table([result("today", sweep.TODAY, 1.7, options={"fixed": True}),
                                     result("recipe", [], 1.64)]).splitlines()
    assert header.endswith("| vs today |")
    assert lines == [
        "| recipe | config file | 1.84M | 250.0 | 400 | 0.82M | 99.5 | 1.6400 | -0.0600 |",
        "| today | old recipe + `fixed=True` | 1.84M | 250.0 | 400 | 0.82M | 99.5 | 1.7000 | "
        "+0.0000 |"]


def test_sft_rows_keep_every_override():
    (line,) = sweep.table([result("lr3e-3", ["optim.lr=0.003"], 1.7, stage="sft")]).splitlines()[2:]
    assert (line.split(" | ")[1] == "config file + `optim.lr=0.003`"
            and line.endswith("| 1.7000 |  |"))


def test_replace_block_rewrites_its_own_block_and_appends_a_new_one():
    text = "intro\n<!-- a:pretrain -->\nold\n<!-- /a:pretrain -->\nafter\n"
    assert sweep.replace_block(text, "a:pretrain", "new") == (
        "intro\n<!-- a:pretrain -->\nnew\n<!-- /a:pretrain -->\nafter\n")
    assert (sweep.replace_block(text, "b:sft", "x")
            == text + "\n<!-- b:sft -->\nx\n<!-- /b:sft -->\n")


def test_report_names_the_data_each_result_recorded_and_refuses_a_mix(tmp_path):
    import argparse
    import os

    import pytest
    args = argparse.Namespace(data=str(tmp_path / "default"), init="", out=str(tmp_path / "sweep"))
    a, b = (dict(result(n, [], 1.7, stage="sft"), data=str(tmp_path / "qs"),
                 init=str(tmp_path / "qs/pretrain"))
            for n in ("a", "b"))
    rel = lambda p: os.path.relpath(p, Path.cwd())  # noqa: E731
    assert sweep.sweep_sources([a, b], args) == [f"--data {rel(tmp_path / 'qs')}",
                                                 f"--init {rel(tmp_path / 'qs/pretrain')}"]
    # a result from before results recorded their data takes report's --data
    assert sweep.sweep_sources([result("old", [], 1.7)], args) == [
        f"--data {rel(tmp_path / 'default')}"]
    with pytest.raises(SystemExit, match=r"different --data .*keep one sweep per --out"):
        sweep.sweep_sources([a, dict(b, data=str(tmp_path / "other"))], args)


def test_today_on_the_config_file_is_the_old_recipe_as_it_shipped():
    from jaxgpt import config as config_lib
    cfg = config_lib.from_cli(sweep.ROOT / "experiments/configs/chitchat_pretrain.py", sweep.TODAY)
    # the quickstart before its recipe was tuned: AdamW 3e-3 -> 3e-4, batch 16, 1200 steps, on the
    # same model
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr, cfg.data.batch_size,
            cfg.train.steps) == ("adamw", 3e-3, 3e-4, 16, 1200)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.n_kv_head,
            cfg.model.seq_len, cfg.model.matmul_dtype) == (4, 128, 4, 2, 128, "float32")
    # what the recipe changed since, pinned back: QK-norm, the embeddings' rate, the residual
    # projections' init (0: GPT-2's scaled one), weight decay
    assert (cfg.model.qk_norm, cfg.optim.embed_lr_scale, cfg.model.residual_init_std,
            cfg.optim.weight_decay) == (False, 1.0, 0.0, 0.1)


def test_eval_steps_are_where_train_evaluates():
    """run_variant evaluates every steps // 4 steps and at the last (train.py:
    done % eval_every == 0 or done == steps), so a fixed-step sweep's curves are plotted against
    these steps."""
    assert sweep.eval_steps({"steps": 2220}) == [555, 1110, 1665, 2220]
    assert sweep.eval_steps({"steps": 2457}) == [614, 1228, 1842, 2456, 2457]
    assert sweep.eval_steps({"steps": 3}) == [1, 2, 3]
