"""Screening of a chat model's replies (and of user messages): nothing blocked reaches a reader.

A model streams its reply as text deltas, and a reader sees each delta as it comes. A blocked phrase
can be split across deltas ("fu" + "ck"), written with look-alike letters
("ｆｕｃｋ", "𝐟𝐮𝐜𝐤"), or carry invisible characters ("f\u200buck"). So the rules match a
*normalised* text (see `normalize`), and `ScreenStream` holds back every piece of raw text that
could still become part of a match, releasing it only once no continuation of the reply can make
it one.

What could still become a match comes from the `regex` module's partial matching: a search with
`partial=True` also reports a match cut off by the end of the text. A full match that ends exactly
at the end is held too: "bad" may yet turn into "badminton", which the word boundary lets through.
Normalisation is per character, so the normalised text only ever grows at its end (a whitespace run
merges into one space) and a position in it maps back to the raw character it came from.

Rules, in the order they are checked (the first match is the reason given):
  blocklist  words and phrases of `screen.blocklist`, on word boundaries ("ass" passes "class");
  re:LINES   regular expressions of the same file, on the normalised text (so written in lower
             case);
  classifier `screen.classifier="module:function"`, called with raw text; truthy blocks (a str is
             the reason). A stream calls it once per release, with the text released so far plus
             the new part, and never twice on the same text.
This module must not import jax: it is used by servers and tools that never touch a device.
"""
from __future__ import annotations

import threading
import unicodedata
from pathlib import Path
from typing import Callable

import regex

from jaxgpt import cli
from jaxgpt.config import ScreenConfig
from jaxgpt.errors import ConfigError

BUILTIN_BLOCKLIST = Path(__file__).with_name("blocklist.txt")
COUNT_KEYS = ("passed", "blocked_reply", "blocked_user", "low_confidence_flagged",
              "low_confidence_refused")


def normalize_text(text: str) -> tuple[str, list[int]]:
    """(normalised text, for each of its characters the index of the raw character it came from).

    Per raw character: NFKC (full-width and mathematical letters become plain ones), then casefold;
    format characters (Unicode category Cf: zero-width space and joiners, soft hyphen, BOM) are
    dropped; a run of whitespace becomes one space.
    """
    chars: list[str] = []
    index: list[int] = []
    _normalize_into(text, 0, chars, index)
    return "".join(chars), index


def _normalize_into(text: str, offset: int, chars: list[str], index: list[int]) -> None:
    """Append the normalisation of `text` (starting at raw index `offset`) to `chars` and
    `index`."""
    for i, ch in enumerate(text, offset):
        for c in unicodedata.normalize("NFKC", ch).casefold():
            if unicodedata.category(c) == "Cf":
                continue
            if c.isspace():
                if chars and chars[-1] == " ":
                    continue  # the run already has its space (it may have come in an earlier delta)
                c = " "
            chars.append(c)
            index.append(i)


def load_rules(spec: str | None) -> list[tuple[regex.Pattern, str]]:
    """The blocklist `spec` (a path, "builtin" or None/"none") as (compiled pattern, reason)
    pairs."""
    if spec is None or spec.strip().lower() == "none":
        return []
    path = BUILTIN_BLOCKLIST if spec == "builtin" else Path(spec).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"screen.blocklist={spec}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"screen.blocklist={spec}: cannot read it ({e})") from None
    phrases, patterns = set(), []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path if spec != 'builtin' else path.name}:{number}"
        if line.startswith("re:"):
            if not line[3:]:
                raise ConfigError(f"{where}: empty regular expression 're:'")
            try:
                pattern = regex.compile(line[3:])
            except regex.error as e:
                raise ConfigError(f"{where}: bad regular expression '{line}' ({e})") from None
            if pattern.fullmatch(""):
                raise ConfigError(f"{where}: regular expression '{line}' matches the empty text")
            patterns.append((pattern, f"pattern '{line}'"))
        else:
            phrase = normalize_text(line)[0].strip()
            if not phrase:
                raise ConfigError(f"{where}: phrase {line!r} is empty once normalised")
            phrases.add(phrase)
    rules = patterns
    if phrases:
        # Longest first, so a phrase is tried before a shorter one it starts with
        # ("bad word", "bad").
        alternatives = "|".join(regex.escape(p)
                                for p in sorted(phrases, key=lambda p: (-len(p), p)))
        rules = [(regex.compile(rf"(?<!\w)(?:{alternatives})(?!\w)"), "blocklist")] + patterns
    return rules


