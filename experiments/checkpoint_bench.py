"""Checkpoint costs, one JSON line per measurement (times, never asserts).

    python experiments/checkpoint_bench.py save CONFIG.py [key=value ...]
    python experiments/checkpoint_bench.py loop CONFIG.py [key=value ...] \
        [--steps 300 --every 100 --repeats 2]

`save`: a freshly initialised state (no training; --fill-moments puts noise in the optimizer
moments, which are zeros in a fresh state and compress to nothing, to get a trained state's size)
saved with the run's Checkpointer: the time the step loop is blocked (checksums + copy to host),
the time until the write is on disk, the size on disk, and the time to restore it (read, place by
the shardings, verify checksums; the checksum pass alone is `checksum_s`). Synchronous saves too.
Each is timed twice.
`loop`: the real step loop (prefetched batches, jitted step) for `--steps` steps with an async
checkpoint every `--every` steps versus none, the two alternating `--repeats` times (a shared CPU
is noisy, so compare the pairs; `blocked_in_save_ms_per_step` is the time the loop spent inside
the checkpointer, the part of the slowdown that noise cannot hide).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxgpt import config as config_lib
from jaxgpt.data import tokens as data
from jaxgpt.store import checkpoint
from jaxgpt.train.trainer import Trainer


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_save(cfg: config_lib.Config, fill_moments: bool) -> list[dict]:
    trainer = Trainer(cfg)
    state = jax.block_until_ready(trainer.init_state())
    n_params = trainer.model.num_params(state.params)
    # a fresh optimizer's moments are zeros, which compress to nothing; trained ones do not
    if fill_moments:
        def noisy(x):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            return x + 1e-3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype)
        state = state.replace(opt_state=jax.tree.map(noisy, state.opt_state))
    jax.block_until_ready(checkpoint.inspect(checkpoint.state_tree(state)))  # compile the checksums
    t = time.perf_counter()
    checkpoint.inspect(checkpoint.state_tree(state))
    inspect_s = time.perf_counter() - t
    out = []
    for async_save in (True, False):
        cfg.checkpoint.async_save = async_save
        checkpointer = checkpoint.Checkpointer(cfg)
        for step in (1, 2):
            t = time.perf_counter()
            checkpointer.save(step, state)
            blocking = time.perf_counter() - t
            checkpointer.wait()
            total = time.perf_counter() - t
            t = time.perf_counter()
            restored = jax.block_until_ready(
                checkpoint.restore_step(checkpointer.directory / str(step), trainer))
            restore_s = time.perf_counter() - t
            del restored
            out.append({"bench": "checkpoint_save", "preset": cfg.model.preset, "params": n_params,
                        "filled_moments": fill_moments, "async": async_save, "attempt": step,
                        "checksum_s": round(inspect_s, 3), "blocking_s": round(blocking, 3),
                        "save_s": round(total, 3), "restore_s": round(restore_s, 3),
                        "bytes": _du(checkpointer.directory / str(step)),
                        "devices": len(trainer.mesh.devices.flat)})
            print(json.dumps(out[-1]), flush=True)
        checkpointer.close()
        shutil.rmtree(checkpointer.directory)
    return out


def bench_loop(cfg: config_lib.Config, steps: int, every: int, repeats: int) -> list[dict]:
    trainer = Trainer(cfg)
    out = []
    for repeat in range(repeats):
        # no order bias
        for with_checkpoints in ((False, True) if repeat % 2 == 0 else (True, False)):
            cfg.checkpoint.every = every if with_checkpoints else 0
            shutil.rmtree(Path(cfg.train.out_dir) / "checkpoints", ignore_errors=True)
            checkpointer = checkpoint.Checkpointer(cfg)
            state = trainer.init_state()
            # compile + warm up
            for step, batch in data.Prefetcher(trainer.batch, 0, 20, cfg.data.prefetch):
                state, metrics = trainer.step(state, batch)
                checkpointer.maybe_save(step + 1, state)
            jax.block_until_ready(metrics)
            t, in_save = time.perf_counter(), 0.0
            for step, batch in data.Prefetcher(trainer.batch, 20, 20 + steps, cfg.data.prefetch):
                state, metrics = trainer.step(state, batch)
                if (step + 1) % every == 0:  # both variants wait for the queued steps here, so that
                    jax.block_until_ready(state)  # the time in maybe_save is the checkpoint's alone
                t_save = time.perf_counter()
                checkpointer.maybe_save(step + 1, state)  # steps 100, 200, ... (counting from 1)
                in_save += time.perf_counter() - t_save
            jax.block_until_ready(metrics)
            loop_s = time.perf_counter() - t
            t = time.perf_counter()
            checkpointer.close()  # the last write, if one is still in flight
            out.append({"bench": "checkpoint_loop", "preset": cfg.model.preset, "repeat": repeat,
                        "checkpoint_every": cfg.checkpoint.every, "steps": steps,
                        "saves": (len(checkpoint.steps_in(checkpointer.directory))
                                  if with_checkpoints else 0),
                        "ms_per_step": round(loop_s / steps * 1e3, 3),
                        "blocked_in_save_ms_per_step": round(in_save / steps * 1e3, 3),
                        "close_s": round(time.perf_counter() - t, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("save", "loop"))
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fill-moments", action="store_true",
                        help="save: non-zero optimizer moments")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_lib.from_cli(args.config, [f"train.out_dir={tmp}/run", *args.overrides])
        if args.what == "save":
            bench_save(cfg, args.fill_moments)
        else:
            bench_loop(cfg, args.steps, args.every, args.repeats)


if __name__ == "__main__":
    main()
