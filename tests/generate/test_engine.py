"""Tests for KV-cache decoding (model.apply with a cache) and jaxgpt.generate's Engine."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import (
    IDLE_KNOBS,
    KNOBS,
    SamplingParams,
    filter_logits,
    sample_tokens,
    sampling_paths,
    seed_of,
)
from jaxgpt.model.gpt import GPT

V = 29
S = 32
CFGS = {
    "gpt2": dict(preset="gpt2", n_kv_head=0),
    "llama_gqa": dict(preset="llama", n_kv_head=1),
}


@pytest.fixture(scope="module", params=list(CFGS))
def tiny(request):
    cfg = ModelConfig(**CFGS[request.param], vocab_size=V, n_layer=2, n_head=4, d_model=32,
                      seq_len=S).resolved()
    model = GPT(cfg)
    return model, model.init(jax.random.key(1))


_full = jax.jit(lambda model, params, tokens, segments=None: model.apply(params, tokens, segments),
               static_argnums=0)


_cached = jax.jit(lambda model, params, tokens, segments, positions, cache:
                  model.apply(params, tokens, segments, positions, cache=cache), static_argnums=0)


def full_logits(model, params, tokens):
    """Logits of the last token, from a full forward pass (no cache) over tokens padded to S, so
    that one compile serves every length (padding is segment 0, which no token attends to)."""
    padded, segments = np.zeros((1, S), np.int32), np.zeros((1, S), np.int32)
    padded[0, :len(tokens)], segments[0, :len(tokens)] = tokens, 1
    return np.asarray(_full(model, params, padded, segments)[0, len(tokens) - 1])


def prompt(n, seed):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def test_cached_decoding_matches_full_forward(tiny):
    model, params = tiny
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 12)), jnp.int32)
    expected = np.asarray(_full(model, params, tokens))
    cache = model.init_cache(2)
    # 5 tokens at once, then one at a time
    pos = jnp.arange(5, dtype=jnp.int32)[None].repeat(2, 0)
    logits, cache = _cached(model, params, tokens[:, :5], jnp.ones_like(pos), pos, cache)
    np.testing.assert_allclose(np.asarray(logits), expected[:, :5], atol=1e-5, rtol=1e-5)
    for t in range(5, 12):
        pos = jnp.full((2, 1), t, jnp.int32)
        logits, cache = _cached(model, params, tokens[:, t:t + 1], jnp.ones_like(pos), pos, cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), expected[:, t], atol=1e-5, rtol=1e-5)
    assert cache[0]["k"].shape == (2, model.cfg.n_kv_head, S, model.cfg.head_dim)


def test_rows_at_different_positions(tiny):
    """Two rows decoding together, each at its own position (the rows' prompts differ in length)."""
    model, params = tiny
    a, b = prompt(3, 1), prompt(9, 2)
    cache = model.init_cache(2)
    tokens = np.zeros((2, 9), np.int32)
    tokens[0, :3], tokens[1] = a, b
    seg = np.array([[1] * 3 + [0] * 6, [1] * 9])
    pos = np.arange(9)[None].repeat(2, 0)
    _, cache = model.apply(params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos),
                           cache=cache)
    nxt = jnp.asarray([[5], [7]], jnp.int32)
    logits, _ = model.apply(params, nxt, jnp.ones_like(nxt), jnp.asarray([[3], [9]], jnp.int32),
                            cache=cache)
    np.testing.assert_allclose(np.asarray(logits[0, 0]), full_logits(model, params, a + [5]),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[1, 0]), full_logits(model, params, b + [7]),
                               atol=1e-5)


def greedy_by_hand(model, params, prompt_ids, n):
    tokens = list(prompt_ids)
    for _ in range(n):
        tokens.append(int(np.argmax(full_logits(model, params, tokens))))
    return tokens[len(prompt_ids):]


def test_greedy_equals_argmax_of_full_passes_for_mixed_lengths(tiny):
    model, params = tiny
    prompts = [prompt(3, 3), prompt(17, 4), prompt(1, 5)]  # three buckets' worth of lengths
    out = Engine(model, params, slots=3).generate(prompts,
                                                  SamplingParams(temperature=0, max_tokens=8))
    assert out == [greedy_by_hand(model, params, p, 8) for p in prompts]


