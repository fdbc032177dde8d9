"""Hugging Face <-> jaxgpt: safetensors checkpoints in, and out again.

    python -m jaxgpt.convert from-hf DIR_OR_HUB_NAME OUT [from_hf.tokenizer=SPEC from_hf.seq_len=N]
    python -m jaxgpt.convert to-hf RUN_OR_EXPORT DIR [to_hf.dtype=bfloat16 to_hf.max_shard_mb=N]

from-hf reads config.json and model.safetensors (or the shards of model.safetensors.index.json) of
a GPT2LMHeadModel, LlamaForCausalLM (its RoPE plain, linear or scaled as Llama 3.1's) or Qwen2ForCausalLM
(a Llama with biases on q, k and v: model.qkv_bias) into a jaxgpt export, which all that takes a run
takes (evaluate, sample, talk, serve, train.init_from); what jaxgpt cannot express is refused by its
config key. The export keeps the model's own config, tokenizer and generation files under hf/, so that
to-hf carries over what jaxgpt does not model (bos/eos ids, chat template), and converted.json.

Tokenizers: GPT-2's own vocabulary becomes tiktoken's gpt2 encoding, any other tokenizer.json is
read by the `tokenizers` library (tokenizer.py's hf kind). jaxgpt's chat specials take the model's
eos, bos and same-named tokens, the rest new ids after its vocabulary; where those pass vocab_size,
wte (and lm_head) gain rows equal to the mean of the others: a new token's logit is the mean logit,
never the argmax, until training moves it. to-hf of that export drops them again (the tensors come
back bit for bit); once trained (the export of a train.init_from run) they are kept, and their tokens
added to tokenizer.json. Without tokenizer files the export is marked NO_TOKENIZER: its params load
(runs.load(need_tokenizer=False), to-hf), and what needs a tokenizer says how to add one.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16, so safetensors' numpy reader returns bf16 tensors
import numpy as np

from jaxgpt.data import chat
from jaxgpt import cli
from jaxgpt import config as config_lib
from jaxgpt.store import export
from jaxgpt import files
from jaxgpt.store import runs
from jaxgpt.config import Config, FromHfConfig, HfCommand, ModelConfig, ToHfConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.data.tokenizer import FORMAT, SPECIAL_TOKENS, Tokenizer, _load_hf, _official, byte_level_chars

GPT2, LLAMA, QWEN2 = "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"
MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "qwen2": QWEN2}
# the model's own files an export keeps under hf/ (and to-hf writes back)
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
# tensors that are buffers, not weights (old GPT-2 uploads' causal masks, old Llama's RoPE table)
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class ConvertError(JaxgptError): ...


def _require(module: str):
    """An optional dependency (the hf extra), imported where it is used."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConvertError(f"Hugging Face conversion needs the {module.split('.')[0]} package: "
                           f"pip install 'jaxgpt[hf]'") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


# ---- reading a Hugging Face model ----

