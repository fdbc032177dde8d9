"""`python -m jaxgpt.chat`: render conversations, convert chat corpora (the code: jaxgpt/data/chat.py)."""
from jaxgpt.data.chat import main

if __name__ == "__main__":
    main()
