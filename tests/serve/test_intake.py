"""The server's contract for bad requests (jaxgpt.serve.intake, openai_api, app): every refused
field and every kind of body that cannot be read gets a 4xx in OpenAI's shape naming the field or
the problem, never a 500 or plain text, and the server goes on serving. A real uvicorn server on a
free local port; raw bodies (bad bytes, chunked, cut short) go over a plain socket."""
import asyncio
import json
import logging
import socket
import time

import jax
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from conftest import serving  # noqa: E402

from jaxgpt.config import ModelConfig  # noqa: E402
from jaxgpt.data.tokenizer import Tokenizer  # noqa: E402
from jaxgpt.generate.engine import Engine  # noqa: E402
from jaxgpt.generate.service import Service  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.serve import app as app_module  # noqa: E402
from jaxgpt.serve import intake  # noqa: E402
from jaxgpt.serve.app import ServeConfig, make_app  # noqa: E402
from jaxgpt.serve.openai_api import ApiError  # noqa: E402

KEY = "sk-test"
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hello there"}]
LIMIT = 20_000  # serve.max_body_bytes of the server here


@pytest.fixture(scope="module")
def served():
    """(base URL, service) of a 2-slot server over test_app.py's tiny model (its steps cached)."""
    tok = Tokenizer.from_spec("char", corpus="abcdefghijklmnopqrstuvwxyz .,!?")
    cfg = ModelConfig(preset="gpt2", vocab_size=tok.n_vocab, n_layer=2, n_head=2, d_model=32,
                      seq_len=64).resolved()
    model = GPT(cfg)
    with Service(Engine(model, model.init(jax.random.key(3)), tok, slots=2), tok) as service, \
            serving(make_app(service, tok, ServeConfig(slots=2, api_key=KEY,
                                                       max_body_bytes=LIMIT), "tiny")) as url:
        yield url, service