def local_dir(source: str, revision: str = "") -> Path:
    """The directory `source` is, or a hub name's snapshot (huggingface_hub, with network)."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConvertError(f"{source}: not a model directory")
    hub = _require("huggingface_hub")
    try:
        return Path(hub.snapshot_download(source, revision=revision or None, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line either way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConvertError(f"{source}: no such directory, and the hub download failed "
                           f"({type(e).__name__}: {reason})") from None


class Weights:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json names,
    each read on demand (safetensors, numpy) as fp32 and checked against its expected shape."""

    def __init__(self, directory: Path):
        safe_open = _require("safetensors").safe_open
        index, self.where = directory / "model.safetensors.index.json", directory / "model.safetensors"
        if index.is_file():
            weight_map, self.where = _read_json(index).get("weight_map"), index
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: no weight_map")
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif self.where.is_file():
            try:
                with safe_open(self.where, framework="np") as f:
                    self.files = dict.fromkeys(f.keys(), self.where)
            except Exception as e:  # noqa: BLE001 - a file cut short or not safetensors at all
                raise ConvertError(f"{self.where}: not a readable safetensors file ({type(e).__name__}: {e})") \
                    from None
        else:
            raise ConvertError(f"{directory}: no model.safetensors or model.safetensors.index.json (a "
                               f"pytorch_model.bin is not read: save_pretrained writes safetensors)")
        self._open, self._handles, self.taken = safe_open, {}, set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.files and name.removeprefix("transformer.") in self.files:  # older GPT-2 uploads
            name = name.removeprefix("transformer.")
        if name not in self.files:
            raise ConvertError(f"{self.where}: tensor {name} is missing")
        path = self.files[name]
        try:
            if path not in self._handles:
                self._handles[path] = self._open(path, framework="np")
            x = self._handles[path].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a missing shard, a tensor the index promised but the file lacks
            raise ConvertError(f"{path}: cannot read tensor {name} ({type(e).__name__}: {e})") from None
        if tuple(x.shape) != tuple(shape):
            raise ConvertError(f"{path}: tensor {name} is {tuple(x.shape)}, config.json implies {tuple(shape)}")
        self.taken.add(name)
        return x.astype(np.float32)

    def check_all_taken(self, arch: str, ignore: tuple[str, ...]) -> None:
        """A tensor nothing read is a feature jaxgpt does not model: refuse rather than drop it."""
        for name in sorted(set(self.files) - self.taken):
            if not name.endswith(BUFFERS) and name not in ignore:
                raise ConvertError(f"{self.files[name]}: tensor {name} has no place in jaxgpt's {arch}")


# ---- configs ----

def _get(hf: dict, key: str, where: Path):
    if hf.get(key) is None:
        raise ConvertError(f"{where}: {key} is missing")
    return hf[key]


def _refuse(where: Path, key: str, value, why: str):
    raise ConvertError(f"{where}: {key}={json.dumps(value)} is not supported ({why})")


def architecture(hf: dict, where: Path) -> str:
    archs = hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), "")]
    for arch in archs:
        if arch in (GPT2, LLAMA, QWEN2):
            return arch
    raise ConvertError(f"{where}: architectures={json.dumps(archs)} (model_type={hf.get('model_type')!r}): "
                       f"jaxgpt converts {GPT2}, {LLAMA} and {QWEN2}")


def model_config(arch: str, hf: dict, where: Path, seq_len: int = 0) -> ModelConfig:
    """jaxgpt's ModelConfig of a HF config (vocab_size: the model's own, before any padding)."""
    get = lambda key: _get(hf, key, where)  # noqa: E731
    if arch == GPT2:
        mlp = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}.get(
            hf.get("activation_function", "gelu_new"))
        if mlp is None:
            _refuse(where, "activation_function", hf["activation_function"], "jaxgpt has gelu_new and gelu")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if hf.get(key, ok) != ok:
                _refuse(where, key, hf[key], f"jaxgpt's attention is {key}={json.dumps(ok)}")
        n_positions = hf.get("n_positions") or get("n_ctx")
        if seq_len not in (0, n_positions):
            raise ConvertError(f"from_hf.seq_len={seq_len}: learned positions fix it at n_positions={n_positions}")
        D = get("n_embd")
        return ModelConfig(preset="gpt2", vocab_size=get("vocab_size"), n_layer=get("n_layer"), n_head=get("n_head"),
                           d_model=D, d_ff=hf.get("n_inner") or 4 * D, seq_len=n_positions, norm="layernorm",
                           mlp=mlp, position="learned", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02))
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", hf["hidden_act"], "jaxgpt's SwiGLU gates with silu")
    if arch == QWEN2 and hf.get("use_sliding_window", False):
        _refuse(where, "use_sliding_window", True, "jaxgpt's attention sees the whole context")
    if arch == LLAMA and hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        _refuse(where, "attention_bias", hf.get("attention_bias", False), f"with mlp_bias="
                f"{json.dumps(hf.get('mlp_bias', False))}: jaxgpt's model.bias puts biases on all projections or none")
    D, H = get("hidden_size"), get("num_attention_heads")
    if D % H or (hf.get("head_dim") or D // H) != D // H:
        _refuse(where, "head_dim", hf.get("head_dim"), f"jaxgpt's is hidden_size / num_attention_heads = {D / H:g}")
    return ModelConfig(preset="llama", vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"), n_head=H,
                       n_kv_head=hf.get("num_key_value_heads") or H, d_model=D, d_ff=get("intermediate_size"),
                       seq_len=seq_len or get("max_position_embeddings"), norm="rmsnorm", mlp="swiglu",
                       position="rope", bias=arch == LLAMA and bool(hf.get("attention_bias", False)),
                       qkv_bias=arch == QWEN2,  # Qwen2: biases on q, k and v, none elsewhere
                       tie_embeddings=hf.get("tie_word_embeddings", False), **rope_config(hf, where),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02))


