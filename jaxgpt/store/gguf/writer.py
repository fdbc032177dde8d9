"""A GGUF file written with the gguf package's writer: the model's metadata as llama.cpp reads it
for its architecture, the tokenizer's keys, and the tensors in one of four types.

Matrices take the chosen type; 1-D tensors (norms, biases) stay f32 as llama.cpp keeps them, and
q8_0 (blocks of 32 along a row) falls back to f16 for a matrix whose rows are not a multiple of 32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.store.hf.config import require

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def model_metadata(arch: str, m: ModelConfig, vocab_size: int) -> dict[str, object]:
    """The "{arch}.*" keys of a jaxgpt model (vocab_size: the rows written)."""
    keys = {"context_length": m.seq_len, "embedding_length": m.d_model,
            "block_count": m.n_layer, "feed_forward_length": m.d_ff,
            "attention.head_count": m.n_head}
    if arch == "gpt2":
        keys["attention.layer_norm_epsilon"] = float(m.norm_eps)
    else:
        keys.update({"attention.head_count_kv": m.n_kv_head, "rope.freq_base": float(m.rope_theta),
                     "rope.dimension_count": m.head_dim,
                     "attention.layer_norm_rms_epsilon": float(m.norm_eps),
                     "vocab_size": vocab_size})
        if m.rope_scaling == "linear":
            keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": m.rope_factor})
        if m.rope_scaling == "llama3":
            keys["rope.scaling.original_context_length"] = m.rope_original_context
    return {f"{arch}.{k}": v for k, v in keys.items()}


def _typed(gguf, x: np.ndarray, dtype: str) -> tuple[np.ndarray, object]:
    """(data, raw type) of a tensor in `dtype` (1-D ones stay f32)."""
    Q = gguf.GGMLQuantizationType
    if x.ndim == 1 or dtype == "f32":
        return x.astype(np.float32), None
    if dtype == "q8_0" and x.shape[-1] % 32 == 0:
        return gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(x, Q.BF16), Q.BF16
    return x.astype(np.float16), None


def add_value(writer, key: str, value) -> None:
    """One metadata key by the type of its value."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: no GGUF type for {type(value).__name__}")


def write_gguf(out: Path, arch: str, metadata: dict, tensors: dict[str, np.ndarray], dtype: str,
               add_tokenizer) -> None:
    """The file at `out`, written beside it first and then moved into place (an existing file is
    replaced whole or not at all); add_tokenizer(writer) writes the tokenizer's keys."""
    gguf = require("gguf")
    part = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(part, arch)
    try:
        for key, value in metadata.items():
            add_value(writer, key, value)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]).value)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer)
        for name, x in tensors.items():
            data, raw = _typed(gguf, x, dtype)
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    part.replace(out)
