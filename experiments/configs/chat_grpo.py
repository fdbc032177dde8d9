"""Reinforcement learning on verifiable rewards (GRPO) of a chat model on a built-in task with exact
answers: SmolLM2-135M-Instruct on the spelling task (count a letter in a word), on a 2-core CPU.

    python -m jaxgpt.convert from-gguf smollm2-135m-instruct runs/real/base
    python -m jaxgpt.train experiments/configs/chat_grpo.py train.init_from=runs/real/base \\
        model.seq_len=256 model.matmul_dtype=bfloat16
    python experiments/grpo_curves.py runs/real/grpo     # reward and KL per step, as a PNG

Each step samples grpo.group_size replies to each of data.batch_size / group_size training prompts
from the current params with the serving engine, reads each as a user would (stop strings, the
screen), rewards 1 when its last number is the answer, and takes one clipped
policy-gradient step on the replies' tokens with group-normalized advantages, against a KL penalty
to the starting model (train/grpo.py). metrics.jsonl logs reward, accuracy, kl, clip_fraction and
reply_length per step; every evaluation (train.eval_every and the end) the greedy accuracy on the
first grpo.val_problems of the task's held-out set (val_accuracy).

The model section is the source's: model.seq_len=256 keeps the engine's KV cache and the rows short
(a prompt in SmolLM2's template with its default system message is about 50 tokens) and
model.matmul_dtype=bfloat16 runs the matmuls in bf16 with fp32 sums where the CPU has bf16
instructions; both are model.* overrides. Sized for about 10 s a step on 2 cores (2 prompts x 8
replies of at most 40 tokens); the run ends at train.time_limit_s (20 minutes of steps).

Sampling at temperature 0.5: the base model's sampled replies are right far less often than its
greedy ones (0.41 of the 100 held-out problems): they spell counts out ("twice", which the reward
does not read) or miscount. Of 8 training prompts x 8 replies, 11% were right at 0.5, 8% at 0.7 and
5% at 1.0, and 6 of the 8 groups at 0.5 held both a right and a wrong reply (3 at 0.7 and 1.0): a
group whose replies all score alike has no advantage to learn from. The held-out accuracy before
training: the same command with train.steps=1 optim.lr=0 (its final evaluation).
"""
from jaxgpt.config import Config, DataConfig, GrpoConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(batch_size=16),
        optim=OptimConfig(lr=5e-6, min_lr=5e-6, schedule="constant", warmup_steps=3, b1=0.9,
                          b2=0.99, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=300, time_limit_s=1200.0, out_dir="runs/real/grpo", log_every=1,
                          eval_every=50, samples=0),
        grpo=GrpoConfig(task="spelling", group_size=8, max_new_tokens=40, temperature=0.5,
                        clip_eps=0.2, kl_beta=0.02, val_problems=100),
    )
