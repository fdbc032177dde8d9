"""Hugging Face config.json <-> jaxgpt's ModelConfig: the architectures converted (GPT-2, Llama
with its RoPE plain, linear or scaled as Llama 3.1's, and Qwen2: a Llama with biases on q, k and
v), what of a config jaxgpt cannot express (refused by its config key), and the package's error.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from jaxgpt.config import ModelConfig
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import JaxgptError

GPT2, LLAMA, QWEN2 = "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"
MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "qwen2": QWEN2}
# jaxgpt's RoPE scaling fields and the keys of Hugging Face's rope parameters that hold them
ROPE_KEYS = {"linear": {"rope_factor": "factor"},
             "llama3": {"rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
                        "rope_high_freq_factor": "high_freq_factor",
                        "rope_original_context": "original_max_position_embeddings"}}


class ConvertError(JaxgptError): ...


def require(module: str):
    """An optional dependency (the hf extra), imported where it is used."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConvertError(f"Hugging Face conversion needs the {module.split('.')[0]} package: "
                           f"pip install 'jaxgpt[hf]'") from None


def _get(hf: dict, key: str, where: Path):
    if hf.get(key) is None:
        raise ConvertError(f"{where}: {key} is missing")
    return hf[key]


def _refuse(where: Path, key: str, value, why: str):
    raise ConvertError(f"{where}: {key}={json.dumps(value)} is not supported ({why})")


# ---- reading a Hugging Face config ----

def architecture(hf: dict, where: Path) -> str:
    archs = hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), "")]
    for arch in archs:
        if arch in (GPT2, LLAMA, QWEN2):
            return arch
    raise ConvertError(f"{where}: architectures={json.dumps(archs)} "
                       f"(model_type={hf.get('model_type')!r}): "
                       f"jaxgpt converts {GPT2}, {LLAMA} and {QWEN2}")


def model_config(arch: str, hf: dict, where: Path, seq_len: int = 0) -> ModelConfig:
    """jaxgpt's ModelConfig of a HF config (vocab_size: the model's own, before any padding)."""
    if arch == GPT2:
        return _gpt2_config(hf, where, seq_len)
    get = lambda key: _get(hf, key, where)  # noqa: E731
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", hf["hidden_act"], "jaxgpt's SwiGLU gates with silu")
    if arch == QWEN2 and hf.get("use_sliding_window", False):
        _refuse(where, "use_sliding_window", True, "jaxgpt's attention sees the whole context")
    if arch == LLAMA and hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        _refuse(where, "attention_bias", hf.get("attention_bias", False),
                f"with mlp_bias={json.dumps(hf.get('mlp_bias', False))}: "
                f"jaxgpt's model.bias puts biases on all projections or none")
    D, H = get("hidden_size"), get("num_attention_heads")
    if D % H or (hf.get("head_dim") or D // H) != D // H:
        _refuse(where, "head_dim", hf.get("head_dim"),
                f"jaxgpt's is hidden_size / num_attention_heads = {D / H:g}")
    return ModelConfig(
        preset="llama", vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"), n_head=H,
        n_kv_head=hf.get("num_key_value_heads") or H, d_model=D, d_ff=get("intermediate_size"),
        seq_len=seq_len or get("max_position_embeddings"), norm="rmsnorm", mlp="swiglu",
        position="rope", bias=arch == LLAMA and bool(hf.get("attention_bias", False)),
        qkv_bias=arch == QWEN2,  # Qwen2: biases on q, k and v, none elsewhere
        tie_embeddings=hf.get("tie_word_embeddings", False), **rope_config(hf, where),
        norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02))


def _gpt2_config(hf: dict, where: Path, seq_len: int) -> ModelConfig:
    get = lambda key: _get(hf, key, where)  # noqa: E731
    mlp = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}.get(
        hf.get("activation_function", "gelu_new"))
    if mlp is None:
        _refuse(where, "activation_function", hf["activation_function"],
                "jaxgpt has gelu_new and gelu")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            _refuse(where, key, hf[key], f"jaxgpt's attention is {key}={json.dumps(ok)}")
    n_positions = hf.get("n_positions") or get("n_ctx")
    if seq_len not in (0, n_positions):
        raise ConvertError(f"from_hf.seq_len={seq_len}: learned positions fix it at "
                           f"n_positions={n_positions}")
    D = get("n_embd")
    return ModelConfig(
        preset="gpt2", vocab_size=get("vocab_size"), n_layer=get("n_layer"), n_head=get("n_head"),
        d_model=D, d_ff=hf.get("n_inner") or 4 * D, seq_len=n_positions, norm="layernorm",
        mlp=mlp, position="learned", bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02))


