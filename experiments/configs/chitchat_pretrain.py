"""Pretraining a small llama-preset model on chitchat conversations as plain text (the quickstart's
first training stage). The recipe is the best of experiments/sweep.py's variants at equal wall time
(experiments/RESULTS.md): Muon on the hidden matrices, AdamW at 6e-3 on the embeddings, head and norms,
batch 32 (at the quickstart's budget the larger batch beat 16 and 64; at 100 s it lost). Its 880 steps
take about 400 s on a 2-core CPU of the slowest kind measured; the quickstart trains as many as 400 s
buy on the host it runs on (experiments/quickstart.py: BUDGET_S).

    python -m jaxgpt.data prepare prepare.source=chitchat prepare.tokenizer=bpe:4096 prepare.out=data/chitchat
    python -m jaxgpt.train experiments/configs/chitchat_pretrain.py data.dir=data/chitchat
"""
from jaxgpt.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(preset="llama", n_layer=4, n_head=4, n_kv_head=2, d_model=128, seq_len=128),
        data=DataConfig(tokenizer="bpe:4096", batch_size=32, segments=True),
        optim=OptimConfig(name="muon", lr=6e-3, min_lr=6e-4, schedule="cosine", warmup_steps=100, b1=0.9,
                          b2=0.99, weight_decay=0.1, clip_norm=1.0),
        train=TrainConfig(steps=880, out_dir="runs/chitchat_pretrain", log_every=50, eval_every=440,
                          samples=0),
    )
