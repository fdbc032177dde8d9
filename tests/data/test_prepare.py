"""Tests for jaxgpt.prepare: tokenizing every kind of source into shards, reuse and resume,
bad input."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import corpus, write

from jaxgpt.config import PrepareConfig
from jaxgpt.data import prepare
from jaxgpt.data import tokens as data
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import ConfigError, DataError, TokenizerError


@pytest.fixture(scope="module", autouse=True)
def offline(offline_tiktoken):
    yield


def prep(source, out, tokenizer="byte", **kw):
    kw.setdefault("workers", 1)
    return prepare.prepare(PrepareConfig(source=source, tokenizer=tokenizer, out=str(out),
                                         progress=False, **kw))


def split_ids(out, split) -> np.ndarray:
    return np.asarray(data.load_dir(out).split(split)).astype(np.int64)


def documents(ids, tok) -> list[str]:
    """Decoded documents of a split: every one must end with the eot token."""
    assert len(ids) == 0 or ids[-1] == tok.eot_id
    ends = np.flatnonzero(ids == tok.eot_id)
    return [tok.decode(ids[a:b])
            for a, b in zip(np.concatenate([[0], ends[:-1] + 1]), ends, strict=False)]


# ---- prepare: sources ----

def test_text_folder_one_document_per_file_split_by_seeded_hash(tmp_path):
    texts = [f"document {i}: {'ünïcode 你好 ' * i}\nsecond line\n" for i in range(12)]
    for i, text in enumerate(texts):
        write(tmp_path / "in" / f"sub{i % 2}" / f"{i:02d}.txt", text)
    write(tmp_path / "in" / "ignored.md", "not a .txt file")
    meta = prep(f"text:{tmp_path / 'in'}", tmp_path / "out", val_fraction=0.3, seed=7)
    tok = Tokenizer.from_spec("byte")
    order = sorted((tmp_path / "in").rglob("*.txt"))  # documents are numbered in sorted path order
    is_val = prepare.doc_is_val(np.arange(len(order)), 7, 0.3)
    expected = {s: [p.read_text("utf-8") for p, v in zip(order, is_val, strict=False)
                    if v == (s == "val")] for s in prepare.SPLITS}
    assert 0 < len(expected["val"]) < len(texts)
    for split in prepare.SPLITS:
        assert documents(split_ids(tmp_path / "out", split), tok) == expected[split]
        info = meta["splits"][split]
        assert info["documents"] == len(expected[split])
        assert info["bytes"] == sum(len(t.encode()) for t in expected[split])
        # byte ids + one eot per document
        assert info["tokens"] == info["bytes"] + info["documents"]
        for shard in info["shards"]:
            raw = (tmp_path / "out" / shard["file"]).read_bytes()
            assert (hashlib.sha256(raw).hexdigest() == shard["sha256"]
                    and len(raw) == 2 * shard["tokens"])
    assert meta["dtype"] == "uint16" and meta["documents"] == 12 and meta["eot_id"] == tok.eot_id
    assert meta["tokenizer_fingerprint"] == Tokenizer.load(tmp_path / "out").fingerprint
    assert not (tmp_path / "out" / "progress.json").exists()
    # a glob and a single file name the same kind of input
    assert prep(f"text:{tmp_path}/in/sub0/*.txt", tmp_path / "glob",
                val_fraction=0)["documents"] == 6
    assert prep(f"text:{order[3]}", tmp_path / "one", val_fraction=0)["documents"] == 1


def tricky_text() -> str:
    """Text whose pieces meet at awkward places: blank lines, indents, CRLF, non-ASCII, long
    lines."""
    head = corpus(60_000)
    lines = [f"{' ' * (i % 5)}line {i} ünï 你好 {'x' * (i % 97)}{' ' * (i % 3)}"
             for i in range(1500)]
    lines[7::50] = ["punctuation then a path!\n/usr/bin/env:\n/etc"] * len(lines[7::50])
    return head + "\n\n\n".join(["\r\n".join(lines[:500]), "\n".join(lines[500:]),
                                 " \n \n\t\n"]) + "end"


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_file_read_in_pieces_encodes_exactly_like_the_whole_text(tmp_path, name):
    text = tricky_text()
    write(tmp_path / "big.txt", text)
    meta = prep(f"text:{tmp_path / 'big.txt'}", tmp_path / "out", name, val_fraction=0,
                chunk_bytes=4096, shard_tokens=10_000)
    tok = Tokenizer.from_spec(name)
    ids = split_ids(tmp_path / "out", "train")
    np.testing.assert_array_equal(ids, np.append(tok.encode_np(text), tok.eot_id))
    assert meta["dtype"] == "uint32" and len(meta["splits"]["train"]["shards"]) > 3
    assert isinstance(data.load_dir(tmp_path / "out").train, data.ShardedTokens)


def test_doc_split_paragraph_and_line(tmp_path):
    text = tricky_text().replace("\r\n", "\n")
    write(tmp_path / "t.txt", text)
    tok = Tokenizer.from_spec("byte")
    for mode, sep in (("paragraph", "\n\n"), ("line", "\n")):
        expected = [d.strip("\n") for d in text.split(sep) if d.strip()]
        if mode == "paragraph":  # blank lines holding only spaces also separate paragraphs
            expected = [p.strip("\n") for d in expected for p in d.split("\n \n\t\n") if p.strip()]
        prep(f"text:{tmp_path / 't.txt'}", tmp_path / mode, doc_split=mode, val_fraction=0,
             chunk_bytes=8192)
        assert documents(split_ids(tmp_path / mode, "train"), tok) == expected


def test_jsonl_named_field_and_workers_give_identical_shards(tmp_path):
    rows = [{"body": f"row {i} " + "words and ünïcode " * (i % 13), "id": i} for i in range(400)]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows[:250]) + "\n\n")
    write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in rows[250:]))
    kw = dict(val_fraction=0.2, chunk_bytes=1000, shard_tokens=3000)
    one = prep(f"jsonl:{tmp_path}:body", tmp_path / "w1", **kw)
    two = prep(f"jsonl:{tmp_path}", tmp_path / "w2", workers=2, field="body", **kw)
    assert one["splits"] == two["splits"] and len(one["splits"]["train"]["shards"]) > 2
    tok = Tokenizer.from_spec("byte")
    got = (documents(split_ids(tmp_path / "w2", "train"), tok)
           + documents(split_ids(tmp_path / "w2", "val"), tok))
    assert sorted(got) == sorted(r["body"] for r in rows)


def test_chitchat_subset(tmp_path):
    chitchat = pytest.importorskip("chitchat_dataset")
    meta = prep("chitchat", tmp_path / "out", limit=30, val_fraction=0)
    raw = json.loads(Path(chitchat.__file__).with_name("dataset.json").read_text())
    conversations = ["\n".join(" ".join(u["text"] for u in message) for message in conv["messages"])
                     for conv in list(raw.values())[:30]]
    assert meta["documents"] == 30
    assert (documents(split_ids(tmp_path / "out", "train"), Tokenizer.from_spec("byte"))
            == conversations)


def test_chatterbot_every_language(tmp_path):
    pytest.importorskip("chatterbot_corpus")
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY
    files = sorted(Path(DATA_DIRECTORY).glob("*/*.yml"))
    convs = [c for f in files
             for c in yaml.safe_load(f.read_text("utf-8")).get("conversations") or []]
    meta = prep("chatterbot", tmp_path / "out", val_fraction=0)
    assert len({f.parent.name for f in files}) > 10 and meta["documents"] == len(convs)
    docs = documents(split_ids(tmp_path / "out", "train"), Tokenizer.from_spec("byte"))
    assert docs[0] == "\n".join(convs[0]) and "你好" in "".join(docs)


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets  # a requirement: this path must run in CI, not skip
    texts = [f"hf row {i} " * (i % 7 + 1) for i in range(50)]
    datasets.Dataset.from_dict({"content": texts, "n": list(range(50))}).save_to_disk(
        str(tmp_path / "ds"))
    meta = prep(f"hf:{tmp_path / 'ds'}", tmp_path / "out", field="content", val_fraction=0)
    assert meta["documents"] == 50
    assert documents(split_ids(tmp_path / "out", "train"), Tokenizer.from_spec("byte")) == texts
    with pytest.raises(DataError, match=r"row 0: no text field 'text' \(it has content, n\)"):
        prep(f"hf:{tmp_path / 'ds'}", tmp_path / "bad")


def test_bpe_trained_on_the_corpus_is_saved_with_the_data(tmp_path):
    write(tmp_path / "c.txt", tricky_text())
    meta = prep(f"text:{tmp_path / 'c.txt'}", tmp_path / "out", "bpe:400", val_fraction=0)
    tok = Tokenizer.load(tmp_path / "out")
    assert tok.name == "bpe:400" and meta["n_vocab"] == tok.n_vocab == 400
    np.testing.assert_array_equal(split_ids(tmp_path / "out", "train"),
                                  np.append(tok.encode_np(tricky_text()), tok.eot_id))


# ---- reuse, resume, atomic output ----

def test_second_run_reuses_finished_shards(tmp_path):
    write(tmp_path / "in" / "a.txt", "alpha\n" * 100)
    write(tmp_path / "in" / "b.txt", "beta\n" * 100)
    first = prep(f"text:{tmp_path / 'in'}", tmp_path / "out", val_fraction=0)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = prep(f"text:{tmp_path / 'in'}", tmp_path / "out", val_fraction=0)
    assert again["reused"] and not first["reused"] and again["splits"] == first["splits"]
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    write(tmp_path / "in" / "b.txt", "beta changed\n" * 100)  # new content: a new key
    with pytest.raises(DataError, match=r"holds data prepared from other inputs or settings; "
                                        r"use another prepare.out or prepare.overwrite=true"):
        prep(f"text:{tmp_path / 'in'}", tmp_path / "out", val_fraction=0)
    rebuilt = prep(f"text:{tmp_path / 'in'}", tmp_path / "out", val_fraction=0, overwrite=True)
    assert not rebuilt["reused"] and rebuilt["bytes"] == first["bytes"] + 800


def test_interrupted_run_resumes_after_its_finished_shards(tmp_path, monkeypatch):
    rows = [{"text": f"document {i} " + "abc " * (i % 50)} for i in range(600)]
    write(tmp_path / "in.jsonl", "\n".join(map(json.dumps, rows)))
    kw = dict(val_fraction=0.3, chunk_bytes=2000, shard_tokens=4000)
    clean = prep(f"jsonl:{tmp_path / 'in.jsonl'}", tmp_path / "clean", **kw)
    original, closed = prepare._ShardWriter.close, []

    def close_then_crash(self):
        record = original(self)
        closed.append(record)
        if len(closed) == 5:
            raise KeyboardInterrupt
        return record
    monkeypatch.setattr(prepare._ShardWriter, "close", close_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prep(f"jsonl:{tmp_path / 'in.jsonl'}", tmp_path / "out", **kw)
    monkeypatch.setattr(prepare._ShardWriter, "close", original)
    out = tmp_path / "out"
    assert not (out / "meta.json").exists()
    with pytest.raises(DataError, match="no meta.json"):
        data.load_dir(out)
    done = json.loads((out / "progress.json").read_text())["splits"]
    finished = {s["file"]: (out / s["file"]).stat().st_mtime_ns
                for split in done.values() for s in split["shards"]}
    assert len(finished) == 4  # the fifth shard was renamed but never recorded: it is made again
    resumed = prep(f"jsonl:{tmp_path / 'in.jsonl'}", out, **kw)
    assert resumed["splits"] == clean["splits"] and not resumed["reused"]
    assert finished == {f: (out / f).stat().st_mtime_ns for f in finished}  # not rewritten


# ---- bad input: one-line errors naming the file ----

def test_invalid_utf8_strict_names_file_and_offset_replace_substitutes(tmp_path, capsys):
    bad = write(tmp_path / "bad.txt", b"ok line\n" * 1000 + b"caf\xe9\n" + b"more\n")
    with pytest.raises(DataError) as e:
        prep(f"text:{bad}", tmp_path / "strict", chunk_bytes=1024)
    assert str(e.value) == (f"{bad}: invalid UTF-8 at byte offset 8003 "
                            "(prepare.errors=replace substitutes U+FFFD)")
    prep(f"text:{bad}", tmp_path / "replace", errors="replace", val_fraction=0, chunk_bytes=1024)
    assert documents(split_ids(tmp_path / "replace", "train"), Tokenizer.from_spec("byte")) == \
        ["ok line\n" * 1000 + "caf\ufffd\nmore\n"]
    assert f"warning: {bad}: invalid UTF-8 at byte offset 8003; replaced" in capsys.readouterr().err
    bad_jsonl = write(tmp_path / "bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{bad_jsonl}: invalid UTF-8 at byte offset 30 "):
        prep(f"jsonl:{bad_jsonl}", tmp_path / "j")


def test_bad_inputs_raise_one_line_errors(tmp_path):
    empty = write(tmp_path / "empty" / "e.txt", "")
    write(tmp_path / "empty" / "full.txt", "text")
    cases = {
        f"text:{tmp_path / 'empty'}": f"{empty}: the file is empty",
        f"text:{tmp_path / 'nothing'}/*.txt":
            f"prepare.source=text:{tmp_path / 'nothing'}/*.txt: no .txt files at",
        "jsonl:" + str(write(tmp_path / "m.jsonl", '{"text": "a"}\n\n{"body": "b"}\n')):
            f"{tmp_path / 'm.jsonl'}:3: no field 'text' (it has 'body'); "
            "choose one with prepare.field=NAME",
        "jsonl:" + str(write(tmp_path / "j.jsonl", '{"text": "a"}\n{"text": \n')):
            f"{tmp_path / 'j.jsonl'}:2: not valid JSON (Expecting value)",
        "jsonl:" + str(write(tmp_path / "n.jsonl", '{"text": 3}\n')):
            f"{tmp_path / 'n.jsonl'}:1: field 'text' is a int, not text",
        "csv:whatever": "prepare.source=csv:whatever: unknown source; expected text:PATH",
    }
    for source, message in cases.items():
        with pytest.raises(DataError) as e:
            prep(source, tmp_path / "out")
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    write(tmp_path / "ok.txt", "hello")
    with pytest.raises(DataError, match=r"tokenizer cl100k_base has 100\d\d\d ids, too many for "
                                        r"prepare.dtype=uint16 \(at most 65536\); "
                                        r"use prepare.dtype=auto"):
        prep(f"text:{tmp_path / 'ok.txt'}", tmp_path / "u16", "cl100k_base", dtype="uint16")
    assert not (tmp_path / "u16" / "meta.json").exists()


def test_truncated_or_corrupt_shard_is_refused_on_load(tmp_path):
    write(tmp_path / "t.txt", "some text to tokenize\n" * 50)
    prep(f"text:{tmp_path / 't.txt'}", tmp_path / "out", val_fraction=0)
    shard = tmp_path / "out" / "train_000000.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-3])
    with pytest.raises(DataError, match=rf"^{shard}: {len(raw) - 3} bytes but meta.json says "
                                        rf"{len(raw) // 2} uint16 tokens .*truncated"):
        data.load_dir(tmp_path / "out")
    shard.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    with pytest.raises(DataError, match=rf"^{shard}: checksum mismatch"):
        data.load_dir(tmp_path / "out")
    assert len(data.load_dir(tmp_path / "out", verify=False).train) == len(raw) // 2


def test_an_edited_or_damaged_meta_json_is_named_on_load(tmp_path):
    write(tmp_path / "t.txt", "some text to tokenize\n" * 50)
    prep(f"text:{tmp_path / 't.txt'}", tmp_path / "out", val_fraction=0)
    meta_file = tmp_path / "out" / "meta.json"
    good = json.loads(meta_file.read_text())
    cases = [(lambda m: m.pop("dtype"), r"no 'dtype' field"),
             (lambda m: m["splits"].pop("val"), r"no 'val' field"),
             (lambda m: m.update(dtype="floaty"),
              r"malformed \(TypeError: data type 'floaty' not understood\)"),
             (lambda m: m["splits"]["train"]["shards"][0].update(tokens="x"),
              r"malformed \(ValueError: invalid literal"),
             (lambda m: m.update(splits=[]), r"malformed \(TypeError: list indices")]
    for edit, message in cases:
        meta = json.loads(json.dumps(good))
        edit(meta)
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(DataError, match=rf"^{meta_file}: {message}.*; prepare the data again$"):
            data.load_dir(tmp_path / "out")
    meta_file.write_text(json.dumps(good))
    assert len(data.load_dir(tmp_path / "out").train) == good["splits"]["train"]["tokens"]


def test_settings_are_checked_as_on_the_command_line(tmp_path, monkeypatch):
    write(tmp_path / "t.txt", "hello world\n" * 20)
    source = f"text:{tmp_path / 't.txt'}"
    with pytest.raises(DataError, match=r"^prepare.val_fraction=1.0: expected 0 <= fraction < 1$"):
        prep(source, tmp_path / "out", val_fraction=1.0)
    with pytest.raises(ConfigError,
                       match=r"^prepare.errors='ignore': expected one of 'strict', 'replace'$"):
        prep(source, tmp_path / "out", errors="ignore")
    with pytest.raises(ConfigError, match=r"^prepare.doc_split='page': expected one of"):
        prep(source, tmp_path / "out", doc_split="page")
    with pytest.raises(TokenizerError, match=r"^bad tokenizer 'bpe:many': expected bpe:VOCAB_SIZE"):
        prep(source, tmp_path / "out", "bpe:many")
    assert not (tmp_path / "out").exists()
    # an int where a float belongs is the same setting (and so the same reuse key) as the float
    assert (prep(source, tmp_path / "a", val_fraction=0)["key"]
            == prep(source, tmp_path / "b", val_fraction=0.0)["key"])
    # workers=0: one per CPU core but one
    seen = []
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: 5)
    monkeypatch.setattr(prepare, "Encoder", lambda out, workers, *a: seen.append(workers) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prep(source, tmp_path / "w", workers=0)
    assert seen == [4]


def run_prepare(run_env, cwd, *settings):
    return subprocess.run([sys.executable, "-m", "jaxgpt.data", "prepare", *settings],
                          capture_output=True, text=True, env=run_env(), cwd=cwd, timeout=120)


@pytest.mark.slow
def test_command_line_prints_summary_or_one_line_error(tmp_path, run_env):
    write(tmp_path / "t.txt", "hello world\n")
    ok = run_prepare(run_env, tmp_path, "prepare.source=text:t.txt", "prepare.tokenizer=byte",
                     "prepare.out=out", "prepare.val_fraction=0", "prepare.progress=false",
                     "prepare.workers=1")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["out"] == "out" and summary["tokens"] == 13 and summary["train_tokens"] == 13
    assert summary["reused"] is False and summary["n_vocab"] == 264
    again = run_prepare(run_env, tmp_path, "prepare.source=text:t.txt", "prepare.tokenizer=byte",
                        "prepare.out=out", "prepare.val_fraction=0", "prepare.progress=false",
                        "prepare.workers=1")
    assert json.loads(again.stdout)["reused"] is True
    for settings, message in [
        (["prepare.source=text:missing.txt", "prepare.tokenizer=byte", "prepare.out=out2"],
         "error: prepare.source=text:missing.txt: no .txt files at missing.txt"),
        (["prepare.source=text:t.txt", "prepare.tokenizer=byte", "prepare.out=out",
          "prepare.val_fraction=0.5"],
         "error: out: holds data prepared from other inputs or settings; "
         "use another prepare.out or prepare.overwrite=true"),
        (["prepare.source=text:t.txt", "prepare.out=out3"], "error: prepare.tokenizer is required"),
        (["prepare.source=text:t.txt", "prepare.tokenizer=byte", "prepare.out=o",
          "prepare.dtype=int8"],
         "error: prepare.dtype=int8: expected one of auto, uint16, uint32"),
        (["--source", "text:t.txt"],
         "error: expected 0 operand(s) before the key=value settings, got 2"),
    ]:
        bad = run_prepare(run_env, tmp_path, *settings)
        assert (bad.returncode == 2 and bad.stdout == ""
                and "Traceback" not in bad.stderr), bad.stderr
        assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith(message), bad.stderr
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


@pytest.mark.slow
def test_command_line_help_lists_the_prepare_keys(tmp_path, run_env):
    out = run_prepare(run_env, tmp_path, "--help")
    assert out.returncode == 0 and out.stdout.startswith(
        "usage: python -m jaxgpt.data prepare prepare.source=SOURCE")
    assert "  prepare.workers=0  (int)" in out.stdout
    assert "  prepare.doc_split=file  (file | paragraph | line)" in out.stdout
    assert "  prepare.val_fraction=0.1  (float)" in out.stdout
    assert "text:PATH, jsonl:PATH[:field]" in out.stdout  # the kinds of source