def test_logits_alone_and_joining_a_busy_batch(tiny):
    model, params = tiny
    late = prompt(6, 7)
    alone = Engine(model, params, slots=1, keep_logits=True)
    [rid] = alone.submit(late, SamplingParams(temperature=0, max_tokens=6))
    while alone.busy:
        alone.step()
    ref = alone.requests[rid]

    busy = Engine(model, params, slots=3, keep_logits=True)
    busy.submit(prompt(4, 8), SamplingParams(temperature=0, max_tokens=12))
    busy.submit(prompt(11, 9), SamplingParams(temperature=1.0, seed=4, max_tokens=12))
    for _ in range(3):
        busy.step()
    [rid] = busy.submit(late, SamplingParams(temperature=0, max_tokens=6))  # joins mid-way
    while busy.busy:
        busy.step()
    got = busy.requests[rid]
    assert got.tokens == ref.tokens and len(got.tokens) == 6 and got.finish_reason == "length"
    np.testing.assert_allclose(np.stack(got.logits), np.stack(ref.logits), atol=1e-5)
    # and against full forward passes
    for i, logits in enumerate(got.logits):
        np.testing.assert_allclose(logits, full_logits(model, params, late + got.tokens[:i]),
                                   atol=1e-5)


def test_same_seed_same_reply_alone_and_in_a_busy_batch(tiny):
    model, params = tiny
    sp = SamplingParams(temperature=1.0, top_k=10, top_p=0.9, min_p=0.05, seed=11, max_tokens=10)
    p = prompt(5, 10)
    alone = Engine(model, params, slots=1).generate([p], sp)[0]
    engine = Engine(model, params, slots=2)
    others = [prompt(7, 12), prompt(2, 13), prompt(9, 14)]
    out = engine.generate(others[:2] + [p] + others[2:],
                          [SamplingParams(temperature=0.8, seed=s, max_tokens=5 + s)
                           for s in range(2)]
                          + [sp] + [SamplingParams(temperature=1.0, seed=9, max_tokens=3)])
    assert out[2] == alone and len(alone) == 10
    other_seed = Engine(model, params, slots=1).generate(
        [p], SamplingParams(**{**sp.__dict__, "seed": 12}))[0]
    assert other_seed != alone


def test_an_idle_slot_carries_neutral_knobs(tiny):
    """A slot nobody uses (never, or no longer) is greedy with every filter off: a finished
    request's top_p left behind would make every later step sort the whole vocabulary."""
    from jaxgpt.generate.sampling import IDLE_KNOBS
    model, params = tiny
    engine = Engine(model, params, slots=3)
    idle = lambda slot: {name: engine.knobs[name][slot].item() for name in IDLE_KNOBS}  # noqa: E731
    assert all(idle(slot) == pytest.approx(IDLE_KNOBS) for slot in range(3))
    engine.submit(prompt(3, 4), SamplingParams(temperature=0.7, top_p=0.5, repetition_penalty=1.3,
                                               max_tokens=3))
    [long] = engine.submit(prompt(3, 5), SamplingParams(temperature=0.7, top_k=5, max_tokens=6))
    engine.step()
    assert idle(0)["top_p"] == pytest.approx(0.5) and idle(1)["top_k"] == 5
    while engine.requests[long].finish_reason is None:
        engine.step()  # the first request finishes at its 3rd token, idling its slot at once
    assert idle(0) == pytest.approx(IDLE_KNOBS) and idle(2) == pytest.approx(IDLE_KNOBS)


