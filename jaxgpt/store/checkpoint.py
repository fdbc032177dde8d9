"""Checkpoints with orbax: exact resume and restore onto any mesh (the params-only exports are export.py's).

A run keeps `checkpoints/<step>/` under `train.out_dir`, each with two orbax items: `state` (params,
optimizer state, step, rng key data, the non-finite counter) and `meta` (JSON: the resolved config,
the data position and a checksum of every array). Saves are asynchronous: orbax copies the arrays to
host memory, then a background thread writes them into a temporary directory that is renamed when
complete, so a kill at any moment leaves only complete step directories; the checksums catch one
damaged afterwards. Batches are a pure function of (seed, step), so the step is the data position.

Resume (`train.resume`): `auto` takes the newest complete checkpoint of this run; `PATH` a run,
checkpoints or step directory; `none` starts fresh and refuses to overwrite checkpoints unless
`train.overwrite=true`.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxgpt import config as config_lib
from jaxgpt.parallel import launch
from jaxgpt.parallel import sharding
from jaxgpt.errors import CheckpointError, ConfigError, JaxgptError
from jaxgpt.model.gpt import GPT

# TrainState objects always come from the trainer (`python -m jaxgpt.train` runs that module as
# __main__, whose TrainState is a different class from jaxgpt.train.trainer.TrainState).

FORMAT = 1
# Model fields that decide parameter shapes (seq_len too, when positions are a learned table).
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "norm", "mlp", "position",
                "bias", "tie_embeddings", "qk_norm", "scan_layers")


class Interrupted(JaxgptError):
    """Training stopped on SIGTERM / SIGINT after saving; `signum` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Damaged(Exception):
    """A step directory that cannot be read back exactly; restore skips it."""


