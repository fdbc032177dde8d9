"""Checkpoints with orbax: the params-only export that evaluate / sample / chat read.

An export directory holds `config.json` (the resolved run config), `params/` (orbax) and the
tokenizer files. A run directory's export lives at `RUN_DIR/export`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgpt import config as config_lib
from jaxgpt.errors import CheckpointError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import Tokenizer


def export(out_dir: str | Path, cfg: config_lib.Config, params, tokenizer: Tokenizer) -> Path:
    """Write params + config + tokenizer; a finished export replaces an older one whole."""
    out_dir = Path(out_dir).absolute()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    (tmp / "config.json").write_text(cfg.to_json())
    tokenizer.save(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def find_export(source: str | Path) -> Path:
    source = Path(source)
    for candidate in (source, source / "export"):
        if (candidate / "params").is_dir() and (candidate / "config.json").is_file():
            return candidate.absolute()
    raise CheckpointError(f"{source}: neither an export nor a run directory with an export/ inside")


def load_params(export_dir: Path, model: GPT, shardings=None):
    """Params of an export, checked against the model's shapes, placed by `shardings` if given."""
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    stored = ocp.StandardCheckpointer().metadata(export_dir / "params")
    stored = getattr(stored, "item_metadata", stored)
    stored_shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        key = jax.tree_util.keystr(path)
        if stored_shapes.get(key) != tuple(leaf.shape):
            raise CheckpointError(f"{export_dir}: param {key} is {stored_shapes.get(key)} in the checkpoint "
                                  f"but {tuple(leaf.shape)} in the model config")
    return ocp.StandardCheckpointer().restore(export_dir / "params", target)


def load_for_inference(source: str | Path, overrides: list[str]):
    """(config, params on one device, tokenizer) from a run directory or an export.

    Overrides may change data, eval and sample settings; model fields come from the export.
    """
    export_dir = find_export(source)
    cfg = config_lib.from_dict(json.loads((export_dir / "config.json").read_text()))
    cfg = config_lib.validate(config_lib.apply_overrides(cfg, overrides))
    model = GPT(cfg.model)
    return cfg, load_params(export_dir, model), Tokenizer.load(export_dir)


def to_numpy(params):
    return jax.tree.map(np.asarray, params)