def test_stop_ids_end_a_request_and_free_its_slot(tiny):
    model, params = tiny
    p = prompt(4, 15)
    expected = greedy_by_hand(model, params, p, 10)
    stop = expected[4]
    engine = Engine(model, params, slots=1)
    [a] = engine.submit(p, SamplingParams(temperature=0, max_tokens=10, stop_ids=(stop,)))
    [b] = engine.submit(p, SamplingParams(temperature=0, max_tokens=3))  # waits for the one slot
    steps = 0
    while engine.requests[a].finish_reason is None:
        engine.step()
        steps += 1
    assert engine.requests[a].tokens == expected[:expected.index(stop)]
    assert engine.requests[a].finish_reason == "stop"
    assert engine.slot_request == [None] and engine.waiting  # freed at once; b admitted next step
    new = engine.step()
    # the step that admits b prefills it alone: its first token out at once
    assert new == {b: expected[:1]} and engine.requests[b].slot == 0
    while engine.busy:
        engine.step()
    assert (engine.requests[b].tokens == expected[:3]
            and engine.requests[b].finish_reason == "length")


def test_max_tokens_and_context_shift(tiny):
    model, params = tiny
    engine = Engine(model, params, slots=2)
    # the last is longer than S
    out = engine.generate([prompt(3, 16), prompt(30, 17), prompt(40, 18)],
                          [SamplingParams(temperature=0, max_tokens=n) for n in (1, 40, 5)])
    assert [len(o) for o in out] == [1, 40, 5]
    assert all(0 <= t < V for o in out for t in o)
    # past S the context shifts to its last S // 2 tokens: the tokens then follow that context
    p = prompt(30, 17)
    full = p + out[1]
    shift_at = S - len(p)  # generated tokens before the first shift
    assert out[1][:shift_at + 1] == greedy_by_hand(model, params, p, shift_at + 1)
    ctx = full[:len(p) + shift_at + 1][-(S // 2):]
    nxt = greedy_by_hand(model, params, ctx, 5)
    assert out[1][shift_at + 1:shift_at + 6] == nxt


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]] * 4))
    knobs = {k: jnp.asarray(v) for k, v in dict(
        temperature=np.float32([1, 1, 1, 0]), top_k=np.int32([1, 0, 0, 0]),
        top_p=np.float32([1, 0.3, 1, 1]), min_p=np.float32([0, 0, 0.9, 0]),
        seed=np.uint32([0, 1, 2, 3]), repetition_penalty=np.float32([1] * 4),
        presence_penalty=np.float32([0] * 4), frequency_penalty=np.float32([0] * 4)).items()}
    zeros = jnp.zeros((4, 4), jnp.int32)
    for step in range(20):  # every filter leaves only token 1 (0.5): always drawn
        out = sample_tokens(logits, knobs, zeros, zeros > 0, jnp.full(4, step), 4)
        assert np.asarray(out).tolist() == [1, 1, 1, 1]
    # a large presence penalty on the generated token 1 makes greedy pick token 3
    counts = zeros.at[3, 1].set(1)
    assert int(sample_tokens(logits, knobs, counts, zeros > 0, jnp.zeros(4, jnp.int32), 4)[3]) == 1
    knobs["presence_penalty"] = jnp.float32([0, 0, 0, 5])
    assert int(sample_tokens(logits, knobs, counts, zeros > 0, jnp.zeros(4, jnp.int32), 4)[3]) == 3
    # tokens past n_valid (padding ids) are never drawn
    assert int(sample_tokens(logits, knobs, zeros, zeros > 0, jnp.zeros(4, jnp.int32), 1)[3]) == 0


