"""Task scores through lm-eval (lm-evaluation-harness): a trained model's scores on lm-eval tasks
and on jaxgpt's built-in ones, one JSON line of {task: {metric: value}}.

    python -m jaxgpt.evaluate RUN_OR_EXPORT tasks=jaxgpt_spelling,arc_easy [limit=N]
        [chat=auto|true|false] [include_path=DIR] [num_fewshot=K] [batch_size=B] [max_length=L]
        [section.key=value ...]
    jaxgpt-lm-eval --model jaxgpt --model_args source=RUN_OR_EXPORT --tasks jaxgpt_spelling \\
        --apply_chat_template          # lm-eval's own command line, with jaxgpt's model and tasks

Needs the eval extra (pip install -e ".[eval]"). Tasks are lm-eval's own (their data comes from
the Hugging Face hub), those the YAML files under include_path define, and the built-in ones
(TASK_DIR, nothing downloaded): jaxgpt_arithmetic and jaxgpt_spelling (both: jaxgpt_tasks), the
held-out problems of data/tasks.py (the first N with limit=N), each reply greedy, at most 48
tokens, scored by the task's reward: `acc` is the accuracy on the fixed held-out set.

chat=auto applies the model's chat template (the backend's apply_chat_template) when the model
speaks in turns: trained on conversations or preference pairs, fine-tuned from another run
(train.init_from: SFT, DPO, GRPO) or imported with a chat model's format (ChatML, Llama 3's).
limit=N scores the first N documents of each task (a fraction below 1: that share of them);
`section.key=value` settings go to the model's loading (model.dtype=bfloat16 ...). A metric's
name carries its filter when that is not lm-eval's "none" (exact_match,strict-match).

lm-eval itself is imported inside the functions that use it (an optional extra: the held-out loss
of jaxgpt.evaluate needs none); the backend reaches lm-eval's registry by its "module:class" path.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxgpt import cli
from jaxgpt.config import Config
from jaxgpt.data import tasks as builtin
from jaxgpt.errors import ConfigError

KEYS = ("tasks", "limit", "chat", "include_path", "num_fewshot", "batch_size", "max_length")
USAGE = ("RUN_OR_EXPORT tasks=NAME[,NAME...] [limit=N] [chat=auto|true|false] [include_path=DIR] "
         "[num_fewshot=K] [batch_size=B] [max_length=L] [section.key=value ...]")
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
BACKEND = "jaxgpt.train.lm_eval_backend:JaxgptLM"


def asks_for_tasks(argv: list[str]) -> bool:
    """Whether a jaxgpt.evaluate command line asks for task scores (one of KEYS given)."""
    return any(a.partition("=")[0] in KEYS and "=" in a for a in argv)


def parse(operands: list[str]) -> tuple[str, dict[str, str]]:
    """(the model's source, {key: value}) of `RUN key=value ...`."""
    source, options = None, {}
    for operand in operands:
        key, eq, value = operand.partition("=")
        if not eq:
            if source is not None:
                raise ConfigError(f"{operand}: a second model (give one RUN_OR_EXPORT)")
            source = operand
        elif key not in KEYS:
            raise ConfigError(f"{operand}: unknown key {key!r} (known: {', '.join(KEYS)}, and "
                              "section.key=value model settings)")
        else:
            options[key] = value
    if source is None or not options.get("tasks"):
        raise ConfigError("give a model and tasks=NAME[,NAME...] (e.g. RUN tasks=jaxgpt_spelling)")
    if options.get("chat", "auto") not in ("auto", "true", "false"):
        raise ConfigError(f"chat={options['chat']}: expected auto, true or false")
    return source, options


def number(options: dict[str, str], key: str, kind=int):
    if key not in options:
        return None
    try:
        return kind(options[key])
    except ValueError:
        raise ConfigError(f"{key}={options[key]}: not a number") from None


def register() -> None:
    """The model "jaxgpt" in lm-eval's registry, imported when first used."""
    import lm_eval.models  # noqa: F401 (lm-eval's own models first: it adds them to an empty registry)
    from lm_eval.api.registry import model_registry
    if "jaxgpt" not in model_registry:
        model_registry.register("jaxgpt", target=BACKEND)


def task_manager(include_path: str | None):
    """lm-eval's tasks, the built-in ones and those under include_path."""
    from lm_eval.tasks import TaskManager
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"include_path={include_path}: no such directory")
    return TaskManager(include_path=[str(TASK_DIR)] + ([include_path] if include_path else []))


