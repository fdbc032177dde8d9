"""Tests for jaxgpt.serve: a real uvicorn server on a free local port, over a tiny random model with
a character vocabulary, called with httpx as any OpenAI client would."""
import contextlib
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

from jaxgpt import chat  # noqa: E402
from jaxgpt.config import ModelConfig  # noqa: E402
from jaxgpt.generate import Engine, SamplingParams  # noqa: E402
from jaxgpt.model import GPT  # noqa: E402
from jaxgpt.replies import Service  # noqa: E402
from jaxgpt.serve import ServeConfig, make_app, model_id_of  # noqa: E402
from jaxgpt.tokenizer import Tokenizer  # noqa: E402

KEY = "sk-test"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
SEQ_LEN = 64


@contextlib.contextmanager
def serving(app):
    """app served by uvicorn from a thread on a port the OS picks: the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


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
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
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
    r = api.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 12,
                                               "seed": 1, "temperature": 0.8, "user": "ignored"})
    assert r.status_code == 200, r.text
    body = r.json()
    [expected] = direct(service, MESSAGES, max_tokens=12, seed=1, temperature=0.8)
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason in ("stop", "length")
    prompt_tokens = len(chat.render(MESSAGES, tiny[2], for_generation=True)[0])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected.token_ids),
                             "total_tokens": prompt_tokens + len(expected.token_ids)}


def test_a_streamed_chat_completion_is_the_same_reply_in_chunks(api):
    request = {"messages": MESSAGES, "max_completion_tokens": 20, "seed": 7, "temperature": 1.0}
    plain = api.post("/v1/chat/completions", json=request).json()
    with api.stream("POST", "/v1/chat/completions",
                    json={**request, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert got[-1] == "[DONE]"
    chunks, usage = got[:-2], got[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] and c["usage"] is None
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == plain["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_n_gives_that_many_choices(api, service):
    body = api.post("/v1/chat/completions", json={"messages": MESSAGES, "n": 2, "max_tokens": 6, "seed": 3}).json()
    expected = direct(service, MESSAGES, n=2, max_tokens=6, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [r.text for r in expected]
    assert body["usage"]["completion_tokens"] == sum(len(r.token_ids) for r in expected)


def test_a_text_completion(api, service, tiny):
    tok = tiny[2]
    body = api.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 9, "seed": 2,
                                             "stop": ["zz", "q"]}).json()
    [expected] = service.complete(tok.encode("once upon"), SamplingParams(max_tokens=9, seed=2, stop=("zz", "q"))
                                  ).result(60)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["prompt_tokens"] == len(tok.encode("once upon"))
    with api.stream("POST", "/v1/completions", json={"prompt": "once upon", "max_tokens": 9, "seed": 2,
                                                     "stop": ["zz", "q"], "stream": True}) as r:
        got = events(r)
    assert got[-1] == "[DONE]" and "".join(c["choices"][0]["text"] for c in got[:-1]) == expected.text


def test_models_and_health(api, url):
    models = api.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert api.get("/v1/models/tiny").json()["id"] == "tiny"
    health = httpx.get(f"{url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["slots"] == 2 and health["model"] == "tiny"
    assert model_id_of("/x/runs/shakespeare/export") == "shakespeare" and model_id_of("/x/runs/tiny") == "tiny"


TOO_LONG = [{"role": "user", "content": "a" * 50}]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"max_tokens": 5}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ÿ not in the vocabulary"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": TOO_LONG, "max_tokens": 30}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 1.5}, 400, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 3}, 400, "n"),  # more than the 2 slots
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-5"}, 404, "model"),
    ("/v1/completions", {"prompt": "a" * 60, "max_tokens": 10}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"messages": MESSAGES, "padding": "x" * 30_000}, 413, None),
])
def test_bad_requests_get_openai_errors_naming_the_field(api, path, body, status, param):
    r = api.post(path, content=body) if isinstance(body, bytes) else api.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}
    if param and status == 400:
        assert error["message"].startswith(param)


def test_an_unknown_path_is_a_404_in_the_same_shape(api):
    r = api.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_the_api_key_is_required(url, headers):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, headers=headers)
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
    with api.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, "stream": True}) as r:
        got = events(r)
    assert got[-1] == "[DONE]" and "the device went away" in got[-2]["error"]["message"]
    r = api.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert api.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_slot(url, service, monkeypatch, stream):
    real_step = service.engine.step

    def slow_step():  # about 10 s for the whole reply, unless it is cancelled
        time.sleep(0.2)
        return real_step()
    monkeypatch.setattr(service.engine, "step", slow_step)
    request = {"prompt": "a", "max_tokens": 50, "stream": stream, "temperature": 0}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30 if stream else 1) as client:
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
    child = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", str(run_dir), f"serve.port={port}",
                              "sample.temperature=0"], env=run_env(JAXGPT_API_KEY=KEY),
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
        request = {"model": "tiny", "messages": [{"role": "user", "content": "Good night"}], "max_tokens": 5}
        first, second = (httpx.post(f"{base}/v1/chat/completions", json=request, headers=auth, timeout=60).json()
                         for _ in range(2))
        assert first["model"] == "tiny" and first["usage"]["completion_tokens"] <= 5
        assert first["choices"] == second["choices"]  # sample.temperature=0 from the command line: greedy
    finally:
        child.terminate()
        child.wait(30)


def test_the_chat_page_is_served_without_a_key(url):
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "stream: true" in r.text


def test_past_the_slots_and_the_queue_a_request_gets_429(service, tiny, monkeypatch):
    real_step = service.engine.step

    def slow_step():
        time.sleep(0.05)
        return real_step()
    monkeypatch.setattr(service.engine, "step", slow_step)
    request = {"prompt": "a", "max_tokens": 40, "stream": True}  # 2 s at least
    with serving(make_app(service, tiny[2], ServeConfig(slots=1, max_queue=0), "tiny")) as base:  # no key: open
        with httpx.stream("POST", f"{base}/v1/completions", json=request, timeout=30) as first:
            lines = first.iter_lines()
            next(lines)  # in flight
            busy = httpx.post(f"{base}/v1/completions", json={**request, "stream": False})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
            assert [line for line in lines if line][-1] == "data: [DONE]"  # the first one is unaffected
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200
