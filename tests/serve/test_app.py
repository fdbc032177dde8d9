"""Tests for jaxgpt.serve: a real uvicorn server on a free local port, over a tiny random model with
a character vocabulary, called with httpx as any OpenAI client would."""
import json
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from conftest import serving, slow_engine  # noqa: E402

from jaxgpt.config import ModelConfig  # noqa: E402
from jaxgpt.data import chat  # noqa: E402
from jaxgpt.data.tokenizer import Tokenizer  # noqa: E402
from jaxgpt.generate.engine import Engine  # noqa: E402
from jaxgpt.generate.sampling import SamplingParams  # noqa: E402
from jaxgpt.generate.service import Service  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.serve.app import ServeConfig, make_app  # noqa: E402
from jaxgpt.serve.server import model_id_of  # noqa: E402

KEY = "sk-test"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.from_spec("char", corpus="abcdefghijklmnopqrstuvwxyz .,!?")
    cfg = ModelConfig(preset="gpt2", vocab_size=tok.n_vocab, n_layer=2, n_head=2, d_model=32,
                      seq_len=SEQ_LEN).resolved()
    model = GPT(cfg)
    return model, model.init(jax.random.key(3)), tok


@pytest.fixture(scope="module")
def service(tiny):
    model, params, tok = tiny
    with Service(Engine(model, params, tok, slots=2), tok) as service:
        yield service


@pytest.fixture(scope="module")
def url(service, tiny):
    cfg = ServeConfig(slots=2, api_key=KEY, max_body_bytes=20_000)
    with serving(make_app(service, tiny[2], cfg, "tiny")) as url:
        yield url


