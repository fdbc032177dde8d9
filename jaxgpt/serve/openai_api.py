"""OpenAI's API on the wire, for jaxgpt.serve: a request body's fields checked by hand so that every
mistake names its field, errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}),
usage counts, server-sent events, and log-probabilities in the two shapes its endpoints use."""
from __future__ import annotations

import dataclasses
import itertools
import json
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
          "an object": lambda v: isinstance(v, dict),
          "an array": lambda v: isinstance(v, list)}[kind]
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


# OpenAI's roles as ours: "developer" is its newer name for the system role
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(body: dict) -> list[dict]:
    """OpenAI's messages as ours, each checked here; their order is checked by Service.chat."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages: required", "messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", "messages",
                       code="invalid_type")
    return [chat_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def chat_message(m: Any, at: str) -> dict:
    """One message as {"role", "content"}: content given as a list of text parts is joined."""
    def refused(why: str) -> ApiError:
        return ApiError(400, f"{at}{why}", "messages")
    if not isinstance(m, dict):
        raise refused(f": expected an object with role and content, got {json.dumps(m)[:40]}")
    role, content = m.get("role"), m.get("content")
    if not (isinstance(role, str) and role in ROLES):
        tools = " (this server has no tools)" if role in ("tool", "function") else ""
        raise refused(f".role: expected system, developer, user or assistant, got "
                      f"{json.dumps(role)[:40]}{tools}")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise refused(".content: only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        tools = " (tool calls are not supported)" if m.get("tool_calls") else ""
        raise refused(f".content: expected a string or a list of text parts, got "
                      f"{json.dumps(content)[:40]}{tools}")
    if not isinstance(m.get("name", ""), (str, type(None))):
        raise refused(f".name: expected a string, got {json.dumps(m['name'])[:40]}")
    return {"role": ROLES[role], "content": content}


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
            if value < 1:  # as OpenAI: a reply of no tokens is no reply
                raise ApiError(400, f"{name}: must be >= 1, got {value}", name)
            return value, name
    return None, "max_tokens"


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
    if options and not stream:
        raise ApiError(400, "stream_options: only allowed with stream: true", "stream_options")
    if not isinstance(include_usage := options.get("include_usage"), (bool, type(None))):
        raise ApiError(400, "stream_options: include_usage must be a boolean", "stream_options",
                       code="invalid_type")
    return Asked(kind, max_tokens, max_field, stream, include_usage is True,
                 logprob_request(body, kind))


def prompt_ids(body: dict, tokenizer: Tokenizer) -> list[int]:
    """A text completion's prompt (a string or token ids, alone or as a list of one) as token
    ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "prompt: required", "prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise ApiError(400, f"prompt: {len(prompt)} prompts in one request are not supported; "
                                "send each in a request of its own", "prompt",
                           code="unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return as_400(lambda: tokenizer.encode(prompt), "prompt") or [tokenizer.eot_id]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt: expected a string or a non-empty list of token ids", "prompt",
                       code="invalid_type")
    for t in prompt:  # token ids, as OpenAI's API takes them too
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < tokenizer.n_vocab:
            raise ApiError(400, f"prompt: {json.dumps(t)[:40]} is not a token id in "
                                f"[0, {tokenizer.n_vocab})", "prompt", code="invalid_type")
    return list(prompt)


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
