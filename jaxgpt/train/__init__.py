"""Training: the jitted step (pretraining, SFT, DPO), the trainer, the loop, optimizers, exact
evaluation and memory plans.

Imports: everything below it (top, model/, data/, parallel/, store/, generate/); never serve/ or
perf/.
"""
