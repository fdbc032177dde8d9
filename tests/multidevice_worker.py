"""Run by tests/parallel/test_sharding.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS
set by the caller, before jax is imported). Prints one JSON object per line:

    {"kind": "rules", "mesh": [2, 2, 2], "specs": {param path: mesh axis per dimension}}
    {"kind": "run", "preset": ..., "mesh": [data, fsdp, tensor] or null (one device),
     "losses": [...], "max_param_diff": largest |param - param on one device| after the steps}
    {"kind": "decode", "preset": ..., "mesh": [...], "same_tokens": bool, "max_logit_diff": ...,
     "cache_spec": the KV cache's mesh axes}

    python tests/multidevice_worker.py TEXT_FILE STEPS
"""
import json
import sys

import jax
import numpy as np

from jaxgpt.config import (
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    validate,
)
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding
from jaxgpt.train.trainer import Trainer

# data x fsdp, and all three axes (pure data parallelism is what each of these does on its data
# axis; tests/parallel/test_launch.py trains over processes on both).
# Each mesh costs a compile of ~20 s on 2 cores.
MESHES = [(2, 4, 1), (2, 2, 2)]


def tiny(text_file: str, preset: str, mesh: tuple[int, int, int]) -> Config:
    # n_head and n_kv_head divisible by tensor=2, d_model by fsdp=4, batch by data*fsdp=8.
    # No biases: the key bias's gradient is pure rounding noise (softmax ignores it), which Adam
    # would amplify.
    return validate(Config(
        model=ModelConfig(preset=preset, n_layer=2, n_head=4,
                          n_kv_head=2 if preset == "llama" else 0, d_model=64, seq_len=32,
                          bias=False),
        data=DataConfig(path=text_file, tokenizer="char", batch_size=8, prefetch=1),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        train=TrainConfig(steps=10, seed=7, samples=0, progress=False),
        mesh=MeshConfig(*mesh),
    ))


def run(cfg: Config, devices, steps: int):
    trainer = Trainer(cfg, devices)
    state = trainer.init_state()
    losses = []
    for step in range(steps):
        state, metrics = trainer.step(state, trainer.batch(step))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), trainer


def decode(preset: str, mesh_shape) -> dict:
    """The generation engine on a mesh against one device: 4 prompts of different lengths, greedy
    and sampled, continuous batching over 4 slots (split over data x fsdp, heads over tensor)."""
    cfg = ModelConfig(preset=preset, vocab_size=50, n_layer=2, n_head=4,
                      n_kv_head=2 if preset == "llama" else 0, d_model=64, seq_len=32,
                      bias=False).resolved()
    model = GPT(cfg)
    params = model.init(jax.random.key(5))
    rng = np.random.default_rng(0)
    # lengths within one prefill bucket (generate.MIN_BUCKET):
    # one prefill program per engine to compile
    prompts = [rng.integers(0, 50, n).tolist() for n in (3, 9, 15, 5, 12)]
    settings = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=6 + i)
                for i in range(5)]
    out = {}
    for name, mesh in (("one", None), ("mesh", sharding.make_mesh(MeshConfig(*mesh_shape)))):
        engine = Engine(model, params, slots=4, keep_logits=True, mesh=mesh)
        ids = [i for p, sp in zip(prompts, settings, strict=False) for i in engine.submit(p, sp)]
        while engine.busy:
            engine.step()
        out[name] = [engine.requests[i] for i in ids]
        if mesh is not None:
            spec = engine.state["cache"][0]["k"].sharding.spec
    diff = max(float(np.abs(np.stack(a.logits) - np.stack(b.logits)).max())
               for a, b in zip(out["one"], out["mesh"], strict=False))
    return {"kind": "decode", "preset": preset, "mesh": list(mesh_shape),
            "same_tokens": [r.tokens for r in out["one"]] == [r.tokens for r in out["mesh"]],
            "max_logit_diff": diff,
            "cache_spec": [list(a) if isinstance(a, tuple) else a for a in spec]}


def shakespeare_rules(mesh_shape):
    """Where each param of the Tiny Shakespeare model (gpt2, 73 chars) goes on a 2x2x2 mesh."""
    cfg = ModelConfig(preset="gpt2", vocab_size=73, n_layer=4, n_head=4, d_model=128, seq_len=64,
                      bias=False).resolved()
    model = GPT(cfg)
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape))
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    shardings = sharding.logical_to_mesh(model.logical_axes, shapes, mesh)
    as_json = lambda spec: [list(a) if isinstance(a, tuple) else a for a in spec]  # noqa: E731
    return {jax.tree_util.keystr(p): as_json(s.spec)
            for p, s in jax.tree_util.tree_leaves_with_path(shardings)}


def main():
    text_file, steps = sys.argv[1], int(sys.argv[2])
    assert len(jax.devices()) == 8, jax.devices()
    print(json.dumps({"kind": "rules", "mesh": [2, 2, 2], "specs": shakespeare_rules((2, 2, 2))}),
          flush=True)
    for preset in ("gpt2", "llama"):
        print(json.dumps(decode(preset, (2, 2, 2))), flush=True)
        ref_losses, ref_params, _ = run(tiny(text_file, preset, (-1, 1, 1)), jax.devices()[:1],
                                        steps)
        print(json.dumps({"kind": "run", "preset": preset, "mesh": None, "losses": ref_losses,
                          "max_param_diff": 0.0}), flush=True)
        for mesh in MESHES:
            losses, params, trainer = run(tiny(text_file, preset, mesh), jax.devices(), steps)
            assert tuple(trainer.mesh.shape.values()) == mesh
            diff = max(float(np.abs(a - b).max()) for a, b in
                       zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=False))
            print(json.dumps({"kind": "run", "preset": preset, "mesh": list(mesh), "losses": losses,
                              "max_param_diff": diff}), flush=True)


if __name__ == "__main__":
    main()