def test_sampling_paths_leave_out_only_what_no_row_uses():
    """The host decides which paths a step computes (no device branch): sampling when some row
    samples, the full sort when a sampling row's top-k is past TOP_K_MAX or its top-p works without
    top-k."""
    def paths(**columns):
        knobs = {name: np.full(3, value, dtype) for name, (value, dtype) in
                 {"temperature": (0.0, np.float32), "top_k": (0, np.int32),
                  "top_p": (1.0, np.float32)}.items()}
        knobs.update({name: np.asarray(values) for name, values in columns.items()})
        return sampling_paths(knobs, 100)
    # every row greedy (idle slots)
    assert paths() == (False, False)
    assert paths(temperature=[0, 0.7, 0]) == (True, False)                  # plain sampling
    assert paths(temperature=[0, 0.7, 0], top_k=[0, 40, 0]) == (True, False)  # top-k from lax.top_k
    # past TOP_K_MAX: sorted
    assert paths(temperature=[0, 0.7, 0], top_k=[0, 80, 0]) == (True, True)
    assert paths(temperature=[0, 0.7, 0], top_p=[1, 0.9, 1]) == (True, True)
    assert paths(temperature=[0, 0.7, 0], top_k=[0, 40, 0], top_p=[1, 0.9, 1]) == (True, False)
    # greedy rows never filter
    assert paths(top_p=[0.9, 0.9, 0.9]) == (False, False)
    # the paths a step leaves out change no row that uses them:
    # a row that samples, beside one that sorts
    logits = jnp.log(jnp.asarray([PROBS, PROBS]))
    knobs = {name: np.full(2, IDLE_KNOBS[name], dtype) for name, dtype in KNOBS.items()}
    knobs.update(temperature=np.float32([0.0, 1.0]), top_k=np.int32([0, 2]),
                 top_p=np.float32([0.5, 1.0]))
    assert sampling_paths(knobs, 4) == (True, False)
    assert np.array_equal(np.asarray(filter_logits(logits, knobs, full_sort=False))[1],
                          np.asarray(filter_logits(logits, knobs))[1])


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0),
                                    SamplingParams(temperature=0.8),
                                    SamplingParams(temperature=0.8, top_p=0.9)],
                         ids=["greedy", "sampled", "sorted"])
def test_a_decode_step_holds_no_branch(params):
    """The decode step has no lax.cond / lax.switch, which on a GPU would stop the host at every
    token (hardware.branches_sync_host); what to compute is decided on the host."""
    from jaxgpt.generate import programs
    cfg = ModelConfig(preset="gpt2", vocab_size=V, n_layer=2, n_head=4, d_model=32,
                      seq_len=256).resolved()
    model = GPT(cfg)
    engine = Engine(model, model.init(jax.random.key(1)), slots=2)
    engine.submit(prompt(5, 1), params)
    engine.step()  # the prefill (and its first token); the next decode step is traced below
    steps = np.zeros(2, np.int32)
    traced = programs.decode.trace(model, engine.n_valid, 0, engine._paths(engine.knobs), 8,
                                    False, engine.params, engine.state, steps, steps, steps,
                                    engine.knobs, steps)
    text = str(traced.jaxpr)
    assert " cond[" not in text and "switch" not in text
    assert (("sort[" in text) == (params.top_p < 1)
            and ("random_bits" in text) == (params.temperature > 0))


# ---- filter_logits: a hand-made distribution, shuffled:
# token 1 (0.5), token 3 (0.3), token 0 (0.15), token 2 (0.05)
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = jnp.asarray(np.log(PROBS)[None], jnp.float32)


def knobs(rows=1, **settings):
    """[rows] knob arrays as the engine builds them, from SamplingParams' defaults and settings."""
    sp = SamplingParams(**settings)
    return {name: np.full(rows, getattr(sp, name), dtype) for name, dtype in KNOBS.items()}


def kept(logits_1xV) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.asarray(logits_1xV)[0])).tolist())


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {0, 1, 3}), (4, {0, 1, 2, 3}),
                                         (10, {0, 1, 2, 3})])
def test_top_k_keeps_exactly_k(k, expected):
    assert kept(filter_logits(LOGITS, knobs(top_k=k))) == expected


@pytest.mark.parametrize("p, expected", [
    (0.3, {1}),            # the top token alone already holds 0.5
    (0.6, {1, 3}),         # 0.5 < 0.6 <= 0.8
    (0.9, {0, 1, 3}),      # 0.8 < 0.9 <= 0.95
    (0.99, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),   # off
])
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert kept(filter_logits(LOGITS, knobs(top_p=p))) == expected


@pytest.mark.parametrize("min_p, expected", [(0.0, {0, 1, 2, 3}), (0.25, {0, 1, 3}),
                                             (0.5, {1, 3}), (0.7, {1})])
