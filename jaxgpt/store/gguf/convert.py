"""The GGUF commands of `python -m jaxgpt.convert`: a GGUF file in, a jaxgpt export out, and back.

    python -m jaxgpt.convert from-gguf FILE.gguf|KNOWN_NAME|OWNER/REPO/FILE.gguf OUT
    python -m jaxgpt.convert to-gguf RUN_OR_EXPORT OUT.gguf [to_gguf.dtype=f32|f16|bf16|q8_0]

from-gguf dequantizes every tensor to fp32 (the gguf package's own dequantization, any type it
knows), maps the metadata to ModelConfig (config.py) and the tokenizer (tokenizer.py) and writes an
export, which all that takes a run takes. The export keeps the GGUF's chat template and the other
metadata under gguf/ and in converted.json the file's origin and each tensor's quantization type.
to-gguf writes a file llama.cpp runs: metadata, tokenizer, chat template, tensors in to_gguf.dtype.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import files
from jaxgpt.config import Config, FromGgufConfig, ModelConfig, ToGgufConfig
from jaxgpt.data import chat
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.store import export, runs
from jaxgpt.store.gguf import tokenizer as gguf_tokenizer
from jaxgpt.store.gguf import writer as writer_lib
from jaxgpt.store.gguf.config import architecture, llama3_divisors, llama3_rope, model_config
from jaxgpt.store.gguf.models import gguf_path
from jaxgpt.store.gguf.weights import GGUFFile, pad_kept_vocab, params_from_gguf, params_to_gguf
from jaxgpt.store.hf.config import GPT2, LLAMA, ConvertError, hf_architecture
from jaxgpt.store.hf.convert import check_out
from jaxgpt.store.hf.tokenizer import template_chat_format
from jaxgpt.store.hf.weights import flatten, nest, pad_vocab, without_padding

TEMPLATE = "gguf/chat_template.jinja"  # in an export: the model's own, as the GGUF held it
METADATA = "gguf/metadata.json"  # the GGUF's general.* keys, carried back by to-gguf
# general.* keys to-gguf writes anew rather than carrying them over
WRITTEN = ("general.architecture", "general.file_type", "general.quantization_version")


def _tokenizer(f: GGUFFile, name: str, eos: int | None, bos: int | None) -> Tokenizer | None:
    if "tokenizer.ggml.model" not in f.meta:
        return None
    hf_json = gguf_tokenizer.hf_json_of(f.meta, str(f.path))
    specials = {t["content"] for t in json.loads(hf_json).get("added_tokens", [])
                if t.get("special")}
    fmt, default_system = template_chat_format(f.meta.get("tokenizer.chat_template"), specials)
    return Tokenizer.from_hf(hf_json, name, eos, bos, fmt, default_system=default_system)


def from_gguf(source: str, out: str | Path, cfg: FromGgufConfig = FromGgufConfig()) -> dict:
    """A GGUF (path, known name or hub file) written as a jaxgpt export at `out`; returns the
    summary the command prints."""
    path, out = gguf_path(source), Path(out)
    check_out(out, path, ours=(out / "params").is_dir() and (out / "config.json").is_file())
    f = GGUFFile(path)
    arch = architecture(f.meta, path)
    V = f.rows("token_embd.weight")
    if V is None:
        raise ConvertError(f"{path}: tensor token_embd.weight is missing")
    m = model_config(f.meta, path, V, "output.weight" not in f.tensors, cfg.seq_len).resolved()
    if "rope_freqs.weight" in f.tensors:
        divisors = f("rope_freqs.weight", (m.head_dim // 2,))
        m = dataclasses.replace(m, **llama3_rope(divisors, m, f.meta, path))
    flat = params_from_gguf(f, arch, m, cfg.keep_quantized)
    f.check_all_taken(arch)
    if any(name.endswith("_q4") for name in flat):  # the engine's weights: the file's blocks
        m = dataclasses.replace(m, weights="int4")
    elif any(name.endswith("_scale") for name in flat):
        m = dataclasses.replace(m, weights="int8")
    eos, bos = gguf_tokenizer.role_ids(f.meta)
    tok = _tokenizer(f, f"gguf:{Path(source).name}", eos, bos)
    n_vocab = max(V, tok.n_vocab if tok is not None else 0)
    if n_vocab > V:
        flat = pad_vocab(flat, n_vocab) if "wte" in flat else pad_kept_vocab(flat, n_vocab)
    run_cfg = config_lib.validate(Config(model=dataclasses.replace(m, vocab_size=n_vocab)))
    types = f.types()
    if tok is None:
        eos = bos = None
    converted = {"source": source, "file": str(path.absolute()), "sha256": files.sha256(path),
                 "architecture": arch, "name": f.meta.get("general.name"),
                 "source_vocab_size": V, "vocab_size": n_vocab, "eos_id": eos, "bos_id": bos,
                 "tokenizer": tok.name if tok is not None else None,
                 "chat_format": tok.chat_format if tok is not None else None,
                 "quantization": dict(collections.Counter(types.values())),
                 "tensor_types": types}
    extra = {"converted.json": json.dumps(converted, indent=1) + "\n",
             METADATA: json.dumps({k: v for k, v in f.meta.items() if k.startswith("general.")
                                   and isinstance(v, (str, int, float, list))}, indent=1)}
    if isinstance(f.meta.get("tokenizer.chat_template"), str):
        extra[TEMPLATE] = f.meta["tokenizer.chat_template"]
    if tok is None:
        extra[runs.NO_TOKENIZER] = "converted from a GGUF without a tokenizer\n"
    export.export(out, run_cfg, nest(flat), tok, extra)
    return {"export": str(out.absolute()), **{k: v for k, v in converted.items()
                                              if k != "tensor_types"},
            "params": int(sum(x.size for x in flat.values()))}


# ---- out ----

def gguf_architecture(m: ModelConfig) -> str:
    """llama.cpp's architecture of a jaxgpt model (a model none has is refused by its key)."""
    if m.qk_norm and m.position == "rope" and not (m.bias or m.qkv_bias):
        if hf_architecture(dataclasses.replace(m, qk_norm=False)) == LLAMA:
            return "qwen3"  # Qwen3: a llama whose q and k are RMS-normalised per head
    arch = hf_architecture(m)  # refuses what no HF (and so no GGUF) architecture has
    if arch == GPT2 and m.mlp != "gelu":
        raise ConvertError(f"model.mlp={m.mlp}: llama.cpp's gpt2 has GPT-2's tanh gelu alone")
    return "gpt2" if arch == GPT2 else "llama" if arch == LLAMA else "qwen2"


