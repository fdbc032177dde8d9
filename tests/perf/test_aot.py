"""aot.py: the kernel table of a compiled XLA:GPU module, and `bench compile bench.target=...`,
which compiles for a GPU this host does not have (run where jax's CUDA plugin is found: .ci/run
installs it beside the environment and names it in JAXGPT_CUDA_PLUGIN_DIR)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt.perf import aot

ROOT = Path(__file__).resolve().parents[2]
GPT2 = str(ROOT / "experiments/configs/gpt2_124m.py")
PLUGIN_DIR = os.environ.get("JAXGPT_CUDA_PLUGIN_DIR", "")


def _cuda_plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False

# A module in XLA's text form, written here: an elementwise fusion, a matmul fusion, a cuBLAS matmul
# (with its scratch workspace), a loop of 4 trips whose body slices one [8, 16] piece out of a
# [4, 8, 16] buffer and writes it into another, and a conditional whose branches add or pass their
# operand. A line ending in a backslash goes on in the next one (the string holds it whole).
MODULE = """HloModule jit_step, is_scheduled=true

%fused_add (param_0: f32[8,16], param_1: f32[8,16]) -> f32[8,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[8,16]{1,0} parameter(1)
  ROOT %add.1 = f32[8,16]{1,0} add(%param_0, %param_1), metadata={op_name="jit(step)/add"}
}

%gemm_fusion_dot (parameter_0: bf16[8,16], parameter_1: bf16[16,32]) -> bf16[8,32] {
  %parameter_0 = bf16[8,16]{1,0} parameter(0)
  %parameter_1 = bf16[16,32]{1,0} parameter(1)
  ROOT %dot.0 = bf16[8,32]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, \
rhs_contracting_dims={0}
}

%fused_slice (param_1.1: s32[], param_0.1: f32[4,8,16]) -> f32[8,16] {
  %param_0.1 = f32[4,8,16]{2,1,0} parameter(1)
  %param_1.1 = s32[] parameter(0)
  %constant_0 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,8,16]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant_0, \
%constant_0), dynamic_slice_sizes={1,8,16}
  ROOT %bitcast.1 = f32[8,16]{1,0} bitcast(%dynamic-slice.1)
}

%fused_update (param_0.2: f32[4,8,16], param_1.2: f32[8,16], param_2.2: s32[]) -> f32[4,8,16] {
  %param_0.2 = f32[4,8,16]{2,1,0} parameter(0)
  %param_1.2 = f32[8,16]{1,0} parameter(1)
  %bitcast.2 = f32[1,8,16]{2,1,0} bitcast(%param_1.2)
  %param_2.2 = s32[] parameter(2)
  %constant_1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[4,8,16]{2,1,0} dynamic-update-slice(%param_0.2, %bitcast.2, \
%param_2.2, %constant_1, %constant_1)
}

%body (p: (s32[], f32[4,8,16], f32[4,8,16])) -> (s32[], f32[4,8,16], f32[4,8,16]) {
  %p = (s32[], f32[4,8,16]{2,1,0}, f32[4,8,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %source = f32[4,8,16]{2,1,0} get-tuple-element(%p), index=1
  %sink = f32[4,8,16]{2,1,0} get-tuple-element(%p), index=2
  %piece = f32[8,16]{1,0} fusion(%i, %source), kind=kLoop, calls=%fused_slice, \
metadata={op_name="jit(step)/while/body/dynamic_slice"}
  %written = f32[4,8,16]{2,1,0} fusion(%sink, %piece, %i), kind=kLoop, calls=%fused_update, \
metadata={op_name="jit(step)/while/body/dynamic_update_slice"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %tuple.1 = (s32[], f32[4,8,16]{2,1,0}, f32[4,8,16]{2,1,0}) tuple(%next, %source, %written)
}

%add_twice (y: f32[8,16]) -> f32[8,16] {
  %y = f32[8,16]{1,0} parameter(0)
  ROOT %twice = f32[8,16]{1,0} fusion(%y, %y), kind=kLoop, calls=%fused_add, \
metadata={op_name="jit(step)/cond/add"}
}

%pass (z: f32[8,16]) -> f32[8,16] {
  ROOT %z = f32[8,16]{1,0} parameter(0)
}

%cond (q: (s32[], f32[4,8,16], f32[4,8,16])) -> pred[] {
  %q = (s32[], f32[4,8,16]{2,1,0}, f32[4,8,16]{2,1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%j, %four), direction=LT
}

ENTRY %main.1 (a: f32[8,16], b: f32[8,16], x: bf16[8,16], w: bf16[16,32], s: f32[4,8,16], \
wf: f32[16,32], flag: pred[]) -> (f32[8,16], bf16[8,32], f32[4,8,16], f32[8,32], f32[8,16]) {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %x = bf16[8,16]{1,0} parameter(2)
  %w = bf16[16,32]{1,0} parameter(3)
  %s = f32[4,8,16]{2,1,0} parameter(4)
  %wf = f32[16,32]{1,0} parameter(5)
  %flag = pred[] parameter(6)
  %sum = f32[8,16]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused_add, \
metadata={op_name="jit(step)/add"}
  %product = bf16[8,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_fusion_dot, \
metadata={op_name="jit(step)/dot_general"}
  %library = (f32[8,32]{1,0}, f32[8,32]{1,0}, s8[4194304]{0}) custom-call(%a, %wf), \
custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/dot_general"}, \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"]},"epilogue":"GELU_AUX"}}
  %library_product = f32[8,32]{1,0} get-tuple-element(%library), index=0
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8,16]{2,1,0}, f32[4,8,16]{2,1,0}) tuple(%zero, %s, %s)
  %loop = (s32[], f32[4,8,16]{2,1,0}, f32[4,8,16]{2,1,0}) while(%init), condition=%cond, \
