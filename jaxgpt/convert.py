"""`python -m jaxgpt.convert`: Hugging Face weights in and out (the code: jaxgpt/store/hf.py)."""
from jaxgpt.store.hf import main

if __name__ == "__main__":
    main()
