"""`python -m jaxgpt.convert`: Hugging Face directories and GGUF files in and out (the code:
jaxgpt/store/hf/ and jaxgpt/store/gguf/).

    python -m jaxgpt.convert from-hf DIR_OR_HUB_NAME OUT [from_hf.KEY=VALUE ...]
    python -m jaxgpt.convert to-hf RUN_OR_EXPORT DIR [to_hf.KEY=VALUE ...]
    python -m jaxgpt.convert from-gguf FILE.gguf|smollm2-135m-instruct|OWNER/REPO/FILE.gguf OUT
    python -m jaxgpt.convert to-gguf RUN_OR_EXPORT OUT.gguf [to_gguf.dtype=f32|f16|bf16|q8_0]
"""
from __future__ import annotations

import json

from jaxgpt import cli
from jaxgpt.config import HfCommand
from jaxgpt.store.gguf.convert import from_gguf, to_gguf
from jaxgpt.store.hf.convert import from_hf, to_hf

VERBS = {"from-hf": (from_hf, "from_hf", "DIR_OR_HUB_NAME OUT"),
         "to-hf": (to_hf, "to_hf", "RUN_OR_EXPORT DIR"),
         "from-gguf": (from_gguf, "from_gguf", "FILE.gguf|KNOWN_NAME|OWNER/REPO/FILE.gguf OUT"),
         "to-gguf": (to_gguf, "to_gguf", "RUN_OR_EXPORT OUT.gguf")}


def _command(function, section: str, operands: str) -> cli.Command:
    def run(args, settings):
        cfg = getattr(cli.tool_config(HfCommand, settings), section)
        print(json.dumps(function(args[0], args[1], cfg)))

    return cli.Command(run, f"{operands} [{section}.KEY=VALUE ...]", HfCommand,
                       sections=(section,), operands=(2, 2))


def main(argv: list[str] | None = None) -> None:
    cli.run("python -m jaxgpt.convert",
            {verb: _command(*spec) for verb, spec in VERBS.items()}, argv)


if __name__ == "__main__":
    main()