def test_min_p_keeps_tokens_within_a_fraction_of_the_top(min_p, expected):
    assert kept(filter_logits(LOGITS, knobs(min_p=min_p))) == expected


def test_filters_combine_per_row_and_keep_values():
    out = np.asarray(filter_logits(LOGITS, knobs(top_k=3, top_p=0.6)))
    assert kept(out) == {1, 3}
    np.testing.assert_allclose(out[0, [1, 3]], np.log([0.5, 0.3]), rtol=1e-6)
    # temperature divides the logits, before any filtering
    np.testing.assert_allclose(np.asarray(filter_logits(LOGITS, knobs(temperature=2.0))),
                               np.asarray(LOGITS) / 2, rtol=1e-6)
    # each row its own distribution and its own settings
    two = jnp.concatenate([LOGITS, LOGITS[:, ::-1]])
    rows = knobs(2, top_k=1)
    rows["top_k"][1] = 2
    out = np.asarray(filter_logits(two, rows))
    assert np.flatnonzero(np.isfinite(out[0])).tolist() == [1]
    assert np.flatnonzero(np.isfinite(out[1])).tolist() == [0, 2]


# ---- n samples, log-probabilities, cancel

def test_n_samples_share_one_prefill_and_equal_single_requests(tiny):
    model, params = tiny
    p = prompt(7, 20)
    sp = SamplingParams(temperature=1.0, top_k=8, seed=5, max_tokens=6)
    engine = Engine(model, params, slots=3)
    ids = engine.submit(p, dataclasses.replace(sp, n=3))
    assert [engine.requests[i].sample for i in ids] == [0, 1, 2]
    first = engine.step()  # one prefill and two forks: each sample's first token
    assert all(len(first[i]) == 1 for i in ids)
    while engine.busy:
        engine.step()
    together = [engine.requests[i].tokens for i in ids]
    # sample i of n is the request with seed seed_of(seed, i), decoded alone
    alone = [Engine(model, params, slots=1).generate(
        [p], dataclasses.replace(sp, seed=seed_of(5, i)))[0] for i in range(3)]
    assert together == alone and len({tuple(t) for t in together}) > 1
    with pytest.raises(ValueError, match=r"n=4 must be in \[1, 3\]"):
        engine.submit(p, dataclasses.replace(sp, n=4))


def test_logprobs_are_the_models_and_top_logprobs_are_sorted(tiny):
    model, params = tiny
    p = prompt(5, 21)
    engine = Engine(model, params, slots=2, keep_logits=True)
    [rid] = engine.submit(p, SamplingParams(temperature=1.0, seed=2, max_tokens=5, top_logprobs=3))
    [other] = engine.submit(p, SamplingParams(temperature=0, max_tokens=5))
    while engine.busy:
        engine.step()
    r = engine.requests[rid]
    assert len(r.logprobs) == len(r.top_logprobs) == 5 and engine.requests[other].top_logprobs == []
    for token, logprob, top, logits in zip(r.tokens, r.logprobs, r.top_logprobs, r.logits,
                                           strict=False):
        expected = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
        assert logprob == pytest.approx(float(expected[token]), abs=1e-5)
        assert [i for i, _ in top] == np.argsort(-expected)[:3].tolist()
        np.testing.assert_allclose([lp for _, lp in top], np.sort(expected)[::-1][:3], atol=1e-5)


def test_cancel_frees_the_slot_and_keeps_what_was_made(tiny):
    model, params = tiny
    engine = Engine(model, params, slots=1)
    [a] = engine.submit(prompt(4, 22), SamplingParams(temperature=0, max_tokens=20))
    [b] = engine.submit(prompt(4, 23), SamplingParams(temperature=0, max_tokens=20))
    [c] = engine.submit(prompt(4, 24), SamplingParams(temperature=0, max_tokens=2))
    engine.step()
    engine.step()
    engine.cancel(a, "content_filter")
    engine.cancel(b)  # still waiting: it never runs
    assert engine.slot_request == [None] and engine.requests[a].finish_reason == "content_filter"
    # the step that admits it: the prefill's token alone (its first token out at once); the next,
    # a call of decode_steps
    assert (len(engine.requests[a].tokens) == 1 + engine.decode_steps
            and engine.requests[b].finish_reason == "cancelled")
    while engine.busy:
        engine.step()
    assert engine.requests[b].tokens == [] and len(engine.requests[c].tokens) == 2


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("min_p", 1.5),
                                          ("top_k", -1), ("top_logprobs", 21),
                                          ("presence_penalty", 3.0), ("max_tokens", -1)])
