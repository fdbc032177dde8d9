"""One supervised fine-tuning step of a real pretrained model: SmolLM2-135M-Instruct, converted from
its GGUF (tests/conftest.py), on a few chitchat conversations in its own chat template."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import REPO

from jaxgpt.data import chat, dialogs
from jaxgpt.model.gpt import GPT
from jaxgpt.store import runs
from jaxgpt.store.hf.weights import flatten
from jaxgpt.train import loop
from jaxgpt.train.trainer import open_run_batches


@pytest.mark.slow
def test_one_sft_step_on_smollm2(smollm2_export, tmp_path):
    _, source = smollm2_export
    conversations = dialogs.load("chitchat", limit=8).conversations
    dialogs.write_jsonl(tmp_path / "train.jsonl", conversations[:6])
    dialogs.write_jsonl(tmp_path / "val.jsonl", conversations[6:])
    cfg = loop.train_config(REPO / "experiments/configs/chat_sft.py", [
        f"train.init_from={source}", "model.seq_len=128", f"data.chat=jsonl:{tmp_path}/train.jsonl",
        f"data.chat_val=jsonl:{tmp_path}/val.jsonl", "data.batch_size=2", "train.steps=1",
        f"train.out_dir={tmp_path}/run", "train.eval_every=0", "train.log_every=1",
        "optim.warmup_steps=0", "optim.lr=1e-5"])
    cfg, batches = open_run_batches(cfg)
    batch = batches.batch_at(0)
    tok = batches.tokenizer
    # the rows are the conversations in SmolLM2's ChatML, its default system message included
    start = tok.special_id("<|im_start|>")
    assert batch["inputs"][0, 0] == start
    assert tok.decode(batch["inputs"][0, 1:12]).startswith("system\nYou are a helpful AI")
    assert chat.layout(tok).stop_ids[0] == tok.special_id("<|im_end|>")
    before = runs.load(source, ["model.seq_len=128"])
    total, count = GPT(cfg.model).loss(before.params, batch)
    metrics = loop.train(cfg, batches=batches)
    # the logged loss is the starting model's on the first batch; an instruct model that already
    # speaks starts far below a uniform guess over its vocabulary (ln 49158 = 10.8 nats)
    assert metrics["loss"] == pytest.approx(float(total / count), rel=1e-5)
    assert metrics["loss"] < 6.0
    after = flatten(jax.device_get(runs.load(tmp_path / "run").params))
    for path, x in flatten(jax.device_get(before.params)).items():
        step = np.abs(after[path] - x).max()
        assert 0 < step < 1e-4 or path == "norm_out/scale", path  # Adam moves each by ~lr
