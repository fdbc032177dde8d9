"""Which kernels run the model on this host: every host-dependent `auto` of ModelConfig (the
kernels' implementation, the matmul dtype) resolved once, into the
`Kernels` that GPT holds and hands to its layers; the layers never resolve anything."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxgpt import hardware
from jaxgpt.config import ModelConfig
from jaxgpt.errors import ConfigError

HALF_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN flash attention computes in


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The model's resolved choices on one host: plain strings, so a Flax module may hold them."""
    impl: str          # "cpu" | "xla" | "cudnn": the attention, norm, matmul and head-loss kernels
    matmul_dtype: str  # what the matmuls multiply in
    platform: str      # "cpu" | "gpu" | "tpu": where the program runs (or is compiled for)


def choose(cfg: ModelConfig) -> Kernels:
    """cfg's kernels on this host, or on the platform being compiled for (hardware.target_platform).
    An explicit cudnn where it cannot run is a ConfigError here, not a crash inside XLA."""
    return Kernels(impl=resolve(cfg.kernels, cfg.dtype),
                   matmul_dtype=matmul_dtype(cfg), platform=hardware.compute_platform())


def resolve(choice: str, dtype) -> str:
    """The implementation `model.kernels` names: auto is cpu on CPU, cudnn on a GPU in bf16/fp16,
    else xla."""
    if choice not in ("auto", "cpu", "xla", "cudnn"):
        raise ConfigError(f"model.kernels={choice!r}: expected one of auto, xla, cudnn, cpu")
    backend = hardware.compute_platform()
    cudnn_ok = backend == "gpu" and jnp.dtype(dtype) in HALF_DTYPES
    if choice == "auto":
        return "cpu" if backend == "cpu" else "cudnn" if cudnn_ok else "xla"
    if choice == "cudnn" and not cudnn_ok:
        raise ConfigError(f"model.kernels=cudnn needs a GPU and model.dtype=bfloat16 (here: "
                          f"{backend}, {jnp.dtype(dtype).name}); use model.kernels=auto or xla")
    return choice


def matmul_dtype(cfg: ModelConfig) -> str:
    """What the matmuls multiply in (model.matmul_dtype; auto: the compute dtype)."""
    return cfg.dtype if cfg.matmul_dtype == "auto" else cfg.matmul_dtype
