"""`python -m jaxgpt.serve` (the code: jaxgpt/serve/app.py)."""
from jaxgpt.serve.app import main

main()
