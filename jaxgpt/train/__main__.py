"""`python -m jaxgpt.train` (the code: jaxgpt/train/trainer.py)."""
from jaxgpt.train.trainer import main

main()
