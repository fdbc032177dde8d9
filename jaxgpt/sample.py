"""Prompt in, continuations out: temperature, top-k and top-p (nucleus) sampling with a seed.

    python -m jaxgpt.sample RUN_DIR_OR_EXPORT sample.prompt="ROMEO:" sample.num_samples=3

Decoding runs on jaxgpt.generate's KV-cache engine (the n samples decode together, one slot
each); past seq_len tokens the context shifts to its last seq_len // 2 tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt import chat, cli, runs
from jaxgpt.config import Config, SampleConfig
from jaxgpt.generate import Engine, SamplingParams
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


def generate(model: GPT, params, prompt_ids: list[int], max_new_tokens: int, cfg: SampleConfig,
             n: int = 1, stop_ids: tuple[int, ...] = (), tokenizer: Tokenizer | None = None) -> list[list[int]]:
    """n continuations of the prompt (ids only, without the prompt and the stop id), decoded
    together by the KV-cache engine; sample i draws with its own seed derived from cfg.seed."""
    engine = Engine(model, params, tokenizer, slots=n)
    params_n = [SamplingParams.from_config(cfg, max_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                                           seed=hash((cfg.seed, i)) & 0x7FFFFFFF) for i in range(n)]
    return engine.generate([prompt_ids] * n, params_n)


def sample_texts(model: GPT, params, tokenizer: Tokenizer, cfg: SampleConfig, n: int | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
    """Continuations of cfg.prompt (prompt included), or with cfg.chat the assistant's replies to it."""
    if cfg.chat:
        return chat_replies(model, params, tokenizer, [{"role": "user", "content": cfg.prompt}], cfg,
                            n=n, max_new_tokens=max_new_tokens)
    prompt_ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
    rows = generate(model, params, prompt_ids, max_new_tokens or cfg.max_new_tokens, cfg,
                    n or cfg.num_samples, stop_ids=(tokenizer.eot_id,), tokenizer=tokenizer)
    return [cfg.prompt + tokenizer.decode(row) for row in rows]


def chat_replies(model: GPT, params, tokenizer: Tokenizer, conversation: list[dict], cfg: SampleConfig,
                 n: int | None = None, max_new_tokens: int | None = None) -> list[str]:
    """The assistant's next reply to a conversation, rendered with the chat template."""
    prompt_ids, _ = chat.render(conversation, tokenizer, for_generation=True)
    stop = (tokenizer.special_id("<|assistant_end|>"), tokenizer.eot_id)
    rows = generate(model, params, prompt_ids.tolist(), max_new_tokens or cfg.max_new_tokens, cfg,
                    n or cfg.num_samples, stop_ids=stop, tokenizer=tokenizer)
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