body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %out = f32[4,8,16]{2,1,0} get-tuple-element(%loop), index=2
  %branch = f32[8,16]{1,0} conditional(%flag, %a, %b), true_computation=%add_twice, \
false_computation=%pass, metadata={op_name="jit(step)/cond"}
  ROOT %result = (f32[8,16]{1,0}, bf16[8,32]{1,0}, f32[4,8,16]{2,1,0}, f32[8,32]{1,0}, \
f32[8,16]{1,0}) tuple(%sum, %product, %out, %library_product, %branch)
}
"""


def test_kernels_count_each_launch_with_the_bytes_it_moves():
    table = aot.kernels(MODULE)
    rows = [(k.kind, k.bytes, k.flops, k.launches, k.op_name) for k in table]
    assert rows == [
        # two operands and the result
        ("fusion", 3 * 8 * 16 * 4, 0, 1, "jit(step)/add"),
        ("matmul", (8 * 16 + 16 * 32 + 8 * 32) * 2, 2 * 8 * 32 * 16, 1, "jit(step)/dot_general"),
        # cuBLAS: the operands, the product and its epilogue's auxiliary output (GELU_AUX), not the
        # workspace
        ("matmul", (8 * 16 + 16 * 32 + 2 * 8 * 32) * 4, 2 * 8 * 32 * 16, 1,
         "jit(step)/dot_general"),
        # the body, 4 times: the [1, 8, 16] piece taken (not the whole buffer), its index, the
        # result
        ("fusion", 4 * (512 + 4 + 512), 0, 4, "jit(step)/while/body/dynamic_slice"),
        # updated in place: the update read and written, and the index; the buffer itself not at all
        ("fusion", 4 * (512 + 4 + 512), 0, 4, "jit(step)/while/body/dynamic_update_slice"),
        # an unfused scalar add
        ("add", 4 * 12, 0, 4, ""),
        # listed (a GPU's host waits there), then the larger branch
        ("conditional", 0, 0, 1, "jit(step)/cond"),
        ("fusion", 3 * 8 * 16 * 4, 0, 1, "jit(step)/cond/add"),
    ]
    summary = aot.summary(table, "h100", top=2)
    assert summary["by_kind"]["fusion"] == {"launches": 10, "bytes": 2 * 1536 + 2 * 4112,
                                            "flops": 0}
    assert summary["by_kind"]["conditional"] == {"launches": 1, "bytes": 0, "flops": 0}
    assert summary["matmul_flops"] == 2 * 8192
    assert summary["memory_bound_bytes"] == 2 * 1536 + 2 * 4112 + 48
    assert [h["bytes"] for h in summary["heaviest"]] == [4112, 4112]


def test_a_gpu_is_matched_to_its_card_by_the_kind_it_reports():
    assert [aot.card_of(kind) for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200",
                                           "NVIDIA A100-SXM4-80GB")] == ["h100", "h200", ""]


def test_an_unknown_card_is_refused_in_one_line():
    with pytest.raises(aot.ConfigError, match="bench.target='h300': expected one of h100, h200"):
        aot.card("h300")


def _bench_compile(*settings: str, plugin: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if plugin:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PLUGIN_DIR, str(ROOT),
                                                          env.get("PYTHONPATH", "")]))
    tiny = ["data.path=unused.txt", "data.tokenizer=byte", "model.vocab_size=256",
            "optim.grad_accum=1", "data.batch_size=4", "model.n_layer=2", "model.d_model=64",
            "model.n_head=4", "model.seq_len=32"]
    return subprocess.run([sys.executable, "-m", "jaxgpt.bench", "compile", GPT2, *tiny, *settings],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.skipif(_cuda_plugin_installed(),
                    reason="jax's CUDA plugin is installed in this environment")
def test_without_the_cuda_plugin_a_target_says_what_to_install():
    result = _bench_compile("bench.target=h100", plugin=False)
    assert result.returncode != 0
    assert "bench.target=h100: jax's CUDA plugin is not installed" in result.stderr
    assert "pip install jax-cuda12-plugin==" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not (PLUGIN_DIR and (Path(PLUGIN_DIR) / "jax_plugins" / "xla_cuda12").is_dir()),
                    reason="set JAXGPT_CUDA_PLUGIN_DIR to a directory with jax's CUDA plugin and "
                           "cuDNN (.ci/run does)")
def test_bench_compile_plans_a_gpu_step_on_a_host_without_one():
    fp32 = _bench_compile("bench.target=h100", "model.dtype=float32")
    assert fp32.returncode == 0, fp32.stderr[-2000:]
    report = json.loads(fp32.stdout.strip().splitlines()[-1])
    assert (report["target"], report["platform"], report["device_kind"]) == (
        "h100", "gpu", "NVIDIA H100 80GB HBM3")
    assert (report["limit_source"], report["limit_bytes"], report["fits"]) == (
        "h100 data sheet", 80 * 2 ** 30, True)
    # every product of forward and backward is a matmul kernel: 3x the forward's FLOPs, to the FLOP
    B, L, D, V, layers = 4, 32, 64, 256, 2
    forward = B * L * (2 * 12 * D * D * layers + 2 * D * V + 4 * L * D * layers)
    assert report["kernels"]["matmul_flops"] == 3 * forward
    assert "attention" not in report["kernels"]["by_kind"]  # fp32: attention as plain products
    assert report["xla_bytes"]["temporaries"] > 0 and report["kernels"]["memory_bound_bytes"] > 0

    bf16 = _bench_compile("bench.target=h200")
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    report = json.loads(bf16.stdout.strip().splitlines()[-1])
    assert report["device_kind"] == "NVIDIA H200"
    # bf16 on a GPU: cuDNN's flash attention, forward and backward in each layer, chosen on this CPU
    # host
    assert report["kernels"]["by_kind"]["attention"]["launches"] == 2 * layers
    assert report["kernels"]["matmul_flops"] == 3 * (forward - B * L * 4 * L * D * layers)
    # no branch in a GPU's step (train.skip_update=auto selects there): its host never waits
    # mid-step ...
    assert "conditional" not in report["kernels"]["by_kind"]
    # ... where the update skipped by a lax.cond is one
    cond = _bench_compile("bench.target=h100", "train.skip_update=cond")
    assert cond.returncode == 0, cond.stderr[-2000:]
    by_kind = json.loads(cond.stdout.strip().splitlines()[-1])["kernels"]["by_kind"]
    assert by_kind["conditional"]["launches"] == 1


# the tiny GPT's train step compiled for an H100, its compiled module's text on stdout
_COMPILED_STEP = """
import sys
from jaxgpt.perf import aot
from jaxgpt import config as config_lib
from jaxgpt.train import memory
cfg = config_lib.from_cli(sys.argv[1], sys.argv[2:])
with aot.compiling_for("h100"):
    print(aot.compile_step(memory.trainer_for(cfg, aot.devices("h100", 1))).as_text())
