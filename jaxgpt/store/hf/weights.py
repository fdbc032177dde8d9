"""jaxgpt's params <-> Hugging Face's safetensors tensors, both directions from one table.

Params are handled flat, by jaxgpt path ("block_0/attn/wq/w"). A block is mapped through its
"parts": each projection as an [in, out] matrix (q, k, v, o; gate and up, down) and its bias
("q.b"), each norm's scale (and bias). One table per architecture (LAYERS) says which HF tensor
holds which parts, joined along the output axis, and serves both directions.
"""
from __future__ import annotations

from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16: safetensors' numpy reader returns bf16 tensors
import numpy as np

from jaxgpt import files
from jaxgpt.config import ModelConfig
from jaxgpt.store.hf.config import GPT2, LLAMA, QWEN2, ConvertError, require

# tensors that are buffers, not weights (old GPT-2 uploads' causal masks, old Llama's RoPE table)
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# per architecture: (name prefix of layer i, weights stored [out, in] (torch Linear) rather than
# [in, out] (GPT-2's Conv1D), HF tensor -> the parts it holds)
LAYERS = {
    GPT2: ("transformer.h.{i}.", False, {
        "ln_1": ("norm_attn",), "attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",),
        "ln_2": ("norm_mlp",), "mlp.c_fc": ("up",), "mlp.c_proj": ("down",)}),
    LLAMA: ("model.layers.{i}.", True, {
        "input_layernorm": ("norm_attn",), "self_attn.q_proj": ("q",), "self_attn.k_proj": ("k",),
        "self_attn.v_proj": ("v",), "self_attn.o_proj": ("o",),
        "post_attention_layernorm": ("norm_mlp",),
        "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",), "mlp.down_proj": ("down",)}),
}
LAYERS[QWEN2] = LAYERS[LLAMA]  # the same tensors, with q, k and v's biases
TOP = {GPT2: {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight",
              "norm_out/scale": "transformer.ln_f.weight",
              "norm_out/bias": "transformer.ln_f.bias"},
       LLAMA: {"wte": "model.embed_tokens.weight", "norm_out/scale": "model.norm.weight"}}
TOP[QWEN2] = TOP[LLAMA]


