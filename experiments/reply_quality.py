"""How a chat model's replies read, counted rather than eyeballed: prompts cut from conversations,
replies sampled through the serving engine, and measures of how varied and how repetitive they are.

    distinct_1 / distinct_2   distinct words (word pairs) over all words (pairs) of all the replies:
                              low when every reply says the same things
    repeats_a_line            the fraction of replies in which a line (or a sentence) comes twice
    same_opening              the fraction of replies whose first four words open another reply too:
                              the "I am not sure if i ..." for every prompt
    empty                     the fraction of replies with no words at all

Words are lower-cased runs of letters, digits and apostrophes, so punctuation and case do not make
two replies "distinct".
"""
from __future__ import annotations

import collections
import dataclasses
import random
import re

from jaxgpt.config import ScreenConfig
from jaxgpt.data import dialogs
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen
from jaxgpt.generate.service import Service
from jaxgpt.model.gpt import GPT
from jaxgpt.store import runs

WORD = re.compile(r"[\w']+")
OPENING_WORDS = 4


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def distinct(replies: list[str], n: int) -> float:
    """Distinct n-grams (within each reply) over all n-grams of all replies; 0 when none."""
    grams = [tuple(w[i:i + n]) for w in map(words, replies) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats_a_line(text: str) -> bool:
    """A line or a sentence that comes twice in the reply (compared by its words)."""
    pieces = [tuple(words(p)) for p in re.split(r"[\n.!?]+", text)]
    pieces = [p for p in pieces if p]
    return len(set(pieces)) < len(pieces)


def same_opening(replies: list[str]) -> list[bool]:
    """For each reply: do its first four words (it has at least four) open another reply too?"""
    openings = [tuple(words(r)[:OPENING_WORDS]) for r in replies]
    counts = collections.Counter(o for o in openings if len(o) == OPENING_WORDS)
    return [len(o) == OPENING_WORDS and counts[o] > 1 for o in openings]


def measures(replies: list[str]) -> dict:
    n = max(len(replies), 1)
    return {"replies": len(replies),
            "distinct_1": distinct(replies, 1), "distinct_2": distinct(replies, 2),
            "repeats_a_line": sum(map(repeats_a_line, replies)) / n,
            "same_opening": sum(same_opening(replies)) / n,
            "empty": sum(not words(r) for r in replies) / n,
            "mean_words": sum(len(words(r)) for r in replies) / n}


def contexts(source: str, n: int, seed: int, fits) -> list[list[dict]]:
    """n conversations of `source` in a seeded order, each cut after one of its user turns (chosen
    at random); those that `fits` refuses (a user message longer than the context leaves) are
    skipped."""
    return [context for context, _ in _cut(source, n, seed, fits, answered=False)]


def exchanges(source: str, n: int, seed: int, fits) -> list[tuple[list[dict], str]]:
    """As `contexts`, but cut only after user turns the conversation answers, each with that answer:
    what the people replied, for measuring against the model's replies to the same contexts."""
    return list(_cut(source, n, seed, fits, answered=True))


def _cut(source, n, seed, fits, answered):
    rng = random.Random(seed)
    conversations = dialogs.load(source).conversations
    found = 0
    for k in rng.sample(range(len(conversations)), len(conversations)):
        c = conversations[k]
        users = [i for i, m in enumerate(c) if m["role"] == "user"
                 and (not answered or (i + 1 < len(c) and c[i + 1]["role"] == "assistant"))]
        if not users:
            continue
        i = rng.choice(users)
        if fits(c[:i + 1]):
            yield c[:i + 1], (c[i + 1]["content"] if answered else None)
            found += 1
            if found == n:
                return


# the measures a setting is matched on against the people's replies (mean_words is not a rate)
MATCHED = ("distinct_1", "distinct_2", "repeats_a_line", "same_opening", "empty")


def distance(measured: dict, reference: dict) -> float:
    """How far one set of replies' measures is from another's (the people's replies to the same
    contexts): the sum of absolute differences of the rates in MATCHED. More random sampling raises
    distinct-n past the people's, greedier sampling lowers it and raises same_opening, so the
    setting nearest the people is the one whose replies vary as much as theirs, no more."""
    return sum(abs(measured[k] - reference[k]) for k in MATCHED)


def sample_replies(loaded: runs.LoadedModel, prompts: list[list[dict]], prompt_seeds: list[int],
                   params: SamplingParams, slots: int = 64,
                   screen: bool = False) -> list[list[str]]:
    """`params.n` replies of the model `loaded` (runs.load) to each prompt, prompt i sampled with
    seed prompt_seeds[i] (one prefill per prompt, its n samples decoding together with the other
    prompts' in the engine's slots)."""
    engine = Engine(GPT(loaded.cfg.model), loaded.params, loaded.tokenizer, slots=slots)
    screener = Screen(loaded.cfg.screen if screen else ScreenConfig(enabled=False))
    with Service(engine, loaded.tokenizer, screener) as service:
        streams = [service.chat(p, dataclasses.replace(params, seed=seed))
                   for p, seed in zip(prompts, prompt_seeds, strict=False)]
        return [[r.text for r in s.result()] for s in streams]
