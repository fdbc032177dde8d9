"""Tests for jaxgpt.config: override parsing, helpful errors, presets, validation, files, round
trips, CLI."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt import config as config_lib
from jaxgpt.config import Config, ModelConfig, apply_overrides, from_dict, load_file, validate
from jaxgpt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "experiments/configs/shakespeare_char.py"
GPT2_124M = REPO / "experiments/configs/gpt2_124m.py"


def override(*items) -> Config:
    return apply_overrides(Config(), list(items))


@pytest.mark.parametrize("item, key, expected", [
    ("model.n_layer=6", "model.n_layer", 6),
    ("model.n_layer=1e3", "model.n_layer", 1000),       # ints may be written in float notation
    ("train.steps=2.0e4", "train.steps", 20000),
    ("model.n_layer= 3 ", "model.n_layer", 3),           # surrounding spaces are ignored
    ("--model.n_layer=5", "model.n_layer", 5),           # so is a leading --
    ("optim.lr=3e-4", "optim.lr", 3e-4),
    ("optim.lr=1", "optim.lr", 1.0),
    ("model.bias=false", "model.bias", False),
    ("model.bias=True", "model.bias", True),
    ("model.bias=1", "model.bias", True),
    ("model.bias=off", "model.bias", False),
    ("model.bias=None", "model.bias", None),             # Optional fields accept None
    ("model.norm=null", "model.norm", None),
    ("model.norm=rmsnorm", "model.norm", "rmsnorm"),
    ("model.qk_norm=yes", "model.qk_norm", True),
    ("sample.prompt=ROMEO: a=b", "sample.prompt", "ROMEO: a=b"),  # only the first = splits
    ("train.out_dir=runs/x", "train.out_dir", "runs/x"),
])
def test_override_parses_by_type(item, key, expected):
    section, name = key.split(".")
    value = getattr(getattr(override(item), section), name)
    assert value == expected and type(value) is type(expected)


def test_overrides_do_not_mutate_the_input():
    cfg = Config()
    out = apply_overrides(cfg, ["model.n_layer=3", "model.n_layer=4"])  # the last one wins
    assert out.model.n_layer == 4 and cfg.model.n_layer == 12


@pytest.mark.parametrize("item, message", [
    ("model.n_layer=abc", "model.n_layer=abc: expected int"),
    ("model.n_layer=1.5", "model.n_layer=1.5: expected int"),
    ("optim.lr=fast", "optim.lr=fast: expected float"),
    ("model.bias=maybe", "model.bias=maybe: expected bool"),
    ("model.qk_norm=none", "model.qk_norm=none: expected bool"),  # not Optional: None is refused
    ("model.n_layer", "override 'model.n_layer': expected key=value, e.g. model.n_layer=6"),
    # choice fields: the allowed values come from the Literal type
    ("model.norm=batchnorm", "model.norm=batchnorm: expected one of layernorm, rmsnorm, none"),
    ("model.mlp=relu", "model.mlp=relu: expected one of gelu, gelu_exact, swiglu, relu2, none"),
    ("model.position=alibi", "model.position=alibi: expected one of learned, rope, none"),
    ("model.dtype=float16", "model.dtype=float16: expected one of float32, bfloat16"),
    ("model.kernels=flash", "model.kernels=flash: expected one of auto, xla, cudnn, cpu"),
    ("optim.schedule=linear", "optim.schedule=linear: expected one of constant, cosine, wsd"),
    ("optim.name=sgd", "optim.name=sgd: expected one of adamw, muon"),
    ("data.sampling=shuffled", "data.sampling=shuffled: expected one of random, sequential"),
    ("eval.split=test", "eval.split=test: expected one of val, train, all"),
])
def test_bad_values_name_the_key(item, message):
    with pytest.raises(ConfigError) as e:
        override(item)
    assert str(e.value) == message


@pytest.mark.parametrize("key, closest", [
    ("model.n_layers", "model.n_layer"),
    ("model.dmodel", "model.d_model"),
    ("train.step", "train.steps"),
    ("optim.warmup", "optim.warmup_steps"),
])
def test_unknown_key_suggests_the_closest(key, closest):
    with pytest.raises(ConfigError) as e:
        override(f"{key}=1")
    message = str(e.value)
    assert message.startswith(f"unknown config key {key!r}; did you mean {closest}")
    assert "\n" not in message


def test_unknown_key_without_neighbours():
    with pytest.raises(ConfigError, match=r"^unknown config key 'zzz'$"):
        override("zzz=1")


def test_presets_resolve_their_defaults():
    gpt2 = ModelConfig(preset="gpt2", d_model=128, n_head=4).resolved()
    assert (gpt2.norm, gpt2.mlp, gpt2.position, gpt2.bias, gpt2.tie_embeddings) == \
        ("layernorm", "gelu", "learned", True, True)
    assert (gpt2.d_ff, gpt2.n_kv_head, gpt2.head_dim) == (512, 4, 32)
    llama = ModelConfig(preset="llama", d_model=128, n_head=4, n_kv_head=2).resolved()
    assert (llama.norm, llama.mlp, llama.position, llama.bias, llama.tie_embeddings) == \
        ("rmsnorm", "swiglu", "rope", False, False)
    assert (llama.d_ff, llama.n_kv_head) == (384, 2)  # 8/3 * 128 = 341.3, up to a multiple of 64
    assert ModelConfig(preset="llama", d_model=768).resolved().d_ff == 2048
    # an explicit field beats the preset
    mixed = ModelConfig(preset="llama", bias=True, position="learned", d_ff=100).resolved()
    assert (mixed.bias, mixed.position, mixed.norm, mixed.d_ff) == (True, "learned", "rmsnorm", 100)


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"^model.preset=mistral: expected one of gpt2, llama$"):
        override("model.preset=mistral")
    with pytest.raises(ConfigError,
                       match=r"^model.preset='mistral': expected one of 'gpt2', 'llama'$"):
        validate(Config(model=ModelConfig(preset="mistral")))  # set in Python: caught by validate


@pytest.mark.parametrize("section, values, message", [
    ("model", {"norm": "batchnorm"},
     "model.norm='batchnorm': expected one of 'layernorm', 'rmsnorm', None"),
    ("optim", {"name": "sgd"}, "optim.name='sgd': expected one of 'adamw', 'muon'"),
    ("model", {"n_layer": 2.5}, "model.n_layer=2.5: expected int"),
    ("model", {"bias": 1}, "model.bias=1: expected bool"),
    ("train", {"seed": True}, "train.seed=True: expected int"),
])
def test_validate_checks_values_set_in_python(section, values, message):
    cfg = Config()
    changed = dataclasses.replace(getattr(cfg, section), **values)
    cfg = dataclasses.replace(cfg, **{section: changed})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == message


def test_configs_are_frozen():
    cfg = validate(Config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.vocab_size = 3
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=2))
    assert validate(changed).model.n_layer == 2


@pytest.mark.parametrize("items, message", [
    (["model.d_model=100", "model.n_head=3"],
     "model.d_model=100 must be divisible by model.n_head=3"),
    (["model.n_head=6", "model.n_kv_head=4", "model.d_model=96"],
     "model.n_head=6 must be divisible by model.n_kv_head=4"),
    (["model.preset=llama", "model.d_model=36", "model.n_head=4"],
     "model: rope needs an even head dimension"),
    (["model.rope_scaling=linear", "model.rope_factor=0"], "model.rope_factor=0 must be positive"),
    (["model.rope_scaling=llama3", "model.rope_low_freq_factor=4"],
     "model.rope_low_freq_factor=4 must be positive and below model.rope_high_freq_factor=4"),
    (["model.rope_scaling=llama3", "model.rope_original_context=0"],
     "model.rope_original_context=0 must be positive"),
    (["data.batch_size=12", "optim.grad_accum=5"],
     "data.batch_size=12 must be divisible by optim.grad_accum=5"),
    (["train.steps=0"], "train.steps must be positive"),
    (["train.time_limit_s=-5"], "train.time_limit_s=-5 must be >= 0 (0: no limit)"),
])
def test_validation_errors(items, message):
    with pytest.raises(ConfigError) as e:
        validate(override(*items))
    assert str(e.value) == message


def test_validate_returns_a_resolved_copy():
    cfg = Config()
    out = validate(cfg)
    assert out.model.norm == "layernorm" and cfg.model.norm is None
    assert validate(out) == out  # idempotent


def test_shakespeare_config_file():
    cfg = load_file(SHAKESPEARE)
    m = cfg.model
    assert ((m.preset, m.n_layer, m.n_head, m.d_model, m.seq_len, m.bias)
            == ("gpt2", 4, 4, 128, 64, None))
    assert (m.init_std, m.residual_init_std) == (0.02, 0.02)
    assert ((cfg.data.path, cfg.data.tokenizer, cfg.data.batch_size)
            == ("data/tinyshakespeare.txt", "char", 12))
    assert ((cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.steps)
            == (1e-3, 1e-4, 100, 2000))
    resolved = validate(cfg)
    assert ((resolved.model.d_ff, resolved.model.bias, resolved.model.tie_embeddings)
            == (512, True, True))
    llama = config_lib.from_cli(SHAKESPEARE, ["model.preset=llama"]).model
    assert (llama.norm, llama.position, llama.bias, llama.d_ff) == ("rmsnorm", "rope", False, 384)


def test_gpt2_124m_config_file():
    cfg = config_lib.from_cli(GPT2_124M, [])
    m = cfg.model
    assert ((m.n_layer, m.n_head, m.d_model, m.seq_len, m.vocab_size, m.dtype)
            == (12, 12, 768, 1024, 50304, "bfloat16"))
    # the head fused with its loss, bf16 logits
    assert (m.loss_chunks, m.logits_dtype) == (8, "bfloat16")
    assert (cfg.data.tokenizer, cfg.data.batch_size, cfg.optim.grad_accum) == ("gpt2", 480, 8)
    assert cfg.data.batch_size * m.seq_len == 491520  # ~0.5M tokens per step


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.py not found"):
        load_file(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError,
                       match=r"bad.py: a config file must define get_config\(\) -> Config"):
        load_file(bad)
    # the file's own mistakes: one line naming the file and the line
    cases = {
        "def get_config(:\n": r"bad.py:1: invalid syntax$",
        "import os\nimport no_such_module_here\n":
            r"bad.py:2: ModuleNotFoundError: No module named 'no_such_module_here'$",
        ("from jaxgpt.config import Config, ModelConfig\n\ndef get_config():\n"
         "    return Config(model=ModelConfig(n_layers=3))\n"):
            r"bad.py:4: TypeError: .*unexpected keyword argument 'n_layers'$",
        "def get_config():\n    return 3\n":
            r"bad.py: get_config\(\) returned int, not a jaxgpt.config.Config$",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_file(bad)
    # a config.json: the file named before what is wrong in it
    bad_json = tmp_path / "config.json"
    bad_json.write_text("[1]")
    with pytest.raises(ConfigError,
                       match=r"config.json: a config is an object of sections, not list$"):
        load_file(bad_json)
    bad_json.write_text('{"model": {"n_layer": "x"}}')
    with pytest.raises(ConfigError, match=r"config.json: model.n_layer='x': expected int$"):
        load_file(bad_json)


def test_json_round_trip(tmp_path):
    cfg = config_lib.from_cli(SHAKESPEARE, ["model.preset=llama", "optim.lr=2e-3",
                                            "model.qk_norm=true"])
    again = from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert load_file(path) == cfg  # a run's config.json loads like a config file
    assert from_dict({"model": {"n_layer": 2}}).model.n_layer == 2  # partial dicts fill defaults


def test_from_dict_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        from_dict({"modle": {}})
    with pytest.raises(ConfigError, match="unknown config key 'model.layers'"):
        from_dict({"model": {"layers": 2}})


def test_a_renamed_key_still_reads_in_old_configs_and_command_lines():
    """model.attention picked every kernel, so it is model.kernels now; what was written with the
    old name (a run's config.json, a command line) sets the new one."""
    old = Config().to_dict()
    old["model"]["attention"] = old["model"].pop("kernels") and "xla"
    assert from_dict(old).model.kernels == "xla"
    assert apply_overrides(Config(), ["model.attention=cpu"]).model.kernels == "cpu"
    assert "model.attention" not in config_lib.all_keys(Config())


def test_all_keys_lists_every_field():
    keys = config_lib.all_keys(Config())
    assert "model.n_layer" in keys and "sample.top_p" in keys and "mesh.tensor" in keys
    assert len(keys) == len(set(keys))


@pytest.mark.slow
def test_cli_unknown_key_is_one_line_without_traceback(run_env):
    command = [sys.executable, "-m", "jaxgpt.train", str(SHAKESPEARE), "model.n_layers=3"]
    proc = subprocess.run(command, capture_output=True, text=True, env=run_env(), cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown config key 'model.n_layers'; "
                               "did you mean model.n_layer")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_help_lists_keys(run_env):
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--help"], capture_output=True,
                          text=True, env=run_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m jaxgpt.train CONFIG.py [key=value ...]")
    assert "  model.n_layer=12  (int)" in proc.stdout
    assert "  model.norm=none  (layernorm | rmsnorm | none)" in proc.stdout
    assert "  model.qk_norm=false  (bool)" in proc.stdout
    assert "  optim.schedule=cosine  (constant | cosine | wsd)" in proc.stdout