@pytest.fixture
def api(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as client:
        yield client


def direct(service, messages, **params):
    """What the service itself replies, to compare the HTTP answers with."""
    return service.chat(messages, SamplingParams(**params), drop_old_turns=False).result(60)


def events(response) -> list:
    """The server-sent events of a streamed response: parsed JSON, and "[DONE]" as is."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def test_a_chat_completion_in_openai_shape(api, service, tiny):
    r = api.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                               "max_tokens": 12, "seed": 1, "temperature": 0.8,
                                               "user": "ignored"})
    assert r.status_code == 200, r.text
    body = r.json()
    [expected] = direct(service, MESSAGES, max_tokens=12, seed=1, temperature=0.8)
    assert (body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
            and body["model"] == "tiny")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant",
                                                          "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason in ("stop", "length")
    prompt_tokens = len(chat.render(MESSAGES, tiny[2], for_generation=True)[0])
    assert body["usage"] == {"prompt_tokens": prompt_tokens,
                             "completion_tokens": len(expected.token_ids),
                             "total_tokens": prompt_tokens + len(expected.token_ids)}


def test_a_streamed_chat_completion_is_the_same_reply_in_chunks(api):
    request = {"messages": MESSAGES, "max_completion_tokens": 20, "seed": 7, "temperature": 1.0}
    plain = api.post("/v1/chat/completions", json=request).json()
    with api.stream("POST", "/v1/chat/completions",
                    json={**request, "stream": True,
                          "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert got[-1] == "[DONE]"
    chunks, usage = got[:-2], got[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
               and c["usage"] is None for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert ([c["choices"][0]["finish_reason"] for c in chunks][-1]
            == plain["choices"][0]["finish_reason"])
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_n_gives_that_many_choices(api, service):
    body = api.post("/v1/chat/completions", json={"messages": MESSAGES, "n": 2, "max_tokens": 6,
                                                  "seed": 3}).json()
    expected = direct(service, MESSAGES, n=2, max_tokens=6, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [r.text for r in expected]
    assert body["usage"]["completion_tokens"] == sum(len(r.token_ids) for r in expected)


def test_a_text_completion(api, service, tiny):
    tok = tiny[2]
    body = api.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 9, "seed": 2,
                                             "stop": ["zz", "q"]}).json()
    [expected] = service.complete(tok.encode("once upon"),
                                  SamplingParams(max_tokens=9, seed=2, stop=("zz", "q"))).result(60)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["prompt_tokens"] == len(tok.encode("once upon"))
    with api.stream("POST", "/v1/completions", json={"prompt": "once upon", "max_tokens": 9,
                                                     "seed": 2, "stop": ["zz", "q"],
                                                     "stream": True}) as r:
        got = events(r)
    assert (got[-1] == "[DONE]"
            and "".join(c["choices"][0]["text"] for c in got[:-1]) == expected.text)


def test_models_and_health(api, url):
    models = api.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert api.get("/v1/models/tiny").json()["id"] == "tiny"
    health = httpx.get(f"{url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["slots"] == 2 and health["model"] == "tiny"
    assert health["feedback"] is False  # this app records none: the chat page offers no saving
    assert (model_id_of("/x/runs/shakespeare/export") == "shakespeare"
            and model_id_of("/x/runs/tiny") == "tiny")


TOO_LONG = [{"role": "user", "content": "a" * 50}]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"max_tokens": 5}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ÿ not in the vocabulary"}]},
     400, "messages"),
    ("/v1/chat/completions", {"messages": TOO_LONG, "max_tokens": 30}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 1.5}, 400, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 3}, 400, "n"),  # more than the 2 slots
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": -1}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-5"}, 404, "model"),
    ("/v1/completions", {"prompt": "a" * 60, "max_tokens": 10}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"messages": MESSAGES, "padding": "x" * 30_000}, 413, None),
    # OpenAI's documented ranges, and jaxgpt's own fields within what they can hold
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": 2.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 2.5}, 400,
     "presence_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_k": 2 ** 40}, 400, "top_k"),
    ("/v1/chat/completions", {"messages": MESSAGES, "repetition_penalty": 1e6}, 400,
     "repetition_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": list("abcde")}, 400, "stop"),
    # what the JSON parser cannot take: non-numbers, numbers past a float, depth, encoding
    ("/v1/chat/completions", b'{"messages": [], "temperature": NaN}', 400, None),
    ("/v1/chat/completions", b'{"messages": [], "temperature": Infinity}', 400, None),
    ("/v1/chat/completions", b'{"messages": [], "temperature": 1e999}', 400, None),
    ("/v1/chat/completions", b'{"n": ' + b"9" * 5000 + b"}", 400, None),
    ("/v1/chat/completions", b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ("/v1/chat/completions", b'{"model": "\xc3\x28"}', 400, None),
])
def test_bad_requests_get_openai_errors_naming_the_field(api, path, body, status, param):
    r = api.post(path, content=body) if isinstance(body, bytes) else api.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["param"] == param and error["message"]
            and set(error) == {"message", "type", "param", "code"})
    if param and status == 400:
        assert error["message"].startswith(param)


def test_an_unknown_path_is_a_404_in_the_same_shape(api):
    r = api.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_the_api_key_is_required(url, headers):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2},
                   headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401


def test_the_server_keeps_serving_after_bad_requests(api):
    for body in (b"{", b"null", json.dumps({"messages": MESSAGES, "top_k": -3}).encode()):
        assert api.post("/v1/chat/completions", content=body).status_code == 400
    r = api.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_failure_inside_a_stream_is_an_error_event_then_done(api, service, monkeypatch):
    def broken_step():
        raise RuntimeError("the device went away")
    monkeypatch.setattr(service.engine, "step", broken_step)
    with api.stream("POST", "/v1/chat/completions",
                    json={"messages": MESSAGES, "max_tokens": 5, "stream": True}) as r:
        got = events(r)
    assert got[-1] == "[DONE]" and "the device went away" in got[-2]["error"]["message"]
    r = api.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert api.post("/v1/chat/completions",
                    json={"messages": MESSAGES, "max_tokens": 3}).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_slot(url, service, monkeypatch, stream):
    slow_engine(monkeypatch, service, 0.2)  # about 10 s for the whole reply, unless it is cancelled
    request = {"prompt": "a", "max_tokens": 50, "stream": stream, "temperature": 0}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30 if stream else 1) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=request) as r:
                next(r.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):  # gives up waiting and closes the connection
                client.post("/v1/completions", json=request)
    start = time.monotonic()
    while service.load()["busy_slots"] and time.monotonic() - start < 5:
        time.sleep(0.05)
    assert service.load()["busy_slots"] == 0 and time.monotonic() - start < 5


@pytest.mark.slow
def test_the_command_line_serves_a_trained_run(tiny_run, run_env):
    run_dir, _ = tiny_run
    with socket.socket() as s:  # a free port (for the moment it takes the child to bind it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", str(run_dir),
                              f"serve.port={port}", "sample.temperature=0"],
                             env=run_env(JAXGPT_API_KEY=KEY),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        auth = {"Authorization": f"Bearer {KEY}"}  # the key came from JAXGPT_API_KEY
        assert httpx.get(f"{base}/v1/models").status_code == 401
        request = {"model": "tiny", "messages": [{"role": "user", "content": "Good night"}],
                   "max_tokens": 5}
        first, second = (httpx.post(f"{base}/v1/chat/completions", json={**request, **extra},
                                    headers=auth, timeout=60).json()
                         for extra in ({}, {"store": True}))
        assert first["model"] == "tiny" and first["usage"]["completion_tokens"] <= 5
        # sample.temperature=0 from the command line: greedy
        assert first["choices"] == second["choices"]
        judged = httpx.post(f"{base}/v1/feedback",
                            json={"completion_id": second["id"], "rating": "up"}, headers=auth)
        assert judged.status_code == 200, judged.text
        child.terminate()  # SIGTERM: nothing in flight, so it drains at once and exits cleanly
        assert child.wait(30) == 0
        assert "SIGTERM: draining 0 requests in flight" in child.stdout.read()
    finally:
        child.kill()
        child.wait(30)
    # serve.feedback is on by default: the stored one is in RUN/feedback.db, the other not
    import sqlite3
    with sqlite3.connect(run_dir / "feedback.db") as conn:
        assert conn.execute("SELECT id, reply FROM replies").fetchall() == [
            (second["id"], second["choices"][0]["message"]["content"])]
        assert conn.execute("SELECT completion_id, kind FROM judgements").fetchall() == [
            (second["id"], "up")]


def test_the_chat_page_is_served_without_a_key(url):
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "stream: true" in r.text


# ---- log-probabilities ----

def test_chat_logprobs_are_the_reply_tokens_scores(api, service, tiny):
    tok = tiny[2]
    body = api.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6, "seed": 4,
                                                  "logprobs": True, "top_logprobs": 3}).json()
    [expected] = direct(service, MESSAGES, max_tokens=6, seed=4, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [tok.decode([t]) for t in expected.token_ids]
    assert [e["logprob"] for e in content] == pytest.approx(expected.logprobs, abs=1e-6)
    assert all(e["bytes"] == list(e["token"].encode()) for e in content)
    for e, top in zip(content, expected.top_logprobs, strict=False):
        assert [a["token"] for a in e["top_logprobs"]] == [tok.decode([i]) for i, _ in top]
        assert [a["logprob"] for a in e["top_logprobs"]] == sorted(
            (a["logprob"] for a in e["top_logprobs"]), reverse=True)
    plain = api.post("/v1/chat/completions",
                     json={"messages": MESSAGES, "max_tokens": 6, "seed": 4}).json()
    assert plain["choices"][0]["logprobs"] is None
    # asking for scores changes no token
    assert plain["choices"][0]["message"] == body["choices"][0]["message"]


def test_streamed_logprobs_add_up_to_the_plain_ones(api, service):
    seed = next(s for s in range(100)
                if len(direct(service, MESSAGES, max_tokens=10, seed=s)[0].token_ids) > 3)
    request = {"messages": MESSAGES, "max_tokens": 10, "seed": seed, "logprobs": True,
               "top_logprobs": 2}
    plain = api.post("/v1/chat/completions",
                     json=request).json()["choices"][0]["logprobs"]["content"]
    with api.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
        chunks = events(r)[:-1]
    streamed = [e for c in chunks if c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == plain and plain


def test_completion_logprobs_in_the_legacy_shape(api, tiny):
    body = api.post("/v1/completions", json={"prompt": "once", "max_tokens": 5, "seed": 6,
                                             "logprobs": 2}).json()
    choice = body["choices"][0]
    scores = choice["logprobs"]
    specials = {tiny[2].decode([i]) for i in range(tiny[2].n_vocab) if tiny[2].is_special(i)}
    # special tokens have their names among the tokens, and no text
    assert "".join(t for t in scores["tokens"] if t not in specials) == choice["text"]
    assert (len(scores["tokens"]) == len(scores["token_logprobs"]) == len(scores["top_logprobs"])
            == body["usage"]["completion_tokens"])
    assert (all(lp <= 0 for lp in scores["token_logprobs"])
            and all(len(t) == 2 for t in scores["top_logprobs"]))
    assert scores["text_offset"] == [sum(map(len, scores["tokens"][:i]))
                                     for i in range(len(scores["tokens"]))]


@pytest.mark.parametrize("path,body,param", [
    # without logprobs
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    # chat takes a boolean
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
])
def test_bad_logprob_requests(api, path, body, param):
    r = api.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---- metrics, back-pressure, draining ----

def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus' text format."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


def test_metrics_count_requests_tokens_and_first_token_times(api, url):
    before = httpx.get(f"{url}/metrics").text
    body = api.post("/v1/chat/completions",
                    json={"messages": MESSAGES, "max_tokens": 7, "seed": 8}).json()
    assert api.post("/v1/chat/completions",
                    json={"messages": MESSAGES, "top_p": 9}).status_code == 400
    assert api.get("/v1/made-up").status_code == 404
    time.sleep(0.1)  # the token counts are added on the engine's thread as the reply finishes
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    chat_ok = dict(endpoint="/v1/chat/completions", status="200")
    assert (metric(after, "jaxgpt_requests_total", **chat_ok)
            == metric(before, "jaxgpt_requests_total", **chat_ok) + 1)
    assert metric(after, "jaxgpt_requests_total", endpoint="/v1/chat/completions",
                  status="400") >= 1
    assert metric(after, "jaxgpt_requests_total", endpoint="other", status="404") >= 1
    for name, key in (("jaxgpt_prompt_tokens_total", "prompt_tokens"),
                      ("jaxgpt_completion_tokens_total", "completion_tokens")):
        assert metric(after, name) - metric(before, name) == body["usage"][key]
    assert metric(after, "jaxgpt_time_to_first_token_seconds_count") == \
        metric(before, "jaxgpt_time_to_first_token_seconds_count") + 1
    reason = body["choices"][0]["finish_reason"]
    assert metric(after, "jaxgpt_replies_total", finish_reason=reason) >= 1
    assert metric(after, "jaxgpt_slots") == 2 and metric(after, "jaxgpt_busy_slots") == 0
    assert (metric(after, "jaxgpt_queue_depth") == 0
            and metric(after, "jaxgpt_requests_in_flight") == 0)
    assert "jaxgpt_screen_decisions_total" in after


def test_a_full_queue_answers_429_with_retry_after(service, tiny, monkeypatch):
    slow_engine(monkeypatch, service, 0.05)
    request = {"prompt": "a", "max_tokens": 30, "stream": True}
    cfg = ServeConfig(slots=1, max_queue=0, retry_after_s=3)
    with serving(make_app(service, tiny[2], cfg, "tiny")) as base:
        with httpx.stream("POST", f"{base}/v1/completions", json=request, timeout=30) as first:
            lines = first.iter_lines()
            next(lines)
            busy = httpx.post(f"{base}/v1/completions", json=request)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "3"
            assert busy.json()["error"]["code"] == "server_busy"
            # the first one is unaffected
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert httpx.post(f"{base}/v1/completions",
                          json={"prompt": "a", "max_tokens": 3}).status_code == 200


def test_clients_gone_before_reading_a_byte_give_their_places_back(service, tiny, monkeypatch):
    """Three streaming requests (one decoding, two waiting for the slot) whose clients hang up at
    once: each place taken is given back and each generation cancelled, in far less time than
    the 30 s the three would decode for."""
    slow_engine(monkeypatch, service, 0.2)
    app = make_app(service, tiny[2], ServeConfig(slots=1, max_queue=2), "tiny")
    with serving(app) as base:
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "a", "max_tokens": 50, "temperature": 0,
                           "stream": True}).encode()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answered = lambda: sum(metric(httpx.get(f"{base}/metrics").text,  # noqa: E731
                                      "jaxgpt_requests_total", endpoint="/v1/completions",
                                      status="200") for _ in [0])
        deadline = time.monotonic() + 5
        while answered() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        while ((app.state.admission.count or service.load()["busy_slots"])
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert (answered() == 3 and app.state.admission.count == 0
                and service.load()["busy_slots"] == 0)
        assert httpx.post(f"{base}/v1/completions",
                          json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_sigterm_drains_then_exits(service, tiny, monkeypatch):
    """What the server does on SIGTERM (its signal handler, called as uvicorn's would): the reply in
    flight completes, new requests and /health get 503 with Retry-After, then the server stops."""
    import signal

    from jaxgpt.serve.server import draining_server
    slow_engine(monkeypatch, service, 0.05)
    app = make_app(service, tiny[2], ServeConfig(slots=2, retry_after_s=2), "tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = draining_server(app, uvicorn.Config(app, log_level="warning", lifespan="off"),
                             drain_timeout_s=30)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    request = {"prompt": "a", "max_tokens": 30, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=request, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            server.handle_exit(signal.SIGTERM, None)
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            assert refused.json()["error"]["code"] == "shutting_down"
            health = httpx.get(f"{base}/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            rest = [line for line in lines if line]
        got = [json.loads(line[6:]) for line in rest[:-1]]
        assert rest[-1] == "data: [DONE]" and got[-1]["choices"][0]["finish_reason"] == "length"
        thread.join(15)
        assert not thread.is_alive()  # it exited once the reply was out
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# ---- through the official openai client ----

openai = pytest.importorskip("openai")


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_plain_streaming_and_n(client, service):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=11,
                                           temperature=0.9)
    [expected] = direct(service, MESSAGES, max_tokens=10, seed=11, temperature=0.9)
    assert (reply.choices[0].message.content == expected.text
            and reply.choices[0].finish_reason in ("stop", "length"))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                                 seed=11, temperature=0.9, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    two = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, seed=12,
                                         n=2)
    assert [c.message.content for c in two.choices] == [
        r.text for r in direct(service, MESSAGES, max_tokens=6, seed=12, n=2)]


def test_openai_client_stop_seed_and_logprobs(client, service):
    tok_texts = [client.completions.create(model="tiny", prompt="the", max_tokens=12, seed=s,
                                           temperature=1.0).choices[0].text for s in range(3)]
    assert len(set(tok_texts)) > 1  # the seed matters...
    again = [client.completions.create(model="tiny", prompt="the", max_tokens=12, seed=s,
                                       temperature=1.0).choices[0].text for s in range(3)]
    assert again == tok_texts  # ...and the same seed gives the same reply
    text = next(t for t in tok_texts if len(t) > 4)
    stop = text[3]
    seed = tok_texts.index(text)
    cut = client.completions.create(model="tiny", prompt="the", max_tokens=12, seed=seed,
                                    temperature=1.0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    scored = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=13,
                                            logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert (len(content) == scored.usage.completion_tokens
            and all(len(e.top_logprobs) == 2 for e in content))
    # the first alternative is the likeliest
    assert all(e.top_logprobs[0].logprob >= e.logprob for e in content)


def test_openai_client_errors(client, url):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-2)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=TOO_LONG, max_tokens=30)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny",
                                       messages=[{"role": "user", "content": "x" * 30_000}])
    assert e.value.status_code == 413
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_32_concurrent_openai_clients_get_the_replies_they_get_alone(tiny):
    """32 clients at once on 8 slots (24 waiting): every reply complete and equal, token for token,
    to what the same request gets on an idle server."""
    model, params, tok = tiny
    with Service(Engine(model, params, tok, slots=8), tok) as service, \
            serving(make_app(service, tok, ServeConfig(slots=8, max_queue=32), "tiny")) as base:
        def ask(i: int) -> tuple[str, str, int]:
            c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
            content = ["hi", "hello there", "good day"][i % 3]
            request = dict(model="tiny", messages=[{"role": "user", "content": content}],
                           max_tokens=8 + i % 9, seed=100 + i, temperature=1.0)
            if i % 2:  # half of them streamed
                chunks = list(c.chat.completions.create(**request, stream=True,
                                                        stream_options={"include_usage": True}))
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                finish = next(ch.choices[0].finish_reason for ch in chunks
                              if ch.choices and ch.choices[0].finish_reason)
                return text, finish, chunks[-1].usage.completion_tokens
            r = c.chat.completions.create(**request)
            return (r.choices[0].message.content, r.choices[0].finish_reason,
                    r.usage.completion_tokens)
        alone = [ask(i) for i in range(32)]
        busy_before = service.load()
        results: list = [None] * 32
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i)))
                   for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert results == alone
        assert all(finish in ("stop", "length") for _, finish, _ in results)
        assert busy_before["busy_slots"] == 0 and service.load()["busy_slots"] == 0
        assert httpx.get(f"{base}/health").json()["status"] == "ok"


CLIENT = """
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
for chunk in c.completions.create(model="tiny", prompt="a", max_tokens=50, temperature=0,
                                  stream=True):
    print("chunk", flush=True)
"""


def test_a_killed_streaming_client_frees_its_slot(url, service, monkeypatch, run_env):
    slow_engine(monkeypatch, service, 0.2)  # 10 s for the whole reply
    child = subprocess.Popen([sys.executable, "-c", CLIENT, f"{url}/v1", KEY],
                             stdout=subprocess.PIPE, text=True, env=run_env())
    try:
        assert child.stdout.readline() == "chunk\n"
        assert service.load()["busy_slots"] == 1
        child.kill()  # SIGKILL: no goodbye from the client, only the closed socket
        child.wait(10)
        start = time.monotonic()
        while service.load()["busy_slots"] and time.monotonic() - start < 3:
            time.sleep(0.02)
        assert service.load()["busy_slots"] == 0
    finally:
        child.kill()
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


# ---- feedback: stored completions (OpenAI's `store`) and POST /v1/feedback ----

@pytest.fixture(scope="module")
def stored(service, tiny, tmp_path_factory):
    """(base URL, database path, Feedback) of a server that records (serve.feedback=true)."""
    from jaxgpt.serve.feedback import Feedback
    db = tmp_path_factory.mktemp("feedback") / "feedback.db"
    with Feedback(db) as fb, serving(make_app(service, tiny[2], ServeConfig(slots=2, api_key=KEY),
                                              "tiny", feedback=fb)) as url:
        yield url, db, fb


def stored_rows(db, *ids, timeout=10.0):
    """The replies rows of these completion ids, once each has its reply (finish() is queued from
    the engine's thread as the reply ends, so it may land just after the response)."""
    import sqlite3
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute(
                f"SELECT * FROM replies WHERE id IN ({','.join('?' * len(ids))}) ORDER BY rowid",
                ids)]
        if ((len(rows) >= len(ids) and all(r["reply"] is not None for r in rows))
                or time.monotonic() > deadline):
            return rows
        time.sleep(0.02)


def test_a_stored_chat_completion_is_recorded_and_one_without_store_is_not(stored):
    url, db, fb = stored
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as api:
        plain = api.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6,
                                                       "seed": 5, "store": True}).json()
        with api.stream("POST", "/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 6, "seed": 6, "stream": True, "store": True,
                "metadata": {"source": "page", "replaces": plain["id"]}}) as r:
            chunks = events(r)[:-1]
        streamed_id = chunks[0]["id"]
        assert {c["id"] for c in chunks} == {streamed_id}  # every chunk carries the completion id
        others = [api.post("/v1/chat/completions",
                           json={"messages": MESSAGES, "max_tokens": 3, **extra}).json()["id"]
                  for extra in ({}, {"store": False}, {"metadata": {"source": "page"}})]
        bad = api.post("/v1/chat/completions", json={"messages": MESSAGES, "store": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "store"
    first, second = stored_rows(db, plain["id"], streamed_id)
    assert first["source"] == "api" and first["model"] == "tiny" and first["replaces"] is None
    assert (json.loads(first["messages"]) == MESSAGES
            and first["reply"] == plain["choices"][0]["message"]["content"])
    assert first["finish_reason"] == plain["choices"][0]["finish_reason"] and first["choice"] == 0
    assert (json.loads(first["sampling"])["seed"] == 5
            and json.loads(first["sampling"])["max_tokens"] == 6)
    assert first["screened"] is None and first["flagged"] == 0
    assert second["source"] == "page" and second["replaces"] == plain["id"]
    assert second["reply"] == "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    fb.flush()
    assert stored_rows(db, *others, timeout=0) == []  # without store: true nothing is kept


def test_feedback_on_a_stored_reply_and_its_errors(stored, url, tmp_path):
    from jaxgpt.serve import feedback_export
    base, db, _ = stored
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as api:
        # replies with different texts to one context: temperature 1, seeds apart, lengths apart
        ids, texts = [], []
        for seed, max_tokens in ((11, 4), (12, 7)):
            body = api.post("/v1/chat/completions", json={"messages": MESSAGES,
                                                          "max_tokens": max_tokens, "seed": seed,
                                                          "temperature": 1.0, "store": True}).json()
            ids.append(body["id"])
            texts.append(body["choices"][0]["message"]["content"])
        assert texts[0] != texts[1]
        judged = [api.post("/v1/feedback", json=body) for body in (
            {"completion_id": ids[0], "rating": "up"},           # at once: queued behind its record
            {"completion_id": ids[1], "better_than": ids[0]},
            {"completion_id": ids[0], "edit": "well, hello"})]
        assert [r.status_code for r in judged] == [200, 200, 200], [r.text for r in judged]
        assert [r.json()["kind"] for r in judged] == ["up", "better", "edit"]
        assert (len({r.json()["id"] for r in judged}) == 3
                and all(isinstance(r.json()["id"], int) for r in judged))
        for body, status, param in (
                ({"completion_id": "chatcmpl-nope", "rating": "up"}, 404, "completion_id"),
                ({"completion_id": ids[0], "better_than": "chatcmpl-nope"}, 404, "better_than"),
                ({"completion_id": ids[0], "rating": "sideways"}, 400, "rating"),
                ({"completion_id": ids[0], "edit": ""}, 400, "edit"),
                ({"completion_id": ids[0], "rating": "up", "edit": "x"}, 400, "edit"),
                ({"completion_id": ids[0], "rating": "up", "index": 2 ** 63}, 400, "index"),
                ({"rating": "up"}, 400, "completion_id")):
            r = api.post("/v1/feedback", json=body)
            error = r.json()["error"]
            assert (r.status_code, error["param"]) == (status, param), r.text
            assert (error["message"].startswith(f"{param}: ")
                    and error["type"] == "invalid_request_error")
            assert error["code"] == ("not_found" if status == 404 else None)
        assert api.post("/v1/feedback", content=b"{").status_code == 400
    assert httpx.post(f"{base}/v1/feedback",
                      json={"completion_id": ids[0], "rating": "up"}).status_code == 401
    # a server with serve.feedback=false
    off = httpx.post(f"{url}/v1/feedback", json={"completion_id": ids[0], "rating": "up"},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert off.status_code == 404 and off.json()["error"]["code"] == "feedback_off"

    stored_rows(db, *ids)
    feedback_export.write_datasets(db, pairs=tmp_path / "pairs.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert {"messages": MESSAGES, "chosen": texts[1], "rejected": texts[0]} in pairs
    assert {"messages": MESSAGES, "chosen": "well, hello", "rejected": texts[0]} in pairs