# jaxgpt's RoPE scaling fields and the keys of Hugging Face's rope parameters that hold them
ROPE_KEYS = {"linear": {"rope_factor": "factor"},
             "llama3": {"rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
                        "rope_high_freq_factor": "high_freq_factor",
                        "rope_original_context": "original_max_position_embeddings"}}


def rope_config(hf: dict, where: Path) -> dict:
    """ModelConfig's rope fields of a HF Llama config: transformers 5 writes rope_parameters (rope_type,
    rope_theta and the scaling's keys), 4 rope_theta beside rope_scaling (its kind as "type" in older files)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", *ROPE_KEYS):
        _refuse(where, f"{key}.rope_type", kind, "jaxgpt scales RoPE as linear or llama3")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse(where, "partial_rotary_factor", partial, "jaxgpt rotates every dimension of a head")
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    if kind == "llama3" and "original_max_position_embeddings" not in rope:  # as transformers reads it
        rope = {**rope, "original_max_position_embeddings": _get(hf, "max_position_embeddings", where)}
    for field, hf_key in ROPE_KEYS[kind].items():
        value = rope.get(hf_key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConvertError(f"{where}: {key}.{hf_key}={json.dumps(value)}: rope_type {kind} needs a number there")
        out[field] = int(value) if field == "rope_original_context" else float(value)
    return {**out, "rope_scaling": kind}


def hf_rope(m: ModelConfig) -> dict:
    """Hugging Face's rope parameters of a jaxgpt Llama (transformers 5's rope_parameters)."""
    kind = "default" if m.rope_scaling == "none" else m.rope_scaling
    return {"rope_type": kind, "rope_theta": m.rope_theta,
            **{hf_key: getattr(m, field) for field, hf_key in ROPE_KEYS.get(kind, {}).items()}}


def hf_architecture(m: ModelConfig) -> str:
    """The HF architecture a jaxgpt model is: learned positions make it GPT-2, RoPE Llama (Qwen2 with
    biases on q, k and v alone)."""
    arch = GPT2 if m.position == "learned" else QWEN2 if m.qkv_bias and not m.bias else LLAMA
    wanted = dict(norm="layernorm", mlp=("gelu", "gelu_exact"), bias=True, n_kv_head=m.n_head) if arch == GPT2 \
        else dict(norm="rmsnorm", mlp=("swiglu",))
    for key, ok in {**wanted, "qk_norm": False, "logit_softcap": 0.0}.items():
        value = getattr(m, key)
        if value not in (ok if isinstance(ok, tuple) else (ok,)):
            raise ConvertError(f"model.{key}={value}: a {arch} (model.position={m.position}) has no such "
                               f"variant; it needs model.{key}={'|'.join(map(str, ok)) if isinstance(ok, tuple) else ok}")
    return arch


def hf_config(arch: str, m: ModelConfig, vocab_size: int, base: dict | None, tok: Tokenizer | None,
              dtype: str) -> dict:
    """config.json for transformers: the model's own (base, when it came from HF) with every field
    jaxgpt models set from jaxgpt's config."""
    if arch == GPT2:
        fields = dict(model_type="gpt2", n_embd=m.d_model, n_layer=m.n_layer, n_head=m.n_head,
                      n_positions=m.seq_len, n_inner=m.d_ff,
                      activation_function="gelu_new" if m.mlp == "gelu" else "gelu", layer_norm_epsilon=m.norm_eps)
        if base is None:  # jaxgpt's one dropout acts on embeddings and the residual stream, not attention
            fields.update(embd_pdrop=m.dropout, resid_pdrop=m.dropout, attn_pdrop=0.0)
    else:
        fields = dict(model_type="llama" if arch == LLAMA else "qwen2", hidden_size=m.d_model,
                      num_hidden_layers=m.n_layer,
                      num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head, head_dim=m.head_dim,
                      intermediate_size=m.d_ff, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, hidden_act="silu",
                      max_position_embeddings=max(m.seq_len, (base or {}).get("max_position_embeddings", 0)),
                      **(dict(attention_bias=m.bias, mlp_bias=m.bias) if arch == LLAMA else
                         dict(use_sliding_window=False)))
        # transformers 5 writes (and reads first) rope_parameters; 4 reads rope_theta and rope_scaling
        rope, scaling = hf_rope(m), None
        if rope["rope_type"] != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        fields.update(rope_parameters=rope, rope_scaling=scaling)
    out = {**(base or {}), **fields, "architectures": [arch], "vocab_size": vocab_size,
           "tie_word_embeddings": m.tie_embeddings, "torch_dtype": dtype, "dtype": dtype}
    if base is None and tok is not None:
        out.update(bos_token_id=tok.bos_id, eos_token_id=tok.eot_id)
    return out


