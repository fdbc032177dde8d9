"""Training: the state, the one jitted train step, and the loop around it.

    python -m jaxgpt.train experiments/configs/shakespeare_char.py [key=value ...]

The step takes the global batch, splits it into `optim.grad_accum` micro-batches, and averages
the loss over every masked token of the whole batch (so pretraining and SFT share one loss).
A non-finite loss leaves params and optimizer state untouched; too many in a row stop the run.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jaxgpt.store import checkpoint
from jaxgpt import cli
from jaxgpt.data import tokens as data
from jaxgpt.train import evaluate
from jaxgpt.store import export
from jaxgpt import files
from jaxgpt import hardware
from jaxgpt.parallel import launch
from jaxgpt.train import memory
from jaxgpt.train import optim
from jaxgpt.store import runs
from jaxgpt.generate import sample
from jaxgpt.train import dpo as preference
from jaxgpt.parallel import sharding
from jaxgpt import config as config_lib
from jaxgpt.errors import JaxgptError
from jaxgpt.model.gpt import GPT, matmul_dtype
from jaxgpt.data.tokenizer import Tokenizer


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    nonfinite_run: jax.Array  # consecutive steps skipped for a non-finite loss


class NonFiniteLoss(JaxgptError):
    pass


STEP_METRICS = ("loss", "grad_norm", "tokens", "skipped", "nonfinite_run")  # a step's own; the loss's sums besides


def resolve_skip_update(choice: str) -> str:
    """What train.skip_update names: auto is select on a GPU (hardware.branches_sync_host), else cond."""
    if choice == "auto":
        return "select" if hardware.branches_sync_host() else "cond"
    return choice


def make_train_step(model: GPT, optimizer: optax.GradientTransformation, grad_accum: int, loss_fn=None,
                    skip_update: str = "auto"):
    """train_step(state, batch, *frozen) -> (state, metrics), pure and ready for jit.

    loss_fn(params, batch, dropout_rng, *frozen) -> (loss sum, count), or (loss sum, (count, {name:
    sum})) whose sums become metrics divided by the count like the loss (default: model.loss; DPO's
    in preference.py). `frozen`: arrays the loss reads beside the state (DPO's reference params).
    skip_update: train.skip_update, how a step with no update keeps the state."""
    loss_fn = loss_fn or model.loss
    skip_update = resolve_skip_update(skip_update)

    def micro_grads(params, micro_batch, rng, frozen):
        (loss_sum, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch, rng, *frozen)
        count, sums = aux if isinstance(aux, tuple) else (aux, {})
        return loss_sum, count, sums, grads

    def train_step(state: TrainState, batch: dict, *frozen):
        rng, step_rng = jax.random.split(state.rng)
        dropout_rng = step_rng if model.cfg.dropout > 0 else None
        if grad_accum == 1:
            loss_sum, count, sums, grads = micro_grads(state.params, batch, dropout_rng, frozen)
        else:
            # micro-batch i is rows i, i + grad_accum, ...: every device holds its share of each one
            # (contiguous blocks would put micro-batch i on a few devices: 12 collective-permutes per
            # step for GPT-2 on 8 devices, while the rest sat idle)
            micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                micro_batch, i = xs
                r = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
                out = micro_grads(state.params, micro_batch, r, frozen)
                return jax.tree.map(jnp.add, carry, out), None

            shapes = jax.eval_shape(micro_grads, state.params, jax.tree.map(lambda x: x[0], micro), dropout_rng, frozen)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (loss_sum, count, sums, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
        # Sums over micro-batches divided once by the global count: exact for any masking.
        denom = jnp.maximum(count, 1.0)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        def update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # no update without a finite loss, nor from a batch with no trained token (an SFT batch
        # of prompts only): momentum and weight decay would still move the params
        apply = finite & (count > 0)
        if skip_update == "cond":  # the skipped branch costs nothing (XLA:CPU step: 1 ms less than a select)
            params, opt_state = jax.lax.cond(apply, update, lambda p, o: (p, o), state.params, state.opt_state)
        else:  # the old values kept by a select that XLA fuses into the update's own passes
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                                             update(state.params, state.opt_state), (state.params, state.opt_state))
        new_state = TrainState(params=params, opt_state=opt_state,
                               step=state.step + 1, rng=rng,
                               nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
                   "skipped": (~finite).astype(jnp.int32), "nonfinite_run": new_state.nonfinite_run,
                   **{name: total / denom for name, total in sums.items()}}
        return new_state, metrics

    return train_step


def with_vocab(cfg: config_lib.Config, tokenizer: Tokenizer) -> config_lib.Config:
    """The config with model.vocab_size resolved (0: the tokenizer's size) and checked against it."""
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.n_vocab))
    data.check_vocab(tokenizer, cfg.model.vocab_size)
    return cfg


