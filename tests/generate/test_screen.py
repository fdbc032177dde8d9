"""Tests for jaxgpt.screen: normalisation, blocklist rules and their errors, the classifier,
streaming that never releases a blocked phrase (however it is split or disguised), confidence,
counts."""
import math
import random
import sys
import threading

import pytest

from jaxgpt.config import ScreenConfig
from jaxgpt.errors import ConfigError
from jaxgpt.generate.screen import BUILTIN_BLOCKLIST, Screen, normalize_text

ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"


def screen_with(tmp_path, *lines, **cfg) -> Screen:
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Screen(ScreenConfig(blocklist=str(path), **cfg))


def stream_all(screen: Screen, deltas):
    """(what each feed returned, what finish returned, the stream)."""
    stream = screen.stream()
    outs = [stream.feed(d) for d in deltas]
    return outs, stream.finish(), stream


def assert_never_released(screen: Screen, text: str, released: str):
    """No match of any rule in the whole `text` starts inside what was `released`."""
    assert text.startswith(released)
    norm, index = normalize_text(text)
    for pattern, _ in screen._rules:
        for m in pattern.finditer(norm, overlapped=True):
            assert index[m.start()] >= len(released), (text, released, m)


# ---- normalisation ----

@pytest.mark.parametrize("raw, norm, index", [
    # full-width letters and space
    ("ＡＢＣ ｆｕｌｌ", "abc full", [0, 1, 2, 3, 4, 5, 6, 7]),
    # mathematical bold (one code point each)
    ("𝐛𝐚𝐝 𝒘𝒐𝒓𝒅", "bad word", [0, 1, 2, 3, 4, 5, 6, 7]),
    ("HeLLo", "hello", [0, 1, 2, 3, 4]),
    # casefold: one character, two out
    ("Straße", "strasse", [0, 1, 2, 3, 4, 4, 5]),
    ("ﬁne", "fine", [0, 0, 1, 2]),                                    # NFKC ligature
    # zero-width characters dropped
    ("a\u200bb\u200cc\u200dd\u2060e\ufeff", "abcde", [0, 2, 4, 6, 8]),
    ("soft\u00adware", "software", [0, 1, 2, 3, 5, 6, 7, 8]),        # soft hyphen dropped
    # a whitespace run is one space
    ("a  \t\n b", "a b", [0, 1, 6]),
    # through hidden and exotic spaces
    ("a \u200b\u00a0\u3000b", "a b", [0, 1, 5]),
    # not stripped: a prefix stays a prefix
    (" x ", " x ", [0, 1, 2]),
    ("", "", []),
])
def test_normalize(raw, norm, index):
    assert normalize_text(raw) == (norm, index)


def test_normalize_of_a_prefix_is_a_prefix():
    # The stream normalises delta by delta; that equals normalising the whole text only if so.
    rng = random.Random(0)
    alphabet = "ab Ｂ𝐚ﬁß\u200b\u00ad \t\n\u3000"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        cut = rng.randint(0, len(text))
        head, whole = normalize_text(text[:cut]), normalize_text(text)
        assert whole[0].startswith(head[0]) and whole[1][:len(head[1])] == head[1]


# ---- rules and their errors ----

def test_blocklist_word_boundaries_phrases_regexes_comments(tmp_path):
    screen = screen_with(tmp_path, "# a comment: class", "", "ass", "  Naughty   Phrase  ",
                         "bad word", r"re:code-\d{4}")
    assert screen.active
    assert screen.check("a class act") is None            # "ass" inside a word passes
    assert screen.check("assess the bass") is None
    assert screen.check("you ass") == "blocklist"
    assert screen.check("ASS!") == "blocklist"
    # phrase normalised at load and in text
    assert screen.check("a ｎａｕｇｈｔｙ\nphrase.") == "blocklist"
    assert screen.check("BAD   word") == "blocklist"
    assert screen.check("bad\u200b word") == "blocklist"
    # zero-width removed: "badword", another word
    assert screen.check("bad\u200bword") is None
    assert screen.check("bad words") is None
    assert screen.check("a comment") is None               # comment lines are no phrases
    assert screen.check("the code-1234 here") == r"pattern 're:code-\d{4}'"
    # regexes see normalised text
    assert screen.check("the CODE-１２３４") == r"pattern 're:code-\d{4}'"
    assert screen.check("code-12") is None
    assert screen.check("ass code-1234") == "blocklist"   # the blocklist is checked first