# ---- weights ----
# Params are handled flat, by jaxgpt path ("block_0/attn/wq/w"). A block is mapped through its
# "parts": each projection as an [in, out] matrix (q, k, v, o; gate and up, down) and its bias
# ("q.b"), each norm's scale (and bias). One table per architecture says which HF tensor holds
# which parts, joined along the output axis, and serves both directions.

LAYERS = {  # (name prefix of layer i, weights stored [out, in] (torch Linear) rather than [in, out] (GPT-2's Conv1D),
            #  HF tensor -> the parts it holds)
    GPT2: ("transformer.h.{i}.", False, {"ln_1": ("norm_attn",), "attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",),
                                         "ln_2": ("norm_mlp",), "mlp.c_fc": ("up",), "mlp.c_proj": ("down",)}),
    LLAMA: ("model.layers.{i}.", True, {
        "input_layernorm": ("norm_attn",), "self_attn.q_proj": ("q",), "self_attn.k_proj": ("k",),
        "self_attn.v_proj": ("v",), "self_attn.o_proj": ("o",), "post_attention_layernorm": ("norm_mlp",),
        "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",), "mlp.down_proj": ("down",)}),
}
LAYERS[QWEN2] = LAYERS[LLAMA]  # the same tensors, with q, k and v's biases
TOP = {GPT2: {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight",
              "norm_out/scale": "transformer.ln_f.weight", "norm_out/bias": "transformer.ln_f.bias"},
       LLAMA: {"wte": "model.embed_tokens.weight", "norm_out/scale": "model.norm.weight"}}
TOP[QWEN2] = TOP[LLAMA]


def biased(m: ModelConfig) -> set[str]:
    """The parts that have a bias: all with model.bias, q, k and v with model.qkv_bias."""
    return {"q", "k", "v", "o", "gate", "up", "down"} if m.bias else {"q", "k", "v"} if m.qkv_bias else set()


def part_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    D, H, K, E, F = m.d_model, m.n_head, m.n_kv_head, m.head_dim, m.d_ff
    return {"q": (D, H * E), "k": (D, K * E), "v": (D, K * E), "o": (H * E, D), "gate": (D, F), "up": (D, F),
            "down": (F, D)}


