"""`python -m jaxgpt.tokenizer`: train or use a tokenizer (the code: jaxgpt/data/tokenizer.py)."""
from jaxgpt.data.tokenizer import main

if __name__ == "__main__":
    main()
