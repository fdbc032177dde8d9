"""Tests for jaxgpt.train.dpo (and the pairs of jaxgpt.data.pairs): the DPO loss by hand, its start
at log 2, the reply-only mask of a packed pair, pairs that never see each other, and DPO through
jaxgpt.train (margin up, exact resume)."""
import json
import math
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, synthetic

from jaxgpt import config as config_lib
from jaxgpt.config import ModelConfig
from jaxgpt.data import chat, dialogs
from jaxgpt.data import pairs as pair_data
from jaxgpt.data.dialogs import ChatDataError
from jaxgpt.data.pairs import PairBatches
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.model.gpt import GPT, token_losses
from jaxgpt.train import dpo as preference
from jaxgpt.train import evaluate, loop
from jaxgpt.train import trainer as trainer_lib
from jaxgpt.train.dpo import dpo_loss

TIMING = ("tokens_per_s", "mfu", "train_s")


@pytest.fixture(scope="module")
def byte():
    return Tokenizer.from_spec("byte")


def tiny_model(tok, seq_len=64):
    """A 2-layer model with random params drawn on the host (compiling model.init's random draws
    takes 10 s here; any params serve these tests)."""
    model = GPT(ModelConfig(preset="llama", vocab_size=tok.n_vocab, n_layer=2, n_head=2, d_model=32,
                            seq_len=seq_len).resolved())
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return model, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32),
                               shapes)


CONTEXT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}]


def test_dpo_loss_equals_the_formula_by_hand():
    """Two pairs in one row (segments 1,2 and 3,4; column 5 holds nothing), beta 0.5, smoothing 0.1:
    pair 0: h = 0.5 * ((-10 - -11) - (-12 - -11)) = 1.0;
    pair 1: h = 0.5 * ((-5 - -6) - (-4 - -6)) = -0.5
    loss(h) = -0.9 log sigmoid(h) - 0.1 log sigmoid(-h): 0.41326169 and 0.92407698."""
    policy = jnp.array([[0.0, -10.0, -12.0, -5.0, -4.0, 0.0]])
    ref = jnp.array([[0.0, -11.0, -11.0, -6.0, -6.0, 0.0]])
    present = jnp.array([[False, True, True, True, True, False]])
    loss_sum, (count, sums) = dpo_loss(policy, ref, present, beta=0.5, label_smoothing=0.1)
    assert float(count) == 2
    assert float(loss_sum) == pytest.approx(0.41326169 + 0.92407698, abs=1e-6)
    assert float(sums["margin"]) == pytest.approx(1.0 - 0.5, abs=1e-6)
    assert float(sums["accuracy"]) == 1  # only pair 0 ranks its chosen reply higher
    assert float(sums["chosen_reward"]) == pytest.approx(0.5 * 1 + 0.5 * 1, abs=1e-6)
    assert float(sums["rejected_reward"]) == pytest.approx(0.5 * -1 + 0.5 * 2, abs=1e-6)
    plain, _ = dpo_loss(policy, ref, present, beta=0.5)  # no smoothing: -log sigmoid(h)
    assert float(plain) == pytest.approx(math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5)),
                                         abs=1e-6)


def test_the_loss_starts_at_log_2_with_zero_margin(byte):
    pairs = [{"messages": CONTEXT, "chosen": "fine, and you?", "rejected": "fine."},
             {"messages": CONTEXT[1:2], "chosen": "hey?", "rejected": "go away"},
             {"messages": CONTEXT[1:2], "chosen": "what's up?", "rejected": "hi"}]
    batches = PairBatches(pairs, byte, 96, 2, seed=0, val=pairs[:1])
    model, params = tiny_model(byte, 96)
    dpo = preference.DPO(config_lib.Config(), model)
    batch = {k: jnp.asarray(v) for k, v in batches.batch_at(0).items()}
    # the reference is the policy
    loss_sum, (count, sums) = jax.jit(dpo.loss)(params, batch, None, params)
    assert float(count) >= 3
    np.testing.assert_allclose(float(loss_sum) / float(count), math.log(2), rtol=1e-7)
    assert float(sums["margin"]) == 0 and float(sums["accuracy"]) == 0


