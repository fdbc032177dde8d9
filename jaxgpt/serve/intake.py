"""What a request body must be before any field is read (parse: UTF-8 JSON, one object, no
duplicate keys, finite numbers, nesting and text within bounds), and the OpenAI fields this server
knows but cannot honour (refuse_unsupported), refused by name rather than silently ignored. Fields
it does not know at all are ignored, as many servers and clients add their own."""
from __future__ import annotations

import json
import math
import re

from jaxgpt.serve.openai_api import INT, ApiError, typed_field

MAX_DEPTH = 32  # arrays and objects nested deeper are refused: OpenAI's bodies nest a few levels
SURROGATE = re.compile("[\ud800-\udfff]")
STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
NOT_BRACKET = re.compile(r"[^\[\]{}]+")
INNERMOST = re.compile(r"\[\]|\{\}")


def invalid(message: str, param: str | None = None, code: str = "invalid_json") -> ApiError:
    return ApiError(400, message, param, code=code)


def utf8_text(data: bytes) -> str:
    """The body as text: UTF-8 (RFC 8259), a leading byte-order mark ignored."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4]:
        # a NUL byte never starts JSON text; in the first four it is UTF-16 or UTF-32
        raise invalid("the body is not UTF-8 (it looks like UTF-16 or UTF-32); send UTF-8 JSON",
                      code="invalid_encoding")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise invalid(f"the body is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}",
                      code="invalid_encoding") from None


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise ValueError(f"{text[:40]} is out of a number's range")
    return value


def _unique(pairs: list[tuple[str, object]]) -> dict:
    body = dict(pairs)
    if len(body) < len(pairs):  # which value counts would be the parser's guess: refused
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {json.dumps(key)[:80]} appears twice in one object")
    return body


def parse(data: bytes) -> dict:
    """The JSON object a request body must be, or a 400 (code invalid_json, invalid_encoding or
    invalid_unicode) saying what is wrong with it."""
    text = utf8_text(data)
    if not text.strip():
        raise invalid("the body is empty; expected a JSON object")
    too_deep = invalid(f"the body nests arrays and objects deeper than {MAX_DEPTH} levels")
    try:
        # NaN, Infinity and numbers past a float's range are not JSON numbers (RFC 8259)
        body = json.loads(text, parse_constant=_not_a_number, parse_float=_finite,
                          object_pairs_hook=_unique)
    except ValueError as e:  # also an integer of over 4300 digits (Python's limit)
        why = "an integer of too many digits" if "integer string" in str(e) else e
        raise invalid(f"the body is not valid JSON ({why})") from None
    except RecursionError:  # nested past the parser's depth
        raise too_deep from None
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, not {type_name(body)}")
    if depth_over(text, MAX_DEPTH):
        raise too_deep
    try:  # at C's speed; the walk below only finds where
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise lone_surrogate(body) from None
    return body


def type_name(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}[type(value)]


def depth_over(text: str, limit: int) -> bool:
    """Whether valid JSON text nests arrays and objects deeper than `limit`: its brackets outside
    strings, the innermost pairs dropped `limit` times (regular expressions, at C's speed)."""
    brackets = NOT_BRACKET.sub("", STRING.sub("", text))
    for _ in range(limit):
        if not brackets:
            return False
        brackets = INNERMOST.sub("", brackets)
    return bool(brackets)


def strings(value: object, path: tuple = ()):
    """(place, text) of each string and key in value (at most MAX_DEPTH deep by now)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, (dict, list)):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str):
                yield (*path, key), key
            yield from strings(item, (*path, key))


def lone_surrogate(body: dict) -> ApiError:
    """The 400 naming where a lone surrogate (an escape such as \\ud800, half of a pair) is: no
    character, it fails wherever the text is encoded (tokenizer, database, response)."""
    path, found = next((path, m.group()) for path, text in strings(body)
                       if (m := SURROGATE.search(text)))
    return invalid(f"{where(path)}: {escaped(found)} is a lone surrogate, not a character (send "
                   "text as UTF-8, or a character past U+FFFF as a pair of escapes)",
                   param=escaped(path[0]), code="invalid_unicode")


def escaped(text: str) -> str:
    """text with each lone surrogate as its JSON escape, so that it can be sent back."""
    return SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def where(path: tuple) -> str:
    """A value's place in the body, as "messages[0].content"."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else f".{key}" if out else key
    return escaped(out)


def request_body(data: bytes, model_id: str) -> dict:
    """A request's body as the JSON object it must be, naming this server's model if any."""
    body = parse(data)
    if (model := typed_field(body, "model", "a string")) is not None and model != model_id:
        raise ApiError(404, f"model {model[:100]!r} does not exist; this server has {model_id!r}",
                       "model", code="model_not_found")
    typed_field(body, "user", "a string")  # OpenAI's end-user id: taken, and not used
    return body


# ---- OpenAI's fields that this server knows and cannot honour ----

def unsupported(name: str, why: str = "") -> ApiError:
    return ApiError(400, f"{name}: not supported by this server{why}", name,
                    code="unsupported_parameter")


def empty_or_none(body: dict, name: str, kind: str) -> None:
    """body[name] of `kind`, refused unless empty or null."""
    if typed_field(body, name, kind):
        raise unsupported(name)


def refuse_unsupported(body: dict, kind: str, n_vocab: int) -> None:
    """A 400 naming the first field that asks for what this server cannot do (tools, JSON
    output, audio, logit_bias; completions' echo, suffix, best_of > n)."""
    check_logit_bias(body, n_vocab)
    if kind == "chat":
        for name in ("tools", "functions"):
            empty_or_none(body, name, "an array")
        for name in ("tool_choice", "function_call"):
            if body.get(name) not in (None, "none", "auto"):
                raise unsupported(name, " (it has no tools)")
        empty_or_none(body, "audio", "an object")
        empty_or_none(body, "web_search_options", "an object")
        if any(m != "text" for m in typed_field(body, "modalities", "an array", [])):
            raise unsupported("modalities", ' (only ["text"])')
        response_format = typed_field(body, "response_format", "an object", {})
        if response_format.get("type", "text") != "text":
            raise unsupported("response_format", ' (only {"type": "text"})')
        return
    if typed_field(body, "echo", "a boolean"):
        raise unsupported("echo")
    empty_or_none(body, "suffix", "a string")
    best_of, n = typed_field(body, "best_of", INT), typed_field(body, "n", INT, 1)
    if best_of is not None and best_of != n:
        raise (invalid(f"best_of: must be >= n ({n}), got {best_of}", "best_of", code=None)
               if best_of < n else unsupported("best_of", " (other than n)"))


def check_logit_bias(body: dict, n_vocab: int) -> None:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) checked, then refused unless
    empty: the engine has no per-token bias."""
    bias = typed_field(body, "logit_bias", "an object", {})
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) < 10 and int(key) < n_vocab):
            raise invalid(f"logit_bias: {json.dumps(key)[:40]} is not a token id in "
                          f"[0, {n_vocab})", "logit_bias", code=None)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not -100 <= value <= 100):
            raise invalid(f"logit_bias: the bias of token {key} must be a number in [-100, 100], "
                          f"got {json.dumps(value)[:40]}", "logit_bias", code=None)
    if bias:
        raise unsupported("logit_bias")
