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
from jaxgpt.model import quant
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


KEPT = ("Q8_0", "Q4_0", "Q4_1")  # the block types quant.py's layouts hold as they are


def kept_blocks(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Raw GGUF blocks ([rows, bytes]) of 32 values with an fp16 scale d (Q4_1: and min m):
    Q8_0 w = d q (q int8); Q4_0 w = d (q - 8) and Q4_1 w = d q + m (q 0..15, q[j] in byte j's low
    nibble, q[j + 16] in its high one). Q4_0's XOR 0x88 makes each nibble the signed q - 8;
    Q4_1's stay unsigned beside their min."""
    rows, cols = shape
    head = 4 if kind == "Q4_1" else 2
    blocks = raw.reshape(rows, cols // 32, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        return {"q": blocks[..., 2:].copy().view(np.int8).reshape(rows, cols), "scale": d}
    nibbles = blocks[..., head:] ^ (0x88 if kind == "Q4_0" else 0)
    out = {"q4": nibbles.view(np.int8).reshape(rows, cols // 2), "scale": d}
    if kind == "Q4_1":
        out["min"] = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return out


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

    def blocks(self, name: str, shape: tuple[int, int]) -> dict[str, np.ndarray] | None:
        """A Q8_0 / Q4_0 / Q4_1 matrix's blocks as they are, in quant.py's rows layout ([out, in]
        rows, a group of 32 along each): {"q" | "q4", "scale", "min"}; None for other types."""
        t = self.tensors.get(name)
        kind = None if t is None else t.tensor_type.name
        if kind not in KEPT or tuple(int(n) for n in reversed(t.shape)) != tuple(shape):
            return None
        self.taken.add(name)
        return kept_blocks(np.asarray(t.data), kind, shape)

    def check_all_taken(self, arch: str) -> None:
        """A tensor nothing read is a feature jaxgpt does not model: refuse rather than drop it."""
        for name in sorted(set(self.tensors) - self.taken):
            raise ConvertError(f"{self.path}: tensor {name} has no place in jaxgpt's {arch}")


def params_from_gguf(f: GGUFFile, arch: str, m: ModelConfig,
                     keep: bool = False) -> dict[str, np.ndarray]:
    """The flat jaxgpt params of a GGUF (vocab_size rows, the model's own): fp32, or with `keep`
    the KEPT blocks as quant.py's layouts (each Dense's w_q / w_q4 / w_scale / w_min, the
    embedding's rows as wte_*)."""
    D, V, shapes, table = m.d_model, m.vocab_size, part_shapes(m), LAYERS[arch]
    top = {"norm_out/scale": (D,)}
    if arch == "gpt2":
        top.update({"wpe": (m.seq_len, D), "norm_out/bias": (D,)})
    flat = {ours: f(TOP[ours], shape) for ours, shape in top.items()}
    wte = keep and f.blocks(TOP["wte"], (V, D))
    flat.update({f"wte_{k}": v for k, v in wte.items()} if wte else {"wte": f(TOP["wte"], (V, D))})
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
            shape = (sum(sizes), shapes[held[0]][0])
            w_OxI = (keep and f.blocks(t + ".weight", shape)) or f(t + ".weight", shape)
            b_O = f(t + ".bias", (sum(sizes),)) if held[0] in biased(m) else None
            if arch == "llama" and held[0] in ("q", "k"):
                heads = m.n_head if held[0] == "q" else m.n_kv_head
                w_OxI = _each(lambda x, h=heads: rope_pairs_to_halves(x, h), w_OxI)
                b_O = None if b_O is None else rope_pairs_to_halves(b_O, heads)
            splits = np.cumsum(sizes)[:-1]
            parts.update(zip(held, _split(w_OxI, splits), strict=True))
            if b_O is not None:
                parts.update(zip([p + ".b" for p in held], np.split(b_O, splits), strict=True))
        flat.update(_pack_kept(parts, f"block_{i}/", m))
        if m.qk_norm:
            flat.update({f"block_{i}/{ours}": f(f"blk.{i}.{theirs}.weight", (m.head_dim,))
                         for theirs, ours in QK_NORMS.items()})
    if not m.tie_embeddings:  # GGUF's head is [V, D], jaxgpt's [D, V]
        head = keep and f.blocks("output.weight", (V, D))
        flat.update({f"lm_head_{k}": v.T for k, v in head.items()} if head
                    else {"lm_head": f("output.weight", (V, D)).T})
    return flat


def _each(fn, w):
    return {k: fn(v) for k, v in w.items()} if isinstance(w, dict) else fn(w)


def _split(w_OxI, splits) -> list:
    """The parts of an [out, in] matrix (or of each leaf of its kept blocks) along its rows, each
    transposed to jaxgpt's [in, out]."""
    if not isinstance(w_OxI, dict):
        return np.split(w_OxI.T, splits, axis=1)
    pieces = {k: np.split(v.T, splits, axis=1) for k, v in w_OxI.items()}
    return [{k: v[i] for k, v in pieces.items()} for i in range(len(splits) + 1)]


def _pack_kept(parts: dict, b: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """pack_layer of parts some of which are kept blocks: a Dense whose parts all are, in one
    layout, keeps them (joined along its outputs); else it takes their fp32 values."""
    dense = {"attn/wq": ("q",), "attn/wkv": ("k", "v"), "attn/wo": ("o",),
             "mlp/w_up": ("gate", "up") if m.mlp == "swiglu" else ("up",), "mlp/w_down": ("down",)}
    kept, floats = {}, dict(parts)
    for name, held in dense.items():
        pieces = [parts[p] for p in held]
        if not any(isinstance(x, dict) for x in pieces):
            continue
        layouts = {(tuple(sorted(x)), x["scale"].shape[0]) if isinstance(x, dict) else None
                   for x in pieces}
        if len(layouts) == 1:
            kept[name] = {k: np.concatenate([x[k] for x in pieces], axis=1) for k in pieces[0]}
        for p, x in zip(held, pieces, strict=True):  # a placeholder where kept
            if isinstance(x, dict):
                floats[p] = (np.zeros((_rows(x), x["scale"].shape[1]), np.float32)
                             if len(layouts) == 1 else np.asarray(quant.dequantized(x)))
    out = pack_layer(floats, b, m)
    for name, w in kept.items():
        del out[f"{b}{name}/w"]
        out.update({f"{b}{name}/w_{k}": v for k, v in w.items()})
    return out


def _rows(w: dict) -> int:
    """K of a kept [K, N] matrix."""
    return w["q"].shape[0] if "q" in w else 2 * w["q4"].shape[0]


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


def pad_kept_vocab(flat: dict[str, np.ndarray], V: int) -> dict[str, np.ndarray]:
    """pad_vocab for a kept embedding (and head): the new rows (columns) are the mean of the
    existing ones, quantized in their layout with quant.quantize's absmax per group."""
    out = dict(flat)
    for name, rows in (("wte", True), ("lm_head", False)):
        w = quant.stored(flat, name)
        if w is None:
            continue
        x = np.asarray(quant.dequantized(w, rows=rows))
        mean_Kx1 = x.mean(0 if rows else 1).reshape(-1, 1)
        n = (x.shape[0] if rows else x.shape[1])
        G = w["scale"].shape[1 if rows else 0]
        qtype = "int4" if "q4" in w else "int8"
        q, scale = quant.quantize(mean_Kx1, qtype, mean_Kx1.shape[0] // G)
        if "min" in w:  # unsigned nibbles: d (q + 8) - 8 d
            q = q.astype(np.int8) + 8
        new = quant.pack_int4(q, scale) if qtype == "int4" else {"q": q, "scale": scale}
        if "min" in w:
            new["min"] = -8 * np.asarray(scale)
        for key, v in new.items():  # [K', 1] columns, repeated for V - n ids
            v = np.repeat(np.asarray(v), V - n, axis=1)
            out[f"{name}_{key}"] = np.concatenate([w[key], v.T if rows else v], 0 if rows else 1)
    return out
