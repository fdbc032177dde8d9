"""`python -m jaxgpt.evaluate`: exact held-out loss of a run, or with tasks=... its scores on
lm-eval tasks (arc_easy, hellaswag, the built-in jaxgpt_arithmetic and jaxgpt_spelling, YAML files
of your own). The code: jaxgpt/train/evaluate.py and jaxgpt/train/task_scores.py."""
from jaxgpt.train.evaluate import main

if __name__ == "__main__":
    main()
