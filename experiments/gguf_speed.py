"""Decode speed of a real model (SmolLM2-135M-Instruct) in jaxgpt, per weight width, beside
llama.cpp on the GGUF file itself and (with --hf) Hugging Face `generate` on the dequantized
model, one after the other in one run. Prints one JSON object: each side's rows and jaxgpt's ratios
to llama.cpp.

    python experiments/gguf_speed.py EXPORT [--gguf FILE] [--new 128] [--batch 1 8]
        [--weights float int8 int4] [--dtype float32] [--threads 2] [--hf]
        [--llama-venv DIR] [--install-llama]

EXPORT: `python -m jaxgpt.convert from-gguf smollm2-135m-instruct EXPORT`. Every side makes --new
tokens from a 16-token prompt per row, sampling at temperature 1 with top-k 50, without stopping,
on --threads threads (jaxgpt: the process's CPUs). llama.cpp runs from llama-cpp-python in a venv
of its own (pip builds it from source in about 20 minutes on 2 cores: --install-llama, or see
README "Start from a real model"); where it is absent or cannot be built, its side is skipped with
one line. Its high-level API decodes one sequence, so it is timed at batch 1 only. transformers
(--hf, in this interpreter) loads the GGUF with gguf_file= (it needs accelerate).
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
    import resource
    path, new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    prompt = np.random.default_rng(0).integers(0, llm.n_vocab(), 16).tolist()
    for rounds in (1, 3):  # the first round warms up
        best, ttft = 0.0, []
        for _ in range(rounds):
            llm.reset()
            t, n = time.perf_counter(), 0
            for _tok in llm.generate(prompt, top_k=50, top_p=1.0, min_p=0.0, temp=1.0,
                                     repeat_penalty=1.0, reset=True):
                n += 1
                if n == 1:
                    ttft.append(time.perf_counter() - t)
                if n == new:
                    break
            best = max(best, n / (time.perf_counter() - t))
    print(json.dumps({"impl": "llama.cpp", "file_type": llm.metadata.get("general.file_type"),
                      "batch": 1, "threads": threads, "tok_per_s": round(best, 1),
                      "ttft_s": round(min(ttft), 4), "peak_rss_mb": round(
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}),
          flush=True)
""")


def _lines(cmd: list[str], optional: bool = False) -> list[dict] | str:
    """The JSON lines a command prints; a failure ends the run (optional: its reason instead)."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        if optional:
            return f"skipped: {done.stderr.strip().splitlines()[-1:]}"
        sys.exit(f"{cmd[0]} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _llama(args) -> list[dict] | str:
    """llama.cpp's row, from llama-cpp-python in its own venv (built there with --install-llama)."""
    python = Path(args.llama_venv) / "bin" / "python"
    if not python.is_file() and args.install_llama:
        built = subprocess.run(f"python3 -m venv {args.llama_venv} && {args.llama_venv}/bin/pip "
                               "install -q llama-cpp-python", shell=True, capture_output=True,
                               text=True)
        if built.returncode:
            return f"skipped: llama-cpp-python could not be built: {built.stderr[-300:]!r}"
    if not python.is_file():
        return f"skipped: no {python} (--install-llama builds llama-cpp-python there)"
    return _lines([str(python), "-c", LLAMA, args.gguf, str(args.new), str(args.threads)], True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--gguf", default="")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--weights", nargs="+", default=["float", "int8", "int4"])
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--llama-venv", default=str(Path.home() / ".cache/jaxgpt-bench/llama-venv"))
    ap.add_argument("--install-llama", action="store_true")
    args = ap.parse_args()
    if not args.gguf:
        from jaxgpt.store.gguf.models import known_file
        args.gguf = str(known_file("smollm2-135m-instruct"))
    results = {"cpu": _cpu(), "new_tokens": args.new, "llama.cpp": _llama(args), "jaxgpt": []}
    for dtype in args.dtype:
        for weights in args.weights:
            for r in _lines([sys.executable, "-m", "jaxgpt.bench", "generate", args.export,
                             "--batch", *map(str, args.batch), "--new", str(args.new),
                             f"model.dtype={dtype}", f"model.weights={weights}"]):
                results["jaxgpt"].append({k: r[k] for k in (
                    "dtype", "weights", "batch", "tok_per_s", "ttft_s", "weights_mb",
                    "cache_mb", "peak_rss_mb", "ratio_to_bound")})
    if args.hf:
        results["hf"] = _lines([sys.executable, "-c", HF, args.gguf, str(args.new),
                                ",".join(map(str, args.batch))], True)
    if isinstance(results["llama.cpp"], list) and results["llama.cpp"]:
        anchor = results["llama.cpp"][0]["tok_per_s"]
        results["ratio_to_llama_b1"] = {f"{r['dtype']}/{r['weights']}/b{r['batch']}": round(
            r["tok_per_s"] / anchor, 3) for r in results["jaxgpt"]}
    print(json.dumps(results))


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ,
                                                                        "LC_ALL": "C"}).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return " ".join(fields.get(k, "").strip() for k in ("Model name", "CPU family")) + \
        f", {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
