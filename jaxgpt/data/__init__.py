"""Text and conversations into batches: tokenizers, sources, prepared token shards, dialogues and
their chat template, packing, preference pairs, and the batch sources the trainer reads.

Imports: the top-level modules only; never the model, the mesh or trained runs.
"""