def open_run_batches(cfg: config_lib.Config):
    """(config with the vocabulary resolved, batch source): the data of a run, checked before any
    other work starts. Fine-tuning (train.init_from) uses the source model's tokenizer."""
    tokenizer = runs.tokenizer(cfg.train.init_from) if cfg.train.init_from else None
    # process 0 first: it may tokenize data.path into the (shared) cache the others then only read
    if jax.process_index() != 0:
        launch.barrier("data")
    batches = data.open_batches(cfg, tokenizer)
    if jax.process_index() == 0:
        launch.barrier("data")
    return with_vocab(cfg, batches.tokenizer), batches


# How many train steps the host may dispatch ahead of the oldest one still running. XLA:CPU queues at
# most 32 computations per device, and a program over several CPU devices whose queue filled up
# deadlocked in its all-reduce (jax 0.10.2: `jaxgpt.train` on 2 simulated devices with
# train.log_every=500 hung and was aborted by XLA; a jitted psum in a loop never hung with a sync
# every 32 calls or fewer, always with one every 40 or 64). Eight ahead keeps any accelerator fed.
STEPS_AHEAD = 8


class DispatchWindow:
    """Keeps the host at most `size` steps ahead: window(outputs) after each dispatched step waits
    for the outputs of the step `size` back (its metrics: never donated state) when they are not
    ready yet."""

    def __init__(self, size: int = STEPS_AHEAD):
        self._size = size
        self._pending: collections.deque = collections.deque()

    def __call__(self, outputs) -> None:
        self._pending.append(outputs)
        while len(self._pending) > self._size:
            jax.block_until_ready(self._pending.popleft())


