"""A Hugging Face model's tokenizer read in as jaxgpt's Tokenizer, and written back out.

GPT-2's own vocabulary becomes tiktoken's gpt2 encoding, any other tokenizer.json is read by the
`tokenizers` library (tokenizer.py's hf kind). jaxgpt's chat specials take the model's eos, bos and
same-named tokens, the rest new ids after its vocabulary (weights.pad_vocab gives them rows). Out
again, tokenizer.json gains the specials a trained model kept; a tiktoken encoding is written as a
tokenizers file of its own.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from jaxgpt import files
from jaxgpt.data import chat
from jaxgpt.data.hf_tokenizer import byte_level_chars, load_hf_tokenizer
from jaxgpt.data.tokenizer import FORMAT, SPECIAL_TOKENS, Tokenizer
from jaxgpt.data.vocabularies import tiktoken_definition
from jaxgpt.store.hf.config import ConvertError, require


def _gpt2_sha256() -> str:
    return tiktoken_definition("gpt2")[1][1]  # tiktoken's record of GPT-2's ranks file


# ---- reading ----

def as_gpt2(spec: dict) -> Tokenizer | None:
    """tiktoken's gpt2 encoding when a tokenizer.json holds GPT-2's own vocabulary: its byte-level
    pieces, written as a .tiktoken ranks file, hash to the official file's sha256. Nothing is
    guessed, and nothing downloaded: the encoding is Tokenizer.from_spec("gpt2")'s, from the
    model's files."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return None
    added, chars = {t["content"] for t in spec.get("added_tokens", [])}, byte_level_chars()
    pieces = [(piece, i) for piece, i in model.get("vocab", {}).items() if piece not in added]
    if not all(c in chars for piece, _ in pieces for c in piece):
        return None
    ranks = {bytes(chars[c] for c in piece): i for piece, i in pieces}
    data = b"".join(base64.b64encode(t) + b" %d\n" % r
                    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    if hashlib.sha256(data).hexdigest() != _gpt2_sha256():
        return None
    official = tiktoken_definition("gpt2")[0]
    return Tokenizer("gpt2", pattern=official["pat_str"], ranks=ranks,
                     specials=official["special_tokens"])


def _role_id(role: str, hf: dict, tok_cfg: dict, hf_tok) -> int | None:
    """The model's own eos / bos id: config.json's {role}_token_id (the first of a list), else the
    token tokenizer_config.json names; None when the tokenizer has neither."""
    value = hf.get(f"{role}_token_id")
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, int) and 0 <= value < hf_tok.get_vocab_size(with_added_tokens=True):
        return value
    name = tok_cfg.get(f"{role}_token")
    name = name.get("content") if isinstance(name, dict) else name
    return hf_tok.token_to_id(name) if isinstance(name, str) else None


