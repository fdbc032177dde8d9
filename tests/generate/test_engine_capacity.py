"""Tests for the Engine's KV cache size (model.cache_window): it starts at the minimum whatever the
model's context, grows as the longest row needs and shrinks when the rows end, and greedy tokens
stay the full forward pass's argmax across every resize, at every batch size. The minimum is 16
positions here (256 in use: tests/model/test_cache.py), so a tiny model crosses every size in a
hundred tokens, and a decode step reads the cache in blocks of 8 (128 in use), so the
blocks a step reads change as the rows grow."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model import cache
from jaxgpt.model.gpt import GPT

V, S = 29, 128
MIN = 16


@pytest.fixture(autouse=True)
def small_minimum(monkeypatch):
    monkeypatch.setattr(cache, "MIN_CAPACITY", MIN)
    monkeypatch.setattr(cache, "READ_BLOCK", 8)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(preset="llama", vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      seq_len=S).resolved()
    model = GPT(cfg)
    return model, model.init(jax.random.key(2))


_full = jax.jit(lambda model, params, ids: model.apply(params, ids), static_argnums=0)


def assert_greedy(model, params, prompt, reply):
    """Every token of reply is the argmax of the full forward pass over prompt + reply before it."""
    ids = np.asarray([prompt + reply], np.int32)
    logits = np.asarray(_full(model, params, ids))[0]
    assert reply == logits[len(prompt) - 1:-1].argmax(-1).tolist()


def cache_positions(engine) -> int:
    return engine.state["cache"][0]["k"].shape[2]


@pytest.mark.parametrize("slots", [1, 3])
def test_the_cache_grows_with_the_longest_row_and_shrinks_when_it_ends(tiny, slots):
    model, params = tiny
    rng = np.random.default_rng(slots)
    engine = Engine(model, params, slots=slots)
    assert engine.capacity == cache_positions(engine) == MIN  # not the context (128)
    lengths = [(5, 80), (20, 20), (25, 4)][:slots]
    prompts = [rng.integers(0, V, n).tolist() for n, _ in lengths]
    ids = [engine.submit(p, SamplingParams(temperature=0, max_tokens=m))[0]
           for p, (_, m) in zip(prompts, lengths, strict=True)]
    seen = []
    while engine.busy:
        engine.step()
        seen.append(engine.capacity)
        assert cache_positions(engine) == engine.capacity
        # every busy row fits, and the cache is the smallest power of two (from the minimum) that
        # holds the longest one, up to twice it where it grew ahead of a call of decode steps
        rows = [r.position for r in engine.slot_request if r is not None]
        if rows:
            assert max(rows) <= engine.capacity
    # from the first prompt's bucket (16 alone, 32 with the 20-token prompt) up
    assert sorted(set(seen)) == [16, 32, 64, 128][slots // 3:] and seen == sorted(seen)
    for i, p in zip(ids, prompts, strict=True):
        assert_greedy(model, params, p, engine.requests[i].tokens)
    assert [len(engine.requests[i].tokens) for i in ids] == [m for _, m in lengths]
    # the rows gone, the next step finds the engine idle: back to the smallest cache
    engine.step()
    assert engine.capacity == cache_positions(engine) == MIN
    [i] = engine.submit(prompts[0], SamplingParams(temperature=0, max_tokens=20))
    while engine.busy:
        engine.step()
    assert engine.requests[i].tokens == engine.requests[ids[0]].tokens[:20]


def test_a_long_prompt_grows_the_cache_before_its_prefill(tiny):
    model, params = tiny
    prompt = np.random.default_rng(7).integers(0, V, 40).tolist()
    engine = Engine(model, params, slots=2)
    [i] = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=12))
    engine.step()
    assert engine.capacity == 64  # the prompt's bucket
    while engine.busy:
        engine.step()
    assert_greedy(model, params, prompt, engine.requests[i].tokens)


def test_a_whole_window_holds_the_context_from_the_start(tiny):
    model, params = tiny
    whole = GPT(dataclasses.replace(model.cfg, cache_window="whole"))
    engine = Engine(whole, params, slots=2)
    assert engine.capacity == cache_positions(engine) == S
    prompt = np.random.default_rng(8).integers(0, V, 9).tolist()
    [out] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10))
    assert engine.capacity == S
    assert_greedy(model, params, prompt, out)
