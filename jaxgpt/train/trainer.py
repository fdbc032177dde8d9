"""The trainer: everything a run needs, built from its config: batches, model, mesh, shardings,
optimizer, the state at step 0 and the compiled steps. (The loop that drives it: loop.py.)"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt.data import tokens as data
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import launch, sharding
from jaxgpt.store import runs
from jaxgpt.train import dpo, evaluate, grpo, lora, optim
from jaxgpt.train.step import TrainState, make_train_step


def with_tokenizer_vocab(cfg: config_lib.Config, tokenizer: Tokenizer) -> config_lib.Config:
    """The config with model.vocab_size resolved (0: the tokenizer's size) and checked against
    it."""
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 vocab_size=tokenizer.n_vocab))
    data.check_vocab(tokenizer, cfg.model.vocab_size)
    return cfg


def open_run_batches(cfg: config_lib.Config):
    """(config with the vocabulary resolved, batch source): the data of a run, checked before any
    other work starts. Fine-tuning (train.init_from) uses the source model's tokenizer."""
    tokenizer = runs.load_tokenizer(cfg.train.init_from) if cfg.train.init_from else None
    # process 0 first: it may tokenize data.path into the (shared) cache the others then only read
    if jax.process_index() != 0:
        launch.barrier("data")
    # scored beside DPO's held-out pairs
    chats = dpo.held_out_chats(cfg) if cfg.data.preferences else ()
    # grpo.task: no data files, the task's prompts (replies are sampled in each step)
    batches = (grpo.TaskPrompts(cfg, tokenizer or Tokenizer.from_spec(cfg.data.tokenizer))
               if cfg.grpo.task else data.open_batches(cfg, tokenizer, held_out_chats=chats))
    if jax.process_index() == 0:
        launch.barrier("data")
    return with_tokenizer_vocab(cfg, batches.tokenizer), batches


class Trainer:
    """Builds everything a run needs from a config: batches, model, mesh, state and compiled
    steps."""

    def __init__(self, cfg: config_lib.Config, devices=None, batches=None, open_data: bool = True):
        # open_data=False: shapes only (memory.py), model.vocab_size set
        if batches is None and open_data:
            cfg, batches = open_run_batches(cfg)
        self.cfg, self.batches = cfg, batches
        self.tokenizer = batches.tokenizer if batches is not None else None
        self.model = GPT(cfg.model)
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        sharding.check_batch(self.mesh, cfg.data.batch_size, cfg.optim.grad_accum)
        self.abstract_params = jax.eval_shape(self.model.init, jax.random.key(0))
        self.params_sharding = sharding.logical_to_mesh(self.model.logical_axes,
                                                        self.abstract_params, self.mesh)
        # train.lora_rank: the state's params are adapters, the base frozen beside them
        self.lora = (lora.LoRA(cfg, self.model, self.abstract_params, self.params_sharding,
                               self.mesh) if cfg.train.lora_rank else None)
        trainable = self.lora.abstract if self.lora else self.abstract_params
        self.optimizer = optim.build(cfg.optim, cfg.train.steps, trainable,
                                     self.model.logical_axes)
        self.state_sharding = self._state_sharding(
            trainable, self.lora.sharding if self.lora else self.params_sharding)
        # data.preferences: the step minimizes the DPO loss, which may read the reference params
        # beside the state
        self.dpo = dpo.DPO(cfg, self.model, mesh=self.mesh, params_sharding=self.params_sharding,
                           batches=batches) if cfg.data.preferences else None
        # the model's loss on this run's batches: plain packed text's rows need no attention mask
        self.model_loss = functools.partial(self.model.loss,
                                            segments=data.rows_have_segments(cfg.data))
        # grpo.task: the clipped policy-gradient loss on replies sampled from the state's params
        self.grpo = grpo.GRPO(cfg, self.model, batches, self.mesh) if cfg.grpo.task else None
        reference_in_step = any(o and o.in_step for o in (self.dpo, self.grpo))
        # what the step reads beside the state (LoRA's base, a reference's params): shapes and
        # shardings, in the order self.frozen holds the arrays
        frozen = ((((self.lora.abstract_base, self.lora.base_sharding),) if self.lora else ())
                  + (((self.abstract_params, self.params_sharding),) if reference_in_step else ()))
        self.frozen_shapes = tuple(shape for shape, _ in frozen)
        self.frozen_shardings = tuple(s for _, s in frozen)
        self.step_loss = (self.dpo.loss if self.dpo
                          else self.grpo.loss if self.grpo else self.model_loss)
        if self.lora:
            self.step_loss = self.lora.wrap(self.step_loss)
        with sharding.on_mesh(self.mesh):
            self._fresh_state_jit = jax.jit(self._fresh_state, out_shardings=self.state_sharding)
            self.train_step = jax.jit(
                make_train_step(self.model, self.optimizer, cfg.optim.grad_accum,
                                self.step_loss, cfg.train.skip_update),
                in_shardings=(self.state_sharding, sharding.batch_sharding(self.mesh),
                              *self.frozen_shardings),
                out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                donate_argnums=0)
            self.eval_step = evaluate.make_eval_step(
                self.model, self.mesh,
                self.lora.combined_sharding if self.lora else self.params_sharding)
        # the step's extra arrays
        self.frozen = self._dpo_reference() if self.dpo and batches is not None else ()
        if self.grpo and self.grpo.in_step and batches is not None:
            self.frozen = (self.reference_params(),)
        if self.lora and open_data:
            self.frozen = (self.lora.base(self.reference_params()), *self.frozen)

    def reference_params(self):
        """DPO's frozen reference: the params the run starts from (init_from's, else the seed's),
        loaded anew."""
        if self.cfg.train.init_from:
            return runs.load_params(self.cfg.train.init_from, self.cfg, self.params_sharding)[0]
        return self.init_state().params

    def _dpo_reference(self) -> tuple:
        """What the DPO step reads beside the state: (reference params,) with dpo.reference=step;
        else () once every pair's reference log-probabilities are in the batches."""
        params = self.reference_params()
        if self.dpo.in_step:
            return (params,)
        self.batches.reference = self.dpo.reference_logps(params)
        return ()

    def _fresh_state(self, seed):
        """Step 0 of a run from scratch: params (or LoRA's adapters) drawn from the seed, a new
        optimizer state."""
        params_rng, rng = jax.random.split(jax.random.key(seed))
        params = self.lora.init(params_rng) if self.lora else self.model.init(params_rng)
        return TrainState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32), rng,
                          jnp.zeros((), jnp.int32))

    def _state_sharding(self, abstract_params, params_sharding):
        """Optimizer moments follow their params' shardings; counters and the rng are replicated.

        optax states nest copies of the params tree (mu, nu, momentum...), so a state leaf whose key
        path ends with a param's key path, with that param's shape, takes that param's sharding."""
        rep = sharding.replicated(self.mesh)
        by_path = {tuple(path): (p.shape, s) for (path, p), s in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params),
            jax.tree.leaves(params_sharding), strict=False)}

        def leaf_sharding(path, leaf):
            for start in range(len(path)):
                shape, s = by_path.get(tuple(path[start:]), (None, None))
                if shape == leaf.shape:
                    return s
            return rep

        abstract = jax.eval_shape(self._fresh_state, 0)
        opt_sharding = jax.tree_util.tree_map_with_path(leaf_sharding, abstract.opt_state)
        return TrainState(params_sharding, opt_sharding, rep, rep, rep)

    def init_state(self) -> TrainState:
        """The state at step 0 for train.seed (compiled once, placed on the mesh).

        On a CPU it is compiled at XLA's backend optimization level 1: it runs once, and its random
        draws (a threefry kernel per parameter) are most of a small model's compile time, which
        level 1 cuts by a third with the same values to the bit (tests/train/test_trainer.py).
        Level 0 drops the fused multiply-adds, so some draws would differ in their last bit."""
        seed = self.cfg.train.seed
        cpu = all(d.platform == "cpu" for d in self.mesh.devices.flat)
        with sharding.on_mesh(self.mesh):
            compiled = self._fresh_state_jit.lower(seed).compile(
                compiler_options={"xla_backend_optimization_level": 1} if cpu else None)
            return compiled(seed)

    def state_around(self, params) -> TrainState:
        """Step 0 around given params (fine-tuning): a fresh optimizer state and the rng init_state
        would give, computed alone (compiling the whole init, its random draws, costs more than
        compiling a train step)."""
        s = self.state_sharding
        opt_state = jax.jit(self.optimizer.init, out_shardings=s.opt_state)(params)
        fresh_counters = jax.jit(lambda seed: (jnp.zeros((), jnp.int32),
                                               jax.random.split(jax.random.key(seed))[1],
                                               jnp.zeros((), jnp.int32)),
                                 out_shardings=(s.step, s.rng, s.nonfinite_run))
        step, rng, run = fresh_counters(self.cfg.train.seed)
        return TrainState(params, opt_state, step, rng, run)

    def batch(self, step: int, state: TrainState | None = None) -> dict:
        """The global batch of a step on the mesh (each process draws only the rows its devices
        hold); GRPO's is sampled from `state`'s params (the state after the step before)."""
        if self.grpo:
            rows = self.grpo.batch(step, self.model_params(state.params))
            return sharding.put_batch(rows, self.mesh)
        blocks, n = sharding.batch_blocks(self.mesh)
        parts = [self.batches.batch_at(step, i, n) for i in blocks]
        rows = (parts[0] if len(parts) == 1
                else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        return sharding.put_batch(rows, self.mesh, local_rows=True)

    def evaluate(self, params, split: str = "val") -> dict:
        """Exact loss and bits per byte on held-out data (for SFT: assistant tokens only; for DPO
        the held-out pairs' loss, margin and accuracy, and the held-out chats' bits per byte)."""
        if self.dpo:
            return self.dpo.evaluate(params, self.frozen, self.eval_step, split)
        if self.grpo:
            return self.grpo.evaluate(self.model_params(params))
        return evaluate.evaluate_source(self.batches, self.cfg, self.eval_step,
                                        self.model_params(params), self.mesh, split,
                                        self.cfg.train.eval_max_tokens)

    def model_params(self, params) -> dict:
        """The tree the model applies for the state's params: with LoRA, base and adapters."""
        return self.lora.applied(params, self.frozen[0]) if self.lora else params

    def full_params(self, params) -> dict:
        """The whole model's params on the host: with LoRA, the adapters merged into the base."""
        if self.lora:
            return self.lora.merged(params, self.frozen[0])
        return sharding.to_host(params)

    def exported(self, params, full: dict) -> tuple[dict, dict]:
        """(params, extra files) of the run's export: the full params, or with LoRA and
        export.lora=separate its adapters alone."""
        if self.lora and self.cfg.export.lora == "separate":
            return sharding.to_host(params), self.lora.note()
        return full, {}

    def lora_line(self, params) -> str:
        """How many of the params train, for the run's first line (LoRA only)."""
        if not self.lora:
            return ""
        return f" ({self.model.num_params(params) / 1e6:.2f}M in LoRA adapters)"

    def step(self, state: TrainState, batch: dict):
        with sharding.on_mesh(self.mesh):
            return self.train_step(state, batch, *self.frozen)

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes, computing nothing (checkpoint restore targets)."""
        with sharding.on_mesh(self.mesh):
            return jax.eval_shape(self._fresh_state_jit, self.cfg.train.seed)
