"""A trained jaxgpt model as an lm-eval (lm-evaluation-harness) model, registered as "jaxgpt".

    import lm_eval
    from jaxgpt.train import lm_eval_backend  # noqa: F401 (registers "jaxgpt")
    lm_eval.simple_evaluate(model="jaxgpt", model_args={"source": "runs/x"}, tasks=["arc_easy"])

or on the command line `python -m jaxgpt.evaluate RUN tasks=arc_easy,jaxgpt_spelling` (the command
and the built-in tasks: task_scores.py).

Model args: `source` (a run directory, checkpoint or export, as runs.load takes), `batch_size`
(rows a forward pass scores, and the engine's slots), `max_length` (tokens of context; default the
model's seq_len), `stride` (rolling windows' step, 0: max_length, as eval.stride) and `overrides`
(runs.load's `section.key=value` settings, space-separated in a model_args string).

- loglikelihood: log p(continuation | context) summed over the continuation's tokens, and whether
  greedy decoding gives it; context and continuation are tokenized together as lm-eval's
  TemplateLM does, and a context too long for max_length loses its oldest tokens.
- loglikelihood_rolling: the text after the end-of-text id, scored in windows of max_length as
  jaxgpt's own evaluation scores a file (data.tokens.windows): every token once.
- generate_until: the KV-cache engine, greedy unless the request samples; the reply is cut at the
  first stop string (or the end-of-text id), as lm-eval cuts a decoded reply; a prompt in the chat
  template (it holds a user message's start) also ends at the template's stop ids, as talk does.
- apply_chat_template (lm-eval's apply_chat_template=True): the messages rendered by jaxgpt's chat
  template (data/chat.py: the model's own format, jaxgpt's, ChatML or Llama 3's) as text whose
  special tokens tok_encode reads back as their ids, so the prompt is the one talk would send.
All scoring goes through one jitted function over [batch_size, L] rows padded on the right (L a
power-of-two bucket up to max_length, so a few compiles serve every length).

lm_eval is imported at the top: this module is only ever imported when lm-eval is wanted.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from jaxgpt.data import chat
from jaxgpt.data.tokens import windows
from jaxgpt.errors import ConfigError
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.text import TextStream
from jaxgpt.model.gpt import GPT, token_losses
from jaxgpt.store import runs

MIN_BUCKET = 16
DEFAULT_BATCH_SIZE = 8
# lm-eval's own default for a request that names no max_gen_toks
DEFAULT_MAX_GEN_TOKS = 256


@functools.partial(jax.jit, static_argnums=0)
def score_rows(model: GPT, params, inputs_BxL, targets_BxL, mask_BxL):
    """(sum of the masked targets' log-probabilities, whether every masked target is the argmax)
    of each row; rows hold one document each, padded on the right, so causal attention alone
    keeps padding out of every real position."""
    logits_BxLxV = model.apply(params, inputs_BxL)
    chosen_BxL = -token_losses(logits_BxLxV, targets_BxL)  # the loss's own log-probabilities
    greedy_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL) | (mask_BxL == 0)
    return (chosen_BxL * mask_BxL).sum(axis=-1), greedy_BxL.all(axis=-1)


def bucket(n: int, max_length: int) -> int:
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_length)


def positive_int(name: str, value, default: int) -> int:
    """A model arg as a positive int (lm-eval passes numbers, strings or None)."""
    if value in (None, "", "auto"):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise ConfigError(f"model arg {name}={value!r}: must be a positive integer")
    return number


@register_model("jaxgpt")
class JaxgptLM(TemplateLM):
    """lm-eval's LM interface over runs.load(source, overrides); see the module's docstring."""

    def __init__(self, source: str, batch_size=None, max_length=None, stride=0, overrides=(),
                 max_batch_size=None, device=None, **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"model args {', '.join(sorted(unknown))}: unknown to jaxgpt (it "
                              "takes source, batch_size, max_length, stride, overrides)")
        if isinstance(overrides, str):
            overrides = overrides.split()
        loaded = runs.load(str(source), list(overrides))
        self.cfg, self.params, self.tokenizer = loaded.cfg, loaded.params, loaded.tokenizer
        self.model = GPT(loaded.cfg.model)
        seq_len = loaded.cfg.model.seq_len
        self.batch_size = positive_int("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        self.max_length = positive_int("max_length", max_length, seq_len)
        if self.max_length > seq_len:
            raise ConfigError(f"model arg max_length={self.max_length}: at most the model's "
                              f"seq_len ({seq_len})")
        self.stride = min(int(stride or 0) or self.max_length, self.max_length)
        self.max_gen_toks = DEFAULT_MAX_GEN_TOKS
        self._engine: Engine | None = None

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @functools.cached_property
    def _specials(self) -> re.Pattern:
        names = sorted(self.tokenizer.specials, key=len, reverse=True)  # the longest name first
        return re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """The ids of string, a special token's name read as its id (as a Hugging Face tokenizer
        reads its added tokens): a rendered chat prompt encodes back to its own ids."""
        ids = []
        for n, piece in enumerate(self._specials.split(string)):
            ids += [self.tokenizer.specials[piece]] if n % 2 else self.tokenizer.encode(piece)
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # ---- the chat template ----

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval's request cache keys chat prompts by."""
        return f"{self.tokenizer.name}-{self.tokenizer.fingerprint[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The chat format's name (lm-eval logs it); the template itself is data/chat.py's."""
        return self.tokenizer.chat_format if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True
                            ) -> str:
        """The messages in the model's chat template, the assistant's turn opened (or, without
        add_generation_prompt, a last assistant message left open for the model to go on)."""
        messages = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        ids, _ = chat.render(messages, self.tokenizer, for_generation=add_generation_prompt)
        end = chat.layout(self.tokenizer).end["assistant"]
        if not add_generation_prompt and messages[-1]["role"] == "assistant":
            ids = ids[:len(ids) - len(end)]
        return self.tokenizer.decode(ids)

    # ---- scoring ----

    def score(self, rows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each row (inputs, targets, first scored position), in
        batches of batch_size rows of similar length."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        B = self.batch_size
        for at in range(0, len(order), B):
            chunk = order[at:at + B]
            L = bucket(len(rows[chunk[0]][0]), self.max_length)
            inputs, targets = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
            mask = np.zeros((B, L), np.float32)
            for b, i in enumerate(chunk):
                row_inputs, row_targets, first = rows[i]
                inputs[b, :len(row_inputs)], targets[b, :len(row_targets)] = row_inputs, row_targets
                mask[b, first:len(row_targets)] = 1
            sums, greedy = score_rows(self.model, self.params, inputs, targets, mask)
            sums, greedy = np.asarray(sums), np.asarray(greedy)
            for b, i in enumerate(chunk):
                out[i] = (float(sums[b]), bool(greedy[b]))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), as TemplateLM's
        loglikelihood tokenizes them."""
        rows = []
        for _, context, continuation in requests:
            # a context of spaces alone tokenizes to nothing: condition on end-of-text, as for ""
            context = list(context) or [self.prefix_token_id]
            # the oldest context goes first
            whole = (context + list(continuation))[-(self.max_length + 1):]
            inputs, targets = whole[:-1], whole[1:]
            rows.append((inputs, targets, len(targets) - min(len(continuation), len(targets))))
        results = self.score(rows)
        for (pair, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            tokens = [self.prefix_token_id, *self.tok_encode(text)]
            for start, first in windows(len(tokens), self.max_length, self.stride):
                chunk = tokens[start:start + self.max_length + 1]
                rows.append((chunk[:-1], chunk[1:], first))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self.score(rows), strict=True):
            totals[n] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ----

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.params, self.tokenizer, slots=self.batch_size)
        return self._engine

    def stop_ids(self, prompt: list[int]) -> tuple[int, ...]:
        """End-of-text, and the chat template's stops (the assistant's end, a user's start) for a
        prompt in the template: a chat model's reply ends there, not at end-of-text."""
        lay = chat.layout(self.tokenizer)
        return lay.stop_ids if lay.start["user"][0] in prompt else (self.eot_token_id,)

    def sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, tuple[str, ...]]:
        """The engine's settings (stop ids aside: stop_ids) and the stop strings of one request's
        generation kwargs."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        eos = self.tokenizer.decode([self.eot_token_id])
        until = handle_stop_sequences(list(kwargs.get("until") or []), eos=eos)
        sample = bool(kwargs.get("do_sample"))
        params = SamplingParams(max_tokens=int(kwargs["max_gen_toks"]),
                                temperature=float(kwargs.get("temperature") or 0) if sample else 0,
                                top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                                top_p=float(kwargs.get("top_p") or 1) if sample else 1,
                                seed=int(kwargs.get("seed") or 0))
        return params, tuple(s for s in until if s)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request submitted at once; the engine decodes batch_size of them together, and a
        reply ends at its first stop string, its end-of-text id or max_gen_toks."""
        engine, streams = self.engine(), {}
        for n, request in enumerate(requests):
            context, gen_kwargs = request.args
            params, stop = self.sampling(gen_kwargs)
            # room for the reply, though never less than half the context: the engine shifts
            # its context when the cache fills
            keep = max(self.max_length - params.max_tokens, self.max_length // 2, 1)
            prompt = self.tok_encode(context) or [self.eot_token_id]
            params = dataclasses.replace(params, stop_ids=self.stop_ids(prompt))
            [rid] = engine.submit(prompt[-keep:], params)
            streams[rid] = (n, TextStream(self.tokenizer, stop))
        while engine.busy:
            for rid, ids in engine.step().items():
                stream = streams[rid][1]
                stream.add(ids)
                if stream.finish_reason == "stop":
                    engine.cancel(rid)
        replies = [""] * len(requests)
        for rid, (n, stream) in streams.items():
            engine.requests.pop(rid)
            stream.finish()
            replies[n] = stream.text
            self.cache_hook.add_partial("generate_until", requests[n].args, stream.text)
        return replies