class Trainer:
    """Builds everything a run needs from a config: batches, model, mesh, state and compiled steps."""

    def __init__(self, cfg: config_lib.Config, devices=None, batches=None, open_data: bool = True):
        if batches is None and open_data:  # open_data=False: shapes only (memory.py), model.vocab_size set
            cfg, batches = open_run_batches(cfg)
        self.cfg, self.batches = cfg, batches
        self.tokenizer = batches.tokenizer if batches is not None else None
        self.model = GPT(cfg.model)
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        sharding.check_batch(self.mesh, cfg.data.batch_size, cfg.optim.grad_accum)
        abstract_params = jax.eval_shape(self.model.init, jax.random.key(0))
        self.optimizer = optim.build(cfg.optim, cfg.train.steps, abstract_params, self.model.logical_axes)
        self.params_sharding = sharding.logical_to_mesh(self.model.logical_axes, abstract_params, self.mesh)
        self.state_sharding = self._state_sharding(abstract_params)
        # data.preferences: the step minimizes the DPO loss, which may read the reference params beside the state
        self.dpo = preference.DPO(cfg, self.model) if cfg.data.preferences else None
        # the model's loss on this run's batches: plain packed text's rows need no attention mask
        self.model_loss = functools.partial(self.model.loss, segments=data.rows_have_segments(cfg.data))
        frozen_shardings = (self.params_sharding,) if self.dpo and self.dpo.in_step else ()
        with sharding.activate(self.mesh):
            self._fresh_state_jit = jax.jit(self._fresh_state, out_shardings=self.state_sharding)
            self.train_step = jax.jit(make_train_step(self.model, self.optimizer, cfg.optim.grad_accum,
                                                      self.dpo.loss if self.dpo else self.model_loss,
                                                      cfg.train.skip_update),
                                      in_shardings=(self.state_sharding, sharding.batch_sharding(self.mesh),
                                                    *frozen_shardings),
                                      out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                                      donate_argnums=0)
            self.eval_step = evaluate.make_eval_step(self.model, self.mesh, self.params_sharding)
        self.frozen = self.dpo.attach(self) if self.dpo and batches is not None else ()  # the step's extra arrays

    def _fresh_state(self, seed):
        """Step 0 of a run from scratch: params drawn from the seed, a new optimizer state."""
        params_rng, rng = jax.random.split(jax.random.key(seed))
        params = self.model.init(params_rng)
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32), rng,
                          jnp.zeros((), jnp.int32))

    def _state_sharding(self, abstract_params):
        """Optimizer moments follow their params' shardings; counters and the rng are replicated.

        optax states nest copies of the params tree (mu, nu, momentum...), so a state leaf whose key
        path ends with a param's key path, with that param's shape, takes that param's sharding."""
        rep = sharding.replicated(self.mesh)
        by_path = {tuple(path): (p.shape, s) for (path, p), s in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(self.params_sharding))}

        def leaf_sharding(path, leaf):
            for start in range(len(path)):
                shape, s = by_path.get(tuple(path[start:]), (None, None))
                if shape == leaf.shape:
                    return s
            return rep

        abstract = jax.eval_shape(self._fresh_state, 0)
        opt_sharding = jax.tree_util.tree_map_with_path(leaf_sharding, abstract.opt_state)
        return TrainState(self.params_sharding, opt_sharding, rep, rep, rep)

    def init_state(self) -> TrainState:
        """The state at step 0 for train.seed (compiled once, placed on the mesh).

        On a CPU it is compiled at XLA's backend optimization level 1: it runs once, and its random draws
        (a threefry kernel per parameter) are most of a small model's compile time (the quickstart's model
        on the 2-core host with two sweeps running beside it: 7.9 s against 12.4 at the default level 2),
        with the same values to the bit (tests/test_train.py). Level 0 compiles faster still but drops
        the fused multiply-adds, so about 4% of the draws differ in their last bit."""
        seed = self.cfg.train.seed
        cpu = all(d.platform == "cpu" for d in self.mesh.devices.flat)
        with sharding.activate(self.mesh):
            compiled = self._fresh_state_jit.lower(seed).compile(
                compiler_options={"xla_backend_optimization_level": 1} if cpu else None)
            return compiled(seed)

    def state_around(self, params) -> TrainState:
        """Step 0 around given params (fine-tuning): a fresh optimizer state and the rng init_state
        would give, computed alone (compiling the whole init, its random draws, costs more than a
        train step: 9 s for a 2-layer model on the 2-core CPU)."""
        s = self.state_sharding
        opt_state = jax.jit(self.optimizer.init, out_shardings=s.opt_state)(params)
        step, rng, run = jax.jit(lambda seed: (jnp.zeros((), jnp.int32), jax.random.split(jax.random.key(seed))[1],
                                               jnp.zeros((), jnp.int32)),
                                 out_shardings=(s.step, s.rng, s.nonfinite_run))(self.cfg.train.seed)
        return TrainState(params, opt_state, step, rng, run)

    def batch(self, step: int) -> dict:
        """The global batch of a step on the mesh (each process draws only the rows its devices hold)."""
        blocks, n = sharding.batch_blocks(self.mesh)
        parts = [self.batches.batch_at(step, i, n) for i in blocks]
        rows = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return sharding.put_batch(rows, self.mesh, local_rows=True)

    def evaluate(self, params, split: str = "val") -> dict:
        """Exact loss and bits per byte on held-out data (for SFT: assistant tokens only; for DPO the
        held-out pairs' loss, margin and accuracy, and the held-out chats' bits per byte)."""
        if self.dpo:
            return self.dpo.evaluate(self, params, split)
        return evaluate.evaluate_source(self.batches, self.cfg, self.eval_step, params, self.mesh, split,
                                        self.cfg.train.eval_max_tokens)

    def step(self, state: TrainState, batch: dict):
        with sharding.activate(self.mesh):
            return self.train_step(state, batch, *self.frozen)

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes, computing nothing (checkpoint restore targets)."""
        with sharding.activate(self.mesh):
            return jax.eval_shape(self._fresh_state_jit, self.cfg.train.seed)


def train_config(path, overrides: list[str]) -> config_lib.Config:
    """The config of `python -m jaxgpt.train PATH overrides`: the file with the overrides, except that
    with train.init_from the model section is the source model's (model.* overrides still apply)."""
    cfg = config_lib.apply_overrides(config_lib.load_file(path), overrides)
    if cfg.train.init_from:
        source_model = runs.saved_config(cfg.train.init_from).model
        model_overrides = [o for o in overrides if o.lstrip("-").startswith("model.")]
        cfg = config_lib.apply_overrides(dataclasses.replace(cfg, model=source_model), model_overrides)
    return config_lib.validate(cfg)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step`: a resumed run logs the later ones again. A row
    torn by a kill (not valid JSON) goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    files.atomic_write(path, "".join(row + "\n" for row in kept))


class MetricsLog:
    """metrics.jsonl, plus TensorBoard when tensorboardX or tensorflow is installed."""

    def __init__(self, out_dir: Path):
        self.file = open(out_dir / "metrics.jsonl", "a")
        self.tb = None
        with contextlib.suppress(ImportError):
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        self.file.close()
        if self.tb:
            self.tb.close()


def train(cfg: config_lib.Config, devices=None, checkpointer=None, batches=None) -> dict:
    """Run training, resuming as `train.resume` says; returns the last logged metrics.

    `checkpointer` (default: a checkpoint.Checkpointer under train.out_dir/checkpoints) has
    `restore(trainer) -> state | None`, `maybe_save(step, state, metrics)`, `save(step, state,
    metrics, wait)` and `close()`. A SIGTERM / SIGINT finishes the current step, saves and raises
    checkpoint.Interrupted; the same command then resumes, with the same losses as an unbroken run.
    `batches`: the batch source of open_run_batches(cfg) when the caller opened it already (and cfg is
    the config it returned beside it).
    """
    out_dir = Path(cfg.train.out_dir)
    if batches is None:
        cfg, batches = open_run_batches(cfg)  # bad data fails here, before a checkpointer thread exists
    checkpointer = checkpointer or checkpoint.Checkpointer(cfg)  # checks the resume rules before any work
    try:
        trainer = Trainer(cfg, devices, batches)
        memory.check(cfg, list(trainer.mesh.devices.flat))  # refuse what will not fit before compiling it
        lead = jax.process_index() == 0  # one process writes the run's files, metrics, progress and export
        if lead:
            out_dir.mkdir(parents=True, exist_ok=True)
            files.atomic_write(out_dir / "config.json", cfg.to_json())
            trainer.tokenizer.save(out_dir)  # for exports made from checkpoints
        state = checkpointer.restore(trainer)
        if state is None and cfg.train.init_from:  # fine-tuning: another run's params, a fresh optimizer
            params, where, _ = runs.params(cfg.train.init_from, cfg, trainer.params_sharding)
            if lead:
                print(f"params from {where}; fresh optimizer state, step 0", file=sys.stderr)
            state = trainer.state_around(params)
        state = state or trainer.init_state()
    except BaseException:
        checkpointer.close()
        raise
    start = done = int(state.step)
    if lead:
        truncate_metrics(out_dir / "metrics.jsonl", start)  # rows past the restored step are redone
    n_params = trainer.model.num_params(state.params)
    flops_per_token = trainer.model.flops_per_token(state.params)
    peak, _ = hardware.peak_flops(matmul_dtype=matmul_dtype(cfg.model))
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    if lead:
        print(f"model: {cfg.model.preset}, {n_params / 1e6:.2f}M params; mesh {dict(trainer.mesh.shape)}"
              f"{f' over {jax.process_count()} processes' if jax.process_count() > 1 else ''}; "
              f"{tokens_per_step} tokens/step", file=sys.stderr)

    log = MetricsLog(out_dir) if lead else None
    batches = data.Prefetcher(trainer.batch, start, cfg.train.steps, cfg.data.prefetch)
    progress = _progress(cfg, start, enabled=lead)
    pending, last, t_log, steps_since = [], {}, time.perf_counter(), 0
    window = DispatchWindow()
    train_s = 0.0  # seconds in training steps since this process started them (evaluations not counted)
    stop, stopping, out_of_time = checkpoint.StopSignals(), 0, False
    try:
        for step, batch in batches:
            state, metrics = trainer.step(state, batch)
            pending.append(metrics)
            window(metrics)
            steps_since += 1
            done = step + 1
            is_eval = done == cfg.train.steps or (cfg.train.eval_every and done % cfg.train.eval_every == 0)
            if done % cfg.train.log_every == 0 or is_eval:
                fetched = jax.device_get(pending)  # one host sync per logged step, not per step
                pending = []
                elapsed = time.perf_counter() - t_log
                n_steps, steps_since, train_s = steps_since, 0, train_s + elapsed
                tps = n_steps * tokens_per_step / elapsed
                # out of time (a host slower than the one the steps were planned on): end here, as at the last step
                # (every process ends after the same step: they agree here, at a logged step; without a limit
                # they skip the exchange alike)
                out_of_time = bool(cfg.train.time_limit_s) and not is_eval and \
                    bool(launch.largest(int(train_s >= cfg.train.time_limit_s)))
                is_eval = is_eval or out_of_time
                last = {"step": done, "loss": float(fetched[-1]["loss"]), "train_s": round(train_s, 3),
                        "lr": float(optim.schedule(cfg.optim, cfg.train.steps)(step)),
                        "grad_norm": float(fetched[-1]["grad_norm"]), "tokens_per_s": tps,
                        "mfu": tps * flops_per_token / (peak * len(trainer.mesh.devices.flat)),
                        "skipped": int(sum(m["skipped"] for m in fetched)),
                        **{k: float(v) for k, v in fetched[-1].items() if k not in STEP_METRICS}}  # DPO's margin...
                if last["skipped"] and lead:
                    print(f"step {done}: {last['skipped']} update(s) skipped for a non-finite loss", file=sys.stderr)
                if is_eval:
                    result = trainer.evaluate(state.params)
                    last.update(val_loss=result["loss"], val_bpb=result.get("bits_per_byte"),
                                **{f"val_{k}": v for k, v in result.items() if k in preference.EVAL_METRICS})
                t_log = time.perf_counter()  # after the evaluation: the next interval times steps alone
                if log:
                    log.write(last)
                progress.update(n_steps)
                progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{tps:.0f}",
                                     mfu=f"{100 * last['mfu']:.1f}%",
                                     **({"margin": f"{last['margin']:.3f}"} if "margin" in last else {}),
                                     **({"val": f"{last['val_loss']:.4f}"} if is_eval else {}),
                                     **({"val_acc": f"{last['val_accuracy']:.3f}"} if "val_accuracy" in last else {}))
                if int(fetched[-1]["nonfinite_run"]) >= cfg.train.max_nonfinite:
                    raise NonFiniteLoss(f"step {done}: {int(fetched[-1]['nonfinite_run'])} non-finite losses or gradients in a "
                                        f"row (train.max_nonfinite={cfg.train.max_nonfinite}); lower optim.lr or "
                                        f"check the data")
            checkpointer.maybe_save(done, state, last if last.get("step") == done else {})
            # every process must stop after the same step (the save is collective): with several
            # they agree at the logged steps, where they wait for each other anyway
            stopping = stop.signum if jax.process_count() == 1 else \
                launch.largest(stop.signum) if done % cfg.train.log_every == 0 or is_eval else 0
            if stopping:
                break
            if out_of_time:
                if lead:
                    print(f"step {done} of {cfg.train.steps}: {train_s:.0f} s of training steps reached "
                          f"train.time_limit_s={cfg.train.time_limit_s:g}; ending the run here", file=sys.stderr)
                break
        # the end of the run, or a signal: save (a non-finite state is never saved), and wait for the disk
        saved = checkpointer.save(done, state, last if last.get("step") == done else {}, wait=True)
    except BaseException:
        with contextlib.suppress(Exception):  # finish an earlier save; the first error is the one to report
            checkpointer.close()
        raise
    finally:
        stop.restore()
        progress.close()
        if log:
            log.close()
    checkpointer.close()
    if stopping:
        where = f"saved step {done}" if saved or done == start else "no checkpoint saved (non-finite state)"
        raise checkpoint.Interrupted(f"stopped by {signal.Signals(stopping).name} after step {done}; {where} "
                                     f"in {out_dir / 'checkpoints'}; rerun the same command to resume", stopping)
    params = sharding.to_host(state.params)  # once, for the export and the samples (every process gathers)
    if not lead:
        return last
    export.export(out_dir / "export", cfg, params, trainer.tokenizer)
    if cfg.train.samples:
        for text in sample.sample_texts(trainer.model, params, trainer.tokenizer,
                                        cfg.sample, n=cfg.train.samples, max_new_tokens=cfg.train.sample_tokens):
            print(f"--- sample ---\n{text}", file=sys.stderr)
    return last


def _progress(cfg, start, enabled=True):
    return tqdm.tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.train.progress and enabled), unit="step",
                     dynamic_ncols=True, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        cfg = train_config(operands[0], settings)
        joined = launch.initialize(cfg.distributed)  # several processes: join the others before jax starts a backend
        try:
            last = train(cfg)
        except checkpoint.Interrupted as e:  # every process stopped after the same step
            print(f"train: {e}", file=sys.stderr)
            sys.exit(128 + e.signum)  # the shell's convention for death by a signal
        except BaseException as e:
            if joined:
                launch.exit_now(e)
            raise
        if jax.process_index() == 0:
            print(json.dumps(last))

    cli.run("python -m jaxgpt.train", cli.Command(run, usage="CONFIG.py [key=value ...]", root=config_lib.Config),
            argv)


if __name__ == "__main__":
    main()
