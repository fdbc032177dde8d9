"""Tests for jaxgpt.sample: greedy and seeded generation, the CLI (the filters are
test_generate's)."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxgpt.config import ModelConfig, SampleConfig
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.sample import generate, sample_texts
from jaxgpt.model.gpt import GPT

REPO = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(preset="gpt2", vocab_size=19, n_layer=2, n_head=2, d_model=16,
                      seq_len=8).resolved()
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
    texts = sample_texts(model, params, tok, SampleConfig(prompt="abc", temperature=0.0), n=2,
                         max_new_tokens=5)
    assert len(texts) == 2 and all(t.startswith("abc") for t in texts)


@pytest.mark.slow
def test_cli_prints_the_prompt_and_a_continuation(tiny_run, run_env):
    run_dir, _ = tiny_run
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.sample", str(run_dir),
                           "sample.prompt=ROMEO:", "sample.max_new_tokens=40",
                           "sample.num_samples=2", "sample.seed=1"],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("--- sample 0 ---\nROMEO:")
    assert "\n--- sample 1 ---\nROMEO:" in proc.stdout
    first = proc.stdout.split("--- sample 1 ---")[0].removeprefix("--- sample 0 ---\n")
    assert len(first.rstrip("\n")) > len("ROMEO:")