def warn(message: str) -> None:
    print(f"checkpoint: {message}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:200]}"


# ---- the saved pytree, its checksums and its shapes ------------------------------------------

def state_tree(state) -> dict:
    """What is saved: a TrainState with the typed rng key as its raw key data."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(state.rng), "nonfinite_run": state.nonfinite_run}


def params_target(model: GPT, shardings=None):
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharding.placed(abstract, shardings if shardings is not None else jax.tree.map(lambda _: one, abstract))


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _shapes(tree) -> dict:
    return {_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _checksum(x: jax.Array) -> jax.Array:
    """Position-weighted sum of the bit patterns mod 2**32: integer, hence the same on any mesh."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):  # the flat index, without reshaping (and so resharding) the array
        index = index * jnp.uint32(bits.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums_and_finite(tree):
    """(a checksum per leaf, whether every float leaf is finite), in one pass over the state."""
    leaves = jax.tree.leaves(tree)
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return [_checksum(x) for x in leaves], jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


def checksums_and_finite(tree) -> tuple[dict, bool]:
    """({leaf path: checksum}, whether every float is finite) on the host."""
    sums, finite = jax.device_get(_checksums_and_finite(tree))
    return {_path(p): int(s) for (p, _), s in zip(jax.tree_util.tree_leaves_with_path(tree), sums)}, bool(finite)


def _verify(tree, expected: dict, prefix: str = "") -> None:
    for key, value in checksums_and_finite(tree)[0].items():
        if expected.get(prefix + key) != value:
            raise Damaged(f"checksum mismatch in {prefix + key}")


# ---- compatibility checks: run before any array is read --------------------------------------

def check_model(saved: dict, cfg: config_lib.Config, where: Path, hint: str) -> None:
    """A clear error naming the first model field whose value changes parameter shapes."""
    fields = SHAPE_FIELDS + (("seq_len",) if cfg.model.position == "learned" else ())
    for name in fields:
        mine, theirs = getattr(cfg.model, name), saved["model"].get(name)
        if mine != theirs:
            raise CheckpointError(f"{where}: model.{name}={theirs!r} in the checkpoint but model.{name}={mine!r} "
                                  f"in the config; {hint}")


def _check_tree(stored: dict, target: dict, saved: dict, cfg: config_lib.Config, where: Path) -> None:
    have, want = _shapes(stored), _shapes(target)
    for key in sorted(have.keys() | want.keys()):
        if have.get(key) != want.get(key):
            if key.startswith("opt_state"):
                raise CheckpointError(
                    f"{where}: the optimizer state does not match (optim.name={saved['optim']['name']} in the "
                    f"checkpoint, {cfg.optim.name} in the config; {key} is {have.get(key)} vs {want.get(key)}); "
                    f"to change the optimizer start a new run with train.init_from={where.parent.parent}")
            raise CheckpointError(f"{where}: {key} is {have.get(key)} in the checkpoint but {want.get(key)} "
                                  f"for the config")


# ---- reading step directories ----------------------------------------------------------------

def _read(what, fn):
    try:
        return fn()
    except (CheckpointError, KeyboardInterrupt):
        raise
    except Exception as e:  # anything orbax / tensorstore / json raise on a damaged directory
        _quiet_abandoned_reads()
        raise Damaged(f"cannot read {what}: {_first_line(e)}") from e


def _quiet_abandoned_reads() -> None:
    """When one array of a restore fails, orbax abandons its sibling reads and closes its event loop,
    and Python reports what is left, later (often at exit) and after the one-line error that already
    said the directory is damaged: each suspended read, closed, as "Exception ignored in: <coroutine
    _read_array_index_and_device_put>" (orbax's `except BaseException` turns the close into an
    Exception), and each of tensorstore's finished reads as "RuntimeError: Event loop is closed" from
    its callback. From the first failed read on, those two are dropped; anything else goes on to the
    hook before."""
    if getattr(sys.unraisablehook, "quiets_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        closed_read = (getattr(unraisable.object, "__name__", "") == "_read_array_index_and_device_put"
                       and isinstance(getattr(error, "__cause__", None), GeneratorExit))
        closed_loop = unraisable.object is None and isinstance(error, RuntimeError) and \
            str(error) == "Event loop is closed"
        if not (closed_read or closed_loop):
            previous(unraisable)
    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook


def read_meta(step_dir: Path) -> dict:
    return _read("meta", lambda: ocp.JsonCheckpointHandler().restore(step_dir / "meta"))


def restore_step(step_dir: Path, trainer):
    """The TrainState saved in `step_dir`, placed by the trainer's shardings (any mesh)."""
    meta = read_meta(step_dir)
    check_model(meta["config"], trainer.cfg, step_dir,
                "use the checkpoint's value, or a new train.out_dir for a different model")
    abstract, s = trainer.abstract_state(), trainer.state_sharding
    target = sharding.placed(jax.eval_shape(state_tree, abstract), {"params": s.params, "opt_state": s.opt_state,
                     "step": s.step, "rng": s.rng, "nonfinite_run": s.nonfinite_run})
    stored = _read("state metadata", lambda: ocp.StandardCheckpointHandler().metadata(step_dir / "state").tree)
    _check_tree(stored, target, meta["config"], trainer.cfg, step_dir)
    tree = _read("state", lambda: ocp.StandardCheckpointer().restore(step_dir / "state", target))
    _verify(tree, meta["checksums"])
    return abstract.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"],
                            rng=jax.random.wrap_key_data(tree["rng"], impl=meta["rng_impl"]),
                            nonfinite_run=tree["nonfinite_run"])


def restore_params(step_dir: Path, cfg: config_lib.Config, model: GPT, shardings=None) -> tuple[dict, dict]:
    """Only the params of a checkpoint (the optimizer state is never read), on one device unless
    `shardings` are given: (params, meta)."""
    meta = read_meta(step_dir)
    check_model(meta["config"], cfg, step_dir, "params can only be loaded into the same model shape")
    target = {"params": params_target(model, shardings)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    tree = _read("params", lambda: ocp.PyTreeCheckpointer().restore(step_dir / "state", args=args))
    _verify(tree["params"], meta["checksums"], prefix="params/")
    return tree["params"], meta


EXPORT_CHECKSUMS = "checksums.json"  # beside an export's params/: {leaf path: checksum}


def read_export_params(export_dir: Path, model: GPT, shardings=None) -> dict:
    """An export's params (export.py), placed by `shardings` (one device when None): each leaf's shape
    checked against the model's before any is read, each leaf's checksum after (an export written
    before exports carried checksums is read unchecked). A damaged export raises Damaged."""
    target = params_target(model, shardings)
    stored = _read("params metadata", lambda: ocp.StandardCheckpointer().metadata(export_dir / "params"))
    have, want = _shapes(getattr(stored, "item_metadata", stored)), _shapes(target)
    for key in sorted(have.keys() | want.keys()):  # the paths the checksums name too
        if have.get(key) != want.get(key):
            raise CheckpointError(f"{export_dir}: param {key} is {have.get(key)} in the checkpoint but "
                                  f"{want.get(key)} in the model config")
    tree = _read("params", lambda: ocp.StandardCheckpointer().restore(export_dir / "params", target))
    sums_file = export_dir / EXPORT_CHECKSUMS
    if sums_file.is_file():
        _verify(tree, _read(EXPORT_CHECKSUMS, lambda: json.loads(sums_file.read_text())))
    return tree


def remove_temporaries(directory: Path, tries: int = 50) -> None:
    """Remove the temporaries (`*.orbax-checkpoint-tmp*`) of saves cut short. A save that just failed
    in this process may still have a writer thread finishing a file inside one, which makes a single
    rmtree fail with "directory not empty" (orbax's own cleanup raised that from the next manager):
    so retry until the writers are done."""
    for tmp in list(directory.glob("*.orbax-checkpoint-tmp*")) if directory.is_dir() else []:
        for attempt in range(tries):
            try:
                shutil.rmtree(tmp)
                break
            except FileNotFoundError:
                break
            except OSError:
                if attempt == tries - 1:
                    raise
                time.sleep(0.1)


def steps_in(directory: Path) -> list[int]:
    """Step directories (finished saves) in a checkpoints directory, newest first."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)


def locate(source: str | Path) -> tuple[Path, int | None] | None:
    """(checkpoints directory, step or None for the newest) for a run, checkpoints or step directory."""
    source = Path(source).absolute()
    if steps_in(source / "checkpoints"):
        return source / "checkpoints", None
    if source.name.isdigit() and (source / "meta").is_dir():
        return source.parent, int(source.name)
    if steps_in(source):
        return source, None
    return None


def newest(directory: Path, step: int | None, load, quarantine: bool = False):
    """load(step_dir) for the newest step that reads back intact; damaged ones are skipped with a
    warning and, in the run's own directory, moved aside (never deleted) so new saves can reuse the step."""
    for s in ([step] if step is not None else steps_in(directory)):
        step_dir = directory / str(s)
        try:
            return load(step_dir)
        except Damaged as e:
            moved = ""
            if quarantine:
                launch.barrier(f"damaged-{s}")  # no process is still reading it
            if quarantine and jax.process_index() == 0:  # one host renames, on a shared filesystem
                aside = step_dir.with_name(f"{s}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                step_dir.rename(aside)
                moved = f"; moved it to {aside.name} (nothing deleted)"
            warn(f"skipping {step_dir}: incomplete or damaged ({e}){moved}")
    return None


# ---- the run's checkpointer ------------------------------------------------------------------

def _val_loss(metrics: dict) -> float:
    return metrics.get("val_loss", float("inf"))


class Checkpointer:
    """One run's checkpoints under `train.out_dir/checkpoints`: the seam train() calls.

    restore(trainer) -> TrainState | None, maybe_save(step, state, metrics) every `checkpoint.every`
    steps, save(step, state, metrics) at the end or on a signal, close() waits for the last write.
    """

    def __init__(self, cfg: config_lib.Config):
        self.cfg = cfg
        self.directory = Path(cfg.train.out_dir).absolute() / "checkpoints"
        ck = cfg.checkpoint
        if ck.keep < 1:
            raise ConfigError(f"checkpoint.keep={ck.keep}: keep at least the newest checkpoint (1)")
        if cfg.train.resume not in ("auto", "none") and locate(cfg.train.resume) is None:
            raise CheckpointError(f"train.resume={cfg.train.resume}: no checkpoints there")
        existing = steps_in(self.directory)
        launch.barrier("checkpoints-listed")  # all processes decide on the same listing
        if cfg.train.resume == "none" and existing:
            if not cfg.train.overwrite:
                raise CheckpointError(f"{self.directory} holds checkpoints (newest step {existing[0]}) and "
                                      f"train.resume=none: use train.resume=auto to continue, or "
                                      f"train.overwrite=true to replace them")
            if jax.process_index() == 0:  # one process changes the (shared) directory, the others wait
                shutil.rmtree(self.directory)
                warn(f"train.overwrite=true: removed {self.directory}")
            launch.barrier("checkpoints-removed")
        keep = [policies.LatestN(n=ck.keep)]
        if ck.keep_best:  # plus the checkpoint with the lowest val_loss
            keep.append(policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep), enable_async_checkpointing=ck.async_save,
            best_fn=_val_loss if ck.keep_best else None, best_mode="min",
            cleanup_tmp_directories=True)  # temporaries of saves cut short by a kill
        if jax.process_index() == 0:
            remove_temporaries(self.directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        # orbax starts removing those temporaries in a thread when the manager is made, and waits for
        # it only before a save; wait now, or a run that stops early (a config error, say) leaves the
        # thread running into interpreter shutdown: a traceback after the user's one-line error.
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self.pending: int | None = None  # the step of the save in flight
        self.failed = False

    def restore(self, trainer):
        """The state to continue from (train.resume), else None. Saves from here on record the
        trainer's config, whose vocabulary size is resolved (the one this checkpointer was made
        with may still say 0)."""
        self.cfg = trainer.cfg
        resume = trainer.cfg.train.resume
        source = {"auto": self.directory, "none": None}.get(resume, resume)
        found = locate(source) if source is not None else None
        state = None
        if found:
            directory, step = found
            state = newest(directory, step, lambda d: restore_step(d, trainer),
                            quarantine=directory == self.directory)
            self.manager.reload()
        if state is None and resume not in ("auto", "none"):
            raise CheckpointError(f"train.resume={resume}: no intact checkpoint there")
        if state is None:
            return None
        if resume != "auto":
            self._drop_after(int(state.step))
        print(f"resumed from step {int(state.step)} of {found[0]}", file=sys.stderr)
        return state

    def _drop_after(self, step: int) -> None:
        later = [s for s in steps_in(self.directory) if s > step]
        if later and not self.cfg.train.overwrite:
            raise CheckpointError(f"train.resume={self.cfg.train.resume} restores step {step} but {self.directory} "
                                  f"has later checkpoints {sorted(later)}: set train.overwrite=true to replace them")
        for s in later:
            self.manager.delete(s)

    def maybe_save(self, step: int, state, metrics: dict | None = None) -> bool:
        ck = self.cfg.checkpoint
        due = (ck.every and step % ck.every == 0) or (ck.keep_best and "val_loss" in (metrics or {}))
        return bool(due) and self.save(step, state, metrics)

    def save(self, step: int, state, metrics: dict | None = None, wait: bool = False) -> bool:
        """Start saving `state` as `step` (the arrays are copied before this returns); False if skipped."""
        if self.failed:
            raise CheckpointError(f"{self.directory}: no more saves after a failed one")
        self.wait()  # a failed write surfaces here, before anything else touches the directory
        if step in self.manager.all_steps():
            return False
        tree = state_tree(state)
        sums, finite = checksums_and_finite(tree)
        nonfinite_run = int(jax.device_get(state.nonfinite_run))
        if nonfinite_run or not finite:
            warn(f"step {step}: not saving a non-finite state ({nonfinite_run} skipped steps in a row, "
                  f"finite={finite}); the newest checkpoint stays step {self.manager.latest_step()}")
            return False
        cfg = self.cfg
        meta = {"format": FORMAT, "step": step, "config": cfg.to_dict(),
                "data": {"next_step": step, "seed": cfg.train.seed, "sampling": cfg.data.sampling,
                         "batch_size": cfg.data.batch_size},
                "rng_impl": str(jax.random.key_impl(state.rng)), "jax": jax.__version__,
                "checksums": sums}
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        val = {"val_loss": float(metrics["val_loss"])} if metrics and "val_loss" in metrics else {}
        try:
            self.manager.save(step, args=args, metrics=val if cfg.checkpoint.keep_best else None, force=True)
        except Exception as e:
            raise self._failed(step, e) from e
        self.pending = step
        if wait:
            self.wait()
        return True

    def wait(self) -> None:
        """Block until the save in flight is on disk; a failed write becomes a CheckpointError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(self.pending, e) from e
        finally:
            self.pending = None

    def _failed(self, step, e: Exception) -> CheckpointError:
        """The error to raise for a failed save; first stop the manager, which waits for the rest of
        that save's writes to end (they may fail too), so nothing changes on disk after the error."""
        self.failed = True
        with contextlib.suppress(Exception):
            self.manager.close()
        good = steps_in(self.directory)
        return CheckpointError(f"{self.directory / str(step)}: saving failed ({_first_line(e)}); the checkpoints "
                               f"before it are intact (newest: {good[0] if good else 'none'}); fix the disk and "
                               f"rerun the same command to resume")

    def close(self) -> None:
        if not self.failed:  # a failed save closed the manager already
            self.wait()
            self.manager.close()


class StopSignals:
    """The first SIGTERM / SIGINT asks the loop to stop after the current step and save; a second
    one aborts at once. Handlers can only be installed from the main thread; elsewhere a no-op."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
