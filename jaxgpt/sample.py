"""`python -m jaxgpt.sample`: continuations of a prompt (the code: jaxgpt/generate/sample.py)."""
from jaxgpt.generate.sample import main

if __name__ == "__main__":
    main()
