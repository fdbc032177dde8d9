"""Tests for jaxgpt.train.grpo and jaxgpt.train.rollout: the clipped loss and its gradient by hand,
exact group advantages and rows (the reply mask), the reward read from the text a user would see
(stop strings, the screen, the stop id), the sampler's log-probabilities against the training
model's, and GRPO through jaxgpt.train on a tiny random model."""
import json
import math
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxgpt import config as config_lib
from jaxgpt.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    GrpoConfig,
    ModelConfig,
    OptimConfig,
    ScreenConfig,
    TrainConfig,
)
from jaxgpt.data import tasks
from jaxgpt.data.tasks import Problem
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import ConfigError
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen
from jaxgpt.model.gpt import GPT
from jaxgpt.train import grpo, loop, rollout
from jaxgpt.train.grpo import group_advantages, grpo_loss

PROBLEM = Problem("How many times does the letter 'a' appear in 'banana'?", "3")


@pytest.fixture(scope="module")
def byte():
    return Tokenizer.from_spec("byte")


# ---- the loss ----

def hand_example():
    """One row; position 0 is off the reply (with values that would overflow if it counted).
    token 1: ratio 0.5/0.4 = 1.25, A = 1: clipped to 1.2, loss -1.2 (and no gradient);
    token 2: ratio 1, A = 1: loss -1;
    token 3: ratio 0.9/0.5 = 1.8, A = -2: min(-3.6, -2.4) = -3.6 (unclipped), loss 3.6.
    KL (k3) with ref probs (., 0.5, 0.6, 0.9): token 2 has ref - logp = log 2, 2 - log 2 - 1."""
    logp = jnp.log(jnp.array([[1e-30, 0.5, 0.3, 0.9]]))
    old = jnp.log(jnp.array([[1.0, 0.4, 0.3, 0.5]]))
    ref = jnp.array([[100.0, math.log(0.5), math.log(0.6), math.log(0.9)]])
    adv = jnp.array([[5.0, 1.0, 1.0, -2.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0]])
    return logp, old, adv, mask, ref


def test_the_loss_equals_the_formula_by_hand():
    logp, old, adv, mask, ref = hand_example()
    loss, (count, sums) = grpo_loss(logp, old, adv, mask, clip_eps=0.2, kl_beta=0.1,
                                    ref_logp_BxL=ref)
    kl = 1 - math.log(2)
    assert float(count) == 3
    assert float(loss) == pytest.approx(-1.2 - 1.0 + 3.6 + 0.1 * kl, abs=1e-5)
    assert float(sums["kl"]) == pytest.approx(kl, abs=1e-6)
    assert float(sums["clip_fraction"]) == 1  # token 1 alone
    plain, (_, no_kl) = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    assert float(plain) == pytest.approx(1.4, abs=1e-5) and float(no_kl["kl"]) == 0


def test_the_gradient_is_zero_where_clipped():
    """d loss / d logp: 0 at the clipped token 1; -A * ratio = -1 at token 2, plus the KL's
    0.1 * (1 - exp(ref - logp)) = -0.1; 2 * 1.8 = 3.6 at token 3; 0 off the reply."""
    logp, old, adv, mask, ref = hand_example()
    grad = jax.grad(lambda lp: grpo_loss(lp, old, adv, mask, 0.2, 0.1, ref)[0])(logp)
    np.testing.assert_allclose(np.asarray(grad), [[0.0, 0.0, -1.1, 3.6]], atol=1e-5)


def test_group_advantages_are_exact():
    adv = group_advantages(np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]], np.float32))
    s = math.sqrt(0.1875) + grpo.ADV_EPS  # group 2: mean 0.25, std sqrt(3/16)
    np.testing.assert_allclose(adv, [[0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001],
                                     [0, 0, 0, 0],  # all alike: nothing to learn
                                     [-0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s]], rtol=1e-6)


