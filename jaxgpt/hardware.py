"""The machine: peak FLOP/s for model FLOPs utilisation (MFU), and host settings for XLA.

Accelerators: dense bf16 peaks from the vendors' data sheets. CPUs have no such number that
holds for a given machine, so we measure the fp32 matmul rate of this one.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# device_kind substring -> dense bf16 FLOP/s per chip (vendor data sheets)
PEAK_BF16 = {  # dense, no sparsity; the first name found in a device's kind wins
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,   # SXM
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def cpu_name() -> str:
    """The CPU's model name as `lscpu` shows it (/proc/cpuinfo on Linux), for the host line beside a
    timing."""
    try:
        if m := re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M):
            return m.group(1).strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# CPU flags of bf16 matrix instructions: x86's AMX and AVX-512 BF16, Arm's BF16 extension
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def cpu_bf16_units(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 in hardware, by the flags /proc/cpuinfo lists (`cpuinfo`: its
    text); False where they cannot be read. Where it does, XLA:CPU runs bf16 products several times
    faster than fp32 ones (model.matmul_dtype); elsewhere it would emulate them."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            return False
    flags = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.M)
    return bool(flags) and not BF16_FLAGS.isdisjoint(flags.group(1).split())


def cpu_ticks() -> dict[str, int]:
    """This machine's CPU time so far by kind, in clock ticks (/proc/stat's first line; {} off
    Linux): two readings give the share a hypervisor took ("steal"), which slows a VM's timings by
    as much."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return {}
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return dict(zip(kinds, map(int, first[1:len(kinds) + 1]), strict=False))


def steal_share(before: dict[str, int], after: dict[str, int]) -> float | None:
    """The share of CPU time between two cpu_ticks() readings that the hypervisor took (None if
    unknown)."""
    spent = {k: after[k] - before[k] for k in before if k in after}
    total = sum(spent.values())
    return spent["steal"] / total if total and "steal" in spent else None


