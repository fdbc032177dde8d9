"""Typed run configuration: dataclasses, config files, `key=value` overrides, validation.

A config file is a Python file under `experiments/configs/` that defines `get_config() -> Config`.
Every command line takes such a file and overrides like `model.n_layer=6 optim.lr=3e-4`.
This module must not import jax: it is read before devices are set up.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxgpt.errors import ConfigError

# What each preset means when a model field is left at None.
PRESETS = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False),
}


@dataclass
class ModelConfig:
    preset: str = "gpt2"             # gpt2 | llama: defaults for the None fields below
    vocab_size: int = 0              # 0: the tokenizer's size
    n_layer: int = 12                # N
    n_head: int = 12                 # H
    n_kv_head: int = 0               # K; 0 means K = H (grouped-query attention when K < H)
    d_model: int = 768               # D
    d_ff: int = 0                    # F; 0: 4*D for gelu, about 8/3*D (a multiple of 64) for swiglu
    seq_len: int = 1024              # L: context length of training and the learned position table
    norm: str | None = None          # layernorm | rmsnorm
    mlp: str | None = None           # gelu (tanh form, GPT-2's) | gelu_exact (erf form) | swiglu
    position: str | None = None      # learned | rope
    bias: bool | None = None         # biases in projections and norms
    tie_embeddings: bool | None = None
    rope_theta: float = 10000.0
    qk_norm: bool = False            # RMS-normalise queries and keys per head
    logit_softcap: float = 0.0       # 0: off; else logits = c * tanh(logits / c)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02           # normal init of the matrices and embedding tables
    residual_init_std: float = 0.0   # the blocks' output projections; 0: init_std / sqrt(2N) (GPT-2's scaling)
    dtype: str = "float32"           # compute dtype: float32 | bfloat16 (params, softmax, loss stay fp32)
    remat: bool = False              # recompute each block in the backward pass
    scan_layers: bool = False        # lax.scan over blocks: fast compiles for deep models

    def resolved(self) -> "ModelConfig":
        """The same config with every preset-dependent field made concrete."""
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r}: expected one of {sorted(PRESETS)}")
        filled = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **filled)
        if out.n_kv_head == 0:
            out = dataclasses.replace(out, n_kv_head=out.n_head)
        if out.d_ff == 0:
            d_ff = 64 * -(-(8 * out.d_model // 3) // 64) if out.mlp == "swiglu" else 4 * out.d_model
            out = dataclasses.replace(out, d_ff=d_ff)
        return out

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class DataConfig:
    path: str = ""                   # a text file (tokenized on first use into a cache beside it)
    dir: str = ""                    # or a prepared data directory (python -m jaxgpt.data prepare)
    tokenizer: str = "char"          # char | byte | gpt2 | cl100k_base | o200k_base | path.tiktoken
    chat: str = ""                   # conversations for supervised fine-tuning (loss on assistant tokens):
                                     # chitchat | chatterbot[:LANG] | jsonl:PATH | sharegpt:PATH
    chat_val: str = ""               # held-out conversations (same forms); empty: data.val_fraction of data.chat
    val_dir: str = ""                # a prepared directory whose tokens are the validation set (its train split)
    chat_windows: bool = True        # cut long conversations into windows of whole exchanges (else keep the end)
    val_fraction: float = 0.1        # the last fraction of a text file is the validation split
    batch_size: int = 12             # B: global batch, in sequences
    sampling: str = "random"         # random windows | sequential (packed, in order)
    prefetch: int = 2                # batches prepared ahead in a background thread
    segments: bool = False           # segment ids restart after each end-of-text token: packed documents
                                     # do not attend to each other (false: all ones, as nanoGPT)
    verify: bool = True              # check shard sha256 checksums when loading data.dir


@dataclass
class OptimConfig:
    name: str = "adamw"              # adamw | muon (Muon on 2-D matrices, AdamW on the rest)
    lr: float = 6e-4
    min_lr: float = 6e-5             # the schedule's floor
    schedule: str = "cosine"         # constant | cosine (linear warmup, cosine decay) | wsd
    warmup_steps: int = 100
    decay_steps: int = 0             # 0: until train.steps
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False   # weight decay on embedding tables too
    clip_norm: float = 1.0           # 0: no clipping
    grad_accum: int = 1              # micro-batches per step; data.batch_size is split among them
    muon_lr: float = 0.02
    muon_momentum: float = 0.95


@dataclass
class TrainConfig:
    steps: int = 5000
    seed: int = 1337
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 500            # 0: only at the end
    eval_max_tokens: int = 0         # 0: the whole validation split
    max_nonfinite: int = 5           # stop after this many non-finite losses in a row
    samples: int = 2                 # samples printed at the end of the run
    sample_tokens: int = 200
    progress: bool = True            # tqdm progress bar
    init_from: str = ""              # a run directory or export to take params from (fine-tuning)
    resume: str = "auto"             # auto | none | PATH (checkpoints)
    overwrite: bool = False          # with resume=none (or an older resume=PATH): replace existing checkpoints


@dataclass
class MeshConfig:
    data: int = -1                   # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclass
class CheckpointConfig:
    every: int = 0                   # 0: only at the end
    keep: int = 3
    keep_best: bool = False
    async_save: bool = True


@dataclass
class EvalConfig:
    split: str = "val"
    stride: int = 0                  # 0: seq_len (non-overlapping windows); less gives each token more context
    batch_size: int = 0              # 0: data.batch_size
    max_tokens: int = 0              # 0: every token of the split


@dataclass
class SampleConfig:
    prompt: str = "\n"
    max_new_tokens: int = 200
    num_samples: int = 1
    temperature: float = 0.8
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1.0: off
    seed: int = 0
    chat: bool = False               # the prompt is a user message: reply as the assistant (chat template)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def all_keys(cfg: Config) -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, s.name))]


def _parse(text: str, annotation: Any, key: str) -> Any:
    """Parse an override's text by the field's type annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            value = float(text)
            if value != int(value):
                raise ValueError
            return int(value)
        if annotation is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{key}={text}: expected {annotation.__name__}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of `cfg` with `section.key=value` overrides applied; unknown keys fail at once."""
    cfg = from_dict(cfg.to_dict())
    keys = all_keys(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.n_layer=6")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        section_name, name = key.split(".")
        section = getattr(cfg, section_name)
        hints = typing.get_type_hints(type(section))
        setattr(section, name, _parse(text.strip(), hints[name], key))
    return cfg


def from_dict(d: dict) -> Config:
    """Build a Config from a (possibly partial) nested dict, e.g. a run's config.json."""
    cfg = Config()
    for section_name, values in d.items():
        if not hasattr(cfg, section_name):
            raise ConfigError(f"unknown config section {section_name!r}")
        section = getattr(cfg, section_name)
        names = {f.name for f in dataclasses.fields(section)}
        for name, value in values.items():
            if name not in names:
                raise ConfigError(f"unknown config key {section_name}.{name!r}")
            setattr(section, name, value)
    return cfg


