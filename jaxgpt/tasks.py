"""`python -m jaxgpt.tasks`: a trained model's scores on lm-eval (lm-evaluation-harness) tasks,
one JSON line of {task: {metric: value}} (the backend: jaxgpt/train/lm_eval_backend.py).

    python -m jaxgpt.tasks RUN_OR_EXPORT tasks=arc_easy,hellaswag [limit=N] [include_path=DIR]
        [num_fewshot=K] [batch_size=B] [max_length=L] [section.key=value ...]

Needs the eval extra (pip install -e ".[eval]"). Tasks are lm-eval's own (their data comes from
the Hugging Face hub) or those the YAML files under include_path define; limit=N scores the
first N documents of each (a fraction below 1: that share of them). `section.key=value` settings
go to the model's loading as in jaxgpt.evaluate (model.dtype=bfloat16 ...). A metric's name
carries its filter when that is not lm-eval's "none" (exact_match,strict-match).
"""
from __future__ import annotations

import json
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from jaxgpt import cli
from jaxgpt.config import Config
from jaxgpt.errors import ConfigError
from jaxgpt.train import lm_eval_backend  # noqa: F401 (registers the model "jaxgpt")

KEYS = ("tasks", "limit", "include_path", "num_fewshot", "batch_size", "max_length")


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
        raise ConfigError("give a model and tasks=NAME[,NAME...] (e.g. RUN tasks=arc_easy)")
    return source, options


def number(options: dict[str, str], key: str, kind=int):
    if key not in options:
        return None
    try:
        return kind(options[key])
    except ValueError:
        raise ConfigError(f"{key}={options[key]}: not a number") from None


def task_manager(include_path: str | None) -> TaskManager:
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"include_path={include_path}: no such directory")
    return TaskManager(include_path=include_path or None)


def scores(results: dict) -> dict[str, dict]:
    """{task: {metric: value}} of simple_evaluate's results ("acc,none" read as "acc")."""
    return {task: {key.removesuffix(",none"): value for key, value in metrics.items()
                   if key != "alias"}
            for task, metrics in results["results"].items()}


def run_tasks(source: str, options: dict[str, str], overrides: list[str] = ()) -> dict:
    """What the command line prints: the model's scores on the tasks options names."""
    tasks = [t for t in options["tasks"].split(",") if t]
    manager = task_manager(options.get("include_path"))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"tasks={options['tasks']}: no task {', '.join(unknown)} in lm-eval "
                          "or include_path")
    limit = number(options, "limit", float)
    model_args = {"source": source, "overrides": list(overrides),
                  "max_length": number(options, "max_length")}
    results = lm_eval.simple_evaluate(
        model="jaxgpt", model_args={k: v for k, v in model_args.items() if v is not None},
        tasks=tasks, task_manager=manager, num_fewshot=number(options, "num_fewshot"),
        batch_size=number(options, "batch_size"),
        limit=int(limit) if limit is not None and limit >= 1 else limit, log_samples=False)
    return scores(results)


def main(argv: list[str] | None = None) -> None:
    cli.run("python -m jaxgpt.tasks", cli.Command(
        lambda operands, settings: print(json.dumps(
            run_tasks(*parse(operands), settings), default=float)),
        usage="RUN_OR_EXPORT tasks=NAME[,NAME...] [limit=N] [include_path=DIR] [num_fewshot=K] "
              "[batch_size=B] [max_length=L] [section.key=value ...]",
        root=Config, sections=("model",), operands=(2, 1 + len(KEYS))), argv)


if __name__ == "__main__":
    main()
