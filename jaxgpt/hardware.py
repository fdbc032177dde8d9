"""Peak FLOP/s of the accelerator, for model FLOPs utilisation (MFU).

Accelerators: dense bf16 peaks from the vendors' data sheets. CPUs have no such number that
holds for a given machine, so we measure the fp32 matmul rate of this one.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# device_kind substring -> dense bf16 FLOP/s per chip (vendor data sheets)
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,   # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """fp32 FLOP/s of an n x n matmul on the default device, best of `repeats`."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(device=None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from)."""
    device = device or jax.devices()[0]
    for name, flops in PEAK_BF16.items():
        if name.lower() in device.device_kind.lower():
            return flops, f"datasheet bf16 {name}"
    if device.platform == "cpu":
        return measured_matmul_flops() / len(jax.devices()), "measured fp32 matmul"
    return float("nan"), f"unknown device {device.device_kind}"
