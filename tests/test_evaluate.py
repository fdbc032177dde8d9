"""Tests for jaxgpt.evaluate: every target scored once, masks, the exact loss, bits per byte, the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_lines
from jaxgpt import runs, sharding
from jaxgpt.config import MeshConfig, ModelConfig
from jaxgpt.data import window_batches as eval_batches, windows
from jaxgpt.evaluate import evaluate, evaluate_batches, make_eval_step
from jaxgpt.model import GPT, token_losses
from jaxgpt.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def scored(n_tokens, seq_len, stride):
    """(target index, context length) for every target the windows score."""
    out = []
    for start, first in windows(n_tokens, seq_len, stride):
        assert 0 <= first < seq_len
        n = min(seq_len, n_tokens - 1 - start)  # targets this window has
        out += [(start + p + 1, p + 1) for p in range(first, n)]
    return out


@pytest.mark.parametrize("n_tokens", [2, 3, 8, 9, 10, 17, 64, 65, 100, 101])
@pytest.mark.parametrize("seq_len", [1, 4, 8])
@pytest.mark.parametrize("stride", [0, 1, 3, 4, 8, 20])
def test_windows_score_every_target_once(n_tokens, seq_len, stride):
    result = scored(n_tokens, seq_len, stride)
    assert sorted(t for t, _ in result) == list(range(1, n_tokens))
    effective = min(stride or seq_len, seq_len)
    for target, context in result:
        # each prediction sees all tokens so far or at least seq_len - stride + 1 of them
        assert context >= min(target, seq_len - effective + 1)


def test_windows_values():
    assert list(windows(10, 4, 4)) == [(0, 0), (4, 0), (8, 0)]
    assert list(windows(10, 4, 2)) == [(0, 0), (2, 2), (4, 2), (6, 2)]
    assert list(windows(9, 4, 0)) == [(0, 0), (4, 0)]  # stride 0 means seq_len
    assert list(windows(1, 4, 4)) == []                # a single token has no target


def test_eval_batches_shapes_and_masks():
    tokens = np.arange(1, 12)  # 11 tokens: 10 targets
    batches = list(eval_batches(tokens, seq_len=4, stride=2, batch_size=3))
    assert len(batches) == 2 and all(b["inputs"].shape == (3, 4) for b in batches)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    # windows start at 0, 2, 4, 6 (the last one has 4 targets: 7..10) and 2 padding rows fill the batch
    np.testing.assert_array_equal(rows["inputs"][:4], [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10]])
    np.testing.assert_array_equal(rows["targets"][:4], rows["inputs"][:4] + 1)
    np.testing.assert_array_equal(rows["loss_mask"][:4], [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(rows["segment_ids"][4:], 0)
    np.testing.assert_array_equal(rows["loss_mask"][4:], 0)
    assert rows["loss_mask"].sum() == 10
    # a short tail: padded positions are segment 0 and unscored
    (tail,) = list(eval_batches(np.arange(1, 7), seq_len=8, stride=8, batch_size=1))
    np.testing.assert_array_equal(tail["segment_ids"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(tail["loss_mask"][0], [1, 1, 1, 1, 1, 0, 0, 0])


def evaluate_tokens(step, params, tokens, seq_len, stride, batch_size, mesh, token_bytes=None, max_tokens=0):
    """Score a token sequence exactly, as a TokenBatches source does."""
    tokens = tokens[:max_tokens + 1] if max_tokens else tokens
    return evaluate_batches(step, params, eval_batches(tokens, seq_len, stride, batch_size), mesh, token_bytes)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(preset="llama", vocab_size=23, n_layer=2, n_head=2, d_model=16, seq_len=8).resolved()
    model = GPT(cfg)
    params = model.init(jax.random.key(0))
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    shardings = sharding.logical_to_mesh(model.logical_axes, params, mesh)
    return model, params, mesh, make_eval_step(model, mesh, shardings)


def test_evaluate_equals_the_loss_by_hand(tiny_model):
    model, params, mesh, step = tiny_model
    tokens = np.random.default_rng(0).integers(0, 23, 3 * 8 + 6)  # 3 full windows and a tail of 5 targets
    result = evaluate_tokens(step, params, tokens, 8, 0, 2, mesh)
    apply = jax.jit(model.apply)
    losses = []
    for start in range(0, len(tokens) - 1, 8):
        chunk = jnp.asarray(tokens[start:start + 9])[None]
        losses.append(np.asarray(token_losses(apply(params, chunk[:, :-1]), chunk[:, 1:]))[0])
    by_hand = np.concatenate(losses)
    assert result["tokens"] == len(tokens) - 1 == by_hand.size
    assert result["loss"] == pytest.approx(float(by_hand.mean()), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(by_hand.mean()), rel=1e-6)
    # max_tokens scores a prefix only
    assert evaluate_tokens(step, params, tokens, 8, 0, 2, mesh, max_tokens=8)["loss"] == pytest.approx(
        float(losses[0].mean()), rel=1e-6)


def test_smaller_stride_changes_context_not_count(tiny_model):
    _, params, mesh, step = tiny_model
    tokens = np.random.default_rng(1).integers(0, 23, 40)
    full, strided = (evaluate_tokens(step, params, tokens, 8, s, 4, mesh) for s in (8, 3))
    assert full["tokens"] == strided["tokens"] == 39
    assert full["loss"] != strided["loss"]


def test_bits_per_byte_counts_utf8_bytes(tiny_model):
    _, params, mesh, step = tiny_model
    text = "héllo wörld! " * 3  # é and ö take 2 bytes in UTF-8
    tok = Tokenizer.from_spec("char", corpus=text)
    assert tok.n_vocab <= 23
    tokens = tok.encode_np(text)
    result = evaluate_tokens(step, params, tokens, 8, 0, 2, mesh, tok.token_byte_lengths())
    n_bytes = len(text[1:].encode("utf-8"))  # the bytes of the scored (target) characters
    assert result["bytes"] == n_bytes > result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / n_bytes,
                                                    rel=1e-9)


@pytest.mark.slow
def test_cli_matches_the_runs_final_val_loss(tiny_run, text_file, run_env):
    run_dir, rows = tiny_run
    cfg = json.loads((run_dir / "config.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.evaluate", str(run_dir), f"data.path={text_file}",
                           f"eval.max_tokens={cfg['train']['eval_max_tokens']}"],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["split"] == "val"
    assert result["loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-4)
    assert result["bits_per_byte"] == pytest.approx(rows[-1]["val_bpb"], abs=1e-4)
    assert result["tokens"] == cfg["train"]["eval_max_tokens"]


@pytest.mark.slow
def test_cli_error_for_a_missing_run(tmp_path, run_env):
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.evaluate", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_a_plain_text_file_every_token_scored_nothing_written(tiny_run, tmp_path):
    run, _ = tiny_run
    held_out = tmp_path / "heldout"
    held_out.mkdir()
    text = "ROMEO:\nLove is the night, sweet lord.\n\nJULIET:\nGood night, good night!\n" * 4
    (held_out / "heldout.txt").write_text(text)
    result = evaluate(run, [f"data.path={held_out / 'heldout.txt'}", "eval.split=all"])
    tokenizer = runs.tokenizer(run)
    assert result["split"] == "all" and result["tokens"] == len(tokenizer.encode(text)) - 1
    assert result["bytes"] == len(text[1:].encode("utf-8"))
    assert [p.name for p in held_out.iterdir()] == ["heldout.txt"]  # no cache or shard beside the user's file
    by_hand = evaluate(run, [f"data.path={held_out / 'heldout.txt'}", "data.val_fraction=0.5"])
    assert by_hand["tokens"] < result["tokens"]  # eval.split=val: only the file's last half


def test_held_out_conversations_score_assistant_tokens_only(tiny_run, tmp_path):
    run, _ = tiny_run
    conversations = [[{"role": "user", "content": "good night"}, {"role": "assistant", "content": "sweet lord"}],
                     [{"role": "user", "content": "my love"}, {"role": "assistant", "content": "thou art fair"},
                      {"role": "user", "content": "come"}, {"role": "assistant", "content": "so be it"}]]
    path = write_lines(tmp_path / "val.jsonl", [json.dumps({"messages": c}) for c in conversations])
    result = evaluate(run, [f"data.chat_val=jsonl:{path}"])
    replies = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    assert result["tokens"] == sum(len(r) + 1 for r in replies)  # each reply and its <|assistant_end|>
    assert result["bytes"] == sum(len(r) for r in replies)      # the end token stands for no text
    assert evaluate(run, [f"data.chat=jsonl:{path}", "eval.split=all"])["loss"] == pytest.approx(result["loss"])
