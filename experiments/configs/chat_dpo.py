"""Preference tuning (DPO) of a chat model: it learns to prefer the chosen reply of each pair over
the rejected one, against a frozen copy of itself (the reference: the train.init_from model).

The loss covers the two replies' tokens only; both sequences of a pair are packed into one row
(several pairs per row), and none attends to another. The model's shape and tokenizer come from
train.init_from (an SFT run directory or export). metrics.jsonl logs the loss, the reward margin
(beta-scaled chosen-minus-rejected log-ratio) and, every eval, the held-out pairs' preference
accuracy and the held-out conversations' assistant-token bits per byte (data.chat_val, else the SFT
run's held-out chats): what the tuning costs in fit.

    # pairs: JSONL lines of {"messages": [...context, ending with a user turn],
    #                        "chosen": "...", "rejected": "..."}
    python -m jaxgpt.train experiments/configs/chat_dpo.py train.init_from=runs/chat_sft \
        data.preferences=jsonl:pairs.jsonl [data.preferences_val=jsonl:val_pairs.jsonl] \
        [dpo.beta=0.1]

    # the loop that makes pairs from the SFT model's own replies and measures what DPO changes
    python experiments/preference_loop.py --sft runs/quickstart/export

dpo.reference=step scores each batch with the reference in the step (its params kept beside the
state) instead of scoring every pair once before training; dpo.label_smoothing > 0 is conservative
DPO (labels assumed wrong that often). Sized for the quickstart's 1.8M-parameter model on a CPU;
for a large model lower optim.lr by 10-100x (DPO moves far from the reference quickly).
"""
from jaxgpt.config import Config, DataConfig, DpoConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(val_fraction=0.1, batch_size=16),
        optim=OptimConfig(lr=1e-4, min_lr=1e-5, schedule="cosine", warmup_steps=10, b1=0.9, b2=0.99,
                          weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=150, out_dir="runs/chat_dpo", log_every=10, eval_every=50,
                          samples=0),
        dpo=DpoConfig(beta=0.1, label_smoothing=0.0, reference="precompute"),
    )
