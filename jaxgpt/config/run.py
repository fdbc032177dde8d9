"""A run's settings: one frozen dataclass per section of a config (model, data, optim, train, mesh,
checkpoint, export, eval, sample, screen, distributed, dpo, grpo) and their root, Config. A choice
field is typed `Literal[...]`: parsing, validation and `--help` all read the allowed values from
the type.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

# What each preset means when a model field is left at None.
PRESETS = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False),
}


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["gpt2", "llama"] = "gpt2"  # defaults for the None fields below
    vocab_size: int = 0              # 0: the tokenizer's size (resolved before the model is built)
    n_layer: int = 12                # N
    n_head: int = 12                 # H
    n_kv_head: int = 0               # K; 0 means K = H (grouped-query attention when K < H)
    d_model: int = 768               # D
    d_ff: int = 0                    # F; 0: 4*D for gelu, about 8/3*D (a multiple of 64) for swiglu
    seq_len: int = 1024              # L: context length of training and the learned position table
    norm: Literal["layernorm", "rmsnorm"] | None = None
    # gelu: GPT-2's tanh form; gelu_exact: erf; relu2: relu(x)^2 (Primer), two matrices like gelu
    mlp: Literal["gelu", "gelu_exact", "swiglu", "relu2"] | None = None
    position: Literal["learned", "rope"] | None = None
    bias: bool | None = None         # biases in projections and norms
    qkv_bias: bool = False           # biases on the query, key and value projections alone (Qwen2)
    tie_embeddings: bool | None = None
    rope_theta: float = 10000.0
    # RoPE's frequencies stretched for a context longer than pretraining's (Hugging Face's rope
    # types): linear divides every frequency by rope_factor; llama3 (Llama 3.1 on) divides those
    # whose wavelength passes rope_original_context / rope_low_freq_factor, keeps those under
    # rope_original_context / rope_high_freq_factor, and blends the ones between
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    qk_norm: bool = False            # RMS-normalise queries and keys per head
    logit_softcap: float = 0.0       # 0: off; else logits = c * tanh(logits / c)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02           # normal init of the matrices and embedding tables
    # the blocks' output projections; 0: init_std / sqrt(2N) (GPT-2's scaling)
    residual_init_std: float = 0.0
    # compute dtype (params, softmax, loss stay fp32)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # the matmuls' inputs (products summed in fp32); auto: the compute dtype. bfloat16 under float32
    # activations is mixed precision: on a CPU with AMX, several times fp32's speed (kernels/matmul)
    matmul_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # the kernels of attention, the norms, the matmuls and the fused head (model/kernels/choice.py):
    # auto is cpu on a CPU, cudnn on a GPU in bf16/fp16, else xla
    kernels: Literal["auto", "xla", "cudnn", "cpu"] = "auto"
    # the weights every decoding engine (sample, talk, serve, bench generate, rollouts) multiplies
    # with: int8 per output channel, or int4 in groups of 32 input rows (the output head int8 in
    # both), dequantized chunk by chunk in each matmul (model/quant.py); training ignores it
    weights: Literal["float", "int8", "int4"] = "float"
    remat: bool = False              # recompute each block in the backward pass
    # what the output head writes its logits in; the loss and sampling read them into fp32.
    # bfloat16: torch autocast's numerics (its head's matmul writes bf16), half the bytes of the
    # largest arrays, which the fused head writes once and reads twice
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
    # >0: training's output head and cross-entropy fused (kernels.head_loss), over this many pieces
    # of each row: the [B, L, V] logits are never stored whole
    loss_chunks: int = 0
    scan_layers: bool = False        # lax.scan over blocks: fast compiles for deep models
    # how long a decoding engine's KV cache is: "chunks" (auto), a power of two from 256 positions
    # above its longest row, grown and shrunk as the rows need (model/cache.py capacity); "whole",
    # the whole context from the start
    cache_window: Literal["auto", "chunks", "whole"] = "auto"

    def resolved(self) -> "ModelConfig":
        """The same config with every preset-dependent field made concrete."""
        filled = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **filled)
        if out.n_kv_head == 0:
            out = dataclasses.replace(out, n_kv_head=out.n_head)
        if out.d_ff == 0:
            d_ff = 64 * -(-(8 * out.d_model // 3) // 64) if out.mlp == "swiglu" else 4 * out.d_model
            out = dataclasses.replace(out, d_ff=d_ff)
        return out

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass(frozen=True)
class DataConfig:
    # Where the batches come from: data.chat (conversations) if set, else data.dir, else data.path.
    # a text file (tokenized on first use into a cache under ~/.cache/jaxgpt)
    path: str = ""
    dir: str = ""                    # or a prepared data directory (python -m jaxgpt.data prepare)
    # a tokenizer spec (tokenizer.parse_spec): char | byte | bpe:N | gpt2 | cl100k_base |
    # o200k_base | FILE.tiktoken | a saved tokenizer or run
    tokenizer: str = "char"
    # conversations for supervised fine-tuning (loss on assistant tokens): chitchat |
    # chatterbot[:LANG] | jsonl:PATH | sharegpt:PATH
    chat: str = ""
    # held-out conversations (same forms); empty: data.val_fraction of data.chat
    chat_val: str = ""
    # preference pairs for DPO (data/pairs.py): jsonl:PATH of {"messages": context, "chosen": str,
    # "rejected": str}; the held-out chats: data.chat_val, else init_from's
    preferences: str = ""
    # held-out pairs (same form); empty: data.val_fraction of data.preferences
    preferences_val: str = ""
    # a prepared directory whose tokens are the validation set (its train split)
    val_dir: str = ""
    # cut long conversations into windows of whole exchanges (else keep the end)
    chat_windows: bool = True
    # the last fraction of a text file (or of data.chat's dialogs) is held out
    val_fraction: float = 0.1
    # invalid UTF-8 in data.path: stop, or substitute U+FFFD
    errors: Literal["strict", "replace"] = "strict"
    batch_size: int = 12             # B: global batch, in sequences
    # random windows, or consecutive ones in order
    sampling: Literal["random", "sequential"] = "random"
    prefetch: int = 2                # batches prepared ahead in a background thread
    # segment ids restart after each end-of-text token: packed documents do not attend to each other
    # (false: all ones, as nanoGPT)
    segments: bool = False
    verify: bool = True              # check shard sha256 checksums when loading data.dir


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon on 2-D matrices, AdamW on the rest
    lr: float = 6e-4
    min_lr: float = 6e-5             # the schedule's floor
    schedule: Literal["constant", "cosine", "wsd"] = "cosine"  # after a linear warmup
    warmup_steps: int = 100
    decay_steps: int = 0             # 0: until train.steps
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False   # weight decay on embedding tables too
    # the embedding tables' learning rate, as a multiple of lr (their gradients are sparse: each row
    # sees only its own tokens)
    embed_lr_scale: float = 1.0
    clip_norm: float = 1.0           # 0: no clipping
    grad_accum: int = 1              # micro-batches per step; data.batch_size is split among them
    muon_lr: float = 0.02
    muon_momentum: float = 0.95


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000
    seed: int = 1337
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 500            # 0: only at the end
    eval_max_tokens: int = 0         # 0: the whole validation split
    max_nonfinite: int = 5           # stop after this many non-finite losses in a row
    # how such a step leaves params and optimizer state as they were: "cond" skips the update (a
    # lax.cond), "select" computes it and keeps the old values; auto: select on a GPU, where a cond
    # stops the host mid-step (hardware.branches_sync_host), cond elsewhere
    skip_update: Literal["auto", "cond", "select"] = "auto"
    # >0: end the run (evaluate, save, export) at the first logged step past this many seconds of
    # training steps; the schedule keeps its length
    time_limit_s: float = 0.0
    samples: int = 2                 # samples printed at the end of the run
    sample_tokens: int = 200
    progress: bool = True            # tqdm progress bar
    # a run directory, checkpoint step or export to take params from (fine-tuning)
    init_from: str = ""
    resume: str = "auto"             # auto | none | PATH (checkpoints)
    # with resume=none (or an older resume=PATH): replace existing checkpoints
    overwrite: bool = False
    # >0: LoRA (model/lora.py): rank-r adapters on the matrices lora_targets matches (a regex over
    # param paths) train while the rest (init_from's params) stays frozen; only the adapters are in
    # the optimizer state and the checkpoints
    lora_rank: int = 0
    lora_alpha: float = 16.0         # the adapters' product is scaled by alpha / rank
    lora_targets: str = r"(attn/(wq|wkv|wo)|mlp/(w_up|w_down))/w$"
    # the frozen base's targeted matrices kept in int8 / int4 with a scale per lora_group input
    # rows (QLoRA), dequantized in the layer
    lora_base: Literal["float32", "int8", "int4"] = "float32"
    lora_group: int = 64


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1                   # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    # 0: every device there is; N: the first N (bench compile plans N on a CPU host)
    devices: int = 0
    # one device's memory for the fit check (train/memory.py); 0: what the device reports
    device_memory_gb: float = 0.0


@dataclass(frozen=True)
class DistributedConfig:
    """Several processes (hosts) training one model with jax.distributed (see launch.py). Unset
    fields come from the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    (what `python -m jaxgpt.launch` sets), else from jax's own detection of SLURM or a Cloud TPU."""
    # auto: when launch.py, SLURM (> 1 task) or a TPU slice says so; on: always initialize; off: one
    # process
    enabled: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str = ""    # HOST:PORT of process 0
    num_processes: int = 0           # 0: from the environment
    process_id: int = -1             # -1: from the environment
    # GPUs this process uses, e.g. 0,1; "": JAX_LOCAL_DEVICE_IDS, else jax's default
    local_device_ids: str = ""
    timeout_s: int = 300             # how long to wait for every process to join