def unpack(p: dict[str, np.ndarray], b: str, m: ModelConfig) -> dict[str, np.ndarray]:
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
        parts.update({"q.b": p[b + "attn/wq/b"].reshape(-1), "k.b": kv_2xKE[0], "v.b": kv_2xKE[1]})
    if "o" in biased(m):
        up_b = p[b + "mlp/w_up/b"]
        parts.update({"o.b": p[b + "attn/wo/b"], "down.b": p[b + "mlp/w_down/b"],
                      **({"gate.b": up_b[0], "up.b": up_b[1]} if m.mlp == "swiglu" else {"up.b": up_b})})
    if m.bias and m.norm == "layernorm":
        parts.update({"norm_attn.b": p[b + "norm_attn/bias"], "norm_mlp.b": p[b + "norm_mlp/bias"]})
    return parts


def pack(parts: dict[str, np.ndarray], b: str, m: ModelConfig) -> dict[str, np.ndarray]:
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
        p.update({b + "attn/wo/b": parts["o.b"], b + "mlp/w_down/b": parts["down.b"],
                  b + "mlp/w_up/b": np.stack([parts["gate.b"], parts["up.b"]]) if glu else parts["up.b"]})
    if m.bias and m.norm == "layernorm":
        p.update({b + "norm_attn/bias": parts["norm_attn.b"], b + "norm_mlp/bias": parts["norm_mlp.b"]})
    return p


def params_from_hf(w: Weights, arch: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """The flat jaxgpt params of a HF checkpoint (vocab_size rows: the model's own)."""
    D, V, shapes = m.d_model, m.vocab_size, part_shapes(m)
    top_shapes = {"wte": (V, D), "wpe": (m.seq_len, D), "norm_out/scale": (D,), "norm_out/bias": (D,)}
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
            w_INxOUT = w(h + ".weight", (sum(sizes), fan_in)).T if out_in else w(h + ".weight", (fan_in, sum(sizes)))
            parts.update(zip(held, np.split(w_INxOUT, splits, axis=1)))
            if held[0] in biased(m):
                parts.update(zip([part + ".b" for part in held], np.split(w(h + ".bias", (sum(sizes),)), splits)))
        flat.update(pack(parts, f"block_{i}/", m))
    if not m.tie_embeddings:
        flat["lm_head"] = w("lm_head.weight", (V, D)).T  # HF's head is [V, D], jaxgpt's [D, V]
    return flat


def params_to_hf(flat: dict[str, np.ndarray], arch: str, m: ModelConfig) -> dict[str, np.ndarray]:
    """params_from_hf's inverse: HF tensor name -> array."""
    out = {theirs: flat[ours] for ours, theirs in TOP[arch].items()}
    prefix, out_in, table = LAYERS[arch]
    for i in range(m.n_layer):
        parts = unpack(flat, f"block_{i}/", m)
        for name, held in table.items():
            h = prefix.format(i=i) + name
            w_INxOUT = np.concatenate([parts[part] for part in held], axis=-1)
            out[h + ".weight"] = w_INxOUT.T if out_in and w_INxOUT.ndim == 2 else w_INxOUT
            if held[0] + ".b" in parts:
                out[h + ".bias"] = np.concatenate([parts[part + ".b"] for part in held])
    if not m.tie_embeddings:
        out["lm_head.weight"] = flat["lm_head"].T
    return out


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value})
    return out


def _nest(flat: dict[str, np.ndarray]) -> dict:
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
    out["wte"] = np.concatenate([flat["wte"], np.repeat(flat["wte"].mean(0, keepdims=True), V - n, 0)])
    if "lm_head" in flat:
        out["lm_head"] = np.concatenate([flat["lm_head"], np.repeat(flat["lm_head"].mean(1, keepdims=True), V - n, 1)], 1)
    return out


# ---- tokenizers ----

def _gpt2_sha256() -> str:
    return _official("gpt2")[1][1]  # tiktoken's record of GPT-2's ranks file


