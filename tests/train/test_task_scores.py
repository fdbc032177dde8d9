"""Tests for the task scores command and the built-in tasks as lm-eval tasks
(jaxgpt/train/task_scores.py, jaxgpt/train/lm_eval_tasks/): the tasks load from the package with
nothing downloaded, a model whose reply is known scores the task's reward of that reply, and the
prompt lm-eval sends is jaxgpt's own chat rendering."""
from __future__ import annotations

import json
import string
import subprocess
import sys
import tomllib
import types

import jax
import numpy as np
import pytest
from conftest import REPO

from jaxgpt.config import Config, DataConfig, ModelConfig
from jaxgpt.data import chat
from jaxgpt.data import tasks as builtin
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.model.gpt import GPT
from jaxgpt.store import export
from jaxgpt.train import evaluate, task_scores
from jaxgpt.train.lm_eval_backend import JaxgptLM

N = 8  # problems scored per task


@pytest.fixture(scope="module")
def threes(tmp_path_factory):
    """(export, tokenizer) of a model that answers every chat prompt "3" and stops: attention and
    MLP write nothing, so each position's logits come from its own token (a bigram table): after
    <|assistant_start|> "3", after "3" <|assistant_end|>, after anything else id 0 (a tab). Its
    config trained on conversations, so chat=auto applies the template."""
    tok = Tokenizer.from_spec("char", corpus=string.printable)
    cfg = ModelConfig(preset="llama", vocab_size=tok.n_vocab, n_layer=1, n_head=2, d_model=32,
                      seq_len=256).resolved()
    params = jax.tree.map(np.array, GPT(cfg).init(jax.random.key(0)))
    start, three = tok.special_id("<|assistant_start|>"), tok.encode("3")[0]
    params["block_0"]["attn"]["wo"]["w"][:] = 0
    params["block_0"]["mlp"]["w_down"]["w"][:] = 0
    wte, head = np.zeros_like(params["wte"]), np.zeros_like(params["lm_head"])
    wte[:, 2], wte[start], wte[three] = 1, np.eye(32)[0], np.eye(32)[1]
    head[0, three], head[1, tok.special_id("<|assistant_end|>")] = 10, 10
    params["wte"], params["lm_head"] = wte, head
    where = export.export(tmp_path_factory.mktemp("threes") / "export",
                          Config(model=cfg, data=DataConfig(chat="chitchat")), params, tok)
    return where, tok


def expected_acc(task: str, reply: str = "3") -> float:
    return float(np.mean([builtin.reward(p, reply) for p in builtin.problems(task, "val", N)]))


def test_the_builtin_tasks_are_the_held_out_problems():
    manager = task_scores.task_manager(None)
    assert {"jaxgpt_arithmetic", "jaxgpt_spelling", "jaxgpt_tasks"} <= set(manager.all_tasks)
    loaded = manager.load(["jaxgpt_tasks"])["tasks"]  # the tag: both
    assert set(loaded) == {"jaxgpt_arithmetic", "jaxgpt_spelling"}
    for name, task in loaded.items():
        problems = builtin.problems(name.removeprefix("jaxgpt_"), "val", builtin.VAL_SIZE)
        assert [builtin.Problem(**d) for d in task.test_docs()] == problems
        assert task.config.generation_kwargs["max_gen_toks"] == 48
    # mixed: the spelling answers the test below counts, some "3" and some not
    assert 0 < expected_acc("spelling") < 1


def test_the_chat_prompt_is_jaxgpts_rendering(threes):
    where, tok = threes
    lm = JaxgptLM(source=str(where))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! 12"},
                    {"role": "user", "content": "2+2?"}]
    text = lm.apply_chat_template(conversation)
    assert lm.tok_encode(text) == chat.render(conversation, tok, for_generation=True)[0].tolist()
    assert text.endswith("<|user_start|>2+2?<|user_end|><|assistant_start|>")
    # a reply lm-eval prefills is left open for the model to go on
    prefilled = lm.apply_chat_template(conversation[:3], add_generation_prompt=False)
    assert lm.tok_encode(prefilled) == chat.render(conversation[:3], tok)[0].tolist()[:-1]
    assert lm.stop_ids(lm.tok_encode(text)) == chat.layout(tok).stop_ids
    assert lm.stop_ids(tok.encode("2+2?")) == (tok.eot_id,)
    assert lm.chat_template(True) == "jaxgpt" and lm.chat_template(False) is None