@dataclass(frozen=True)
class DpoConfig:
    """Preference tuning with data.preferences (train/dpo.py); the reference model is the starting
    one (train.init_from)."""
    # how far from the reference the policy may move (the logit scale)
    beta: float = 0.1
    # the chance a pair's label is wrong (conservative DPO); 0: plain DPO
    label_smoothing: float = 0.0
    # its log-probs of every pair once before training, or of each batch in the step (its params
    # kept beside the state)
    reference: Literal["precompute", "step"] = "precompute"


@dataclass(frozen=True)
class GrpoConfig:
    """Reinforcement learning on verifiable rewards (train/grpo.py): each step samples group_size
    replies to each of data.batch_size / group_size prompts of `task` from the current params."""
    task: Literal["", "arithmetic", "spelling"] = ""  # a built-in task (data/tasks.py); "": off
    # "module:function" called with (problem, reply text); "": the task's own (data/tasks.py)
    reward: str = ""
    group_size: int = 4              # G: replies per prompt, their rewards normalized together
    max_new_tokens: int = 48         # a reply's tokens at most
    temperature: float = 1.0
    top_p: float = 1.0               # 1.0: off
    stop: tuple[str, ...] = ()       # stop strings, as a server's request gives them
    clip_eps: float = 0.2            # the probability ratio's clip range [1 - eps, 1 + eps]
    # the KL penalty's weight (k3 estimator) against the reference, train.init_from's params; 0: off
    kl_beta: float = 0.0
    val_problems: int = 100          # held-out problems scored greedily at each evaluation