def as_gpt2(spec: dict) -> Tokenizer | None:
    """tiktoken's gpt2 encoding when a tokenizer.json holds GPT-2's own vocabulary: its byte-level
    pieces, written as a .tiktoken ranks file, hash to the official file's sha256. Nothing is
    guessed, and nothing downloaded: the encoding is Tokenizer.from_spec("gpt2")'s, from the model's files."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return None
    added, chars = {t["content"] for t in spec.get("added_tokens", [])}, byte_level_chars()
    pieces = [(piece, i) for piece, i in model.get("vocab", {}).items() if piece not in added]
    if not all(c in chars for piece, _ in pieces for c in piece):
        return None
    ranks = {bytes(chars[c] for c in piece): i for piece, i in pieces}
    data = b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    if hashlib.sha256(data).hexdigest() != _gpt2_sha256():
        return None
    official = _official("gpt2")[0]
    return Tokenizer("gpt2", pattern=official["pat_str"], ranks=ranks, specials=official["special_tokens"])


def _role_id(role: str, hf: dict, tok_cfg: dict, hf_tok) -> int | None:
    """The model's own eos / bos id: config.json's {role}_token_id (the first of a list), else the
    token tokenizer_config.json names; None when the tokenizer has neither."""
    value = hf.get(f"{role}_token_id")
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, int) and 0 <= value < hf_tok.get_vocab_size(with_added_tokens=True):
        return value
    name = tok_cfg.get(f"{role}_token")
    name = name.get("content") if isinstance(name, dict) else name
    return hf_tok.token_to_id(name) if isinstance(name, str) else None


def tokenizer_for(directory: Path, hf: dict, spec: str, name: str) -> Tokenizer | None:
    """The tokenizer of a HF model: from_hf.tokenizer when given (a HF tokenizer.json, a directory
    holding one, or a jaxgpt spec), else the model's own files; None when it has none."""
    if spec:
        file = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
        if not (file.suffix == ".json" and file.is_file() and _read_json(file).get("format") != FORMAT):
            return Tokenizer.from_spec(spec)
        directory, hf_json = file.parent, file.read_text(encoding="utf-8")
    elif (directory / "tokenizer.json").is_file():
        hf_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
    elif old := [n for n in ("vocab.json", "tokenizer.model") if (directory / n).is_file()]:
        raise ConvertError(f"{directory / old[0]}: only tokenizer.json is read; write one with transformers: "
                           f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    else:
        return None
    try:
        parsed = json.loads(hf_json)
    except ValueError as e:
        raise ConvertError(f"{directory / 'tokenizer.json'}: not JSON ({e})") from None
    if (gpt2 := as_gpt2(parsed)) is not None:
        return gpt2
    hf_tok = _load_hf(name, hf_json)  # for the ids of named tokens; tokenizer.py's one-line errors
    tok_cfg = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        tok_cfg.update(_read_json(directory / extra) if (directory / extra).is_file() else {})
    return Tokenizer.from_hf(hf_json, name, _role_id("eos", hf, tok_cfg, hf_tok), _role_id("bos", hf, tok_cfg, hf_tok),
                             chat_format_of(directory, tok_cfg, parsed))


def chat_format_of(directory: Path, tok_cfg: dict, hf_json: dict) -> str:
    """The chat format of the model's own template (tokenizer_config.json's chat_template, or the
    chat_template.jinja transformers 5 writes): one of chat.CHAT_FORMATS whose special tokens the template
    writes and the tokenizer has; jaxgpt's own when it has no template or another one."""
    template = tok_cfg.get("chat_template")
    if not template and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(template, str):  # absent, or a list of named templates (tool use): not read
        return "jaxgpt"
    specials = {t.get("content") for t in hf_json.get("added_tokens", []) if t.get("special")}
    for name in ("chatml", "llama3"):
        fmt = chat.CHAT_FORMATS[name]
        if all(t in template for t in fmt.tokens(bos=False)) and fmt.tokens() <= specials:
            return name
    return "jaxgpt"


def tiktoken_json(tok: Tokenizer) -> str:
    """A tiktoken-backed tokenizer (gpt2, cl100k_base, a trained bpe:N) as a tokenizers file: its
    split pattern, byte-level pieces and the merges that rebuild its ranks (a token is the merge of
    the two parts that BPE over its own bytes ends in), whole pieces looked up first as tiktoken does."""
    ranks, to_char = tok._ranks, {b: c for c, b in byte_level_chars().items()}  # noqa: SLF001 - one package
    piece = lambda bs: "".join(to_char[b] for b in bs)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], 1 << 62))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append([piece(parts[0]), piece(parts[1])])
    specials = sorted({i: t for t, i in tok._specials.items()}.items())  # noqa: SLF001
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in specials],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok._pattern}, "behavior": "Isolated", "invert": False},  # noqa: SLF001
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {piece(t): r for t, r in ranks.items()}, "merges": merges}}, ensure_ascii=False)


