"""Replies to task prompts, sampled by the serving engine and read as a user reads them: what GRPO
(train/grpo.py) learns from, and what its evaluation scores.

A prompt is the problem's text as a user message in the model's chat template, rendered as
Service.chat renders it (the template's default system message included); its replies come from
generate.Engine, the n samples of a prompt sharing one prefill, ended by the chat's stop ids. A
reply's text is what the server shows: its tokens through the service's TextStream (UTF-8, stop
strings) and the screen (a blocked phrase ends the reply with the refusal; screen.low_confidence
=refuse refuses a reply below screen.min_mean_logprob). The reward function reads that text.

The tokens a reply is trained on are those its text came from: up to the token at which a stop
string or the screen ended the text; else every generated token and the stop id that ended the reply
(the model chose to stop there). A reply cut at max_tokens has no stop id.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jaxgpt import cli
from jaxgpt.config import Config
from jaxgpt.data import chat, tasks
from jaxgpt.data.tasks import Problem
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import ConfigError
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen
from jaxgpt.generate.text import TextStream
from jaxgpt.model.gpt import GPT


@dataclasses.dataclass
class Reply:
    problem: Problem
    prompt: list[int]        # the prompt's ids
    tokens: list[int]        # the trained reply ids (the stop id included when it ended the reply)
    logprobs: list[float]    # the sampler's log-probability of each of tokens
    text: str                # what the user sees
    finish_reason: str       # stop | length | content_filter
    reward: float = 0.0      # the run's reward function on (problem, text)
    correct: bool = False    # the task's own check of text


def load_reward(spec: str) -> Callable[[Problem, str], float]:
    """The function "module:function" names (grpo.reward); "": the task's own (data/tasks.py)."""
    return cli.named_function(spec, "grpo.reward") if spec else tasks.reward


class Reading:
    """One reply read as the service reads it, a token at a time: `add` each new token (False once
    the text has ended), then `finish`."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], screen: Screen):
        self.screen = screen
        hold = (screen.cfg.min_mean_logprob is not None
                and screen.cfg.low_confidence == "refuse")
        self.stream = TextStream(tokenizer, stop, screen.stream() if screen.active else None,
                                 screen.cfg.refusal, hold_all=hold)
        self.kept = 0  # tokens the text came from

    def add(self, token: int) -> bool:
        if self.stream.finish_reason is not None:
            return False
        self.stream.add([token])
        self.kept += 1
        return self.stream.finish_reason is None

    def finish(self, logprobs: list[float]) -> str:
        """The text; low confidence is judged on the kept tokens' mean log-probability."""
        kept = logprobs[:self.kept]
        verdict = self.screen.confidence(sum(kept) / len(kept)) if kept else None
        self.stream.finish(refuse=verdict == "refuse")
        return self.stream.text


def read_reply(reading: Reading, problem: Problem, prompt: list[int], request) -> Reply:
    """The Reply of a finished engine request whose tokens `reading` has read."""
    text = reading.finish(request.logprobs)
    ended_by_text = reading.stream.finish_reason
    tokens, logprobs = request.tokens[:reading.kept], request.logprobs[:reading.kept]
    if ended_by_text is None and request.stopped_by is not None:
        tokens, logprobs = tokens + [request.stopped_by[0]], logprobs + [request.stopped_by[1]]
    return Reply(problem, list(prompt), list(tokens), list(logprobs), text,
                 ended_by_text or request.finish_reason)


class Sampler:
    """Replies of a model to task problems through one engine configuration (slots fixed, so each
    call reuses the compiled prefill and decode)."""

    def __init__(self, cfg: Config, model: GPT, tokenizer: Tokenizer, slots: int, mesh=None):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.slots, self.mesh = slots, mesh
        self.screen = Screen(cfg.screen)
        self.reward_fn = load_reward(cfg.grpo.reward)
        self.stop_ids = chat.layout(tokenizer).stop_ids
        self.prompt_budget = cfg.model.seq_len - cfg.grpo.max_new_tokens

    def prompt_ids(self, problem: Problem) -> list[int]:
        """The problem as a user message, prompting the assistant's reply (as Service.chat)."""
        ids = chat.render_prompt([{"role": "user", "content": problem.prompt}], self.tokenizer,
                                 self.prompt_budget)
        if ids is None:
            raise ConfigError(f"model.seq_len={self.cfg.model.seq_len}: too short for a task "
                              f"prompt and grpo.max_new_tokens={self.cfg.grpo.max_new_tokens}")
        return ids.tolist()

    def replies(self, params, problems: list[Problem], sampling: SamplingParams,
                seeds: list[int]) -> list[list[Reply]]:
        """sampling.n replies to each problem (problem j's drawn with seeds[j]), scored."""
        engine = Engine(self.model, params, self.tokenizer, slots=self.slots, mesh=self.mesh)
        owner = {}
        for j, (problem, seed) in enumerate(zip(problems, seeds, strict=True)):
            prompt = self.prompt_ids(problem)
            params_j = dataclasses.replace(sampling, seed=seed, stop_ids=self.stop_ids)
            for rid in engine.submit(prompt, params_j):
                owner[rid] = (j, prompt, Reading(self.tokenizer, self.cfg.grpo.stop, self.screen))
        while engine.busy:
            for rid, new in engine.step().items():
                reading = owner[rid][2]
                if not all(reading.add(t) for t in new):  # the text ended: decode no further
                    engine.cancel(rid, reading.stream.finish_reason)
        out: list[list[Reply]] = [[] for _ in problems]
        for rid, (j, prompt, reading) in sorted(owner.items()):
            reply = read_reply(reading, problems[j], prompt, engine.requests.pop(rid))
            reply.reward = float(self.reward_fn(problems[j], reply.text))
            reply.correct = tasks.reward(problems[j], reply.text) == 1.0
            out[j].append(reply)
        return out
