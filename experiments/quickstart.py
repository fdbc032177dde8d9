"""The whole ChatGPT recipe on a laptop CPU, in one command (about 11 minutes on a 2-core host):

    python experiments/quickstart.py [--out runs/quickstart] [--scale cpu|gpu] [--fixed-steps]

1. data      chitchat's 7,168 two-person dialogues: a held-out 5% of dialogues, the rest as plain
             text and as conversations (each dialogue twice: either speaker can be the user)
2. tokenizer a 4096-token BPE trained on the training text (rustbpe, exported to tiktoken)
3. pretrain  a small llama-preset model on the text, by next-token prediction, for the steps that
             fit BUDGET_S on this host (its step timed first)
4. sft       the same model fine-tuned on the conversations: loss on the assistant's replies only,
             sized the same way
5. report    held-out bits per byte after each stage, the held-out assistant-token loss of the
             pretrained and of the fine-tuned model, and replies to prompts it never saw

Every stage writes into --out and is skipped when it finished before, so a re-run (or a run
after an interruption) picks up where it stopped. The final model is exported to OUT/export.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import reply_quality

from jaxgpt import cli, hardware
from jaxgpt import config as config_lib
from jaxgpt import export as export_command
from jaxgpt.data import chat, dialogs, prepare
from jaxgpt.generate import sample
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model.gpt import GPT
from jaxgpt.perf import bench
from jaxgpt.store import runs
from jaxgpt.train import evaluate, loop
from jaxgpt.train import trainer as trainer_lib

ROOT = Path(__file__).resolve().parents[1]  # the config files are read from the checkout

PROMPTS = [  # written for this script: not in chitchat
    "hi! how was your weekend?",
    "I just got back from a trip to the mountains.",
    "what kind of music do you like?",
    "do you have any plans for the summer?",
]

SCALES = {  # overrides on top of the config files, per stage
    "cpu": {"pretrain": [], "sft": []},
    # the CPU recipe's Muon and embedding rate were chosen by sweeps at width 128; the GPT-2-small
    # scale keeps AdamW at one rate until a sweep at that size says otherwise
    "gpu": {"pretrain": ["optim.name=adamw", "optim.embed_lr_scale=1", "model.n_layer=12",
                         "model.n_head=12", "model.n_kv_head=4", "model.d_model=768",
                         "model.seq_len=512", "model.dtype=bfloat16", "data.batch_size=64",
                         "optim.lr=1e-3", "optim.min_lr=1e-4", "train.steps=6000"],
            "sft": ["data.batch_size=64", "optim.lr=1e-4", "optim.min_lr=1e-5",
                    "train.steps=1500"]},
}


# Seconds per training stage, by scale, all in: the step's timing, the run's compile, its
# evaluations and its steps. Each stage's step is timed first and the stage trains for as many steps
# as fit what is left, its schedule sized to them (the 2-core hosts measured so far differ 2.6x in
# speed: 147 to 380 ms for the pretraining step; the time around the steps grows with the step:
# 30-50 s a stage on the slowest hosts). None, or --fixed-steps: the config files' step counts, the
# same run on every host. A run's steps took 4-6% longer than their timing (a host's speed drifts:
# 270-356 ms a step in one run whose timing said 304), so they are counted at STEP_DRIFT x their
# timing; a run's setup and its final save (~8 s) and the other stages (data, tokenizer, the
# pretrained model's score, replies: 25-60 s) are not in the budgets: about 11 minutes in all. A
# hypervisor that takes more of the CPU after the timing than during it would stretch a stage:
# train.time_limit_s ends its steps at TIME_LIMIT x their share (the schedule unfinished).
BUDGET_S = {"cpu": {"pretrain": 480, "sft": 125}, "gpu": None}
STEP_DRIFT = 1.05
TIME_LIMIT = 1.1
EVALUATIONS = 2  # a sized run evaluates at the middle of its schedule and at its end


def host() -> str:
    """The host line beside a timing."""
    return f"{hardware.cpu_name()}, {os.cpu_count()} cores"


def steps_in(seconds: float, timing: dict, drift: float = 1.0) -> int:
    """Steps of a timed train step (bench.bench_train's result), each `drift` x its timing, that
    take about `seconds`, the run's own compile (its first step compiles again) included; at least
    40."""
    return max(int((seconds - timing["compile_s"]) / (drift * timing["ms_per_iter"] / 1e3)), 40)


def time_step(cfg: config_lib.Config, calibrate: int, batches=None) -> tuple[dict, float]:
    """(the timing of cfg's train step on this host, the seconds the timing took): a compiled step,
    3 warm-up steps, then `calibrate` timed ones (bench.bench_train, on `batches` if opened
    already)."""
    t = time.perf_counter()
    timing = bench.bench_train(cfg, steps=calibrate, warmup=3, batches=batches)
    return timing, time.perf_counter() - t


def steps_for(cfg: config_lib.Config, seconds: float, calibrate: int,
              batches=None) -> tuple[int, dict]:
    """(steps of cfg's train step that take about `seconds` on this host, the timing)."""
    timing, _ = time_step(cfg, calibrate, batches)
    return steps_in(seconds, timing), timing


def evaluation_s(cfg: config_lib.Config, batches, step_s: float) -> float:
    """One evaluation of the run's validation split, estimated from a train step's time: a third of
    it per batch of the training batch's rows (a forward pass is 2 of the step's 6 FLOPs per
    parameter and token; on the 2-core hosts an evaluation took 0.23-0.26 of a step per token)."""
    rows = cfg.eval_batch_size
    n = sum(1 for _ in batches.eval_batches("val", rows, cfg.eval.stride,
                                            cfg.train.eval_max_tokens))
    return n * rows / cfg.data.batch_size * step_s / 3


def sized(cfg: config_lib.Config, out: Path, name: str, seconds: float | None, batches,
          calibrate: int = 10):
    """cfg with the steps that fit `seconds` all in (None: its own): the step's timing (its wall
    time measured), its evaluations (estimated) and the run's compile come off the budget first.
    Planned once: the plan is kept in OUT/NAME.plan.json, so a re-run after an interruption resumes
    the same schedule."""
    if seconds is None:
        return cfg
    plan_path = out / f"{name}.plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        timing, timing_s = time_step(cfg, calibrate, batches)
        evaluations_s = EVALUATIONS * evaluation_s(cfg, batches, timing["ms_per_iter"] / 1e3)
        steps_s = seconds - timing_s - evaluations_s  # the run's compile and its steps
        plan = {"steps": steps_in(steps_s, timing, STEP_DRIFT), "config_steps": cfg.train.steps,
                "budget_s": seconds, "timing_s": timing_s, "evaluations_s": evaluations_s,
                "steps_s": steps_s, "compile_s": timing["compile_s"],
                "ms_per_step": timing["ms_per_iter"], "step_drift": STEP_DRIFT, "host": host()}
        plan_path.write_text(json.dumps(plan, indent=2))
    # (a plan written before the time around the steps was counted has its budget as the steps'
    # alone)
    around = {key: plan.get(key, 0.0) for key in ("timing_s", "evaluations_s")}
    steps_s = plan.get("steps_s", plan["budget_s"])
    print(f"[{name}] {plan['steps']} steps (the config file: {plan['config_steps']}): "
          f"{plan['budget_s']:g} s less {around['timing_s']:.0f} s of timing and "
          f"~{around['evaluations_s']:.0f} s of evaluations, at {plan['ms_per_step']:.0f} ms/step "
          "on this host", file=sys.stderr)
    # evaluations at the middle and the end (half rounded up: an odd count would evaluate at
    # steps - 1 and at steps)
    return config_lib.apply_overrides(cfg, [f"train.steps={plan['steps']}",
                                            f"train.eval_every={-(-plan['steps'] // 2)}",
                                            f"train.time_limit_s={TIME_LIMIT * steps_s:g}"])


def stage(out: Path, name: str, work) -> dict:
    """Run `work()` unless a previous run finished it; its result is kept in OUT/NAME.done.json."""
    done = out / f"{name}.done.json"
    if done.is_file():
        result = json.loads(done.read_text())
        print(f"[{name}] done before ({result.get('seconds', 0):.0f} s): reusing it",
              file=sys.stderr)
        return result
    print(f"[{name}] ...", file=sys.stderr)
    t = time.perf_counter()
    result = work()
    result["seconds"] = time.perf_counter() - t
    done.write_text(json.dumps(result, indent=2))
    print(f"[{name}] finished in {result['seconds']:.0f} s", file=sys.stderr)
    return result


def split_data(out: Path, seed: int) -> dict:
    loaded = dialogs.load("chitchat")
    train, val = dialogs.split(loaded.conversations, 0.05, seed, loaded.ids)
    # the same split, of the ids
    held_ids = set(dialogs.split(loaded.ids, 0.05, seed, loaded.ids)[1])
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    for name, convs in (("train", train), ("val", val)):
        dialogs.write_jsonl(out / "corpus" / f"{name}.jsonl", convs)
    # plain text: each dialogue once (its first direction), one message per line, a blank line
    # between
    for name, keep in (("train", lambda i: i not in held_ids), ("val", lambda i: i in held_ids)):
        seen, docs = set(), []
        for i, conversation in zip(loaded.ids, loaded.conversations, strict=False):
            if keep(i) and i not in seen:
                seen.add(i)
                docs.append("\n".join(m["content"].replace("\n\n", "\n") for m in conversation))
        (out / "corpus" / f"{name}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return {"conversations": {"train": len(train), "val": len(val)},
            "dialogues_held_out": len(held_ids)}


def tokenize(out: Path, vocab: int, seed: int) -> dict:
    common = dict(val_fraction=0.0, seed=seed, doc_split="paragraph", workers=1, overwrite=True)
    train = prepare.prepare(config_lib.PrepareConfig(
        source=f"text:{out / 'corpus/train.txt'}", tokenizer=f"bpe:{vocab}",
        out=str(out / "tokens/train"), **common))
    val = prepare.prepare(config_lib.PrepareConfig(
        source=f"text:{out / 'corpus/val.txt'}", tokenizer=str(out / "tokens/train"),
        out=str(out / "tokens/val"), **common))
    return {"tokens": {"train": train["tokens"], "val": val["tokens"]}, "n_vocab": train["n_vocab"],
            "train_mb_per_s": train["mb_per_s"]}


def host_overrides(scale: str) -> list[str]:
    """The CPU recipe multiplies in bf16 (chitchat_pretrain.py); a CPU without bf16 instructions
    would emulate them, so there it multiplies in fp32."""
    if scale != "cpu" or hardware.cpu_bf16_units():
        return []
    print("quickstart: this CPU lists no bf16 instructions (amx_bf16, avx512_bf16, bf16): "
          "fp32 matmuls", file=sys.stderr)
    return ["model.matmul_dtype=float32"]


def pretrain_config(out: Path, scale: str, overrides=()) -> config_lib.Config:
    return config_lib.from_cli(ROOT / "experiments/configs/chitchat_pretrain.py", [
        f"data.dir={out / 'tokens/train'}", f"data.val_dir={out / 'tokens/val'}",
        f"train.out_dir={out / 'pretrain'}", *SCALES[scale]["pretrain"], *host_overrides(scale),
        *overrides])


def sft_config(out: Path, scale: str, overrides=()) -> config_lib.Config:
    """The SFT stage; the model's shape comes from the pretrained run (train.init_from: OUT/pretrain
    unless `overrides` name another)."""
    return loop.train_config(ROOT / "experiments/configs/chat_sft.py", [
        f"data.chat=jsonl:{out / 'corpus/train.jsonl'}",
        f"data.chat_val=jsonl:{out / 'corpus/val.jsonl'}", f"train.init_from={out / 'pretrain'}",
        f"train.out_dir={out / 'sft'}", *SCALES[scale]["sft"], *overrides])


def chat_eval(out: Path, source: Path) -> dict:
    """Held-out assistant-token loss and bits per byte of the model in `source` (as the SFT run
    scores it: its batch size, the held-out conversations)."""
    return evaluate.evaluate(source, [f"data.chat_val=jsonl:{out / 'corpus/val.jsonl'}",
                                      "data.batch_size=16"])


def examples(source: Path) -> list[dict]:
    """Replies to PROMPTS with the model's own sampling defaults (chat_sft.py's sample section),
    each with its own seed (sample.seed + i, as jaxgpt.talk seeds its turns): drawn with one seed,
    the four replies shared their sampling noise, and three of them opened with the same five
    words."""
    loaded = runs.load(source)
    model = GPT(loaded.cfg.model)
    seeded = lambda i: dataclasses.replace(  # noqa: E731
        loaded.cfg.sample, seed=(loaded.cfg.sample.seed + i) % 2 ** 32)
    return [{"user": p, "assistant": sample.chat_replies(model, loaded.params, loaded.tokenizer,
                                                          [{"role": "user", "content": p}],
                                                          seeded(i), screen=loaded.cfg.screen)[0]}
            for i, p in enumerate(PROMPTS)]


def reply_measures(out: Path, source: Path, n: int, seed: int) -> dict:
    """reply_quality's measures of one reply to each of n held-out contexts (each cut after a user
    turn the dialogue answers), sampled with the model's defaults, beside the same measures of the
    people's own replies to those contexts; a few of them verbatim."""
    loaded = runs.load(source)
    params = SamplingParams.from_config(loaded.cfg.sample, n=1,
                                        max_tokens=min(loaded.cfg.sample.max_new_tokens, 60))
    room = loaded.cfg.model.seq_len - params.max_tokens  # the prompt leaves room for a whole reply
    fits = lambda c: chat.render_prompt(c, loaded.tokenizer, room) is not None  # noqa: E731
    pairs = reply_quality.exchanges(f"jsonl:{out / 'corpus/val.jsonl'}", n, seed, fits)
    if not pairs:
        raise SystemExit(f"quickstart: no held-out user turn of {out / 'corpus/val.jsonl'} fits in "
                         f"{room} tokens (model.seq_len - the reply's tokens)")
    prompts, people = zip(*pairs, strict=False)
    prompt_seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
    replies = [r[0] for r in reply_quality.sample_replies(loaded, list(prompts), prompt_seeds,
                                                          params, screen=True)]
    measured, theirs = reply_quality.measures(replies), reply_quality.measures(list(people))
    return {**measured, "people": theirs,
            "distance_to_people": reply_quality.distance(measured, theirs),
            "sampling": dataclasses.asdict(params),
            "examples": [{"user": p[-1]["content"], "assistant": r}
                         for p, r in zip(prompts[:4], replies[:4], strict=False)]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--replies", type=int, default=200,
                    help="held-out user turns the reply measures use")
    ap.add_argument("--fixed-steps", action="store_true",
                    help="train the config files' step counts, the same run on every host (1050 "
                         "pretraining steps, 600 SFT steps), instead of the steps that fit "
                         "BUDGET_S on this host")
    args = ap.parse_args(argv)
    hardware.tune_host()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0, ticks = time.perf_counter(), hardware.cpu_ticks()

    stage(out, "1_data", lambda: split_data(out, args.seed))
    stage(out, "2_tokenizer", lambda: tokenize(out, args.vocab, args.seed))
    budget = {} if args.fixed_steps else (BUDGET_S[args.scale] or {})

    def train_stage(name: str, cfg: config_lib.Config, seconds: float | None) -> dict:
        # once, for the step's timing and the run
        cfg, batches = trainer_lib.open_run_batches(cfg)
        return loop.train(sized(cfg, out, name, seconds, batches), batches=batches)

    pre = stage(out, "3_pretrain",
                lambda: train_stage("3_pretrain", pretrain_config(out, args.scale),
                                    budget.get("pretrain")))
    before = stage(out, "4_sft_baseline", lambda: chat_eval(out, out / "pretrain"))
    sft = stage(out, "5_sft",
                lambda: train_stage("5_sft", sft_config(out, args.scale), budget.get("sft")))
    # the SFT run's own final evaluation is chat_eval's, on the same held-out conversations
    after = {"loss": sft["val_loss"], "bits_per_byte": sft["val_bpb"]}
    export_command.export_run(out / "sft", out / "export")
    talk = stage(out, "6_examples", lambda: {"exchanges": examples(out / "export")})
    measured = stage(out, "7_reply_measures",
                     lambda: reply_measures(out, out / "export", args.replies, args.seed))

    print("\n=== jaxgpt quickstart ===")
    print(f"held-out text, bits per byte after pretraining ({pre['step']} steps): "
          f"{pre['val_bpb']:.4f}")
    print(f"held-out conversations, assistant tokens:  pretrained loss {before['loss']:.4f} "
          f"({before['bits_per_byte']:.4f} bpb)  ->  fine-tuned loss {after['loss']:.4f} "
          f"({after['bits_per_byte']:.4f} bpb; {sft['step']} steps)")
    for ex in talk["exchanges"]:
        print(f"\nuser:      {ex['user']}\nassistant: {ex['assistant']}")
    print(f"\nreplies to {measured['replies']} held-out user turns: "
          f"distinct-1 {measured['distinct_1']:.3f}, distinct-2 {measured['distinct_2']:.3f}, "
          f"repeat a line {measured['repeats_a_line']:.3f}, "
          f"open like another {measured['same_opening']:.3f}, empty {measured['empty']:.3f}")
    people = measured["people"]
    print(f"the people's own replies to them:   distinct-1 {people['distinct_1']:.3f}, "
          f"distinct-2 {people['distinct_2']:.3f}, repeat a line {people['repeats_a_line']:.3f}, "
          f"open like another {people['same_opening']:.3f}, empty {people['empty']:.3f}")
    steal = hardware.steal_share(ticks, hardware.cpu_ticks())
    # a VM's hypervisor can take a share of the CPU that varies by the minute: it slows every timing
    # above
    stolen = (f" ({100 * steal:.0f}% of the CPU time taken by the hypervisor)"
              if steal is not None else "")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s{stolen}; the model is in {out / 'export'}. "
          "Talk to it:")
    print(f"  python -m jaxgpt.talk {out / 'export'}")


if __name__ == "__main__":
    # Ctrl-C in training: "error: stopped by SIGINT ...; rerun ..."
    with cli.one_line_errors("quickstart"):
        main()
