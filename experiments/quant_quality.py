"""What int8 / int4 weights (model.weights, model/quant.py) cost SmolLM2-135M-Instruct: held-out
bits per byte of the assistant's tokens (the first --conversations held-out chitchat dialogues, as
experiments/real_model.py measures them) and greedy replies to PROMPTS, beside fp32's; also int4
straight from the GGUF's own Q4_1 blocks (from_gguf.keep_quantized). One JSON line.

    python experiments/quant_quality.py [--out runs/quant] [--conversations 100] [--new 48]
        [--variants float int8 int4 gguf_q4_1] [--no-replies]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import quickstart  # noqa: E402
import real_model  # noqa: E402

from jaxgpt.config import FromGgufConfig  # noqa: E402
from jaxgpt.data import tokens as data  # noqa: E402
from jaxgpt.generate.engine import Engine  # noqa: E402
from jaxgpt.generate.sampling import SamplingParams  # noqa: E402
from jaxgpt.generate.screen import Screen  # noqa: E402
from jaxgpt.generate.service import Service  # noqa: E402
from jaxgpt.model import quant  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.store import runs  # noqa: E402
from jaxgpt.store.gguf.convert import from_gguf  # noqa: E402
from jaxgpt.train import evaluate  # noqa: E402

PROMPTS = [  # written for this script: not in chitchat
    "hi! how was your weekend?", "I just got back from a trip to the mountains.",
    "what kind of music do you like?", "do you have any plans for the summer?",
    "What is the capital of France?", "Give me three tips for sleeping better.",
    "Explain what a neural network is in one sentence.", "Write a haiku about the sea.",
    "How do I boil an egg?", "What's 12 times 7?", "Tell me a fun fact about octopuses.",
    "Can you recommend a good book?", "Why is the sky blue?", "Translate 'good morning' to French.",
    "What should I cook for dinner tonight?", "How can I learn to play the guitar?",
    "Summarize the plot of Romeo and Juliet.", "What are the benefits of exercise?",
    "I feel a bit tired today.", "Write a short greeting for a birthday card.",
]


def bits_per_byte(loaded, model: GPT, params) -> dict:
    """Held-out assistant-token bits per byte of `params` (any weights) under `model`."""
    cfg = loaded.cfg
    batches = data.open_batches(cfg, loaded.tokenizer, training=False)
    step = jax.jit(lambda p, b: model.loss(p, b))
    return evaluate.evaluate_source(batches, cfg, step, params, loaded.mesh, cfg.eval.split,
                                    cfg.eval.max_tokens)


def replies(loaded, model: GPT, params, new: int) -> tuple[list[str], float]:
    """Greedy replies to PROMPTS (the chat template, the screen), and the seconds they took."""
    greedy = SamplingParams(temperature=0.0, max_tokens=new)
    t0 = time.perf_counter()
    with Service(Engine(model, params, loaded.tokenizer, slots=4), loaded.tokenizer,
                 Screen(loaded.cfg.screen)) as service:
        streams = [service.chat([{"role": "user", "content": p}], greedy) for p in PROMPTS]
        texts = [stream.result()[0].text for stream in streams]
    return texts, time.perf_counter() - t0


# name: (the conversion it loads, model.weights)
VARIANTS = {"float": ("base", "float"), "int8": ("base", "int8"), "int4": ("base", "int4"),
            "gguf_q4_1": ("kept", "int4")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quant")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--conversations", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--no-replies", action="store_true", help="bits per byte alone")
    args = ap.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    stage = lambda name, work: quickstart.stage(out, name, work)  # noqa: E731
    stage("base", lambda: from_gguf(args.model, out / "base", FromGgufConfig(seq_len=2048)))
    stage("kept", lambda: from_gguf(args.model, out / "kept",
                                    FromGgufConfig(seq_len=2048, keep_quantized=True)))
    stage("data", lambda: {**quickstart.split_data(out, real_model.SEED),
                           "eval": real_model.held_out_subset(out, args.conversations)})
    overrides = [f"{key}=" for key in evaluate.DATA_SOURCES] + [
        f"data.chat_val=jsonl:{out / 'corpus/val_eval.jsonl'}", f"model.seq_len={args.seq_len}",
        "data.batch_size=8", "model.matmul_dtype=float32"]
    results = {}
    for name in args.variants:
        source, weights = VARIANTS[name]
        loaded = runs.load(out / source, [*overrides, f"model.weights={weights}"], on_mesh=True)
        model = GPT(loaded.cfg.model)
        params = quant.decode_params(model, loaded.params)
        texts, seconds = ([], 0.0) if args.no_replies else replies(loaded, model, loaded.params,
                                                                   args.new)
        results[name] = {**bits_per_byte(loaded, model, params), "replies": texts,
                         "replies_s": round(seconds, 1),
                         "weight_mb": round(sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20,
                                            1)}
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "replies"}}),
              file=sys.stderr, flush=True)
    ref = results.get("float")
    for r in results.values() if ref else ():
        r["bpb_minus_float"] = round(r["bits_per_byte"] - ref["bits_per_byte"], 5)
        if not args.no_replies:
            r["replies_equal_float"] = sum(a == b for a, b in zip(r["replies"], ref["replies"],
                                                                   strict=True))
    print(json.dumps({"model": args.model, "prompts": PROMPTS, "new_tokens": args.new,
                      "results": results}))


if __name__ == "__main__":
    main()
