"""Pretraining a small llama-preset model on chitchat conversations as plain text (the quickstart's
first training stage). The recipe is the best of experiments/sweep.py's variants, compared on the
same held-out dialogues (experiments/RESULTS.md):

- Muon (0.02, momentum 0.9) on the hidden matrices; AdamW at 6e-3 on the embeddings, head and norms,
  the embedding tables at 3x that rate; weight decay 0.05; cosine to a tenth of the peak after 100
  warm-up steps;
- QK-norm; the residual projections start near zero (model.residual_init_std=1e-6);
- batch 32 of 128 tokens; bf16 matmuls under fp32 activations (model.matmul_dtype): on a CPU with
  bf16 instructions (AMX, AVX-512 BF16) the step is 1.4x faster and the steps it buys more than pay
  for the rounding; on a CPU without them the quickstart multiplies in fp32;
- the output head fused with its loss over 4 pieces of each row (model.loss_chunks): the same loss,
  the step 6% faster on the 2-core Xeon (194/192 -> 182/176 ms, alternating runs of bench train).

The optimizer's rates and the weight decay were chosen at the quickstart's own horizon on a 2-core
Xeon (2220 steps, the steps its 450-s budget bought there: the q2220_* variants): AdamW at 6e-3 with
weight decay 0.05 gave 1.5475 held-out bits per byte against 1.5535 at 1.2e-2 and 0.1, which had won
at 500 steps. The quickstart sizes its steps to its time budget on the host (2000-3000 there); the
1050 steps here are what `python experiments/quickstart.py --fixed-steps` and a plain
`jaxgpt.train` run.

    python -m jaxgpt.data prepare prepare.source=chitchat prepare.tokenizer=bpe:4096 \
        prepare.out=data/chitchat
    python -m jaxgpt.train experiments/configs/chitchat_pretrain.py data.dir=data/chitchat
"""
from jaxgpt.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(preset="llama", n_layer=4, n_head=4, n_kv_head=2, d_model=128,
                          seq_len=128, matmul_dtype="bfloat16", qk_norm=True,
                          residual_init_std=1e-6, loss_chunks=4),
        data=DataConfig(tokenizer="bpe:4096", batch_size=32, segments=True),
        optim=OptimConfig(name="muon", lr=6e-3, min_lr=6e-4, schedule="cosine", warmup_steps=100,
                          b1=0.9, b2=0.99, weight_decay=0.05, clip_norm=1.0, embed_lr_scale=3.0,
                          muon_momentum=0.9),
        train=TrainConfig(steps=1050, out_dir="runs/chitchat_pretrain", log_every=50,
                          eval_every=525, samples=0),
    )