@pytest.fixture(scope="module")
def api(served):
    with httpx.Client(base_url=served[0], headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as client:
        yield client


def openai_error(status: int, body: bytes) -> dict:
    """The "error" of an OpenAI-shaped error body, checked to be one."""
    assert 400 <= status < 500, (status, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == "invalid_request_error", error
    return error


def still_serving(api) -> None:
    assert api.get("/health").status_code == 200


# ---- every refused field: (path, body, param, words the message holds); all 400 ----

BIG = 2 ** 40
FIELDS = [
    (CHAT, {"messages": MESSAGES, "model": 5}, "model", "expected a string"),
    (CHAT, {"max_tokens": 5}, "messages", "required"),
    (CHAT, {"messages": []}, "messages", "non-empty list"),
    (CHAT, {"messages": {"role": "user", "content": "hi"}}, "messages", "non-empty list"),
    (CHAT, {"messages": ["hi"]}, "messages", "messages[0]: expected an object"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages", "no tools"),
    (CHAT, {"messages": [{"role": ["user"], "content": "x"}]}, "messages", "messages[0].role"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages", "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, "messages", "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages", "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages", "only text content parts"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages", "only text content parts"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages",
     "messages[0].name"),
    (CHAT, {"messages": [*MESSAGES, {"role": "assistant", "content": "yo"}]}, "messages",
     "last message must be the user"),
    (CHAT, {"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages", "vocabulary"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 0}, "max_tokens", ">= 1"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 5.0}, "max_tokens", "integer"),
    (CHAT, {"messages": MESSAGES, "max_tokens": True}, "max_tokens", "integer"),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": "5"}, "max_completion_tokens", "int"),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": BIG}, "messages", "context"),
    (CHAT, {"messages": MESSAGES, "n": 0}, "n", "[1, 2]"),
    (CHAT, {"messages": MESSAGES, "n": True}, "n", "integer"),
    (CHAT, {"messages": MESSAGES, "n": "2"}, "n", "integer"),
    (CHAT, {"messages": MESSAGES, "temperature": 2.01}, "temperature", "[0, 2]"),
    (CHAT, {"messages": MESSAGES, "temperature": False}, "temperature", "number"),
    (CHAT, {"messages": MESSAGES, "top_p": -0.1}, "top_p", "(0, 1]"),
    (CHAT, {"messages": MESSAGES, "top_p": "1"}, "top_p", "number"),
    (CHAT, {"messages": MESSAGES, "frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    (CHAT, {"messages": MESSAGES, "presence_penalty": [1]}, "presence_penalty", "number"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {"5": "1"}}, "logit_bias", "[-100, 100]"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {"999999": 1}}, "logit_bias", "not a token id"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    (CHAT, {"messages": MESSAGES, "logit_bias": [5]}, "logit_bias", "an object"),
    (CHAT, {"messages": MESSAGES, "logprobs": 1}, "logprobs", "a boolean"),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "[0, 20]"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    (CHAT, {"messages": MESSAGES, "seed": -1}, "seed", "[0, 2**32)"),
    (CHAT, {"messages": MESSAGES, "seed": BIG}, "seed", "[0, 2**32)"),
    (CHAT, {"messages": MESSAGES, "seed": 1.5}, "seed", "integer"),
    (CHAT, {"messages": MESSAGES, "stop": 5}, "stop", "string"),
    (CHAT, {"messages": MESSAGES, "stop": ["a", 1]}, "stop", "string"),
    (CHAT, {"messages": MESSAGES, "stop": ""}, "stop", "non-empty"),
    (CHAT, {"messages": MESSAGES, "stop": list("abcde")}, "stop", "at most 4"),
    (CHAT, {"messages": MESSAGES, "stream": 1}, "stream", "a boolean"),
    (CHAT, {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options",
     "stream: true"),
    (CHAT, {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options", "a boolean"),
    (CHAT, {"messages": MESSAGES, "stream": True, "stream_options": []}, "stream_options", "obj"),
    (CHAT, {"messages": MESSAGES, "user": 5}, "user", "a string"),
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format",
     "not supported"),
    (CHAT, {"messages": MESSAGES, "response_format": "json"}, "response_format", "an object"),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", "not supported"),
    (CHAT, {"messages": MESSAGES, "tool_choice": "required"}, "tool_choice", "no tools"),
    (CHAT, {"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions", "not supported"),
    (CHAT, {"messages": MESSAGES, "function_call": {"name": "f"}}, "function_call", "no tools"),
    (CHAT, {"messages": MESSAGES, "audio": {"voice": "alloy"}}, "audio", "not supported"),
    (CHAT, {"messages": MESSAGES, "modalities": ["text", "audio"]}, "modalities", "only"),
    (CHAT, {"messages": MESSAGES, "top_k": -1}, "top_k", "[0, 2**31)"),
    (CHAT, {"messages": MESSAGES, "top_k": 1.5}, "top_k", "integer"),
    (CHAT, {"messages": MESSAGES, "min_p": 2}, "min_p", "[0, 1]"),
    (CHAT, {"messages": MESSAGES, "repetition_penalty": 0}, "repetition_penalty", "(0, 100]"),
    (CHAT, {"messages": MESSAGES, "store": "yes"}, "store", "a boolean"),
    (CHAT, {"messages": MESSAGES, "metadata": {"source": 1}}, "metadata", "strings"),
    (TEXT, {"max_tokens": 3}, "prompt", "required"),
    (TEXT, {"prompt": 5}, "prompt", "a string"),
    (TEXT, {"prompt": []}, "prompt", "non-empty"),
    (TEXT, {"prompt": [[]]}, "prompt", "non-empty"),
    (TEXT, {"prompt": ["ab", "cd"]}, "prompt", "2 prompts"),
    (TEXT, {"prompt": [[1], [2]]}, "prompt", "2 prompts"),
    (TEXT, {"prompt": [1, 999999]}, "prompt", "999999 is not a token id"),
    (TEXT, {"prompt": [1, True]}, "prompt", "true is not a token id"),
    (TEXT, {"prompt": [1, 2.0]}, "prompt", "2.0 is not a token id"),
    (TEXT, {"prompt": "caf\u00e9"}, "prompt", "vocabulary"),
    (TEXT, {"prompt": "a" * 60, "max_tokens": 10}, "prompt", "context"),
    (TEXT, {"prompt": "a", "max_tokens": -1}, "max_tokens", ">= 1"),
    (TEXT, {"prompt": "a", "logprobs": True}, "logprobs", "integer"),
    (TEXT, {"prompt": "a", "logprobs": 21}, "logprobs", "[0, 20]"),
    (TEXT, {"prompt": "a", "echo": True}, "echo", "not supported"),
    (TEXT, {"prompt": "a", "echo": "yes"}, "echo", "a boolean"),
    (TEXT, {"prompt": "a", "suffix": "b"}, "suffix", "not supported"),
    (TEXT, {"prompt": "a", "best_of": 2}, "best_of", "not supported"),
    (TEXT, {"prompt": "a", "n": 2, "best_of": 1}, "best_of", ">= n"),
    (TEXT, {"prompt": "a", "best_of": "2"}, "best_of", "integer"),
]


@pytest.mark.parametrize("path,body,param,words", FIELDS,
                         ids=[f"{p.rsplit('/', 1)[1]}-{pm}-{i}"
                              for i, (p, _, pm, _) in enumerate(FIELDS)])
def test_each_refused_field_is_named(api, path, body, param, words):
    r = api.post(path, json=body)
    error = openai_error(r.status_code, r.content)
    assert r.status_code == 400 and error["param"] == param, r.text
    assert error["message"].startswith(param) and words in error["message"], error["message"]
    still_serving(api)


# ---- every kind of body that cannot be read ----

def http(path: str = CHAT, body: bytes = b"", method: str = "POST", headers: dict | None = None,
         chunked: bool = False) -> bytes:
    """A request's bytes as sent (Content-Length or chunked, JSON unless headers say else)."""
    headers = {"Host": "test", "Connection": "close", "Authorization": f"Bearer {KEY}",
               "Content-Type": "application/json", **(headers or {})}
    headers = {k: v for k, v in headers.items() if v is not None}  # None: not sent
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                        for c in (body[i:i + 4096] for i in range(0, len(body), 4096)))
        body += b"0\r\n\r\n"
    else:
        headers.setdefault("Content-Length", str(len(body)))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def send(url: str, request: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request over a fresh connection."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    return (int(status_line.split()[1]),
            {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}, body)


DEEP = b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"
BODIES = [  # (id, request, status, code, words the message holds)
    ("empty", http(body=b""), 400, "invalid_json", "empty"),
    ("blank", http(body=b" \n"), 400, "invalid_json", "empty"),
    ("not json", http(body=b"hello"), 400, "invalid_json", "not valid JSON"),
    ("cut short json", http(body=b'{"messages": ['), 400, "invalid_json", "not valid JSON"),
    ("trailing data", http(body=b"{} {}"), 400, "invalid_json", "Extra data"),
    ("single quotes", http(body=b"{'a': 1}"), 400, "invalid_json", "not valid JSON"),
    ("trailing comma", http(body=b'{"a": 1,}'), 400, "invalid_json", "not valid JSON"),
    ("raw newline in string", http(body=b'{"a": "x\ny"}'), 400, "invalid_json", "control"),
    ("array", http(body=b"[1, 2]"), 400, "invalid_json", "not an array"),
    ("string", http(body=b'"hi"'), 400, "invalid_json", "not a string"),
    ("number", http(body=b"5"), 400, "invalid_json", "not a number"),
    ("null", http(body=b"null"), 400, "invalid_json", "not null"),
    ("NaN", http(body=b'{"temperature": NaN}'), 400, "invalid_json", "NaN"),
    ("-Infinity", http(body=b'{"temperature": -Infinity}'), 400, "invalid_json", "Infinity"),
    ("1e999", http(body=b'{"temperature": 1e999}'), 400, "invalid_json", "range"),
    ("5000 digits", http(body=b'{"n": ' + b"9" * 5000 + b"}"), 400, "invalid_json", "digits"),
    ("nested 40", http(body=DEEP), 400, "invalid_json", "deeper than 32"),
    ("nested 9000", http(body=b"[" * 9000 + b"]" * 9000), 400, "invalid_json", "deeper than"),
    ("duplicate key", http(body=b'{"messages": [], "messages": []}'), 400, "invalid_json",
     '"messages" appears twice'),
    ("invalid utf-8", http(body=b'{"model": "\xc3\x28"}'), 400, "invalid_encoding", "not UTF-8"),
    ("encoded surrogate", http(body=b'{"model": "\xed\xa0\x80"}'), 400, "invalid_encoding",
     "not UTF-8"),
    ("utf-16", http(body='{"messages": []}'.encode("utf-16")), 400, "invalid_encoding",
     "UTF-16"),
    ("utf-16-le", http(body='{"messages": []}'.encode("utf-16-le")), 400, "invalid_encoding",
     "UTF-16"),
    ("utf-32", http(body='{"messages": []}'.encode("utf-32")), 400, "invalid_encoding", "UTF-16"),
    ("lone surrogate", http(body=b'{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
     400, "invalid_unicode", "messages[0].content: \\ud800 is a lone surrogate"),
    ("lone low surrogate in a key", http(body=b'{"a\\udfffb": 1}'), 400, "invalid_unicode",
     "a\\udfffb: \\udfff is a lone surrogate"),
    ("text/plain", http(body=b"{}", headers={"Content-Type": "text/plain"}), 415,
     "unsupported_media_type", "application/json"),
    ("form", http(body=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"}),
     415, "unsupported_media_type", "application/json"),
    ("length over the limit", http(headers={"Content-Length": str(10 ** 9)}), 413,
     "request_too_large", f"over {LIMIT} bytes"),
    ("chunked over the limit", http(body=b" " * (3 * LIMIT), chunked=True), 413,
     "request_too_large", f"over {LIMIT} bytes"),
    ("GET on a POST route", http(method="GET"), 405, "method_not_allowed", "GET " + CHAT),
    ("PUT", http(body=b"{}", method="PUT"), 405, "method_not_allowed", "PUT " + CHAT),
    ("DELETE on completions", http(TEXT, method="DELETE"), 405, "method_not_allowed", "DELETE"),
    ("OPTIONS", http(method="OPTIONS"), 405, "method_not_allowed", "OPTIONS"),
    ("POST on a GET route", http("/v1/models", b"{}"), 405, "method_not_allowed", "POST"),
    ("POST /health", http("/health", b"{}"), 405, "method_not_allowed", "POST"),
    ("unknown path", http("/v1/embeddings", b"{}"), 404, "not_found", "/v1/embeddings"),
    ("no key", http(body=b"{}", headers={"Authorization": None}), 401, "invalid_api_key", "key"),
    ("feedback, not json", http("/v1/feedback", b"{"), 400, "invalid_json", "not valid JSON"),
    # what uvicorn cannot parse as HTTP/1.1 (server.uvicorn_config shapes its answer)
    ("bad request line", b"POST  /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "invalid_http", "not valid HTTP/1.1"),
    ("header without a colon", http(headers={"X-Broken\r\nno colon here": "1"}), 400,
     "invalid_http", "not valid HTTP/1.1"),
    ("non-numeric length", http(headers={"Content-Length": "ten"}), 400, "invalid_http",
     "not valid HTTP/1.1"),
    ("bad chunk size", http(headers={"Transfer-Encoding": "chunked", "Content-Length": None})
     + b"zz\r\n{}\r\n0\r\n\r\n", 400, "invalid_http", "not valid HTTP/1.1"),
]


@pytest.mark.parametrize("request_bytes,status,code,words", [b[1:] for b in BODIES],
                         ids=[b[0] for b in BODIES])
def test_each_unreadable_body_is_refused_in_openai_shape(served, api, request_bytes, status, code,
                                                         words):
    got, headers, body = send(served[0], request_bytes)
    error = openai_error(got, body)
    assert (got, error["code"]) == (status, code), body
    assert words in error["message"] and headers["content-type"] == "application/json", body
    if status == 405:
        assert headers["allow"] in ("GET", "POST")
    if status == 413:  # the rest of the body is not read: the connection ends here
        assert headers["connection"] == "close"
    still_serving(api)


def test_a_client_that_hangs_up_mid_body_costs_nothing(served, api):
    """Counted as a 499 (no one is left to answer), with no traceback in the server's log."""
    def hung_up() -> float:
        line = 'jaxgpt_requests_total{endpoint="/v1/chat/completions",status="499"} '
        return float(next((x[len(line):] for x in api.get("/metrics").text.splitlines()
                           if x.startswith(line)), 0))
    handler, errors = logging.Handler(logging.ERROR), []
    handler.emit = errors.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        before = hung_up()
        with socket.create_connection(("127.0.0.1", int(served[0].rsplit(":", 1)[1]))) as s:
            s.sendall(http(body=b'{"messages": [', headers={"Content-Length": "500"}))
            time.sleep(0.1)
        deadline = time.monotonic() + 5
        while hung_up() == before:
            assert time.monotonic() < deadline, "the hang-up was never counted"
            time.sleep(0.05)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert hung_up() == before + 1 and errors == []
    still_serving(api)


def test_a_bug_in_a_handler_is_a_500_in_openai_shape(served, api, monkeypatch):
    monkeypatch.setattr(served[1], "load", lambda: 1 / 0)
    r = api.get("/health")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == {"message": "internal error (ZeroDivisionError)",
                                 "type": "server_error", "param": None, "code": None}
    monkeypatch.undo()
    still_serving(api)


def test_fastapis_own_validation_errors_are_400s_in_openai_shape():
    from fastapi.exceptions import RequestValidationError
    e = RequestValidationError([{"loc": ("query", "limit"), "msg": "not an integer"}])
    response = asyncio.run(app_module.validation_error(None, e))
    assert response.status_code == 400 and json.loads(response.body)["error"] == {
        "message": "limit: not an integer", "type": "invalid_request_error", "param": "limit",
        "code": None}


# ---- what is taken ----

@pytest.mark.parametrize("path,body,headers", [
    (CHAT, b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}', {}),
    (CHAT, b'{"messages": [{"role": "developer", "content": "be \\u0062rief"}, {"role": "user", '
           b'"content": [{"type": "text", "text": "hi"}], "name": "ann"}], "max_tokens": 2, '
           b'"unknown_field": {"x": [1]}, "tool_choice": "none", "response_format": '
           b'{"type": "text"}, "logit_bias": {}, "user": "u1", "stream_options": null}', {}),
    (CHAT + "?api-version=1", b'{"messages": [{"role": "user", "content": "hi"}], '
                              b'"max_tokens": 2, "seed": 4294967295}',
     {"Content-Type": "application/json; charset=utf-8"}),
    (TEXT, b'{"prompt": [[1, 2, 3]], "max_tokens": 1, "best_of": 1, "echo": false, "suffix": ""}',
     {"Content-Type": None}),
    (TEXT, b'{"prompt": [""], "max_tokens": 1, "n": 2, "best_of": 2}',
     {"Content-Type": "application/vnd.api+json"}),
    (TEXT, json.dumps({"prompt": "a", "max_tokens": 1, "user": "\U0001F600"}).encode(), {}),
], ids=["utf-8 BOM", "optional fields", "query, charset", "no Content-Type", "+json", "pair"])
def test_what_is_taken_still_works(served, path, body, headers):
    status, _, answer = send(served[0], http(path, body, headers=headers))
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["finish_reason"] in ("stop", "length")


def test_after_every_refusal_the_server_still_serves(served, api):
    for request in (http(body=b"\xff" * 100), http(body=DEEP)) * 2:
        send(served[0], request)
    r = api.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    with api.stream("POST", TEXT, json={"prompt": "ab", "max_tokens": 3, "stream": True,
                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and [x for x in r.iter_lines() if x][-1] == "data: [DONE]"
    health = api.get("/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0


# ---- the parser alone ----

def test_parse_takes_json_objects_within_bounds():
    assert intake.parse(b'{"a": "\\ud83d\\ude00", "b": [1, 2.5, null, true]}') == {
        "a": "\U0001F600", "b": [1, 2.5, None, True]}
    within = b'{"a": ' + b"[" * (intake.MAX_DEPTH - 1) + b"]" * (intake.MAX_DEPTH - 1) + b"}"
    assert intake.parse(within)["a"]
    # brackets inside strings do not count as nesting
    assert intake.parse(b'{"a": "' + b"[" * 100 + b'\\"{"}')["a"].startswith("[[")
    with pytest.raises(ApiError) as e:
        intake.parse(b'{"a": {"b": [{"c": "\\udc00"}]}}')
    assert (e.value.param, e.value.message.split(":")[0]) == ("a", "a.b[0].c")
