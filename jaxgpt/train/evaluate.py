"""Exact loss, perplexity and bits per byte of a trained model over held-out data.

Every target of the split is scored exactly once (token data: windows of seq_len, see
`data.windows`; conversations: assistant tokens only). Bits per byte divide the summed loss (in
bits) by the UTF-8 bytes of the scored targets.

    python -m jaxgpt.evaluate RUN_OR_EXPORT [key=value ...]             # the run's own val split
    python -m jaxgpt.evaluate RUN data.path=heldout.txt eval.split=all  # every token of a text file
    python -m jaxgpt.evaluate RUN data.chat_val=jsonl:val.jsonl         # held-out conversations
    python -m jaxgpt.evaluate RUN data.dir=data/other                   # a prepared directory's
                                                                        # val split
    python -m jaxgpt.evaluate RUN model.weights=int4                    # the weights as the
                                                                        # engines decode them
    python -m jaxgpt.evaluate RUN tasks=jaxgpt_spelling,arc_easy        # lm-eval task scores
                                                                        # (task_scores.py)
"""
from __future__ import annotations

import json
import math
import sys

import jax
import numpy as np

from jaxgpt import cli
from jaxgpt.config import Config
from jaxgpt.data import tokens as data
from jaxgpt.errors import ConfigError
from jaxgpt.model import quant
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding
from jaxgpt.store import runs
from jaxgpt.train import task_scores


def make_eval_step(model: GPT, mesh, params_sharding):
    """eval_step(params, batch) -> (sum of masked token losses, number of masked tokens)."""
    return jax.jit(model.loss, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def evaluate_batches(eval_step, params, batches, mesh, token_bytes: np.ndarray | None = None
                     ) -> dict:
    """Exact mean loss over every masked target of `batches` (an iterable of [B, L] host dicts);
    `token_bytes[id]` (UTF-8 bytes per token id) gives bits per byte of the masked targets."""
    total, count, n_bytes = 0.0, 0.0, 0
    for batch in batches:
        # the global batch must split over the data-parallel devices
        batch = sharding.padded(batch, mesh)
        loss_sum, n = eval_step(params, sharding.put_batch(batch, mesh))
        total, count = total + float(loss_sum), count + float(n)
        if token_bytes is not None:
            n_bytes += int((token_bytes[batch["targets"]] * (batch["loss_mask"] > 0)).sum())
    mean = total / max(count, 1)
    out = {"tokens": int(count), "loss": mean, "perplexity": math.exp(min(mean, 700))}
    if token_bytes is not None:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = total / math.log(2) / max(n_bytes, 1)
    return out


def evaluate_source(batches, cfg: Config, eval_step, params, mesh, split: str,
                    max_tokens: int) -> dict:
    """Score a split of a batch source (data.TokenBatches or chat.ChatBatches) as cfg.eval says."""
    with sharding.on_mesh(mesh):
        return evaluate_batches(eval_step, params,
                                batches.eval_batches(split, cfg.eval_batch_size,
                                                     cfg.eval.stride, max_tokens),
                                mesh, batches.token_bytes)


# Where a config's data comes from; data named in the overrides replaces all of the run's.
DATA_SOURCES = ("data.path", "data.dir", "data.val_dir", "data.chat", "data.chat_val")


def evaluate(source: str, overrides: list[str] = ()) -> dict:
    """What the command line prints: a trained model (runs.load) scored on the data its config
    names, the model's own tokenizer tokenizing it. Data named in `overrides`
    (data.path=heldout.txt, data.chat_val=...) replaces the run's data whole: a run trained on
    data.dir with a data.val_dir is then scored on that file alone."""
    if any(o.split("=", 1)[0].lstrip("-") in DATA_SOURCES for o in overrides):
        overrides = [f"{key}=" for key in DATA_SOURCES] + list(overrides)
    loaded = runs.load(source, overrides, on_mesh=True)
    cfg, mesh = loaded.cfg, loaded.mesh
    batches = data.open_batches(cfg, loaded.tokenizer, training=False)
    model, params = GPT(cfg.model), loaded.params
    if cfg.model.weights != "float":  # scored as the engines decode: quantized, on one device
        if mesh.size > 1:
            raise ConfigError(f"model.weights={cfg.model.weights} is scored on one device; on a "
                              "mesh use model.weights=float")
        model, params = model.for_decoding(params)
        params = quant.decode_params(model, params)
        step = jax.jit(model.loss)
    else:
        params_sharding = jax.tree.map(lambda x: x.sharding, params)
        with sharding.on_mesh(mesh):
            step = make_eval_step(model, mesh, params_sharding)
    result = evaluate_source(batches, cfg, step, params, mesh, cfg.eval.split,
                             cfg.eval.max_tokens)
    return {"split": cfg.eval.split, "weights": cfg.model.weights, **result}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if task_scores.asks_for_tasks(argv):
        return task_scores.main(argv)
    cli.run("python -m jaxgpt.evaluate", cli.Command(
        lambda operands, settings: print(json.dumps(evaluate(operands[0], settings))),
        usage="RUN_OR_EXPORT [key=value ...]\n   or: python -m jaxgpt.evaluate "
              + task_scores.USAGE, root=Config,
        sections=("data", "eval", "mesh", "model")), argv)


if __name__ == "__main__":
    main()
