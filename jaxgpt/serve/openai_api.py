"""OpenAI's API on the wire, for jaxgpt.serve: a request body's fields checked by hand so that every
mistake names its field, errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}),
usage counts, server-sent events, and log-probabilities in the two shapes its endpoints use."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import secrets
from typing import Any

from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import JaxgptError
from jaxgpt.generate.sampling import MAX_TOP_LOGPROBS, SamplingParams
from jaxgpt.generate.service import Reply

# ---- errors, in OpenAI's shape ----

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error",  # noqa: A002 - OpenAI's name
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code = type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def field_of(message: str, fallback: str) -> str:
    """The field a ValueError names: replies and SamplingParams.problem start their messages with
    it."""
    m = re.match(r"(\w+)[=:]", message)
    return m.group(1) if m else fallback


# ---- the request body: OpenAI's fields, checked by hand so every mistake names its field ----

INT, NUMBER = "an integer", "a number"
# the sampling fields a request may set (SamplingParams' names, OpenAI's where it has them)
FIELDS = {"temperature": NUMBER, "top_p": NUMBER, "top_k": INT, "min_p": NUMBER,
          "presence_penalty": NUMBER, "frequency_penalty": NUMBER, "repetition_penalty": NUMBER,
          "n": INT}


def typed_field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked to be of `kind` (an absent field or null: default)."""
    value = body.get(name)
    if value is None:
        return default
    ok = {INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
          NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "a boolean": lambda v: isinstance(v, bool),
          "a string": lambda v: isinstance(v, str),
          "an object": lambda v: isinstance(v, dict)}[kind]
    if not ok(value):
        raise ApiError(400, f"{name}: expected {kind}, got {json.dumps(value)[:80]}", name,
                       code="invalid_type")
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ApiError(400, "stop: expected a string or a list of strings", "stop", code="invalid_type")


def chat_messages(body: dict) -> list[dict]:
    """OpenAI's messages as ours: content given as a list of text parts is joined, and "developer"
    (OpenAI's newer name for the system role) is "system"; the rest is checked by Service.chat."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages: required", "messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", "messages",
                       code="invalid_type")
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in parts):
                raise ApiError(400, "messages: only text content parts are supported", "messages")
            m = {**m, "content": "".join(p["text"] for p in parts)}
        if isinstance(m, dict) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        out.append({"role": m.get("role"), "content": m.get("content")}
                   if isinstance(m, dict) else m)
    return out


def sampling_params(body: dict, defaults: SamplingParams, max_tokens: int,
                    top_logprobs: int) -> SamplingParams:
    knobs = {name: typed_field(body, name, kind, getattr(defaults, name))
             for name, kind in FIELDS.items()}
    seed = typed_field(body, "seed", INT)
    return dataclasses.replace(defaults, **knobs, max_tokens=max_tokens, stop=stop_strings(body),
                               top_logprobs=top_logprobs,
                               seed=secrets.randbelow(2 ** 31) if seed is None else seed)


def requested_max_tokens(body: dict) -> tuple[int | None, str]:
    """The requested reply length and the field it came in (max_completion_tokens is the newer
    name)."""
    for name in ("max_completion_tokens", "max_tokens"):
        if (value := typed_field(body, name, INT)) is not None:
            return value, name
    return None, "max_tokens"


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise ValueError(f"{text[:40]} is out of a number's range")
    return value


def request_body(data: bytes, model_id: str) -> dict:
    """A request's body as the JSON object it must be, naming this server's model if any."""
    try:
        # NaN, Infinity and numbers past a float's range are not JSON numbers (RFC 8259)
        body = json.loads(data, parse_constant=_not_a_number, parse_float=_finite)
    except ValueError as e:  # also invalid UTF-8, and an integer of too many digits
        raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested past the parser's depth
        raise ApiError(400, "the body is not valid JSON (nested too deeply)",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    if (model := typed_field(body, "model", "a string")) is not None and model != model_id:
        raise ApiError(404, f"model {model!r} does not exist; this server has {model_id!r}",
                       "model", code="model_not_found")
    return body


@dataclasses.dataclass(frozen=True)
class Asked:
    """What a completion request asks for besides its prompt and sampling fields."""
    kind: str                  # "chat" or "completion"
    max_tokens: int | None     # None: what the context leaves, at most the run's default
    max_field: str             # the field max_tokens came in, for error messages
    stream: bool
    include_usage: bool        # stream_options.include_usage: a last chunk with the usage
    top_logprobs: int | None   # None: no logprobs


def asked(body: dict, kind: str) -> Asked:
    max_tokens, max_field = requested_max_tokens(body)
    stream = typed_field(body, "stream", "a boolean", False)
    options = typed_field(body, "stream_options", "an object", {})
    return Asked(kind, max_tokens, max_field, stream, options.get("include_usage") is True,
                 logprob_request(body, kind))


def prompt_ids(body: dict, tokenizer: Tokenizer) -> list[int]:
    """A text completion's prompt (a string, a list of one, or token ids) as token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return as_400(lambda: tokenizer.encode(prompt), "prompt") or [tokenizer.eot_id]
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.n_vocab
            for t in prompt):
        return list(prompt)  # token ids, as OpenAI's API takes them too
    raise ApiError(400, "prompt: expected a string or a list of token ids", "prompt",
                   code="invalid_type" if prompt is not None else "missing_required_parameter")


