"""A GGUF's tokenizer keys <-> a Hugging Face `tokenizers` JSON text (tokenizer.py's hf kind).

Reading: tokenizer.ggml.model "gpt2" is byte-level BPE whose split regexes come from llama.cpp's
table of pre-tokenizers (src/llama-vocab.cpp) by tokenizer.ggml.pre; "llama" is SentencePiece, read
as transformers' GGUF loader does (BPE with byte fallback, merges rebuilt from the scores). Writing:
a byte-level BPE tokenizer (HF-backed, or tiktoken's through tokenizers JSON) becomes model "gpt2"
with the pre-tokenizer whose regexes are its own; jaxgpt's chat specials are CONTROL tokens.
"""
from __future__ import annotations

import collections
import json

from jaxgpt.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from jaxgpt.store.gguf.writer import add_value
from jaxgpt.store.hf.config import ConvertError
from jaxgpt.store.hf.tokenizer import tiktoken_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType

# The split regexes as the models' own tokenizer.json files spell them (llama.cpp's table keeps
# them in comments beside the forms its std::regex can run, which behave the same).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
         rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT, DIGITS, THREE = r"\p{N}", r"\p{N}+", "[0-9][0-9][0-9]"

# llama.cpp's pre-tokenizers: name -> (the regexes applied in turn, ignore_merges: a piece that is
# a whole token is that token). The first name of a group is the one written.
_GROUPS = [
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "gigachat", "a.x-4.0", "mellum", "exaone4",
      "trillion", "granite-docling"), (GPT2,), False),
    (("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
      "jina-v5-nano"), (LLAMA3,), True),
    (("smaug-bpe", "dbrx"), (LLAMA3,), False),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
      "solar-open"), (QWEN2,), False),
    (("qwen35",), (QWEN35,), False),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
      "mellum2"), (DIGIT, GPT2), False),
    (("tekken",), (TEKKEN,), True),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (GPT4O,), False),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, THREE), False),
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", GPT2, DIGITS, THREE), False),
]
PRE_TOKENIZERS = {name: (regexes, ignore) for names, regexes, ignore in _GROUPS for name in names}

# Other spellings of the same splits, read when writing: llama.cpp's adapted forms (its regex
# engine lacks (?i:) and \p{Lu}), tiktoken's gpt2 and cl100k_base patterns (possessive forms).
_ADAPTED = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_ALIASES = {
    GPT2.removesuffix(r"|\s+"): GPT2,
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s": GPT2,
    LLAMA3.replace(_CONTRACTIONS, _ADAPTED): LLAMA3,
    QWEN2.replace(_CONTRACTIONS, _ADAPTED): QWEN2,
    QWEN35.replace(_CONTRACTIONS, _ADAPTED): QWEN35,
    (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"
     r"|\s++$|\s*[\r\n]|\s+(?!\S)|\s"): LLAMA3,
    (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?"
     r"((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
     r"|\s*[\r\n]+|\s+(?!\S)|\s+"): TEKKEN,
}


# ---- reading ----

def _list(meta: dict, key: str, where: str, n: int | None = None) -> list:
    value = meta.get(key)
    if not isinstance(value, list) or (n is not None and len(value) != n):
        what = "missing" if value is None else f"not a list of {n}" if n else "not a list"
        raise ConvertError(f"{where}: {key} is {what}")
    return value


def _split_merge(merge: str, where: str) -> list[str]:
    at = merge.find(" ", 1)  # as llama.cpp splits them: the first part may start with a space
    if at < 0:
        raise ConvertError(f"{where}: tokenizer.ggml.merges holds {merge!r}, not two tokens")
    return [merge[:at], merge[at + 1:]]


