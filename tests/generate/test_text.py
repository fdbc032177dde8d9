"""Tests for jaxgpt.generate.text: one sample's ids to the text a person may see (whole UTF-8
characters, stop strings, the screen)."""
import pytest
from chars import REFUSAL, char_tokenizer, screen

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.screen import normalize_text
from jaxgpt.generate.text import TextStream


def feed_ids(stream: TextStream, ids, sizes) -> list[str]:
    """Feed ids in chunks of the given sizes (cycled), then finish: the released deltas."""
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        out.append(stream.add(ids[i:i + n]))
        i, k = i + n, k + 1
    out.append(stream.finish())
    return out


def test_a_four_byte_character_split_across_tokens_arrives_whole():
    tok = Tokenizer.from_spec("cl100k_base")
    text = "ok 😀 then 𝄞 and 中文 done"
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert any(p and not _is_utf8(p) for p in pieces)  # some token really ends inside a character
    deltas = feed_ids(TextStream(tok), ids, [1])
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert any("😀" in d for d in deltas) and any("𝄞" in d for d in deltas)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [5]])
def test_stop_strings_never_leak_a_partial_match(sizes):
    tok = char_tokenizer()
    text = "one. two , end. three end! four"
    stream = TextStream(tok, stop=("end!", "xyz"))
    released = ""
    for delta in feed_ids(stream, tok.encode(text), sizes):
        released += delta
        assert "one. two , end. three ".startswith(released)  # never a piece of "end!"
    assert released == "one. two , end. three " and stream.finish_reason == "stop"


def test_a_text_without_stop_strings_is_released_as_it_comes():
    tok = char_tokenizer()
    stream = TextStream(tok, stop=("zz",))
    assert stream.add(tok.encode("hello z")) == "hello "  # "z" could begin "zz": held
    assert (stream.add(tok.encode("a")) == "za" and stream.finish() == ""
            and stream.finish_reason is None)


@pytest.mark.parametrize("text", ["so fuck this", "so FUCK this", "so ｆｕｃｋ this",
                                  "so 𝐟uck this", "so f\u200bu\u200bck this"])
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1]])
def test_a_screened_phrase_never_reaches_the_stream(tmp_path, text, sizes):
    tok = Tokenizer.from_spec("char", corpus=text)
    s = screen(tmp_path, "fuck")
    stream = TextStream(tok, screen=s.stream(), refusal=REFUSAL)
    deltas = feed_ids(stream, tok.encode(text), sizes)
    shown = "".join(deltas)
    assert "fuck" not in normalize_text(shown)[0] and shown.endswith(REFUSAL)
    assert shown.removesuffix(REFUSAL).strip() == "so" and stream.finish_reason == "content_filter"
