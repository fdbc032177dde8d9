"""Checkpoints with orbax: exact resume and restore onto any mesh (the params-only exports are
export.py's).

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
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxgpt import config as config_lib
from jaxgpt.errors import CheckpointError, ConfigError
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import launch, sharding
from jaxgpt.store import integrity

FORMAT = 1
# Model fields that decide parameter shapes (seq_len too, when positions are a learned table).
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "norm", "mlp",
                "position", "bias", "tie_embeddings", "qk_norm", "scan_layers")


def warn(message: str) -> None:
    print(f"checkpoint: {message}", file=sys.stderr)


# ---- the saved pytree, its checksums and its shapes ------------------------------------------

def state_tree(state) -> dict:
    """What is saved: a TrainState with the typed rng key as its raw key data."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(state.rng), "nonfinite_run": state.nonfinite_run}


def params_target(model: GPT, shardings=None, abstract=None):
    """The shapes to read params into (the model's, or `abstract`'s), placed."""
    if abstract is None:
        abstract = jax.eval_shape(model.init, jax.random.key(0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharding.placed(abstract, shardings if shardings is not None
                           else jax.tree.map(lambda _: one, abstract))


# ---- compatibility checks: run before any array is read --------------------------------------

def check_model(saved: dict, cfg: config_lib.Config, where: Path, hint: str) -> None:
    """A clear error naming the first model field whose value changes parameter shapes."""
    fields = SHAPE_FIELDS + (("seq_len",) if cfg.model.position == "learned" else ())
    for name in fields:
        mine, theirs = getattr(cfg.model, name), saved["model"].get(name)
        if mine != theirs:
            raise CheckpointError(f"{where}: model.{name}={theirs!r} in the checkpoint but "
                                  f"model.{name}={mine!r} in the config; {hint}")


def _check_tree(stored: dict, target: dict, saved: dict, cfg: config_lib.Config,
                where: Path) -> None:
    have, want = integrity.leaf_shapes(stored), integrity.leaf_shapes(target)
    for key in sorted(have.keys() | want.keys()):
        if have.get(key) != want.get(key):
            if key.startswith("opt_state"):
                raise CheckpointError(
                    f"{where}: the optimizer state does not match "
                    f"(optim.name={saved['optim']['name']} in the checkpoint, {cfg.optim.name} in "
                    f"the config; {key} is {have.get(key)} vs {want.get(key)}); to change the "
                    f"optimizer start a new run with train.init_from={where.parent.parent}")
            raise CheckpointError(f"{where}: {key} is {have.get(key)} in the checkpoint but "
                                  f"{want.get(key)} for the config")


# ---- reading step directories ----------------------------------------------------------------

def read_meta(step_dir: Path) -> dict:
    return integrity.guarded_read("meta",
                                  lambda: ocp.JsonCheckpointHandler().restore(step_dir / "meta"))


def restore_step(step_dir: Path, trainer):
    """The TrainState saved in `step_dir`, placed by the trainer's shardings (any mesh)."""
    meta = read_meta(step_dir)
    check_model(meta["config"], trainer.cfg, step_dir,
                "use the checkpoint's value, or a new train.out_dir for a different model")
    abstract, s = trainer.abstract_state(), trainer.state_sharding
    target = sharding.placed(jax.eval_shape(state_tree, abstract),
                             {"params": s.params, "opt_state": s.opt_state, "step": s.step,
                              "rng": s.rng, "nonfinite_run": s.nonfinite_run})
    stored = integrity.guarded_read(
        "state metadata", lambda: ocp.StandardCheckpointHandler().metadata(step_dir / "state").tree)
    _check_tree(stored, target, meta["config"], trainer.cfg, step_dir)
    tree = integrity.guarded_read(
        "state", lambda: ocp.StandardCheckpointer().restore(step_dir / "state", target))
    integrity.verify_checksums(tree, meta["checksums"])
    return abstract.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"],
                            rng=jax.random.wrap_key_data(tree["rng"], impl=meta["rng_impl"]),
                            nonfinite_run=tree["nonfinite_run"])


def restore_params(step_dir: Path, cfg: config_lib.Config, model: GPT,
                   shardings=None, abstract=None) -> tuple[dict, dict]:
    """Only the params of a checkpoint (the optimizer state is never read), on one device unless
    `shardings` are given: (params, meta). `abstract`: the params' tree when it is not the model's
    (a LoRA run's adapters)."""
    meta = read_meta(step_dir)
    check_model(meta["config"], cfg, step_dir,
                "params can only be loaded into the same model shape")
    target = {"params": params_target(model, shardings, abstract)}
    args = ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    tree = integrity.guarded_read(
        "params", lambda: ocp.PyTreeCheckpointer().restore(step_dir / "state", args=args))
    integrity.verify_checksums(tree["params"], meta["checksums"], prefix="params/")
    return tree["params"], meta


def remove_temporaries(directory: Path, tries: int = 50) -> None:
    """Remove the temporaries (`*.orbax-checkpoint-tmp*`) of saves cut short. A save that just
    failed in this process may still have a writer thread finishing a file inside one, which makes a
    single rmtree fail with "directory not empty" (orbax's own cleanup raised that from the next
    manager): so retry until the writers are done."""
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
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                  reverse=True)


