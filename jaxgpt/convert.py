"""`python -m jaxgpt.convert`: Hugging Face weights in and out (the code: jaxgpt/store/hf/)."""
from jaxgpt.store.hf.convert import main

if __name__ == "__main__":
    main()
