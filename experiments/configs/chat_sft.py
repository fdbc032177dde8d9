"""Supervised fine-tuning (SFT): a pretrained jaxgpt model learns to answer as an assistant.

The loss covers assistant tokens only (each reply and its <|assistant_end|>), averaged over the
whole batch; conversations are packed into rows with segment ids, so none attends to another.
The model's shape and tokenizer come from `train.init_from` (a run directory or an export).

    # the quickstart's stage (chitchat dialogues, both speakers taking turns as the user)
    python -m jaxgpt.train experiments/configs/chat_sft.py train.init_from=runs/chitchat_pretrain

    # your own conversations: JSONL lines of {"messages": [{"role": "user", "content": ...}, ...]}
    # (roles system | user | assistant), or ShareGPT-style {"conversations": [{"from", "value"}]}
    python -m jaxgpt.train experiments/configs/chat_sft.py train.init_from=runs/my_base \
        data.chat=jsonl:my_train.jsonl data.chat_val=jsonl:my_val.jsonl \
        data.batch_size=64 optim.lr=3e-5 train.steps=3000 mesh.fsdp=8

On an accelerator: raise data.batch_size (use optim.grad_accum when it does not fit), keep the
learning rate 3-10x below pretraining's peak, and set model.dtype=bfloat16 and model.remat=true
for large models. A conversation longer than the context is cut into windows of whole exchanges
(data.chat_windows=true) or keeps only its newest exchanges (false); a reply is never split.
"""
from jaxgpt.config import Config, DataConfig, OptimConfig, SampleConfig, TrainConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(chat="chitchat", val_fraction=0.05, batch_size=16, chat_windows=True),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=50, b1=0.9, b2=0.99,
                          weight_decay=0.0, clip_norm=1.0),
        # 600 steps: about 115 s after the quickstart's bf16-matmul pretraining on the 2-core host
        # measured (held-out assistant tokens at 100 s, 786 steps: 1.6047 bpb; at 150 s, 1131
        # steps: 1.5963)
        train=TrainConfig(steps=600, out_dir="runs/chat_sft", log_every=50, eval_every=300,
                          samples=0),
        # the model's sampling defaults (talk, serve, sample): of experiments/sweep.py sampling's
        # grid, the setting whose reply measures came nearest the people's own replies to the same
        # contexts
        sample=SampleConfig(temperature=1.0, top_p=0.9, max_new_tokens=60),
    )
