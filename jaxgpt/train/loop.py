"""The training loop: `python -m jaxgpt.train CONFIG.py [key=value ...]`.

It builds the trainer, resumes or starts the state, runs the steps (at most STEPS_AHEAD dispatched
ahead of the host), logs metrics.jsonl and the progress bar at train.log_every, evaluates exactly at
train.eval_every and the end, saves checkpoints, stops cleanly on SIGTERM / SIGINT (resumable to the
same losses), and exports the final params.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import tqdm

from jaxgpt import cli, files, hardware
from jaxgpt import config as config_lib
from jaxgpt.data import tokens as data
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import sample
from jaxgpt.model.kernels.choice import matmul_dtype
from jaxgpt.parallel import launch
from jaxgpt.store import checkpoint, export, runs
from jaxgpt.train import dpo, grpo, memory, optim
from jaxgpt.train.step import STEP_METRICS
from jaxgpt.train.trainer import Trainer, open_run_batches


class NonFiniteLoss(JaxgptError):
    pass


class Interrupted(JaxgptError):
    """Training stopped on SIGTERM / SIGINT after saving; `signum` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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


# How many train steps the host may dispatch ahead of the oldest one still running: XLA:CPU queues
# at most 32 computations per device, and a multi-device program whose queue fills up can deadlock
# in its all-reduce. Eight ahead stays well inside that and still keeps any accelerator fed.
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


def train_config(path, overrides: list[str]) -> config_lib.Config:
    """The config of `python -m jaxgpt.train PATH overrides`: the file with the overrides, except
    that with train.init_from the model section is the source model's (model.* overrides still
    apply)."""
    cfg = config_lib.apply_overrides(config_lib.load_file(path), overrides)
    if cfg.train.init_from:
        source_model = runs.saved_config(cfg.train.init_from).model
        model_overrides = [o for o in overrides if o.lstrip("-").startswith("model.")]
        cfg = config_lib.apply_overrides(dataclasses.replace(cfg, model=source_model),
                                         model_overrides)
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


