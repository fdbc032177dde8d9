"""Benchmarks that print one JSON line each; they time, they never assert.

    python -m jaxgpt.bench train CONFIG.py [section.key=value ...] [bench.steps=200 bench.warmup=20]

`train`: compiles the train step once (AOT, timed), runs warm-up steps, then times steady steps
of the real loop (batches drawn and placed by the prefetcher, as in training). Reports ms/iter,
tokens/s, model FLOPs per token (6N + attention), MFU against the peak table (on CPU: a matmul
rate measured in the same run), compile seconds and the memory XLA planned for the step.

    python -m jaxgpt.bench data prepare.source=chitchat prepare.tokenizer=bpe:4096 \\
        [bench.workers=1,2 bench.max_mb=64]

    python -m jaxgpt.bench generate CONFIG.py|RUN [section.key=value ...] \\
        [bench.batch=1,8 bench.new_tokens=256]

`generate`: the KV-cache engine's decode tokens/s per batch size, time to first token, prefill
tokens/s, and the memory-bandwidth bound (weights plus cache read once per step, over a bandwidth
measured in the same run) with the ratio to it.

    python -m jaxgpt.bench compile CONFIG.py \\
        [mesh.devices=8 mesh.fsdp=8 mesh.device_memory_gb=80 ...]

`compile`: the train step compiled ahead of time from shapes alone (no params made, no data read)
for the config's mesh (a DPO config's too): memory.py's per-device estimate (params, optimizer
state, gradients, activations, batch, DPO's reference) beside XLA's memory analysis (arguments,
outputs, temporaries), XLA's FLOPs per device and the model's FLOPs per step, and whether it fits
mesh.device_memory_gb. mesh.devices=N plans N devices on a host with fewer (as N XLA:CPU devices:
the shardings and the estimate are those of N accelerators; XLA:CPU's temporaries are its own
compiler's, not a GPU's). bench.target=h100 (or h200) compiles it with XLA:GPU itself for that card,
on a host without one (aot.py), and adds the compiled step's kernels: launches, matmul FLOPs,
memory-bound bytes and the least time they take.

`data`: tokenizer throughput (MB/s of UTF-8 text) of `prepare`'s worker pool, one line per worker
count; it reads the source as prepare does (prepare.field, prepare.doc_split, ...).
Both tune the host first (hardware.tune_host) unless bench.untuned_host=true.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax

from jaxgpt import cli, hardware
from jaxgpt import config as config_lib
from jaxgpt.config import BenchCommand, BenchConfig, PrepareConfig
from jaxgpt.data import prepare, sources
from jaxgpt.data import tokens as data
from jaxgpt.errors import ConfigError
from jaxgpt.model.gpt import GPT
from jaxgpt.model.kernels.choice import matmul_dtype
from jaxgpt.parallel import sharding
from jaxgpt.perf import aot, decode, profiling
from jaxgpt.store import runs
from jaxgpt.train import memory
from jaxgpt.train.loop import DispatchWindow
from jaxgpt.train.step import resolve_skip_update
from jaxgpt.train.trainer import Trainer


def _page_faults() -> int:
    """Minor page faults of this process so far (memory mapped afresh: see hardware.tune_host)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_train(cfg: config_lib.Config, steps: int, warmup: int, batches=None, profile: str = "",
                profile_runs: int = 3) -> dict:
    """`batches`: a batch source opened already (train.open_run_batches), not opened again.
    `profile`: a directory to trace profile_runs more steps into (the result gains busiest_ops)."""
    trainer = Trainer(cfg, batches=batches)
    state = trainer.init_state()
    batch = trainer.batch(0)
    t = time.perf_counter()
    with sharding.on_mesh(trainer.mesh):
        compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t

    run = functools.partial(_run_steps, trainer, compiled)
    state, _ = run(0, warmup, state)
    faults, ticks = _page_faults(), hardware.cpu_ticks()
    t = time.perf_counter()
    state, metrics = run(warmup, steps, state)
    seconds = time.perf_counter() - t
    faults = _page_faults() - faults
    steal = hardware.steal_share(ticks, hardware.cpu_ticks())

    n_devices = len(trainer.mesh.devices.flat)
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    flops_per_token = trainer.model.flops_per_token(state.params)
    peak, peak_source = hardware.peak_flops(matmul_dtype=matmul_dtype(cfg.model))
    tokens_per_s = steps * tokens_per_step / seconds
    out = {
        "bench": "train", "preset": cfg.model.preset, "dtype": cfg.model.dtype,
        "matmul_dtype": matmul_dtype(cfg.model), "logits_dtype": cfg.model.logits_dtype,
        "kernels": trainer.model.kernels.impl, "remat": cfg.model.remat,
        "loss_chunks": cfg.model.loss_chunks, "segments": data.rows_have_segments(cfg.data),
        "skip_update": resolve_skip_update(cfg.train.skip_update),
        "params": trainer.model.num_params(state.params), "devices": n_devices,
        "device_kind": jax.devices()[0].device_kind, "mesh": dict(trainer.mesh.shape),
        "batch": cfg.data.batch_size, "seq_len": cfg.model.seq_len, "steps": steps,
        "ms_per_iter": round(seconds / steps * 1e3, 3), "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token,
        "step_gflop": round(flops_per_token * tokens_per_step / 1e9, 3),
        "peak_flops_per_device": peak, "peak_source": peak_source,
        "mfu": round(tokens_per_s * flops_per_token / (peak * n_devices), 4),
        "compile_s": round(compile_s, 2), "page_faults_per_step": round(faults / steps, 1),
        # the share of the timed steps' CPU time a VM's hypervisor took (slows them by as much)
        "cpu_steal": None if steal is None else round(steal, 3),
        "final_loss": round(float(metrics["loss"]), 4),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
    }
    out.update(_step_memory(compiled))
    if profile:
        start = [warmup + steps]

        def one_step():
            nonlocal state
            state, _ = run(start[0], 1, state)
            start[0] += 1
        out.update(profiling.profiled(profile, profile_runs, one_step))
    return out


