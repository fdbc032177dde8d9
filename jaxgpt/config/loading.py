"""Configs from files and command lines: a Python config file's get_config() or a run's config.json,
`section.key=value` overrides, and validation (types, choices, the rules across fields)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import traceback
from pathlib import Path

from jaxgpt.config import overrides
from jaxgpt.config.overrides import all_keys, apply_overrides
from jaxgpt.config.run import Config
from jaxgpt.errors import ConfigError

__all__ = ["all_keys", "apply_overrides", "from_cli", "from_dict", "load_file", "validate"]



def from_dict(d: dict, root_type: type = Config):
    """A root (default Config) from a (possibly partial) nested dict, e.g. a run's config.json."""
    return overrides.from_dict(d, root_type)


def load_file(path: str | Path) -> Config:
    """Run a Python config file and return its `get_config()` (or read a run's config.json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.suffix == ".json":
        try:
            return from_dict(json.loads(path.read_text()))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    spec = importlib.util.spec_from_file_location(f"_jaxgpt_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path}: a config file must define get_config() -> Config")
        cfg = module.get_config()
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}") from None
    except ConfigError:
        raise
    # the file's own code failed: name its line (the deepest frame in the file)
    except Exception as e:
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
                 if Path(frame.filename).resolve() == path.resolve()]
        where = f"{path}:{lines[-1]}" if lines else str(path)
        raise ConfigError(f"{where}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, "
                          "not a jaxgpt.config.Config")
    return cfg


def lora_checks(cfg: Config) -> list[tuple[bool, str]]:
    t = cfg.train
    return [
        (t.lora_rank >= 0, f"train.lora_rank={t.lora_rank} must be >= 0 (0: no LoRA)"),
        (t.lora_rank > 0 or t.lora_base == "float32",
         f"train.lora_base={t.lora_base} keeps a LoRA run's frozen base: set train.lora_rank"),
        (t.lora_rank == 0 or cfg.optim.name == "adamw",
         f"optim.name={cfg.optim.name}: LoRA adapters train with adamw"),
        (t.lora_group > 0, f"train.lora_group={t.lora_group} must be positive"),
        (t.lora_rank == 0 or bool(t.init_from),
         f"train.lora_rank={t.lora_rank}: LoRA adapts a trained model; set train.init_from"),
        (t.lora_rank == 0 or not (cfg.data.preferences or cfg.grpo.task),
         "train.lora_rank: LoRA trains with the model's own loss (SFT, pretraining); DPO and GRPO "
         "runs train full params"),
    ]


def grpo_checks(cfg: Config) -> list[tuple[bool, str]]:
    g = cfg.grpo
    if not g.task:
        return []
    return [
        (g.group_size >= 2 and cfg.data.batch_size % g.group_size == 0,
         f"data.batch_size={cfg.data.batch_size} must be a multiple of grpo.group_size="
         f"{g.group_size} (at least 2: a prompt's replies are scored against each other)"),
        (not (cfg.data.chat or cfg.data.preferences or cfg.data.path or cfg.data.dir),
         f"grpo.task={g.task}: a GRPO run makes its own data (unset data.path, dir, chat and "
         "preferences)"),
        (g.max_new_tokens > 0, f"grpo.max_new_tokens={g.max_new_tokens} must be positive"),
        (g.clip_eps > 0, f"grpo.clip_eps={g.clip_eps} must be positive"),
        (g.kl_beta >= 0, f"grpo.kl_beta={g.kl_beta} must be >= 0 (0: off)"),
        (g.temperature > 0, f"grpo.temperature={g.temperature} must be positive (it samples)"),
        (0 < g.top_p <= 1, f"grpo.top_p={g.top_p} must be in (0, 1]"),
        (g.val_problems >= 0, f"grpo.val_problems={g.val_problems} must be >= 0"),
    ]


def validate(cfg: Config) -> Config:
    """Check every field's type and choices and the cross-field rules; returns the config with the
    preset's defaults filled in (ModelConfig.resolved)."""
    # type and choice checks, for values set in Python too
    cfg = from_dict(cfg.to_dict(), type(cfg))
    m = cfg.model.resolved()
    checks = [
        (m.d_model % m.n_head == 0,
         f"model.d_model={m.d_model} must be divisible by model.n_head={m.n_head}"),
        (m.n_head % m.n_kv_head == 0,
         f"model.n_head={m.n_head} must be divisible by model.n_kv_head={m.n_kv_head}"),
        (m.loss_chunks >= 0 and m.seq_len % max(m.loss_chunks, 1) == 0,
         f"model.loss_chunks={m.loss_chunks} must be 0 (off) or divide model.seq_len={m.seq_len}"),
        (m.position != "rope" or m.head_dim % 2 == 0, "model: rope needs an even head dimension"),
        (m.rope_factor > 0, f"model.rope_factor={m.rope_factor:g} must be positive"),
        (m.rope_scaling != "llama3" or 0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
         f"model.rope_low_freq_factor={m.rope_low_freq_factor:g} must be positive and below "
         f"model.rope_high_freq_factor={m.rope_high_freq_factor:g}"),
        (m.rope_scaling != "llama3" or m.rope_original_context > 0,
         f"model.rope_original_context={m.rope_original_context} must be positive"),
        (cfg.data.batch_size > 0, "data.batch_size must be positive"),
        (not (cfg.data.path and cfg.data.dir),
         f"data.path={cfg.data.path} and data.dir={cfg.data.dir}: set one (a text file or a "
         "prepared directory)"),
        (cfg.data.batch_size % cfg.optim.grad_accum == 0,
         f"data.batch_size={cfg.data.batch_size} must be divisible by "
         f"optim.grad_accum={cfg.optim.grad_accum}"),
        (cfg.train.steps > 0, "train.steps must be positive"),
        (cfg.train.time_limit_s >= 0,
         f"train.time_limit_s={cfg.train.time_limit_s:g} must be >= 0 (0: no limit)"),
        (not (cfg.data.preferences and cfg.data.chat),
         f"data.preferences={cfg.data.preferences} and data.chat={cfg.data.chat}: a run trains on "
         "one (held-out chats for a preference run go in data.chat_val)"),
        (cfg.dpo.beta > 0, f"dpo.beta={cfg.dpo.beta} must be positive"),
        (0 <= cfg.dpo.label_smoothing < 0.5,
         f"dpo.label_smoothing={cfg.dpo.label_smoothing} must be in [0, 0.5)"),
        *grpo_checks(cfg),
        *lora_checks(cfg),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return dataclasses.replace(cfg, model=m)


def from_cli(path: str | Path, overrides: list[str]) -> Config:
    """What every command line does: load the file, apply overrides, validate."""
    return validate(apply_overrides(load_file(path), overrides))