def _added(tokens: list[str], types: list[int], special: tuple[int, ...]) -> list[dict]:
    """CONTROL (and UNKNOWN) tokens as special added tokens, USER_DEFINED ones as plain added
    tokens: matched whole in the text, as llama.cpp does."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind in special}
            for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind in (*special, USER_DEFINED)]


def _bpe(vocab: dict, merges: list, **options) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, **options, "vocab": vocab, "merges": merges}


def hf_json_of(meta: dict, where: str) -> str:
    """The tokenizers JSON text of a GGUF's tokenizer keys (`meta`: key -> field.contents());
    `where` names the file in errors."""
    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise ConvertError(f"{where}: tokenizer.ggml.model={model!r} is not read (jaxgpt reads "
                           f"gpt2, byte-level BPE, and llama, SentencePiece)")
    tokens = _list(meta, "tokenizer.ggml.tokens", where)
    types = (_list(meta, "tokenizer.ggml.token_type", where, len(tokens))
             if "tokenizer.ggml.token_type" in meta else [NORMAL] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        twice = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise ConvertError(f"{where}: tokenizer.ggml.tokens holds {twice!r} twice")
    spec = (_byte_level(meta, where, vocab) if model == "gpt2"
            else _sentencepiece(meta, where, tokens, vocab))
    special = (CONTROL,) if model == "gpt2" else (CONTROL, UNKNOWN)
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
            "post_processor": None, "added_tokens": _added(tokens, types, special), **spec}
    return json.dumps(spec, ensure_ascii=False)


def _byte_level(meta: dict, where: str, vocab: dict) -> dict:
    pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp's choice when it is absent
    if pre not in PRE_TOKENIZERS:
        raise ConvertError(f"{where}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer jaxgpt "
                           f"reads (it reads gpt-2, llama-bpe, qwen2, smollm, tekken, gpt-4o, "
                           f"default and their llama.cpp aliases)")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [_split_merge(m, where) for m in _list(meta, "tokenizer.ggml.merges", where)]
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in regexes]
    return {
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, {
            "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": _bpe(vocab, merges, ignore_merges=ignore_merges)}


def _sentencepiece(meta: dict, where: str, tokens: list[str], vocab: dict) -> dict:
    """BPE with byte fallback over U+2581-spelled pieces, as transformers' LlamaTokenizer; the
    file's merges, or merges rebuilt from the scores (best first) when it has none."""
    arch = meta.get("general.architecture")
    if arch in ("gemma", "gemma2", "gemma3", "phi3"):  # transformers builds theirs otherwise
        raise ConvertError(f"{where}: general.architecture={arch!r} with tokenizer.ggml.model "
                           f"'llama': only Llama's own SentencePiece layout is read")
    if "tokenizer.ggml.merges" in meta:
        merges = [_split_merge(m, where) for m in _list(meta, "tokenizer.ggml.merges", where)]
    else:
        merges = _merges_of(vocab, _list(meta, "tokenizer.ggml.scores", where, len(tokens)))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default for llama
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "first" if prefix else "never", "split": False},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": _bpe(vocab, merges, fuse_unk=True, byte_fallback=True)}


def _merges_of(vocab: dict[str, int], scores: list[float]) -> list[list[str]]:
    """Every split of a token into two tokens, ordered by the token's score (best first), then
    the longer left part, then the longer right one: transformers' generate_merges."""
    merges = []
    for piece, score in zip(vocab, scores, strict=True):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[left, right] for left, right, _ in merges]


def role_ids(meta: dict) -> tuple[int | None, int | None]:
    """(eos, bos): the GGUF's tokenizer.ggml.eos_token_id and bos_token_id, None where absent or
    outside its tokens."""
    n = len(meta.get("tokenizer.ggml.tokens") or ())
    ids = (meta.get(f"tokenizer.ggml.{role}_token_id") for role in ("eos", "bos"))
    eos, bos = (i if isinstance(i, int) and 0 <= i < n else None for i in ids)
    return eos, bos


# ---- writing ----

