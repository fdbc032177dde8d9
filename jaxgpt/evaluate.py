"""Exact loss, perplexity and bits per byte over a whole token sequence.

Every token after the first is scored exactly once. Windows of `seq_len` tokens start every
`stride` tokens; a window scores only the targets that no earlier window scored, so with
stride < seq_len each token is predicted from at least seq_len - stride tokens of context.

    python -m jaxgpt.evaluate RUN_DIR_OR_EXPORT [key=value ...]   # prints one JSON line
"""
from __future__ import annotations

import json
import math
import sys

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt.model import GPT


def windows(n_tokens: int, seq_len: int, stride: int):
    """(start, first scored position) of each window covering targets 1..n_tokens-1 once."""
    stride = min(stride or seq_len, seq_len)
    start, covered = 0, 0  # covered: targets with index <= covered are scored
    while covered < n_tokens - 1:
        first = covered - start  # window position whose target is token `covered + 1`
        yield start, first
        covered = min(start + seq_len, n_tokens - 1)
        start += stride


def eval_batches(tokens: np.ndarray, seq_len: int, stride: int, batch_size: int):
    """[B, L] batches of the windows; padding (segment 0, mask 0) fills the tails."""
    rows = []
    for start, first in windows(len(tokens), seq_len, stride):
        chunk = np.asarray(tokens[start:start + seq_len + 1], dtype=np.int32)
        n = len(chunk) - 1
        row = {k: np.zeros(seq_len, dt) for k, dt in
               (("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32), ("loss_mask", np.float32))}
        row["inputs"][:n], row["targets"][:n], row["segment_ids"][:n] = chunk[:-1], chunk[1:], 1
        row["loss_mask"][first:n] = 1
        rows.append(row)
        if len(rows) == batch_size:
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            rows = []
    if rows:
        rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - len(rows))
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_eval_step(model: GPT, mesh, params_sharding):
    return jax.jit(model.loss, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def evaluate_batches(eval_step, params, batches, mesh, token_bytes: np.ndarray | None = None) -> dict:
    """Exact mean loss over every masked target of `batches` (an iterable of [B, L] host dicts);
    `token_bytes[id]` (UTF-8 bytes per token id) gives bits per byte of the masked targets."""
    # the global batch must split evenly over the data-parallel devices: pad with empty rows
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    total, count, n_bytes = 0.0, 0.0, 0
    for batch in batches:
        pad = -len(batch["inputs"]) % shards
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
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


def evaluate_tokens(eval_step, params, tokens: np.ndarray, seq_len: int, stride: int, batch_size: int,
                    mesh, token_bytes: np.ndarray | None = None, max_tokens: int = 0) -> dict:
    """Score a token sequence exactly (see `windows`)."""
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    return evaluate_batches(eval_step, params, eval_batches(tokens, seq_len, stride, batch_size), mesh, token_bytes)


def main(argv: list[str] | None = None) -> None:
    from jaxgpt import cli, data, export

    def run(args):
        source, overrides = args[0], args[1:]
        cfg, params, tokenizer = export.load_for_inference(source, overrides)
        mesh = sharding.make_mesh(cfg.mesh)
        model = GPT(cfg.model)
        params_sharding = sharding.logical_to_mesh(model.logical_axes, params, mesh)
        params = jax.device_put(params, params_sharding)
        token_data = data.load(cfg.data)
        data.check_same_tokenizer(token_data.tokenizer, tokenizer)
        with sharding.activate(mesh):
            step = make_eval_step(model, mesh, params_sharding)
            result = evaluate_tokens(step, params, token_data.split(cfg.eval.split), cfg.model.seq_len,
                                     cfg.eval.stride, cfg.eval.batch_size or cfg.data.batch_size, mesh,
                                     tokenizer.token_byte_lengths(), cfg.eval.max_tokens)
        print(json.dumps({"split": cfg.eval.split, **result}))

    cli.run(run, argv if argv is not None else sys.argv[1:],
            usage="python -m jaxgpt.evaluate RUN_DIR_OR_EXPORT [key=value ...]")


if __name__ == "__main__":
    main()