"""


@pytest.mark.skipif(not (PLUGIN_DIR and (Path(PLUGIN_DIR) / "jax_plugins" / "xla_cuda12").is_dir()),
                    reason="set JAXGPT_CUDA_PLUGIN_DIR to a directory with jax's CUDA plugin and "
                           "cuDNN (.ci/run does)")
def test_with_cublas_matmuls_the_mlp_bias_and_gelu_are_the_matmul_epilogue():
    """XLA_FLAGS with Triton's matmuls off: every layer's first MLP product adds its bias and
    applies GPT-2's gelu in cuBLASLt's epilogue (BIAS_GELU_AUX, which also writes the sum for the
    backward pass; with the bias added inside the recomputed activation, as under Triton's matmuls,
    the backward pass needs the bare product and XLA makes none), and every other product of the
    forward pass adds its bias there too (q's, over two axes, did not when added after the reshape
    to heads)."""
    # rows enough that a layer's input is over 32 MB: XLA:GPU merges sibling products of smaller
    # inputs (q's, k's and v's) into one matmul, whose biases it then adds apart (its DotMerger)
    tiny = ["data.path=unused.txt", "data.tokenizer=byte", "model.vocab_size=256",
            "optim.grad_accum=1", "data.batch_size=64", "model.n_layer=2", "model.d_model=256",
            "model.n_head=4", "model.seq_len=1024"]
    env = {**os.environ, "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false",
           "PYTHONPATH": os.pathsep.join(filter(None, [PLUGIN_DIR, str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))}
    out = subprocess.run([sys.executable, "-c", _COMPILED_STEP, GPT2, *tiny], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    epilogues = re.findall(r'"epilogue":"(\w+)"', out.stdout)
    assert epilogues.count("BIAS_GELU_AUX") == 2  # one a layer
    # and every other forward product's bias: q, k and v, the two outputs
    assert epilogues.count("BIAS") == 2 * 4
