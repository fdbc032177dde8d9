"""Tests for jaxgpt.runs: one loader for a run directory, a checkpoint step or an export."""
import json
import re
import shutil
import subprocess
import sys

import jax
import pytest
from conftest import leaves_equal, subprocess_env

from jaxgpt.errors import CheckpointError, ConfigError
from jaxgpt.store import integrity, runs
from jaxgpt.train import loop


def test_run_step_and_export_give_the_same_model(tiny_run):
    run, rows = tiny_run
    final = rows[-1]["step"]
    from_run = runs.load(run)
    from_step = runs.load(run / "checkpoints" / str(final))
    from_export = runs.load(run / "export")
    assert (from_run.where == str((run / "checkpoints" / str(final)).absolute())
            and from_run.step == final)
    assert (from_step.step == final and from_export.step is None
            and from_export.where == str((run / "export").absolute()))
    assert (leaves_equal(from_run.params, from_export.params)
            and leaves_equal(from_step.params, from_export.params))
    saved = json.loads((run / "config.json").read_text())
    assert (from_run.cfg.to_dict() == saved == from_export.cfg.to_dict()
            == runs.saved_config(run).to_dict())
    fingerprints = {x.tokenizer.fingerprint for x in (from_run, from_step, from_export)}
    assert fingerprints == {runs.load_tokenizer(run).fingerprint}


def test_a_run_without_export_loads_its_newest_checkpoint(tiny_run, tmp_path):
    run, _ = tiny_run
    copy = tmp_path / "no-export"
    shutil.copytree(run, copy)
    # e.g. killed before the end: the newest checkpoint serves instead
    shutil.rmtree(copy / "export")
    loaded = runs.load(copy, ["sample.temperature=0", "eval.stride=8"])
    assert leaves_equal(loaded.params, runs.load(run / "export").params)
    assert loaded.cfg.sample.temperature == 0 and loaded.cfg.eval.stride == 8


def test_an_export_alone_loads_without_its_run(tiny_run, tmp_path):
    run, _ = tiny_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(run / "export", moved)
    assert leaves_equal(runs.load(moved).params, runs.load(run / "export").params)


def test_the_model_shape_cannot_be_overridden(tiny_run):
    run, _ = tiny_run
    with pytest.raises(CheckpointError, match=r"model.n_layer=2 in the checkpoint but "
                                              r"model.n_layer=3 in the config"):
        runs.load(run, ["model.n_layer=3"])
    # compute settings may change
    assert runs.load(run, ["model.dtype=bfloat16"]).cfg.model.dtype == "bfloat16"


