"""A preference loop that measurably changes a chat model: its own replies, labelled by a rule,
tuned by DPO.

    python experiments/preference_loop.py [--out DIR] [--sft RUN_OR_EXPORT] \
        [--steps N --beta B --lr LR ...]

1. sft      without --sft, the quickstart's stages run into DIR first (finished ones are reused) and
            its export is the model; --sft names any SFT run or export instead
2. prompts  contexts ending with a user turn: from the SFT run's training dialogs (held-in) and
            from its held-out ones (data.chat_val, else its val split)
3. before   two replies to every prompt from the SFT model, through the engine
            (jaxgpt.replies.Service: one prefill, two samples with their own seeds, temperature
            --temperature)
4. pairs    the rule: a reply that asks the user a question back (its text ends with '?') wins;
            pairs where both or neither do are dropped. Held-in prompts give the training pairs,
            held-out prompts the held-out pairs (preference accuracy)
5. dpo      python -m jaxgpt.train experiments/configs/chat_dpo.py with train.init_from=the SFT
            model
6. after    two replies to every held-out prompt from the tuned model, sampled exactly as in 3

It ends with one JSON line: the rule's rate in replies to held-out prompts before and after, the
held-out assistant-token bits per byte before and after (what the tuning costs in fit), the pair
counts and each stage's wall time. Each stage writes into DIR/preference/ and is reused by a re-run
with the same settings (a changed setting redoes that stage and the ones after it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import reply_quality  # noqa: E402

from jaxgpt import hardware  # noqa: E402
from jaxgpt.data import chat  # noqa: E402
from jaxgpt.data import pairs as pair_data  # noqa: E402
from jaxgpt.generate.sampling import SamplingParams  # noqa: E402
from jaxgpt.store import runs  # noqa: E402
from jaxgpt.train import evaluate, loop  # noqa: E402


def asks_back(text: str) -> bool:
    """The rule: the reply ends with a question to the user."""
    return text.strip().endswith("?")


def stage(where: Path, name: str, settings: dict, work) -> dict:
    """work() unless a run with the same settings finished it (its result is in
    WHERE/NAME.done.json)."""
    done = where / f"{name}.done.json"
    if done.is_file() and (result := json.loads(done.read_text())).get("settings") == settings:
        print(f"[{name}] done before ({result['seconds']:.0f} s): reusing it", file=sys.stderr)
        return result
    print(f"[{name}] ...", file=sys.stderr)
    t = time.perf_counter()
    result = {**work(), "settings": settings, "seconds": time.perf_counter() - t}
    done.write_text(json.dumps(result, indent=1))
    print(f"[{name}] finished in {result['seconds']:.0f} s", file=sys.stderr)
    return result


def held_out_source(cfg) -> str:
    if cfg.data.chat_val:
        return cfg.data.chat_val
    raise SystemExit("the SFT model names no held-out conversations (data.chat_val): give an SFT "
                     "run that has them")


def seeds(args, n: int, held_out: bool) -> list[int]:
    """Prompt i's sampling seed: a function of (args.seed, which prompts, i), the same before and
    after."""
    return [(args.seed * 2 + held_out) * 1_000_003 + i for i in range(n)]


def sample_replies(model_dir: str, prompts: list[list[dict]], prompt_seeds: list[int],
                   args) -> list[list[str]]:
    """Two replies per prompt (one prefill, two samples: seed_of(seed, 0) and seed_of(seed, 1))."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, n=2)
    return reply_quality.sample_replies(runs.load(model_dir), prompts, prompt_seeds, params,
                                        slots=args.slots)


def label(prompts, replies) -> tuple[list[dict], dict]:
    pairs, counts = [], {"both": 0, "neither": 0}
    for messages, (a, b) in zip(prompts, replies, strict=False):
        wins = asks_back(a), asks_back(b)
        if wins[0] == wins[1]:
            counts["both" if wins[0] else "neither"] += 1
            continue
        chosen, rejected = (a, b) if wins[0] else (b, a)
        pairs.append({"messages": messages, "chosen": chosen, "rejected": rejected})
    return pairs, counts


