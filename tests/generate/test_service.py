"""Tests for jaxgpt.generate.service: the threaded Service over an engine, its streams, warm-up
and screening."""
import threading

import jax
import numpy as np
import pytest
import regex
from chars import CHARS, REFUSAL, char_tokenizer, screen

from jaxgpt.config import ModelConfig, ScreenConfig
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.generate.screen import Screen, normalize_text
from jaxgpt.generate.service import Service
from jaxgpt.model.gpt import GPT

# ---- the Service, on a tiny random model with a character vocabulary ----

@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    cfg = ModelConfig(preset="gpt2", vocab_size=tok.n_vocab, n_layer=2, n_head=2, d_model=32,
                      seq_len=64).resolved()
    model = GPT(cfg)
    return model, model.init(jax.random.key(3)), tok


def greedy_text(tiny, prompt, n):
    model, params, tok = tiny
    [ids] = Engine(model, params, tok, slots=1).generate(
        [tok.encode(prompt)], SamplingParams(temperature=0, max_tokens=n))
    return tok.decode_bytes(ids).decode()


@pytest.mark.parametrize("warmed", ["greedy", "sampling"])
def test_warm_up_compiles_the_decode_calls_of_the_sampling_it_is_given(warmed):
    """A greedy first reply after warm_up(params=greedy) compiles no decode call; after a warm-up
    that sampled, it compiles its own (the greedy path is a program of its own)."""
    from jaxgpt.generate import programs
    tok = char_tokenizer()
    # a model of this test's own: no other test has compiled its programs
    cfg = ModelConfig(preset="gpt2", vocab_size=tok.n_vocab, n_layer=1, n_head=2, d_model=16,
                      seq_len=48 if warmed == "greedy" else 40).resolved()
    model = GPT(cfg)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    with Service(Engine(model, model.init(jax.random.key(0)), tok, slots=1), tok) as service:
        service.warm_up(params=greedy if warmed == "greedy" else SamplingParams())
        compiled = programs.decode._cache_size()
        service.complete(tok.encode("hello"), greedy).result()
        assert programs.decode._cache_size() - compiled == (0 if warmed == "greedy" else 1)


