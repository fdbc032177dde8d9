"""Params-only exports: params + config + tokenizer, without the optimizer state, for evaluate,
sample (and later chat and serve) and for fine-tuning (`train.init_from`). runs.py loads them.

    python -m jaxgpt.export RUN_DIR OUT    # a run's newest intact checkpoint (or a step directory) -> OUT

An export directory holds `config.json`, `params/` (orbax), `checksums.json` (one per param, checked as
they are read back) and the tokenizer files; a run writes one to `export/` when it finishes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxgpt.store import checkpoint
from jaxgpt import cli
from jaxgpt import config as config_lib
from jaxgpt import files
from jaxgpt.store import runs
from jaxgpt.data.tokenizer import Tokenizer


def export(out_dir: str | Path, cfg: config_lib.Config, params, tokenizer: Tokenizer | None,
           extra: dict[str, str | bytes] | None = None) -> Path:
    """Write params + config + tokenizer (None: a converted model without one, see convert.py) and
    the `extra` files (relative path -> content); a finished export replaces an older one whole."""
    out_dir = Path(out_dir).absolute()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    options = {}
    if jax.process_count() > 1:  # one process exports host params alone: orbax must not wait for the others
        me = jax.process_index()
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    checkpointer = ocp.StandardCheckpointer(**options)
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    files.atomic_write(tmp / "config.json", cfg.to_json())
    # read back against these (runs.load): a damaged export is refused, not loaded with wrong weights
    files.atomic_write(tmp / checkpoint.EXPORT_CHECKSUMS, json.dumps(checkpoint.checksums_and_finite(params)[0]))
    if tokenizer is not None:
        tokenizer.save(tmp)
    for name, content in (extra or {}).items():
        files.atomic_write(tmp / name, content)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def export_run(source: str | Path, out_dir: str | Path) -> tuple[Path, int | None]:
    """Export what runs.load finds in `source`: (export directory, checkpoint step or None)."""
    loaded = runs.load(source)
    return export(out_dir, loaded.cfg, jax.device_get(loaded.params), loaded.tokenizer), loaded.step


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        out, step = export_run(operands[0], operands[1])
        print(json.dumps({"export": str(out), "step": step}))

    cli.run("python -m jaxgpt.export", cli.Command(run, usage="RUN_DIR OUT", root=config_lib.Config, sections=("mesh",),
                                                   operands=(2, 2)), argv)


if __name__ == "__main__":
    main()
