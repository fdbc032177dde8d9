"""Tests for jaxgpt.train.trainer: the state at step 0, compiled for speed, is the default's."""
import jax
import numpy as np
import pytest

from jaxgpt.train.trainer import Trainer


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_init_state_compiled_for_speed_draws_the_default_compiles_values(
        make_config, tmp_path, preset):
    """init_state compiles at XLA:CPU's backend optimization level 1; the default level 2
    (asked for explicitly: the tests' own XLA_FLAGS lower it everywhere) gives the same state,
    bit for bit."""
    trainer = Trainer(make_config(tmp_path, preset), jax.devices()[:1])
    seed = trainer.cfg.train.seed
    default = trainer._fresh_state_jit.lower(seed).compile(
        compiler_options={"xla_backend_optimization_level": 2})
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
    bits = lambda x: jax.random.key_data(x) if is_key(x) else x  # noqa: E731
    want, got = (jax.device_get(jax.tree.map(bits, s))
                 for s in (default(seed), trainer.init_state()))
    assert all(np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=False))
    assert len(jax.tree.leaves(got.params)) > 5
