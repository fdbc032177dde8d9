"""Tests for jaxgpt.sample: top-k / top-p / temperature filtering, greedy and seeded generation, the CLI."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig, SampleConfig
from jaxgpt.model import GPT
from jaxgpt.sample import filter_logits, generate, sample_texts
from jaxgpt.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

# a hand-made distribution, shuffled: token 1 (0.5), token 3 (0.3), token 0 (0.15), token 2 (0.05)
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = jnp.asarray(np.log(PROBS)[None], jnp.float32)


def kept(logits_1xV) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.asarray(logits_1xV)[0])).tolist())


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {0, 1, 3}), (4, {0, 1, 2, 3}), (10, {0, 1, 2, 3})])
def test_top_k_keeps_exactly_k(k, expected):
    assert kept(filter_logits(LOGITS, 1.0, k, 1.0)) == expected


@pytest.mark.parametrize("p, expected", [
    (0.3, {1}),            # the top token alone already holds 0.5
    (0.6, {1, 3}),         # 0.5 < 0.6 <= 0.8
    (0.9, {0, 1, 3}),      # 0.8 < 0.9 <= 0.95
    (0.99, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),   # off
])
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert kept(filter_logits(LOGITS, 1.0, 0, p)) == expected


def test_filters_combine_and_keep_values():
    out = np.asarray(filter_logits(LOGITS, 1.0, 3, 0.6))
    assert kept(out) == {1, 3}
    np.testing.assert_allclose(out[0, [1, 3]], np.log([0.5, 0.3]), rtol=1e-6)
    # temperature divides the logits, before any filtering
    np.testing.assert_allclose(np.asarray(filter_logits(LOGITS, 2.0, 0, 1.0)), np.asarray(LOGITS) / 2, rtol=1e-6)
    # per row: a batch of two different distributions
    two = jnp.concatenate([LOGITS, LOGITS[:, ::-1]])
    out = np.asarray(filter_logits(two, 1.0, 1, 1.0))
    assert np.flatnonzero(np.isfinite(out[0])).tolist() == [1] and np.flatnonzero(np.isfinite(out[1])).tolist() == [2]


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(preset="gpt2", vocab_size=19, n_layer=2, n_head=2, d_model=16, seq_len=8).resolved()
    model = GPT(cfg)
    return model, model.init(jax.random.key(0))


def greedy_by_hand(model, params, prompt, n_new):
    L, apply = model.cfg.seq_len, jax.jit(model.apply)
    context, out = list(prompt)[-L:], []
    for _ in range(n_new):
        out.append(int(jnp.argmax(apply(params, jnp.asarray(context)[None])[0, -1])))
        context.append(out[-1])
        if len(context) > L:  # the KV cache is full: generate shifts to the last L // 2 tokens
            context = context[-(L // 2):]
    return out


def test_temperature_zero_is_greedy_and_ignores_the_seed(tiny):
    model, params = tiny
    prompt = [3, 1, 4]
    expected = greedy_by_hand(model, params, prompt, 12)  # past seq_len=8: the context shifts
    for seed in (0, 1):
        out = generate(model, params, prompt, 12, SampleConfig(temperature=0.0, seed=seed), n=2)
        assert out == [expected, expected]


def test_generation_stops_at_a_stop_token(tiny):
    model, params = tiny
    expected = greedy_by_hand(model, params, [5], 10)
    stop = expected[3]
    out = generate(model, params, [5], 10, SampleConfig(temperature=0.0), n=1, stop_ids=(stop,))
    assert out == [expected[:expected.index(stop)]]


def test_same_seed_same_samples(tiny):
    model, params = tiny
    cfg = SampleConfig(temperature=1.0, top_k=10, top_p=0.95, seed=3)
    a = generate(model, params, [2, 7], 10, cfg, n=3)
    assert a == generate(model, params, [2, 7], 10, cfg, n=3)
    assert all(len(row) == 10 and all(0 <= t < 19 for t in row) for row in a)
    assert len({tuple(row) for row in a}) > 1  # the n samples are not copies of one another


def test_sample_texts_start_with_the_prompt(tiny):
    model, params = tiny
    tok = Tokenizer.from_spec("char", corpus="abcdefghij ")  # 11 chars + 8 specials = 19 ids
    assert tok.n_vocab == 19
    texts = sample_texts(model, params, tok, SampleConfig(prompt="abc", temperature=0.0), n=2, max_new_tokens=5)
    assert len(texts) == 2 and all(t.startswith("abc") for t in texts)


@pytest.mark.slow
def test_cli_prints_the_prompt_and_a_continuation(tiny_run, run_env):
    run_dir, _ = tiny_run
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.sample", str(run_dir), "sample.prompt=ROMEO:",
                           "sample.max_new_tokens=40", "sample.num_samples=2", "sample.seed=1"],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("--- sample 0 ---\nROMEO:")
    assert "\n--- sample 1 ---\nROMEO:" in proc.stdout
    first = proc.stdout.split("--- sample 1 ---")[0].removeprefix("--- sample 0 ---\n")
    assert len(first.rstrip("\n")) > len("ROMEO:")
