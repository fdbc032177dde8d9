"""Benchmarks that print one JSON line each; they time, they never assert.

    python -m jaxgpt.bench train CONFIG.py [key=value ...] [--steps 200] [--warmup 20]

`train`: compiles the train step once (AOT, timed), runs warm-up steps, then times steady steps
of the real loop (batches drawn and placed by the prefetcher, as in training). Reports ms/iter,
tokens/s, model FLOPs per token (6N + attention), MFU against the peak table (on CPU: a matmul
rate measured in the same run), compile seconds and the memory XLA planned for the step.

    python -m jaxgpt.bench data --source chitchat --tokenizer bpe:4096 --workers 1 2 [--max-mb 64]

`data`: tokenizer throughput (MB/s of UTF-8 text) of `prepare`'s worker pool, one line per worker count.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax

from jaxgpt import config as config_lib
from jaxgpt import data, hardware, prepare, sharding, sources
from jaxgpt.train import Trainer


def _page_faults() -> int:
    """Minor page faults of this process so far (memory mapped afresh: see hardware.tune_host)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_train(cfg: config_lib.Config, steps: int, warmup: int) -> dict:
    trainer = Trainer(cfg)
    state = trainer.init_state()
    batch = trainer.batch(0)
    t = time.perf_counter()
    with sharding.activate(trainer.mesh):
        compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t

    def run(start, n, state):
        for _, b in data.Prefetcher(trainer.batch, start, start + n, cfg.data.prefetch):
            state, metrics = compiled(state, b)
        jax.block_until_ready(metrics)
        return state, metrics

    state, _ = run(0, warmup, state)
    faults = _page_faults()
    t = time.perf_counter()
    state, metrics = run(warmup, steps, state)
    seconds = time.perf_counter() - t
    faults = _page_faults() - faults

    n_devices = len(trainer.mesh.devices.flat)
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    flops_per_token = trainer.model.flops_per_token(state.params)
    peak, peak_source = hardware.peak_flops()
    tokens_per_s = steps * tokens_per_step / seconds
    out = {
        "bench": "train", "preset": cfg.model.preset, "dtype": cfg.model.dtype,
        "params": trainer.model.num_params(state.params), "devices": n_devices,
        "device_kind": jax.devices()[0].device_kind, "mesh": dict(trainer.mesh.shape),
        "batch": cfg.data.batch_size, "seq_len": cfg.model.seq_len, "steps": steps,
        "ms_per_iter": round(seconds / steps * 1e3, 3), "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token, "step_gflop": round(flops_per_token * tokens_per_step / 1e9, 3),
        "peak_flops_per_device": peak, "peak_source": peak_source,
        "mfu": round(tokens_per_s * flops_per_token / (peak * n_devices), 4),
        "compile_s": round(compile_s, 2), "page_faults_per_step": round(faults / steps, 1),
        "final_loss": round(float(metrics["loss"]), 4),
        "jax": jax.__version__,
    }
    memory = compiled.memory_analysis()
    if memory is not None:
        out["step_temp_bytes"] = memory.temp_size_in_bytes
        out["step_argument_bytes"] = memory.argument_size_in_bytes
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    return out


def bench_data(source: str, tokenizer: str, workers: list[int], max_mb: float = 64.0, **source_kw) -> list[dict]:
    """Tokenizer throughput of `prepare`'s worker pool, one result per worker count.

    The first max_mb of the source is read into memory first, and the pool is started and warmed
    before the clock starts, so what is timed is tokenizing plus moving text to workers and ids back."""
    import tempfile

    src = sources.open_source(source, **source_kw)
    pieces, n_bytes = [], 0
    for text, ends in src.pieces():
        pieces.append((text, ends))
        n_bytes += len(text.encode("utf-8"))
        if n_bytes >= max_mb * 1e6:
            break
    tok = prepare.build_tokenizer(tokenizer, src, limit=sum(ends for _, ends in pieces))  # as prepare builds it
    indexed = list(enumerate(prepare.tasks(pieces)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for n in workers:
            t = time.perf_counter()
            with prepare.Encoder(tmp, n, dtype=prepare.token_dtype(tok.n_vocab)) as encoder:
                list(encoder.map((i, (0, [("warm up", True)])) for i in range(2 * n)))
                start_s = time.perf_counter() - t
                t = time.perf_counter()
                n_tokens = sum(r["train"][0].size + r["val"][0].size for _, r in encoder.map(iter(indexed)))
                seconds = time.perf_counter() - t
            results.append({"bench": "data", "source": source, "tokenizer": tok.name, "n_vocab": tok.n_vocab,
                            "workers": n, "mb": round(n_bytes / 1e6, 3), "tokens": int(n_tokens),
                            "seconds": round(seconds, 3), "mb_per_s": round(n_bytes / 1e6 / seconds, 3),
                            "tokens_per_s": round(n_tokens / seconds, 1), "pool_start_s": round(start_s, 2),
                            "cpu_count": os.cpu_count()})
    return results


def main(argv: list[str] | None = None) -> None:
    from jaxgpt import cli

    parser = argparse.ArgumentParser(prog="python -m jaxgpt.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("train", help="time train steps")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--untuned-host", action="store_true",
                   help="leave malloc and async dispatch at their defaults (see hardware.tune_host)")
    d = sub.add_parser("data", help="tokenizer throughput of prepare's worker pool")
    d.add_argument("--source", required=True, help=sources.SOURCES)
    d.add_argument("--tokenizer", required=True, help="gpt2 | cl100k_base | o200k_base | byte | char | bpe:N | DIR")
    d.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    d.add_argument("--max-mb", type=float, default=64.0, help="tokenize at most this much text")
    d.add_argument("--field", default="text")
    d.add_argument("--doc-split", default="file", choices=("file", "paragraph", "line"))
    args = parser.parse_args(argv)

    def run(_):
        if args.what == "data":
            for result in bench_data(args.source, args.tokenizer, args.workers, args.max_mb, field=args.field,
                                     doc_split=args.doc_split):
                print(json.dumps(result), flush=True)
            return
        cfg = config_lib.from_cli(args.config, args.overrides)
        print(json.dumps(bench_train(cfg, args.steps, args.warmup)))

    cli.run(run, [args.what],
            usage="python -m jaxgpt.bench train CONFIG.py [key=value ...] | data --source S --tokenizer T",
            tune_host=not getattr(args, "untuned_host", False))


if __name__ == "__main__":
    main()
