"""Tests for jaxgpt/store/gguf/tokenizer.py: the real SmolLM2 GGUF's tokenizer against transformers
reading the same file, tokenizers written to a GGUF and read back, SentencePiece files, and the
errors a user can fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.data.vocabularies import tiktoken_definition
from jaxgpt.errors import TokenizerError
from jaxgpt.store.gguf import tokenizer as gguf_tok
from jaxgpt.store.hf.config import ConvertError
from jaxgpt.store.hf.tokenizer import tiktoken_json

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

EXTRA = ["In 1912, 3.14159 and 1,000,000", "北京是中国的首都，人口超过两千万。",
         "emoji 🎉👍🏽 and a flag 🇫🇷!", "a   b\t\tc\n\n\nd  \n e", "trailing   ", "line\n  ",
         "hi\n \n ", "I'm sure they'll; WE'VE", "Ünïcödé ÀB cd Éé", "x=1+2*3 <= $4 ^ ~y | `z`",
         "naïve café — «quotes» …", "def f():\n    return [1, 2]\n"]
SMOL_NUMBERS = [788, 216, 33, 41, 33, 34, 28, 216, 35, 30, 33, 36, 33, 37, 41, 284, 216, 33, 28,
                32, 32, 32, 28, 32, 32, 32]  # "In 1912, 3.14159 and 1,000,000": one id a digit


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """1,000 distinct chitchat lines (the chitchat_dataset package's dialogs), then EXTRA."""
    chitchat = pytest.importorskip("chitchat_dataset")
    dialogs = json.loads(Path(chitchat.__file__).with_name("dataset.json").read_text("utf-8"))
    lines: dict[str, None] = {}
    for dialog in dialogs.values():
        for message in dialog["messages"]:
            lines.update((u["text"], None) for u in message if u["text"].strip())
        if len(lines) >= 1000:
            break
    return list(lines)[:1000] + EXTRA


def read_meta(path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def write_gguf(path: Path, fields: dict) -> Path:
    """A GGUF holding general.architecture and `fields` alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_tok.write_fields(writer, fields)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_tokenizer(path: Path, name: str = "back") -> Tokenizer:
    meta = read_meta(path)
    return Tokenizer.from_hf(gguf_tok.hf_json_of(meta, str(path)), name, *gguf_tok.role_ids(meta))


def differences(a: Tokenizer, b, texts: list[str]) -> list[str]:
    """The texts two tokenizers give different ids (b: a jaxgpt Tokenizer or transformers')."""
    ids = (b.encode if isinstance(b, Tokenizer) else
           lambda t: b(t, add_special_tokens=False)["input_ids"])
    return [t for t in texts if a.encode(t) != ids(t)]


@pytest.fixture(scope="module")
def smol_meta(smollm2_gguf) -> dict:
    return read_meta(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf, smol_meta) -> Tokenizer:
    hf_json = gguf_tok.hf_json_of(smol_meta, str(smollm2_gguf))
    return Tokenizer.from_hf(hf_json, "smollm2", *gguf_tok.role_ids(smol_meta))


@pytest.fixture(scope="module")
def hf_smol(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent),
                                                      gguf_file=smollm2_gguf.name)


# ---- reading ----

def test_smollm2_equals_transformers(smollm2_gguf, smol_meta, smol_tok, hf_smol, texts):
    spec = json.loads(gguf_tok.hf_json_of(smol_meta, str(smollm2_gguf)))
    splits = [p["pattern"]["Regex"] for p in spec["pre_tokenizer"]["pretokenizers"][:-1]]
    assert splits == [r"\p{N}", gguf_tok.GPT2]  # llama.cpp's smollm: digits apart, then GPT-2's
    assert (len(spec["model"]["vocab"]), len(spec["model"]["merges"])) == (49152, 48900)
    assert spec["model"]["merges"][:2] == [["Ġ", "t"], ["Ġ", "a"]]
    assert [t["content"] for t in spec["added_tokens"][:3]] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(spec["added_tokens"]) == 17 and all(t["special"] for t in spec["added_tokens"])
    assert gguf_tok.role_ids(smol_meta) == (2, 1)
    assert smol_tok.encode(EXTRA[0]) == SMOL_NUMBERS
    assert differences(smol_tok, hf_smol, texts) == []
    assert [t for t in texts if smol_tok.decode(smol_tok.encode(t)) != t] == []
    assert hf_smol.decode(SMOL_NUMBERS) == EXTRA[0]


def spm_gguf(path: Path, lines: list[str]) -> Path:
    """A SentencePiece ("llama") GGUF as llama.cpp's converter writes Llama 2's: <unk>, <s>, </s>,
    the 256 byte tokens, then BPE pieces scored best first, and no merges."""
    sp = tokenizers.SentencePieceBPETokenizer()
    sp.train_from_iterator(lines, vocab_size=700, min_frequency=2, show_progress=False)
    pieces = [p for p, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1]) if p != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return write_gguf(path, {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0})


def test_sentencepiece_equals_transformers(tmp_path, texts):
    transformers = pytest.importorskip("transformers")
    path = spm_gguf(tmp_path / "spm" / "spm.gguf", texts[:800])
    meta = read_meta(path)
    mine = json.loads(gguf_tok.hf_json_of(meta, str(path)))
    theirs = json.loads(transformers.AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name).backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "model", "added_tokens"):
        assert mine[key] == theirs[key], key
    assert mine["pre_tokenizer"]["prepend_scheme"] == "first"
    assert mine["model"]["byte_fallback"] and len(mine["model"]["merges"]) > 400
    tok = read_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert differences(tok, hf, texts) == []
    assert tok.encode("北")[-3:] == [3 + 0xE5, 3 + 0x8C, 3 + 0x97]  # no piece: its bytes
    # Strip removes the space Metaspace put before the first word; a text's own leading spaces
    # lose one too, in transformers as here
    kept = [t for t in texts if not t.startswith(" ")]
    assert [t for t in kept if tok.decode(tok.encode(t)) != t] == []


