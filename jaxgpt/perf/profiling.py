"""Where a compiled program's time goes: a few runs traced with jax.profiler, the time of each XLA
op summed over them, busiest first.

    with profiling.trace(directory):
        for _ in range(runs):
            step()
    rows = profiling.busiest_ops(directory, runs)   # [{"op", "kernel", "ms_per_run", ...}, ...]

On a GPU or TPU the kernels sit in the trace's device process, each tagged with the XLA op that
launched it (`hlo_op`); on a CPU the ops run on XLA's threads of the host process, tagged the same
way. `kernel` is the name the device ran (a GPU's cuBLAS or cuDNN kernel, a fusion's name), which
says what an op is (a gemm's dtypes, say) where the op's own name does not. The trace stays in the
directory for a closer look (ui.perfetto.dev opens its perfetto_trace.json.gz).
"""
from __future__ import annotations

import collections
import contextlib
import gzip
import json
from pathlib import Path

import jax


@contextlib.contextmanager
def trace(directory: str | Path):
    """jax.profiler's trace of what runs inside, written under `directory`."""
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        yield


def trace_file(directory: str | Path) -> Path:
    """The newest Perfetto trace under `directory` (jax.profiler writes one per trace)."""
    found = sorted(Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{directory}: no perfetto_trace.json.gz (was it traced with "
                                "profiling.trace?)")
    return found[-1]


def op_events(directory: str | Path) -> list[tuple[str, str, float]]:
    """(XLA op, kernel name, microseconds) of every op execution in the newest trace. Where the
    trace has a device process (GPU, TPU), only its kernels count: the host side only launched
    them."""
    events = json.loads(gzip.decompress(trace_file(directory).read_bytes()))["traceEvents"]
    process = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
    on_device = [e for e in ops if process.get(e["pid"], "").startswith("/device:")]
    if on_device:
        # a device process can show each op twice: on its "XLA Ops" line and as the kernels of a
        # stream. The kernels carry the names that say what ran; keep the streams where there
        # are any.
        thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
                  if e.get("ph") == "M" and e.get("name") == "thread_name"}
        streams = [e for e in on_device
                   if "stream" in thread.get((e["pid"], e.get("tid")), "").lower()]
        ops = streams or on_device
    return [(e["args"]["hlo_op"], e["name"], float(e.get("dur", 0.0))) for e in ops]


def busiest_ops(directory: str | Path, runs: int, top: int = 25) -> list[dict]:
    """The `top` ops by time, each with ms and calls per run, its share of all op time and its
    kernel (the busiest one, where an op launched several)."""
    ms, calls = collections.Counter(), collections.Counter()
    kernels: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for op, kernel, us in op_events(directory):
        ms[op] += us / 1e3
        calls[op] += 1
        kernels[op][kernel] += us
    total = sum(ms.values()) or 1.0
    return [{"op": op, "kernel": kernels[op].most_common(1)[0][0], "ms_per_run": round(t / runs, 3),
             "calls_per_run": round(calls[op] / runs, 2), "share": round(t / total, 4)}
            for op, t in ms.most_common(top)]


def total_ms(directory: str | Path, runs: int) -> float:
    """All op time per run (the device's busy time, or XLA:CPU's summed over its threads)."""
    return round(sum(us for _, _, us in op_events(directory)) / 1e3 / runs, 3)


def profiled(directory: str, runs: int, run) -> dict:
    """`run()` traced `runs` times into `directory`: the busiest ops and the op time per run."""
    with trace(directory):
        for _ in range(runs):
            run()
    return {"profile_dir": directory, "op_ms_per_run": total_ms(directory, runs),
            "busiest_ops": busiest_ops(directory, runs)}
