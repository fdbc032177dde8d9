"""Hugging Face `tokenizers` files as tokenizer.py's hf kind reads them: the library loaded lazily
(an optional dependency), the byte-level alphabet, and the bytes each id of a vocabulary stands
for."""
from __future__ import annotations

import functools
import json
import re

from jaxgpt.errors import TokenizerError


@functools.cache
def byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet (HF's bytes_to_unicode) as character -> byte: a byte-level BPE
    vocabulary writes each byte of a token as one printable character."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def hf_token_bytes(hf, hf_json: str) -> list[bytes]:
    """The UTF-8 bytes each id of a HF tokenizer stands for (b"" for its specials), read off the
    vocabulary: byte-level pieces (GPT-2, Llama 3) through the byte alphabet, else SentencePiece
    pieces (Llama 2: \u2581 is a space, <0xNN> one byte). A SentencePiece tokenizer adds a space
    before the first word, which these lengths count (one byte per encoded text)."""
    spec = json.loads(hf_json)
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))  # alone or inside a Sequence
    added, chars = {t["id"]: t for t in spec.get("added_tokens", [])}, byte_level_chars()
    out = []
    for i in range(hf.get_vocab_size(with_added_tokens=True)):
        piece = hf.id_to_token(i)
        if i in added:
            out.append(b"" if added[i].get("special") else added[i]["content"].encode())
        elif piece is None:  # an unused id
            out.append(b"")
        elif byte_level and all(c in chars for c in piece):
            out.append(bytes(chars[c] for c in piece))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def load_hf_tokenizer(name: str, hf_json: str):
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"'{name}' is a Hugging Face tokenizer: pip install 'jaxgpt[hf]' "
                             f"(the tokenizers package)") from None
    try:
        hf = tokenizers.Tokenizer.from_str(hf_json)
    except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions on a bad file
        raise TokenizerError(f"'{name}': not a tokenizers JSON file "
                             f"({str(e).splitlines()[0]})") from None
    hf.encode_special_tokens = True  # special-token text in the input is text, as with tiktoken
    return hf
