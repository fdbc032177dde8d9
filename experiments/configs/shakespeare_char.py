"""Char-level Tiny Shakespeare: nanoGPT's CPU config (the speed and loss reference on 2 cores).

    python experiments/download.py shakespeare            # fetches data/tinyshakespeare.txt
    python -m jaxgpt.train experiments/configs/shakespeare_char.py
    python -m jaxgpt.train experiments/configs/shakespeare_char.py model.preset=llama
"""
from jaxgpt.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        # GPT-2's parameters (biases included). The residual outputs start at 0.02 like every other
        # matrix, not GPT-2's 0.02/sqrt(2*4): at 4 layers that lowers the final val loss by 0.018
        # (mean of 16 seeds, lower on every one; experiments/RESULTS.md).
        model=ModelConfig(preset="gpt2", n_layer=4, n_head=4, d_model=128, seq_len=64,
                          residual_init_std=0.02),
        data=DataConfig(path="data/tinyshakespeare.txt", tokenizer="char", batch_size=12),
        # decay_embeddings as the reference: every matrix decays
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=100, b1=0.9,
                          b2=0.99, weight_decay=0.1, decay_embeddings=True, clip_norm=1.0),
        train=TrainConfig(steps=2000, out_dir="runs/shakespeare_char", log_every=50, eval_every=500,
                          samples=2, sample_tokens=300),
    )
