"""How long a person waits for a model's first reply: `python -m jaxgpt.talk EXPORT` started as a
user would start it, one message typed, the time from the command's start to the first character
of the reply, with an empty compilation cache and again with it warm, at each context length.
Prints one JSON line per run, then one summary line.

    python experiments/first_reply.py EXPORT [--contexts 8192 2048] [--message TEXT]
        [--max-tokens 32] [KEY=VALUE ...]

Greedy replies (sample.temperature=0), so every context must give the same text; KEY=VALUE
settings go to talk as they are (model.weights=int8, ...). Each context gets a compilation cache
of its own in a fresh directory (JAX_COMPILATION_CACHE_DIR): the first run fills it, the second
finds it. Peak memory: the talk process's VmHWM once its reply is done.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = b"jaxgpt> "


def first_reply(export: str, context: int, message: str, max_tokens: int, settings: list[str],
                cache_dir: str) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jaxgpt.talk", export, f"model.seq_len={context}",
           "sample.temperature=0", f"sample.max_new_tokens={max_tokens}", *settings]
    start = time.perf_counter()
    talk = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, bufsize=0)
    talk.stdin.write(message.encode() + b"\n")
    talk.stdin.flush()
    out, first = b"", None
    while True:  # the reply runs from the mark to the end of its line
        byte = talk.stdout.read(1)
        if not byte:
            raise SystemExit(f"talk ended before its reply: {talk.stderr.read().decode()[-2000:]}")
        out += byte
        if first is None and out.endswith(MARK):
            reply_at = len(out)
        elif first is None and MARK in out:
            first = time.perf_counter() - start
        if first is not None and byte == b"\n":
            break
    total = time.perf_counter() - start
    peak = next(line for line in Path(f"/proc/{talk.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM"))
    talk.stdin.close()
    talk.wait(timeout=60)
    return {"context": context, "first_token_s": round(first, 2), "reply_done_s": round(total, 2),
            "peak_rss_mb": round(int(peak.split()[1]) / 1024), "reply": out[reply_at:].decode()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 2048])
    ap.add_argument("--message", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=32)
    args, settings = ap.parse_known_args()
    rows = []
    for context in args.contexts:
        with tempfile.TemporaryDirectory(prefix="jaxgpt-xla-") as cache_dir:
            for cache in ("empty", "warm"):
                row = {"cache": cache, **first_reply(args.export, context, args.message,
                                                    args.max_tokens, settings, cache_dir)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(json.dumps({"same_reply_at_every_context": len({r["reply"] for r in rows}) == 1,
                      **{f"first_token_s_{r['context']}_{r['cache']}": r["first_token_s"]
                         for r in rows}}))


if __name__ == "__main__":
    main()