def rope_config(hf: dict, where: Path) -> dict:
    """ModelConfig's rope fields of a HF Llama config: transformers 5 writes rope_parameters
    (rope_type, rope_theta and the scaling's keys), 4 rope_theta beside rope_scaling (its kind as
    "type" in older files)."""
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
    if kind == "llama3" and "original_max_position_embeddings" not in rope:  # as transformers does
        rope = {**rope,
                "original_max_position_embeddings": _get(hf, "max_position_embeddings", where)}
    for field, hf_key in ROPE_KEYS[kind].items():
        value = rope.get(hf_key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConvertError(f"{where}: {key}.{hf_key}={json.dumps(value)}: "
                               f"rope_type {kind} needs a number there")
        out[field] = int(value) if field == "rope_original_context" else float(value)
    return {**out, "rope_scaling": kind}


# ---- writing one ----

def hf_rope(m: ModelConfig) -> dict:
    """Hugging Face's rope parameters of a jaxgpt Llama (transformers 5's rope_parameters)."""
    kind = "default" if m.rope_scaling == "none" else m.rope_scaling
    return {"rope_type": kind, "rope_theta": m.rope_theta,
            **{hf_key: getattr(m, field) for field, hf_key in ROPE_KEYS.get(kind, {}).items()}}


def hf_architecture(m: ModelConfig) -> str:
    """The HF architecture a jaxgpt model is: learned positions make it GPT-2, RoPE Llama (Qwen2
    with biases on q, k and v alone)."""
    arch = GPT2 if m.position == "learned" else QWEN2 if m.qkv_bias and not m.bias else LLAMA
    if arch == GPT2:
        wanted = dict(norm="layernorm", mlp=("gelu", "gelu_exact"), bias=True, n_kv_head=m.n_head)
    else:
        wanted = dict(norm="rmsnorm", mlp=("swiglu",))
    for key, ok in {**wanted, "qk_norm": False, "logit_softcap": 0.0}.items():
        value = getattr(m, key)
        if value not in (ok if isinstance(ok, tuple) else (ok,)):
            needed = "|".join(map(str, ok)) if isinstance(ok, tuple) else ok
            raise ConvertError(f"model.{key}={value}: a {arch} (model.position={m.position}) has "
                               f"no such variant; it needs model.{key}={needed}")
    return arch


def hf_config(arch: str, m: ModelConfig, vocab_size: int, base: dict | None,
              tok: Tokenizer | None, dtype: str) -> dict:
    """config.json for transformers: the model's own (base, when it came from HF) with every field
    jaxgpt models set from jaxgpt's config."""
    if arch == GPT2:
        fields = dict(model_type="gpt2", n_embd=m.d_model, n_layer=m.n_layer, n_head=m.n_head,
                      n_positions=m.seq_len, n_inner=m.d_ff,
                      activation_function="gelu_new" if m.mlp == "gelu" else "gelu",
                      layer_norm_epsilon=m.norm_eps)
        if base is None:  # jaxgpt's one dropout acts on embeddings and the residual stream
            fields.update(embd_pdrop=m.dropout, resid_pdrop=m.dropout, attn_pdrop=0.0)
    else:
        fields = _llama_fields(arch, m, base)
    out = {**(base or {}), **fields, "architectures": [arch], "vocab_size": vocab_size,
           "tie_word_embeddings": m.tie_embeddings, "torch_dtype": dtype, "dtype": dtype}
    if base is None and tok is not None:
        out.update(bos_token_id=tok.bos_id, eos_token_id=tok.eot_id)
    return out


def _llama_fields(arch: str, m: ModelConfig, base: dict | None) -> dict:
    fields = dict(
        model_type="llama" if arch == LLAMA else "qwen2", hidden_size=m.d_model,
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head,
        head_dim=m.head_dim, intermediate_size=m.d_ff, rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, hidden_act="silu",
        max_position_embeddings=max(m.seq_len, (base or {}).get("max_position_embeddings", 0)),
        **(dict(attention_bias=m.bias, mlp_bias=m.bias) if arch == LLAMA else
           dict(use_sliding_window=False)))
    # transformers 5 writes (and reads first) rope_parameters; 4 reads rope_theta and rope_scaling
    rope, scaling = hf_rope(m), None
    if rope["rope_type"] != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    fields.update(rope_parameters=rope, rope_scaling=scaling)
    return fields
