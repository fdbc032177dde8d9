"""`python -m jaxgpt.evaluate`: exact held-out loss of a run (the code:
jaxgpt/train/evaluate.py). Scores on lm-eval tasks (arc_easy, hellaswag, YAML files of your own):
`python -m jaxgpt.tasks RUN tasks=arc_easy,hellaswag` (jaxgpt/tasks.py)."""
from jaxgpt.train.evaluate import main

if __name__ == "__main__":
    main()
