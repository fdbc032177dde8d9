"""The decoder as pure functions of (params, batch): layers, the KV cache's layout, and the kernels
(attention, norm, matmul, output head + loss) picked once when the model is built for a host.

Imports: the top-level modules (config, errors, hardware) only; never the mesh, files or tokenizers.
"""