def load_file(path: str | Path) -> Config:
    """Run a Python config file and return its `get_config()`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.suffix == ".json":
        return from_dict(json.loads(path.read_text()))
    spec = importlib.util.spec_from_file_location(f"_jaxgpt_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config() -> Config")
    return module.get_config()


def validate(cfg: Config) -> Config:
    """Fill preset defaults and check cross-field rules; returns the resolved config."""
    m = cfg.model.resolved()
    checks = [
        (m.d_model % m.n_head == 0, f"model.d_model={m.d_model} must be divisible by model.n_head={m.n_head}"),
        (m.n_head % m.n_kv_head == 0, f"model.n_head={m.n_head} must be divisible by model.n_kv_head={m.n_kv_head}"),
        (m.norm in ("layernorm", "rmsnorm"), f"model.norm={m.norm!r}: expected layernorm or rmsnorm"),
        (m.mlp in ("gelu", "gelu_exact", "swiglu"), f"model.mlp={m.mlp!r}: expected gelu, gelu_exact or swiglu"),
        (m.position in ("learned", "rope"), f"model.position={m.position!r}: expected learned or rope"),
        (m.position != "rope" or m.head_dim % 2 == 0, "model: rope needs an even head dimension"),
        (m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: expected float32 or bfloat16"),
        (cfg.optim.schedule in ("constant", "cosine", "wsd"),
         f"optim.schedule={cfg.optim.schedule!r}: expected constant, cosine or wsd"),
        (cfg.optim.name in ("adamw", "muon"), f"optim.name={cfg.optim.name!r}: expected adamw or muon"),
        (cfg.data.batch_size % cfg.optim.grad_accum == 0,
         f"data.batch_size={cfg.data.batch_size} must be divisible by optim.grad_accum={cfg.optim.grad_accum}"),
        (cfg.data.sampling in ("random", "sequential"),
         f"data.sampling={cfg.data.sampling!r}: expected random or sequential"),
        (cfg.train.steps > 0, "train.steps must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    cfg = from_dict(cfg.to_dict())
    cfg.model = m
    return cfg


def from_cli(path: str | Path, overrides: list[str]) -> Config:
    """What every command line does: load the file, apply overrides, validate."""
    return validate(apply_overrides(load_file(path), overrides))
