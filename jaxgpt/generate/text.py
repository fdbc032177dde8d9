"""From one sample's token ids to the text a person may see, in three stages that each hold text
back only as long as they must: bytes into whole UTF-8 characters (a token can end inside one); the
characters past any stop string's possible start (a stop string never shows, not even in part); and
the screen (`generate/screen.py`: a blocked phrase never shows, even split across tokens). The
service streams every reply through it; rollouts and the lm-eval backend read replies as a user
would see them through it too.
"""
from __future__ import annotations

import codecs

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.screen import ScreenStream


class TextStream:
    """One sample's ids -> released text; `finish_reason` is set once a stop string or the screen
    ends it.

    hold_all keeps everything back until finish(), for replies that are scored before anyone sees
    them (screen.low_confidence=refuse)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (),
                 screen: ScreenStream | None = None, refusal: str = "", hold_all: bool = False):
        self.tokenizer, self.stop, self.screen = tokenizer, stop, screen
        self.refusal, self.hold_all = refusal, hold_all
        # keeps a split character's bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""       # decoded, not yet past the stop-string check
        self._held = ""          # past every check, kept back by hold_all
        self._ended = False      # a stop string, the screen or finish() ended the input
        self.text = ""           # everything released
        self.finish_reason: str | None = None

    def add(self, ids) -> str:
        """New ids in; the text now safe to release."""
        if self._ended:
            return ""
        return self._release(self._utf8.decode(self.tokenizer.decode_bytes(ids)), final=False)

    def finish(self, refuse: bool = False) -> str:
        """The reply ended (stop id, length, cancel): the rest, after the last checks; with refuse
        (a held-back reply scored too low) the refusal instead of what was held."""
        out = "" if self._ended else self._release(self._utf8.decode(b"", final=True), final=True)
        if refuse and self.finish_reason != "content_filter":
            self._held, self.finish_reason = "", "content_filter"
            return out + self._out(self.refusal)
        held, self._held = self._held, ""
        return out + self._out(held)

    def _out(self, text: str) -> str:
        self.text += text
        return text

    def _release(self, new: str, final: bool) -> str:
        self._pending += new
        cut = min((i for i in (self._pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: keep what precedes it, drop the rest
            ready, self._pending, final = self._pending[:cut], "", True
            self.finish_reason = "stop"
        else:
            keep = 0 if final else self._stop_prefix_length(self._pending)
            ready, self._pending = (self._pending[:len(self._pending) - keep],
                                    self._pending[len(self._pending) - keep:])
        self._ended = final
        if self.screen is not None:
            ready = self.screen.feed(ready) + (self.screen.finish() if final else "")
            if self.screen.blocked:  # what was released stays; the refusal ends the reply
                self._ended, self.finish_reason, self._held = True, "content_filter", ""
                sep = " " if self.text and not self.text[-1].isspace() else ""
                return self._out(sep + self.refusal)
        if self.hold_all:
            self._held += ready
            return ""
        return self._out(ready)

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of text that some stop string starts with."""
        for k in range(min(len(text), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0
