"""Tests for jaxgpt.evaluate: the exact loss, bits per byte, and scoring any data (text file,
conversations), the CLI."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_lines

from jaxgpt.config import MeshConfig, ModelConfig
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.data.tokens import window_batches as eval_batches
from jaxgpt.model import quant
from jaxgpt.model.gpt import GPT, token_losses
from jaxgpt.parallel import sharding
from jaxgpt.store import runs
from jaxgpt.train.evaluate import evaluate, evaluate_batches, make_eval_step

REPO = Path(__file__).resolve().parents[2]


def evaluate_tokens(step, params, tokens, seq_len, stride, batch_size, mesh, token_bytes=None,
                    max_tokens=0):
    """Score a token sequence exactly, as a TokenBatches source does."""
    tokens = tokens[:max_tokens + 1] if max_tokens else tokens
    return evaluate_batches(step, params, eval_batches(tokens, seq_len, stride, batch_size), mesh,
                            token_bytes)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(preset="llama", vocab_size=23, n_layer=2, n_head=2, d_model=16,
                      seq_len=8).resolved()
    model = GPT(cfg)
    params = model.init(jax.random.key(0))
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    shardings = sharding.logical_to_mesh(model.logical_axes, params, mesh)
    return model, params, mesh, make_eval_step(model, mesh, shardings)


def test_evaluate_equals_the_loss_by_hand(tiny_model):
    model, params, mesh, step = tiny_model
    # 3 full windows and a tail of 5 targets
    tokens = np.random.default_rng(0).integers(0, 23, 3 * 8 + 6)
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
    prefix = evaluate_tokens(step, params, tokens, 8, 0, 2, mesh, max_tokens=8)
    assert prefix["loss"] == pytest.approx(float(losses[0].mean()), rel=1e-6)


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
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / n_bytes, rel=1e-9)


@pytest.mark.slow
def test_cli_matches_the_runs_final_val_loss(tiny_run, text_file, run_env):
    run_dir, rows = tiny_run
    cfg = json.loads((run_dir / "config.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.evaluate", str(run_dir),
                           f"data.path={text_file}",
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
    tokenizer = runs.load_tokenizer(run)
    assert result["split"] == "all" and result["tokens"] == len(tokenizer.encode(text)) - 1
    assert result["bytes"] == len(text[1:].encode("utf-8"))
    # no cache or shard beside the user's file
    assert [p.name for p in held_out.iterdir()] == ["heldout.txt"]
    half = evaluate(run, [f"data.path={held_out / 'heldout.txt'}", "data.val_fraction=0.5"])
    assert half["tokens"] < result["tokens"]  # eval.split=val: only the file's last half


def test_quantized_weights_are_scored_as_the_engine_decodes_them(tiny_run, tmp_path):
    run, _ = tiny_run
    text = "ROMEO:\nLove is the night, sweet lord.\n\nJULIET:\nGood night, good night!\n" * 4
    (tmp_path / "heldout.txt").write_text(text)
    data_keys = [f"data.path={tmp_path / 'heldout.txt'}", "eval.split=all"]
    plain = evaluate(run, data_keys)
    int8 = evaluate(run, [*data_keys, "model.weights=int8"])
    # by hand: the engine's weights (quant.decode_params) under the model's loss, one window
    loaded = runs.load(run, [*data_keys, "model.weights=int8"])
    model, params = GPT(loaded.cfg.model).for_decoding(loaded.params)
    params = quant.decode_params(model, params)
    assert "w_q" in params["block_0"]["mlp"]["w_up"] and "w" not in params["block_0"]["mlp"]["w_up"]
    ids = np.asarray(loaded.tokenizer.encode(text))
    L = loaded.cfg.model.seq_len
    chunks = [jnp.asarray(ids[s:s + L + 1])[None] for s in range(0, len(ids) - 1, L)]
    losses = [np.asarray(token_losses(model.apply(params, c[:, :-1]), c[:, 1:]))[0]
              for c in chunks]
    by_hand = np.concatenate(losses)
    assert (plain["weights"], int8["weights"]) == ("float", "int8")
    assert int8["tokens"] == plain["tokens"] == by_hand.size
    assert int8["loss"] == pytest.approx(float(by_hand.mean()), rel=1e-5)
    assert int8["loss"] != plain["loss"]


def test_held_out_conversations_score_assistant_tokens_only(tiny_run, tmp_path):
    run, _ = tiny_run
    conversations = [[{"role": "user", "content": "good night"},
                      {"role": "assistant", "content": "sweet lord"}],
                     [{"role": "user", "content": "my love"},
                      {"role": "assistant", "content": "thou art fair"},
                      {"role": "user", "content": "come"},
                      {"role": "assistant", "content": "so be it"}]]
    path = write_lines(tmp_path / "val.jsonl", [json.dumps({"messages": c}) for c in conversations])
    result = evaluate(run, [f"data.chat_val=jsonl:{path}"])
    replies = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    # each reply and its <|assistant_end|>
    assert result["tokens"] == sum(len(r) + 1 for r in replies)
    assert result["bytes"] == sum(len(r) for r in replies)  # the end token stands for no text
    assert (evaluate(run, [f"data.chat=jsonl:{path}", "eval.split=all"])["loss"]
            == pytest.approx(result["loss"]))


def test_data_named_on_the_command_line_replaces_the_runs_data(tiny_run, tmp_path):
    """A run trained on a prepared directory (with a separate val_dir) scores a text file named by
    data.path alone, not the run's directories."""
    run, _ = tiny_run
    export = tmp_path / "export"
    shutil.copytree(run / "export", export)
    saved = json.loads((export / "config.json").read_text())
    saved["data"].update(path="", dir=str(tmp_path / "gone"), val_dir=str(tmp_path / "gone_val"))
    (export / "config.json").write_text(json.dumps(saved))
    (tmp_path / "heldout.txt").write_text("Good night, sweet lord.\n" * 8)
    result = evaluate(export, [f"data.path={tmp_path / 'heldout.txt'}", "eval.split=all"])
    # the char tokenizer: one token a character
    assert result["tokens"] == len("Good night, sweet lord.\n" * 8) - 1


def test_a_prepared_directory_in_the_models_tokenizer(tiny_run, tmp_path):
    from jaxgpt.config import PrepareConfig
    from jaxgpt.data import prepare
    run, _ = tiny_run
    text = tmp_path / "more.txt"
    text.write_text("".join(f"ROMEO:\nGood night, sweet lord {'!' * i}\n\n" for i in range(40)))
    meta = prepare.prepare(PrepareConfig(source=f"text:{text}", tokenizer=str(run),
                                         out=str(tmp_path / "prepared"), val_fraction=0.5,
                                         doc_split="paragraph", workers=1, progress=False))
    result = evaluate(run, [f"data.dir={tmp_path / 'prepared'}"])
    assert result["split"] == "val" and result["tokens"] == meta["splits"]["val"]["tokens"] - 1 > 0
