"""`python -m jaxgpt.feedback`: what people said of the replies (the SQLite store of
jaxgpt/serve/feedback.py) as SFT conversations and preference pairs, and its counts.

    python -m jaxgpt.feedback export runs/NAME/feedback.db export.sft=liked.jsonl \\
        export.pairs=pairs.jsonl
    python -m jaxgpt.feedback stats runs/NAME/feedback.db        # counts, as JSON
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from jaxgpt import cli
from jaxgpt.errors import ConfigError
from jaxgpt.serve.feedback_export import stats, write_datasets


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    # liked and edited replies as SFT conversations: JSONL that data.chat=jsonl:PATH reads
    sft: str = ""
    # preference pairs: JSONL of {"messages": context, "chosen": str, "rejected": str}
    pairs: str = ""


@dataclasses.dataclass(frozen=True)
class FeedbackCommand:
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)


def main(argv: Sequence[str] | None = None) -> None:
    def run_export(operands: list[str], settings: list[str]) -> None:
        cfg = cli.tool_config(FeedbackCommand, settings).export
        if not cfg.sft and not cfg.pairs:
            raise ConfigError("set export.sft=FILE.jsonl and / or export.pairs=FILE.jsonl")
        counts = write_datasets(operands[0], cfg.sft or None, cfg.pairs or None)
        print(json.dumps({**counts, "sft_file": cfg.sft or None, "pairs_file": cfg.pairs or None}))

    def run_stats(operands: list[str], settings: list[str]) -> None:
        cli.tool_config(FeedbackCommand, settings)
        print(json.dumps(stats(operands[0]), indent=1))

    cli.run("python -m jaxgpt.feedback", {
        "export": cli.Command(run_export, "DB [export.sft=SFT.jsonl] [export.pairs=PAIRS.jsonl]",
                              FeedbackCommand, sections=("export",), tune_host=False),
        "stats": cli.Command(run_stats, "DB", FeedbackCommand, sections=("stats",),
                             tune_host=False),  # no keys
    }, None if argv is None else list(argv))


if __name__ == "__main__":
    main()
