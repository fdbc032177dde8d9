"""`python -m jaxgpt.serve` (the code: jaxgpt/serve/server.py)."""
from jaxgpt.serve.server import main

main()
