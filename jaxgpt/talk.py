"""`python -m jaxgpt.talk`: the terminal chat (the code: jaxgpt/serve/talk.py)."""
from jaxgpt.serve.talk import main

if __name__ == "__main__":
    main()
