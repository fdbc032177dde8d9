"""Compiling for a GPU this host does not have, and reading what its compiler made.

    with aot.compiling_for("h100"):                    # the model picks its GPU kernels
        devices = aot.devices("h100", 8)               # 8 GPUs of one host, described, not present
        compiled = jax.jit(step).lower(...).compile()  # XLA:GPU's own passes, from a CPU host
    table = aot.kernels(compiled.as_text())            # one row per kernel launch of a step

XLA:GPU compiles without a device when it is handed the card's description (a TargetConfig: SM
count, memory, bandwidth, compute capability); jax takes it through jax.experimental.topologies.
This needs jax's CUDA plugin and cuDNN's library installed (`pip install jax-cuda12-plugin==<jax's
version> nvidia-cudnn-cu12`: no GPU, driver or CUDA toolkit), and it stays an optional extra.
Without a device there is no autotuning: each matmul gets XLA's default kernel, where a GPU may time
others and pick a faster one. The memory plan and the kernels, their fusions and their bytes are the
compiler's own; times are not measured here, only bounded (kernel bytes over the card's bandwidth).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import re
import time

from jaxgpt import hardware
from jaxgpt.errors import ConfigError
from jaxgpt.parallel import sharding
from jaxgpt.train import memory


@dataclasses.dataclass(frozen=True)
class Card:
    name: str               # what the device reports as its kind (hardware.PEAK_BF16 reads it)
    memory_bytes: int       # device memory
    bandwidth: float        # bytes/s, the data sheet's
    sms: int = 132          # streaming multiprocessors
    clock_ghz: float = 1.98
    l2_bytes: int = 50 * 2 ** 20

    def target_config(self) -> str:
        """The card as XLA's stream_executor.GpuTargetConfigProto (text format), Hopper's limits."""
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {self.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)} l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{self.name}"
"""


# The cards the GPU check runs on (data sheets; the H200's memory as its driver reported it here)
CARDS = {
    "h100": Card("NVIDIA H100 80GB HBM3", 80 * 2 ** 30, 3.35e12),
    "h200": Card("NVIDIA H200", 143_771 * 2 ** 20, 4.8e12),
}


def card(name: str) -> Card:
    if name not in CARDS:
        raise ConfigError(f"bench.target={name!r}: expected one of {', '.join(CARDS)}")
    return CARDS[name]


def card_of(device_kind: str) -> str:
    """The name in CARDS of the card a GPU reports as its kind, or "" (another card)."""
    return next((name for name, c in CARDS.items() if c.name.lower() in device_kind.lower()), "")


def devices(name: str, count: int = 1) -> list:
    """`count` GPUs of one host, of the card `name`, as jax devices to build a mesh of and compile
    for."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # it would look for a driver
    import jax
    from jax.experimental import topologies
    try:
        jax.config.update("jax_platforms", "cpu")  # run nothing on the GPU plugin: there is no GPU
    except RuntimeError:
        pass  # a backend already started: it is what it is
    try:
        topology = topologies.get_topology_desc(platform="cuda",
                                                target_config=card(name).target_config(),
                                                topology=f"1x1x{max(count, 1)}")
    except (NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"bench.target={name}: jax's CUDA plugin is not installed or cannot "
                          f"compile here (pip install jax-cuda12-plugin=={jax.__version__} "
                          f"nvidia-cudnn-cu12): {str(e).splitlines()[0]}") from None
    return list(topology.devices)


@contextlib.contextmanager
def compiling_for(name: str):
    """While inside, the model chooses its kernels for a GPU (hardware.compute_platform() is
    "gpu")."""
    card(name)
    with hardware.target_platform("gpu"):
        yield


# HLO element types and their sizes in bytes
_SIZES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_SIZES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*?)\)(, .*)?$")
# no kernel: names and views of buffers
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier"}


def _bytes(hlo_type: str) -> int:
    return sum(_SIZES[t] * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in _ARRAY.findall(hlo_type))


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple]], str]:
    """{name: [(result, type, opcode, operand names, attributes)]} of every computation, and the
    entry's name."""
    computations, entry, current = {}, "", None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            if m := re.match(r"^(ENTRY )?%(\S+) .*\{\s*$", line):
                current = computations.setdefault(m.group(2), [])
                entry = m.group(2) if m.group(1) else entry
            elif line.startswith("}"):
                current = None
        elif current is not None and (m := _INSTRUCTION.match(line.strip())):
            result, hlo_type, opcode, operands, attributes = m.groups()
            if opcode == "parameter":  # parameter(N): keep N where the attributes go
                current.append((result, hlo_type, opcode, [], operands))
            else:
                current.append((result, hlo_type, opcode, re.findall(r"%([\w.\-]+)", operands),
                                attributes or ""))
    return computations, entry