def locate(source: str | Path) -> tuple[Path, int | None] | None:
    """(checkpoints directory, step or None for the newest) for a run, checkpoints or step
    directory."""
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
    warning and, in the run's own directory, moved aside (never deleted) so new saves can reuse the
    step."""
    for s in ([step] if step is not None else steps_in(directory)):
        step_dir = directory / str(s)
        try:
            return load(step_dir)
        except integrity.Damaged as e:
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

def _handlers() -> ocp.DefaultCheckpointHandlerRegistry:
    """The two items of a step directory and how each is written and read (orbax's replacement of
    CheckpointManager's deprecated item_names)."""
    registry = ocp.DefaultCheckpointHandlerRegistry()
    for item, handler, save, restore in (
            ("state", ocp.StandardCheckpointHandler, ocp.args.StandardSave,
             ocp.args.StandardRestore),
            ("meta", ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore)):
        registry.add(item, save, handler)
        registry.add(item, restore, handler)
    return registry


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
                raise CheckpointError(f"{self.directory} holds checkpoints (newest step "
                                      f"{existing[0]}) and train.resume=none: use "
                                      "train.resume=auto to continue, or train.overwrite=true to "
                                      "replace them")
            # one process changes the (shared) directory, the others wait
            if jax.process_index() == 0:
                shutil.rmtree(self.directory)
                warn(f"train.overwrite=true: removed {self.directory}")
            launch.barrier("checkpoints-removed")
        keep = [policies.LatestN(n=ck.keep)]
        if ck.keep_best:  # plus the checkpoint with the lowest val_loss
            keep.append(policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=ck.async_save,
            best_fn=_val_loss if ck.keep_best else None, best_mode="min",
            cleanup_tmp_directories=True)  # temporaries of saves cut short by a kill
        if jax.process_index() == 0:
            remove_temporaries(self.directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=_handlers())
        # orbax starts removing those temporaries in a thread when the manager is made, and waits
        # for it only before a save; wait now, or a run that stops early (a config error, say)
        # leaves the thread running into interpreter shutdown: a traceback after the user's one-line
        # error.
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
            raise CheckpointError(f"train.resume={self.cfg.train.resume} restores step {step} but "
                                  f"{self.directory} has later checkpoints {sorted(later)}: set "
                                  "train.overwrite=true to replace them")
        for s in later:
            self.manager.delete(s)

    def maybe_save(self, step: int, state, metrics: dict | None = None) -> bool:
        ck = self.cfg.checkpoint
        due = ((ck.every and step % ck.every == 0)
               or (ck.keep_best and "val_loss" in (metrics or {})))
        return bool(due) and self.save(step, state, metrics)

    def save(self, step: int, state, metrics: dict | None = None, wait: bool = False) -> bool:
        """Start saving `state` as `step` (the arrays are copied before this returns); False if
        skipped."""
        if self.failed:
            raise CheckpointError(f"{self.directory}: no more saves after a failed one")
        self.wait()  # a failed write surfaces here, before anything else touches the directory
        if step in self.manager.all_steps():
            return False
        tree = state_tree(state)
        sums, finite = integrity.checksums_and_finite(tree)
        nonfinite_run = int(jax.device_get(state.nonfinite_run))
        if nonfinite_run or not finite:
            warn(f"step {step}: not saving a non-finite state ({nonfinite_run} skipped steps in a "
                 f"row, finite={finite}); the newest checkpoint stays step "
                 f"{self.manager.latest_step()}")
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
            self.manager.save(step, args=args, metrics=val if cfg.checkpoint.keep_best else None,
                              force=True)
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
        that save's writes to end (they may fail too), so nothing changes on disk after the
        error."""
        self.failed = True
        with contextlib.suppress(Exception):
            self.manager.close()
        good = steps_in(self.directory)
        return CheckpointError(f"{self.directory / str(step)}: saving failed "
                               f"({integrity.first_line(e)}); the checkpoints before it are intact "
                               f"(newest: {good[0] if good else 'none'}); fix the disk and rerun "
                               "the same command to resume")

    def close(self) -> None:
        if not self.failed:  # a failed save closed the manager already
            self.wait()
            self.manager.close()
