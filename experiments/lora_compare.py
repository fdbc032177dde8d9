"""Full fine-tuning, LoRA and QLoRA of a real model at equal wall time, on the chitchat SFT data of
experiments/real_model.py (run that first: it converts the base and splits the data):

    python experiments/lora_compare.py [--out runs/real] [--seconds 300] [--rank 16]

Each variant trains experiments/configs/smollm2_sft.py from OUT/base for --seconds of training
steps (constant learning rate after the warmup, so that no run's schedule ends early), in a process
of its own so that its peak memory (max RSS) is its own, and reports its step time, its checkpoint's
size, its memory plan (train/memory.py: params, optimizer, frozen base, activations) and the
held-out assistant bits per byte of its final evaluation (OUT/corpus/val_eval.jsonl,
bf16 matmuls as in training). For the adapters it also checks that the merged export gives the
logits of the base + adapters as the train step applies them. One JSON line at the end; each
variant is reused by a re-run (OUT/lora_compare/NAME.done.json).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import quickstart  # noqa: E402

VARIANTS = {  # name: overrides on top of the common ones
    "full": ["optim.lr=3e-5"],
    "lora": ["optim.lr=3e-4", "train.lora_rank={rank}", "train.lora_alpha={alpha}"],
    "qlora": ["optim.lr=3e-4", "train.lora_rank={rank}", "train.lora_alpha={alpha}",
              "train.lora_base=int4", "train.lora_group=64"],
}


def overrides(out: Path, name: str, args) -> list[str]:
    common = [f"train.init_from={out / 'base'}", f"train.out_dir={out / 'lora_compare' / name}",
              f"data.chat=jsonl:{out / 'corpus/train.jsonl'}",
              f"data.chat_val=jsonl:{out / 'corpus/val_eval.jsonl'}", "model.seq_len=256",
              "model.matmul_dtype=bfloat16", f"train.time_limit_s={args.seconds}",
              "train.steps=2000", "optim.schedule=constant", "train.resume=none",
              "train.overwrite=true", *quickstart.host_overrides("cpu")]
    return common + [o.format(rank=args.rank, alpha=2 * args.rank) for o in VARIANTS[name]]


def train_one(out: Path, name: str, args) -> dict:
    """Train one variant in this process: its last metrics, peak RSS and checkpoint size."""
    from jaxgpt.train import loop, memory
    cfg = loop.train_config(ROOT / "experiments/configs/smollm2_sft.py", overrides(out, name, args))
    last = loop.train(cfg)
    plan = memory.estimate(memory.trainer_for(cfg)).per_device
    run = out / "lora_compare" / name
    step_dir = max((run / "checkpoints").iterdir(), key=lambda p: int(p.name)
                   if p.name.isdigit() else -1)
    size = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    return {"metrics": last, "step_s": last["train_s"] / last["step"],
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "checkpoint_mb": size / 2**20,
            "planned_mb": {k: v / 2**20 for k, v in plan.items()}}


def merged_vs_applied(run: Path) -> float:
    """Max |logit difference| between the run's merged export and its base + adapters applied as
    the train step does (unmerged, the base quantized as trained), on 64 tokens of held-out text."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from jaxgpt.model import lora
    from jaxgpt.model.gpt import GPT
    from jaxgpt.store import runs
    merged = runs.load(run / "export", ["model.matmul_dtype=float32"])
    cfg, model = merged.cfg, GPT(merged.cfg.model)
    base = runs.load(cfg.train.init_from, ["model.matmul_dtype=float32"]).params
    step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    adapters = ocp.PyTreeCheckpointer().restore(run / "checkpoints" / str(step) / "state")["params"]
    frozen = lora.frozen_base(base, model.logical_axes, adapters, cfg.train)
    text = (Path(cfg.data.chat_val.removeprefix("jsonl:"))).read_text(encoding="utf-8")
    ids = np.asarray(merged.tokenizer.encode(text)[:64], np.int32)[None]
    applied = model.apply(lora.combine(frozen, jax.tree.map(np.asarray, adapters)), ids)
    return float(np.abs(np.asarray(applied) - np.asarray(model.apply(merged.params, ids))).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--one", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out).absolute()
    if args.one:  # the child: one variant, its JSON on the last line
        print(json.dumps(train_one(out, args.one, args)))
        return
    results = {}
    for name in VARIANTS:
        def work(name=name):
            child = subprocess.run([sys.executable, __file__, "--out", str(out), "--seconds",
                                    str(args.seconds), "--rank", str(args.rank), "--one", name],
                                   check=True, stdout=subprocess.PIPE, text=True)
            got = json.loads(child.stdout.strip().splitlines()[-1])
            if name != "full":
                got["merged_vs_applied_max_logit_diff"] = merged_vs_applied(
                    out / "lora_compare" / name)
            return got
        (out / "lora_compare").mkdir(parents=True, exist_ok=True)
        results[name] = quickstart.stage(out / "lora_compare", name, work)
    print(json.dumps({"host": quickstart.host(), "seconds": args.seconds, "rank": args.rank,
                      **results}))


if __name__ == "__main__":
    main()
