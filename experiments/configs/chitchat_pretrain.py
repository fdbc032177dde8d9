"""Pretraining a small llama-preset model on chitchat conversations as plain text (the quickstart's
first training stage; sized for a 2-core CPU: about 4 minutes).

    python -m jaxgpt.data prepare prepare.source=chitchat prepare.tokenizer=bpe:4096 prepare.out=data/chitchat
    python -m jaxgpt.train experiments/configs/chitchat_pretrain.py data.dir=data/chitchat
"""
from jaxgpt.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(preset="llama", n_layer=4, n_head=4, n_kv_head=2, d_model=128, seq_len=128),
        data=DataConfig(tokenizer="bpe:4096", batch_size=16, segments=True),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, schedule="cosine", warmup_steps=100, b1=0.9, b2=0.99,
                          weight_decay=0.1, clip_norm=1.0),
        train=TrainConfig(steps=1200, out_dir="runs/chitchat_pretrain", log_every=50, eval_every=400,
                          samples=0),
    )
