"""The decode benchmark: the KV-cache engine's tokens/s per batch size, time to first token, prefill
tokens/s, and the memory-bandwidth bound (weights plus cache read once per step, over a bandwidth
measured in the same run) with the ratio to it. `python -m jaxgpt.bench generate` prints it."""
from __future__ import annotations

import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import hardware
from jaxgpt.config import BenchConfig
from jaxgpt.errors import ConfigError
from jaxgpt.generate import engine as generate
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model.gpt import GPT
from jaxgpt.perf import profiling


def bench_generate(model: GPT, params, bench: BenchConfig, vocab: int) -> list[dict]:
    """Decode speed of the engine, one result per batch size: random prompts, temperature 1 and
    top-k 50 (as the Hugging Face reference samples), no stop token, so every row makes
    new_tokens."""
    bandwidth = hardware.memory_bandwidth()
    sp = SamplingParams(max_tokens=bench.new_tokens, temperature=1.0, top_k=50)
    rng, results = np.random.default_rng(0), []
    if bench.decode_steps < 0:
        raise ConfigError(f"bench.decode_steps={bench.decode_steps}: must be >= 0 "
                          "(0: the engine's default)")
    steps = bench.decode_steps or generate.DECODE_STEPS
    for batch in bench.batch:
        engine = generate.Engine(model, params, slots=batch, decode_steps=steps)
        prompts = [rng.integers(0, vocab, bench.prompt_tokens).tolist() for _ in range(batch)]
        # compile prefill and both decode calls (one step, and `steps`) at every cache size the
        # rows will pass through (the cache grows with them: a program per size); when the rows
        # will outgrow the context, past its first shift too (the shift's re-prefill compiles
        # another prompt length): else compiling would be timed as decoding
        S = model.cfg.seq_len
        warm = (bench.new_tokens + steps if bench.prompt_tokens + bench.new_tokens <= S
                else S - bench.prompt_tokens + steps + 2)
        # the second: one-step calls only (fewer tokens left than `steps`)
        for max_tokens in (warm, 3):
            engine.generate(prompts, dataclasses.replace(sp, max_tokens=max_tokens))
        t0 = time.perf_counter()
        ids = [i for s, p in enumerate(prompts)
               for i in engine.submit(p, dataclasses.replace(sp, seed=s))]
        engine.step()
        ttft = time.perf_counter() - t0
        while engine.busy:
            engine.step()
        seconds = time.perf_counter() - t0
        results.append(_row(model, params, engine, bench, batch, seconds, ttft, bandwidth,
                            sum(len(engine.requests[i].tokens) for i in ids)))
        # decode steps alone: the prompts are prefilled by the untraced first step
        if bench.profile:
            for s, p in enumerate(prompts):
                engine.submit(p, dataclasses.replace(sp, seed=s, max_tokens=bench.profile_runs + 2))
            engine.step()
            results[-1].update(profiling.profiled(f"{bench.profile}/batch{batch}",
                                                  bench.profile_runs, engine.step))
            while engine.busy:
                engine.step()
    return results


def _row(model: GPT, params, engine, bench: BenchConfig, batch: int, seconds: float,
         ttft: float, bandwidth: float, n_new: int) -> dict:
    """One batch size's result, with the memory-bandwidth bound it is measured against."""
    # the weights as the engine keeps them: in the compute dtype, or quantized (model.weights)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.params))
    # the cache as the rows left it (it shrinks at the next step that finds them gone)
    cache_mb = sum(x.nbytes for x in jax.tree.leaves(engine.state["cache"])) / 2 ** 20
    # a decode step reads every weight once and each row's cache up to its length (on average
    # prompt + new/2 positions): the memory-bandwidth bound on tokens/s
    cache_bytes = (2 * model.cfg.n_layer * model.cfg.n_kv_head * model.cfg.head_dim *
                   jnp.dtype(model.cfg.dtype).itemsize *
                   (bench.prompt_tokens + bench.new_tokens / 2))
    bound = batch * bandwidth / (weight_bytes + batch * cache_bytes)
    tok_per_s = n_new / seconds
    return {
        "bench": "generate", "batch": batch, "dtype": model.cfg.dtype,
        "decode_steps": engine.decode_steps,
        "weights": model.cfg.weights, "weights_mb": round(weight_bytes / 2 ** 20, 1),
        "cache_window": model.cfg.cache_window, "cache_positions": engine.capacity,
        "cache_mb": round(cache_mb, 1), "new_tokens": n_new,
        "seconds": round(seconds, 6), "tok_per_s": round(tok_per_s, 2),
        "ttft_s": round(ttft, 4), "peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "prefill_tok_per_s": round(batch * bench.prompt_tokens / ttft, 1),
        "memory_gb_per_s": round(bandwidth / 1e9, 2), "bound_tok_per_s": round(bound, 2),
        "ratio_to_bound": round(tok_per_s / bound, 3), "params": model.num_params(params),
        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
