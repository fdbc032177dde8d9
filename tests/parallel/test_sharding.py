"""Tests for jaxgpt.sharding: mesh shapes, the rules table, and the same training on 1 and 8
devices."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import subprocess_env
from jax.sharding import PartitionSpec as P

from jaxgpt.config import MeshConfig
from jaxgpt.errors import ConfigError
from jaxgpt.parallel import sharding

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mesh, n, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 1), 8, (2, 4, 1)),
    ((2, 2, -1), 8, (2, 2, 2)),
    ((-1, 2, 2), 4, (1, 2, 2)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((-1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape(mesh, n, expected):
    assert sharding.mesh_shape(MeshConfig(*mesh), n) == expected


@pytest.mark.parametrize("mesh, n, message", [
    ((-1, -1, 1), 8, "mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
    ((-1, 3, 1), 8, "mesh: 8 devices are not divisible by the fixed axes' product 3"),
    ((2, 2, 1), 8, "mesh: data*fsdp*tensor = 4 but there are 8 devices"),
    ((4, 4, 1), 8, "mesh: data*fsdp*tensor = 16 but there are 8 devices"),
])
def test_mesh_shape_errors(mesh, n, message):
    with pytest.raises(ConfigError) as e:
        sharding.mesh_shape(MeshConfig(*mesh), n)
    assert str(e.value) == message


def test_one_device_mesh_replicates_everything():
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    specs = sharding.logical_to_mesh({"w": P("embed", "mlp")},
                                     {"w": jax.ShapeDtypeStruct((4, 6), "float32")}, mesh)
    assert specs["w"].spec == P(None, None)  # size-1 axes are dropped: nothing to split


def test_rules_cover_every_logical_name():
    names = [name for name, _ in sharding.RULES]
    assert len(names) == len(set(names))
    assert set(names) >= {"batch", "length", "embed", "vocab", "mlp", "heads", "kv_heads",
                          "head_dim", "norm", "layers"}
    for _, axes in sharding.RULES:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            assert axis in sharding.MESH_AXES


@pytest.fixture(scope="module")
def eight_devices(text_file, token_cache):
    """Run tests/multidevice_worker.py once with 8 simulated CPU devices; its JSON lines, parsed."""
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(REPO / "tests/multidevice_worker.py"),
                           str(text_file), "5"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_shakespeare_model_rules_on_2x2x2(eight_devices):
    """Where the Tiny Shakespeare model's params live: matrices over fsdp x tensor, norms
    replicated."""
    (rules,) = [r for r in eight_devices if r["kind"] == "rules"]
    specs = rules["specs"]
    assert specs["['wte']"] == [None, "fsdp"]  # 73 rows do not split over tensor=2: replicated
    assert specs["['wpe']"] == [None, "fsdp"]
    assert specs["['norm_out']['scale']"] == [None]
    for i in range(4):
        block = f"['block_{i}']"
        assert specs[f"{block}['attn']['wq']['w']"] == ["fsdp", "tensor", None]
        assert specs[f"{block}['attn']['wo']['w']"] == ["tensor", None, "fsdp"]
        assert specs[f"{block}['mlp']['w_up']['w']"] == ["fsdp", "tensor"]
        assert specs[f"{block}['mlp']['w_down']['w']"] == ["tensor", "fsdp"]
        assert specs[f"{block}['norm_attn']['scale']"] == [None]
    # the key/value projections (however packed) split embed over fsdp and kv heads over tensor
    kv = [v for k, v in specs.items()
          if "['attn']" in k and not any(n in k for n in ("['wq']", "['wo']"))]
    assert kv and all(v[0] == "fsdp" and "tensor" in v for v in kv)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_same_training_on_1_and_8_devices(eight_devices, preset):
    """5 fp32 train steps: data, fsdp and tensor parallel meshes give the one-device losses and
    params."""
    runs = {None if r["mesh"] is None else tuple(r["mesh"]): r for r in eight_devices
            if r["kind"] == "run" and r["preset"] == preset}
    assert set(runs) == {None, (2, 4, 1), (2, 2, 2)}
    reference = runs[None]["losses"]
    assert len(reference) == 5 and reference[-1] < reference[0]  # it trains
    for mesh in [(2, 4, 1), (2, 2, 2)]:
        assert runs[mesh]["losses"] == pytest.approx(reference, abs=1e-5), mesh
        assert runs[mesh]["max_param_diff"] < 1e-5, mesh


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_decoding_on_a_mesh_equals_one_device(eight_devices, preset):
    """The generation engine with its KV cache split over slots (data) and kv heads (tensor)."""
    (r,) = [r for r in eight_devices if r["kind"] == "decode" and r["preset"] == preset]
    assert r["same_tokens"] and r["max_logit_diff"] < 1e-5
    assert r["cache_spec"][:2] == [["data", "fsdp"], "tensor"] and not any(r["cache_spec"][2:])
