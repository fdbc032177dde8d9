"""GGUF <-> jaxgpt: llama.cpp's file format, read in and written out.

models.py finds the file (a path, a known model fetched once with pip, a hub file), config.py maps
the metadata to ModelConfig, weights.py the tensors to params (dequantized) and back, tokenizer.py
the tokenizer keys, writer.py writes a file; convert.py joins them into `python -m jaxgpt.convert
from-gguf|to-gguf`.
"""
