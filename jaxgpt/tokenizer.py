"""`python -m jaxgpt.tokenizer`: train a BPE tokenizer on text files, or encode a text with any
tokenizer spec. (The tokenizers themselves: jaxgpt/data/tokenizer.py.)

    python -m jaxgpt.tokenizer train bpe.input=a.txt,b.txt bpe.vocab_size=4096 bpe.out=tok/
    python -m jaxgpt.tokenizer encode encode.tokenizer=gpt2 encode.text="hello"
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from jaxgpt import cli
from jaxgpt.config import TokenizerCommand
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import TokenizerError


def _unreadable(path, e: Exception) -> TokenizerError:
    if isinstance(e, UnicodeDecodeError):
        return TokenizerError(f"{path}: not UTF-8 text ({e.reason}); "
                              "the tokenizer reads UTF-8 text files")
    return TokenizerError(f"{path}: cannot read it ({e.strerror or e})")


def _read_chunks(paths: Sequence[str], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stream files in ~1 MB pieces that end at line ends, so training never holds a whole
    corpus."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                while chunk := f.read(chunk_chars) + f.readline():
                    yield chunk
        except (OSError, UnicodeDecodeError) as e:
            raise _unreadable(path, e) from None


def main(argv: Sequence[str] | None = None) -> None:
    def train(operands: list[str], settings: list[str]) -> None:
        cfg = cli.tool_config(TokenizerCommand, settings, ("bpe.input", "bpe.out")).bpe
        for path in cfg.input:
            if not os.path.isfile(path):
                raise TokenizerError(f"bpe.input: {path} does not exist (or is not a file)")
        tok = Tokenizer.train_bpe(_read_chunks(cfg.input), cfg.vocab_size, cfg.name or None)
        try:
            print(f"saved {tok.name} (n_vocab={tok.n_vocab}) to {tok.save(cfg.out)}")
        except OSError as e:
            raise TokenizerError(f"bpe.out={cfg.out}: cannot write the tokenizer "
                                 f"({e.strerror or e})") from None

    def encode(operands: list[str], settings: list[str]) -> None:
        cfg = cli.tool_config(TokenizerCommand, settings, ("encode.text",)).encode
        try:
            corpus = Path(cfg.corpus).read_text(encoding="utf-8") if cfg.corpus else None
        except (OSError, UnicodeDecodeError) as e:
            raise _unreadable(cfg.corpus, e) from None
        print(" ".join(map(str, Tokenizer.from_spec(cfg.tokenizer, corpus).encode(cfg.text))))

    cli.run("python -m jaxgpt.tokenizer", {
        "train": cli.Command(train, "bpe.input=FILE[,FILE...] bpe.vocab_size=N bpe.out=DIR "
                             "[bpe.name=NAME]", TokenizerCommand, sections=("bpe",),
                             operands=(0, 0)),
        "encode": cli.Command(encode, "encode.tokenizer=SPEC encode.text=TEXT [encode.corpus=FILE]",
                              TokenizerCommand, sections=("encode",), operands=(0, 0)),
    }, None if argv is None else list(argv))


if __name__ == "__main__":
    main()