def test_pre_tokenizers_match_transformers_table():
    """The regexes transcribed from llama.cpp equal transformers' own transcription."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    shared = set(mapping.GGUF_PRE_TOKENIZER_SPLITS) & set(gguf_tok.PRE_TOKENIZERS)
    assert {"llama-bpe", "llama3", "qwen2", "tekken", "gpt-4o", "dbrx"} <= shared
    for name in shared:
        assert gguf_tok.PRE_TOKENIZERS[name][0] == (mapping.GGUF_PRE_TOKENIZER_SPLITS[name],), name
    ignore = {n: gguf_tok.PRE_TOKENIZERS[n][1] for n in ("llama-bpe", "tekken", "qwen2", "smollm",
                                                         "gpt-2", "dbrx")}
    assert ignore == {"llama-bpe": True, "tekken": True, "qwen2": False, "smollm": False,
                      "gpt-2": False, "dbrx": False}


def test_default_pre_tokenizer(smol_meta):
    """No tokenizer.ggml.pre: llama.cpp's "default" splits (punctuation runs, GPT-2's, digit runs,
    three digits)."""
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.pre"}
    spec = json.loads(gguf_tok.hf_json_of(meta, "old.gguf"))
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    pieces = [p for p, _ in hf.pre_tokenizer.pre_tokenize_str("Hi!!! 12345, ok")]
    assert pieces == ["Hi", "!!!", "Ġ", "123", "45", ",", "Ġok"]


# ---- writing ----

@pytest.fixture(scope="module")
def trained(texts) -> Tokenizer:
    return Tokenizer.train_bpe(["\n".join(texts[:600])], 400)


def _tokenizer(kind: str, smol_tok: Tokenizer, trained: Tokenizer) -> Tokenizer:
    if kind == "smollm2":
        return smol_tok
    if kind in ("gpt2", "cl100k_base"):
        try:
            return Tokenizer.from_spec(kind)
        except TokenizerError:  # no offline r50k_base.tiktoken here
            pytest.skip(f"no offline {kind} ranks (put them in $JAXGPT_TIKTOKEN_DIR)")
    if kind == "bpe:400":
        return trained
    pattern = tiktoken_definition({"bpe-gpt2": "gpt2", "bpe-o200k": "o200k_base"}[kind])[0]
    return Tokenizer(kind, pattern=pattern["pat_str"], ranks=trained.ranks)


@pytest.mark.parametrize("kind, pre", [
    ("smollm2", "smollm"), ("gpt2", "gpt-2"), ("bpe:400", "llama-bpe"),
    ("cl100k_base", "llama-bpe"), ("bpe-gpt2", "gpt-2"), ("bpe-o200k", "gpt-4o")])
def test_write_then_read(kind, pre, smol_tok, trained, texts, tmp_path, offline_tiktoken):
    tok = _tokenizer(kind, smol_tok, trained)
    n = tok.n_vocab + 3  # a model's embedding padded past its tokenizer
    fields = gguf_tok.gguf_fields(tok, n)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", pre)
    assert len(tokens) == len(types) == n and len(set(tokens)) == n
    assert tokens[-3:] == [f"[PAD{i}]" for i in range(n - 3, n)] and types[-3:] == [5] * 3
    assert all(types[i] == gguf_tok.CONTROL for i in tok.specials.values())
    assert tokens[tok.special_id("<|user_start|>")] == "<|user_start|>"
    path = write_gguf(tmp_path / f"{kind}.gguf", fields)
    meta = read_meta(path)
    assert gguf_tok.role_ids(meta) == (tok.eot_id, tok.bos_id)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    back = Tokenizer.from_hf(gguf_tok.hf_json_of(meta, str(path)), kind, *gguf_tok.role_ids(meta))
    assert back.specials == tok.specials and back.n_vocab == n
    assert differences(back, tok, texts) == []
    assert [t for t in texts if back.decode(back.encode(t)) != t] == []


def test_write_fields_types(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.ggml.token_type": [1, 3], "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False, "x.flag": True, "x.count": 7, "x.name": "hi"})
    fields, V = gguf.GGUFReader(path).fields, gguf.GGUFValueType
    assert fields["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert fields["tokenizer.ggml.bos_token_id"].types == [V.UINT32]
    assert [fields[k].types for k in ("tokenizer.ggml.add_bos_token", "x.flag", "x.count",
                                      "x.name")] == [[V.BOOL], [V.BOOL], [V.UINT32], [V.STRING]]


def _split_json(*steps) -> dict:
    return {"type": "Sequence", "pretokenizers": [*steps, {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_spellings_name_the_same_pre_tokenizer(trained, texts):
    """llama.cpp's and tiktoken's spellings of a split, and the Digits step of SmolLM2's own
    tokenizer.json, name the llama.cpp pre-tokenizer of the same regexes and split alike."""
    spec = json.loads(tiktoken_json(trained))
    cases = [(_split_json({"type": "Split", "pattern": {"Regex": spelled}, "behavior": "Isolated",
                           "invert": False}), (canonical,))
             for spelled, canonical in gguf_tok._ALIASES.items()]
    cases.append(({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}]},
        (gguf_tok.DIGIT, gguf_tok.GPT2)))
    for pre, canonical in cases:
        spec["pre_tokenizer"] = pre
        tok = Tokenizer.from_hf(json.dumps(spec), "spelled")
        named = gguf_tok.gguf_fields(tok, tok.n_vocab)["tokenizer.ggml.pre"]
        assert gguf_tok.PRE_TOKENIZERS[named][0] == canonical
        spec["pre_tokenizer"] = _split_json(*({"type": "Split", "pattern": {"Regex": r},
                                               "behavior": "Isolated", "invert": False}
                                              for r in canonical))
        assert differences(tok, Tokenizer.from_hf(json.dumps(spec), "canonical"), texts) == []


# ---- errors ----

def test_bad_gguf_keys(smol_meta):
    with pytest.raises(ConvertError, match=r"^m\.gguf: tokenizer\.ggml\.model='bert' is not read"):
        gguf_tok.hf_json_of({**smol_meta, "tokenizer.ggml.model": "bert"}, "m.gguf")
    for pre in ("gpt2", "no-such-pre"):  # gpt2 is a model name; llama.cpp's pre is "gpt-2"
        with pytest.raises(ConvertError, match=rf"^m\.gguf: tokenizer\.ggml\.pre='{pre}' is not"):
            gguf_tok.hf_json_of({**smol_meta, "tokenizer.ggml.pre": pre}, "m.gguf")
    no_merges = {k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ConvertError, match=r"^m\.gguf: tokenizer\.ggml\.merges is missing$"):
        gguf_tok.hf_json_of(no_merges, "m.gguf")
    twice = {**smol_meta, "tokenizer.ggml.tokens": ["a", *smol_meta["tokenizer.ggml.tokens"][1:4],
                                                    "a", *smol_meta["tokenizer.ggml.tokens"][5:]]}
    with pytest.raises(ConvertError, match=r"^m\.gguf: tokenizer\.ggml\.tokens holds 'a' twice$"):
        gguf_tok.hf_json_of(twice, "m.gguf")
    gemma = {"general.architecture": "gemma", "tokenizer.ggml.model": "llama",
             "tokenizer.ggml.tokens": ["<unk>"], "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(ConvertError, match=r"^g\.gguf: general\.architecture='gemma' with "):
        gguf_tok.hf_json_of(gemma, "g.gguf")
    assert gguf_tok.role_ids({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.eos_token_id": 5}) \
        == (None, None)


def test_unwritable_tokenizers(trained, tmp_path, texts):
    with pytest.raises(ConvertError, match=r"^tokenizer char: llama\.cpp has no character"):
        gguf_tok.gguf_fields(Tokenizer("char", chars=sorted(set("abc"))), 20)
    with pytest.raises(ConvertError, match=r"^tokenizer bpe:400: id 391 \(.+\) is past the "
                                           r"model's 300 embedding rows$"):
        gguf_tok.gguf_fields(trained, 300)
    # chat specials the model has no rows for are left out, as in a Hugging Face export
    fields = gguf_tok.gguf_fields(trained, 399)
    assert "<|assistant_end|>" not in fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.tokens"][398] == "<|assistant_start|>"
    small = gguf_tok.gguf_fields(trained, trained.bos_id)  # <|bos|> left out: no bos id written
    assert "tokenizer.ggml.bos_token_id" not in small
    assert small["tokenizer.ggml.eos_token_id"] == trained.eot_id == 392
    odd = Tokenizer("odd", pattern=r"\S+|\s+", ranks=trained.ranks)
    with pytest.raises(ConvertError, match=r"^tokenizer odd: pre_tokenizer regexes \[.*\] are none "
                                           r"of llama\.cpp's pre-tokenizers$"):
        gguf_tok.gguf_fields(odd, odd.n_vocab)
    spm = read_tokenizer(spm_gguf(tmp_path / "spm.gguf", texts[:300]), "spm")
    with pytest.raises(ConvertError, match=r"^tokenizer spm: model\.byte_fallback=true: "):
        gguf_tok.gguf_fields(spm, spm.n_vocab)
