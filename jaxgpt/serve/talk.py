"""Talk to a trained model in the terminal: streamed, screened replies over a multi-turn history.

    python -m jaxgpt.talk RUN_OR_EXPORT [sample.system="Be brief."] [sample.temperature=0.7 ...]
                                        [screen.blocklist=FILE screen.min_mean_logprob=-4 ...]

At the `you>` prompt: a message, or /reset (a new conversation), /temperature N, /system TEXT,
/up and /down (judge the last reply), /help, /quit. With talk.feedback_db=PATH every reply is
recorded there (jaxgpt.feedback, source "talk") and /up, /down judge it; without it nothing is.
Ctrl-D or Ctrl-C at the prompt ends the session; Ctrl-C during a reply stops that reply. The
oldest turns are dropped so that the prompt leaves room for the reply (sample.max_new_tokens, or
half the context if less): a long conversation never overflows it.
Replies go through the screen (the `screen` section); a screened reply ends with the refusal, and
the history keeps what was shown.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from jaxgpt import cli
from jaxgpt.config import Config, SampleConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen
from jaxgpt.generate.service import Service
from jaxgpt.model.gpt import GPT
from jaxgpt.serve.feedback import Feedback
from jaxgpt.store import runs

HELP = ("/reset: a new conversation   /temperature N: sampling temperature (0: greedy)   "
        "/system TEXT: the system message (and a new conversation)   "
        "/up, /down: judge the last reply   /quit (or Ctrl-D)")
NOTES = {"length": "[cut at the reply's token limit]", "content_filter": "[screened]",
         "cancelled": "[stopped]"}


@dataclass(frozen=True)
class TalkConfig:
    # record every reply in this SQLite file (jaxgpt.feedback); /up, /down judge it
    feedback_db: str = ""


@dataclass(frozen=True)
class TalkCommand(Config):
    talk: TalkConfig = field(default_factory=TalkConfig)


class Talk:
    """The conversation and its commands; reads lines from `read`, writes the replies to `out`;
    records replies in `feedback` if given."""

    def __init__(self, service: Service, sample: SampleConfig, out: TextIO = sys.stdout,
                 feedback: Feedback | None = None, model_id: str = "jaxgpt"):
        self.service, self.sample, self.out = service, sample, out
        self.feedback, self.model_id, self.last_id = feedback, model_id, None
        self.params = SamplingParams.from_config(sample, n=1)
        self.system = sample.system
        self.messages: list[dict] = []
        self.turns = 0  # replies so far, in every conversation of the session
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self, read: Callable[[str], str] = input) -> None:
        self.say(f"{HELP}\n")
        while True:
            try:
                line = read("you> ").strip()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: a clean goodbye
                self.say("\n")
                return
            if line and not self.command(line):
                return

    def command(self, line: str) -> bool:
        """Handle one input line; False to end the session."""
        word, _, rest = line.partition(" ")
        if word in ("/quit", "/exit"):
            return False
        if word == "/help":
            self.say(HELP + "\n")
        elif word == "/reset":
            self.reset()
            self.say("[a new conversation]\n")
        elif word == "/temperature":
            try:
                value = float(rest)
                if value < 0:
                    raise ValueError
            except ValueError:
                self.say(f"[/temperature takes a number >= 0, not {rest!r}]\n")
            else:
                self.params = dataclasses.replace(self.params, temperature=value)
                self.say(f"[temperature {value:g}]\n")
        elif word == "/system":
            self.system = rest.strip()
            self.reset()
            self.say(f"[system message {'set' if self.system else 'cleared'}; "
                     "a new conversation]\n")
        elif word in ("/up", "/down"):
            if self.feedback is None or self.last_id is None:
                self.say("[nothing to judge: start with talk.feedback_db=PATH]\n"
                         if self.feedback is None else "[no reply to judge yet]\n")
            else:
                try:
                    self.feedback.judge(self.last_id, rating=word[1:])
                    self.say(f"[recorded: {word[1:]}]\n")
                except JaxgptError as e:
                    self.say(f"[not recorded: {e}]\n")
        elif word.startswith("/"):
            self.say(f"[unknown command {word}] {HELP}\n")
        else:
            self.reply(line)
        return True

    def reply(self, text: str) -> None:
        conversation = self.messages + [{"role": "user", "content": text}]
        try:
            # each reply its own seed (sample.seed, +1, +2, ...): the same seed every turn draws the
            # same random numbers, and a small model then answers every turn alike
            params = dataclasses.replace(self.params,
                                         seed=(self.sample.seed + self.turns) % 2 ** 32)
            stream = self.service.chat(conversation, params)
        # too long even alone, or characters the tokenizer lacks
        except (ValueError, JaxgptError) as e:
            self.say(f"[not sent: {e}]\n")
            return
        self.say("jaxgpt> ")
        try:
            for delta in stream:
                self.say(delta.text)
        except KeyboardInterrupt:  # stop this reply, keep the session
            stream.cancel()
        [reply] = stream.result()
        note = (f"[the reply failed: {reply.error}]" if reply.error
                else NOTES.get(reply.finish_reason, ""))
        if reply.flagged:
            note += f" [low confidence: mean log-probability {reply.mean_logprob:.2f}]"
        self.say(("\n" + note.strip() if note else "") + "\n")
        self.messages = conversation + [{"role": "assistant", "content": reply.text}]
        self.turns += 1
        if self.feedback is not None and not reply.error:  # the whole conversation, as typed
            self.last_id = f"talk-{secrets.token_hex(12)}"
            self.feedback.record(self.last_id, conversation, [reply], model=self.model_id,
                                 source="talk", sampling=params)

    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        # Ctrl-C must stop a reply even where the parent left SIGINT ignored (a shell's `cmd &`,
        # nohup) or blocked (a mask inherited from the thread that started us)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        cfg = cli.tool_config(TalkCommand, settings).talk  # every key checked, talk.* included
        loaded = runs.load(operands[0],
                           [s for s in settings if not s.lstrip("-").startswith("talk.")])
        try:  # line editing and history for input(), where the platform has readline
            importlib.import_module("readline")
        except ImportError:
            pass
        engine = Engine(GPT(loaded.cfg.model), loaded.params, loaded.tokenizer, slots=1)
        source = Path(operands[0]).absolute()
        with (Feedback(cfg.feedback_db) if cfg.feedback_db
              else contextlib.nullcontext()) as feedback, \
                Service(engine, loaded.tokenizer, Screen(loaded.cfg.screen)) as service:
            service.warm_up(loaded.cfg.sample.system,  # compile first, for talk's sampling
                            params=SamplingParams.from_config(loaded.cfg.sample, n=1))
            print(f"jaxgpt talk: {loaded.where} (step {loaded.step}, "
                  f"context {loaded.cfg.model.seq_len} tokens)"
                  + (f"; recording in {cfg.feedback_db}" if feedback else ""))
            Talk(service, loaded.cfg.sample, feedback=feedback,
                 model_id=source.parent.name if source.name == "export" else source.name).run()

    cli.run("python -m jaxgpt.talk", cli.Command(
        run, usage="RUN_OR_EXPORT [sample.system=TEXT sample.temperature=0.8 screen.blocklist=FILE "
                   "talk.feedback_db=PATH ...]",
        root=TalkCommand, sections=("talk", "sample", "screen", "model")), argv)


if __name__ == "__main__":
    main()
