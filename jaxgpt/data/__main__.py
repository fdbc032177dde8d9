"""`python -m jaxgpt.data` (the code: jaxgpt/data/tokens.py)."""
from jaxgpt.data.tokens import main

main()
