"""The quickstart's recipes compared at equal wall time on this machine, on the same held-out
dialogues.

    python experiments/sweep.py pretrain [--data runs/quickstart] [--budget 150] [--only NAME ...]
    python experiments/sweep.py sft --init RUN [--budget 100] [--only NAME ...]
    python experiments/sweep.py sampling --model EXPORT [--prompts 200]
    # into experiments/RESULTS.md
    python experiments/sweep.py report [--out DIR --block NAME]

--data is a quickstart directory whose first two stages have run (`experiments/quickstart.py`
makes it; its corpus and 4,096-token BPE are reused, other vocabularies are trained into --out).

Equal wall time: each variant's train step is timed first (a compiled step, a few warm-up steps,
then `--calibrate` timed ones, as `python -m jaxgpt.bench train` does), and the variant trains for
(budget - compile seconds) / step seconds steps, so its learning-rate schedule ends when the time is
up. Held-out bits per byte are measured at 4 points of each run; the plot puts them against seconds
spent in training steps (`train_s` in metrics.jsonl: evaluations are not counted, the first step's
compile is).
A variant marked `fixed` keeps its config's step count instead: today's recipe as it shipped.

Each variant's result is kept in OUT/STAGE/NAME.json and reused by a re-run; delete it to redo one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import quickstart  # noqa: E402
import reply_quality  # noqa: E402

from jaxgpt import config as config_lib  # noqa: E402
from jaxgpt import hardware  # noqa: E402
from jaxgpt.data import chat  # noqa: E402
from jaxgpt.generate.sampling import SamplingParams  # noqa: E402
from jaxgpt.store import runs  # noqa: E402
from jaxgpt.train import loop  # noqa: E402
from jaxgpt.train import trainer as trainer_lib  # noqa: E402

LR = lambda peak: [f"optim.lr={peak:g}", f"optim.min_lr={peak / 10:g}"]  # noqa: E731

# The recipe the quickstart shipped with until the first sweep (AdamW 3e-3, 1200 steps); the knobs
# below were each tried on top of it, and the config file now holds the winner (`recipe`).
TODAY = ["optim.name=adamw", *LR(3e-3), "data.batch_size=16", "train.steps=1200",
         "train.eval_every=400", "model.matmul_dtype=float32", "model.qk_norm=false",
         "optim.embed_lr_scale=1", "model.residual_init_std=0", "optim.weight_decay=0.1"]


def old(*knobs, **options):
    """A variant on top of the old recipe: (overrides on top of the stage's config, options)."""
    return [*TODAY, *knobs], options


def batch16(*knobs):
    """A variant on top of the recipe at batch 16, as it was before it took batch 32."""
    return ["data.batch_size=16", *knobs], {}


# name -> (overrides on top of the stage's config, options); one knob at a time from `base`
PRETRAIN = {
    "today": old(fixed=True),  # the old recipe as it shipped: 1200 steps, whatever time that takes
    "recipe": ([], {}),  # experiments/configs/chitchat_pretrain.py as it is now
    "base": old(),
    "adamw_lr1.5e-3": old(*LR(1.5e-3)),
    "adamw_lr6e-3": old(*LR(6e-3)),
    "wsd": old("optim.schedule=wsd"),
    "muon": old("optim.name=muon"),
    "muon_lr0.04": old("optim.name=muon", "optim.muon_lr=0.04"),
    "muon_adamw6e-3": old("optim.name=muon", *LR(6e-3)),
    "muon_vocab2048": old("optim.name=muon", vocab=2048),
    "layers3": old("model.n_layer=3"),
    "d96_h4_kv2": old("model.d_model=96"),
    "bf16": old("model.dtype=bfloat16"),
    "d192_h6_kv3": old("model.d_model=192", "model.n_head=6", "model.n_kv_head=3"),
    "d256_h8_kv4": old("model.d_model=256", "model.n_head=8", "model.n_kv_head=4"),
    "layers6": old("model.n_layer=6"),
    "kv4": old("model.n_kv_head=4"),
    "seq256_b8": old("model.seq_len=256", "data.batch_size=8"),
    "batch8": old("data.batch_size=8"),
    "batch32": old("data.batch_size=32"),
    "vocab2048": old(vocab=2048),
    "vocab8192": old(vocab=8192),
    "tied": old("model.tie_embeddings=true"),
    "init0.01": old("model.init_std=0.01"),
    # on top of the recipe at batch 16 (Muon, AdamW 6e-3), for budgets as long as the quickstart's
    # stage, where bigger models and batches may pay; the config file took batch 32 from this
    # comparison
    "recipe_batch16": batch16(),
    "recipe_batch16_d192": batch16("model.d_model=192", "model.n_head=6", "model.n_kv_head=3"),
    "recipe_batch16_layers6": batch16("model.n_layer=6"),
    "recipe_batch16_muon_lr0.04": batch16("optim.muon_lr=0.04"),
    # on top of the recipe once the output head's matmul no longer made XLA:CPU copy its gradient
    # (a step 1.46x faster, the head's share of it 41% -> 25%): a larger vocabulary, model or
    # context may now pay
    "recipe_vocab8192": ([], {"vocab": 8192}),
    "recipe_vocab2048": ([], {"vocab": 2048}),
    "recipe_seq256_b16": (["model.seq_len=256", "data.batch_size=16"], {}),
    "recipe_layers6": (["model.n_layer=6"], {}),
    "recipe_batch64": (["data.batch_size=64"], {}),
    "recipe_d192": (["model.d_model=192", "model.n_head=6", "model.n_kv_head=3"], {}),
    # once RoPE's tables no longer went into every head's fusion and the matmuls could run in bf16
    # (model.matmul_dtype) on a host's bf16 units: the recipe in mixed precision, and what its
    # faster step may buy
    # the config file's since (recipe)
    "recipe_bf16_matmuls": (["model.matmul_dtype=bfloat16"], {}),
    "recipe_fp32_matmuls": (["model.matmul_dtype=float32"], {}),  # the recipe before them
    "recipe_bf16_matmuls_d192": (["model.matmul_dtype=bfloat16", "model.d_model=192",
                                  "model.n_head=6", "model.n_kv_head=3"], {}),
    "recipe_bf16_matmuls_layers6": (["model.matmul_dtype=bfloat16", "model.n_layer=6"], {}),
    "recipe_bf16_matmuls_vocab8192": (["model.matmul_dtype=bfloat16"], {"vocab": 8192}),
    # fixed step counts that stand for a time budget on one host: the steps a budgeted run of
    # `today` fitted there (the hosts and budgets: experiments/notes/quickstart-recipe.md)
    "recipe_632": (["train.steps=632"], {"fixed": True}),
    "recipe_680": (["train.steps=680"], {"fixed": True}),
    # the recipe with the embeddings at 3x and Muon's momentum at 0.9, at the same 680 steps
    "recipe6_680": (["train.steps=680", "optim.embed_lr_scale=3", "optim.muon_momentum=0.9"],
                    {"fixed": True}),
    "recipe_750": (["train.steps=750"], {"fixed": True}),
    # knobs that leave the step's cost about where it is, screened at a fixed 500 steps (the
    # schedule ends there): the host's speed drifts 20-40% within an hour, a step count does not
    **{f"s500{'_' + name if name else ''}": (["train.steps=500", *knobs], {"fixed": True})
       for name, knobs in {
        "": [],
        "qk_norm": ["model.qk_norm=true"],
        "softcap15": ["model.logit_softcap=15"],
        "tied": ["model.tie_embeddings=true"],
        "relu2": ["model.mlp=relu2"],
        "muon_lr0.04": ["optim.muon_lr=0.04"],
        "muon_lr0.01": ["optim.muon_lr=0.01"],
        "adamw1.2e-2": LR(1.2e-2),
        "warmup30": ["optim.warmup_steps=30"],
        "wd0": ["optim.weight_decay=0"],
        "wsd": ["optim.schedule=wsd", "optim.wsd_decay_fraction=0.4"],
        "adamw2.4e-2": LR(2.4e-2),
        "adamw1.2e-2_qk_norm": [*LR(1.2e-2), "model.qk_norm=true"],
    }.items()},
    # a screen on top of an earlier recipe (AdamW 1.2e-2, QK-norm; the embeddings' rate and Muon's
    # momentum pinned to what they were then): r500 is that recipe at 500 steps
    **{f"r500{'_' + name if name else ''}": (["train.steps=500", "optim.embed_lr_scale=1",
                                              "optim.muon_momentum=0.95", *knobs], {"fixed": True})
       for name, knobs in {
        "": [],
        "embed_lr5": ["optim.embed_lr_scale=5"],
        "embed_lr20": ["optim.embed_lr_scale=20"],
        "muon_lr0.01": ["optim.muon_lr=0.01"],
        # the residual projections start (nearly) at zero
        "proj_init1e-6": ["model.residual_init_std=1e-6"],
        "min_lr0": ["optim.min_lr=0"],
        "wsd": ["optim.schedule=wsd", "optim.wsd_decay_fraction=0.4"],
        "b2_0.95": ["optim.b2=0.95"],
        "muon_momentum0.9": ["optim.muon_momentum=0.9"],
        # the second round: around and between the first round's three winners
        "embed_lr3": ["optim.embed_lr_scale=3"],
        "embed_lr8": ["optim.embed_lr_scale=8"],
        "muon_momentum0.85": ["optim.muon_momentum=0.85"],
        "min_lr3e-3": ["optim.min_lr=3e-3"],
        "embed_lr5_muon_momentum0.9": ["optim.embed_lr_scale=5", "optim.muon_momentum=0.9"],
        "embed_lr5_muon_lr0.01": ["optim.embed_lr_scale=5", "optim.muon_lr=0.01"],
        "embed_lr5_muon_momentum0.9_lr0.01": ["optim.embed_lr_scale=5", "optim.muon_momentum=0.9",
                                              "optim.muon_lr=0.01"],
        "embed_lr5_proj_init1e-6": ["optim.embed_lr_scale=5", "model.residual_init_std=1e-6"],
        # the third round: the best pair with the momentum and embedding rate next to it
        "embed_lr5_muon_momentum0.85": ["optim.embed_lr_scale=5", "optim.muon_momentum=0.85"],
        "embed_lr3_muon_momentum0.9": ["optim.embed_lr_scale=3", "optim.muon_momentum=0.9"],
    }.items()},
    # a screen at the quickstart's own horizon on one host (2220 steps fitted its budget there):
    # knobs that leave the step's cost where it is, on top of the recipe as it is (`q2220`)
    **{f"q2220{'_' + name if name else ''}": (["train.steps=2220", *knobs], {"fixed": True})
       for name, knobs in {
        "": [],
        "muon_lr0.01": ["optim.muon_lr=0.01"],
        "proj_init1e-6": ["model.residual_init_std=1e-6"],
        # the second round, on top of the first's winner (the residual projections starting near
        # zero)
        "proj_init1e-6_wd0.2": ["model.residual_init_std=1e-6", "optim.weight_decay=0.2"],
        "proj_init1e-6_adamw6e-3": ["model.residual_init_std=1e-6", *LR(6e-3)],
        "proj_init1e-6_wd0.05": ["model.residual_init_std=1e-6", "optim.weight_decay=0.05"],
        # the third round: around the second's winner (AdamW at 6e-3)
        "proj_init1e-6_adamw4e-3": ["model.residual_init_std=1e-6", *LR(4e-3)],
        "proj_init1e-6_adamw6e-3_wd0.05": ["model.residual_init_std=1e-6", *LR(6e-3),
                                           "optim.weight_decay=0.05"],
    }.items()},
}

SFT = {
    "base": ([], {}),
    "lr3e-4": (LR(3e-4), {}),
    "lr3e-3": (LR(3e-3), {}),
    "one_direction": ([], {"one_direction": True}),
    "batch32": (["data.batch_size=32"], {}),
    "wsd": (["optim.schedule=wsd"], {}),
    # the config file's 600 steps, one knob at a time (a step count holds while the host's speed
    # drifts)
    **{f"f600{'_' + name if name else ''}": (knobs, {"fixed": True}) for name, knobs in {
        "": [],
        "lr2e-3": LR(2e-3),
        "lr5e-4": LR(5e-4),
        # Muon on the matrices, as in pretraining
        "muon_lr0.01": ["optim.name=muon", "optim.muon_lr=0.01"],
        "muon_lr0.02": ["optim.name=muon", "optim.muon_lr=0.02"],
        "embed_lr3": ["optim.embed_lr_scale=3"],  # as pretraining's embeddings took
        "embed_lr5": ["optim.embed_lr_scale=5"],
    }.items()},
}

SAMPLING = {  # name -> SamplingParams fields; each on the same held-in prompts and seeds
    f"t{t}_p{p}_rp{rp}": dict(temperature=t, top_p=p, repetition_penalty=rp)
    for t in (0.6, 0.7, 0.8, 0.9, 1.0) for p in (0.9, 1.0) for rp in (1.0, 1.2)}
SAMPLING["t0.7_k40 (the old default)"] = dict(temperature=0.7, top_k=40)


def tokens_for(data: Path, out: Path, vocab: int, seed: int) -> Path:
    """A quickstart-like directory with a `vocab`-token BPE of the same corpus (trained once)."""
    if vocab == 4096:
        return data
    where = out / f"vocab{vocab}"
    if not (where / "2_tokenizer.done.json").is_file():
        where.mkdir(parents=True, exist_ok=True)
        if not (where / "corpus").exists():
            (where / "corpus").symlink_to(data / "corpus", target_is_directory=True)
        quickstart.stage(where, "2_tokenizer", lambda: quickstart.tokenize(where, vocab, seed))
    return where


def one_direction(data: Path, out: Path) -> Path:
    """The training conversations with each dialogue once (its first speaker as the user)."""
    path = out / "train_one_direction.jsonl"
    if not path.is_file():
        lines = (data / "corpus/train.jsonl").read_text().splitlines()
        # split_data writes each dialogue's two directions one after the other
        path.write_text("".join(line + "\n" for line in lines[::2]))
    return path


def stage_config(stage: str, args, overrides: list[str], options: dict):
    if stage == "pretrain":
        data = tokens_for(Path(args.data), Path(args.out), options.get("vocab", 4096), args.seed)
        return quickstart.pretrain_config(data, "cpu", overrides)
    extra = [f"train.init_from={args.init}"]
    if options.get("one_direction"):
        extra.append(f"data.chat=jsonl:{one_direction(Path(args.data), Path(args.out))}")
    return quickstart.sft_config(Path(args.data), "cpu", extra + overrides)


def run_variant(stage: str, name: str, args) -> dict:
    overrides, options = (PRETRAIN if stage == "pretrain" else SFT)[name]
    where = Path(args.out) / stage
    result_path = where / f"{name}.json"
    if result_path.is_file():
        print(f"[{stage}/{name}] done before: reusing it", file=sys.stderr)
        return json.loads(result_path.read_text())
    # the data opened once, for the step's timing and the run
    cfg, batches = trainer_lib.open_run_batches(stage_config(stage, args, overrides, options))
    budget_steps, timing = quickstart.steps_for(cfg, args.budget, args.calibrate, batches)
    step_s = timing["ms_per_iter"] / 1e3
    steps = cfg.train.steps if options.get("fixed") else budget_steps
    run_dir = where / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config_lib.apply_overrides(cfg, [
        f"train.steps={steps}", f"train.eval_every={eval_every(steps)}", f"train.out_dir={run_dir}",
        "train.progress=false", "checkpoint.keep=1"])
    print(f"[{stage}/{name}] {timing['params'] / 1e6:.2f}M params, {step_s * 1e3:.1f} ms/step: "
          f"{steps} steps", file=sys.stderr)
    t = time.perf_counter()
    loop.train(cfg, batches=batches)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["train_s"], r["val_bpb"]] for r in rows if r.get("val_bpb") is not None]
    # data and init: what report's command names
    result = {"stage": stage, "name": name, "overrides": overrides, "options": options,
              "params": timing["params"], "calibrated_ms_per_step": round(step_s * 1e3, 2),
              "steps": steps, "tokens": steps * cfg.data.batch_size * cfg.model.seq_len,
              "train_s": round(rows[-1]["train_s"], 1), "wall_s": round(wall, 1),
              "val_bpb": curve[-1][1], "curve": curve, "host": quickstart.host(),
              "budget_s": None if options.get("fixed") else args.budget,
              "data": args.data, "init": args.init if stage == "sft" else ""}
    # the export stays, for the SFT sweep
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    where.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("name", "steps", "train_s", "val_bpb")}))
    return result


