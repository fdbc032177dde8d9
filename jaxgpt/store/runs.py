"""One loader for any trained model: a run directory, a checkpoint step in it, or an export.

    loaded = runs.load("runs/shakespeare_char")  # newest intact checkpoint, else export/
    loaded = runs.load("runs/shakespeare_char/checkpoints/2000")
    loaded = runs.load("runs/quickstart/export", ["sample.temperature=0.7"])
    loaded.cfg, loaded.params, loaded.tokenizer, loaded.where, loaded.step

A run directory (`train.out_dir`) holds `config.json`, the tokenizer files, `checkpoints/<step>/`
(checkpoint.py) and, once finished, `export/` (export.py): params, config and tokenizer alone. The
params of a run are those of its newest checkpoint that reads back intact (so a run still in
progress, or stopped, is loaded where it is), else of its export. `evaluate`, `sample`, `export`,
`train.init_from` and the quickstart all come through here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple

import jax

from jaxgpt import config as config_lib
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import CheckpointError
from jaxgpt.model import lora
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding
from jaxgpt.store import checkpoint, export, integrity

NO_TOKENIZER = "NO_TOKENIZER"  # in an export converted without tokenizer files (jaxgpt.convert)


class LoadedModel(NamedTuple):
    cfg: config_lib.Config   # the saved config with the caller's overrides (model shape unchanged)
    params: dict             # on one device, or placed on `mesh`
    # None only with load(..., need_tokenizer=False) and a model without one
    tokenizer: Tokenizer | None
    where: str               # the checkpoint step or export directory the params came from
    step: int | None         # the checkpoint's step (None for an export)
    mesh: jax.sharding.Mesh | None = None


def _candidates(source: str | Path) -> Iterator[tuple[str, Path]]:
    """(kind, directory) of what may hold the params, best first: checkpoint steps newest first
    (only the named one for a step directory), then the export."""
    found = checkpoint.locate(source)
    if found is not None:
        directory, step = found
        for s in [step] if step is not None else checkpoint.steps_in(directory):
            yield "checkpoint", directory / str(s)
        if step is not None:
            return
    if (export_dir := export.find(source)) is not None:
        yield "export", export_dir


def _nothing_there(source) -> CheckpointError:
    return CheckpointError(f"{source}: not a run directory (with checkpoints/ or export/), a "
                           "checkpoint step or an export")


def _saved_dict(kind: str, directory: Path) -> dict:
    if kind == "checkpoint":
        return checkpoint.read_meta(directory)["config"]
    # a bad file is named in one line
    return config_lib.load_file(directory / "config.json").to_dict()


def saved_config(source: str | Path) -> config_lib.Config:
    """The resolved config the model in `source` was trained with."""
    for kind, directory in _candidates(source):
        try:
            return config_lib.from_dict(_saved_dict(kind, directory))
        except integrity.Damaged as e:
            checkpoint.warn(f"skipping {directory}: incomplete or damaged ({e})")
    raise _nothing_there(source)


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of the model in `source`: tokenizer.json in the export, step's run or run
    directory."""
    source = Path(source).absolute()
    found = checkpoint.locate(source)
    places = [source, source / "export"] + ([found[0].parent] if found else [])
    for place in places:
        if (place / "tokenizer.json").is_file():
            return Tokenizer.load(place)
    # jaxgpt.convert's marker of a Hugging Face model that came without tokenizer files
    for place in places:
        if (place / NO_TOKENIZER).is_file():
            raise CheckpointError(
                f"{place}: converted from Hugging Face without tokenizer files, so it has no "
                "tokenizer.json; convert it again with its tokenizer.json beside config.json, or "
                "with from_hf.tokenizer=PATH_OR_SPEC (python -m jaxgpt.convert from-hf --help)")
    raise CheckpointError(f"{source}: no tokenizer.json (a run writes one into its directory and "
                          "its export)")


