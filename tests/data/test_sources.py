"""Tests for jaxgpt.sources: documents streamed as (text, ends_document) pieces."""
import json

import pytest

from jaxgpt.data import sources
from jaxgpt.errors import DataError


def test_a_file_read_in_small_pieces_joins_back_to_its_text_and_ends_once(tmp_path):
    text = "".join(f"line {i}: {'ü' * (i % 7)} 你好\n  indented\n" for i in range(400))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    pieces = list(sources.open_source(f"text:{tmp_path / 'a.txt'}", chunk_bytes=256).pieces())
    assert len(pieces) > 20
    assert "".join(t for t, _ in pieces) == text
    assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]
    # every cut is a newline followed by printable ASCII, never inside a pre-token
    assert all(t.endswith("\n") and not nxt.startswith((" ", "/"))
               for (t, _), (nxt, _) in zip(pieces, pieces[1:], strict=False))


def test_line_and_paragraph_documents(tmp_path):
    (tmp_path / "b.txt").write_text("one\ntwo\n\n\nthree\r\n\r\nfour\n", encoding="utf-8")
    line = list(sources.open_source(f"text:{tmp_path}", doc_split="line").pieces())
    paragraph = list(sources.open_source(f"text:{tmp_path}", doc_split="paragraph").pieces())
    assert line == [("one", True), ("two", True), ("three", True), ("four", True)]
    assert paragraph == [("one\ntwo", True), ("three", True), ("four", True)]


def test_jsonl_field_and_limit(tmp_path):
    rows = [{"body": f"row {i}", "other": i} for i in range(10)] + [{"body": ""}]
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    src = sources.open_source(f"jsonl:{tmp_path / 'r.jsonl'}:body")
    # the empty row is skipped
    assert [t for t, _ in src.pieces()] == [f"row {i}" for i in range(10)]
    assert [t for t, _ in sources.limited(src.pieces(), 3)] == ["row 0", "row 1", "row 2"]
    with pytest.raises(DataError, match=r"r.jsonl:1: no field 'text' \(it has 'body', 'other'\); "
                                        r"choose one with prepare.field=NAME$"):
        list(sources.open_source(f"jsonl:{tmp_path / 'r.jsonl'}").pieces())


def test_unknown_source_names_the_key_and_the_kinds(tmp_path):
    with pytest.raises(DataError, match=r"^prepare.source=csv:x: unknown source; expected "
                                        r"text:PATH, jsonl:PATH\[:field\]"):
        sources.open_source("csv:x")
    with pytest.raises(DataError,
                       match=rf"^prepare.source=text:{tmp_path}/\*.txt: no .txt files at"):
        sources.open_source(f"text:{tmp_path}/*.txt")


def test_decode_names_the_setting_that_fixes_invalid_utf8(capsys):
    raw = b"ok\ncaf\xe9\n"
    with pytest.raises(DataError) as e:
        sources.decode(raw, "f.txt", 100, "strict", set())
    assert str(e.value) == ("f.txt: invalid UTF-8 at byte offset 106 "
                            "(prepare.errors=replace substitutes U+FFFD)")
    with pytest.raises(DataError, match=r"\(data.errors=replace substitutes U\+FFFD\)$"):
        sources.decode(raw, "f.txt", 0, "strict", set(), fix="data.errors=replace")
    warned = set()
    assert sources.decode(raw, "f.txt", 0, "replace", warned) == "ok\ncaf\ufffd\n"
    # warns once per file
    assert sources.decode(raw, "f.txt", 0, "replace", warned) == "ok\ncaf\ufffd\n"
    assert capsys.readouterr().err.count("warning: f.txt: invalid UTF-8 at byte offset 6") == 1