@dataclass(frozen=True)
class ExportConfig:
    # a LoRA run's export: its adapters merged into the base's weights (a whole model), or the
    # adapters alone beside the base's location (loaded on top of it)
    lora: Literal["merge", "separate"] = "merge"


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0                   # 0: only at the end
    keep: int = 3
    keep_best: bool = False
    async_save: bool = True


@dataclass(frozen=True)
class EvalConfig:
    split: Literal["val", "train", "all"] = "val"  # all: every token of the data (a held-out file)
    # 0: seq_len (non-overlapping windows); less gives each token more context
    stride: int = 0
    batch_size: int = 0              # 0: data.batch_size
    max_tokens: int = 0              # 0: every token of the split


@dataclass(frozen=True)
class SampleConfig:
    prompt: str = "\n"
    max_new_tokens: int = 200
    num_samples: int = 1
    temperature: float = 0.8
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1.0: off
    min_p: float = 0.0               # keep tokens with p >= min_p * p_max; 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the reply; 1.0: off
    presence_penalty: float = 0.0    # subtracted once from each generated token's logit; 0: off
    frequency_penalty: float = 0.0   # subtracted per occurrence in the reply; 0: off
    seed: int = 0
    # the prompt is a user message: reply as the assistant (chat template)
    chat: bool = False
    # the system message that opens a chat (sample.chat, jaxgpt.talk); "": none
    system: str = ""


@dataclass(frozen=True)
class ScreenConfig:
    """What every reply (and, with `user`, every user message) is checked against before anyone
    reads it.

    Matching is on normalised text: Unicode NFKC, case folded, zero-width and other format
    characters removed, runs of whitespace as one space; so look-alike letters and hidden
    characters don't slip a phrase through.
    """
    enabled: bool = True
    # a file: one word or phrase per line, `re:PATTERN` lines are regexes, `#` comments; builtin:
    # the list shipped in jaxgpt/; none: no list
    blocklist: str | None = "builtin"
    # "module:function", called with the text so far; truthy blocks it
    classifier: str | None = None
    # the reply's end (or the whole reply) when blocked
    refusal: str = "Sorry, I can't continue with that."
    # screen user messages too: a blocked one is answered with the refusal
    user: bool = True
    # replies whose mean token log-probability is below: low confidence
    min_mean_logprob: float | None = None
    # refuse holds the reply back until it is scored
    low_confidence: Literal["flag", "refuse"] = "flag"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)

    @property
    def eval_batch_size(self) -> int:
        """Rows per evaluation batch: eval.batch_size, else data.batch_size."""
        return self.eval.batch_size or self.data.batch_size

    def to_dict(self) -> dict:
        """The config as its JSON file holds it (a tuple field as a list)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)
