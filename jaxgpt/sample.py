"""Prompt in, continuations out: temperature, top-k and top-p (nucleus) sampling with a seed.

    python -m jaxgpt.sample RUN_DIR_OR_EXPORT sample.prompt="ROMEO:" sample.num_samples=3

Each new token runs the model over a fixed [S, L] window (the last L tokens), so one compiled
function serves every length; without a KV cache every token recomputes the whole window.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import chat, cli, runs
from jaxgpt.config import Config, SampleConfig
from jaxgpt.model import GPT
from jaxgpt.tokenizer import Tokenizer


def filter_logits(logits_SxV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Logits with everything outside top-k / the top-p nucleus at -inf, scaled by 1/temperature."""
    logits_SxV = logits_SxV.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k:
        kth_SxK = jax.lax.top_k(logits_SxV, min(top_k, logits_SxV.shape[-1]))[0]
        logits_SxV = jnp.where(logits_SxV < kth_SxK[:, -1:], -jnp.inf, logits_SxV)
    if top_p < 1.0:
        sorted_SxV = jnp.sort(logits_SxV, axis=-1)[:, ::-1]
        probs_SxV = jax.nn.softmax(sorted_SxV, axis=-1)
        # keep a token while the mass before it is below top_p (the top token always stays)
        before_SxV = jnp.cumsum(probs_SxV, axis=-1) - probs_SxV
        cutoff_Sx1 = jnp.min(jnp.where(before_SxV < top_p, sorted_SxV, jnp.inf), axis=-1, keepdims=True)
        logits_SxV = jnp.where(logits_SxV < cutoff_Sx1, -jnp.inf, logits_SxV)
    return logits_SxV


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p"))
def _next_tokens(model: GPT, params, window_SxL, length, rng, temperature, top_k, top_p):
    segments_SxL = (jnp.arange(window_SxL.shape[1]) < length).astype(jnp.int32)[None].repeat(window_SxL.shape[0], 0)
    logits_SxLxV = model.apply(params, window_SxL, segments_SxL)
    logits_SxV = jax.lax.dynamic_index_in_dim(logits_SxLxV, length - 1, axis=1, keepdims=False)
    logits_SxV = logits_SxV[:, :model.cfg.vocab_size]
    if temperature == 0:
        return jnp.argmax(logits_SxV, axis=-1)
    return jax.random.categorical(rng, filter_logits(logits_SxV, temperature, top_k, top_p), axis=-1)


def generate(model: GPT, params, prompt_ids: list[int], max_new_tokens: int, cfg: SampleConfig,
             n: int = 1, stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """n continuations of the prompt (ids only, without the prompt)."""
    L = model.cfg.seq_len
    tokens = np.tile(np.asarray(prompt_ids, np.int32), (n, 1))
    rng = jax.random.key(cfg.seed)
    done = np.zeros(n, bool)
    for _ in range(max_new_tokens):
        window = tokens[:, -L:]
        length = window.shape[1]
        padded = np.zeros((n, L), np.int32)
        padded[:, :length] = window
        rng, step_rng = jax.random.split(rng)
        nxt = np.asarray(_next_tokens(model, params, padded, length, step_rng,
                                      cfg.temperature, cfg.top_k, cfg.top_p))
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        done |= np.isin(nxt, stop_ids)
        if done.all():
            break
    out = []
    for row in tokens[:, len(prompt_ids):].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(row[:cut])
    return out


def sample_texts(model: GPT, params, tokenizer: Tokenizer, cfg: SampleConfig, n: int | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
    """Continuations of cfg.prompt (prompt included), or with cfg.chat the assistant's replies to it."""
    if cfg.chat:
        return chat_replies(model, params, tokenizer, [{"role": "user", "content": cfg.prompt}], cfg,
                            n=n, max_new_tokens=max_new_tokens)
    prompt_ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
    rows = generate(model, params, prompt_ids, max_new_tokens or cfg.max_new_tokens, cfg,
                    n or cfg.num_samples, stop_ids=(tokenizer.eot_id,))
    return [cfg.prompt + tokenizer.decode(row) for row in rows]


def chat_replies(model: GPT, params, tokenizer: Tokenizer, conversation: list[dict], cfg: SampleConfig,
                 n: int | None = None, max_new_tokens: int | None = None) -> list[str]:
    """The assistant's next reply to a conversation, rendered with the chat template."""
    prompt_ids, _ = chat.render(conversation, tokenizer, for_generation=True)
    stop = (tokenizer.special_id("<|assistant_end|>"), tokenizer.eot_id)
    rows = generate(model, params, prompt_ids.tolist(), max_new_tokens or cfg.max_new_tokens, cfg,
                    n or cfg.num_samples, stop_ids=stop)
    return [tokenizer.decode([t for t in row if not tokenizer.is_special(t)]) for row in rows]


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        loaded = runs.load(operands[0], settings)
        for i, text in enumerate(sample_texts(GPT(loaded.cfg.model), loaded.params, loaded.tokenizer,
                                              loaded.cfg.sample)):
            if loaded.cfg.sample.num_samples > 1:
                print(f"--- sample {i} ---")
            print(text)

    cli.run("python -m jaxgpt.sample", cli.Command(
        run, usage="RUN_OR_EXPORT [sample.prompt=TEXT sample.temperature=0.8 ...]", root=Config,
        sections=("sample", "model")), argv)


if __name__ == "__main__":
    main()
