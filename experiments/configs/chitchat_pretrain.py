"""Pretraining a small llama-preset model on chitchat conversations as plain text (the quickstart's
first training stage). The recipe is the best of experiments/sweep.py's variants at equal wall time
(experiments/RESULTS.md): Muon on the hidden matrices, AdamW at 1.2e-2 on the embeddings, head and norms, QK-norm,
batch 32 (at the quickstart's budget the larger batch beat 16 and 64; at 100 s it lost), and bf16
matmuls under fp32 activations (model.matmul_dtype): on a CPU with bf16 instructions (AMX, AVX-512
BF16) the step is 1.4x faster and the steps it buys more than pay for the rounding (at 420 s: 1302
steps, 1.5861 bpb, against 834 fp32 steps, 1.6303). At a fixed 500 steps, AdamW at 1.2e-2 (from 6e-3) with
QK-norm gained 0.021 held-out bits per byte (1.6739 against 1.6945; sweep.py's s500_* variants), and on
top of that the embedding table at 3x AdamW's rate with Muon's momentum at 0.9 (from 0.95) another 0.015
(1.6594 against 1.6743; the r500_* variants). Its 1050 steps take 350-430 s on the 2-core host measured
(Xeon with AMX); on a CPU without bf16 instructions the quickstart multiplies in fp32.

    python -m jaxgpt.data prepare prepare.source=chitchat prepare.tokenizer=bpe:4096 prepare.out=data/chitchat
    python -m jaxgpt.train experiments/configs/chitchat_pretrain.py data.dir=data/chitchat
"""
from jaxgpt.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(preset="llama", n_layer=4, n_head=4, n_kv_head=2, d_model=128, seq_len=128,
                          matmul_dtype="bfloat16", qk_norm=True),
        data=DataConfig(tokenizer="bpe:4096", batch_size=32, segments=True),
        optim=OptimConfig(name="muon", lr=1.2e-2, min_lr=1.2e-3, schedule="cosine", warmup_steps=100, b1=0.9,
                          b2=0.99, weight_decay=0.1, clip_norm=1.0, embed_lr_scale=3.0, muon_momentum=0.9),
        train=TrainConfig(steps=1050, out_dir="runs/chitchat_pretrain", log_every=50, eval_every=525,
                          samples=0),
    )
