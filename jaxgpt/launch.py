"""`python -m jaxgpt.launch`: N local processes of one jax program (the code:
jaxgpt/parallel/launch.py)."""
from jaxgpt.parallel.launch import main

if __name__ == "__main__":
    main()
