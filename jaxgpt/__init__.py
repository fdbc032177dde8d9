"""jaxgpt: a GPT in JAX/Flax, from pretraining to a chat assistant."""
