"""Text out of a model: sampling, the KV-cache engine (slots, continuous batching), the reply
service (threads, text deltas, stop strings) and the screen every reply passes.

Below train/ because training samples at its end (and reinforcement learning samples through the
same engine). Imports: the top-level modules, model/, data/, parallel/, store/; never train/,
serve/, perf/.
"""
