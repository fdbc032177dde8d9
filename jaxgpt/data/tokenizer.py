"""Text <-> token ids: one `Tokenizer` over tiktoken (pretrained, byte, trained BPE), a char table
or a Hugging Face `tokenizers` file (models converted by jaxgpt.convert).

    python -m jaxgpt.tokenizer train bpe.input=a.txt,b.txt bpe.vocab_size=4096 bpe.out=DIR \\
        [bpe.name=NAME]
    python -m jaxgpt.tokenizer encode encode.tokenizer=gpt2 encode.text="hello" [encode.corpus=FILE]
"""
from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Literal, NamedTuple, Sequence

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from jaxgpt import files
from jaxgpt.data import vocabularies
from jaxgpt.data.hf_tokenizer import hf_token_bytes, load_hf_tokenizer
from jaxgpt.errors import TokenizerError

SPECIAL_TOKENS = ("<|endoftext|>", "<|bos|>", "<|system_start|>", "<|system_end|>",
                  "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
PRETRAINED = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")
FORMAT = "jaxgpt-tokenizer/1"


def _with_chat_specials(specials: dict[str, int], n_base: int) -> dict[str, int]:
    """Keep an encoding's own specials and append ours that are missing, after its largest id."""
    out, next_id = dict(specials), max([n_base - 1, *specials.values()]) + 1
    for token in SPECIAL_TOKENS:
        if token not in out:
            out[token], next_id = next_id, next_id + 1
    return out


# ---- specs ----

class Spec(NamedTuple):
    kind: Literal["pretrained", "byte", "char", "bpe", "file", "saved"]
    name: str            # the spec as written (a pretrained encoding's name)
    vocab_size: int = 0  # bpe: the ids to train
    path: Path | None = None  # file (.tiktoken ranks), saved (tokenizer.json or its directory)


def parse_spec(spec: str) -> Spec:
    """What a spec names: gpt2 | r50k_base | cl100k_base | o200k_base (any tiktoken name) | byte |
    char | bpe:N (these two are built from a corpus) | FILE.tiktoken | a saved tokenizer (its
    directory or tokenizer.json)."""
    if spec in openai_public.ENCODING_CONSTRUCTORS:
        return Spec("pretrained", spec)
    if spec in ("byte", "char"):
        return Spec(spec, spec)
    if spec.startswith("bpe:"):
        try:
            return Spec("bpe", spec, int(spec[4:]))
        except ValueError:
            raise TokenizerError(f"bad tokenizer {spec!r}: expected bpe:VOCAB_SIZE, "
                                 "e.g. bpe:4096") from None
    path = Path(spec)
    if path.is_dir() or path.suffix == ".json" or path.with_suffix(".json").is_file():
        return Spec("saved", spec, path=path)
    if path.suffix == ".tiktoken" and path.is_file():
        return Spec("file", spec, path=path)
    raise TokenizerError(f"unknown tokenizer {spec!r}: expected one of {', '.join(PRETRAINED)}, "
                         "byte, char, bpe:N, a .tiktoken file or a saved tokenizer directory")


# ---- the tokenizer ----

class Tokenizer:
    """Text <-> ids. Backed by tiktoken (`ranks` given), by a sorted character list (`chars` given)
    or by a Hugging Face `tokenizers` file (`hf_json`, its text: see from_hf)."""

    def __init__(self, name: str, *, pattern: str = "", ranks: dict[bytes, int] | None = None,
                 chars: Sequence[str] | None = None, specials: dict[str, int] | None = None,
                 hf_json: str | None = None, chat_format: str = "jaxgpt", default_system: str = ""):
        self.name, self.pattern, self.ranks, self.hf_json = name, pattern, ranks, hf_json
        # how chat.py lays conversations out: jaxgpt's, or an imported chat model's (CHAT_FORMATS),
        # and the system message that model's template writes when a conversation has none
        self.chat_format, self.default_system = chat_format, default_system
        self._lengths: np.ndarray | None = None
        if ranks is None and chars is None and hf_json is None:
            raise TokenizerError(f"Tokenizer({name!r}) needs ranks or chars; to build a tokenizer "
                                 f"by name use Tokenizer.from_spec({name!r})")
        self._chars = list(chars) if chars is not None else None
        self._hf = load_hf_tokenizer(name, hf_json) if hf_json is not None else None
        n_base = (self._hf.get_vocab_size(with_added_tokens=True) if self._hf is not None else
                  max(ranks.values(), default=-1) + 1 if ranks is not None else
                  len(self._chars or ()))
        self.specials = _with_chat_specials(specials or {}, n_base)
        self._special_ids = frozenset(self.specials.values())
        self.eot_id, self.bos_id = self.specials["<|endoftext|>"], self.specials["<|bos|>"]
        if self._hf is not None:
            self.n_vocab = max(n_base, max(self._special_ids) + 1)
            self._hf_size = n_base
            # ids past the HF vocabulary are chat specials jaxgpt added: decoded by name
            self._added_names = {i: t for t, i in self.specials.items() if i >= n_base}
            self._hf_bytes = hf_token_bytes(self._hf, hf_json) + [b""] * (self.n_vocab - n_base)
        elif ranks is not None:
            if len(set(ranks.values())) != len(ranks):  # tiktoken would panic: no except catches it
                raise TokenizerError(f"'{name}': the ranks file gives two tokens the same rank")
            self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self.specials)
            self.n_vocab = self._enc.n_vocab
        else:
            if not all(len(c) == 1 for c in self._chars):
                raise TokenizerError(f"'{name}': a char tokenizer's chars must be single "
                                     "characters")
            self.n_vocab = len(self._chars) + len(self.specials)
            # A table indexed by code point turns encoding into one numpy gather.
            codes = np.array([ord(c) for c in self._chars], dtype=np.int64)
            self._lut = np.full(int(codes.max(initial=-1)) + 1, -1, dtype=np.int64)
            self._lut[codes] = np.arange(len(codes))
            self._pieces = self._chars + sorted(self.specials, key=self.specials.__getitem__)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"

    # -- encoding and decoding --
    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return (self._enc.encode_ordinary(text) if self.ranks is not None
                else self.encode_np(text).tolist())

    def encode_np(self, text: str) -> np.ndarray:
        if self._hf is not None:
            return np.asarray(self.encode(text), np.uint32)
        if self.ranks is not None:  # disallowed_special=() encodes special-token strings as text
            return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._lut), self._lut[np.minimum(codes, len(self._lut) - 1)], -1)
        if (bad := np.flatnonzero(ids < 0)).size:
            i = int(bad[0])
            raise TokenizerError(f"character {text[i]!r} at position {i} is not in the "
                                 f"'{self.name}' vocabulary ({len(self._chars)} characters)")
        return ids.astype(np.uint32)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        if self._hf is not None:  # threads: the tokenizers library's own (RAYON_NUM_THREADS)
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        if self.ranks is not None:
            return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        if (bad := np.flatnonzero((arr < 0) | (arr >= self.n_vocab))).size:
            raise TokenizerError(f"token id {int(arr[bad[0]])} is outside the vocabulary of "
                                 f"'{self.name}' (ids 0..{self.n_vocab - 1}, "
                                 f"n_vocab={self.n_vocab})")
        if self._hf is not None:  # runs of HF ids through HF's decoder, ids jaxgpt added by name
            return "".join(self._hf.decode(list(run), skip_special_tokens=False) if inside else
                           "".join(self._added_names.get(i, "") for i in run)
                           for inside, run in itertools.groupby(arr.tolist(),
                                                                lambda i: i < self._hf_size))
        if self.ranks is None:
            return "".join(map(self._pieces.__getitem__, arr.tolist()))
        try:
            return self._enc.decode(arr.tolist())
        except KeyError as e:  # an unused id inside range, e.g. cl100k's gap before <|endofprompt|>
            raise TokenizerError(f"'{self.name}': {e.args[0]} (n_vocab={self.n_vocab})") from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of ids, special tokens left out: a token may end inside a character,
        which is why streamed text is decoded from bytes (see replies.TextStream)."""
        ids = [int(i) for i in ids if not self.is_special(i)]
        if self._hf is not None:
            return b"".join(map(self._hf_bytes.__getitem__, ids))
        if self.ranks is None:
            return self.decode(ids).encode("utf-8")
        return self._enc.decode_bytes(ids)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for (0 for special tokens), for bits per byte."""
        if self._lengths is None:
            lengths = np.zeros(self.n_vocab, np.int64)
            if self._hf is not None:
                lengths[:] = [len(b) for b in self._hf_bytes]
                lengths[list(self._special_ids)] = 0
            elif self.ranks is None:
                lengths[:len(self._chars)] = [len(c.encode("utf-8")) for c in self._chars]
            else:
                for token, rank in self.ranks.items():
                    lengths[rank] = len(token)
            self._lengths = lengths
        return self._lengths

    # -- special tokens --
    def special_id(self, token: str) -> int:
        if token not in self.specials:
            known = ", ".join(self.specials)
            raise TokenizerError(f"{token!r} is not a special token of '{self.name}'; "
                                 f"known: {known}")
        return self.specials[token]

    def is_special(self, id: int) -> bool:  # noqa: A002 - the interface's name
        return int(id) in self._special_ids

    # -- identity and persistence --
    def _definition(self) -> dict:
        """Everything that fixes the ids except the ranks themselves (and the name, which doesn't);
        a chat format other than jaxgpt's and a default system message (they change the ids of
        conversations); left out when unset, so older files keep their fingerprints."""
        fmt = {} if self.chat_format == "jaxgpt" else {"chat_format": self.chat_format}
        fmt |= {"default_system": self.default_system} if self.default_system else {}
        if self._hf is not None:
            return {"kind": "hf", "special_tokens": self.specials, **fmt}
        if self.ranks is None:
            return {"kind": "char", "chars": "".join(self._chars), "special_tokens": self.specials,
                    **fmt}
        return {"kind": "tiktoken", "pattern": self.pattern, "special_tokens": self.specials,
                **fmt}

    def _ranks_bytes(self) -> bytes:  # the standard .tiktoken format: base64 token, space, rank
        items = sorted(self.ranks.items(), key=lambda kv: kv[1])
        return b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in items)

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self._definition(), sort_keys=True,
                                      ensure_ascii=True).encode())
        if self.ranks is not None:
            h.update(self._ranks_bytes())
        if self._hf is not None:
            h.update(self.hf_json.encode("utf-8"))
        return h.hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json (+ tokenizer.tiktoken, or the HF file as hf_tokenizer.json) into
        `directory`; returns the json's path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "name": self.name, **self._definition(),
                "fingerprint": self.fingerprint}
        if self._hf is not None:
            files.atomic_write(directory / "hf_tokenizer.json", self.hf_json)
            meta["hf_file"] = "hf_tokenizer.json"
        if self.ranks is not None:
            files.atomic_write(directory / "tokenizer.tiktoken", self._ranks_bytes())
            meta["ranks_file"] = "tokenizer.tiktoken"
        return files.write_json(directory / "tokenizer.json", meta)  # last: it names the ranks file

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path.with_suffix(".json")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise TokenizerError(f"{path} is not a jaxgpt tokenizer "
                                     f"(format {meta.get('format')!r})")
            common = dict(specials=meta["special_tokens"],
                          chat_format=meta.get("chat_format", "jaxgpt"),
                          default_system=meta.get("default_system", ""))
            if meta["kind"] == "char":
                tok = cls(meta["name"], chars=meta["chars"], **common)
            elif meta["kind"] == "hf":
                hf_json = (path.parent / meta["hf_file"]).read_text(encoding="utf-8")
                tok = cls(meta["name"], hf_json=hf_json, **common)
            else:
                ranks = vocabularies.parse_ranks((path.parent / meta["ranks_file"]).read_bytes())
                tok = cls(meta["name"], pattern=meta["pattern"], ranks=ranks, **common)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"cannot load tokenizer from {path}: "
                                 f"{type(e).__name__}: {e}") from None
        if tok.fingerprint != meta.get("fingerprint"):
            raise TokenizerError(f"{path}: fingerprint mismatch, the tokenizer files were "
                                 "modified or mixed up")
        return tok

    # -- constructors --
    @classmethod
    def from_spec(cls, spec: str, corpus: str | None = None) -> Tokenizer:
        """The tokenizer a spec names (see parse_spec); char and bpe:N are built from `corpus`."""
        parsed = parse_spec(spec)
        if parsed.kind == "pretrained":
            official, (url, sha256) = vocabularies.tiktoken_definition(spec)
            return cls(spec, pattern=official["pat_str"],
                       ranks=vocabularies.pretrained_ranks(spec, url, sha256),
                       specials=official["special_tokens"])
        if parsed.kind == "byte":
            # No merges, so the split pattern cannot change the ids; gpt2's is as good as any.
            return cls("byte", pattern=openai_public.r50k_pat_str,
                       ranks={bytes([i]): i for i in range(256)})
        if parsed.kind in ("char", "bpe"):
            if not corpus:
                raise TokenizerError(f"tokenizer '{spec}' is built from a training text, but none "
                                     "was given: name the run or prepared directory that holds it "
                                     "(or give encode.corpus=FILE)")
            if parsed.kind == "char":
                return cls("char", chars=sorted(set(corpus)))
            return cls.train_bpe([corpus], parsed.vocab_size)
        if parsed.kind == "saved":
            return cls.load(parsed.path)
        path = parsed.path  # bare ranks: official rules if the name is known
        stem = path.name.removesuffix(".tiktoken")
        official = (vocabularies.tiktoken_definition(stem)[0]
                    if stem in openai_public.ENCODING_CONSTRUCTORS else {})
        try:
            ranks = vocabularies.read_ranks(path, None)
        except ValueError as e:
            raise TokenizerError(f"{path} is not a .tiktoken file ({e})") from None
        return cls(stem, pattern=official.get("pat_str", gpt4_pattern()), ranks=ranks,
                   specials=official.get("special_tokens", {}))

    @classmethod
    def from_hf(cls, hf_json: str, name: str, eos_id: int | None = None, bos_id: int | None = None,
                chat_format: str = "jaxgpt", default_system: str = "") -> Tokenizer:
        """A Hugging Face `tokenizers` file (its JSON text), encoding as HF does without
        add_special_tokens. Its special added tokens stay special; <|endoftext|> and <|bos|> are the
        model's own eos and bos ids where it has them, each other chat special the added token of
        the same name where there is one; the rest get new ids after the vocabulary. chat_format
        and default_system: how the model's chat template lays conversations out (Tokenizer)."""
        try:
            added = [t for t in json.loads(hf_json).get("added_tokens", []) if t.get("special")]
        except ValueError as e:
            raise TokenizerError(f"'{name}': not a tokenizers JSON file ({e})") from None
        specials = {t["content"]: t["id"] for t in added}
        for ours, theirs in (("<|endoftext|>", eos_id), ("<|bos|>", bos_id)):
            if theirs is not None:
                specials.setdefault(ours, theirs)
        return cls(name, hf_json=hf_json, specials=specials, chat_format=chat_format,
                   default_system=default_system)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, name: str | None = None) -> Tokenizer:
        """Byte-level BPE trained on GPT-4's split pattern; vocab_size counts bytes and specials."""
        import rustbpe  # only training needs it

        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise TokenizerError(f"vocab_size {vocab_size} is too small: BPE needs 256 byte tokens "
                                 f"+ {len(SPECIAL_TOKENS)} special tokens = "
                                 f"{256 + len(SPECIAL_TOKENS)} at least")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), n_merged, pattern=gpt4_pattern())
        ranks = dict(bpe.get_mergeable_ranks())
        if len(ranks) < n_merged:
            warnings.warn(f"the corpus only supports {len(ranks)} merged tokens; n_vocab is "
                          f"{len(ranks) + len(SPECIAL_TOKENS)} instead of {vocab_size}",
                          stacklevel=2)
        return cls(name or f"bpe:{vocab_size}", pattern=gpt4_pattern(), ranks=ranks)


@functools.cache
def gpt4_pattern() -> str:
    """cl100k_base's split pattern, the one BPE training and bare .tiktoken files use."""
    return vocabularies.tiktoken_definition("cl100k_base")[0]["pat_str"]
