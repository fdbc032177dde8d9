"""Hugging Face <-> jaxgpt: a model's config, weights and tokenizer, read in and written out.

config.py maps config.json to ModelConfig and back, weights.py the safetensors tensors to jaxgpt's
params and back, tokenizer.py the tokenizer files; convert.py joins them into the two commands,
`python -m jaxgpt.convert from-hf|to-hf`.
"""