def test_builtin_blocklist():
    screen = Screen(ScreenConfig())
    assert screen.active and BUILTIN_BLOCKLIST.is_file()
    lines = [line.strip() for line in BUILTIN_BLOCKLIST.read_text().splitlines()]
    words = [line for line in lines if line and not line.startswith(("#", "re:"))]
    assert 15 <= len(words) <= 30 and any(line.startswith("re:") for line in lines)
    assert "screen.blocklist=FILE" in BUILTIN_BLOCKLIST.read_text()
    assert screen.check("what the Ｆｕｃｋ") == "blocklist"
    assert screen.check("Scunthorpe is a town, a cocktail is a drink") is None
    assert screen.check("card 4111-1111-1111-1111 ok").startswith("pattern 're:")
    assert screen.check("in 2024 there were 365 days") is None


@pytest.mark.parametrize("blocklist", [None, "none", "None"])
def test_no_list(blocklist):
    screen = Screen(ScreenConfig(blocklist=blocklist))
    assert not screen.active and screen.check("fuck") is None
    outs, rest, stream = stream_all(screen, ["fu", "ck"])
    assert outs == ["fu", "ck"] and rest == "" and stream.blocked is None


def test_disabled_reads_nothing_and_passes_everything(tmp_path):
    screen = Screen(ScreenConfig(enabled=False, blocklist=str(tmp_path / "missing.txt"),
                                 classifier="no:such"))
    assert not screen.active and screen.check("fuck") is None
    outs, rest, _ = stream_all(screen, ["fu", "ck"])
    assert "".join(outs) + rest == "fuck"


@pytest.mark.parametrize("line, message", [
    ("re:(ab", "bad regular expression 're:(ab' (missing ) at position 3)"),
    ("re:", "empty regular expression 're:'"),
    ("re:x*", "regular expression 're:x*' matches the empty text"),
    ("\u200b\u200d", "phrase '\\u200b\\u200d' is empty once normalised"),
])
def test_bad_line_is_one_line_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "list.txt"
    path.write_text("# header\n\nfine\n" + line + "\nok\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        Screen(ScreenConfig(blocklist=str(path)))
    assert str(e.value) == f"{path}:4: {message}"
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=r"^screen\.blocklist=.*nope\.txt: no such file$"):
        Screen(ScreenConfig(blocklist=str(path)))


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:fn", "cannot import no_such_module_xyz (ModuleNotFoundError: "),
    ("os:no_such_function", "os has no attribute no_such_function"),
    ("os:sep", "os.sep is not callable"),
    ("just_a_module", "expected module:function"),
])
def test_bad_classifier(spec, message):
    with pytest.raises(ConfigError) as e:
        Screen(ScreenConfig(blocklist=None, classifier=spec))
    assert str(e.value).startswith(f"screen.classifier={spec}: {message}")
    assert "\n" not in str(e.value)