def load_classifier(spec: str | None) -> Callable[[str], object] | None:
    """The function named by "module:function" (function may be dotted: "module:Class.method")."""
    return cli.named_function(spec, "screen.classifier") if spec else None


class Screen:
    """The rules of one `ScreenConfig`, the counts of what was decided, and streams for replies."""

    def __init__(self, cfg: ScreenConfig):
        self.cfg = cfg
        # A disabled screen reads no files: a broken list that is switched off is no error.
        self._rules = load_rules(cfg.blocklist) if cfg.enabled else []
        self._classifier = load_classifier(cfg.classifier) if cfg.enabled else None
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNT_KEYS, 0)

    @property
    def active(self) -> bool:
        return self.cfg.enabled and bool(self._rules or self._classifier)

    def check(self, text: str) -> str | None:
        """Why the whole `text` is blocked, or None if it passes."""
        if not self.active:
            return None
        reason, _ = self._scan(normalize_text(text)[0], 0, final=True)
        return reason or self._classify(text)

    def stream(self) -> ScreenStream:
        return ScreenStream(self)

    def record(self, decision: str) -> None:
        with self._lock:
            self._counts[decision] = self._counts.get(decision, 0) + 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def confidence(self, mean_logprob: float | None) -> str | None:
        """cfg.low_confidence ("flag" or "refuse") if the reply's mean token log-probability is
        below cfg.min_mean_logprob (a NaN mean counts as below: it means the scores are broken),
        else None."""
        threshold = self.cfg.min_mean_logprob
        if not self.cfg.enabled or threshold is None or mean_logprob is None:
            return None
        return None if mean_logprob >= threshold else self.cfg.low_confidence

    def _scan(self, text: str, pos: int, final: bool) -> tuple[str | None, int]:
        """(the reason a rule matches `text` for good, the position from which text must be held).

        A match that ends before the end of the text is final (the characters after it are already
        there, so the word boundary is decided). One that touches the end, or is cut off by it, only
        holds text back, unless `final` (the reply is complete). `pos`: no match starts before it.
        """
        hold = len(text)
        for pattern, reason in self._rules:
            full = pattern.search(text, pos)
            if full and (final or full.end() < len(text)):
                return reason, hold
            if full:
                hold = min(hold, full.start())
            if not final and (maybe := pattern.search(text, pos, partial=True)):
                hold = min(hold, maybe.start())
        return None, hold

    def _classify(self, text: str) -> str | None:
        if self._classifier is None:
            return None
        verdict = self._classifier(text)
        if not verdict:
            return None
        return f"classifier: {verdict}" if isinstance(verdict, str) else "classifier"


class ScreenStream:
    """One reply's screening: `feed` each delta, then `finish`; release only what they return."""

    def __init__(self, screen: Screen):
        self._screen = screen
        self._raw = ""
        self._chars: list[str] = []  # the normalised raw text, grown delta by delta
        self._index: list[int] = []
        self._hold = 0               # normalised position before which no match can ever start
        self._finished = False
        self.blocked: str | None = None
        self.released = ""

    @property
    def held(self) -> str:
        """The raw text received but not released (what a blocked reply's refusal replaces)."""
        return self._raw[len(self.released):]

    def feed(self, delta: str) -> str:
        """The text now safe to release ("" while it is held, and forever once blocked)."""
        if self._finished:
            raise RuntimeError("ScreenStream.feed after finish")
        if self.blocked is not None:
            return ""
        start = len(self._raw)
        self._raw += delta
        if not self._screen.active:
            self.released = self._raw
            return delta
        _normalize_into(delta, start, self._chars, self._index)
        return self._advance(final=False)

    def finish(self) -> str:
        """The end of the reply: the rest of the held text if the whole reply is clean, else ""."""
        if self._finished or self.blocked is not None or not self._screen.active:
            self._finished = True
            return ""
        self._finished = True
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = "".join(self._chars)
        reason, hold = self._screen._scan(text, self._hold, final)
        if reason is None:
            self._hold = hold
            safe = self._index[hold] if hold < len(text) else len(self._raw)
            if safe <= len(self.released):
                return ""
            reason = self._screen._classify(self._raw[:safe])
            if reason is None:
                new = self._raw[len(self.released):safe]
                self.released += new
                return new
        self.blocked = reason
        return ""
