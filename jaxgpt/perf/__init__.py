"""Measurement: benchmarks printing JSON, ahead-of-time compilation for a GPU from a CPU host,
profiles. Nothing here asserts anything.

Imports: anything in jaxgpt/.
"""
