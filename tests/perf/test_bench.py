"""Tests for jaxgpt.bench's generate benchmark: it does the work it reports (benchmarks assert
nothing about speed; these check that every requested token was made and the report's
arithmetic)."""
import logging

import jax
import pytest

from jaxgpt.config import BenchConfig, ModelConfig
from jaxgpt.errors import ConfigError
from jaxgpt.model.gpt import GPT
from jaxgpt.perf import bench, decode


def test_generate_reports_every_token_of_every_batch():
    model = GPT(ModelConfig(preset="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2,
                            d_model=32, seq_len=64).resolved())
    params = model.init(jax.random.key(0))
    results = decode.bench_generate(model, params,
                                    BenchConfig(batch=(1, 3), new_tokens=9, prompt_tokens=5), 64)
    assert [r["batch"] for r in results] == [1, 3]
    for r in results:
        assert r["new_tokens"] == 9 * r["batch"]  # no stop token: every row makes new_tokens
        assert abs(r["tok_per_s"] - r["new_tokens"] / r["seconds"]) <= 0.01 * r["tok_per_s"] + 0.01
        assert 0 < r["ttft_s"] <= r["seconds"] and r["bound_tok_per_s"] > 0
        assert abs(r["ratio_to_bound"] - r["tok_per_s"] / r["bound_tok_per_s"]) < 1e-2


def test_generate_times_no_compile_when_rows_outgrow_the_context(monkeypatch, caplog):
    """New tokens past the context: the timed decoding shifts the context (a re-prefill of another
    length), compiled in the warm-up, not in the timed steps (where it cost the quickstart's model
    1.4 of 1.7 s)."""
    # the shift re-prefills 32 tokens, the prompt 16 (buckets)
    model = GPT(ModelConfig(preset="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2,
                            d_model=32, seq_len=64).resolved())
    params = model.init(jax.random.key(0))
    submit = decode.generate.Engine.submit

    def timed_submit(self, *args, **kwargs):  # the bench's timed part starts at its submit
        logging.getLogger("test").warning("timed part starts")
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(decode.generate.Engine, "submit", timed_submit)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        (result,) = decode.bench_generate(
            model, params, BenchConfig(batch=(1,), new_tokens=70, prompt_tokens=5), 64)
    messages = [r.getMessage() for r in caplog.records]
    # after the last submit
    timed = messages[len(messages) - messages[::-1].index("timed part starts"):]
    # two warm-ups, then timed
    assert result["new_tokens"] == 70 and messages.count("timed part starts") == 3
    assert (any("Compiling" in m for m in messages)
            and not any("Compiling" in m for m in timed)), timed


def test_generate_refuses_negative_decode_steps():
    model = GPT(ModelConfig(preset="llama", vocab_size=64, n_layer=1, n_head=2, d_model=16,
                            seq_len=32).resolved())
    with pytest.raises(ConfigError, match=r"^bench.decode_steps=-2: must be >= 0"):
        decode.bench_generate(model, model.init(jax.random.key(0)), BenchConfig(decode_steps=-2),
                              64)


def test_generate_takes_the_shared_scripts_flags():
    assert bench._generate_flags(["generate", "c.py", "--batch", "1", "8", "--new", "256",
                                  "model.dtype=bfloat16"]) == [
        "generate", "c.py", "bench.batch=1,8", "bench.new_tokens=256", "model.dtype=bfloat16"]
    with pytest.raises(ConfigError, match="^--new: expected one or more numbers"):
        bench._generate_flags(["generate", "c.py", "--new"])