def test_after_warm_up_a_first_message_of_the_usual_length_compiles_nothing():
    """warm_up's message stands for a first message's usual length: a conversation of that length
    (the same system message, other words) then compiles no prefill, placing or decode call."""
    from jaxgpt.generate import programs
    from jaxgpt.generate.service import WARM_UP_MESSAGE
    tok = Tokenizer.from_spec("char", corpus=CHARS + WARM_UP_MESSAGE + "Be brief.")
    cfg = ModelConfig(preset="gpt2", vocab_size=tok.n_vocab, n_layer=1, n_head=2, d_model=16,
                      seq_len=96).resolved()  # a model of this test's own
    model = GPT(cfg)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    message = "".join(reversed(WARM_UP_MESSAGE))
    with Service(Engine(model, model.init(jax.random.key(0)), tok, slots=1), tok) as service:
        service.warm_up(system="Be brief.", params=greedy)
        jitted = (programs.prefill, programs.place, programs.decode)
        compiled = [f._cache_size() for f in jitted]
        service.chat([{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": message}], greedy).result()
        assert [f._cache_size() for f in jitted] == compiled


def test_concurrent_callers_get_the_replies_they_would_alone(tiny):
    model, params, tok = tiny
    prompts = ["hello", "abc", "what is this", "ok", "z"]
    settings = [SamplingParams(temperature=0.9, seed=i, max_tokens=6 + i)
                for i in range(len(prompts))]
    alone = [tok.decode_bytes(Engine(model, params, tok, slots=1).generate([tok.encode(p)], sp)[0])
             .decode() for p, sp in zip(prompts, settings, strict=False)]
    got = [None] * len(prompts)
    with Service(Engine(model, params, tok, slots=2), tok) as service:
        def call(i):
            stream = service.complete(tok.encode(prompts[i]), settings[i])
            got[i] = ("".join(d.text for d in stream), stream.result()[0])
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [text for text, _ in got] == alone
    assert [reply.text for _, reply in got] == alone
    assert all(r.finish_reason == "length" and len(r.token_ids) == sp.max_tokens
               for (_, r), sp in zip(got, settings, strict=False))
    assert service.load()["screen"]["passed"] == 0  # no screen given: nothing counted as screened


def test_a_phrase_the_model_says_is_screened_end_to_end(tiny, tmp_path):
    model, params, tok = tiny
    sp = SamplingParams(temperature=1.0, seed=0, max_tokens=30)
    [ids] = Engine(model, params, tok, slots=1).generate([tok.encode("hello")], sp)
    # what the model says unscreened, look-alike letters and all
    plain = tok.decode_bytes(ids).decode()
    words = regex.findall(r"\w+", normalize_text(plain)[0])
    # it writes some look-alikes
    assert len(words) >= 2 and any(c not in normalize_text(c)[0] for c in plain)
    phrase = words[1]
    # the list writes the word in full-width letters with a zero-width space:
    # the same once normalised
    disguised = "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in phrase)
    s = screen(tmp_path, disguised[:1] + "\u200b" + disguised[1:])
    with Service(Engine(model, params, tok, slots=1), tok, s) as service:
        stream = service.complete(tok.encode("hello"), sp)
        shown = "".join(d.text for d in stream)
        [reply] = stream.result()
    said = shown.removesuffix(REFUSAL).rstrip(" ")
    assert shown.endswith(REFUSAL) and phrase not in normalize_text(said)[0]
    # all before it
    assert (plain.startswith(said)
            and len(normalize_text(said)[0]) == normalize_text(plain)[0].index(phrase))
    assert reply.finish_reason == "content_filter" and reply.screened == "blocklist"
    assert len(reply.token_ids) < 30  # decoding stopped at the match
    assert s.counts()["blocked_reply"] == 1


def test_a_blocked_user_message_gets_the_refusal_without_generating(tiny, tmp_path):
    model, params, tok = tiny
    s = screen(tmp_path, "bad word")
    engine = Engine(model, params, tok, slots=1)
    with Service(engine, tok, s) as service:
        stream = service.chat([{"role": "user", "content": "say a BAD  word"}],
                              SamplingParams(max_tokens=5))
        [reply] = stream.result(5)
        assert [d.text for d in stream] == [REFUSAL]
    assert (reply.finish_reason == "content_filter" and reply.token_ids == []
            and engine._next_id == 0)
    assert s.counts()["blocked_user"] == 1


@pytest.mark.parametrize("mode", ["flag", "refuse"])
def test_low_confidence_replies_are_flagged_or_refused(tiny, mode):
    model, params, tok = tiny
    s = Screen(ScreenConfig(blocklist=None, min_mean_logprob=0.0, low_confidence=mode,
                            refusal=REFUSAL))
    with Service(Engine(model, params, tok, slots=1), tok, s) as service:
        stream = service.complete(tok.encode("hello"), SamplingParams(temperature=0, max_tokens=8))
        deltas = list(stream)
        [reply] = stream.result()
    assert (reply.flagged and reply.mean_logprob == pytest.approx(np.mean(reply.logprobs))
            and reply.mean_logprob < 0)
    if mode == "flag":
        assert reply.text == greedy_text(tiny, "hello", 8) and reply.finish_reason == "length"
        assert s.counts()["low_confidence_flagged"] == 1
    else:  # nothing was shown before the verdict
        assert [d.text for d in deltas] == [""] * (len(deltas) - 1) + [REFUSAL]
        assert reply.text == REFUSAL and reply.finish_reason == "content_filter"
        assert s.counts()["low_confidence_refused"] == 1


def test_cancel_stops_a_reply_and_frees_the_slot(tiny):
    model, params, tok = tiny
    engine = Engine(model, params, tok, slots=1)
    with Service(engine, tok) as service:
        long = service.complete(tok.encode("a"), SamplingParams(temperature=0, max_tokens=10_000))
        for i, _ in enumerate(long):
            if i == 2:
                long.cancel()
        [reply] = long.result(30)
        short = service.complete(tok.encode("b"), SamplingParams(temperature=0, max_tokens=3))
        assert short.result(30)[0].finish_reason == "length"
    assert reply.finish_reason == "cancelled" and 3 <= len(reply.token_ids) < 100


def test_a_failing_step_answers_everyone_and_the_service_goes_on(tiny, monkeypatch):
    model, params, tok = tiny
    engine = Engine(model, params, tok, slots=2)
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device went away")
        return real_step()
    monkeypatch.setattr(engine, "step", flaky_step)
    with Service(engine, tok) as service:
        a = service.complete(tok.encode("a"), SamplingParams(temperature=0, max_tokens=20))
        b = service.complete(tok.encode("b"), SamplingParams(temperature=0, max_tokens=20))
        failed = [a.result(30)[0], b.result(30)[0]]
        after = service.complete(tok.encode("hello"),
                                 SamplingParams(temperature=0, max_tokens=5)).result(30)[0]
    assert [r.finish_reason for r in failed] == ["error", "error"]
    assert failed[0].error == "RuntimeError: the device went away"
    assert after.finish_reason == "length" and after.text == greedy_text(tiny, "hello", 5)


def test_chat_drops_old_turns_to_fit_or_says_which_field(tiny):
    model, params, tok = tiny
    turns = [{"role": "system", "content": "be nice"}]
    for i in range(8):
        turns += [{"role": "user", "content": f"question {'abc'[i % 3]}"},
                  {"role": "assistant", "content": "answer ok"}]
    turns.append({"role": "user", "content": "last one"})
    with Service(Engine(model, params, tok, slots=1), tok) as service:
        [reply] = service.chat(turns, SamplingParams(temperature=0, max_tokens=10)).result(30)
        assert reply.prompt_tokens <= 64 - 10 and reply.finish_reason in ("length", "stop")
        with pytest.raises(ValueError,
                           match=r"^messages: \d+ prompt tokens plus max_tokens=10 exceed"):
            service.chat(turns, SamplingParams(max_tokens=10), drop_old_turns=False)
        with pytest.raises(ValueError, match=r"^top_p=1.5 must be in"):
            service.complete([1], SamplingParams(top_p=1.5))
