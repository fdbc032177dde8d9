"""`python -m jaxgpt.feedback`: the feedback store: export, stats (the code: jaxgpt/serve/feedback.py)."""
from jaxgpt.serve.feedback import main

if __name__ == "__main__":
    main()