def chat_template_of(tok: Tokenizer) -> str:
    """A jinja chat template that lays conversations out as jaxgpt does (chat.CHAT_FORMATS), for
    llama.cpp and transformers' apply_chat_template."""
    fmt = chat.CHAT_FORMATS[tok.chat_format]
    join = lambda pieces, role: " + ".join(  # noqa: E731
        json.dumps(p).replace("{role}", '" + ' + role + ' + "') for p in pieces) or '""'
    system = ""
    if getattr(tok, "default_system", ""):
        system = ("{% if messages[0]['role'] != 'system' %}{{ " + join(fmt.start, '"system"')
                  + " + " + json.dumps(tok.default_system) + " + " + join(fmt.end, '"system"')
                  + " }}{% endif %}")
    return ("{{ " + join(fmt.bos, '""') + " }}" + system
            + "{% for message in messages %}{{ " + join(fmt.start, "message['role']")
            + " + message['content'] + " + join(fmt.end, "message['role']") + " }}{% endfor %}"
            + "{% if add_generation_prompt %}{{ " + join(fmt.start, '"assistant"')
            + " }}{% endif %}")


def _origin(loaded) -> tuple[dict, dict, str | None]:
    """What a converted export kept: converted.json, the GGUF's general.* keys, its template."""
    origin = Path(loaded.where) if loaded.step is None else None
    read = lambda name: files.read_json(origin / name) if origin and (  # noqa: E731
        origin / name).is_file() else {}
    template = None
    for name in (TEMPLATE, "hf/chat_template.jinja"):
        if origin and (origin / name).is_file():
            template = (origin / name).read_text(encoding="utf-8")
    hf_tok_cfg = read("hf/tokenizer_config.json")
    if template is None and isinstance(hf_tok_cfg.get("chat_template"), str):
        template = hf_tok_cfg["chat_template"]
    return read("converted.json"), read(METADATA), template


def to_gguf(source: str, out: str | Path, cfg: ToGgufConfig = ToGgufConfig()) -> dict:
    """A jaxgpt run or export written as a GGUF file; returns the summary the command prints."""
    # an export that keeps a GGUF's quantized blocks is written from their fp32 values
    loaded = runs.load(source, ["model.weights=float"], need_tokenizer=False)
    m, tok, out = loaded.cfg.model, loaded.tokenizer, Path(out)
    arch = gguf_architecture(m)
    if out.exists() and not cfg.overwrite:
        raise ConvertError(f"{out}: exists; give a new file name (or to_gguf.overwrite=true)")
    if tok is not None and tok.chat_format not in chat.CHAT_FORMATS:
        raise ConvertError(f"{source}: chat_format {tok.chat_format!r} has no template")
    converted, general, template = _origin(loaded)
    flat, V = without_padding(flatten(jax.device_get(loaded.params)), converted)
    tensors = params_to_gguf(flat, arch, m)
    if m.rope_scaling == "llama3":
        tensors["rope_freqs.weight"] = llama3_divisors(m).astype(np.float32)
    metadata = {"general.name": Path(source).absolute().name,
                **{k: v for k, v in general.items() if k not in WRITTEN},
                **writer_lib.model_metadata(arch, m, V)}
    fields = {}
    if tok is not None:
        # a converted model's own eos and bos (SmolLM2's eos is <|im_end|>, not the id jaxgpt
        # names <|endoftext|>); else the tokenizer's
        roles = ({"eos_id": converted["eos_id"], "bos_id": converted["bos_id"]}
                 if "eos_id" in converted else {})
        fields = gguf_tokenizer.gguf_fields(tok, V, **roles)
        fields["tokenizer.chat_template"] = template or chat_template_of(tok)
        if tok.chat_format == "jaxgpt" and "<|assistant_end|>" in tok.specials:
            # llama.cpp ends a reply at the end-of-turn token, as jaxgpt's engine does
            fields["tokenizer.ggml.eot_token_id"] = tok.special_id("<|assistant_end|>")
    writer_lib.write_gguf(out, arch, metadata, tensors, cfg.dtype,
                          lambda w: gguf_tokenizer.write_fields(w, fields))
    return {"file": str(out.absolute()), "architecture": arch, "dtype": cfg.dtype,
            "vocab_size": V, "tensors": len(tensors), "bytes": out.stat().st_size,
            "tokenizer": tok.name if tok is not None else None}