def load_params(source: str | Path, cfg: config_lib.Config,
                shardings=None) -> tuple[dict, str, int | None]:
    """(params, where they came from, checkpoint step or None) of `source`, checked against cfg's
    model shape and placed by `shardings` (one device when None). Damaged checkpoints are
    skipped."""
    model = GPT(cfg.model)
    for kind, directory in _candidates(source):
        try:
            saved = _saved_dict(kind, directory)
            if _holds_adapters(kind, directory, saved):
                return _adapted_params(kind, directory, saved, cfg, shardings)
            if kind == "checkpoint":
                tree, meta = checkpoint.restore_params(directory, cfg, model, shardings)
                return tree, str(directory), meta["step"]
            checkpoint.check_model(saved, cfg, directory,
                                   "params can only be loaded into the same model shape")
            return export.read_params(directory, model, shardings), str(directory), None
        except integrity.Damaged as e:
            checkpoint.warn(f"skipping {directory}: incomplete or damaged ({e})")
    raise _nothing_there(source) if next(_candidates(source), None) is None else \
        CheckpointError(f"{source}: no checkpoint or export that reads back intact")


def _holds_adapters(kind: str, directory: Path, saved: dict) -> bool:
    """A LoRA run's checkpoint, or an export of its adapters alone (export.lora=separate);
    `saved`: the config it was written with."""
    if kind == "export":
        return (directory / export.LORA_NOTE).is_file()
    return saved["train"].get("lora_rank", 0) > 0


def _adapted_params(kind: str, directory: Path, saved: dict, cfg: config_lib.Config, shardings):
    """(params, where, step) of LoRA adapters merged into the model they adapt: the run's
    train.init_from (a checkpoint), or the base lora.json names (an export)."""
    t = config_lib.from_dict(saved).train
    if kind == "export":
        note = directory / export.LORA_NOTE
        base_source = integrity.guarded_read(export.LORA_NOTE,
                                             lambda: json.loads(note.read_text())["base"])
    else:
        base_source = t.init_from
    if export.find(base_source) is None and checkpoint.locate(base_source) is None:
        raise CheckpointError(f"{directory}: LoRA adapters of the model {base_source}, which is "
                              "not there (a run directory, checkpoint or export)")
    base = load_params(base_source, cfg)[0]
    model = GPT(cfg.model)
    adapters_shape = lora.abstract_adapters(jax.eval_shape(model.init, jax.random.key(0)),
                                            model.logical_axes, t.lora_rank, t.lora_targets)
    step = None
    if kind == "checkpoint":
        adapters, meta = checkpoint.restore_params(directory, cfg, model, None, adapters_shape)
        step = meta["step"]
    else:
        adapters = export.read_params(directory, model, None, adapters_shape)
    full = lora.merged_params(base, model.logical_axes, adapters, t)
    if shardings is not None:
        full = jax.device_put(full, shardings)
    return full, str(directory), step


def load(source: str | Path, overrides: list[str] = (), *, on_mesh: bool = False,
         need_tokenizer: bool = True) -> LoadedModel:
    """Config, params and tokenizer of a trained model. `overrides` may change anything but the
    model's shape (data, eval, sample, mesh settings, model.dtype, model.kernels...); with
    `on_mesh` the params are placed on the mesh that `mesh.*` describes, else on one device.
    need_tokenizer=False: a model without tokenizer files loads too (tokenizer None)."""
    saved = saved_config(source)
    cfg = config_lib.validate(config_lib.apply_overrides(saved, list(overrides)))
    checkpoint.check_model(saved.to_dict(), cfg, Path(source),
                           "the model's shape comes from the saved model")
    mesh = sharding.make_mesh(cfg.mesh) if on_mesh else None
    shardings = None
    if mesh is not None:
        model = GPT(cfg.model)
        shardings = sharding.logical_to_mesh(model.logical_axes,
                                             jax.eval_shape(model.init, jax.random.key(0)), mesh)
    tree, where, step = load_params(source, cfg, shardings)
    try:
        tok = load_tokenizer(source)
    except CheckpointError:
        if need_tokenizer:
            raise
        tok = None
    return LoadedModel(cfg, tree, tok, where, step, mesh)
