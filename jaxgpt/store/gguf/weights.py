"""A GGUF's tensors <-> jaxgpt's params, both directions from one table per architecture.

GGUF stores a matrix as llama.cpp's [out, in] rows (ggml lists the dims the other way round), each
tensor in its own quantization type; the gguf package dequantizes every type it knows to fp32. For
the llama architecture llama.cpp's converter reorders the rows of q and k so that RoPE turns
adjacent pairs of a head's dims; jaxgpt turns the two halves (Hugging Face's layout), so reading
undoes that permutation and writing applies it. Qwen2 and GPT-2 are stored unpermuted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxgpt.config import ModelConfig
from jaxgpt.store.hf.config import ConvertError, require
from jaxgpt.store.hf.weights import biased, pack_layer, part_shapes, unpack_layer

# per architecture: GGUF tensor of block i (blk.{i}.NAME) -> the parts it holds along its rows
LLAMA_LAYER = {"attn_norm": ("norm_attn",), "attn_q": ("q",), "attn_k": ("k",),
               "attn_v": ("v",), "attn_output": ("o",), "ffn_norm": ("norm_mlp",),
               "ffn_gate": ("gate",), "ffn_up": ("up",), "ffn_down": ("down",)}
LAYERS = {"llama": LLAMA_LAYER, "qwen2": LLAMA_LAYER, "qwen3": LLAMA_LAYER,
          "gpt2": {"attn_norm": ("norm_attn",), "attn_qkv": ("q", "k", "v"),
                   "attn_output": ("o",), "ffn_norm": ("norm_mlp",), "ffn_up": ("up",),
                   "ffn_down": ("down",)}}
# Qwen3's QK-norm: one RMSNorm scale per head dim for q and for k, applied before RoPE
QK_NORMS = {"attn_q_norm": "attn/q_norm/scale", "attn_k_norm": "attn/k_norm/scale"}
TOP = {"wte": "token_embd.weight", "wpe": "position_embd.weight",
       "norm_out/scale": "output_norm.weight", "norm_out/bias": "output_norm.bias"}


def rope_pairs_to_halves(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a q or k projection's rows (per head: the two halves'
    rows interleaved, so that RoPE rotates pairs of adjacent dims)."""
    rows = w_OxI.shape[0]
    return (w_OxI.reshape(n_head, rows // n_head // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2)
            .reshape(w_OxI.shape))


def rope_halves_to_pairs(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    rows = w_OxI.shape[0]
    return (w_OxI.reshape(n_head, 2, rows // n_head // 2, *w_OxI.shape[1:]).swapaxes(1, 2)
            .reshape(w_OxI.shape))


class GGUFFile:
    """A GGUF's metadata (meta: key -> value) and its tensors, each dequantized to fp32 on
    demand and checked against the shape the metadata implies."""

    def __init__(self, path: Path):
        gguf = require("gguf")
        self.path, self._dequantize = path, gguf.quants.dequantize
        try:
            reader = gguf.GGUFReader(path)
            self.meta = {key: field.contents() for key, field in reader.fields.items()}
        except Exception as e:  # noqa: BLE001 - a file cut short, or not GGUF at all
            raise ConvertError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
        self.tensors = {t.name: t for t in reader.tensors}
        self.taken: set[str] = set()

    def types(self) -> dict[str, str]:
        """Each tensor's quantization type (Q4_1, F32, ...)."""
        return {name: t.tensor_type.name for name, t in self.tensors.items()}

    def rows(self, name: str) -> int | None:
        t = self.tensors.get(name)
        return None if t is None else int(t.shape[-1])

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise ConvertError(f"{self.path}: tensor {name} is missing")
        t = self.tensors[name]
        numpy_shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims innermost first
        if numpy_shape != tuple(shape):
            raise ConvertError(f"{self.path}: tensor {name} is {numpy_shape}, the metadata "
                               f"implies {tuple(shape)}")
        try:
            x = self._dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise ConvertError(f"{self.path}: tensor {name} is {t.tensor_type.name}, a type the "
                               f"gguf package cannot dequantize") from None
        self.taken.add(name)
        return np.asarray(x, np.float32).reshape(numpy_shape)

    def check_all_taken(self, arch: str) -> None:
        """A tensor nothing read is a feature jaxgpt does not model: refuse rather than drop it."""
        for name in sorted(set(self.tensors) - self.taken):
            raise ConvertError(f"{self.path}: tensor {name} has no place in jaxgpt's {arch}")


def params_from_gguf(f: GGUFFile, arch: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """The flat jaxgpt params of a GGUF (fp32; vocab_size rows, the model's own)."""
    D, V, shapes, table = m.d_model, m.vocab_size, part_shapes(m), LAYERS[arch]
    top = {"wte": (V, D), "norm_out/scale": (D,)}
    if arch == "gpt2":
        top.update({"wpe": (m.seq_len, D), "norm_out/bias": (D,)})
    flat = {ours: f(TOP[ours], shape) for ours, shape in top.items()}
    for i in range(m.n_layer):
        parts = {}
        for name, held in table.items():
            t = f"blk.{i}.{name}"
            if held[0].startswith("norm"):
                parts[held[0]] = f(t + ".weight", (D,))
                if m.bias and m.norm == "layernorm":
                    parts[held[0] + ".b"] = f(t + ".bias", (D,))
                continue
            sizes = [shapes[part][1] for part in held]
            w_OxI = f(t + ".weight", (sum(sizes), shapes[held[0]][0]))
            b_O = f(t + ".bias", (sum(sizes),)) if held[0] in biased(m) else None
            if arch == "llama" and held[0] in ("q", "k"):
                heads = m.n_head if held[0] == "q" else m.n_kv_head
                w_OxI = rope_pairs_to_halves(w_OxI, heads)
                b_O = None if b_O is None else rope_pairs_to_halves(b_O, heads)
            splits = np.cumsum(sizes)[:-1]
            parts.update(zip(held, np.split(w_OxI.T, splits, axis=1), strict=True))
            if b_O is not None:
                parts.update(zip([p + ".b" for p in held], np.split(b_O, splits), strict=True))
        flat.update(pack_layer(parts, f"block_{i}/", m))
        if m.qk_norm:
            flat.update({f"block_{i}/{ours}": f(f"blk.{i}.{theirs}.weight", (m.head_dim,))
                         for theirs, ours in QK_NORMS.items()})
    if not m.tie_embeddings:
        flat["lm_head"] = f("output.weight", (V, D)).T  # GGUF's head is [V, D], jaxgpt's [D, V]
    return flat


def params_to_gguf(flat: dict[str, np.ndarray], arch: str, m: ModelConfig
                   ) -> dict[str, np.ndarray]:
    """params_from_gguf's inverse: GGUF tensor name -> fp32 array in GGUF's [out, in] layout."""
    out = {TOP[ours]: flat[ours] for ours in TOP if ours in flat}
    for i in range(m.n_layer):
        parts = unpack_layer(flat, f"block_{i}/", m)
        for name, held in LAYERS[arch].items():
            t = f"blk.{i}.{name}"
            w = np.concatenate([parts[part] for part in held], axis=-1)
            b = (np.concatenate([parts[part + ".b"] for part in held])
                 if held[0] + ".b" in parts else None)
            w = w.T if w.ndim == 2 else w
            if arch == "llama" and held[0] in ("q", "k"):
                heads = m.n_head if held[0] == "q" else m.n_kv_head
                w = rope_halves_to_pairs(w, heads)
                b = None if b is None else rope_halves_to_pairs(b, heads)
            out[t + ".weight"] = w
            if b is not None:
                out[t + ".bias"] = b
        if m.qk_norm:
            out.update({f"blk.{i}.{theirs}.weight": flat[f"block_{i}/{ours}"]
                        for theirs, ours in QK_NORMS.items()})
    if not m.tie_embeddings:
        out["output.weight"] = flat["lm_head"].T
    return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}
