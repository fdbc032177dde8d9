"""Tests for jaxgpt's lm-eval backend (jaxgpt/train/lm_eval_backend.py) and `python -m
jaxgpt.evaluate RUN tasks=...`: every score checked against one computed here from the model's own
logits (or its engine's greedy reply), on tasks whose YAML and JSONL files the tests write (nothing
is downloaded; the built-in tasks: test_task_scores.py)."""
from __future__ import annotations

import functools
import json
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from conftest import REPO
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from jaxgpt.config import Config, MeshConfig, ModelConfig
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.data.tokens import window_batches
from jaxgpt.errors import ConfigError
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding
from jaxgpt.store import export, runs
from jaxgpt.train.evaluate import evaluate_batches, make_eval_step
from jaxgpt.train.lm_eval_backend import JaxgptLM
from jaxgpt.train.task_scores import parse, run_tasks

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(export directory, GPT, its params as loaded back, tokenizer): a random llama-style model
    over the printable ASCII characters."""
    tok = Tokenizer.from_spec("char", corpus=string.printable)
    cfg = ModelConfig(preset="llama", vocab_size=tok.n_vocab, n_layer=2, n_head=2, d_model=32,
                      seq_len=SEQ_LEN).resolved()
    params = GPT(cfg).init(jax.random.key(0))
    # larger weights than the init's: logits far from uniform, so no argmax is a near tie
    params = jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, params)
    where = export.export(tmp_path_factory.mktemp("lm_eval") / "export", Config(model=cfg),
                          params, tok)
    return where, GPT(cfg), runs.load(where).params, tok


@functools.cache
def jitted(model: GPT):
    return jax.jit(model.apply)


def by_hand(model, params, context, continuation, max_length=SEQ_LEN):
    """(log p(continuation | context), greedy) from GPT.apply's logits: the last max_length + 1
    tokens of context + continuation, the continuation's tokens scored."""
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    logits = np.asarray(jitted(model)(params, jnp.asarray(whole[:-1], jnp.int32)[None])[0],
                        np.float64)
    top = logits.max(-1, keepdims=True)  # log_softmax
    logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
    return (sum(logprobs[p, whole[p + 1]] for p in positions),
            all(int(np.argmax(logits[p])) == whole[p + 1] for p in positions))


def instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def greedy_text(model, params, tok, context: str, n: int) -> str | None:
    """The n characters greedy decoding continues context with, or None if one is special."""
    ids = tok.encode(context)
    for _ in range(n):
        ids.append(int(np.argmax(jitted(model)(params, jnp.asarray(ids)[None])[0, -1])))
    new = ids[-n:]
    return tok.decode(new) if all(not tok.is_special(i) for i in new) else None


def test_loglikelihood_is_the_models_log_probability(tiny):
    where, model, params, tok = tiny
    lm = JaxgptLM(source=str(where), batch_size=3, max_length=32)
    context = next(c for c in ("abc", "To be", "Hello", "xyz", "42", "The") if
                   greedy_text(model, params, tok, c, 3) is not None)
    greedy = greedy_text(model, params, tok, context, 3)
    long_context = "".join(string.ascii_letters[i % 52] for i in range(100))
    requests = [("To be, or not", " to be"), ("Question: 2+2?\nAnswer: ", "4"), ("", "hello"),
                (long_context, " the end"), (context, greedy)]
    got = lm.loglikelihood([instance("loglikelihood", r) for r in requests])
    enc = tok.encode
    # lm-eval moves a context's trailing space into the continuation; no context: end-of-text
    expected = [by_hand(model, params, enc("To be, or not"), enc(" to be"), 32),
                by_hand(model, params, enc("Question: 2+2?\nAnswer:"), enc(" 4"), 32),
                by_hand(model, params, [tok.eot_id], enc("hello"), 32),
                by_hand(model, params, enc(long_context), enc(" the end"), 32),
                by_hand(model, params, enc(context), enc(greedy), 32)]
    for (logprob, is_greedy), (want, want_greedy) in zip(got, expected, strict=True):
        assert logprob == pytest.approx(want, abs=1e-5)
        assert is_greedy == want_greedy
    assert got[-1][1] and not all(g for _, g in got)


def test_loglikelihood_rolling_is_jaxgpts_evaluation(tiny):
    where, model, params, tok = tiny
    lm = JaxgptLM(source=str(where), batch_size=4, max_length=32)
    texts = ["ROMEO: Good night, good night! Parting is such sweet sorrow,\n" * 3, "Short."]
    got = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (t,)) for t in texts])
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    step = make_eval_step(model, mesh, sharding.logical_to_mesh(model.logical_axes, params, mesh))
    for text, logprob in zip(texts, got, strict=True):
        tokens = np.array([tok.eot_id, *tok.encode(text)])
        result = evaluate_batches(step, params, window_batches(tokens, 32, 0, 4), mesh)
        assert result["tokens"] == len(text)  # every character once, the first after <eot>
        assert logprob == pytest.approx(-result["loss"] * result["tokens"], rel=1e-4)


CHOICES = [("The sky is", ["blue", "green", "loud"]), ("Two plus two is", ["four", "five", "six"]),
           ("Cats say", ["meow", "woof", "moo"]), ("Water is", ["wet", "dry", "square"])]
GEN_PROMPTS = ["Once upon a time", "The quick brown fox", "To be or not"]
GEN_KWARGS = {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False}