def _regexes(pre, name: str) -> list[str]:
    """The split regexes a byte-level pre-tokenizer applies in turn, its ByteLevel step last."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    out = []
    for i, step in enumerate(steps):
        kind = (step or {}).get("type")
        if kind == "ByteLevel" and i == len(steps) - 1 and not step.get("add_prefix_space"):
            return out + ([GPT2] if step.get("use_regex", True) else [])
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") \
                and "Regex" in step.get("pattern", {}):
            out.append(step["pattern"]["Regex"])
        elif kind == "Digits":
            out.append(DIGIT if step.get("individual_digits") else DIGITS)
        else:
            break
    raise ConvertError(f"tokenizer {name}: pre_tokenizer={json.dumps(pre)} is not byte-level BPE's "
                       f"regex splits then ByteLevel, which llama.cpp's pre-tokenizers are")


def _pre_name(spec: dict, name: str) -> str:
    """llama.cpp's name for the tokenizer's split regexes (and its ignore_merges where two names
    differ only in that)."""
    regexes = tuple(_ALIASES.get(r, r) for r in _regexes(spec.get("pre_tokenizer"), name))
    ignore = bool(spec["model"].get("ignore_merges"))
    named = [(names[0], i) for names, rs, i in _GROUPS if rs == regexes]
    if not named:
        raise ConvertError(f"tokenizer {name}: pre_tokenizer regexes {json.dumps(regexes)} are "
                           f"none of llama.cpp's pre-tokenizers")
    return next((n for n, i in named if i == ignore), named[0][0])


def _checked(spec: dict, name: str) -> dict:
    """The BPE model of a byte-level tokenizers file, refused by its key where llama.cpp's gpt2
    model cannot run it."""
    model, normalizer = spec.get("model") or {}, spec.get("normalizer")
    problems = [
        ("model.type", model.get("type"), model.get("type") == "BPE"),
        ("model.byte_fallback", model.get("byte_fallback"), not model.get("byte_fallback")),
        ("model.continuing_subword_prefix", model.get("continuing_subword_prefix"),
         not model.get("continuing_subword_prefix")),
        ("model.end_of_word_suffix", model.get("end_of_word_suffix"),
         not model.get("end_of_word_suffix")),
        # llama.cpp's own converter drops Qwen2's NFC too: it changes no text already in NFC
        ("normalizer", normalizer, normalizer is None or normalizer.get("type") == "NFC"),
        ("decoder", spec.get("decoder"), "ByteLevel" in json.dumps(spec.get("decoder")))]
    for key, value, ok in problems:
        if not ok:
            raise ConvertError(f"tokenizer {name}: {key}={json.dumps(value)}: llama.cpp's gpt2 "
                               f"tokenizer is byte-level BPE (no normalizer, no byte fallback)")
    return model


def _merge_text(merge, name: str) -> str:
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    if " " in left or " " in right:
        raise ConvertError(f"tokenizer {name}: model.merges holds {merge!r}, which a GGUF's "
                           f"space-separated merges cannot hold")
    return f"{left} {right}"


def gguf_fields(tok: Tokenizer, n_vocab: int, *, eos_id: int | None = None,
                bos_id: int | None = None) -> dict[str, object]:
    """The GGUF tokenizer keys of a jaxgpt tokenizer, for a model of n_vocab ids: byte-level BPE
    (HF-backed or tiktoken's) as tokenizer.ggml.model "gpt2"; ids no token has are "[PAD{id}]",
    UNUSED; jaxgpt's chat specials at n_vocab or past it are left out. eos and bos: tok's own
    unless given."""
    if tok.hf_json is None and tok.ranks is None:
        raise ConvertError(f"tokenizer {tok.name}: llama.cpp has no character tokenizer; train "
                           f"a bpe:N tokenizer for a model to run in llama.cpp")
    spec = json.loads(tok.hf_json if tok.hf_json is not None else tiktoken_json(tok))
    model = _checked(spec, tok.name)
    names: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model.get("vocab", {}).items()}
    for added in spec.get("added_tokens", []):
        names[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    for token, i in tok.specials.items():  # jaxgpt's chat specials past the file's vocabulary
        names.setdefault(i, (token, CONTROL))
    # as in a Hugging Face export: chat specials the model has no rows for are left out
    names = {i: v for i, v in names.items() if i < n_vocab or v[0] not in SPECIAL_TOKENS}
    if max(names, default=-1) >= n_vocab:
        raise ConvertError(f"tokenizer {tok.name}: id {max(names)} ({names[max(names)][0]!r}) "
                           f"is past the model's {n_vocab} embedding rows")
    tokens, types = zip(*(names.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n_vocab)), strict=True)
    if len(set(tokens)) != n_vocab:
        twice = next(t for t, n in collections.Counter(tokens).items() if n > 1)
        raise ConvertError(f"tokenizer {tok.name}: {twice!r} is two ids, which llama.cpp refuses")
    roles = {"tokenizer.ggml.bos_token_id": tok.bos_id if bos_id is None else bos_id,
             "tokenizer.ggml.eos_token_id": tok.eot_id if eos_id is None else eos_id}
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(spec, tok.name),
        "tokenizer.ggml.tokens": list(tokens), "tokenizer.ggml.token_type": list(types),
        "tokenizer.ggml.merges": [_merge_text(m, tok.name) for m in model.get("merges", [])],
        **{key: i for key, i in roles.items() if 0 <= i < n_vocab},  # a left-out special: none
        "tokenizer.ggml.add_bos_token": False}


# GGUFWriter's typed method for each key gguf_fields (or a caller) writes
_WRITERS = {
    "tokenizer.ggml.model": "add_tokenizer_model", "tokenizer.ggml.pre": "add_tokenizer_pre",
    "tokenizer.ggml.tokens": "add_token_list", "tokenizer.ggml.token_type": "add_token_types",
    "tokenizer.ggml.merges": "add_token_merges", "tokenizer.ggml.scores": "add_token_scores",
    "tokenizer.ggml.bos_token_id": "add_bos_token_id",
    "tokenizer.ggml.eos_token_id": "add_eos_token_id",
    "tokenizer.ggml.add_bos_token": "add_add_bos_token",
    "tokenizer.chat_template": "add_chat_template"}


def write_fields(writer, fields: dict[str, object]) -> None:
    """Each key of `fields` through a gguf.GGUFWriter's typed method: the named one above, else by
    the value's type (writer.add_value)."""
    for key, value in fields.items():
        if key in _WRITERS:
            getattr(writer, _WRITERS[key])(value)
        else:
            add_value(writer, key, value)