def test_the_mask_covers_the_reply_tokens_only(byte):
    pair = {"messages": CONTEXT, "chosen": "fine, you?", "rejected": "meh"}
    batch = PairBatches([pair], byte, 128, 1, seed=0, val=[pair]).batch_at(0)
    end = byte.special_id("<|assistant_end|>")
    for reply, segment in (("fine, you?", 1), ("meh", 2)):
        ids, mask = chat.render(CONTEXT + [{"role": "assistant", "content": reply}], byte)
        reply_mask = mask.copy()
        # the context's assistant turn is not trained
        reply_mask[:len(ids) - len(reply) - 1] = False
        assert mask.sum() > reply_mask.sum()
        at = np.flatnonzero(batch["segment_ids"][0] == segment)
        # the chat template exactly; the last position's target starts the next sequence
        # (or padding), untrained
        assert batch["inputs"][0][at].tolist() == ids.tolist()
        assert batch["targets"][0][at][:-1].tolist() == ids[1:].tolist()
        assert batch["loss_mask"][0][at].tolist() == reply_mask[1:].astype(float).tolist() + [0.0]
        trained = batch["targets"][0][at][batch["loss_mask"][0][at] == 1]
        assert byte.decode(trained) == reply + "<|assistant_end|>"
        assert batch["targets"][0][at][-2] == end
    assert batch["loss_mask"][0][batch["segment_ids"][0] == 0].sum() == 0


def test_pairs_in_one_row_never_see_each_other(byte):
    a = {"messages": CONTEXT[1:2], "chosen": "hey, you?", "rejected": "bye"}
    b = {"messages": [{"role": "user", "content": "what is up"}], "chosen": "not much, you?",
         "rejected": "no"}
    b_changed = {"messages": [{"role": "user", "content": "WHAT IS UP"}], "chosen": "zzz?",
                 "rejected": "NO NO"}
    model, params = tiny_model(byte, 128)

    def logps_of_a(other):
        batch = PairBatches([a, other], byte, 128, 1, seed=0, val=[a]).assemble("train", [[0, 1]])
        assert batch["segment_ids"][0].max() == 4  # both pairs in the row
        logits = jax.jit(model.apply)(params, jnp.asarray(batch["inputs"]),
                                      jnp.asarray(batch["segment_ids"]))
        logps = -np.asarray(token_losses(logits, jnp.asarray(batch["targets"])))[0]
        return logps[np.isin(batch["segment_ids"][0], (1, 2))]

    np.testing.assert_array_equal(logps_of_a(b), logps_of_a(b_changed))


def test_a_bad_row_is_a_one_line_error_naming_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}], "chosen": "hey?", "rejected": "no"}
    answered = good["messages"] + [{"role": "assistant", "content": "x"}]
    for bad, why in ((dict(good, rejected=3), '"rejected" is missing or not a string'),
                     (dict(good, messages=answered), "must end with a user turn"),
                     ("not json", "not JSON")):
        row = bad if isinstance(bad, str) else json.dumps(bad)
        path.write_text(json.dumps(good) + "\n" + row + "\n")
        with pytest.raises(ChatDataError, match=f"^{path}:2: .*{why}") as e:
            pair_data.read_pairs(f"jsonl:{path}")
        assert "\n" not in str(e.value)


# ---- DPO through jaxgpt.train ----