def run_sampling(args) -> list[dict]:
    """Each sampling setting's reply measures on the same held-in prompts (the SFT run's data.chat,
    each cut after a user turn the dialogue answers), and their distance to the people's own replies
    there."""
    loaded, max_tokens = runs.load(args.model), 60
    cfg = loaded.cfg
    room = cfg.model.seq_len - max_tokens
    fits = lambda c: chat.render_prompt(c, loaded.tokenizer, room) is not None  # noqa: E731
    prompts, people = zip(*reply_quality.exchanges(cfg.data.chat, args.prompts, args.seed, fits),
                          strict=False)
    theirs = reply_quality.measures(list(people))
    seeds = [args.seed * 1_000_003 + i for i in range(len(prompts))]
    rows = []
    for name, fields in SAMPLING.items():
        params = SamplingParams(max_tokens=max_tokens, **fields)
        replies = [r[0] for r in reply_quality.sample_replies(loaded, list(prompts), seeds, params)]
        m = reply_quality.measures(replies)
        rows.append({"name": name, **fields, **m, "distance": reply_quality.distance(m, theirs)})
        print(json.dumps(rows[-1]))
    where = Path(args.out) / "sampling"
    where.mkdir(parents=True, exist_ok=True)
    (where / "results.json").write_text(json.dumps(
        {"model": args.model, "host": quickstart.host(), "people": theirs, "rows": rows}, indent=1))
    return rows


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    # variants at a fixed step count are compared step for step (their seconds depend on what else
    # ran)
    by_step = all(r["budget_s"] is None for r in results)
    for r in sorted(results, key=lambda r: r["val_bpb"]):
        seconds, ys = zip(*r["curve"], strict=False)
        ax.plot(eval_steps(r) if by_step else seconds, ys, marker="o", markersize=3,
                label=f"{r['name']} ({r['val_bpb']:.4f})")
    ax.set_xlabel("step" if by_step else "seconds in training steps")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(title)
    best = min(r["val_bpb"] for r in results)
    ax.set_ylim(best - 0.05, best + 0.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_every(steps: int) -> int:
    """run_variant's train.eval_every: held-out bits per byte at 4 points of a run."""
    return max(steps // 4, 1)


def eval_steps(result: dict) -> list[int]:
    """The steps at which run_variant's run evaluated: every eval_every steps, and the last."""
    every, steps = eval_every(result["steps"]), result["steps"]
    points = list(range(every, steps + 1, every))
    return points if points[-1] == steps else points + [steps]


def table(results: list[dict]) -> str:
    ref = next((r for name in ("base", "today", "recipe", "s500", "r500", "f600")
                for r in results if r["name"] == name), None)
    base = ref and ref["val_bpb"]
    lines = [f"| variant | what it runs | params | ms/step | steps | tokens | train s | "
             f"held-out bpb | vs {ref['name'] if ref else 'base'} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: r["val_bpb"]):
        old_recipe = r["stage"] == "pretrain" and all(o in r["overrides"] for o in TODAY)
        own = [o for o in r["overrides"] if not (old_recipe and o in TODAY)]
        own += [f"{k}={v}" for k, v in r["options"].items()]
        knobs = (("old recipe" if old_recipe else "config file")
                 + (f" + `{' '.join(own)}`" if own else ""))
        delta = f"{r['val_bpb'] - base:+.4f}" if base is not None else ""
        lines.append(f"| {r['name']} | {knobs} | {r['params'] / 1e6:.2f}M | "
                     f"{r['calibrated_ms_per_step']} | {r['steps']} | {r['tokens'] / 1e6:.2f}M | "
                     f"{r['train_s']} | {r['val_bpb']:.4f} | {delta} |")
    return "\n".join(lines)


def sweep_sources(results: list[dict], args) -> list[str]:
    """The --data (and for sft --init) flags the results were run with; results written before they
    recorded theirs take report's own flags. Several different ones are refused: one command cannot
    name them."""
    stage = results[0]["stage"]
    flags = [("--data", "data")] + ([("--init", "init")] if stage == "sft" else [])
    sources = []
    for flag, key in flags:
        seen = {r.get(key) or getattr(args, key) for r in results} - {""}
        if len(seen) > 1:
            raise SystemExit(f"sweep.py report: the {stage} results in {args.out} were run with "
                             f"different {flag} ({', '.join(sorted(seen))}); keep one sweep per "
                             "--out")
        sources += [f"{flag} {os.path.relpath(path, Path.cwd())}" for path in seen]
    return sources


def report(args) -> None:
    results_md = ROOT / "experiments/RESULTS.md"
    text = results_md.read_text()
    for stage in ("pretrain", "sft"):
        results = [json.loads(p.read_text())
                   for p in sorted((Path(args.out) / stage).glob("*.json"))]
        if not results:
            continue
        png = ROOT / f"experiments/{args.block}_{stage}.png"
        budgets = sorted({r["budget_s"] for r in results if r["budget_s"]})
        budget = ", ".join(f"{b:g}" for b in budgets) or "none"
        budget_title = f"{budget} s budget per variant" if budgets else "fixed steps per variant"
        plot(results, png, f"quickstart {stage}: held-out bpb, " + budget_title
             + f"\n{results[0]['host']}")
        out = os.path.relpath(args.out, Path.cwd())
        sources = sweep_sources(results, args)
        command = " ".join([f"python experiments/sweep.py {stage}", *sources, f"--out {out}",
                            *[f"--budget {b:g}" for b in budgets],
                            "--only", *sorted(r["name"] for r in results)])
        per_variant = (f"{budget} s of training steps" if budgets
                       else "its fixed step count (no time budget)")
        block = (f"Host: {results[0]['host']}. Budget per variant: {per_variant} "
                 f"(`{command}`, then `python experiments/sweep.py report --out {out} "
                 f"--block {args.block}`)."
                 f"\n\n{table(results)}\n\n![{stage} sweep]({args.block}_{stage}.png)")
        text = replace_block(text, f"{args.block}:{stage}", block)
    sampling = Path(args.out) / "sampling/results.json"
    if sampling.is_file():
        got = json.loads(sampling.read_text())
        row = lambda name, m, d: (f"| {name} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | "  # noqa: E731
                                  f"{m['repeats_a_line']:.3f} | {m['same_opening']:.3f} | "
                                  f"{m['empty']:.3f} | {m['mean_words']:.1f} | {d} |")
        lines = ["| setting | distinct-1 | distinct-2 | repeats a line | same opening | empty | "
                 "words | distance |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|",
                 row("**the people's replies**", got["people"], "")]
        lines += [row(r["name"], r, f"{r['distance']:.3f}")
                  for r in sorted(got["rows"], key=lambda r: r["distance"])]
        text = replace_block(text, "sweep:sampling", f"Host: {got['host']}; model {got['model']}; "
                             f"{got['rows'][0]['replies']} held-in prompts, one reply each, the "
                             "same seeds (`python experiments/sweep.py sampling --model ...`). "
                             "Distance = the sum of the absolute differences from the people's "
                             "replies to the same prompts in the five rates (distinct-1, "
                             "distinct-2, repeats a line, same opening, empty).\n\n"
                             + "\n".join(lines))
    results_md.write_text(text)
    print(f"wrote {results_md}", file=sys.stderr)


def replace_block(text: str, key: str, body: str) -> str:
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        return text[:text.index(start)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + f"\n\n{block}\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["pretrain", "sft", "sampling", "report"])
    ap.add_argument("--data", default="runs/quickstart",
                    help="a quickstart directory (its corpus and tokens)")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds of training steps per variant")
    ap.add_argument("--calibrate", type=int, default=30, help="timed steps that size each variant")
    ap.add_argument("--only", nargs="*", default=None, help="these variants (default: all)")
    ap.add_argument("--init", default="", help="sft: the pretrained run to fine-tune")
    ap.add_argument("--model", default="",
                    help="sampling: the SFT export whose replies are measured")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", default="sweep",
                    help="report: the RESULTS.md block and PNG names (BLOCK:STAGE)")
    args = ap.parse_args(argv)
    args.data, args.out = str(Path(args.data).absolute()), str(Path(args.out).absolute())
    hardware.tune_host()
    if args.stage == "report":
        return report(args)
    if args.stage == "sampling":
        if not args.model:
            raise SystemExit("sweep.py sampling: give --model (an SFT run or export)")
        run_sampling(args)
        return
    if args.stage == "sft" and not args.init:
        raise SystemExit("sweep.py sft: give --init (the pretrained run to fine-tune)")
    variants = PRETRAIN if args.stage == "pretrain" else SFT
    unknown = sorted(set(args.only or []) - set(variants))
    if unknown:
        raise SystemExit(f"sweep.py: unknown {args.stage} variant(s) {unknown}; "
                         f"known: {sorted(variants)}")
    for name in args.only or variants:
        run_variant(args.stage, name, args)


if __name__ == "__main__":
    main()
