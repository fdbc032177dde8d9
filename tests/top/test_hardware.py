"""hardware.py: the peak table and the host settings for XLA:CPU."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxgpt import hardware

# Runs a jitted function whose scratch (a 32 MB intermediate and the matmul's work space) is
# allocated and freed on every call, and prints the minor page faults of the median call after
# warm-up (with another process loading the cores, a tuned call now and then still reaches a new
# high-water mark of the heap: one of five calls at ~8,500 faults averaged 1,700 in CI).
# Both runs compute on the calling thread (tune_host turns async dispatch off), whose malloc
# heap has no size cap, so the counts do not depend on which worker thread XLA picks.
FAULTS_PER_CALL = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from jaxgpt import hardware
if sys.argv[1] == "tuned":
    hardware.tune_host()
else:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x[:64]).T).sum())
x = jnp.ones((2048, 4096), jnp.float32)
for _ in range(3):
    f(x).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults_per_call": sorted(faults)[2], "faults": faults,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def faults_per_call(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL, mode], capture_output=True,
                         text=True, check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tune_host_keeps_scratch_memory_mapped_between_calls():
    default, tuned = faults_per_call("default"), faults_per_call("tuned")
    # Untuned, glibc maps fresh pages for the scratch at every call; tuned, the pages stay
    # mapped from call to call.
    # each of the intermediate's 8,192 pages: 8,449 measured here
    assert default["faults_per_call"] > 0.9 * 8192
    # 0-1 measured (the median call)
    assert tuned["faults_per_call"] < default["faults_per_call"] / 20 and tuned["async"] is False


def test_peak_flops_from_the_table_or_measured_on_cpu():
    h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    assert hardware.peak_flops(h100) == (989e12, "datasheet bf16 H100")
    pcie = SimpleNamespace(device_kind="NVIDIA H100 PCIe", platform="gpu")
    assert hardware.peak_flops(pcie) == (756e12, "datasheet bf16 H100 PCIe")
    v5e = SimpleNamespace(device_kind="TPU v5 lite", platform="tpu")
    assert hardware.peak_flops(v5e) == (197e12, "datasheet bf16 TPU v5 lite")
    cpu = SimpleNamespace(device_kind="cpu", platform="cpu")
    flops, source = hardware.peak_flops(cpu)
    assert source == "measured fp32 matmul" and flops > 1e9
    # a bf16 run's MFU is against the bf16 rate
    bf16_flops, source = hardware.peak_flops(cpu, "bfloat16")
    assert source == "measured bf16 matmul" and bf16_flops > 1e9
    assert hardware.peak_flops(h100, "float32") == (989e12, "datasheet bf16 H100")


def test_only_a_gpu_stops_the_host_at_a_branch():
    assert hardware.branches_sync_host("gpu") and not hardware.branches_sync_host("cpu")
    assert not hardware.branches_sync_host("tpu") and not hardware.branches_sync_host()  # this CPU


def test_a_target_platform_picks_the_kernels_of_that_platform():
    import jax.numpy as jnp

    from jaxgpt.model.kernels import choice
    assert hardware.compute_platform() == "cpu" and choice.resolve("auto", jnp.bfloat16) == "cpu"
    with hardware.target_platform("gpu"):  # compiling ahead of time for a GPU (aot.py)
        assert hardware.compute_platform() == "gpu" and hardware.branches_sync_host()
        assert (choice.resolve("auto", jnp.bfloat16) == "cudnn"
                and choice.resolve("auto", jnp.float32) == "xla")
    assert hardware.compute_platform() == "cpu"


def test_cpu_name_is_the_model_name_lscpu_shows():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux)")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")]
    assert hardware.cpu_name() == (names[0] if names else hardware.platform.processor()
                                   or hardware.platform.machine())


def test_steal_share_is_the_hypervisors_part_of_the_cpu_time_between_two_readings():
    before = {"user": 100, "nice": 0, "system": 10, "idle": 50, "iowait": 0, "irq": 0, "softirq": 0,
              "steal": 40}
    after = {"user": 160, "nice": 0, "system": 20, "idle": 80, "iowait": 0, "irq": 0, "softirq": 0,
             "steal": 70}
    assert hardware.steal_share(before, after) == 30 / 130
    assert hardware.steal_share({}, {}) is None
    if Path("/proc/stat").is_file():  # the real reading: every kind, counting up
        first, second = hardware.cpu_ticks(), hardware.cpu_ticks()
        assert len(first) == 8 and all(second[k] >= first[k] for k in first)


def test_cpu_bf16_units_from_the_flags():
    assert hardware.cpu_bf16_units("processor\t: 0\n"
                                   "flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert hardware.cpu_bf16_units("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert not hardware.cpu_bf16_units("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not hardware.cpu_bf16_units("model name\t: something\n")  # no flags line at all
    if Path("/proc/cpuinfo").is_file():
        line = re.search(r"^(?:flags|Features)\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        flags = set(line.group(1).split())
        assert hardware.cpu_bf16_units() == bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def test_library_matmuls_reads_the_last_triton_setting_in_xla_flags():
    off, on = "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_triton_gemm=true"
    with hardware.target_platform("gpu"):
        settings = ("", off, f"--xla_dump_to=x {off}", f"{off} {on}", f"{on} {off}",
                    "--xla_gpu_enable_triton_gemm=0")
        assert [hardware.library_matmuls(flags) for flags in settings] == [
            False, True, True, False, True, True]
    assert not hardware.library_matmuls(off)  # a CPU has no cuBLAS, whatever the flags say


_CACHED_COMPILE = """
import sys
import jax, jax.numpy as jnp
from jaxgpt import hardware
path = hardware.compilation_cache()
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3))
print(path)
"""


def test_the_compilation_cache_is_the_users_per_host_and_off_where_named_or_refused(tmp_path):
    """Every command's compiled programs land in ~/.cache/jaxgpt/xla/<this CPU and jax> (mode
    700), where the next run finds them; a cache named by JAX_COMPILATION_CACHE_DIR, or
    JAXGPT_XLA_CACHE=0, leaves jax as it is."""
    from conftest import subprocess_env
    env = {k: v for k, v in subprocess_env(XDG_CACHE_HOME=str(tmp_path),
                                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0").items()
           if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", _CACHED_COMPILE], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path = Path(out.stdout.split()[-1])
    assert path.parent == tmp_path / "jaxgpt" / "xla" and re.fullmatch(r"[0-9a-f]{16}", path.name)
    assert path.stat().st_mode & 0o777 == 0o700 and any(path.iterdir())
    for extra in ({"JAXGPT_XLA_CACHE": "0"}, {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "x")}):
        assert hardware.compilation_cache({**env, **extra}) is None


def test_programs_compiled_in_a_fifth_of_a_second_are_kept_unless_the_user_says_otherwise(
        tmp_path):
    """jax keeps only programs that took a second to compile; tune_host keeps those from 0.2 s on
    (placing a model's prefilled row, compiled anew at every start otherwise), and leaves a value
    the user set in the environment."""
    from conftest import subprocess_env
    code = ("import jax; from jaxgpt import hardware; hardware.tune_host(); "
            "print(jax.config.jax_persistent_cache_min_compile_time_secs)")
    env = {k: v for k, v in subprocess_env(XDG_CACHE_HOME=str(tmp_path)).items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    got = [subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                          text=True, timeout=120).stdout.split()[-1]
           for extra in ({}, {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "3"})]
    assert got == [str(hardware.MIN_CACHED_COMPILE_S), "3.0"]
