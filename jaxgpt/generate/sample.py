"""Prompt in, continuations out, on the command line: the generation engine's sampling with a seed.

    python -m jaxgpt.sample RUN_DIR_OR_EXPORT sample.prompt="ROMEO:" sample.num_samples=3

Decoding runs on jaxgpt.generate's KV-cache engine (the n samples share one prefill and decode
together, one slot each); past seq_len tokens the context shifts to its last seq_len // 2 tokens.
With sample.chat=true the prompt is a user message and the replies are screened (screen.*), as
in jaxgpt.talk and the server; plain continuations are not.
"""
from __future__ import annotations

from jaxgpt import cli
from jaxgpt.config import Config, SampleConfig, ScreenConfig
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen
from jaxgpt.generate.service import Service
from jaxgpt.model.gpt import GPT
from jaxgpt.store import runs


def generate(model: GPT, params, prompt_ids: list[int], max_new_tokens: int, cfg: SampleConfig,
             n: int = 1, stop_ids: tuple[int, ...] = (),
             tokenizer: Tokenizer | None = None) -> list[list[int]]:
    """n continuations of the prompt (ids only, without the prompt and the stop id), decoded
    together by the KV-cache engine from one prefill; sample i draws with
    generate.seed_of(cfg.seed, i)."""
    engine = Engine(model, params, tokenizer, slots=n)
    return engine.generate([prompt_ids], SamplingParams.from_config(cfg, max_tokens=max_new_tokens,
                                                                    n=n, stop_ids=tuple(stop_ids)))


def sample_texts(model: GPT, params, tokenizer: Tokenizer, cfg: SampleConfig, n: int | None = None,
                 max_new_tokens: int | None = None,
                 screen: ScreenConfig = ScreenConfig()) -> list[str]:
    """Continuations of cfg.prompt (prompt included), or with cfg.chat the assistant's (screened)
    replies to it."""
    if cfg.chat:
        return chat_replies(model, params, tokenizer, [{"role": "user", "content": cfg.prompt}],
                            cfg, n=n, max_new_tokens=max_new_tokens, screen=screen)
    prompt_ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
    rows = generate(model, params, prompt_ids, max_new_tokens or cfg.max_new_tokens, cfg,
                    n or cfg.num_samples, stop_ids=(tokenizer.eot_id,), tokenizer=tokenizer)
    return [cfg.prompt + tokenizer.decode(row) for row in rows]


def chat_replies(model: GPT, params, tokenizer: Tokenizer, conversation: list[dict],
                 cfg: SampleConfig, n: int | None = None, max_new_tokens: int | None = None,
                 screen: ScreenConfig = ScreenConfig()) -> list[str]:
    """The assistant's next replies to a conversation (cfg.system first, if set), screened as
    every front end screens them (jaxgpt.replies)."""
    if cfg.system and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": cfg.system}, *conversation]
    n = n or cfg.num_samples
    params_ = SamplingParams.from_config(cfg, max_tokens=max_new_tokens or cfg.max_new_tokens, n=n)
    with Service(Engine(model, params, tokenizer, slots=n), tokenizer, Screen(screen)) as service:
        return [reply.text for reply in service.chat(conversation, params_).result()]


def main(argv: list[str] | None = None) -> None:
    def run(operands, settings):
        loaded = runs.load(operands[0], settings)
        for i, text in enumerate(sample_texts(GPT(loaded.cfg.model), loaded.params,
                                              loaded.tokenizer, loaded.cfg.sample,
                                              screen=loaded.cfg.screen)):
            if loaded.cfg.sample.num_samples > 1:
                print(f"--- sample {i} ---")
            print(text)

    cli.run("python -m jaxgpt.sample", cli.Command(
        run, usage="RUN_OR_EXPORT [sample.prompt=TEXT sample.temperature=0.8 ...]", root=Config,
        sections=("sample", "screen", "model")), argv)


if __name__ == "__main__":
    main()