class Weights:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json names,
    each read on demand (safetensors, numpy) as fp32 and checked against its expected shape."""

    def __init__(self, directory: Path):
        safe_open = require("safetensors").safe_open
        index = directory / "model.safetensors.index.json"
        self.where = directory / "model.safetensors"
        if index.is_file():
            weight_map, self.where = files.read_json(index).get("weight_map"), index
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: no weight_map")
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif self.where.is_file():
            try:
                with safe_open(self.where, framework="np") as f:
                    self.files = dict.fromkeys(f.keys(), self.where)
            except Exception as e:  # noqa: BLE001 - a file cut short or not safetensors at all
                raise ConvertError(f"{self.where}: not a readable safetensors file "
                                   f"({type(e).__name__}: {e})") from None
        else:
            raise ConvertError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                               f"(a pytorch_model.bin is not read: save_pretrained writes "
                               f"safetensors)")
        self._open, self._handles, self.taken = safe_open, {}, set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        short = name.removeprefix("transformer.")
        if name not in self.files and short in self.files:  # older GPT-2 uploads
            name = short
        if name not in self.files:
            raise ConvertError(f"{self.where}: tensor {name} is missing")
        path = self.files[name]
        try:
            if path not in self._handles:
                self._handles[path] = self._open(path, framework="np")
            x = self._handles[path].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a missing shard, or a tensor it lacks
            raise ConvertError(f"{path}: cannot read tensor {name} ({type(e).__name__}: {e})") \
                from None
        if tuple(x.shape) != tuple(shape):
            raise ConvertError(f"{path}: tensor {name} is {tuple(x.shape)}, "
                               f"config.json implies {tuple(shape)}")
        self.taken.add(name)
        return x.astype(np.float32)

    def check_all_taken(self, arch: str, ignore: tuple[str, ...]) -> None:
        """A tensor nothing read is a feature jaxgpt does not model: refuse rather than drop it."""
        for name in sorted(set(self.files) - self.taken):
            if not name.endswith(BUFFERS) and name not in ignore:
                raise ConvertError(f"{self.files[name]}: tensor {name} has no place in "
                                   f"jaxgpt's {arch}")


def biased(m: ModelConfig) -> set[str]:
    """The parts that have a bias: all with model.bias, q, k and v with model.qkv_bias."""
    if m.bias:
        return {"q", "k", "v", "o", "gate", "up", "down"}
    return {"q", "k", "v"} if m.qkv_bias else set()


def part_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    D, H, K, E, F = m.d_model, m.n_head, m.n_kv_head, m.head_dim, m.d_ff
    return {"q": (D, H * E), "k": (D, K * E), "v": (D, K * E), "o": (H * E, D), "gate": (D, F),
            "up": (D, F), "down": (F, D)}


def unpack_layer(p: dict[str, np.ndarray], b: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """Block `b`'s params as parts."""
    D, (K, E) = m.d_model, (m.n_kv_head, m.head_dim)
    kv_Dx2xKE, up = p[b + "attn/wkv/w"].reshape(D, 2, K * E), p[b + "mlp/w_up/w"]
    parts = {"norm_attn": p[b + "norm_attn/scale"], "norm_mlp": p[b + "norm_mlp/scale"],
             "q": p[b + "attn/wq/w"].reshape(D, -1), "k": kv_Dx2xKE[:, 0], "v": kv_Dx2xKE[:, 1],
             "o": p[b + "attn/wo/w"].reshape(-1, D), "down": p[b + "mlp/w_down/w"],
             # swiglu's w_up is [D, 2, F]: index 0 the gate (through silu), 1 the up projection
             **({"gate": up[:, 0], "up": up[:, 1]} if m.mlp == "swiglu" else {"up": up})}
    if "q" in biased(m):
        kv_2xKE = p[b + "attn/wkv/b"].reshape(2, -1)
        parts.update({"q.b": p[b + "attn/wq/b"].reshape(-1), "k.b": kv_2xKE[0],
                      "v.b": kv_2xKE[1]})
    if "o" in biased(m):
        up_b = p[b + "mlp/w_up/b"]
        parts.update({"o.b": p[b + "attn/wo/b"], "down.b": p[b + "mlp/w_down/b"],
                      **({"gate.b": up_b[0], "up.b": up_b[1]} if m.mlp == "swiglu"
                         else {"up.b": up_b})})
    if m.bias and m.norm == "layernorm":
        parts.update({"norm_attn.b": p[b + "norm_attn/bias"],
                      "norm_mlp.b": p[b + "norm_mlp/bias"]})
    return parts