def test_rows_mask_the_reply_and_carry_its_advantage_and_logps():
    a = rollout.Reply(PROBLEM, [5, 6, 7], [8, 9, 2], [-0.5, -1.0, -0.25], "x", "stop")
    b = rollout.Reply(PROBLEM, [5, 6], [4], [-2.0], "y", "length")
    got = grpo.rows([a, b], [1.5, -0.5], 8)
    np.testing.assert_array_equal(got["inputs"], [[5, 6, 7, 8, 9, 0, 0, 0],
                                                  [5, 6, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got["targets"], [[6, 7, 8, 9, 2, 0, 0, 0],
                                                   [6, 4, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got["segment_ids"], [[1, 1, 1, 1, 1, 0, 0, 0],
                                                       [1, 1, 0, 0, 0, 0, 0, 0]])
    # targets 8, 9 and the stop id 2 of a; target 4 of b
    np.testing.assert_array_equal(got["loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0],
                                                     [0, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got["advantages"], [[0, 0, 1.5, 1.5, 1.5, 0, 0, 0],
                                                      [0, -0.5, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(got["old_logps"], [[0, 0, -0.5, -1.0, -0.25, 0, 0, 0],
                                                     [0, -2.0, 0, 0, 0, 0, 0, 0]])


# ---- the text a user sees ----

def read(byte, text: str, stop=(), screen=None, stopped_by=None, finish="stop"):
    """The Reply of an engine request that generated `text` (one byte per token)."""
    ids = byte.encode(text)
    request = SimpleNamespace(tokens=ids, logprobs=[-0.1 * (i + 1) for i in range(len(ids))],
                              stopped_by=stopped_by, finish_reason=finish)
    reading = rollout.Reading(byte, stop, screen or Screen(ScreenConfig(enabled=False)))
    for t in ids:
        if not reading.add(t):
            break
    reply = rollout.read_reply(reading, PROBLEM, [1, 2], request)
    return reply, ids


def test_a_stop_string_ends_the_text_and_the_trained_tokens(byte):
    raw = "It is 3. User: and 5?"
    assert tasks.reward(PROBLEM, raw) == 0.0  # the raw reply's last number is 5
    reply, ids = read(byte, raw, stop=("User:",), stopped_by=(260, -0.7))
    assert reply.text == "It is 3. " and tasks.reward(PROBLEM, reply.text) == 1.0
    assert reply.finish_reason == "stop"
    # up to the token that completed the stop string; the stop id did not end this text
    n = len("It is 3. User:")
    assert reply.tokens == ids[:n] and reply.logprobs == pytest.approx([-0.1 * (i + 1)
                                                                        for i in range(n)])


def test_the_stop_id_is_trained_when_it_ended_the_reply(byte):
    reply, ids = read(byte, "3", stopped_by=(260, -0.7))
    assert reply.text == "3" and reply.tokens == [*ids, 260]
    assert reply.logprobs == pytest.approx([-0.1, -0.7])
    cut, ids = read(byte, "33", finish="length")  # max_tokens: no stop id
    assert cut.tokens == ids and cut.finish_reason == "length"


def test_a_screened_reply_gets_the_refusals_reward(byte, tmp_path):
    (tmp_path / "list.txt").write_text("darn\n")
    screen = Screen(ScreenConfig(blocklist=str(tmp_path / "list.txt"), refusal="No, 7."))
    reply, ids = read(byte, "darn it, 3", screen=screen, stopped_by=(260, -0.7))
    assert reply.text == "No, 7." and reply.finish_reason == "content_filter"
    assert tasks.reward(PROBLEM, reply.text) == 0.0
    assert tasks.reward(PROBLEM._replace(answer="7"), reply.text) == 1.0
    assert reply.tokens == ids[:len("darn ")]  # the screen decided at the word's end


def test_the_reward_function_is_loaded_by_name():
    assert rollout.load_reward("") is tasks.reward
    assert rollout.load_reward("jaxgpt.data.tasks:last_number") is tasks.last_number
    for spec, why in [("nocolon", "expected module:function"),
                      ("no_such_module_x:f", "cannot import"),
                      ("jaxgpt.data.tasks:nope", "has no attribute")]:
        with pytest.raises(ConfigError, match=why):
            rollout.load_reward(spec)


# ---- sampling from the engine ----

def tiny_model(tok, seq_len=128):
    """A 2-layer model with random params drawn on the host (no init compile)."""
    model = GPT(ModelConfig(preset="llama", vocab_size=tok.n_vocab, n_layer=2, n_head=2,
                            d_model=32, seq_len=seq_len).resolved())
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return model, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                               shapes)


def text_length(problem: Problem, text: str) -> float:
    """A reward given by name (grpo.reward=test_grpo:text_length)."""
    return float(len(text))


def test_sampled_replies_score_their_text_and_logps_match_training(byte):
    model, params = tiny_model(byte)
    cfg = Config(model=model.cfg, grpo=GrpoConfig(task="spelling", max_new_tokens=10,
                                                  reward=f"{__name__}:text_length"))
    sampler = rollout.Sampler(cfg, model, byte, slots=8)
    problems = tasks.problems("spelling", "val", 2)
    groups = sampler.replies(params, problems, SamplingParams(max_tokens=10, n=4), [1, 2])
    assert [len(g) for g in groups] == [4, 4]
    stops = set(sampler.stop_ids)
    for problem, group in zip(problems, groups, strict=True):
        for r in group:
            assert r.prompt == sampler.prompt_ids(problem) and r.problem == problem
            body = [t for t in r.tokens if t not in stops]
            assert r.tokens[:len(body)] == body and len(r.tokens) - len(body) <= 1
            # the builtin screen is on; what it passes is the decoded reply
            assert r.text == byte.decode(body) or r.finish_reason == "content_filter"
            assert r.reward == len(r.text)  # the run's reward; correct: the task's check
            assert r.correct == (tasks.reward(problem, r.text) == 1)
    replies = [r for g in groups for r in g]
    batch = grpo.rows(replies, [1.0] * len(replies), 128)
    logp = np.asarray(jax.jit(grpo.token_logps, static_argnums=0)(
        model, params, {k: jnp.asarray(v) for k, v in batch.items()}))
    on = batch["loss_mask"] > 0
    # the ratio starts at 1: the sampler's log-probs are the training model's
    np.testing.assert_allclose(logp[on], batch["old_logps"][on], atol=1e-4)


# ---- through jaxgpt.train ----

def tiny_grpo_config(out, **grpo_settings):
    cfg = Config(
        model=ModelConfig(preset="llama", n_layer=1, n_head=2, d_model=32, seq_len=96),
        data=DataConfig(tokenizer="byte", batch_size=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=4, out_dir=str(out), log_every=1, eval_every=2, samples=0,
                          progress=False),
        checkpoint=CheckpointConfig(every=2),
        grpo=GrpoConfig(**{"task": "spelling", "group_size": 4, "max_new_tokens": 8,
                           "val_problems": 4, "kl_beta": 0.1, **grpo_settings}))
    return config_lib.validate(cfg)


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_through_train_logs_its_metrics_and_resumes_exactly(tmp_path):
    run = tmp_path / "grpo"
    last = loop.train(tiny_grpo_config(run))
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"loss", "reward", "accuracy", "kl", "clip_fraction", "reply_length"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 1 <= r["reply_length"] <= 8 and r["kl"] >= 0
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6)  # step 1: the policy is the reference
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["val_problems"] == 4 and evals[-1]["val_loss"] == 1 - last["val_accuracy"]
    assert (run / "export" / "params").is_dir()

    # from step 2's checkpoint: the same replies (seeds of (train.seed, step), the same params)
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "4")
    shutil.rmtree(again / "export")
    loop.train(tiny_grpo_config(again))
    timing = ("tokens_per_s", "mfu", "train_s")
    assert ([{k: v for k, v in r.items() if k not in timing} for r in rows_of(again)]
            == [{k: v for k, v in r.items() if k not in timing} for r in rows])


def test_grpo_settings_are_checked():
    with pytest.raises(ConfigError, match="multiple of grpo.group_size"):
        tiny_grpo_config("x", group_size=3)
    with pytest.raises(ConfigError, match="grpo.clip_eps"):
        tiny_grpo_config("x", clip_eps=0.0)
    with pytest.raises(ConfigError, match="expected one of"):
        config_lib.apply_overrides(Config(), ["grpo.task=poetry"])


def test_the_experiment_config_is_a_grpo_run():
    cfg = config_lib.validate(config_lib.load_file(REPO / "experiments/configs/chat_grpo.py"))
    assert cfg.grpo.task == "spelling" and cfg.train.time_limit_s == 1200
    assert cfg.data.batch_size % cfg.grpo.group_size == 0
