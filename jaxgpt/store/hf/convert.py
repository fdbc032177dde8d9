"""The two commands of `python -m jaxgpt.convert`: a Hugging Face model in, a jaxgpt model out.

    python -m jaxgpt.convert from-hf DIR_OR_HUB_NAME OUT [from_hf.tokenizer=SPEC from_hf.seq_len=N]
    python -m jaxgpt.convert to-hf RUN_OR_EXPORT DIR [to_hf.dtype=bfloat16 to_hf.max_shard_mb=N]

from-hf reads config.json and model.safetensors (or the shards of model.safetensors.index.json) of
a GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM (config.py) into a jaxgpt export, which all
that takes a run takes (evaluate, sample, talk, serve, train.init_from). The export keeps the
model's own config, tokenizer and generation files under hf/, so that to-hf carries over what
jaxgpt does not model (bos/eos ids, chat template), and converted.json.

Where the tokenizer passes vocab_size, wte (and lm_head) gain rows (weights.pad_vocab); to-hf of
that export drops them again (the tensors come back bit for bit); once trained (the export of a
train.init_from run) they are kept, and their tokens added to tokenizer.json. Without tokenizer
files the export is marked NO_TOKENIZER: its params load (runs.load(need_tokenizer=False), to-hf),
and what needs a tokenizer says how to add one.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import files
from jaxgpt.config import Config, FromHfConfig, ToHfConfig
from jaxgpt.store import export, runs
from jaxgpt.store.hf.config import (
    ConvertError,
    architecture,
    hf_architecture,
    hf_config,
    model_config,
    require,
)
from jaxgpt.store.hf.tokenizer import tokenizer_for, write_tokenizer
from jaxgpt.store.hf.weights import (
    Weights,
    flatten,
    nest,
    pad_vocab,
    params_from_hf,
    params_to_hf,
    without_padding,
    write_safetensors,
)

# the model's own files an export keeps under hf/ (and to-hf writes back)
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
            "chat_template.jinja")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def local_dir(source: str, revision: str = "") -> Path:
    """The directory `source` is, or a hub name's snapshot (huggingface_hub, with network)."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConvertError(f"{source}: not a model directory")
    hub = require("huggingface_hub")
    try:
        return Path(hub.snapshot_download(source, revision=revision or None, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line either way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConvertError(f"{source}: no such directory, and the hub download failed "
                           f"({type(e).__name__}: {reason})") from None


def check_out(out: Path, source: Path, ours: bool, hint: str = "") -> None:
    """Never write over the input, nor into a file or a directory with other things in it."""
    if out.exists() and out.resolve() == source.resolve():
        raise ConvertError(f"{out}: the output directory must not be the input")
    if out.is_file():
        raise ConvertError(f"{out}: is a file; give a new directory{hint}")
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise ConvertError(f"{out}: exists and is not empty; give a new directory{hint}")


def from_hf(source: str, out: str | Path, cfg: FromHfConfig = FromHfConfig()) -> dict:
    """A HF model (directory or hub name) written as a jaxgpt export at `out`; returns the summary
    the command prints."""
    directory, out = local_dir(source, cfg.revision), Path(out)
    check_out(out, directory, ours=(out / "params").is_dir() and (out / "config.json").is_file())
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{config_path}: not found (a Hugging Face model directory has one)")
    hf = files.read_json(config_path)
    arch = architecture(hf, config_path)
    m = model_config(arch, hf, config_path, cfg.seq_len).resolved()
    tok = tokenizer_for(directory, hf, cfg.tokenizer, f"hf:{source}")
    weights = Weights(directory)
    flat = params_from_hf(weights, arch, m)
    # HF ignores a tied copy of the head too
    weights.check_all_taken(arch, ("lm_head.weight",) if m.tie_embeddings else ())
    V = max(m.vocab_size, tok.n_vocab if tok is not None else 0)
    flat = pad_vocab(flat, V) if V > m.vocab_size else flat
    run_cfg = config_lib.validate(Config(model=dataclasses.replace(m, vocab_size=V)))
    converted = {"source": source, "architecture": arch, "hf_vocab_size": m.vocab_size,
                 "vocab_size": V, "tokenizer": tok.name if tok is not None else None,
                 "chat_format": tok.chat_format if tok is not None else None}
    extra = {f"hf/{name}": (directory / name).read_bytes() for name in HF_FILES
             if (directory / name).is_file()}
    extra["converted.json"] = json.dumps(converted, indent=1) + "\n"
    if tok is None:
        extra[runs.NO_TOKENIZER] = ("converted from Hugging Face without tokenizer files "
                                    "(see jaxgpt/convert.py)\n")
    export.export(out, run_cfg, nest(flat), tok, extra)
    return {"export": str(out.absolute()), **converted,
            "params": int(sum(x.size for x in flat.values()))}


def to_hf(source: str, out: str | Path, cfg: ToHfConfig = ToHfConfig()) -> dict:
    """A jaxgpt run or export written as a directory transformers loads; returns the summary."""
    # an export that keeps a GGUF's quantized blocks is written from their fp32 values
    loaded = runs.load(source, ["model.weights=float"], need_tokenizer=False)
    m, tok, out = loaded.cfg.model, loaded.tokenizer, Path(out)
    arch = hf_architecture(m)
    check_out(out, Path(source), ours=cfg.overwrite, hint=" (or to_hf.overwrite=true)")
    origin = Path(loaded.where) if loaded.step is None else None  # an export: what from-hf kept
    kept = {name: origin / "hf" / name for name in HF_FILES
            if origin and (origin / "hf" / name).is_file()}
    base = files.read_json(kept.pop("config.json")) if "config.json" in kept else None
    converted = {}
    if origin and (origin / "converted.json").is_file():
        converted = files.read_json(origin / "converted.json")
    flat, V = without_padding(flatten(jax.device_get(loaded.params)), converted)
    own = (base or {}).get("dtype") or (base or {}).get("torch_dtype")
    dtype = cfg.dtype if cfg.dtype != "auto" else own if own in DTYPES else "float32"
    tensors = {name: np.ascontiguousarray(x.astype(DTYPES[dtype]))
               for name, x in params_to_hf(flat, arch, m).items()}
    out.mkdir(parents=True, exist_ok=True)
    written = write_safetensors(tensors, out, cfg.max_shard_mb)
    files.write_json(out / "config.json", hf_config(arch, m, V, base, tok, dtype))
    tokenizer = write_tokenizer(out, tok, kept, V, m.seq_len)
    for name, path in kept.items():  # the model's other files, as they came
        if name != "tokenizer.json":  # written above, with the specials a trained model kept
            files.atomic_write(out / name, path.read_bytes())
    return {"dir": str(out.absolute()), "architecture": arch, "vocab_size": V, "dtype": dtype,
            "files": written, "tokenizer": tokenizer}
