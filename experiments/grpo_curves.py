"""A GRPO run's curves: reward (and accuracy) and the KL to the reference per step, from its
metrics.jsonl, with the held-out greedy accuracy at each evaluation, as one PNG.

    python experiments/grpo_curves.py runs/real/grpo [--out experiments/grpo_spelling.png]
        [--smooth 10]

The per-step reward is one batch's mean (data.batch_size replies), so it is noisy: the plot adds
its running mean over --smooth steps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    if not rows or "reward" not in rows[0]:
        raise SystemExit(f"{run}/metrics.jsonl: no GRPO rows (a 'reward' per step)")
    return rows


def running_mean(values: list[float], n: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def plot(rows: list[dict], out: Path, smooth: int, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    top.plot(steps, [r["reward"] for r in rows], color="tab:blue", alpha=0.3, lw=1,
             label="reward (batch mean)")
    top.plot(steps, running_mean([r["reward"] for r in rows], smooth), color="tab:blue", lw=2,
             label=f"reward ({smooth}-step mean)")
    evals = [r for r in rows if "val_accuracy" in r]
    if evals:
        top.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-",
                 color="tab:green", label="held-out greedy accuracy")
    top.set_ylabel("reward / accuracy")
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r.get("kl", 0.0) for r in rows], color="tab:red", lw=1.5)
    bottom.set_ylabel("KL to the reference (k3, per token)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run directory (its metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG (default experiments/grpo_<run name>.png)")
    parser.add_argument("--smooth", type=int, default=10)
    args = parser.parse_args(argv)
    rows = read_rows(args.run)
    out = args.out or ROOT / "experiments" / f"grpo_{args.run.name}.png"
    config = json.loads((args.run / "config.json").read_text()) \
        if (args.run / "config.json").is_file() else {}
    task = config.get("grpo", {}).get("task", "")
    plot(rows, out, max(args.smooth, 1), f"GRPO {task} ({args.run})".replace(" ()", ""))
    print(out)


if __name__ == "__main__":
    main()