def pack_layer(parts: dict[str, np.ndarray], b: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """unpack's inverse: parts as block `b`'s params."""
    D, H, K, E = m.d_model, m.n_head, m.n_kv_head, m.head_dim
    glu = m.mlp == "swiglu"
    p = {b + "norm_attn/scale": parts["norm_attn"], b + "norm_mlp/scale": parts["norm_mlp"],
         b + "attn/wq/w": parts["q"].reshape(D, H, E), b + "attn/wo/w": parts["o"].reshape(H, E, D),
         b + "attn/wkv/w": np.stack([parts["k"], parts["v"]], 1).reshape(D, 2, K, E),
         b + "mlp/w_up/w": np.stack([parts["gate"], parts["up"]], 1) if glu else parts["up"],
         b + "mlp/w_down/w": parts["down"]}
    if "q" in biased(m):
        p.update({b + "attn/wq/b": parts["q.b"].reshape(H, E),
                  b + "attn/wkv/b": np.stack([parts["k.b"], parts["v.b"]]).reshape(2, K, E)})
    if "o" in biased(m):
        up_b = np.stack([parts["gate.b"], parts["up.b"]]) if glu else parts["up.b"]
        p.update({b + "attn/wo/b": parts["o.b"], b + "mlp/w_down/b": parts["down.b"],
                  b + "mlp/w_up/b": up_b})
    if m.bias and m.norm == "layernorm":
        p.update({b + "norm_attn/bias": parts["norm_attn.b"],
                  b + "norm_mlp/bias": parts["norm_mlp.b"]})
    return p


def params_from_hf(w: Weights, arch: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """The flat jaxgpt params of a HF checkpoint (vocab_size rows: the model's own)."""
    D, V, shapes = m.d_model, m.vocab_size, part_shapes(m)
    top_shapes = {"wte": (V, D), "wpe": (m.seq_len, D), "norm_out/scale": (D,),
                  "norm_out/bias": (D,)}
    flat = {ours: w(theirs, top_shapes[ours]) for ours, theirs in TOP[arch].items()}
    prefix, out_in, table = LAYERS[arch]
    for i in range(m.n_layer):
        parts = {}
        for name, held in table.items():
            h = prefix.format(i=i) + name
            if held[0].startswith("norm"):
                parts[held[0]] = w(h + ".weight", (D,))
                if m.bias and m.norm == "layernorm":
                    parts[held[0] + ".b"] = w(h + ".bias", (D,))
                continue
            fan_in, sizes = shapes[held[0]][0], [shapes[part][1] for part in held]
            splits = np.cumsum(sizes)[:-1]
            if out_in:
                w_INxOUT = w(h + ".weight", (sum(sizes), fan_in)).T
            else:
                w_INxOUT = w(h + ".weight", (fan_in, sum(sizes)))
            parts.update(zip(held, np.split(w_INxOUT, splits, axis=1), strict=False))
            if held[0] in biased(m):
                biases = np.split(w(h + ".bias", (sum(sizes),)), splits)
                parts.update(zip([part + ".b" for part in held], biases, strict=False))
        flat.update(pack_layer(parts, f"block_{i}/", m))
    if not m.tie_embeddings:
        flat["lm_head"] = w("lm_head.weight", (V, D)).T  # HF's head is [V, D], jaxgpt's [D, V]
    return flat


def params_to_hf(flat: dict[str, np.ndarray], arch: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """params_from_hf's inverse: HF tensor name -> array."""
    out = {theirs: flat[ours] for ours, theirs in TOP[arch].items()}
    prefix, out_in, table = LAYERS[arch]
    for i in range(m.n_layer):
        parts = unpack_layer(flat, f"block_{i}/", m)
        for name, held in table.items():
            h = prefix.format(i=i) + name
            w_INxOUT = np.concatenate([parts[part] for part in held], axis=-1)
            out[h + ".weight"] = w_INxOUT.T if out_in and w_INxOUT.ndim == 2 else w_INxOUT
            if held[0] + ".b" in parts:
                out[h + ".bias"] = np.concatenate([parts[part + ".b"] for part in held])
    if not m.tie_embeddings:
        out["lm_head.weight"] = flat["lm_head"].T
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A params tree as {"block_0/attn/wq/w": array, ...}."""
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}/") if isinstance(value, dict)
                   else {prefix + key: value})
    return out


def nest(flat: dict[str, np.ndarray]) -> dict:
    """flatten's inverse."""
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def pad_vocab(flat: dict[str, np.ndarray], V: int) -> dict[str, np.ndarray]:
    """wte (and lm_head) grown to V ids with the mean of the existing rows (columns): a new id's
    logit is the mean logit, so it is never the argmax before training."""
    out = dict(flat)
    n = flat["wte"].shape[0]
    mean = np.repeat(flat["wte"].mean(0, keepdims=True), V - n, 0)
    out["wte"] = np.concatenate([flat["wte"], mean])
    if "lm_head" in flat:
        mean = np.repeat(flat["lm_head"].mean(1, keepdims=True), V - n, 1)
        out["lm_head"] = np.concatenate([flat["lm_head"], mean], 1)
    return out


def without_padding(flat: dict[str, np.ndarray], converted: dict
                    ) -> tuple[dict[str, np.ndarray], int]:
    """(params, vocabulary rows) as the source model had them: an export a conversion wrote
    (converted.json) holds the padding rows pad_vocab added, untrained, and they go, so the tensors
    come back as they were; a model trained since (no converted.json) keeps every row."""
    V = converted.get("hf_vocab_size", converted.get("source_vocab_size", len(flat["wte"])))
    out = {**flat, "wte": flat["wte"][:V]}
    if "lm_head" in flat:
        out["lm_head"] = flat["lm_head"][:, :V]
    return out, V


def write_safetensors(tensors: dict[str, np.ndarray], out: Path, max_shard_mb: float) -> list[str]:
    """model.safetensors, or shards + model.safetensors.index.json past max_shard_mb; the file
    names."""
    save_file = require("safetensors.numpy").save_file
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    shards, size = [[]], 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_mb * 2**20:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += x.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards, strict=False):
        save_file({name: tensors[name] for name in shard}, out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        files.write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
            "weight_map": {name: file for file, shard in zip(names, shards, strict=False)
                           for name in shard}})
    return names
