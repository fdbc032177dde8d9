#!/usr/bin/env bash
# One GPU, under 8 minutes: what jaxgpt does on it, as one JSON table (printed, and written to
# $OUT/gpu_check.json when OUT is set).
#
#   bash experiments/gpu_check.sh                 # on the GPU machine, from the repository root
#
# - train: GPT-2 small (experiments/configs/gpt2_124m.py) train steps in bf16, tokens/s and MFU
#   against the datasheet peak (hardware.py), once per attention implementation (cudnn, xla); then
#   with the first of them, each variant beside that row: packed documents (data.segments=true: the
#   attention reads a mask, where plain text's rows attend causally with none), a non-finite step's
#   update skipped by a lax.cond (train.skip_update=cond; a GPU's default computes it and selects, since
#   a cond stops the host mid-step: hardware.branches_sync_host), the output head and its loss over
#   the whole [B, L, V] logits (model.loss_chunks=0, where the config fuses them over 8 pieces), the
#   logits written in fp32 (model.logits_dtype=float32, where the config writes bf16 as torch autocast
#   does), the fused step at twice the batch, then that step with XLA's Triton matmuls off (each row
#   reports the XLA_FLAGS it ran under);
# - memory: `bench compile` of the same step: the estimate beside XLA's own plan for this GPU,
#   and the peak memory the timed steps used;
# - decode: the KV-cache engine's tokens/s at batch 1 and 64 (random-init weights: speed only), with
#   its default 8 decode steps per call, with one, and with the cache allocated for the whole context
#   (model.cache_window=whole) instead of grown as the rows need; then SmolLM2-135M's architecture
#   (experiments/configs/smollm2.py, random init: the weights cannot be fetched there) in bf16, with
#   float and with int8 weights (model.weights).
# The text is made here (random words, byte tokens inside GPT-2's 50304-id table), so nothing is
# downloaded. GPU_CHECK_SMOKE=1 runs the same steps at toy size on a CPU (tests/test_experiments.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Each bench is one process under its own time limit, so a hang costs one row, not the lease; its
# rows go to $OUT/rows.jsonl and its log to $OUT/log.txt as they come, so a run stopped at the
# device's limit still brings back what it measured.
limit=${GPU_CHECK_LIMIT_S:-150}
log=${OUT:-$work}/log.txt
rows=${OUT:-$work}/rows.jsonl
: > "$rows"
bench() { timeout "$limit" $PY -m jaxgpt.bench "$@" 2>>"$log" >> "$rows"; }

$PY - "$work/text.txt" <<'EOF'
import random, sys
random.seed(0)
words = [''.join(random.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(random.randint(2, 9))) for _ in range(5000)]
with open(sys.argv[1], 'w') as f:
    for _ in range(20000):
        f.write(' '.join(random.choice(words) for _ in range(random.randint(5, 30))) + '.\n')
EOF

config=experiments/configs/gpt2_124m.py
common=(data.path="$work/text.txt" data.tokenizer=byte model.vocab_size=50304 data.batch_size=32
        optim.grad_accum=1 train.out_dir="$work/run")
steps=(bench.steps=20 bench.warmup=5)
attention=(cudnn xla)
# after the side-by-side rows: the first implementation at twice the batch (MFU's trend with batch)
larger=(data.batch_size=64)
unfused=(model.loss_chunks=0)  # the head's logits whole, then the loss (the config fuses them: 8 pieces)
fp32_logits=(model.logits_dtype=float32)  # the config writes them in bf16
# after the variants: the step at twice the batch (beside its row above: the likeliest best MFU) with
# XLA's Triton matmul fusions off, so cuBLAS does every product (XLA autotunes between them, and
# MaxText's GPU recipes set this); the MLP then adds its bias before the gelu, which cuBLASLt applies
# as it writes (hardware.library_matmuls). Decoding comes last: a run cut short at the device's limit
# loses its rows first.
flags=--xla_gpu_enable_triton_gemm=false
decode=(bench.batch=1,64 bench.new_tokens=256)
smol=()
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then  # toy size on a CPU: the script's plumbing, not a measurement
    common+=(model.n_layer=2 model.d_model=64 model.n_head=4 model.seq_len=64 data.batch_size=4)
    steps=(bench.steps=2 bench.warmup=1)
    attention=(xla)
    larger=(data.batch_size=8)
    flags=--xla_cpu_enable_fast_math=false  # a CPU flag at its default: the row's plumbing only
    decode=(bench.batch=1,2 bench.new_tokens=8 model.n_layer=2 model.d_model=64 model.n_head=4 model.seq_len=64)
    smol=(model.n_layer=2 model.d_model=64 model.n_head=4 model.n_kv_head=2 model.d_ff=128 model.vocab_size=256)
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/{"bench": "nvidia-smi", "gpu": "/; s/$/"}/' >> "$rows" || true
# the first implementation's step, its last variant and the decode steps are also traced
# (bench.profile): their busiest XLA ops land in the table, and the traces in $OUT for Perfetto
prof=$work/profile
for impl in "${attention[@]}"; do
    traced=()
    [ "$impl" = "${attention[0]}" ] && traced=(bench.profile="$prof/train_$impl")
    bench train "$config" "${common[@]}" model.kernels="$impl" "${steps[@]}" "${traced[@]}" \
        || echo "{\"bench\": \"train\", \"attention\": \"$impl\", \"failed\": true}" >> "$rows"
