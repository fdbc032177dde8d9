"""Supervised fine-tuning of a real pretrained chat model (SmolLM2-135M-Instruct, converted from its
GGUF) on the quickstart's chitchat dialogues, on a 2-core CPU: experiments/real_model.py runs it
between its evaluations.

    python -m jaxgpt.convert from-gguf smollm2-135m-instruct runs/real/base
    python -m jaxgpt.train experiments/configs/smollm2_sft.py train.init_from=runs/real/base \\
        data.chat=jsonl:TRAIN.jsonl data.chat_val=jsonl:VAL.jsonl model.seq_len=256 \
        model.matmul_dtype=bfloat16

A model trained on 2T tokens and tuned already: a learning rate two orders below the quickstart's
from-scratch SFT, short rows (chitchat's exchanges are short), and matmuls in bf16 (fp32 products
summed) where the CPU has bf16 instructions (the model section is the source's: these two are given
as model.* overrides). The run ends at train.time_limit_s.
"""
from jaxgpt.config import Config, DataConfig, OptimConfig, SampleConfig, TrainConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(chat="chitchat", val_fraction=0.05, batch_size=8, chat_windows=True),
        optim=OptimConfig(lr=3e-5, min_lr=3e-6, schedule="cosine", warmup_steps=5, b1=0.9,
                          b2=0.95, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=60, time_limit_s=600.0, out_dir="runs/real/sft", log_every=5,
                          eval_every=0, samples=0),
        sample=SampleConfig(temperature=0.7, top_p=0.9, max_new_tokens=80),
    )