def best_seconds(fn, x, repeats: int) -> float:
    """The fastest of `repeats` timed calls of jax.jit(fn)(x), after one untimed call that
    compiles."""
    f = jax.jit(fn)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 10, dtype="float32") -> float:
    """FLOP/s of an n x n matmul on the default device, best of `repeats`: inputs in `dtype`,
    summed in fp32 (how the model's bf16 matmuls run, model.matmul_dtype)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    return 2 * n ** 3 / best_seconds(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32),
                                     a, repeats)


def memory_bandwidth(n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a read-and-write of an n_bytes fp32 array: the rate that bounds batch-1 decoding,
    which reads every weight once per token."""
    x = jnp.ones(n_bytes // 4, jnp.float32)
    return 2 * n_bytes / best_seconds(lambda a: a * 1.0001, x, repeats)


def peak_flops(device=None, matmul_dtype="float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from). An accelerator's is its datasheet's
    dense bf16 rate; a CPU's is measured, in the dtype the run multiplies in (on a CPU with bf16
    units a bf16 product runs several times faster than fp32, so a bf16 run's MFU against the
    fp32 rate would read several times too high)."""
    device = device or jax.devices()[0]
    for name, flops in PEAK_BF16.items():
        if name.lower() in device.device_kind.lower():
            return flops, f"datasheet bf16 {name}"
    if device.platform == "cpu":
        name = jnp.dtype(matmul_dtype).name
        # this host's devices share it
        flops = measured_matmul_flops(dtype=name) / len(jax.local_devices())
        return flops, (f"measured {name.replace('bfloat16', 'bf16').replace('float32', 'fp32')}"
                       " matmul")
    return float("nan"), f"unknown device {device.device_kind}"


_target_platform: list[str] = []  # set while compiling for a device this host lacks (perf/aot.py)


def compute_platform() -> str:
    """The platform the model's computations are made for: the default backend's ("cpu", "gpu",
    "tpu"), or the one being compiled for ahead of time (target_platform)."""
    return _target_platform[-1] if _target_platform else jax.default_backend()


@contextlib.contextmanager
def target_platform(name: str):
    """Inside, compute_platform() is `name`: code that picks kernels by platform picks them for that
    one."""
    _target_platform.append(name)
    try:
        yield
    finally:
        _target_platform.pop()


def branches_sync_host(backend: str | None = None) -> bool:
    """Whether a device-side branch (lax.cond / lax.switch) stops the host until the device catches
    up. On a GPU it does: XLA:GPU runs a conditional by copying its branch index to the host and
    waiting for the stream (ConditionalThunk, BlockHostUntilDone in openxla/xla), and conditionals
    are not among the kinds it captures into CUDA graphs by default, so the kernels after one are
    launched only once the GPU has run everything before it. A CPU runs on the host anyway, and a
    TPU branches on the device. A loop of known trip count (lax.scan, fori_loop) does not wait."""
    return (backend or compute_platform()) == "gpu"


def library_matmuls(xla_flags: str | None = None) -> bool:
    """Whether XLA:GPU makes every matmul a cuBLAS call: XLA_FLAGS turns its Triton matmul fusions
    off (--xla_gpu_enable_triton_gemm=false, as MaxText's GPU recipes do; the last setting counts).
    cuBLASLt then adds a bias and applies GPT-2's gelu as it writes the product (its BIAS_GELU_AUX
    epilogue, which also writes the pre-activation value for the backward pass), where a Triton
    matmul writes the bare product and a kernel of its own adds the bias (kernels.activate)."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    values = re.findall(r"--xla_gpu_enable_triton_gemm=(\w+)", flags)
    return compute_platform() == "gpu" and bool(values) and values[-1].lower() in ("false", "0")


XLA_CACHE_BYTES = 4 << 30  # the persistent compilation cache's size; jax drops the least used
MIN_CACHED_COMPILE_S = 0.2  # programs that compile faster are not written to it


def compilation_cache(env=None) -> Path | None:
    """Turn on jax's persistent compilation cache in the user's cache directory (every
    `python -m jaxgpt.*` command does, through tune_host): a command run again loads its programs
    instead of compiling them, so a real model's first reply comes in seconds. One directory per
    CPU (model and flags) and jax version: XLA:CPU compiles for the host's instruction set, which
    jax's cache key does not name, and a home directory may be shared by different machines. The
    directory is the user's alone (mode 700): a cached program is code this process will run.
    Nothing where JAX_COMPILATION_CACHE_DIR names a cache (jax reads it itself) or with
    JAXGPT_XLA_CACHE=0."""
    env = os.environ if env is None else env
    if env.get("JAX_COMPILATION_CACHE_DIR") or env.get("JAXGPT_XLA_CACHE", "1") == "0":
        return None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        cpuinfo = ""
    flags = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.M)
    host = f"{cpu_name()}|{flags.group(1).split() if flags else ''}|{jax.__version__}"
    root = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = root / "jaxgpt" / "xla" / hashlib.sha256(host.encode()).hexdigest()[:16]
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:  # a read-only home: compile every time, as without the cache
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_BYTES)
    return path


def tune_host(cache: bool = True) -> None:
    """Keep XLA:CPU's scratch memory mapped from one step to the next, and with `cache` the
    persistent compilation cache on (compilation_cache). Call it before the first computation (every
    `python -m jaxgpt.*` command does).

    Every execution of a compiled step allocates its scratch buffers (tens to hundreds of MB) and
    frees them at the end. glibc serves blocks that large with a fresh mmap and unmaps them on free,
    so each step touched every page anew, a page fault per 4 KB. Telling malloc never to mmap and
    never to give memory back keeps the pages, and the process's memory stays at its high-water
    mark, as a training process's does anyway. CPU computations run on the calling thread (no
    async dispatch): a worker thread's malloc heap holds at most 64 MB, so larger scratch would
    still be mapped per step there. The steps it speeds up: the README's "Training on a CPU".
    Accelerators are unaffected; a C library without mallopt (macOS, musl) keeps its defaults.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if cache:
        compilation_cache()
        # jax keeps only programs that took a second to compile; a model's smaller ones (placing a
        # prefilled row: about one) would be compiled again at every start
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_S)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    mallopt(M_TOP_PAD, 64 << 20)  # grow the heap in large steps, not page by page