def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT run (byte tokens, 2 layers) on synthetic chats, and pairs whose chosen reply asks
    back."""
    root = tmp_path_factory.mktemp("dpo")
    chats = synthetic(120, seed=3)
    dialogs.write_jsonl(root / "chats.jsonl", chats)
    cfg = config_lib.from_cli(REPO / "experiments/configs/chat_sft.py", [
        f"data.chat=jsonl:{root / 'chats.jsonl'}", "data.tokenizer=byte", "data.batch_size=4",
        "data.prefetch=1", "model.preset=llama", "model.n_layer=1", "model.n_head=2",
        "model.d_model=32", "model.seq_len=256", "train.steps=4", "train.eval_every=0",
        "train.log_every=2", "train.progress=false", "optim.warmup_steps=2",
        f"train.out_dir={root / 'sft'}"])
    loop.train(cfg)
    rng = random.Random(0)
    words = "hi hello how are you fine thanks what why yes no maybe today".split()
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    pairs = [{"messages": c[:1] if c[0]["role"] == "user" else c[:2],
              "chosen": say(rng.randint(1, 4)) + "?", "rejected": say(rng.randint(1, 4)) + "."}
             for c in chats]
    pair_data.write_pairs(root / "pairs.jsonl", pairs)
    return root


def dpo_config(root, out, *extra):
    return loop.train_config(REPO / "experiments/configs/chat_dpo.py", [
        f"train.init_from={root / 'sft'}", f"data.preferences=jsonl:{root / 'pairs.jsonl'}",
        f"train.out_dir={out}", "data.batch_size=4", "data.prefetch=1", "train.steps=10",
        "train.log_every=1", "train.eval_every=5", "train.progress=false", "checkpoint.every=5",
        "optim.lr=3e-3", "optim.warmup_steps=2", "dpo.beta=0.5", *extra])


@pytest.mark.slow
def test_dpo_through_train_raises_the_margin_and_resumes_exactly(sft_run, tmp_path):
    run = tmp_path / "dpo"
    cfg = dpo_config(sft_run, run)
    assert cfg.model.seq_len == 256 and cfg.train.init_from  # the SFT run's model
    loop.train(cfg)
    rows = rows_of(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    # step 0: the policy is the reference (precomputed in another packing: equal to float rounding)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(rows[0]["margin"]) < 1e-5
    assert (np.mean([r["margin"] for r in rows[-3:]]) > 0.5
            > np.mean([r["margin"] for r in rows[:3]]))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:  # held-out pairs, and the SFT run's held-out chats (its val_fraction split)
        assert {"val_margin", "val_accuracy", "val_pairs", "val_chat_loss", "val_bpb"} <= set(r)
        assert r["val_pairs"] == 12 and 0 <= r["val_accuracy"] <= 1 and r["val_bpb"] > 0
    assert evals[-1]["val_accuracy"] > 0.5 and evals[-1]["val_margin"] > evals[0]["val_margin"] > 0
    assert (run / "export" / "params").is_dir()

    # resume from step 5: the same losses as the unbroken run (the reference is init_from's again)
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "10")
    shutil.rmtree(again / "export")
    loop.train(dpo_config(sft_run, again))
    assert strip(rows_of(again)) == strip(rows)

    # dpo.reference=step: the reference scored in the step gives the same losses
    trainer = trainer_lib.Trainer(dpo_config(sft_run, tmp_path / "step", "dpo.reference=step"))
    assert len(trainer.frozen) == 1 and "ref_logps" not in trainer.batch(0)
    state = trainer.state_around(trainer.reference_params())
    # the held-out chats are scored as jaxgpt.evaluate scores the SFT run
    # (its val split, same windows)
    before = evaluate.evaluate(str(sft_run / "sft"))
    assert (trainer.evaluate(state.params)["bits_per_byte"]
            == pytest.approx(before["bits_per_byte"], rel=1e-6))
    for step in range(2):
        state, metrics = trainer.step(state, trainer.batch(step))
        assert float(metrics["loss"]) == pytest.approx(rows[step]["loss"], abs=1e-5)
        assert float(metrics["margin"]) == pytest.approx(rows[step]["margin"], abs=1e-5)
