"""Params-only exports: what evaluate, sample (and later chat and serve) load, and what fine-tuning
starts from (`train.init_from`: these params, a fresh optimizer, step 0).

    python -m jaxgpt.export RUN_DIR OUT    # the newest intact checkpoint of a run -> OUT

An export directory holds `config.json`, `params/` (orbax) and the tokenizer files; a run writes one
to `export/` when it finishes.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxgpt import config as config_lib
from jaxgpt.checkpoint import check_model, locate, newest, params_target, read_meta, restore_params, run_tokenizer
from jaxgpt.errors import CheckpointError, ConfigError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import Tokenizer


def load_source_params(source: str | Path, cfg: config_lib.Config, model: GPT, shardings) -> tuple[dict, str]:
    """Params from a run / checkpoint directory (newest intact step) or an export, checked against cfg."""
    found = locate(source)
    if found:
        out = newest(*found, lambda d: (restore_params(d, cfg, model, shardings)[0], str(d)))
        if out:
            return out
    export_dir = find_export(source)
    saved = json.loads((export_dir / "config.json").read_text())
    check_model(saved, cfg, export_dir, "params can only be loaded into the same model shape")
    return load_params(export_dir, model, shardings), str(export_dir)


def init_from(source: str, trainer):
    """A fresh TrainState (step 0, new optimizer state and rng) around another run's params."""
    params, where = load_source_params(source, trainer.cfg, trainer.model, trainer.params_sharding)
    opt_state = jax.jit(trainer.optimizer.init, out_shardings=trainer.state_sharding.opt_state)(params)
    print(f"params from {where}; fresh optimizer state, step 0", file=sys.stderr)
    return trainer.init_state().replace(params=params, opt_state=opt_state)


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


def _newest_params(found: tuple[Path, int | None]) -> tuple[config_lib.Config, dict, int]:
    """(config, params on one device, step) of the newest intact checkpoint."""
    def load(step_dir):
        cfg = config_lib.from_dict(read_meta(step_dir)["config"])
        params, meta = restore_params(step_dir, cfg, GPT(cfg.model))
        return cfg, params, meta["step"]

    loaded = newest(*found, load)
    if loaded is None:
        raise CheckpointError(f"{found[0]}: no intact checkpoint")
    return loaded


def export_checkpoint(source: str | Path, out_dir: str | Path) -> tuple[Path, int]:
    """Export the newest intact checkpoint of a run: (export directory, step)."""
    found = locate(source)
    if found is None:
        raise CheckpointError(f"{source}: no checkpoints (expected RUN_DIR/checkpoints/<step>/)")
    cfg, params, step = _newest_params(found)
    return export(out_dir, cfg, jax.device_get(params), run_tokenizer(found[0].parent, cfg)), step


def find_export(source: str | Path) -> Path:
    source = Path(source)
    for candidate in (source, source / "export"):
        if (candidate / "params").is_dir() and (candidate / "config.json").is_file():
            return candidate.absolute()
    raise CheckpointError(f"{source}: neither an export nor a run directory with an export/ or checkpoints/ inside")


def source_file(source: str | Path, name: str) -> Path:
    """`name` (config.json, tokenizer.json) of a run directory, else of its export or the export itself."""
    source = Path(source)
    return source / name if (source / name).is_file() else find_export(source) / name


def load_params(export_dir: Path, model: GPT, shardings=None):
    """Params of an export, checked against the model's shapes, placed by `shardings` if given."""
    target = params_target(model, shardings)
    stored = ocp.StandardCheckpointer().metadata(export_dir / "params")
    stored = getattr(stored, "item_metadata", stored)
    stored_shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
        key = jax.tree_util.keystr(path)
        if stored_shapes.get(key) != tuple(leaf.shape):
            raise CheckpointError(f"{export_dir}: param {key} is {stored_shapes.get(key)} in the checkpoint "
                                  f"but {tuple(leaf.shape)} in the model config")
    return ocp.StandardCheckpointer().restore(export_dir / "params", target)


def load_for_inference(source: str | Path, overrides: list[str]):
    """(config, params on one device, tokenizer) from an export, or a run directory (its export/,
    else its newest checkpoint). Overrides may change data, eval and sample settings; model fields
    come from the checkpoint."""
    try:
        export_dir = find_export(source)
    except CheckpointError:
        found = locate(source)
        if found is None:
            raise
        cfg, params, _ = _newest_params(found)
        cfg = config_lib.validate(config_lib.apply_overrides(cfg, overrides))
        return cfg, params, run_tokenizer(found[0].parent, cfg)
    cfg = config_lib.from_dict(json.loads((export_dir / "config.json").read_text()))
    cfg = config_lib.validate(config_lib.apply_overrides(cfg, overrides))
    model = GPT(cfg.model)
    return cfg, load_params(export_dir, model), Tokenizer.load(export_dir)


def main(argv: list[str] | None = None) -> None:
    from jaxgpt import cli

    usage = "python -m jaxgpt.export RUN_DIR OUT"

    def run(args):
        if len(args) != 2:
            raise ConfigError(f"usage: {usage}")
        out, step = export_checkpoint(args[0], args[1])
        print(json.dumps({"export": str(out), "step": step}))

    cli.run(run, argv if argv is not None else sys.argv[1:], usage=usage)


if __name__ == "__main__":
    main()