def write_task(directory, name: str, docs: list[dict], **fields) -> None:
    """A task on a JSONL file of docs (JSON is YAML, which lm-eval reads)."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {"task": name, "dataset_path": "json", "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": str(data)},
                                 "cache_dir": str(directory / "hf-cache")}, **fields}
    (directory / f"{name}.yaml").write_text(json.dumps(config))


def reply_by_hand(model, params, tok, prompt: str) -> str:
    """The engine's greedy reply, cut at the first stop string."""
    engine = Engine(model, params, tok, slots=1)
    [ids] = engine.generate([tok.encode(prompt)], SamplingParams(
        temperature=0, max_tokens=GEN_KWARGS["max_gen_toks"], stop_ids=(tok.eot_id,)))
    text = tok.decode([i for i in ids if not tok.is_special(i)])
    cut = min([text.find(s) for s in GEN_KWARGS["until"] if s in text], default=len(text))
    return text[:cut]


@pytest.fixture(scope="module")
def tasks(tiny, tmp_path_factory):
    """(task directory, hand-made labels' expected acc, expected exact_match): a multiple-choice
    task whose first two docs are labelled with the choice the model's log-probabilities favour and
    the last two with the one they favour least; a generative task whose first two answers are the
    model's greedy replies."""
    where, model, params, tok = tiny
    directory = tmp_path_factory.mktemp("tasks")
    docs = []
    for n, (question, choices) in enumerate(CHOICES):
        scores = [by_hand(model, params, tok.encode(question), tok.encode(" " + c))[0]
                  for c in choices]
        label = int(np.argmax(scores)) if n < 2 else int(np.argmin(scores))
        docs.append({"question": question, "choices": choices, "label": label})
    write_task(directory, "tiny_choice", docs, output_type="multiple_choice",
               doc_to_text="{{question}}", doc_to_choice="choices", doc_to_target="label",
               metric_list=[{"metric": "acc"}])
    replies = [reply_by_hand(model, params, tok, p) for p in GEN_PROMPTS]
    answers = replies[:2] + ["not the reply" + replies[2]]
    write_task(directory, "tiny_gen",
               [{"question": p, "answer": a} for p, a in zip(GEN_PROMPTS, answers, strict=True)],
               output_type="generate_until", doc_to_text="{{question}}", doc_to_target="answer",
               generation_kwargs=GEN_KWARGS, metric_list=[{"metric": "exact_match"}])
    return directory


@pytest.fixture(scope="module")
def task_results(tiny, tasks):
    where = tiny[0]
    return lm_eval.simple_evaluate(
        model="jaxgpt", model_args={"source": str(where)}, tasks=["tiny_choice", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=2,
        log_samples=True)


@pytest.mark.slow
def test_a_multiple_choice_task_scores_acc_by_hand(task_results):
    assert task_results["results"]["tiny_choice"]["acc,none"] == pytest.approx(0.5)


@pytest.mark.slow
def test_a_generative_task_scores_the_engines_greedy_replies(task_results, tiny):
    _, model, params, tok = tiny
    samples = task_results["samples"]["tiny_gen"]
    replies = {s["doc"]["question"]: s["filtered_resps"][0] for s in samples}
    assert replies == {p: reply_by_hand(model, params, tok, p) for p in GEN_PROMPTS}
    assert task_results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_the_command_line_prints_the_scores(tiny, tasks, run_env):
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.evaluate", str(tiny[0]),
                           "tasks=tiny_choice,tiny_gen", f"include_path={tasks}", "limit=3"],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=run_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    # limit=3: the multiple-choice task's first three docs, two of them labelled as the model picks
    assert scores["tiny_choice"]["acc"] == pytest.approx(2 / 3)
    assert scores["tiny_gen"]["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="no task no_such_task in lm-eval, the built-in tasks"):
        run_tasks(str(tiny[0]), {"tasks": "tiny_gen,no_such_task", "include_path": str(tasks)})


def test_the_command_line_names_what_is_wrong(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'task'"):
        parse(["run", "task=arc_easy"])
    with pytest.raises(ConfigError, match="tasks=NAME"):
        parse(["run", "limit=3"])
    with pytest.raises(ConfigError, match="include_path=.*no such directory"):
        run_tasks(str(tiny[0]), {"tasks": "x", "include_path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="model args colour: unknown"):
        JaxgptLM(source=str(tiny[0]), colour="red")
    with pytest.raises(ConfigError, match="max_length=65: at most the model's seq_len"):
        JaxgptLM(source=str(tiny[0]), max_length=SEQ_LEN + 1)


@pytest.mark.slow
def test_smollm2_scores_as_its_logits(smollm2_export):
    """The real 135M model: two continuations of one context, scored as GPT.apply's logits say."""
    _, source = smollm2_export
    lm = JaxgptLM(source=str(source), batch_size=2, max_length=64)
    loaded = runs.load(source)
    model, tok = GPT(loaded.cfg.model), loaded.tokenizer
    requests = [("The capital of France is", " Paris"), ("The capital of France is", " London")]
    got = lm.loglikelihood([instance("loglikelihood", r) for r in requests])
    for (context, continuation), (logprob, is_greedy) in zip(requests, got, strict=True):
        whole = tok.encode(context + continuation)
        n = len(whole) - len(tok.encode(context))
        want, want_greedy = by_hand(model, loaded.params, whole[:-n], whole[-n:], 64)
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert is_greedy == want_greedy
    assert got[0][0] > got[1][0]  # a real model: Paris over London
