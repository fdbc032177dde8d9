"""The chat page (jaxgpt/static/chat.html) in a real browser: headless Chromium driven by
playwright, against a real uvicorn server over a tiny model trained here to answer "hi" with an XSS
payload, so that what the page must show as text comes from the model itself (nothing mocked)."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    pytest.skip("the page tests need the playwright package (pip install 'playwright>=1.45')",
                allow_module_level=True)
CHROMIUM = "/usr/bin/chromium"
if not shutil.which(CHROMIUM):
    pytest.skip(f"the page tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
uvicorn = pytest.importorskip("uvicorn")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import serving, slow_engine  # noqa: E402

from jaxgpt.config import ModelConfig, OptimConfig, ScreenConfig  # noqa: E402
from jaxgpt.data import chat  # noqa: E402
from jaxgpt.data.tokenizer import Tokenizer  # noqa: E402
from jaxgpt.generate.engine import Engine  # noqa: E402
from jaxgpt.generate.sampling import SamplingParams  # noqa: E402
from jaxgpt.generate.screen import Screen  # noqa: E402
from jaxgpt.generate.service import Service  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.serve import feedback_export  # noqa: E402
from jaxgpt.serve.app import ServeConfig, make_app  # noqa: E402
from jaxgpt.serve.feedback import Feedback  # noqa: E402
from jaxgpt.train import optim  # noqa: E402
from jaxgpt.train.step import TrainState, make_train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-page"
PAYLOAD = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
LESSON = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PAYLOAD}]
# its characters are in the vocabulary: the page sends it back next turn
REFUSAL = ScreenConfig().refusal
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 30_000  # for a reply to finish, on a slow shared machine


@pytest.fixture(scope="module")
def tiny():
    """(model, params, tokenizer): a 2-layer char model that has memorized LESSON (a few seconds on
    a CPU)."""
    tok = Tokenizer.from_spec("char", corpus="abcdefghijklmnopqrstuvwxyz .,!?" + PAYLOAD + REFUSAL)
    model = GPT(ModelConfig(preset="gpt2", vocab_size=tok.n_vocab, n_layer=2, n_head=2, d_model=64,
                            seq_len=128).resolved())
    ids, mask = chat.render(LESSON, tok)
    batch = {"inputs": jnp.asarray(ids[None, :-1]), "targets": jnp.asarray(ids[None, 1:]),
             "loss_mask": jnp.asarray(mask[None, 1:]),
             "segment_ids": jnp.ones((1, len(ids) - 1), jnp.int32)}
    steps = 150
    optimizer = optim.build(OptimConfig(lr=3e-3, schedule="constant", warmup_steps=0,
                                        weight_decay=0.0), steps,
                            jax.eval_shape(model.init, jax.random.key(0)))
    step = make_train_step(model, optimizer, grad_accum=1)

    @jax.jit  # init and every step in one program: one compilation, the slow part on a CPU
    def learn(key):
        params = model.init(key)
        state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32),
                           jax.random.key(1), jnp.zeros((), jnp.int32))
        state, metrics = jax.lax.scan(lambda state, _: step(state, batch), state, length=steps)
        return state.params, metrics["loss"][-1]
    params, loss = learn(jax.random.key(0))
    assert float(loss) < 0.05, f"the lesson was not learnt: loss {float(loss)}"
    return model, params, tok


@pytest.fixture(scope="module")
def service(tiny, tmp_path_factory):
    model, params, tok = tiny
    blocklist = tmp_path_factory.mktemp("screen") / "blocklist.txt"
    blocklist.write_text("forbidden\n")  # a user message with it is answered with the refusal
    with Service(Engine(model, params, tok, slots=2), tok,
                 Screen(ScreenConfig(blocklist=str(blocklist)))) as service:
        yield service


@pytest.fixture(scope="module")
def feedback_db(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback") / "feedback.db"


@pytest.fixture(scope="module")
def recorder(feedback_db):
    with Feedback(feedback_db) as fb:
        yield fb


@pytest.fixture(scope="module")
def url(service, tiny, recorder):
    with serving(make_app(service, tiny[2], ServeConfig(slots=2, api_key=KEY), "tiny",
                          feedback=recorder)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    """The chat page, fresh, with the settings open and the API key typed in."""
    page = browser.new_page(viewport={"width": 900, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))  # an exception in the page's own script
    page.goto(url)
    page.click("#settings summary")
    page.fill("#key", KEY)
    yield page
    page.close()
    assert not errors, errors


def direct(service, messages, **params):
    """What the service itself replies, to compare the page with."""
    [reply] = service.chat(messages, SamplingParams(**params), drop_old_turns=False).result(60)
    return reply


def settings(page, **fields):
    for name, value in fields.items():
        page.fill(f"#{name}", "" if value is None else str(value))


def is_chat(request) -> bool:
    return request.method == "POST" and request.url.endswith("/v1/chat/completions")


def say(page, text):
    """Type `text` and send it (Enter); the request the page made."""
    page.fill("#input", text)
    with page.expect_request(is_chat) as request:
        page.press("#input", "Enter")
    return request.value


def finished(page):
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    expect(page.locator("#stop")).to_be_disabled()


def bubbles(page, role="assistant"):
    return page.locator(f"#log .msg.{role}")


def test_a_reply_streams_in_as_the_service_writes_it(page, service, monkeypatch):
    slow_engine(monkeypatch, service, 0.03)  # so the browser sees the pieces come one by one
    page.evaluate("""() => {  // every text the reply's bubble shows, as it changes
        window.seen = [];
        new MutationObserver(() => {
            const b = [...document.querySelectorAll("#log .msg.assistant")].at(-1);
            if (b) window.seen.push(b.textContent);
        }).observe(document.getElementById("log"),
                   {childList: true, subtree: true, characterData: true});
    }""")
    settings(page, temperature=1.0, seed=1234, max_tokens=40)
    request = say(page, "hi")
    finished(page)
    expected = direct(service, LESSON[:1], temperature=1.0, seed=1234, max_tokens=40)
    assert request.post_data_json == {"messages": LESSON[:1], "stream": True, "temperature": 1,
                                      "seed": 1234, "max_tokens": 40, "store": True,
                                      "metadata": {"source": "page"}}
    assert request.all_headers()["authorization"] == f"Bearer {KEY}"
    assert bubbles(page, "user").all_text_contents() == ["hi"]
    assert bubbles(page).all_text_contents() == [expected.text] and len(expected.text) > 10
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(set(seen)) >= 3, seen  # streamed in, not shown all at once
    assert all(expected.text.startswith(s) for s in seen), seen
    note = {"length": "cut at the token limit"}.get(expected.finish_reason)
    assert bubbles(page).get_attribute("data-note") == note


def test_markup_in_a_reply_is_text_and_the_next_turn_sends_it_back(page, service):
    settings(page, temperature=0, max_tokens=100)
    say(page, "hi")
    finished(page)
    # the lesson was learnt
    assert direct(service, LESSON[:1], temperature=0, max_tokens=100).text == PAYLOAD
    reply = bubbles(page)
    assert reply.text_content() == PAYLOAD and reply.get_attribute("data-note") is None
    assert page.locator("#log img").count() == 0 and page.locator("#log script").count() == 0
    assert reply.evaluate("b => b.childElementCount") == 0  # one text node, nothing parsed
    assert page.evaluate("typeof window.pwned") == "undefined"

    settings(page, system="be brief", max_tokens=20)
    request = say(page, "ok")
    finished(page)
    sent = request.post_data_json
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, *LESSON,
                                {"role": "user", "content": "ok"}]
    # a blank seed: random
    assert sent["temperature"] == 0 and sent["max_tokens"] == 20 and "seed" not in sent
    assert bubbles(page, "user").all_text_contents() == ["hi", "ok"]
    expected = direct(service, sent["messages"], temperature=0, max_tokens=20)
    assert bubbles(page).all_text_contents() == [PAYLOAD, expected.text]
    assert (page.locator("#log img").count() == 0
            and page.evaluate("typeof window.pwned") == "undefined")


def test_stop_keeps_the_partial_reply_and_frees_the_slot(page, service, monkeypatch):
    slow_engine(monkeypatch, service, 0.2)  # the whole reply would take 14 s
    settings(page, temperature=0, max_tokens=100)
    say(page, "hi")
    page.wait_for_function("document.querySelector('#log .msg.assistant').textContent.length >= 4",
                           timeout=WAIT_MS)
    assert service.load()["busy_slots"] == 1
    page.click("#stop")
    finished(page)
    partial = bubbles(page).text_content()
    assert 4 <= len(partial) < len(PAYLOAD) and PAYLOAD.startswith(partial)
    assert bubbles(page).get_attribute("data-note") == "stopped"
    start = time.monotonic()  # the browser hung up: the server cancels the generation
    while service.load()["busy_slots"] and time.monotonic() - start < 5:
        time.sleep(0.05)
    assert service.load()["busy_slots"] == 0
    assert page.locator("#error").text_content() == ""
    monkeypatch.undo()

    # regenerate: the stopped reply goes, and the same conversation is asked again
    with page.expect_request(is_chat) as request:
        page.click("#regenerate")
    finished(page)
    assert request.value.post_data_json["messages"] == LESSON[:1]
    assert (bubbles(page).all_text_contents() == [PAYLOAD]
            and bubbles(page).get_attribute("data-note") is None)
    assert bubbles(page, "user").all_text_contents() == ["hi"]

    # the stopped reply is what the next turn sends back, as far as it got
    slow_engine(monkeypatch, service, 0.2)
    settings(page, max_tokens=40)  # what the context of 128 tokens leaves
    say(page, "hi")
    page.wait_for_function("document.querySelectorAll('#log "
                           ".msg.assistant')[1]?.textContent.length >= 2", timeout=WAIT_MS)
    page.click("#stop")
    finished(page)
    partial = bubbles(page).nth(1).text_content()
    monkeypatch.undo()
    settings(page, max_tokens=5)
    sent = say(page, "ok").post_data_json["messages"]
    finished(page)
    assert sent == [*LESSON, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": partial}, {"role": "user", "content": "ok"}]

    # new chat: an empty log, and the next turn starts afresh
    page.click("#new-chat")
    assert page.locator("#log").evaluate("log => log.childElementCount") == 0
    expect(page.locator("#regenerate")).to_be_disabled()
    assert say(page, "hi").post_data_json["messages"] == LESSON[:1]
    finished(page)
    assert bubbles(page).all_text_contents() == [PAYLOAD[:5]]


def test_notes_and_errors_keep_the_conversation(page, service, monkeypatch):
    settings(page, temperature=0, max_tokens=5)
    say(page, "hi")
    finished(page)
    assert bubbles(page).text_content() == PAYLOAD[:5]
    assert bubbles(page).get_attribute("data-note") == "cut at the token limit"

    say(page, "a forbidden word")  # screened by the server: the refusal, with a note that it was
    finished(page)
    assert bubbles(page).nth(1).text_content() == REFUSAL
    assert "screened" in bubbles(page).nth(1).get_attribute("data-note")

    conversation = (["hi", "a forbidden word"], [PAYLOAD[:5], REFUSAL])
    shown = lambda: (bubbles(page, "user").all_text_contents(),  # noqa: E731
                     bubbles(page).all_text_contents())

    # an HTTP error: its message in one line, the conversation as it was
    settings(page, key="wrong")
    say(page, "and now")
    finished(page)
    assert page.locator("#error").text_content() == (
        "error: a missing or wrong API key: send `Authorization: Bearer KEY`")
    assert shown() == conversation and page.input_value("#input") == "and now"  # to send again

    settings(page, key=KEY)  # an error inside the stream, after it began
    monkeypatch.setattr(service.engine, "step",
                        lambda: (_ for _ in ()).throw(RuntimeError("the device went away")))
    say(page, "and now")
    finished(page)
    error = page.locator("#error").text_content()
    assert error.startswith("error: generation failed") and "the device went away" in error
    assert shown() == conversation and page.input_value("#input") == "and now"
    # one line
    assert (page.evaluate("getComputedStyle(document.getElementById('error')).whiteSpace")
            == "nowrap")

    monkeypatch.undo()  # and it carries on
    say(page, "and now")
    finished(page)
    assert page.locator("#error").text_content() == ""
    assert shown()[0] == [*conversation[0], "and now"] and len(shown()[1]) == 3

    out = Path(os.environ.get("JAXGPT_ARTIFACTS") or REPO / ".artifacts")
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "chat_page.png"), full_page=True)
    assert (out / "chat_page.png").stat().st_size > 0


def rows(db, sql, *args):
    import sqlite3
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def test_regenerate_then_this_one_is_better_is_a_pair_in_the_export(page, service, recorder,
                                                                    feedback_db, tmp_path):
    settings(page, temperature=0, max_tokens=5)
    first = say(page, "hi").post_data_json
    finished(page)
    assert first["store"] is True and first["metadata"] == {"source": "page"}
    settings(page, max_tokens=12)
    with page.expect_request(is_chat) as request:
        page.click("#regenerate")
    finished(page)
    again = request.value.post_data_json
    assert again["messages"] == first["messages"] == LESSON[:1]
    recorder.flush()  # the two replies of this turn: the newest rows (the database is the module's)
    (second_id, replaces), (first_id, _) = rows(
        feedback_db, "SELECT id, replaces FROM replies ORDER BY rowid DESC LIMIT 2")
    assert again["metadata"] == {"source": "page", "replaces": first_id} and replaces == first_id
    assert rows(feedback_db, "SELECT reply, source FROM replies WHERE id IN (?, ?) ORDER BY rowid",
                first_id, second_id) == [(PAYLOAD[:5], "page"), (PAYLOAD[:12], "page")]
    # both replies of the turn in view: the earlier one set apart, the new one the conversation's
    assert page.locator("#log .msg.replaced").all_text_contents() == [PAYLOAD[:5]]
    assert bubbles(page).all_text_contents() == [PAYLOAD[:12]]
    expect(page.locator("#log .actions .better")).to_have_count(2)

    with page.expect_response(lambda r: r.url.endswith("/v1/feedback")) as response:
        # the first, shorter reply is better
        page.locator("#log .actions").nth(0).locator(".better").click()
    assert response.value.status == 200
    expect(page.locator("#log .actions").nth(0).locator(".better")).to_have_attribute(
        "aria-pressed", "true")
    assert bubbles(page).all_text_contents() == [PAYLOAD[:5]]  # it is the turn's reply now
    assert page.locator("#log .msg.replaced").all_text_contents() == [PAYLOAD[:12]]
    assert rows(feedback_db, "SELECT completion_id, kind, other_id FROM judgements") == [
        (first_id, "better", second_id)]

    # thumbs up on it, and an edit: the saved text is the reply the next turn sends back
    page.locator("#log .actions").nth(0).locator(".up").click()
    expect(page.locator("#log .actions").nth(0).locator(".up")).to_have_attribute(
        "aria-pressed", "true")
    page.locator("#log .actions").nth(0).locator(".edit").click()
    page.fill("#log .editing textarea", "hello there")
    with page.expect_response(lambda r: r.url.endswith("/v1/feedback")):
        page.click("#log .editing .save")
    expect(page.locator("#log .editing")).to_have_count(0)
    assert bubbles(page).all_text_contents() == ["hello there"]
    assert bubbles(page).get_attribute("data-note") == "edited"
    settings(page, max_tokens=3)
    sent = say(page, "ok").post_data_json["messages"]
    finished(page)
    assert sent == [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello there"},
                    {"role": "user", "content": "ok"}]
    # a new turn: that choice is made
    expect(page.locator("#log .actions .better")).to_have_count(0)
    assert page.locator("#error").text_content() == ""

    recorder.flush()
    counts = feedback_export.write_datasets(feedback_db, tmp_path / "sft.jsonl",
                                            tmp_path / "pairs.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs[0] == {"messages": LESSON[:1], "chosen": PAYLOAD[:5], "rejected": PAYLOAD[:12]}
    assert {"messages": LESSON[:1], "chosen": "hello there", "rejected": PAYLOAD[:5]} in pairs
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert {"id": first_id, "messages": [*LESSON[:1],
                                         {"role": "assistant", "content": "hello there"}]} in sft
    assert counts["pairs"] == len(pairs)


def test_with_saving_off_nothing_is_recorded_and_no_judging_is_offered(page, feedback_db):
    page.uncheck("#store")
    settings(page, temperature=0, max_tokens=4)
    request = say(page, "hi").post_data_json
    finished(page)
    assert "store" not in request and "metadata" not in request
    assert page.locator("#log .actions").count() == 0
    assert rows(feedback_db, "SELECT count(*) FROM replies WHERE reply = ?", PAYLOAD[:4]) == [(0,)]


def test_a_server_without_feedback_offers_no_saving(browser, service, tiny):
    """serve.feedback=false: /health says so, the page unticks and disables "save for feedback", and
    its replies come without judging (which the server would answer with a 404)."""
    with serving(make_app(service, tiny[2], ServeConfig(slots=2), "tiny", feedback=None)) as bare:
        page = browser.new_page()
        try:
            page.goto(bare)
            page.click("#settings summary")
            expect(page.locator("#store")).to_be_disabled()
            expect(page.locator("#store")).not_to_be_checked()
            settings(page, temperature=0, max_tokens=4)
            request = say(page, "hi").post_data_json
            finished(page)
            assert "store" not in request and page.locator("#log .actions").count() == 0
            assert bubbles(page).count() == 1
        finally:
            page.close()
