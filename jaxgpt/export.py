"""`python -m jaxgpt.export RUN_DIR OUT`: a run's newest intact checkpoint (or a step directory) as
a params-only export (the format: jaxgpt/store/export.py)."""
from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxgpt import cli
from jaxgpt import config as config_lib
from jaxgpt.store import runs
from jaxgpt.store.export import export


def export_run(source: str | Path, out_dir: str | Path) -> tuple[Path, int | None]:
    """Export what runs.load finds in `source`: (export directory, checkpoint step or None)."""
    loaded = runs.load(source)
    return export(out_dir, loaded.cfg, jax.device_get(loaded.params), loaded.tokenizer), loaded.step


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        out, step = export_run(operands[0], operands[1])
        print(json.dumps({"export": str(out), "step": step}))

    cli.run("python -m jaxgpt.export", cli.Command(run, usage="RUN_DIR OUT", root=config_lib.Config,
                                                   sections=("mesh",), operands=(2, 2)), argv)


if __name__ == "__main__":
    main()
