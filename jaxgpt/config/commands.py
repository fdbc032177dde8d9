"""The tools' settings (prepare, chat convert / render, tokenizer, Hugging Face conversion, bench):
one root per command line, its sections shaped like Config's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxgpt.config.run import Config


@dataclass(frozen=True)
class PrepareConfig:
    """`python -m jaxgpt.data prepare`: a source tokenized into a prepared directory."""
    # text:PATH | jsonl:PATH[:field] | hf:NAME[:config] | chitchat | chatterbot
    source: str = ""
    # a tokenizer spec (tokenizer.parse_spec); char and bpe:N are trained on the source
    tokenizer: str = ""
    out: str = ""                    # the directory to write
    workers: int = 0                 # tokenizing processes; 0: one per CPU core but one
    val_fraction: float = 0.1        # fraction of documents for the val split
    seed: int = 0                    # seeds the train/val split
    errors: Literal["strict", "replace"] = "strict"  # invalid UTF-8: stop, or substitute U+FFFD
    field: str = "text"              # the text field of jsonl rows and hf datasets
    # text sources: one document per file / paragraph / line
    doc_split: Literal["file", "paragraph", "line"] = "file"
    limit: int = 0                   # only the first N documents (0: all)
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    hf_split: str = "train"          # the split of an hf source to read
    # a shard closes once it holds this many tokens (256 MB of uint16)
    shard_tokens: int = 1 << 27
    chunk_bytes: int = 1 << 20       # text handed to a worker at a time
    overwrite: bool = False          # replace a directory prepared from other inputs or settings
    progress: bool = True


@dataclass(frozen=True)
class PrepareCommand:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass(frozen=True)
class ChatConvertConfig:
    """`python -m jaxgpt.chat convert`: conversations from a source written as JSONL."""
    source: str = ""                 # chitchat | chatterbot[:LANG,...] | sharegpt:PATH | jsonl:PATH
    out: str = ""                    # FILE.jsonl
    limit: int = 0                   # stop after N conversations (0: all)
    skip_bad: bool = False           # skip and count malformed records instead of stopping


@dataclass(frozen=True)
class RenderConfig:
    """`python -m jaxgpt.chat render`: one conversation through the chat template, trained tokens
    marked."""
    file: str = ""                   # FILE.jsonl of {"messages": [...]}
    tokenizer: str = "gpt2"          # a tokenizer spec or a run / export
    index: int = 0                   # which conversation of the file
    # truncate to a context of seq_len + 1 tokens first (0: no truncation)
    seq_len: int = 0
    ids: bool = False                # also list each token: position, id, trained, text


@dataclass(frozen=True)
class ChatCommand:
    convert: ChatConvertConfig = field(default_factory=ChatConvertConfig)
    render: RenderConfig = field(default_factory=RenderConfig)


@dataclass(frozen=True)
class BpeConfig:
    """`python -m jaxgpt.tokenizer train`: a byte-level BPE trained with rustbpe."""
    input: tuple[str, ...] = ()      # UTF-8 text files, comma-separated
    vocab_size: int = 4096           # total ids, bytes and specials included
    out: str = ""                    # directory for tokenizer.json / tokenizer.tiktoken
    name: str = ""                   # default bpe:VOCAB_SIZE


@dataclass(frozen=True)
class EncodeConfig:
    """`python -m jaxgpt.tokenizer encode`: the ids of a text."""
    tokenizer: str = "gpt2"          # a tokenizer spec or a run / export
    corpus: str = ""                 # text file that defines a char or bpe:N tokenizer
    text: str = ""


@dataclass(frozen=True)
class TokenizerCommand:
    bpe: BpeConfig = field(default_factory=BpeConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)


@dataclass(frozen=True)
class FromHfConfig:
    """`python -m jaxgpt.convert from-hf`: a Hugging Face model (directory or hub name) -> an
    export."""
    # "": the tokenizer files beside config.json; else a HF tokenizer.json (or its directory) or a
    # jaxgpt tokenizer spec (gpt2, a saved tokenizer...)
    tokenizer: str = ""
    # 0: max_position_embeddings; a rope model may take less (the KV cache's length)
    seq_len: int = 0
    revision: str = ""               # a hub name's branch, tag or commit ("": the default branch)


@dataclass(frozen=True)
class ToHfConfig:
    """`python -m jaxgpt.convert to-hf`: a run or export -> a directory transformers loads."""
    # auto: the HF model's own, else float32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_mb: float = 4096.0     # a bigger model.safetensors is split into shards + an index
    # write into a DIR that is not empty (its model files are replaced)
    overwrite: bool = False


@dataclass(frozen=True)
class FromGgufConfig:
    """`python -m jaxgpt.convert from-gguf`: a GGUF file (or a known model's name) -> an export."""
    # 0: the GGUF's context_length; a rope model may take less (the KV cache's length)
    seq_len: int = 0
    # Q8_0 / Q4_0 / Q4_1 matrices kept in their blocks (model/quant.py's int8 / int4 layouts, no
    # fp32 round trip), the export's model.weights then int4 (or int8): engines decode on them;
    # model.weights=float loads them as fp32 (to train from, to-gguf, to-hf)
    keep_quantized: bool = False


@dataclass(frozen=True)
class ToGgufConfig:
    """`python -m jaxgpt.convert to-gguf`: a run or export -> a GGUF file llama.cpp runs."""
    # the matrices' type (norms and biases stay f32, as llama.cpp keeps them); q8_0 falls back to
    # f16 for a matrix whose rows are not a multiple of 32 wide
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32"
    overwrite: bool = False          # replace an existing OUT.gguf


@dataclass(frozen=True)
class HfCommand:
    """`python -m jaxgpt.convert`: Hugging Face directories and GGUF files in and out."""
    from_hf: FromHfConfig = field(default_factory=FromHfConfig)
    to_hf: ToHfConfig = field(default_factory=ToHfConfig)
    from_gguf: FromGgufConfig = field(default_factory=FromGgufConfig)
    to_gguf: ToGgufConfig = field(default_factory=ToGgufConfig)


@dataclass(frozen=True)
class BenchConfig:
    """`python -m jaxgpt.bench`: how long to time (train) and what (data)."""
    steps: int = 200                 # timed train steps
    warmup: int = 20                 # untimed steps first
    # leave malloc and dispatch at their defaults (hardware.tune_host)
    untuned_host: bool = False
    workers: tuple[int, ...] = (1, 2)  # data: worker counts to time
    max_mb: float = 64.0             # data: tokenize at most this much text
    batch: tuple[int, ...] = (1, 8)  # generate: batch sizes (slots) to time
    new_tokens: int = 256            # generate: tokens generated per sequence
    prompt_tokens: int = 16          # generate: random prompt length
    # generate: decode steps per engine call; 0: the engine's default (8)
    decode_steps: int = 0
    # train, generate: also trace profile_runs steps into this directory (jax.profiler) and report
    # the busiest XLA ops (profiling.py)
    profile: str = ""
    profile_runs: int = 3
    # compile: plan for this GPU (aot.CARDS: h100, h200) with XLA:GPU's own compiler, no GPU needed
    # (jax's CUDA plugin and cuDNN installed)
    target: str = ""


@dataclass(frozen=True)
class BenchCommand(Config):
    """bench train takes a whole Config; bench data reads the prepare section's source and
    tokenizer."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