def rate(replies) -> float:
    flat = [r for two in replies for r in two]
    return sum(map(asks_back, flat)) / max(len(flat), 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart",
                    help="DIR: the quickstart's stages (without --sft) and "
                         "DIR/preference/, the loop's")
    ap.add_argument("--sft", default="",
                    help="an SFT run or export (default: DIR/export, made by the quickstart)")
    ap.add_argument("--prompts", type=int, default=1000,
                    help="held-in prompts sampled for training pairs")
    ap.add_argument("--val-prompts", type=int, default=400,
                    help="held-out prompts the rate is measured on")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--slots", type=int, default=64, help="engine slots decoding together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dpo", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides for the DPO run")
    args = ap.parse_args(argv)
    hardware.tune_host()
    out = Path(args.out).absolute()
    here = out / "preference"
    here.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds = {}

    if args.sft:
        sft = str(Path(args.sft).absolute())
    else:
        t = time.perf_counter()
        import quickstart
        # its report; this script's stdout is the JSON line
        with contextlib.redirect_stdout(sys.stderr):
            quickstart.main(["--out", str(out), "--seed", str(args.seed)])
        sft, seconds["quickstart"] = str(out / "export"), time.perf_counter() - t
    sft_cfg = runs.saved_config(sft)
    held_out = held_out_source(sft_cfg)
    sampling = {"sft": sft, "prompts": args.prompts, "val_prompts": args.val_prompts,
                "seed": args.seed, "temperature": args.temperature, "top_k": args.top_k,
                "max_tokens": args.max_tokens}

    def before():
        tokenizer, room = runs.load_tokenizer(sft), sft_cfg.model.seq_len - args.max_tokens
        fits = lambda context: chat.render_prompt(context, tokenizer, room) is not None  # noqa: E731
        prompts = reply_quality.contexts(sft_cfg.data.chat, args.prompts, args.seed, fits)
        val_prompts = reply_quality.contexts(held_out, args.val_prompts, args.seed + 1, fits)
        prompt_seeds = seeds(args, len(prompts), False) + seeds(args, len(val_prompts), True)
        both = sample_replies(sft, prompts + val_prompts, prompt_seeds, args)
        replies, val_replies = both[:len(prompts)], both[len(prompts):]
        pairs, counts = label(prompts, replies)
        val_pairs, val_counts = label(val_prompts, val_replies)
        pair_data.write_pairs(here / "pairs.jsonl", pairs)
        pair_data.write_pairs(here / "val_pairs.jsonl", val_pairs)
        (here / "val_prompts.json").write_text(json.dumps(val_prompts))
        return {"rate_before": rate(val_replies), "rate_held_in": rate(replies),
                "pairs": {"train": len(pairs), "val": len(val_pairs), "train_prompts": len(prompts),
                          "val_prompts": len(val_prompts),
                          "dropped_both": counts["both"] + val_counts["both"],
                          "dropped_neither": counts["neither"] + val_counts["neither"]},
                "examples": [{"user": p[-1]["content"], "chosen": q["chosen"],
                              "rejected": q["rejected"]}
                             for p, q in zip([q["messages"] for q in pairs[:3]], pairs[:3],
                                             strict=False)]}

    sampled = stage(here, "1_sample_before", sampling, before)
    seconds["sample_before"] = sampled["seconds"]

    fit_before = stage(here, "2_bpb_before", {"sft": sft, "chat_val": held_out},
                       lambda: evaluate.evaluate(sft, [f"data.chat_val={held_out}",
                                                       "data.batch_size=16"]))
    seconds["bpb_before"] = fit_before["seconds"]

    dpo_dir = here / "dpo"
    overrides = [f"train.init_from={sft}", f"data.preferences=jsonl:{here / 'pairs.jsonl'}",
                 f"data.preferences_val=jsonl:{here / 'val_pairs.jsonl'}",
                 f"data.chat_val={held_out}", f"train.out_dir={dpo_dir}",
                 f"train.steps={args.steps}", f"dpo.beta={args.beta}", f"optim.lr={args.lr}",
                 f"optim.min_lr={args.lr / 10}", "train.eval_every=0", *args.dpo]

    def tune():
        # other settings' checkpoints must not be resumed
        shutil.rmtree(dpo_dir, ignore_errors=True)
        cfg = loop.train_config(ROOT / "experiments/configs/chat_dpo.py", overrides)
        last = loop.train(cfg)
        rows = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
        return {"last": last, "first": rows[0]}

    tuned = stage(here, "3_dpo", {**sampling, "overrides": overrides}, tune)
    seconds["dpo"] = tuned["seconds"]

    def after():
        val_prompts = json.loads((here / "val_prompts.json").read_text())
        replies = sample_replies(str(dpo_dir / "export"), val_prompts,
                                 seeds(args, len(val_prompts), True), args)
        return {"rate_after": rate(replies),
                "examples": [{"user": p[-1]["content"], "replies": r}
                             for p, r in zip(val_prompts[:4], replies[:4], strict=False)]}

    later = stage(here, "4_sample_after", {**sampling, "overrides": overrides}, after)
    seconds["sample_after"] = later["seconds"]

    last = tuned["last"]
    print(json.dumps({
        "rate_before": sampled["rate_before"], "rate_after": later["rate_after"],
        "bpb_before": fit_before["bits_per_byte"], "bpb_after": last["val_bpb"],
        "val_accuracy": last.get("val_accuracy"), "val_margin": last.get("val_margin"),
        "train_margin_first_logged": tuned["first"].get("margin"),
        "train_margin_last": last.get("margin"),
        "pairs": sampled["pairs"], "rate_held_in_before": sampled["rate_held_in"],
        "settings": {"beta": args.beta, "lr": args.lr, "steps": args.steps,
                     "temperature": args.temperature, "top_k": args.top_k,
                     "max_tokens": args.max_tokens, "dpo": args.dpo},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "sft": sft, "dpo_run": str(dpo_dir)}))


if __name__ == "__main__":
    main()