def write_tokenizer(out: Path, tok: Tokenizer | None, kept: dict[str, Path], V: int, seq_len: int) -> str | None:
    """tokenizer.json (+ tokenizer_config.json) for transformers' AutoTokenizer, with jaxgpt's chat
    specials below id V added where the file lacks them; None when there is no such form (a char table)."""
    if tok is not None and tok.hf_json is not None:
        hf_json = tok.hf_json
    elif tok is not None and "tokenizer.json" in kept:  # GPT-2's, read as tiktoken's gpt2
        hf_json = kept["tokenizer.json"].read_text(encoding="utf-8")
    elif tok is not None and tok._ranks is not None:  # noqa: SLF001
        hf_json = tiktoken_json(tok)
    else:
        return None
    tokenizers = _require("tokenizers")
    hf_tok = tokenizers.Tokenizer.from_str(hf_json)
    for i, token in sorted((tok.special_id(t), t) for t in SPECIAL_TOKENS):
        if hf_tok.get_vocab_size(with_added_tokens=True) <= i < V:
            hf_tok.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
            if hf_tok.token_to_id(token) != i:
                raise ConvertError(f"{token} would be id {hf_tok.token_to_id(token)} in tokenizer.json but is {i} "
                                   f"in the model (ids missing before it)")
            hf_json = hf_tok.to_str()
    files.atomic_write(out / "tokenizer.json", hf_json)
    if "tokenizer_config.json" not in kept:
        files.write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len, "clean_up_tokenization_spaces": False,
            "bos_token": hf_tok.id_to_token(tok.bos_id), "eos_token": hf_tok.id_to_token(tok.eot_id)})
    return tok.name


# ---- the commands ----

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _check_out(out: Path, source: Path, ours: bool, hint: str = "") -> None:
    """Never write over the input, nor into a directory with other things in it."""
    if out.exists() and out.resolve() == source.resolve():
        raise ConvertError(f"{out}: the output directory must not be the input")
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise ConvertError(f"{out}: exists and is not empty; give a new directory{hint}")


def from_hf(source: str, out: str | Path, cfg: FromHfConfig = FromHfConfig()) -> dict:
    """A HF model (directory or hub name) written as a jaxgpt export at `out`; returns the summary
    the command prints."""
    directory, out = local_dir(source, cfg.revision), Path(out)
    _check_out(out, directory, ours=(out / "params").is_dir() and (out / "config.json").is_file())
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{config_path}: not found (a Hugging Face model directory has one)")
    hf = _read_json(config_path)
    arch = architecture(hf, config_path)
    m = model_config(arch, hf, config_path, cfg.seq_len).resolved()
    tok = tokenizer_for(directory, hf, cfg.tokenizer, f"hf:{source}")
    weights = Weights(directory)
    flat = params_from_hf(weights, arch, m)
    weights.check_all_taken(arch, ("lm_head.weight",) if m.tie_embeddings else ())  # HF ignores a tied copy too
    V = max(m.vocab_size, tok.n_vocab if tok is not None else 0)
    flat = pad_vocab(flat, V) if V > m.vocab_size else flat
    run_cfg = config_lib.validate(Config(model=dataclasses.replace(m, vocab_size=V)))
    converted = {"source": source, "architecture": arch, "hf_vocab_size": m.vocab_size, "vocab_size": V,
                 "tokenizer": tok.name if tok is not None else None,
                 "chat_format": tok.chat_format if tok is not None else None}
    extra = {f"hf/{name}": (directory / name).read_bytes() for name in HF_FILES if (directory / name).is_file()}
    extra["converted.json"] = json.dumps(converted, indent=1) + "\n"
    if tok is None:
        extra[runs.NO_TOKENIZER] = "converted from Hugging Face without tokenizer files (see jaxgpt/convert.py)\n"
    export.export(out, run_cfg, _nest(flat), tok, extra)
    return {"export": str(out.absolute()), **converted, "params": int(sum(x.size for x in flat.values()))}


