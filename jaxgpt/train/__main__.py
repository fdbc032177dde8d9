"""`python -m jaxgpt.train` (the code: jaxgpt/train/loop.py)."""
from jaxgpt.train.loop import main

main()
