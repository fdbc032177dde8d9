"""Does llama.cpp run what jaxgpt writes, and agree with it? A jaxgpt export written with to-gguf
(or, with --gguf, a GGUF file as it came) is loaded by llama.cpp (llama-cpp-python, in a venv of its
own), and both decode greedily from the same chat prompt; prints one JSON object: whether the
generated ids are equal, the largest logit difference over prompt and reply, how often the argmax
agrees, and whether llama.cpp's tokenizer gives jaxgpt's ids for the prompt's text.

    python experiments/llama_cpp_check.py EXPORT [--gguf FILE] [--dtype f32|f16|bf16|q8_0]
        [--new 32] [--llama-venv DIR]

llama-cpp-python: `python3 -m venv ~/.cache/jaxgpt-bench/llama-venv &&
~/.cache/jaxgpt-bench/llama-venv/bin/pip install llama-cpp-python` (pip builds llama.cpp from
source).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ToGgufConfig
from jaxgpt.data import chat
from jaxgpt.generate.engine import Engine
from jaxgpt.generate.sampling import SamplingParams
from jaxgpt.model.gpt import GPT
from jaxgpt.store import runs
from jaxgpt.store.gguf.convert import to_gguf

PROMPT = "Hi! What do you like to do on weekends?"

LLAMA = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llama_cpp import Llama
    path, ids, new, text, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), \\
        sys.argv[4], sys.argv[5]
    llm = Llama(model_path=path, n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    generated = []
    for _ in range(new):  # greedy, never stopping
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(generated[-1:])
    np.save(out, np.array(llm.scores[:llm.n_tokens], np.float32))
    print(json.dumps({"generated": generated,
                      "text_ids": llm.tokenize(text.encode(), add_bos=False, special=True)}))
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--gguf", default="", help="a GGUF as it came (default: to-gguf of EXPORT)")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--llama-venv", default=str(Path.home() / ".cache/jaxgpt-bench/llama-venv"))
    args = ap.parse_args()
    # fp32 math on jaxgpt's side, whatever the run trained with (llama.cpp's f32 weights are f32)
    loaded = runs.load(args.export, ["model.dtype=float32", "model.matmul_dtype=float32"])
    tok, model = loaded.tokenizer, GPT(loaded.cfg.model)
    ids = chat.render([{"role": "user", "content": PROMPT}], tok, for_generation=True)[0].tolist()
    # greedy through the engine (no tokenizer given: no stop token), then every position's logits
    engine = Engine(model, loaded.params, slots=1)
    seq = ids + engine.generate([ids], SamplingParams(max_tokens=args.new, temperature=0.0))[0]
    logits = np.asarray(model.apply(loaded.params, jnp.asarray([seq[:-1]]))[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = args.gguf or str(Path(tmp) / "model.gguf")
        if not args.gguf:
            to_gguf(args.export, path, ToGgufConfig(dtype=args.dtype))
        text = tok.decode(ids)
        done = subprocess.run([str(Path(args.llama_venv) / "bin/python"), "-c", LLAMA, path,
                               json.dumps(ids), str(args.new), text, f"{tmp}/scores.npy"],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"llama.cpp failed:\n{done.stderr[-3000:]}")
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        scores = np.load(f"{tmp}/scores.npy")
    ours = seq[len(ids):]
    V = min(scores.shape[1], logits.shape[1])  # jaxgpt's padding rows past the file's vocabulary
    n = min(len(scores), len(logits))
    same = [a == b for a, b in zip(ours, theirs["generated"], strict=True)]
    # the reply as a user sees it: up to its first stop token (the rest is off the model's path)
    stops = set(chat.layout(tok).stop_ids)
    seen = min(len(ids) + next((i for i, t in enumerate(ours) if t in stops), len(ours)), n)
    print(json.dumps({
        "export": args.export, "gguf": args.gguf or f"to-gguf dtype={args.dtype}",
        "prompt_tokens": len(ids), "greedy_equal": all(same),
        "first_difference": None if all(same) else same.index(False),
        "max_logit_diff": float(np.abs(scores[:n, :V] - logits[:n, :V]).max()),
        "max_abs_logit": float(np.abs(logits[:n, :V]).max()),
        "reply_tokens": seen - len(ids), "reply_equal": all(same[:seen - len(ids)]),
        "max_logit_diff_in_reply": float(np.abs(scores[:seen, :V] - logits[:seen, :V]).max()),
        "argmax_agree": float((scores[:n, :V].argmax(-1) == logits[:n, :V].argmax(-1)).mean()),
        "tokenizer_equal": theirs["text_ids"] == ids,
        "jaxgpt_reply": tok.decode(ours), "llama_cpp_reply": tok.decode(theirs["generated"])}))


if __name__ == "__main__":
    main()