def _run_steps(trainer, compiled, start: int, n: int, state):
    """(state, last metrics) after n steps from `start`, dispatched as the train loop does them."""
    window = DispatchWindow()
    for _, b in data.Prefetcher(trainer.batch, start, start + n, trainer.cfg.data.prefetch):
        state, metrics = compiled(state, b)
        window(metrics)
    jax.block_until_ready(metrics)
    return state, metrics


def _step_memory(compiled) -> dict:
    """XLA's temporaries and arguments of the compiled step, and the device's peak use where it
    says."""
    out = {}
    if (analysis := compiled.memory_analysis()) is not None:
        out["step_temp_bytes"] = analysis.temp_size_in_bytes
        out["step_argument_bytes"] = analysis.argument_size_in_bytes
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    return out


def bench_data(prep: PrepareConfig, bench: BenchConfig = BenchConfig()) -> list[dict]:
    """Tokenizer throughput of `prepare`'s worker pool over prep.source, one result per
    bench.workers count.

    The first bench.max_mb of the source is read into memory first, and the pool is started and
    warmed before the clock starts, so what is timed is tokenizing plus moving text to workers and
    ids back."""
    import tempfile

    src = sources.open_source(prep.source, errors=prep.errors, field=prep.field,
                              doc_split=prep.doc_split, hf_split=prep.hf_split,
                              chunk_bytes=prep.chunk_bytes)
    pieces, n_bytes = [], 0
    for text, ends in sources.limited(src.pieces(), prep.limit):
        pieces.append((text, ends))
        n_bytes += len(text.encode("utf-8"))
        if n_bytes >= bench.max_mb * 1e6:
            break
    # as prepare does
    tok = prepare.build_tokenizer(prep.tokenizer, src, limit=sum(ends for _, ends in pieces))
    indexed = list(enumerate(prepare.tasks(pieces, prep.chunk_bytes)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for n in bench.workers:
            t = time.perf_counter()
            with prepare.Encoder(tmp, n, dtype=prepare.token_dtype(tok.n_vocab)) as encoder:
                list(encoder.map((i, (0, [("warm up", True)])) for i in range(2 * n)))
                start_s = time.perf_counter() - t
                t = time.perf_counter()
                n_tokens = sum(r["train"][0].size + r["val"][0].size
                               for _, r in encoder.map(iter(indexed)))
                seconds = time.perf_counter() - t
            results.append({"bench": "data", "source": prep.source, "tokenizer": tok.name,
                            "n_vocab": tok.n_vocab, "workers": n, "mb": round(n_bytes / 1e6, 3),
                            "tokens": int(n_tokens), "seconds": round(seconds, 3),
                            "mb_per_s": round(n_bytes / 1e6 / seconds, 3),
                            "tokens_per_s": round(n_tokens / seconds, 1),
                            "pool_start_s": round(start_s, 2), "cpu_count": os.cpu_count()})
    return results


def bench_compile(cfg: config_lib.Config, target: str = "") -> dict:
    """Memory and FLOPs of cfg's train step on its mesh, from shapes alone. With mesh.devices=N on a
    host with fewer devices the step is planned on N simulated XLA:CPU devices: params, optimizer
    state and the estimate are what N accelerators would hold; XLA:CPU's temporaries are its own.
    target (a card of aot.CARDS): compiled by XLA:GPU for mesh.devices (default 1) of those GPUs,
    with no GPU here: the compiler's own memory plan, and its kernels' bytes and FLOPs."""
    if target:
        devices = aot.devices(target, cfg.mesh.devices or 1)
        with aot.compiling_for(target):
            return _compile_report(cfg, devices, target)
    n = cfg.mesh.devices
    if n:
        try:  # must precede the backend's start; only the CPU backend reads it
            jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
        except RuntimeError:
            pass  # already started (from Python): whatever devices there are
    devices = jax.devices()
    if n and len(devices) < n:  # an accelerator host planning for more of them than it has
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ConfigError(f"mesh.devices={n}: only {len(devices)} CPU devices could be made "
                              "here (jax started before bench compile; set "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    return _compile_report(cfg, devices)


def _compile_report(cfg: config_lib.Config, devices: list, target: str = "") -> dict:
    cfg = memory.with_pretrained_vocab(cfg)
    trainer = memory.trainer_for(cfg, devices)
    out = {"bench": "compile", "target": target or None, "preset": cfg.model.preset,
           "dtype": cfg.model.dtype, "remat": cfg.model.remat, "batch": cfg.data.batch_size,
           "grad_accum": cfg.optim.grad_accum, "seq_len": cfg.model.seq_len,
           "devices": trainer.mesh.devices.size, "platform": devices[0].platform,
           "device_kind": devices[0].device_kind,
           # on a GPU of CARDS, its own compiled step's kernels too (autotuned, unlike a planned
           # one's)
           **aot.analyze(trainer, target or (aot.card_of(devices[0].device_kind)
                                             if devices[0].platform == "gpu" else ""))}
    out["estimate_gb"] = {k: round(v / memory.GB, 3) for k, v in out["estimate_bytes"].items()}
    model = trainer.model
    params = jax.eval_shape(model.init, jax.random.key(0))
    out["params"] = model.num_params(params)
    out["model_flops_per_step"] = (model.flops_per_token(params) * cfg.data.batch_size
                                   * cfg.model.seq_len)
    limit, source = (memory.device_limit(cfg, devices) if not target or cfg.mesh.device_memory_gb
                     else (aot.card(target).memory_bytes, f"{target} data sheet"))
    out["limit_bytes"], out["limit_source"] = limit, source
    # the estimate decides train's check; XLA's figure is for this platform's compiler
    if limit is not None:
        out["fits"] = out["estimate_bytes"]["total"] <= limit
        if "xla_bytes" in out:
            out["fits_xla"] = out["xla_bytes"]["total"] <= limit
    out["jax"] = jax.__version__
    return out


CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(config_lib.Config))


def _section(setting: str) -> str:
    return setting.partition("=")[0].strip().lstrip("-").split(".")[0]


def _bench_settings(verb: str, settings: list[str], allowed: tuple[str, ...],
                    required=()) -> BenchCommand:
    """The bench root from the settings (`allowed` sections only); the host tuned unless
    bench.untuned_host."""
    cmd = cli.tool_config(BenchCommand, settings, required)
    if stray := [_section(s) for s in settings if _section(s) not in allowed]:
        takes = "prepare.* and bench.*" if verb == "data" else "the config's keys and bench.*"
        raise ConfigError(f"bench {verb} takes no {stray[0]}.* keys (it takes {takes})")
    if not cmd.bench.untuned_host:  # compiling afresh: a benchmark times it (compile_s)
        hardware.tune_host(cache=False)
    return cmd


GENERATE_FLAGS = {"--batch": "bench.batch", "--new": "bench.new_tokens"}


def _generate_flags(argv: list[str]) -> list[str]:
    """`generate ... --batch 1 8 --new 256` (the form ../shared/bench/decode_side_by_side.sh and the
    decode issue use) as the settings bench.batch=1,8 bench.new_tokens=256."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in GENERATE_FLAGS:
            j = i + 1
            while j < len(argv) and argv[j].isdigit():
                j += 1
            if j == i + 1:
                raise ConfigError(f"{argv[i]}: expected one or more numbers")
            out.append(f"{GENERATE_FLAGS[argv[i]]}={','.join(argv[i + 1:j])}")
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        try:
            argv = _generate_flags(argv)
        except ConfigError as e:
            sys.exit(f"python -m jaxgpt.bench: {e}")
    def train(operands: list[str], settings: list[str]) -> None:
        config_overrides = [s for s in settings if _section(s) in CONFIG_SECTIONS]
        cmd = _bench_settings("train", [s for s in settings if s not in config_overrides],
                              ("bench",))
        cfg = config_lib.from_cli(operands[0], config_overrides)
        print(json.dumps(bench_train(cfg, cmd.bench.steps, cmd.bench.warmup,
                                     profile=cmd.bench.profile,
                                     profile_runs=cmd.bench.profile_runs)))

    def compile_(operands: list[str], settings: list[str]) -> None:
        config_overrides = [s for s in settings if _section(s) in CONFIG_SECTIONS]
        cmd = _bench_settings("compile", [s for s in settings if s not in config_overrides],
                              ("bench",))
        print(json.dumps(bench_compile(config_lib.from_cli(operands[0], config_overrides),
                                       cmd.bench.target)))

    def data_(operands: list[str], settings: list[str]) -> None:
        cmd = _bench_settings("data", settings, ("prepare", "bench"),
                              ("prepare.source", "prepare.tokenizer"))
        for result in bench_data(cmd.prepare, cmd.bench):
            print(json.dumps(result), flush=True)

    def generate_(operands: list[str], settings: list[str]) -> None:
        config_overrides = [s for s in settings if _section(s) in CONFIG_SECTIONS]
        cmd = _bench_settings("generate", [s for s in settings if s not in config_overrides],
                              ("bench",))
        if Path(operands[0]).is_dir():  # a trained run or export
            loaded = runs.load(operands[0], config_overrides)
            model, params, vocab = GPT(loaded.cfg.model), loaded.params, loaded.tokenizer.n_vocab
        else:  # a config file: random init, as the reference times it
            cfg = config_lib.from_cli(operands[0], config_overrides)
            if not cfg.model.vocab_size:
                raise ConfigError(f"{operands[0]}: set model.vocab_size to time a config "
                                  "without data")
            model = GPT(cfg.model)
            params, vocab = model.init(jax.random.key(0)), cfg.model.vocab_size
        for result in decode.bench_generate(model, params, cmd.bench, vocab):
            print(json.dumps(result), flush=True)
    cli.run("python -m jaxgpt.bench", {
        "train": cli.Command(train, "CONFIG.py [section.key=value ...] [bench.steps=200 "
                             "bench.warmup=20 bench.untuned_host=true]", BenchCommand,
                             sections=(*CONFIG_SECTIONS, "bench"), tune_host=False),
        "generate": cli.Command(generate_, "CONFIG.py|RUN [section.key=value ...] [bench.batch=1,8 "
                                "bench.new_tokens=256 bench.prompt_tokens=16]", BenchCommand,
                                sections=(*CONFIG_SECTIONS, "bench"), tune_host=False),
        "compile": cli.Command(compile_, "CONFIG.py [section.key=value ...] [mesh.devices=8 "
                               "mesh.fsdp=8 mesh.device_memory_gb=80]", BenchCommand,
                               sections=(*CONFIG_SECTIONS, "bench"), tune_host=False),
        "data": cli.Command(data_, "prepare.source=SOURCE prepare.tokenizer=SPEC "
                            "[prepare.field=... prepare.doc_split=...] [bench.workers=1,2 "
                            "bench.max_mb=64]", BenchCommand, sections=("prepare", "bench"),
                            operands=(0, 0), tune_host=False),
    }, argv)  # tune_host=False: the commands tune it unless bench.untuned_host=true


if __name__ == "__main__":
    main()
