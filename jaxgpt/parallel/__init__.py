"""The device mesh, its one logical-axis rules table, the shardings of params, state, batches and
the cache, and starting N local processes.

Imports: the top-level modules only; never the model's internals.
"""