def _dims(hlo_type: str) -> list[int]:
    """The dimensions of the first array in an HLO type."""
    return [int(d) for d in _ARRAY.findall(hlo_type)[0][1].split(",") if d]


def _matmul_flops(result_type: str, lhs_type: str, contracted: str) -> int:
    """2 x output elements x contracted size; contracted: the lhs's contracting dimensions, "1" or
    "0,2"."""
    lhs = _dims(lhs_type)
    return 2 * math.prod(lhs[int(i.strip('" '))] for i in contracted.split(",") if i.strip('" ')) \
        * math.prod(_dims(result_type))


def _dot_flops(computations: dict, name: str) -> int:
    """Matmul FLOPs of the dots in computation `name` and those it calls."""
    flops, instructions = 0, computations.get(name, [])
    types = {result: hlo_type for result, hlo_type, *_ in instructions}
    for _, hlo_type, opcode, operands, attributes in instructions:
        if opcode == "dot":
            contracted = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attributes).group(1)
            flops += _matmul_flops(hlo_type, types[operands[0]], contracted)
        for called in re.findall(r"calls=%([\w.\-]+)", attributes):
            flops += _dot_flops(computations, called)
    return flops


def _library_matmul_flops(result_type: str, lhs_type: str, attributes: str) -> int:
    """Matmul FLOPs of a cuBLAS custom call, from its dot dimension numbers (0 without them)."""
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attributes)
    return _matmul_flops(result_type, lhs_type, contracting.group(1)) if contracting else 0


_SLICING = {"slice", "dynamic-slice", "gather"}
# one input, element for element
_PER_ELEMENT = {"convert", "bitcast", "reshape", "copy", "negate", "abs"}


def _fusion_bytes(computations: dict, name: str, result_type: str, operand_types: list[str]) -> int:
    """Bytes a fusion reads and writes: an operand that is only sliced or gathered inside (directly
    or after a convert or reshape) counts the pieces taken, and a buffer updated in place
    (dynamic-update-slice of an operand) the update."""
    instructions = computations[name]
    types = {result: hlo_type for result, hlo_type, *_ in instructions}
    # value -> [(operand position, opcode, its result, result type)]
    uses = collections.defaultdict(list)
    params, in_place, updates = {}, set(), 0
    for result, hlo_type, opcode, operands, attributes in instructions:
        if opcode == "parameter":
            params[result] = int(attributes)  # its index among the fusion's operands
        for position, o in enumerate(operands):
            uses[o].append((position, opcode, result, hlo_type))
        if opcode == "dynamic-update-slice":
            in_place.add(operands[0])
            updates += _bytes(types.get(operands[1], ""))

    def pieces(value: str) -> int | None:
        """Bytes taken from `value` if every use of it ends in a slice of it, else None (read
        whole)."""
        taken, users = 0, uses.get(value, [])
        for position, opcode, result, hlo_type in users:
            if position == 0 and opcode in _SLICING:
                taken += _bytes(hlo_type)
            elif opcode in _PER_ELEMENT and (piece := pieces(result)) is not None:
                taken += piece
            else:
                return None
        return taken if users else None

    total = 0
    for param, index in params.items():
        if param in in_place:
            continue  # written in place: only the update moves (counted below)
        if (taken := pieces(param)) is not None:
            total += taken
        elif index < len(operand_types):
            total += _bytes(operand_types[index])
    return total + (updates if in_place else _bytes(result_type))


@dataclasses.dataclass
class Kernel:
    # matmul, attention (cuDNN), fusion (XLA's elementwise/reduction kernels), conditional (a
    # branch: on a GPU the host waits for the device there), or the opcode
    kind: str
    # its operands' and results' bytes, times its launches (a sliced operand counts whole)
    bytes: int
    flops: int       # matmul FLOPs, times its launches
    launches: int    # 1, or a loop's trip count
    op_name: str     # the jax operation it came from
    result: str      # its result's HLO type


