"""`python -m jaxgpt.evaluate`: exact held-out loss of a run (the code:
jaxgpt/train/evaluate.py)."""
from jaxgpt.train.evaluate import main

if __name__ == "__main__":
    main()