def speaks_chat(cfg: Config, tokenizer) -> bool:
    """Whether chat=auto applies the chat template (see the module's docstring)."""
    data = cfg.data
    return (bool(data.chat or data.chat_val or data.preferences or cfg.train.init_from)
            or tokenizer.chat_format != "jaxgpt")


def scores(results: dict) -> dict[str, dict]:
    """{task: {metric: value}} of simple_evaluate's results ("acc,none" read as "acc")."""
    return {task: {key.removesuffix(",none"): value for key, value in metrics.items()
                   if isinstance(value, int | float)}  # not its name, nor its alias
            for task, metrics in results["results"].items()}


def run_tasks(source: str, options: dict[str, str], overrides: list[str] = (),
              log_samples: bool = False) -> dict:
    """simple_evaluate's results of the model on the tasks options names (the command line
    prints their `scores`)."""
    import lm_eval
    from lm_eval.api.registry import get_model
    tasks = [t for t in options["tasks"].split(",") if t]
    manager = task_manager(options.get("include_path"))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"tasks={options['tasks']}: no task {', '.join(unknown)} in lm-eval, "
                          "the built-in tasks or include_path")
    register()
    lm = get_model("jaxgpt")(source=source, overrides=list(overrides),
                             batch_size=number(options, "batch_size"),
                             max_length=number(options, "max_length"))
    chat = options.get("chat", "auto")
    chat = speaks_chat(lm.cfg, lm.tokenizer) if chat == "auto" else chat == "true"
    limit = number(options, "limit", float)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, num_fewshot=number(options, "num_fewshot"),
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        apply_chat_template=chat, fewshot_as_multiturn=chat, log_samples=log_samples)


def main(argv: list[str] | None = None, prog: str = "python -m jaxgpt.evaluate") -> None:
    cli.run(prog, cli.Command(
        lambda operands, settings: print(json.dumps(
            scores(run_tasks(*parse(operands), settings)), default=float)),
        usage=USAGE, root=Config, sections=("model",), operands=(2, 1 + len(KEYS))), argv)


# ---- lm-eval's command line ----

def lm_eval_main() -> None:
    """`jaxgpt-lm-eval`: lm-eval's own command line (lm_eval --model ...) with the model "jaxgpt"
    registered and the built-in tasks' directory as --include_path unless one is given: lm-eval
    0.4 finds a model only in its own list or among those imported before its command runs."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("jaxgpt-lm-eval needs lm-eval: pip install -e \".[eval]\"")
    register()
    argv = sys.argv[1:]
    if argv and argv[0] not in ("-h", "--help") and not any(
            a.split("=")[0] == "--include_path" for a in argv):
        sys.argv += ["--include_path", str(TASK_DIR)]
    cli_evaluate()


# ---- the built-in tasks, as the YAML files under TASK_DIR name them ----

def _docs(task: str) -> dict:
    """The task's held-out problems as lm-eval's test split, training ones as few-shot examples."""
    import datasets

    def split(which: str):
        problems = builtin.problems(task, which, builtin.VAL_SIZE)
        return datasets.Dataset.from_list([p._asdict() for p in problems])
    return {"test": split("val"), "train": split("train")}


def arithmetic(**metadata) -> dict:
    """custom_dataset of jaxgpt_arithmetic (lm-eval passes its metadata, unused here)."""
    return _docs("arithmetic")


def spelling(**metadata) -> dict:
    """custom_dataset of jaxgpt_spelling."""
    return _docs("spelling")


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """acc: the task's reward of the reply (its last number is the answer)."""
    return {"acc": builtin.reward(builtin.Problem(doc["prompt"], doc["answer"]), results[0])}
