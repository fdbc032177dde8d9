"""The one place that maps logical axis names onto the device mesh.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with params and
optimizer state sharded over it) and `tensor` (Megatron-style splitting of heads and MLP width).
Model code names axes logically ("embed", "mlp", ...); RULES below decides where each goes.
"""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import MeshConfig
from jaxgpt.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None for replicated)
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the one axis that may be -1 to use all remaining devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices are not divisible by the fixed axes' "
                              f"product {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                          f"{n_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if cfg.devices:
        if cfg.devices > len(devices):
            raise ConfigError(f"mesh.devices={cfg.devices} but there are {len(devices)} "
                              f"{devices[0].platform} devices (to plan for more on a CPU host: "
                              "python -m jaxgpt.bench compile)")
        devices = devices[:cfg.devices]
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: XLA propagates shardings from the params, batch and the logical constraints.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def data_shards(mesh: Mesh) -> int:
    """How many ways the batch's rows split: the data-parallel devices, data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def padded(batch: dict, mesh: Mesh) -> dict:
    """A host batch with empty rows (segment 0, no loss) appended so that it splits over the mesh's
    data-parallel devices."""
    pad = -len(batch["inputs"]) % data_shards(mesh)
    return batch if not pad else {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                                  for k, v in batch.items()}


def check_batch(mesh: Mesh, batch_size: int, grad_accum: int = 1) -> None:
    """The global batch, and each micro-batch of it, must split evenly over the data-parallel
    devices (data x fsdp): every device computes its share of every micro-batch."""
    shards = data_shards(mesh)
    if batch_size % shards:
        raise ConfigError(f"data.batch_size={batch_size} does not split over the mesh's {shards} "
                          f"data-parallel devices (mesh.data={mesh.shape['data']} x "
                          f"mesh.fsdp={mesh.shape['fsdp']}); use a multiple of {shards}")
    if (batch_size // grad_accum) % shards:
        fits = [a for a in range(1, batch_size // shards + 1) if batch_size % (a * shards) == 0]
        raise ConfigError(f"data.batch_size={batch_size} / optim.grad_accum={grad_accum} = "
                          f"{batch_size // grad_accum} rows per micro-batch do not split over the "
                          f"mesh's {shards} data-parallel devices; optim.grad_accum that do: "
                          f"{', '.join(map(str, fits))}")


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide, so odd sizes replicate instead of
    failing."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size > 1 and dim % size == 0 else None)
    return P(*out)


def logical_to_mesh(logical_specs, shapes, mesh: Mesh):
    """NamedShardings for a pytree of logical PartitionSpecs and the matching shapes."""
    mesh_specs = nn.logical_to_mesh(logical_specs, RULES)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, np.shape(x), mesh)),
                        mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def placed(shapes, shardings):
    """A tree of shapes and dtypes, each leaf with the sharding to place it by: what jit lowers for
    a mesh ahead of time, and what a checkpoint is restored onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, L] arrays: batch split over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def on_mesh(mesh: Mesh):
    """Trace and compile under this mesh and these rules, so logical constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def batch_blocks(mesh: Mesh) -> tuple[list[int], int]:
    """(blocks, n): cut the global batch into n equal blocks of rows (one per data-parallel shard,
    data x fsdp); this process's devices hold `blocks` (ascending), the only rows it loads
    (data.batch_at(step, i, n) for each). jax.make_mesh lays processes out in order, so a process's
    shards are contiguous and merge into one larger block; a process shares its block with others
    when the batch is replicated over mesh axes that span processes (tensor across hosts)."""
    n = data_shards(mesh)
    index = batch_sharding(mesh).addressable_devices_indices_map((n, 1))
    held = sorted({rows.start or 0 for rows, _ in index.values()})
    size = len(held)
    if held == list(range(held[0], held[0] + size)) and held[0] % size == 0 and n % size == 0:
        return [held[0] // size], n // size
    return held, n


def put_batch(batch: dict, mesh: Mesh, local_rows: bool = False) -> dict:
    """Place a host batch (numpy) onto the mesh: the whole global batch, or with `local_rows` only
    this process's rows (its `batch_blocks`, concatenated in order). Either way each process copies
    only what its own devices hold; nothing moves between hosts."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    if local_rows:
        blocks, n = batch_blocks(mesh)
        return {k: jax.make_array_from_process_local_data(sharding, v,
                                                          (n * len(v) // len(blocks), *v.shape[1:]))
                for k, v in batch.items()}
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def to_host(tree):
    """A pytree of (possibly sharded) arrays as numpy on this host. With several processes every one
    must call it: the shards other hosts hold are gathered (an all-gather over the mesh)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    # tiled: each array whole, not stacked
    return multihost_utils.process_allgather(tree, tiled=True)