def write_safetensors(tensors: dict[str, np.ndarray], out: Path, max_shard_mb: float) -> list[str]:
    """model.safetensors, or shards + model.safetensors.index.json past max_shard_mb; the file names."""
    save_file = _require("safetensors.numpy").save_file
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
    for file, shard in zip(names, shards):
        save_file({name: tensors[name] for name in shard}, out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        files.write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
            "weight_map": {name: file for file, shard in zip(names, shards) for name in shard}})
    return names


def to_hf(source: str, out: str | Path, cfg: ToHfConfig = ToHfConfig()) -> dict:
    """A jaxgpt run or export written as a directory transformers loads; returns the summary."""
    loaded = runs.load(source, need_tokenizer=False)
    m, tok, out = loaded.cfg.model, loaded.tokenizer, Path(out)
    arch = hf_architecture(m)
    _check_out(out, Path(source), ours=cfg.overwrite, hint=" (or to_hf.overwrite=true)")
    origin = Path(loaded.where) if loaded.step is None else None  # an export: what from-hf kept
    kept = {name: origin / "hf" / name for name in HF_FILES if origin and (origin / "hf" / name).is_file()}
    base = _read_json(kept.pop("config.json")) if "config.json" in kept else None
    converted = _read_json(origin / "converted.json") if origin and (origin / "converted.json").is_file() else {}
    flat = _flat(jax.device_get(loaded.params))
    # An export from-hf wrote holds the padding rows it added, untrained: they go, and the tensors come
    # back as they were. A model trained since (train's export has no converted.json) keeps every row.
    V = converted.get("hf_vocab_size", m.vocab_size)
    flat["wte"] = flat["wte"][:V]
    if "lm_head" in flat:
        flat["lm_head"] = flat["lm_head"][:, :V]
    own = (base or {}).get("dtype") or (base or {}).get("torch_dtype")
    dtype = cfg.dtype if cfg.dtype != "auto" else own if own in DTYPES else "float32"
    tensors = {name: np.ascontiguousarray(x.astype(DTYPES[dtype])) for name, x in params_to_hf(flat, arch, m).items()}
    out.mkdir(parents=True, exist_ok=True)
    written = write_safetensors(tensors, out, cfg.max_shard_mb)
    files.write_json(out / "config.json", hf_config(arch, m, V, base, tok, dtype))
    tokenizer = write_tokenizer(out, tok, kept, V, m.seq_len)
    for name, path in kept.items():  # the model's other files, as they came (tokenizer.json written above)
        if name != "tokenizer.json":
            files.atomic_write(out / name, path.read_bytes())
    return {"dir": str(out.absolute()), "architecture": arch, "vocab_size": V, "dtype": dtype, "files": written,
            "tokenizer": tokenizer}


def main(argv: list[str] | None = None) -> None:
    def run_from(operands, settings):
        print(json.dumps(from_hf(operands[0], operands[1], cli.tool_config(HfCommand, settings).from_hf)))

    def run_to(operands, settings):
        print(json.dumps(to_hf(operands[0], operands[1], cli.tool_config(HfCommand, settings).to_hf)))

    cli.run("python -m jaxgpt.convert", {
        "from-hf": cli.Command(run_from, "DIR_OR_HUB_NAME OUT [from_hf.KEY=VALUE ...]", HfCommand,
                               sections=("from_hf",), operands=(2, 2)),
        "to-hf": cli.Command(run_to, "RUN_OR_EXPORT DIR [to_hf.KEY=VALUE ...]", HfCommand,
                             sections=("to_hf",), operands=(2, 2)),
    }, argv)


if __name__ == "__main__":
    main()
