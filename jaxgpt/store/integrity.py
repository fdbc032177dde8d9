"""Reading back exactly what was written: a checksum of every array (an integer, the same on any
mesh), the shapes of a saved tree, and reads that turn whatever a damaged directory raises (orbax,
tensorstore, json) into Damaged, with one line saying what failed.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from jaxgpt.errors import CheckpointError


class Damaged(Exception):
    """A step directory that cannot be read back exactly; restore skips it."""


def first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:200]}"


def leaf_path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def leaf_shapes(tree) -> dict:
    return {leaf_path(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def checksum(x: jax.Array) -> jax.Array:
    """Position-weighted sum of the bit patterns mod 2**32: integer, hence the same on any mesh."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):  # the flat index, without reshaping (and so resharding) the array
        index = (index * jnp.uint32(bits.shape[d])
                 + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d))
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def _checks(x) -> tuple[jax.Array, jax.Array]:
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return checksum(x), jnp.bool_(finite)


# One array at a time: compiled per shape and dtype, so a model's layers share their programs (a
# program over a whole state took seconds to compile, anew for every model). Arrays spread over
# several devices go in one program: consecutive programs' all-reduces on XLA:CPU's in-process
# devices could wait on each other.
_leaf_checks = jax.jit(_checks)
_tree_checks = jax.jit(lambda leaves: [_checks(x) for x in leaves])


def checksums_and_finite(tree) -> tuple[dict, bool]:
    """({leaf path: checksum}, whether every float is finite) on the host."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    spread = any(len(x.sharding.device_set) > 1 for _, x in leaves
                 if isinstance(x, jax.Array))
    checks = jax.device_get(_tree_checks([x for _, x in leaves]) if spread
                            else [_leaf_checks(x) for _, x in leaves])
    return ({leaf_path(p): int(s) for (p, _), (s, _) in zip(leaves, checks, strict=True)},
            all(bool(f) for _, f in checks))


def verify_checksums(tree, expected: dict, prefix: str = "") -> None:
    for key, value in checksums_and_finite(tree)[0].items():
        if expected.get(prefix + key) != value:
            raise Damaged(f"checksum mismatch in {prefix + key}")


def guarded_read(what, fn):
    try:
        return fn()
    except (CheckpointError, KeyboardInterrupt):
        raise
    except Exception as e:  # anything orbax / tensorstore / json raise on a damaged directory
        quiet_abandoned_reads()
        raise Damaged(f"cannot read {what}: {first_line(e)}") from e


def quiet_abandoned_reads() -> None:
    """When one array of a restore fails, orbax abandons its sibling reads and closes its event
    loop, and Python reports what is left, later (often at exit) and after the one-line error that
    already said the directory is damaged: each suspended read, closed, as "Exception ignored in:
    <coroutine _read_array_index_and_device_put>" (orbax's `except BaseException` turns the close
    into an Exception), and each of tensorstore's finished reads as "RuntimeError: Event loop is
    closed" from its callback. From the first failed read on, those two are dropped; anything else
    goes on to the hook before."""
    if getattr(sys.unraisablehook, "quiets_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        closed_read = (getattr(unraisable.object, "__name__", "")
                       == "_read_array_index_and_device_put"
                       and isinstance(getattr(error, "__cause__", None), GeneratorExit))
        closed_loop = unraisable.object is None and isinstance(error, RuntimeError) and \
            str(error) == "Event loop is closed"
        if not (closed_read or closed_loop):
            previous(unraisable)
    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook
