"""GGUF metadata <-> jaxgpt's ModelConfig: the architectures read and written (llama, qwen2, qwen3
and gpt2, as llama.cpp names them), and what of a GGUF jaxgpt cannot express, refused by its key.

Keys are "{arch}.name" (llama.embedding_length, ...). RoPE scaling comes as metadata (linear) or,
in Llama 3.1's files, as a rope_freqs tensor of per-frequency divisors: weights.py reads that one
back into the llama3 rope fields.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.store.hf.config import ConvertError

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")  # qwen3: a llama with QK-norm
# keys whose presence means a model jaxgpt has no place for (their value names what it is)
REFUSED = {"expert_count": "a mixture of experts", "attention.sliding_window": "sliding-window "
           "attention", "attn_logit_softcapping": "attention logit soft-capping",
           "final_logit_softcapping": "final logit soft-capping",
           "attention.q_lora_rank": "low-rank attention", "ssm.state_size": "a state-space layer"}


def architecture(meta: dict, where: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{where}: general.architecture={arch!r}: jaxgpt converts "
                           f"{', '.join(ARCHITECTURES)}")
    return arch


def f32(value) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-05, not
    9.999999747378752e-06), so a written config reads back equal."""
    return float(str(np.float32(value)))


def _get(meta: dict, key: str, where: Path):
    if meta.get(key) is None:
        raise ConvertError(f"{where}: {key} is missing")
    return meta[key]


def model_config(meta: dict, where: Path, vocab_size: int, tied: bool,
                 seq_len: int = 0) -> ModelConfig:
    """jaxgpt's ModelConfig of a GGUF's metadata (vocab_size and whether the head is tied come
    from its tensors)."""
    arch = architecture(meta, where)
    get = lambda key: _get(meta, f"{arch}.{key}", where)  # noqa: E731
    for key, what in REFUSED.items():
        if meta.get(f"{arch}.{key}") not in (None, 0, 0.0):
            raise ConvertError(f"{where}: {arch}.{key}={meta[f'{arch}.{key}']}: {what}, which "
                               f"jaxgpt does not model")
    D, H, N = get("embedding_length"), get("attention.head_count"), get("block_count")
    context = get("context_length")
    common = dict(vocab_size=vocab_size, n_layer=N, n_head=H, d_model=D,
                  d_ff=get("feed_forward_length"), tie_embeddings=tied)
    if arch == "gpt2":
        if seq_len not in (0, context):
            raise ConvertError(f"from_gguf.seq_len={seq_len}: learned positions fix it at "
                               f"{arch}.context_length={context}")
        return ModelConfig(preset="gpt2", seq_len=context, norm="layernorm", mlp="gelu",
                           position="learned", bias=True, **common,
                           norm_eps=f32(get("attention.layer_norm_epsilon")))
    if D % H:
        raise ConvertError(f"{where}: {arch}.embedding_length={D} is not a multiple of "
                           f"{arch}.attention.head_count={H}")
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"{arch}.{key}", D // H) != D // H:
            raise ConvertError(f"{where}: {arch}.{key}={meta[f'{arch}.{key}']}: jaxgpt's heads "
                               f"are embedding_length / head_count = {D // H} wide, all rotated")
    return ModelConfig(
        preset="llama", n_kv_head=meta.get(f"{arch}.attention.head_count_kv") or H,
        seq_len=seq_len or context, norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", **common, **_rope(meta, arch, where),
        norm_eps=f32(get("attention.layer_norm_rms_epsilon")))


def _rope(meta: dict, arch: str, where: Path) -> dict:
    out = {"rope_theta": f32(meta.get(f"{arch}.rope.freq_base", 10000.0))}
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return out
    if kind != "linear":
        raise ConvertError(f"{where}: {arch}.rope.scaling.type={kind!r}: jaxgpt scales RoPE as "
                           f"linear or llama3")
    factor = f32(_get(meta, f"{arch}.rope.scaling.factor", where))
    return {**out, "rope_scaling": "linear", "rope_factor": factor}


def _turns(m: ModelConfig, original: int) -> np.ndarray:
    """Turns of each RoPE frequency over `original` positions (fp64)."""
    E = m.head_dim
    inv_freq = m.rope_theta ** -(np.arange(0, E, 2, dtype=np.float64) / E)
    return original * inv_freq / (2 * np.pi)


def llama3_divisors(m: ModelConfig) -> np.ndarray:
    """Llama 3.1's RoPE scaling as llama.cpp holds it: each frequency's divisor (rope_freqs)."""
    kept = np.clip((_turns(m, m.rope_original_context) - m.rope_low_freq_factor)
                   / (m.rope_high_freq_factor - m.rope_low_freq_factor), 0, 1)
    return 1 / ((1 - kept) / m.rope_factor + kept)


def llama3_rope(divisors, m: ModelConfig, meta: dict, where: Path) -> dict:
    """The llama3 rope fields that give a rope_freqs tensor's per-frequency divisors (llama.cpp's
    form of Llama 3.1's scaling): the factor is the largest divisor, low and high frequency factors
    fitted on the blended frequencies, and the whole table checked against them."""
    arch = meta.get("general.architecture")
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    d = np.asarray(divisors, np.float64)
    factor = float(d.max())
    turns = _turns(m, original)
    blended = (d > 1 + 1e-6) & (d < factor - 1e-6)
    low, high = 1.0, 4.0  # Llama 3.1's, when too few frequencies are blended to fit them
    if factor > 1 and blended.sum() >= 2:
        kept = (1 / d[blended] - 1 / factor) / (1 - 1 / factor)  # the blend's weight
        slope, intercept = np.polyfit(turns[blended], kept, 1)
        low, high = -intercept / slope, (1 - intercept) / slope
    fields = dict(rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=float(low),
                  rope_high_freq_factor=float(high), rope_original_context=original)
    if not np.allclose(llama3_divisors(dataclasses.replace(m, **fields)), d, rtol=1e-4):
        raise ConvertError(f"{where}: rope_freqs.weight is not Llama 3.1's scaling of RoPE, the "
                           f"one scaling jaxgpt reads from this tensor")
    return fields
