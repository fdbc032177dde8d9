"""What is written to disk and read back: orbax checkpoints and resume, the export format, the one
loader of a trained model (runs.load), and Hugging Face conversion.

Imports: the top-level modules, model/, data/, parallel/; never train/, generate/, serve/ or perf/.
"""