done
# the variants with the first implementation that ran
impl=$($PY -c 'import json, sys; ok = [r["kernels"] for r in (json.loads(l) for l in open(sys.argv[1]) if l.startswith("{"))
                  if r.get("bench") == "train" and not r.get("failed")]; print(ok[0] if ok else "xla")' "$rows" || echo xla)
# the last (twice the batch, the loss fused) is traced too: where the time goes in the likeliest best step
variants=("data.segments=true" "train.skip_update=cond" "${unfused[*]}" "${fp32_logits[*]}" "${larger[*]}")
for variant in "${variants[@]}"; do
    traced=()
    [ "$variant" = "${variants[-1]}" ] && traced=(bench.profile="$prof/train_${impl}_larger")
    # shellcheck disable=SC2086  # a variant is one or two key=value words
    bench train "$config" "${common[@]}" model.kernels="$impl" "${steps[@]}" $variant "${traced[@]}" \
        || echo "{\"bench\": \"train\", \"attention\": \"$impl\", \"variant\": \"$variant\", \"failed\": true}" >> "$rows"
done
XLA_FLAGS="${XLA_FLAGS:-} $flags" bench train "$config" "${common[@]}" model.kernels="$impl" "${steps[@]}" "${larger[@]}" \
    || echo "{\"bench\": \"train\", \"attention\": \"$impl\", \"variant\": \"$flags\", \"failed\": true}" >> "$rows"
bench compile "$config" "${common[@]}" model.kernels="${attention[0]}" \
    || echo '{"bench": "compile", "failed": true}' >> "$rows"
bench generate "$config" model.vocab_size=50304 "${decode[@]}" bench.profile="$prof/generate" \
    || echo '{"bench": "generate", "failed": true}' >> "$rows"
# beside it, one decode step per engine call (the engine's default makes 8 per call)
bench generate "$config" model.vocab_size=50304 "${decode[@]}" bench.decode_steps=1 \
    || echo '{"bench": "generate", "decode_steps": 1, "failed": true}' >> "$rows"
# and the KV cache allocated for the whole context instead of grown as the rows need
bench generate "$config" model.vocab_size=50304 "${decode[@]}" model.cache_window=whole \
    || echo '{"bench": "generate", "cache_window": "whole", "failed": true}' >> "$rows"
# a real model's shape: SmolLM2-135M, its weights in bf16 and in int8
for weights in float int8; do
    bench generate experiments/configs/smollm2.py "${decode[@]}" "${smol[@]}" model.dtype=bfloat16 \
        model.weights=$weights || echo "{\"bench\": \"generate\", \"weights\": \"$weights\", \"failed\": true}" >> "$rows"
done

if [ -n "${OUT:-}" ]; then
    find "$prof" -name perfetto_trace.json.gz | while read -r trace; do
        name=${trace#"$prof"/}; name=${name%%/plugins/*}; cp "$trace" "$OUT/${name//\//_}_trace.json.gz"
    done
fi

$PY - "$rows" "${OUT:-}" <<'EOF'
import json, platform, sys
import jax
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
keep = {"train": ("kernels", "batch", "segments", "loss_chunks", "logits_dtype", "skip_update", "xla_flags", "variant", "ms_per_iter", "tokens_per_s", "mfu", "peak_flops_per_device", "peak_source",
                  "compile_s", "peak_bytes_in_use", "step_temp_bytes", "final_loss", "op_ms_per_run", "failed"),
        "compile": ("mesh", "estimate_gb", "xla_bytes", "xla_flops_per_device", "model_flops_per_step", "compile_s", "kernels",
                    "failed"),
        "generate": ("params", "weights", "batch", "decode_steps", "cache_window", "cache_positions", "cache_mb", "tok_per_s", "ttft_s", "bound_tok_per_s", "ratio_to_bound", "op_ms_per_run", "failed")}
table = {"host": platform.node(), "jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()]}
for row in rows:
    kind = row.get("bench")
    if kind == "nvidia-smi":
        table["gpu"] = row["gpu"]
    elif kind in keep:
        table.setdefault(kind, []).append({k: row.get(k) for k in keep[kind] if k in row})
        if "busiest_ops" in row:  # the eight busiest, short (all of them: rows.jsonl)
            table[kind][-1]["busiest_ops"] = [f"{op['ms_per_run']} ms {op['op']} ({op['kernel'][:60]})"
                                              for op in row["busiest_ops"][:8]]
text = json.dumps(table, indent=1)
print(text)
if sys.argv[2]:
    open(f"{sys.argv[2]}/gpu_check.json", "w").write(text + "\n")
EOF