@pytest.mark.slow
def test_the_builtin_tasks_score_the_reward_of_the_reply(threes, capsys, monkeypatch):
    where, tok = threes
    sent = []  # (prompt, reply) of each request, as the backend sees them
    generate_until = JaxgptLM.generate_until

    def recorded(self, requests, disable_tqdm=False):
        replies = generate_until(self, requests, disable_tqdm)
        sent.extend(zip([r.args[0] for r in requests], replies, strict=True))
        return replies
    monkeypatch.setattr(JaxgptLM, "generate_until", recorded)
    evaluate.main([str(where), "tasks=jaxgpt_spelling,jaxgpt_arithmetic", f"limit={N}"])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["jaxgpt_spelling"]["acc"] == pytest.approx(expected_acc("spelling"))
    assert scores["jaxgpt_arithmetic"]["acc"] == pytest.approx(expected_acc("arithmetic"))
    # chat=auto: the model trained on conversations gets jaxgpt's rendering of each problem
    problems = builtin.problems("spelling", "val", N) + builtin.problems("arithmetic", "val", N)
    assert sorted(sent) == sorted(
        (tok.decode(chat.render([{"role": "user", "content": p.prompt}], tok, True)[0]), "3")
        for p in problems)
    # without the chat template the prompt alone, and no "3" (a tab after its ".")
    results = task_scores.run_tasks(str(where), {"tasks": "jaxgpt_spelling", "limit": "2",
                                                 "chat": "false"}, log_samples=True)
    assert results["results"]["jaxgpt_spelling"]["acc,none"] == 0
    samples = results["samples"]["jaxgpt_spelling"]
    assert [s["arguments"][0][0] for s in samples] == [p.prompt for p in problems[:2]]


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_jaxgpt(threes, tmp_path, run_env):
    """jaxgpt-lm-eval (task_scores.lm_eval_main): lm-eval's command line, the model and the
    built-in tasks known to it."""
    where, _ = threes
    code = "from jaxgpt.train.task_scores import lm_eval_main; lm_eval_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--model", "jaxgpt", "--model_args", f"source={where}",
         "--tasks", "jaxgpt_spelling", "--limit", str(N), "--apply_chat_template",
         "--output_path", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600,
        env=run_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [written] = tmp_path.rglob("results_*.json")
    results = json.loads(written.read_text())["results"]
    assert results["jaxgpt_spelling"]["acc,none"] == pytest.approx(expected_acc("spelling"))


def test_chat_auto_follows_how_the_model_was_trained(threes):
    tok = threes[1]
    assert not task_scores.speaks_chat(Config(), tok)
    assert task_scores.speaks_chat(Config(data=DataConfig(chat="chitchat")), tok)
    chatml = types.SimpleNamespace(chat_format="chatml")  # an imported chat model's tokenizer
    assert task_scores.speaks_chat(Config(), chatml)


def test_evaluate_routes_tasks_to_the_task_scores():
    assert task_scores.asks_for_tasks(["run", "tasks=jaxgpt_spelling"])
    assert task_scores.asks_for_tasks(["run", "limit=3"])  # then parse names what is missing
    assert not task_scores.asks_for_tasks(["run", "data.path=x.txt", "eval.split=all"])
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["run", "limit=3"])
    assert exit_.value.code == 2


def test_the_task_files_and_the_command_ship_with_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["jaxgpt"]
    shipped = {path for pattern in patterns for path in (REPO / "jaxgpt").glob(pattern)}
    assert set(task_scores.TASK_DIR.glob("*.yaml")) <= shipped
    assert len(list(task_scores.TASK_DIR.glob("*.yaml"))) == len(builtin.TASKS)
    assert (project["project"]["scripts"]["jaxgpt-lm-eval"]
            == "jaxgpt.train.task_scores:lm_eval_main")