def kernels(hlo_text: str) -> list[Kernel]:
    """The kernels one run of a compiled XLA:GPU module launches (Compiled.as_text()), a loop's body
    counted its trip count of times, of a conditional's branches the one that moves most."""
    computations, entry = _computations(hlo_text)

    def walk(name: str, launches: int, table: list[Kernel]) -> None:
        instructions = computations[name]
        types = {result: hlo_type for result, hlo_type, *_ in instructions}
        for _, hlo_type, opcode, operands, attributes in instructions:
            if opcode in _FREE:
                continue
            if opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                walk(re.search(r"body=%([\w.\-]+)", attributes).group(1),
                     launches * int(trips.group(1) if trips else 1), table)
                continue
            if opcode == "call":
                walk(re.search(r"to_apply=%([\w.\-]+)", attributes).group(1), launches, table)
                continue
            # listed itself (on a GPU the host waits there), then one branch
            if opcode == "conditional":
                op_name = re.search(r'op_name="([^"]*)"', attributes)
                table.append(Kernel("conditional", 0, 0, launches,
                                    op_name.group(1) if op_name else "", hlo_type[:60]))
                branches = re.search(r"branch_computations=\{([^}]*)\}", attributes)
                names = re.findall(r"%([\w.\-]+)", branches.group(1) if branches else attributes)
                tables = [[] for _ in names]
                for called, branch in zip(names, tables, strict=False):
                    walk(called, launches, branch)
                table.extend(max(tables, key=lambda branch: sum(k.bytes for k in branch),
                                 default=[]))
                continue
            flops, kind = 0, opcode
            operand_types = [types.get(o, "") for o in operands]
            n_bytes = _bytes(hlo_type) + sum(map(_bytes, operand_types))
            if opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', attributes).group(1)
                kind = "attention" if "fmha" in target else target
                # a library matmul (Triton's are fusions)
                if "cublas" in target or "gemm" in target.lower():
                    # its outputs: the product, any epilogue's auxiliary output (GELU_AUX: the value
                    # before the activation), then a scratch workspace, which is not data
                    outputs = [f"{t}[{dims}]" for t, dims in _ARRAY.findall(hlo_type)]
                    if len(outputs) > 1 and outputs[-1].startswith("s8["):
                        outputs.pop()
                    kind = "matmul"
                    flops = _library_matmul_flops(outputs[0], operand_types[0], attributes)
                    n_bytes = sum(map(_bytes, outputs)) + sum(map(_bytes, operand_types))
            elif opcode == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", attributes).group(1)
                flops = _dot_flops(computations, called)
                kind = "matmul" if flops else "fusion"
                n_bytes = _fusion_bytes(computations, called, hlo_type, operand_types)
            op_name = re.search(r'op_name="([^"]*)"', attributes)
            table.append(Kernel(kind, n_bytes * launches, flops * launches, launches,
                                op_name.group(1) if op_name else "", hlo_type))

    table: list[Kernel] = []
    walk(entry, 1, table)
    return table


def summary(table: list[Kernel], card_name: str, top: int = 12) -> dict:
    """Bytes and FLOPs by kind of kernel, the time the memory-bound kernels (all but matmuls and
    attention) need at the card's bandwidth at least, and the `top` of them by bytes (where a step's
    memory-bound time goes)."""
    by_kind = collections.defaultdict(lambda: {"launches": 0, "bytes": 0, "flops": 0})
    for k in table:
        row = by_kind[k.kind]
        row["launches"] += k.launches
        row["bytes"] += k.bytes
        row["flops"] += k.flops
    memory_bound = [k for k in table if k.kind not in ("matmul", "attention")]
    memory_bound_bytes = sum(k.bytes for k in memory_bound)
    return {
        "by_kind": dict(sorted(by_kind.items())),
        "matmul_flops": sum(k.flops for k in table),
        "memory_bound_bytes": memory_bound_bytes,
        "memory_bound_ms_at_least": round(memory_bound_bytes / card(card_name).bandwidth * 1e3, 2),
        "heaviest": [{"bytes": k.bytes, "launches": k.launches, "result": k.result[:60],
                      "op": re.sub(r"^jit\([^)]*\)/", "", k.op_name)[:100]}
                     for k in sorted(memory_bound, key=lambda k: -k.bytes)[:top]],
    }


# ---- a train step compiled from shapes, and what XLA made of it ----

def compile_step(trainer):
    """The trainer's train step compiled ahead of time from shapes alone (no params are made)."""
    state = sharding.placed(trainer.abstract_state(), trainer.state_sharding)
    with sharding.on_mesh(trainer.mesh):
        return trainer.train_step.lower(state, memory.abstract_batch(trainer.cfg, trainer.mesh),
                                        *memory.frozen_params(trainer, True)).compile()


def analyze(trainer, card: str = "") -> dict:
    """The estimate beside XLA's memory and cost analysis of the compiled step (compiled ahead of
    time from shapes: no params are made). card: the step is compiled for that GPU
    (compiling_for), and its kernels' bytes and FLOPs are summed too."""
    mesh = trainer.mesh
    t = time.perf_counter()
    compiled = compile_step(trainer)
    compile_s = time.perf_counter() - t
    plan = memory.estimate(trainer)
    out = {"mesh": dict(mesh.shape), "compile_s": round(compile_s, 2),
           "estimate_bytes": plan.per_device}
    if (m := compiled.memory_analysis()) is not None:
        xla = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
               "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
               "code": m.generated_code_size_in_bytes}
        xla["total"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
        out["xla_bytes"] = xla
    if card:
        out["kernels"] = summary(kernels(compiled.as_text()), card)
    cost = compiled.cost_analysis()
    if cost and "flops" in cost:
        out["xla_flops_per_device"] = float(cost["flops"])
    return out
