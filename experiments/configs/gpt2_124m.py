"""GPT-2 small (124M): 12 layers, 768 wide, 12 heads, context 1024, bf16, for a GPU/TPU.

The recipe of nanoGPT's OpenWebText run, on a prepared token directory:
    python -m jaxgpt.train experiments/configs/gpt2_124m.py data.dir=data/openwebtext
0.5M tokens per step = 480 sequences x 1024; raise optim.grad_accum when they do not fit.
The output head is fused with its loss over 8 pieces of each row (model.loss_chunks): XLA:GPU's
plan for an H100 at 32 rows moves about 40 GB less a step through memory-bound kernels than with the
whole [B, L, V] fp32 logits, and holds 12 GB less (`bench compile ... bench.target=h100`,
RESULTS.md). The head writes its logits in bf16 (model.logits_dtype), as torch autocast does in
nanoGPT's run; the loss reads them into fp32. That plan moves 9.9 GB less a step (6.6 through the
loss's two passes, 3.3 in the matmul's write); on the quickstart's model the held-out loss after
1050 steps was 4.0446 with them against 4.0445 with fp32 logits (RESULTS.md).
"""
from jaxgpt.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def get_config() -> Config:
    return Config(
        model=ModelConfig(preset="gpt2", n_layer=12, n_head=12, d_model=768, seq_len=1024,
                          vocab_size=50304, dtype="bfloat16", loss_chunks=8,
                          logits_dtype="bfloat16"),
        data=DataConfig(tokenizer="gpt2", batch_size=480),
        optim=OptimConfig(lr=6e-4, min_lr=6e-5, schedule="cosine", warmup_steps=2000, b1=0.9,
                          b2=0.95, weight_decay=0.1, clip_norm=1.0, grad_accum=8),
        train=TrainConfig(steps=600000, out_dir="runs/gpt2_124m", log_every=10, eval_every=1000,
                          eval_max_tokens=10_000_000),
        checkpoint=CheckpointConfig(every=1000, keep=3),
    )
