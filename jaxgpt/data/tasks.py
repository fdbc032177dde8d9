"""Tasks with exact answers, made here (no download): prompts for reinforcement learning on
verifiable rewards (GRPO) and for task scores, each with a fixed held-out set.

    arithmetic   "What is 4821 + 367?"            answer "5188"   (sums and differences, 2-4 digits)
    spelling     "How many times does the letter 'r' appear in 'strawberry'?"   answer "3"

A task is a list of Problem(prompt, answer); `reward(problem, reply)` is 1.0 when the last number in
the reply (the text the user sees) is the answer, else 0.0. The split is by seed: `problems(task,
"train", n)` and `problems(task, "val", n)` never share a prompt, and the same call gives the same
problems on every machine.
"""
from __future__ import annotations

import random
import re
from typing import NamedTuple

from jaxgpt.errors import ConfigError

TASKS = ("arithmetic", "spelling")
# words whose letters are counted: common English words, several with repeated letters
WORDS = (
    "strawberry banana committee mississippi occurrence bookkeeper balloon raspberry engineer "
    "successful accommodate necessary parallel tomorrow beginning different assessment "
    "possession embarrass millennium professor recommend aggressive address broccoli cinnamon "
    "coffee hello letter pepper puzzle summer teeth village yellow apple butterfly "
    "bubble chocolate elephant giraffe grammar hippopotamus kangaroo lemonade marshmallow "
    "noodle octopus pineapple rhythm scissors spaghetti tennis umbrella vanilla waterfall"
).split()
_SEEDS = {"train": 1, "val": 2}
VAL_SIZE = 200  # the held-out set: the first VAL_SIZE val problems
_NUMBER = re.compile(r"-?\d[\d,]*")


class Problem(NamedTuple):
    prompt: str
    answer: str


def _arithmetic(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    if rng.random() < 0.5:
        return Problem(f"What is {a} + {b}? Answer with the number.", str(a + b))
    a, b = max(a, b), min(a, b)
    return Problem(f"What is {a} - {b}? Answer with the number.", str(a - b))


def _spelling(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)) if rng.random() < 0.8 else "abcdefghijklmnopqrstuvwxyz")
    return Problem(f"How many times does the letter '{letter}' appear in '{word}'? Answer with "
                   f"the number.", str(word.count(letter)))


def _maker(task: str):
    if task not in TASKS:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    return _arithmetic if task == "arithmetic" else _spelling


def problems(task: str, split: str, n: int) -> list[Problem]:
    """n distinct problems of `task` from `split` ("train" or "val"); a val prompt never appears in
    train (train draws past the prompts val holds)."""
    make = _maker(task)
    if split not in _SEEDS:
        raise ConfigError(f"task split {split!r}: expected train or val")
    if split == "val" and n > VAL_SIZE:
        raise ConfigError(f"task {task}: the held-out set has {VAL_SIZE} problems, {n} asked")
    held_out = set() if split == "val" else {p.prompt for p in _draw(make, "val", VAL_SIZE)}
    out = [p for p in _draw(make, split, n + len(held_out)) if p.prompt not in held_out]
    if len(out) < n:
        raise ConfigError(f"task {task}: only {len(out)} distinct {split} problems, {n} asked")
    return out[:n]


def sample(task: str, seed: int, n: int) -> list[Problem]:
    """n problems of `task` drawn independently (repeats allowed), never a held-out one: training
    prompts in the generator's own mix, which `problems(task, "train", n)` skews as n grows (its
    distinct problems run out of the few words' own letters first). The same seed, the same ones."""
    make = _maker(task)
    held_out = {p.prompt for p in _draw(make, "val", VAL_SIZE)}
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = make(rng)
        if p.prompt not in held_out:
            out.append(p)
    return out


def _draw(make, split: str, n: int) -> list[Problem]:
    rng, seen, out = random.Random(_SEEDS[split]), set(), []
    for _ in range(50 * n):
        if len(out) == n:
            break
        p = make(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def last_number(text: str) -> str | None:
    """The last number written in `text` (thousands separators dropped), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def reward(problem: Problem, reply: str) -> float:
    """1.0 when the reply's last number is the answer, else 0.0."""
    return 1.0 if last_number(reply) == problem.answer else 0.0
