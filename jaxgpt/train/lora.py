"""LoRA and QLoRA runs (train.lora_rank > 0): the adapters are the train state's params; the base
(train.init_from's params, its targeted matrices in int8 / int4 with train.lora_base) is frozen and
read by the same train step beside the state, as DPO's reference is.

    python -m jaxgpt.train experiments/configs/smollm2_sft.py train.init_from=runs/real/base \\
        train.lora_rank=16 [train.lora_alpha=32 train.lora_base=int4 export.lora=separate]

The optimizer state and the checkpoints hold the adapters alone; a resumed run reloads the base
from train.init_from. The run's export merges the adapters into the base's weights (export.lora=
merge: fp32, a whole model) or holds them alone, with the base's location in lora.json (separate;
store/runs.py merges them on loading). The layer math and the pytree functions: model/lora.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxgpt.config import Config
from jaxgpt.model import lora
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding
from jaxgpt.store import export


class LoRA:
    """A run's adapters: their shapes and initial values, the frozen base built from full params,
    the loss over both, and what the run exports."""

    def __init__(self, cfg: Config, model: GPT, abstract_params, params_sharding, mesh):
        t = cfg.train
        self.cfg, self.model, self.mesh = cfg, model, mesh
        self._abstract_params, self._params_sharding = abstract_params, params_sharding
        self.abstract = lora.abstract_adapters(abstract_params, model.logical_axes, t.lora_rank,
                                               t.lora_targets)
        # small next to the base: every device holds them whole
        self.sharding = jax.tree.map(lambda _: sharding.replicated(mesh), self.abstract)
        self.abstract_base = jax.eval_shape(self._base, abstract_params)
        self.base_sharding = self._base_sharding()
        self.combined_sharding = lora.combine(self.base_sharding, self.sharding)

    def init(self, rng) -> dict:
        """Fresh adapters (b zero: the model starts as the base); traced in the state's init."""
        t = self.cfg.train
        return lora.init_adapters(rng, self._abstract_params, self.model.logical_axes,
                                  t.lora_rank, t.lora_targets)

    def _base(self, params) -> dict:
        return lora.frozen_base(params, self.model.logical_axes, self.abstract, self.cfg.train)

    def base(self, params) -> dict:
        """The frozen base from full params, placed on the mesh."""
        return jax.device_put(self._base(params), self.base_sharding)

    def _base_sharding(self):
        """A quantized w_q takes its w's sharding; scales are replicated; the rest as the params."""
        by_path = {lora.path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(
            self._params_sharding)}
        rep = sharding.replicated(self.mesh)

        def place(path, _):
            name = lora.path_name(path)
            return by_path[name[:-2]] if name.endswith("/w_q") else by_path.get(name, rep)
        return jax.tree_util.tree_map_with_path(place, self.abstract_base)

    def wrap(self, loss_fn):
        """loss_fn(params, batch, rng, *rest) as a loss of the adapters, with the base as the first
        frozen argument."""
        def loss(adapters, batch, dropout_rng, base, *rest):
            return loss_fn(lora.combine(base, adapters), batch, dropout_rng, *rest)
        return loss

    def applied(self, adapters, base) -> dict:
        """The tree the model applies: the base (with scales) and the adapters."""
        return lora.combine(base, adapters)

    def merged(self, adapters, base) -> dict:
        """Full fp32 params with the adapters folded in, on the host."""
        return jax.device_get(jax.jit(lora.merge)(base, adapters))

    def note(self) -> dict[str, str]:
        """The file of a separate export that names its base (absolute: loaded from anywhere)."""
        base = str(Path(self.cfg.train.init_from).absolute())
        return {export.LORA_NOTE: json.dumps({"base": base}, indent=2)}