def tokenizer_for(directory: Path, hf: dict, spec: str, name: str) -> Tokenizer | None:
    """The tokenizer of a HF model: from_hf.tokenizer when given (a HF tokenizer.json, a directory
    holding one, or a jaxgpt spec), else the model's own files; None when it has none."""
    if spec:
        file = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
        if not (file.suffix == ".json" and file.is_file()
                and files.read_json(file).get("format") != FORMAT):
            return Tokenizer.from_spec(spec)
        directory, hf_json = file.parent, file.read_text(encoding="utf-8")
    elif (directory / "tokenizer.json").is_file():
        hf_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
    elif old := [n for n in ("vocab.json", "tokenizer.model") if (directory / n).is_file()]:
        raise ConvertError(f"{directory / old[0]}: only tokenizer.json is read; write one with "
                           f"transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    else:
        return None
    try:
        parsed = json.loads(hf_json)
    except ValueError as e:
        raise ConvertError(f"{directory / 'tokenizer.json'}: not JSON ({e})") from None
    if (gpt2 := as_gpt2(parsed)) is not None:
        return gpt2
    hf_tok = load_hf_tokenizer(name, hf_json)  # the ids of named tokens; its errors are one line
    tok_cfg = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        tok_cfg.update(files.read_json(directory / extra) if (directory / extra).is_file() else {})
    chat_format, default_system = chat_format_of(directory, tok_cfg, parsed)
    return Tokenizer.from_hf(hf_json, name, _role_id("eos", hf, tok_cfg, hf_tok),
                             _role_id("bos", hf, tok_cfg, hf_tok), chat_format, default_system)


def chat_format_of(directory: Path, tok_cfg: dict, hf_json: dict) -> tuple[str, str]:
    """template_chat_format of the model's own template (tokenizer_config.json's chat_template, or
    the chat_template.jinja transformers 5 writes) and the tokenizer's special tokens."""
    template = tok_cfg.get("chat_template")
    if not template and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    specials = {t.get("content") for t in hf_json.get("added_tokens", []) if t.get("special")}
    return template_chat_format(template, specials)


def template_chat_format(template: str | None, specials: set[str]) -> tuple[str, str]:
    """(chat format, default system message) of a jinja chat template, for any converter: the
    format is one of chat.CHAT_FORMATS whose special tokens the template writes and `specials`
    holds, jaxgpt's own when there is no template or another one; the default system message is
    what the template writes as one when a conversation has none ("" if it writes nothing)."""
    if not isinstance(template, str):  # absent, or a list of named templates (tool use): not read
        return "jaxgpt", ""
    for name in ("chatml", "llama3"):
        fmt = chat.CHAT_FORMATS[name]
        if all(t in template for t in fmt.tokens(bos=False)) and fmt.tokens() <= specials:
            return name, default_system_of(template)
    return "jaxgpt", ""  # the template is not followed, so neither is its default


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' own: jinja's tojson escapes HTML characters, which chat templates never want
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    raise require("jinja2").TemplateError(message)


def default_system_of(template: str) -> str:
    """The system message a chat template writes when a conversation has none: the text that a
    user's message alone renders with where a system message's content goes (the same text before
    and after it); "" when there is none, or the template fails or has another shape. Rendered as
    transformers renders (a sandbox, blocks trimmed), bos and eos as "", no generation prompt."""
    env = require("jinja2.sandbox").ImmutableSandboxedEnvironment(  # a missing jinja2 is an error
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"], env.globals["raise_exception"] = _tojson, _raise_exception
    user = {"role": "user", "content": "PROBE"}
    try:
        alone, with_system = (
            env.from_string(template).render(messages=messages, bos_token="", eos_token="",
                                             add_generation_prompt=False)
            for messages in ([user], [{"role": "system", "content": "SYSPROBE"}, user]))
    except Exception:  # noqa: BLE001 - a template is arbitrary code; failing, it gives no default
        return ""
    if with_system.count("SYSPROBE") != 1:
        return ""
    before, after = with_system.split("SYSPROBE")
    if (len(alone) < len(before) + len(after) or not alone.startswith(before)
            or not alone.endswith(after)):
        return ""
    return alone[len(before):len(alone) - len(after)]


# ---- writing ----

def tiktoken_json(tok: Tokenizer) -> str:
    """A tiktoken-backed tokenizer (gpt2, cl100k_base, a trained bpe:N) as a tokenizers file: its
    split pattern, byte-level pieces and the merges that rebuild its ranks (a token is the merge of
    the two parts that BPE over its own bytes ends in), whole pieces looked up first as tiktoken
    does."""
    ranks, to_char = tok.ranks, {b: c for c, b in byte_level_chars().items()}
    piece = lambda bs: "".join(to_char[b] for b in bs)  # noqa: E731
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            i = min(range(len(parts) - 1),
                    key=lambda j: ranks.get(parts[j] + parts[j + 1], 1 << 62))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append([piece(parts[0]), piece(parts[1])])
    specials = sorted({i: t for t, i in tok.specials.items()}.items())
    split = {"type": "Split", "pattern": {"Regex": tok.pattern},
             "behavior": "Isolated", "invert": False}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "post_processor": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, t in specials],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, {
            "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {piece(t): r for t, r in ranks.items()}, "merges": merges}},
        ensure_ascii=False)


def write_tokenizer(out: Path, tok: Tokenizer | None, kept: dict[str, Path], V: int,
                    seq_len: int) -> str | None:
    """tokenizer.json (+ tokenizer_config.json) for transformers' AutoTokenizer, with jaxgpt's
    chat specials below id V added where the file lacks them; None when there is no such form (a
    char table)."""
    if tok is not None and tok.hf_json is not None:
        hf_json = tok.hf_json
    elif tok is not None and "tokenizer.json" in kept:  # GPT-2's, read as tiktoken's gpt2
        hf_json = kept["tokenizer.json"].read_text(encoding="utf-8")
    elif tok is not None and tok.ranks is not None:
        hf_json = tiktoken_json(tok)
    else:
        return None
    tokenizers = require("tokenizers")
    hf_tok = tokenizers.Tokenizer.from_str(hf_json)
    for i, token in sorted((tok.special_id(t), t) for t in SPECIAL_TOKENS):
        if hf_tok.get_vocab_size(with_added_tokens=True) <= i < V:
            hf_tok.add_special_tokens([tokenizers.AddedToken(token, special=True,
                                                             normalized=False)])
            if hf_tok.token_to_id(token) != i:
                raise ConvertError(f"{token} would be id {hf_tok.token_to_id(token)} in "
                                   f"tokenizer.json but is {i} in the model "
                                   f"(ids missing before it)")
            hf_json = hf_tok.to_str()
    files.atomic_write(out / "tokenizer.json", hf_json)
    if "tokenizer_config.json" not in kept:
        files.write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
            "clean_up_tokenization_spaces": False,
            "bos_token": hf_tok.id_to_token(tok.bos_id),
            "eos_token": hf_tok.id_to_token(tok.eot_id)})
    return tok.name
