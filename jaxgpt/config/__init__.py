"""Typed configuration: frozen dataclasses for a run (run.py) and for each tool (commands.py),
config files, `key=value` overrides (overrides.py) and validation (loading.py).

A config file is a Python file under `experiments/configs/` that defines `get_config() -> Config`
(or a run's `config.json`). Every command line takes such a file (or a run) and overrides like
`model.n_layer=6 optim.lr=3e-4`. Configs are immutable: change one with `dataclasses.replace` (or
`apply_overrides`). This package must not import jax: it is read before devices are set up.
"""
from jaxgpt.config.commands import (
    BenchCommand,
    BenchConfig,
    BpeConfig,
    ChatCommand,
    ChatConvertConfig,
    EncodeConfig,
    FromGgufConfig,
    FromHfConfig,
    HfCommand,
    PrepareCommand,
    PrepareConfig,
    RenderConfig,
    ToGgufConfig,
    ToHfConfig,
    TokenizerCommand,
)
from jaxgpt.config.loading import (
    all_keys,
    apply_overrides,
    from_cli,
    from_dict,
    load_file,
    validate,
)
from jaxgpt.config.run import (
    PRESETS,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    DpoConfig,
    EvalConfig,
    ExportConfig,
    GrpoConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    ScreenConfig,
    TrainConfig,
)

__all__ = [
    "BenchCommand", "BenchConfig", "BpeConfig", "ChatCommand", "ChatConvertConfig",
    "CheckpointConfig", "Config", "DataConfig", "DistributedConfig", "DpoConfig", "EncodeConfig",
    "EvalConfig", "ExportConfig", "FromGgufConfig", "FromHfConfig", "GrpoConfig", "HfCommand",
    "MeshConfig", "ModelConfig", "OptimConfig", "PRESETS", "PrepareCommand", "PrepareConfig",
    "RenderConfig", "SampleConfig", "ScreenConfig", "ToGgufConfig", "ToHfConfig",
    "TokenizerCommand", "TrainConfig",
    "all_keys", "apply_overrides", "from_cli", "from_dict", "load_file", "validate",
]