def test_out_of_range_settings_name_their_field(tiny, field, value):
    model, params = tiny
    with pytest.raises(ValueError, match=f"^{field}={value}"):
        Engine(model, params, slots=1).submit([1], SamplingParams(**{field: value}))


def test_a_scan_layers_model_decodes_as_its_unscanned_twin():
    cfg = ModelConfig(preset="llama", n_kv_head=2, vocab_size=V, n_layer=3, n_head=4, d_model=32,
                      seq_len=S, scan_layers=True).resolved()
    scanned = GPT(cfg)
    params = scanned.init(jax.random.key(2))
    assert "blocks" in params
    model, unscanned = scanned.for_decoding(params)
    p = prompt(6, 30)
    expected = greedy_by_hand(scanned, params, p, 5)  # full forward passes of the scanned model
    assert greedy_by_hand(model, unscanned, p, 5) == expected
    assert Engine(scanned, params, slots=1).generate(
        [p], SamplingParams(temperature=0, max_tokens=5)) == [expected]


def test_the_steps_compile_once_per_bucket(tiny):
    """After one request, another of the same prompt bucket compiles nothing (the state the engine
    starts with is placed as the jitted steps' outputs are, or the next prefill would recompile)."""
    from jaxgpt.generate import programs
    model, params = tiny
    # committed, as runs.load gives them
    engine = Engine(model, jax.device_put(params, jax.devices()[0]), slots=2)
    engine.generate([prompt(5, 40)], SamplingParams(temperature=1.0, max_tokens=3))
    jitted = (programs.prefill, programs.place, programs.decode)
    sizes = [f._cache_size() for f in jitted]
    engine.generate([prompt(7, 41), prompt(3, 42)],
                    SamplingParams(temperature=1.0, seed=3, max_tokens=4))
    assert [f._cache_size() for f in jitted] == sizes


def test_several_steps_per_call_make_the_same_replies(tiny):
    """decode_steps=8 against one step per call: the same tokens and log-probabilities for requests
    that sample, penalize, stop on an id, end at max_tokens mid-call and shift their context."""
    model, params = tiny
    # shifts (S = 32)
    requests = [(prompt(5, 60), SamplingParams(temperature=1.0, top_k=10, seed=4, max_tokens=45)),
                (prompt(3, 61), SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=13,
                                               repetition_penalty=1.3, frequency_penalty=0.5)),
                # mid-call
                (prompt(9, 62), SamplingParams(temperature=1.0, seed=14, max_tokens=30,
                                               stop_ids=(3,))),
                (prompt(2, 63), SamplingParams(temperature=0, max_tokens=11))]
    replies = {}
    for steps in (1, 8):
        # 4 requests in 3 slots: one waits
        engine = Engine(model, params, slots=3, decode_steps=steps)
        ids = [i for p, sp in requests for i in engine.submit(p, sp)]
        while engine.busy:
            engine.step()
        replies[steps] = [(engine.requests[i].tokens, engine.requests[i].finish_reason,
                           np.asarray(engine.requests[i].logprobs)) for i in ids]
    assert ([(tokens, reason) for tokens, reason, _ in replies[8]]
            == [(tokens, reason) for tokens, reason, _ in replies[1]])
    # two programs: the last bits may differ (5e-7 seen)
    for (*_, by_8), (*_, by_1) in zip(replies[8], replies[1], strict=False):
        np.testing.assert_allclose(by_8, by_1, rtol=0, atol=1e-5)
    assert [(len(tokens), reason) for tokens, reason, _ in replies[1]] == [
        (45, "length"), (13, "length"), (16, "stop"), (11, "length")]
