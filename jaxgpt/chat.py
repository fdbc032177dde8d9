"""`python -m jaxgpt.chat`: chat corpora converted to jsonl, and one conversation shown as the model
is trained on it (the template and the loss mask: jaxgpt/data/chat.py).

    python -m jaxgpt.chat convert
        convert.source=chitchat|chatterbot[:LANG,...]|sharegpt:PATH|jsonl:PATH
        convert.out=F.jsonl [convert.limit=N convert.skip_bad=true]
    python -m jaxgpt.chat render render.file=F.jsonl render.tokenizer=SPEC [render.index=N
                                 render.seq_len=L render.ids=true]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxgpt import cli
from jaxgpt.config import ChatCommand
from jaxgpt.data.chat import render, render_truncated
from jaxgpt.data.dialogs import ChatDataError, load, read_jsonl, write_jsonl
from jaxgpt.data.tokenizer import Tokenizer


def show(ids: np.ndarray, mask: np.ndarray, tokenizer: Tokenizer,
         marks: tuple[str, str] = ("⟦", "⟧")) -> str:
    """The rendered text with each run of trained tokens between `marks` (runs start and end at
    special tokens, so decoding them run by run never splits a character)."""
    edges = [0, *(np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist(), len(ids)]
    return "".join(marks[0] + tokenizer.decode(ids[a:b]) + marks[1] if mask[a]
                   else tokenizer.decode(ids[a:b])
                   for a, b in zip(edges, edges[1:], strict=False) if b > a)


def main(argv: Sequence[str] | None = None) -> None:
    def convert(operands: list[str], settings: list[str]) -> None:
        cfg = cli.tool_config(ChatCommand, settings, ("convert.source", "convert.out")).convert
        loaded = load(cfg.source, skip_bad=cfg.skip_bad, limit=cfg.limit or None)
        try:
            path = write_jsonl(cfg.out, loaded.conversations, loaded.ids)
        except OSError as e:
            raise ChatDataError(f"convert.out={cfg.out}: cannot write it "
                                f"({e.strerror or e})") from None
        print(f"wrote {len(loaded.conversations)} conversations to {path} "
              f"({loaded.skipped} source records skipped: malformed or nothing to train on)")

    def show_one(operands: list[str], settings: list[str]) -> None:
        cfg = cli.tool_config(ChatCommand, settings, ("render.file",)).render
        loaded = read_jsonl(cfg.file, limit=cfg.index + 1)
        if cfg.index >= len(loaded.conversations):
            raise ChatDataError(f"{cfg.file}: no conversation {cfg.index} "
                                f"(it has {len(loaded.conversations)})")
        tokenizer, conversation = (Tokenizer.from_spec(cfg.tokenizer),
                                   loaded.conversations[cfg.index])
        rendered = (render_truncated(conversation, tokenizer, cfg.seq_len) if cfg.seq_len
                    else render(conversation, tokenizer))
        if rendered is None:
            raise ChatDataError(f"{cfg.file}: conversation {cfg.index} does not fit in "
                                f"render.seq_len={cfg.seq_len} + 1 tokens even with only its "
                                "last exchange")
        ids, mask = rendered
        print(f"# {loaded.ids[cfg.index]}: {len(ids)} tokens, {int(mask.sum())} trained "
              "(between ⟦ and ⟧)")
        print(show(ids, mask, tokenizer))
        for i, (token, trained) in enumerate(zip(ids.tolist(), mask.tolist(), strict=False)
                                             if cfg.ids else ()):
            print(f"{i}\t{token}\t{int(trained)}\t{tokenizer.decode([token])!r}")

    cli.run("python -m jaxgpt.chat", {
        "convert": cli.Command(convert, "convert.source=SOURCE convert.out=F.jsonl "
                               "[convert.limit=N convert.skip_bad=true]\n  SOURCE: chitchat | "
                               "chatterbot[:LANG,...] | sharegpt:PATH | jsonl:PATH", ChatCommand,
                               sections=("convert",), operands=(0, 0)),
        "render": cli.Command(show_one, "render.file=F.jsonl [render.tokenizer=SPEC "
                              "render.index=N render.seq_len=L render.ids=true]", ChatCommand,
                              sections=("render",), operands=(0, 0)),
    }, None if argv is None else list(argv))


if __name__ == "__main__":
    main()