def test_classifier_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "screen_test_clf.py").write_text(
        "calls = []\n"
        "def judge(text):\n"
        "    calls.append(text)\n"
        "    return 'mentions a secret' if 'secret' in text else None\n"
        "def yes(text):\n"
        "    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "screen_test_clf", raising=False)
    screen = screen_with(tmp_path, "bad", classifier="screen_test_clf:judge")
    module = sys.modules["screen_test_clf"]
    assert screen.check("the secret is out") == "classifier: mentions a secret"
    assert screen.check("bad secret") == "blocklist"        # rules before the classifier
    assert screen.check("all fine") is None
    assert Screen(ScreenConfig(blocklist=None,
                               classifier="screen_test_clf:yes")).check("x") == "classifier"

    # In a stream it is called once per release, with the released text plus the new part.
    module.calls.clear()
    outs, rest, stream = stream_all(screen, ["hello ", "ba", "dminton ", "friend"])
    assert "".join(outs) + rest == "hello badminton friend"
    assert module.calls == ["hello ", "hello badminton ", "hello badminton friend"]
    module.calls.clear()
    outs, rest, stream = stream_all(screen, ["fine ", "and ", "secret ", "stuff"])
    assert stream.blocked == "classifier: mentions a secret"
    assert stream.released == "fine and " and outs[2:] == ["", ""] and rest == ""
    assert module.calls == ["fine ", "fine and ", "fine and secret "]

    # Without a list the classifier alone makes the screen active.
    only = Screen(ScreenConfig(blocklist=None, classifier="screen_test_clf:judge"))
    assert only.active and only.check("a secret") == "classifier: mentions a secret"


# ---- streaming ----

VARIANTS = ["fuck", "FuCk", "ｆｕｃｋ", "𝐟𝐮𝐜𝐤", "f\u200bu\u200dck", "f\u00aduc\ufeffk",
            "Ｆ\u2060𝐮ck"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tail", [" that", "", "!"])
def test_blocked_phrase_never_released_however_split(tmp_path, variant, tail):
    screen = screen_with(tmp_path, "fuck")
    text = f"well {variant}{tail}"
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    splits += [[text[:i], text[i:j], text[j:]]
               for i in range(len(text)) for j in range(i, len(text))]
    splits.append(list(text))                              # character by character
    for deltas in splits:
        outs, rest, stream = stream_all(screen, deltas)
        released = "".join(outs) + rest
        assert stream.blocked == "blocklist", deltas
        # Released: all that came before the phrase, up to the last delta that ended before the
        # match was decided (the character after the phrase, or finish), and nothing of the phrase.
        ends = [sum(map(len, deltas[:k])) for k in range(len(deltas) + 1)]
        last = max(e for e in ends if e <= len("well ") + len(variant))
        assert released == stream.released == text[:min(last, len("well "))], deltas
        assert "fuck" not in normalize_text(released)[0]
        assert_never_released(screen, text, released)


def test_blocked_as_soon_as_the_match_is_decided(tmp_path):
    screen = screen_with(tmp_path, "bad")
    stream = screen.stream()
    assert stream.feed("that is ") == "that is "
    assert stream.feed("bad") == "" and stream.blocked is None   # could still be "badminton"
    assert stream.held == "bad"
    assert stream.feed(" news") == "" and stream.blocked == "blocklist"  # decided before finish
    assert stream.feed("more") == "" and stream.finish() == ""
    assert stream.released == "that is "


def test_match_at_the_end_is_blocked_by_finish(tmp_path):
    stream = screen_with(tmp_path, "bad").stream()
    assert stream.feed("so bad") == "so "
    assert stream.finish() == "" and stream.blocked == "blocklist"


def test_held_while_it_could_match_then_released(tmp_path):
    screen = screen_with(tmp_path, "bad")
    stream = screen.stream()
    assert stream.feed("I play ") == "I play "
    assert stream.feed("ba") == ""
    assert stream.feed("d") == ""
    assert stream.feed("minton") == "badminton"
    assert stream.finish() == "" and stream.blocked is None
    assert stream.released == "I play badminton"


def test_regex_partial_match_is_held(tmp_path):
    stream = screen_with(tmp_path, r"re:code-\d{4}").stream()
    assert stream.feed("my co") == "my "
    assert stream.feed("de-12") == ""
    assert stream.feed("34") == "" and stream.blocked is None   # at the end: \d{4} matched, held
    assert stream.finish() == "" and stream.blocked == r"pattern 're:code-\d{4}'"
    assert stream.released == "my "


def test_clean_reply_released_in_full_and_as_it_streams(tmp_path):
    screen = screen_with(tmp_path, "bad", "bad word")
    outs, rest, stream = stream_all(screen, ["hello ", "there ", "friend"])
    assert outs == ["hello ", "there ", "friend"] and rest == ""
    text = ("Ｂａ\u200bdminton, ﬁne  \u00a0class\u200d\n badish? no: bads. "
            "émigré 𝐛𝐚𝐝𝐠𝐞")
    assert screen.check(text) is None
    outs, rest, stream = stream_all(screen, list(text))
    assert "".join(outs) + rest == text and stream.released == text and stream.blocked is None
    assert len("".join(outs)) > len(text) // 2              # most of it before the end


def test_feed_after_finish_is_an_error(tmp_path):
    stream = screen_with(tmp_path, "bad").stream()
    stream.feed("hi")
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed("more")


SETUPS = {
    "test list": (("bad", "bad word", "ass", r"re:code-\d{4}", r"re:x+y"),
                  ["bad", "badminton", "ba", "d", "b\u200bad", "ＢＡＤ", "𝐛𝐚𝐝", "bad word",
                   "bad  word", "wor", "class", "ass", "code-12", "34", "code-1234", "x", "xx",
                   "y", " ", "  ", "\n", "\u200b", "\u00ad", ",", "é", "ﬁ", "z"]),
    "builtin": (None, ["fu", "ck", "ing", "shit", "ty", "Ｆｕｃｋ", "piss", " off", "class",
                       "4111", " ", "1111", "-", "99", "hello", ".", "\u200b", "\n"]),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_nothing_released_is_ever_part_of_a_match(tmp_path, setup):
    lines, vocab = SETUPS[setup]
    screen = screen_with(tmp_path, *lines) if lines else Screen(ScreenConfig())
    rng = random.Random(1234)
    blocked = clean = 0
    for _ in range(400):
        text = "".join(rng.choice(vocab) for _ in range(rng.randint(1, 10)))
        cuts = sorted(rng.sample(range(1, len(text) + 1), rng.randint(0, min(len(text), 6))))
        deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=False)]
        outs, rest, stream = stream_all(screen, deltas)
        released = "".join(outs) + rest
        assert released == stream.released
        assert_never_released(screen, text, released)
        if screen.check(text) is None:
            assert stream.blocked is None and released == text
            clean += 1
        else:
            assert stream.blocked is not None
            blocked += 1
    assert blocked > 30 and clean > 30                     # both kinds were exercised


# ---- confidence and counts ----

def test_confidence():
    assert Screen(ScreenConfig(blocklist=None)).confidence(-9.0) is None            # no threshold
    flag = Screen(ScreenConfig(blocklist=None, min_mean_logprob=-2.0))
    assert flag.confidence(-3.0) == "flag"
    assert flag.confidence(-2.0) is None and flag.confidence(-0.5) is None
    assert flag.confidence(None) is None
    # broken scores
    assert flag.confidence(math.nan) == "flag"
    refuse = Screen(ScreenConfig(blocklist=None, min_mean_logprob=-2.0, low_confidence="refuse"))
    assert refuse.confidence(-3.0) == "refuse" and refuse.confidence(-1.0) is None
    off = Screen(ScreenConfig(enabled=False, min_mean_logprob=-2.0))
    assert off.confidence(-3.0) is None


def test_counts_are_thread_safe():
    screen = Screen(ScreenConfig(blocklist=None))
    assert screen.counts() == {"passed": 0, "blocked_reply": 0, "blocked_user": 0,
                               "low_confidence_flagged": 0, "low_confidence_refused": 0}

    def work():
        for _ in range(2000):
            screen.record("passed")
            screen.record("blocked_user")

    threads = [threading.Thread(target=work) for _ in range(8)]
    interval = sys.getswitchinterval()
    # switch threads often: an unlocked count loses updates
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    counts = screen.counts()
    assert (counts["passed"] == 16000 and counts["blocked_user"] == 16000
            and counts["blocked_reply"] == 0)
    # a copy: the screen's counts are untouched
    counts["passed"] = 0
    assert screen.counts()["passed"] == 16000