def test_nothing_to_load_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"^.*nothing: not a run directory "
                                              r"\(with checkpoints/ or export/\), "
                                              r"a checkpoint step or an export$"):
        runs.load(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        runs.load_tokenizer(tmp_path)


def test_params_on_a_mesh(tiny_run):
    run, _ = tiny_run
    loaded = runs.load(run, on_mesh=True)
    assert loaded.mesh is not None
    assert all(x.sharding.mesh.shape == loaded.mesh.shape for x in jax.tree.leaves(loaded.params))


def test_train_config_takes_the_model_of_init_from(tiny_run, tmp_path):
    run, _ = tiny_run
    config_file = tmp_path / "ft.json"
    config_file.write_text(json.dumps({"model": {"n_layer": 7, "d_model": 32},
                                       "data": {"path": "x.txt"}}))
    cfg = loop.train_config(config_file, [f"train.init_from={run}", "model.dropout=0.1",
                                          "optim.lr=1e-4"])
    source = runs.saved_config(run).model
    assert ((cfg.model.n_layer, cfg.model.d_model, cfg.model.vocab_size)
            == (source.n_layer, source.d_model, source.vocab_size))
    assert cfg.model.dropout == 0.1 and cfg.optim.lr == 1e-4 and cfg.data.path == "x.txt"


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_export_is_refused_and_one_without_checksums_still_loads(
        tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    good = runs.load(run / "export").params
    sums = json.loads((run / "export" / "checksums.json").read_text())
    assert sorted(sums) == sorted("/".join(str(k.key) for k in p)
                                  for p, _ in jax.tree_util.tree_leaves_with_path(good))
    # bytes changed inside a params data file (its size unchanged): the checksums catch it
    flipped = tmp_path / "flipped"
    shutil.copytree(run / "export", flipped)
    data = _largest_file(flipped / "params")
    raw = bytearray(data.read_bytes())
    middle = slice(len(raw) // 2, len(raw) // 2 + 4)
    raw[middle] = bytes(255 - b for b in raw[middle])
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError,
                       match=r"flipped: no checkpoint or export that reads back intact$"):
        runs.load(flipped)
    err = capsys.readouterr().err
    assert (f"skipping {flipped.absolute()}: incomplete or damaged (checksum mismatch in "
            in err), err
    # a params file cut short: orbax cannot read it, the same refusal, from the command line (in a
    # process of its own: what orbax leaves of the failed reads, Python reports at exit;
    # integrity.guarded_read quiets it)
    cut = tmp_path / "cut"
    shutil.copytree(run / "export", cut)
    data = _largest_file(cut / "params")
    data.write_bytes(data.read_bytes()[:100])
    out = subprocess.run([sys.executable, "-m", "jaxgpt.evaluate", str(cut)], capture_output=True,
                         text=True, env=subprocess_env(), timeout=300)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.splitlines()  # and nothing of orbax's abandoned reads after them
    assert len(lines) == 2, out.stderr
    warning, error = lines
    assert warning.startswith(f"checkpoint: skipping {cut.absolute()}: incomplete or damaged "
                              "(cannot read params: ")
    assert error == f"error: {cut}: no checkpoint or export that reads back intact", out.stderr
    # an export written before exports carried checksums loads, unchecked
    older = tmp_path / "older"
    shutil.copytree(run / "export", older)
    (older / "checksums.json").unlink()
    assert leaves_equal(runs.load(older).params, good)


def test_an_export_that_passed_is_not_checksummed_again_until_a_file_changes(
        tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run
    export = tmp_path / "export"
    shutil.copytree(run / "export", export)
    checked, verify = [], integrity.verify_checksums
    monkeypatch.setattr(integrity, "verify_checksums",
                        lambda *args: (checked.append(1), verify(*args))[1])
    first, second = runs.load(export).params, runs.load(export).params
    assert checked == [1] and leaves_equal(first, second)
    # bytes flipped in place, the size unchanged: checked again, and refused
    data = _largest_file(export / "params")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="no checkpoint or export that reads back intact"):
        runs.load(export)
    assert checked == [1, 1]


def test_a_bad_export_config_is_named_in_one_line(tiny_run, tmp_path):
    run, _ = tiny_run
    export_dir = tmp_path / "export"
    shutil.copytree(run / "export", export_dir)
    config_file = export_dir / "config.json"
    for text, message in [('{"model": ', r"not valid JSON \(Expecting value: line 2 column 1"),
                          ('{"model": {"n_layer": "x"}}', r"model.n_layer='x': expected int"),
                          ("[]", r"a config is an object of sections, not list")]:
        config_file.write_text(text + "\n")
        with pytest.raises(ConfigError, match=rf"^{config_file.absolute()}: {message}"):
            runs.load(export_dir)


def test_an_export_whose_params_differ_from_its_config_names_the_param(tiny_run, tmp_path):
    run, _ = tiny_run
    export_dir = tmp_path / "export"
    shutil.copytree(run / "export", export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    had_qk_norm = config["model"]["qk_norm"]
    config["model"]["qk_norm"] = not had_qk_norm  # a change of params the shape fields do not cover
    (export_dir / "config.json").write_text(json.dumps(config))
    stored, wanted = ("(16,)", "None") if had_qk_norm else ("None", "(16,)")
    with pytest.raises(CheckpointError, match=rf"^{export_dir.absolute()}: param "
                                              rf"block_0/attn/k_norm/scale is {re.escape(stored)} "
                                              rf"in the checkpoint but {re.escape(wanted)} in "
                                              rf"the model config$"):
        runs.load(export_dir)