class Tally:
    """The loop's bookkeeping at each logged step: throughput and MFU over the interval, the metrics
    row (with the evaluation at eval steps), metrics.jsonl, the progress bar, the non-finite
    guard."""

    def __init__(self, trainer: Trainer, state, start: int, lead: bool):
        cfg = self.cfg = trainer.cfg
        self.trainer = trainer
        # a GRPO row is one prompt and its reply, of a length fixed for the run
        row = trainer.grpo.length if trainer.grpo else cfg.model.seq_len
        self.tokens_per_step = cfg.data.batch_size * row
        self.flops_per_token = trainer.model.flops_per_token(trainer.abstract_params)
        self.peak, _ = hardware.peak_flops(matmul_dtype=matmul_dtype(cfg.model))
        if lead:
            n_params = trainer.model.num_params(trainer.abstract_params)
            print(f"model: {cfg.model.preset}, {n_params / 1e6:.2f}M "
                  f"params{trainer.lora_line(state.params)}; mesh {dict(trainer.mesh.shape)}"
                  f"{f' over {jax.process_count()} processes' if jax.process_count() > 1 else ''}; "
                  f"{self.tokens_per_step} tokens/step", file=sys.stderr)
        self.log = MetricsLog(Path(cfg.train.out_dir)) if lead else None
        self.progress = _progress(cfg, start, enabled=lead)
        self.lead, self.pending, self.last, self.steps_since = lead, [], {}, 0
        # seconds in training steps since this process started them (evaluations not counted)
        self.train_s = 0.0
        self.t_log = time.perf_counter()

    def last_at(self, step: int) -> dict:
        return self.last if self.last.get("step") == step else {}

    def logged(self, step: int, is_eval: bool, state) -> bool:
        """Log the interval that ends after `step` (evaluating when is_eval); True when the run is
        out of time (train.time_limit_s), which ends it here with an evaluation, as at its last
        step."""
        cfg, done = self.cfg, step + 1
        fetched = jax.device_get(self.pending)  # one host sync per logged step, not per step
        self.pending = []
        elapsed = time.perf_counter() - self.t_log
        n_steps, self.steps_since, self.train_s = self.steps_since, 0, self.train_s + elapsed
        tps = n_steps * self.tokens_per_step / elapsed
        # every process ends after the same step: they agree here, at a logged step (without a limit
        # they skip the exchange alike)
        out_of_time = bool(cfg.train.time_limit_s) and not is_eval and \
            bool(launch.largest(int(self.train_s >= cfg.train.time_limit_s)))
        last = {"step": done, "loss": float(fetched[-1]["loss"]), "train_s": round(self.train_s, 3),
                "lr": float(optim.schedule(cfg.optim, cfg.train.steps)(step)),
                "grad_norm": float(fetched[-1]["grad_norm"]), "tokens_per_s": tps,
                "mfu": (tps * self.flops_per_token
                        / (self.peak * len(self.trainer.mesh.devices.flat))),
                "skipped": int(sum(m["skipped"] for m in fetched)),
                # DPO's margin...
                **{k: float(v) for k, v in fetched[-1].items() if k not in STEP_METRICS},
                # GRPO's reward, accuracy and reply length (its last batch's, as the loss)
                **(self.trainer.grpo.last if self.trainer.grpo else {})}
        if last["skipped"] and self.lead:
            print(f"step {done}: {last['skipped']} update(s) skipped for a non-finite loss",
                  file=sys.stderr)
        if is_eval or out_of_time:
            result = self.trainer.evaluate(state.params)
            last.update(val_loss=result["loss"], val_bpb=result.get("bits_per_byte"),
                        **{f"val_{k}": v for k, v in result.items()
                           if k in dpo.EVAL_METRICS + grpo.EVAL_METRICS})
        self.t_log = time.perf_counter()  # after evaluation: the next interval times steps alone
        if self.log:
            self.log.write(last)
        self.show(n_steps, last, tps)
        self.last = last
        if int(fetched[-1]["nonfinite_run"]) >= cfg.train.max_nonfinite:
            raise NonFiniteLoss(f"step {done}: {int(fetched[-1]['nonfinite_run'])} non-finite "
                                "losses or gradients in a row "
                                f"(train.max_nonfinite={cfg.train.max_nonfinite}); lower optim.lr "
                                "or check the data")
        return out_of_time

    def show(self, n_steps: int, last: dict, tps: float) -> None:
        self.progress.update(n_steps)
        self.progress.set_postfix(
            loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{tps:.0f}",
            mfu=f"{100 * last['mfu']:.1f}%",
            **({"margin": f"{last['margin']:.3f}"} if "margin" in last else {}),
            **({"reward": f"{last['reward']:.3f}"} if "reward" in last else {}),
            **({"val": f"{last['val_loss']:.4f}"} if "val_loss" in last else {}),
            **({"val_acc": f"{last['val_accuracy']:.3f}"} if "val_accuracy" in last else {}))

    def close(self) -> None:
        self.progress.close()
        if self.log:
            self.log.close()