def check_sampling(params: SamplingParams, max_field: str, slots: int) -> None:
    """A 400 naming the field (max_tokens as the request named it) of params a server refuses."""
    if problem := params.problem(slots):
        name, message = problem
        if name == "max_tokens":
            name, message = max_field, message.replace("max_tokens", max_field, 1)
        raise ApiError(400, message, name)


def as_400(call, param: str):
    """call(), turning what the tokenizer or the service refuses into a 400 that names the field."""
    try:
        return call()
    except ValueError as e:
        code = "context_length_exceeded" if "model's context" in str(e) else None
        raise ApiError(400, str(e), field_of(str(e), param), code=code) from None
    except JaxgptError as e:  # a malformed conversation, characters the tokenizer lacks
        raise ApiError(400, f"{param}: {e}", param) from None


def usage(prompt_tokens: int, replies: list[Reply]) -> dict:
    completion = sum(len(r.token_ids) for r in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


# ---- log-probabilities, in the two shapes OpenAI's endpoints use ----

def logprob_request(body: dict, kind: str) -> int | None:
    """How many top alternatives per token a request asks for (0: only the chosen token's), or
    None for no logprobs. Chat: logprobs (a boolean) and top_logprobs; completions: logprobs (a
    count)."""
    if kind == "chat":
        wanted = typed_field(body, "logprobs", "a boolean", False)
        top = typed_field(body, "top_logprobs", INT)
        if top is not None and not wanted:
            raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        name, count = "top_logprobs", (top or 0) if wanted else None
    else:
        name, count = "logprobs", typed_field(body, "logprobs", INT)
    if count is not None and not 0 <= count <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{name}: must be in [0, {MAX_TOP_LOGPROBS}], got {count}", name)
    return count


class LogprobFormat:
    """Token ids and their log-probabilities as a choice's `logprobs` (chat: {"content": [...]},
    completions: tokens / token_logprobs / top_logprobs / text_offset)."""

    def __init__(self, tokenizer: Tokenizer, kind: str):
        self.tokenizer, self.kind = tokenizer, kind

    def piece(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes; a piece of a character decodes with U+FFFD, its bytes are
        exact."""
        if self.tokenizer.is_special(token):
            text = self.tokenizer.decode([token])
            return text, text.encode("utf-8")
        raw = self.tokenizer.decode_bytes([token])
        return raw.decode("utf-8", errors="replace"), raw

    def __call__(self, ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]],
                 offset: int = 0) -> dict:
        tops = tops or [[] for _ in ids]
        if self.kind == "chat":
            def entry(token: int, logprob: float) -> dict:
                text, raw = self.piece(token)
                return {"token": text, "logprob": float(logprob), "bytes": list(raw)}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                                for t, lp, top in zip(ids, logprobs, tops, strict=False)],
                    "refusal": None}
        texts = [self.piece(t)[0] for t in ids]
        offsets = list(itertools.accumulate(map(len, texts[:-1]), initial=offset)) if texts else []
        return {"tokens": texts, "token_logprobs": [float(lp) for lp in logprobs],
                "top_logprobs": [{self.piece(a)[0]: float(alp) for a, alp in top} for top in tops],
                "text_offset": offsets}
