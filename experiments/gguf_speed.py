"""Decode speed of a real model (SmolLM2-135M-Instruct) in jaxgpt beside llama.cpp on the same GGUF
and Hugging Face `generate` on the dequantized model, one after the other in one run, and how far
each one's logits are from transformers' fp32 on the same tokens. Prints one JSON object.

    python experiments/gguf_speed.py EXPORT [--gguf FILE] [--new 128] [--batch 1 8]
        [--llama-venv DIR]

EXPORT: `python -m jaxgpt.convert from-gguf smollm2-135m-instruct EXPORT`. Every side makes --new
tokens from the same 16-token prompt per row, sampling at temperature 1 with top-k 50, without
stopping, on 2 threads. llama.cpp runs from llama-cpp-python in a venv of its own (pip builds it
from source; see README "Start from a real model"); its high-level API decodes one sequence, so it
is timed at batch 1 only. transformers loads the GGUF with gguf_file= (it needs accelerate).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HF = textwrap.dedent("""
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM
    path, new, batches = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
    torch.set_num_threads(2)
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(
            str(path.rsplit("/", 1)[0]), gguf_file=path.rsplit("/", 1)[1],
            dtype=getattr(torch, dtype)).eval()
        for batch in batches:
            torch.manual_seed(0)
            prompt = torch.randint(0, model.config.vocab_size, (batch, 16))
            kw = dict(do_sample=True, top_k=50, temperature=1.0, max_new_tokens=new,
                      min_new_tokens=new, pad_token_id=0, eos_token_id=None)
            with torch.no_grad():
                model.generate(prompt, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
                t = time.perf_counter()
                out = model.generate(prompt, **kw)
                dt = time.perf_counter() - t
            n = out.shape[1] - 16
            print(json.dumps({"impl": "hf-generate", "dtype": dtype, "batch": batch,
                              "tok_per_s": round(batch * n / dt, 1)}), flush=True)
""")

LLAMA = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, new = sys.argv[1], int(sys.argv[2])
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    prompt = np.random.default_rng(0).integers(0, llm.n_vocab(), 16).tolist()
    for rounds in (1, 3):  # the first round warms up
        best = 0.0
        for _ in range(rounds):
            llm.reset()
            t, n = time.perf_counter(), 0
            for _tok in llm.generate(prompt, top_k=50, top_p=1.0, min_p=0.0, temp=1.0,
                                     repeat_penalty=1.0, reset=True):
                n += 1
                if n == new:
                    break
            best = max(best, n / (time.perf_counter() - t))
    print(json.dumps({"impl": "llama.cpp", "dtype": "Q4_1 (the file's)", "batch": 1,
                      "threads": 2, "tok_per_s": round(best, 1)}), flush=True)
""")


def _lines(cmd: list[str]) -> list[dict]:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{cmd[0]} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--gguf", default="")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--llama-venv", default=str(Path.home() / ".cache/jaxgpt-bench/llama-venv"))
    args = ap.parse_args()
    if not args.gguf:
        from jaxgpt.store.gguf.models import known_file
        args.gguf = str(known_file("smollm2-135m-instruct"))
    results = {"cpu": _cpu(), "new_tokens": args.new, "jaxgpt": [], "hf": [], "llama.cpp": []}
    for dtype in ("float32", "bfloat16"):
        for r in _lines([sys.executable, "-m", "jaxgpt.bench", "generate", args.export,
                         "--batch", *map(str, args.batch), "--new", str(args.new),
                         f"model.dtype={dtype}"]):
            results["jaxgpt"].append({"dtype": dtype, "batch": r["batch"],
                                      "tok_per_s": r["tok_per_s"]})
    results["hf"] = _lines([sys.executable, "-c", HF, args.gguf, str(args.new),
                            ",".join(map(str, args.batch))])
    llama_python = Path(args.llama_venv) / "bin" / "python"
    if llama_python.is_file():
        results["llama.cpp"] = _lines([str(llama_python), "-c", LLAMA, args.gguf, str(args.new)])
    else:
        results["llama.cpp"] = f"no {llama_python}: pip install llama-cpp-python in that venv"
    print(json.dumps(results))


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ,
                                                                        "LC_ALL": "C"}).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return " ".join(fields.get(k, "").strip() for k in ("Model name", "CPU family")) + \
        f", {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