def first_state(trainer: Trainer, checkpointer):
    """The state the run starts from: its last checkpoint, else init_from's params with a fresh
    optimizer (fine-tuning), else step 0 of train.seed. The lead process writes the run's files
    first."""
    cfg, lead = trainer.cfg, jax.process_index() == 0
    if lead:
        out_dir = Path(cfg.train.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files.atomic_write(out_dir / "config.json", cfg.to_json())
        trainer.tokenizer.save(out_dir)  # for exports made from checkpoints
    state = checkpointer.restore(trainer)
    # fine-tuning: another run's params, a fresh optimizer
    if state is None and cfg.train.init_from and not trainer.lora:  # LoRA's base: frozen
        params, where, _ = runs.load_params(cfg.train.init_from, cfg, trainer.params_sharding)
        if lead:
            print(f"params from {where}; fresh optimizer state, step 0", file=sys.stderr)
        state = trainer.state_around(params)
    return state or trainer.init_state()


def run_steps(trainer: Trainer, state, start: int, tally: Tally, checkpointer, stop: StopSignals):
    """(state, steps done, the signal that stopped the run or 0): the steps from `start` on."""
    cfg, done, stopping = trainer.cfg, start, 0
    window = DispatchWindow()
    # GRPO samples step i's batch from the state after step i - 1: built here, when it is asked
    # for (the generator reads `state` anew each time), never ahead
    batches = (((s, trainer.batch(s, state)) for s in range(start, cfg.train.steps))
               if trainer.grpo else
               data.Prefetcher(trainer.batch, start, cfg.train.steps, cfg.data.prefetch))
    for step, batch in batches:
        state, metrics = trainer.step(state, batch)
        tally.pending.append(metrics)
        window(metrics)
        tally.steps_since += 1
        done = step + 1
        is_eval = (done == cfg.train.steps
                   or bool(cfg.train.eval_every and done % cfg.train.eval_every == 0))
        at_log = done % cfg.train.log_every == 0 or is_eval
        out_of_time = tally.logged(step, is_eval, state) if at_log else False
        checkpointer.maybe_save(done, state, tally.last_at(done))
        # every process must stop after the same step (the save is collective): with several
        # they agree at the logged steps, where they wait for each other anyway
        stopping = (stop.signum if jax.process_count() == 1
                    else launch.largest(stop.signum) if at_log else 0)
        if stopping:
            break
        if out_of_time:
            if jax.process_index() == 0:
                print(f"step {done} of {cfg.train.steps}: {tally.train_s:.0f} s of training steps "
                      f"reached train.time_limit_s={cfg.train.time_limit_s:g}; ending the run here",
                      file=sys.stderr)
            break
    return state, done, stopping


def train(cfg: config_lib.Config, devices=None, checkpointer=None, batches=None) -> dict:
    """Run training, resuming as `train.resume` says; returns the last logged metrics.

    `checkpointer` (default: a checkpoint.Checkpointer under train.out_dir/checkpoints) has
    `restore(trainer) -> state | None`, `maybe_save(step, state, metrics)`, `save(step, state,
    metrics, wait)` and `close()`. A SIGTERM / SIGINT finishes the current step, saves and raises
    Interrupted; the same command then resumes, with the same losses as an unbroken run.
    `batches`: the batch source of open_run_batches(cfg) when the caller opened it already (and cfg
    is the config it returned beside it).
    """
    out_dir = Path(cfg.train.out_dir)
    if batches is None:
        # bad data fails here, before a checkpointer thread exists
        cfg, batches = open_run_batches(cfg)
    # checks the resume rules before any work
    checkpointer = checkpointer or checkpoint.Checkpointer(cfg)
    try:
        trainer = Trainer(cfg, devices, batches)
        memory.check_fits(trainer)  # refuse what will not fit before compiling it
        state = first_state(trainer, checkpointer)
    except BaseException:
        checkpointer.close()
        raise
    lead = jax.process_index() == 0  # one process writes files, metrics, progress and export
    start = int(state.step)
    if lead:
        truncate_metrics(out_dir / "metrics.jsonl", start)  # rows past the restored step are redone
    tally, stop = Tally(trainer, state, start, lead), StopSignals()
    try:
        state, done, stopping = run_steps(trainer, state, start, tally, checkpointer, stop)
        # the end of the run, or a signal: save (a non-finite state is never saved), and wait for
        # the disk
        saved = checkpointer.save(done, state, tally.last_at(done), wait=True)
    except BaseException:
        # finish an earlier save; the first error is the one to report
        with contextlib.suppress(Exception):
            checkpointer.close()
        raise
    finally:
        stop.restore()
        tally.close()
    checkpointer.close()
    if stopping:
        where = (f"saved step {done}" if saved or done == start
                 else "no checkpoint saved (non-finite state)")
        raise Interrupted(f"stopped by {signal.Signals(stopping).name} after step {done}; {where} "
                          f"in {out_dir / 'checkpoints'}; rerun the same command to resume",
                          stopping)
    # once, for export and samples (every process gathers)
    params = trainer.full_params(state.params)
    if lead:
        stored, extra = trainer.exported(state.params, params)
        export.export(out_dir / "export", cfg, stored, trainer.tokenizer, extra)
        if cfg.train.samples:
            for text in sample.sample_texts(trainer.model, params, trainer.tokenizer, cfg.sample,
                                            n=cfg.train.samples,
                                            max_new_tokens=cfg.train.sample_tokens):
                print(f"--- sample ---\n{text}", file=sys.stderr)
    return tally.last


def _progress(cfg, start, enabled=True):
    return tqdm.tqdm(total=cfg.train.steps, initial=start,
                     disable=not (cfg.train.progress and enabled), unit="step", dynamic_ncols=True,
                     file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        cfg = train_config(operands[0], settings)
        # several processes: join the others before jax starts a backend
        joined = launch.initialize(cfg.distributed)
        try:
            last = train(cfg)
        except Interrupted as e:  # every process stopped after the same step
            print(f"train: {e}", file=sys.stderr)
            sys.exit(128 + e.signum)  # the shell's convention for death by a signal
        except BaseException as e:
            if joined:
                launch.exit_now(e)
            raise
        if jax.process_index() == 0:
            print(json.dumps(last))

    cli.run("python -m jaxgpt.train",
            cli.Command(run, usage="CONFIG.py [key=value ...]", root=config_lib.Config), argv)


if __name__ == "__main__":
    main()
