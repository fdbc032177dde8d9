"""`python -m jaxgpt.export`: a run's params, config and tokenizer for inference (the code: jaxgpt/store/export.py)."""
from jaxgpt.store.export import main

if __name__ == "__main__":
    main()
