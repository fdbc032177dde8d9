"""Load test of the OpenAI-compatible server (jaxgpt.serve), through the official `openai` client.

    python experiments/load_test.py RUN_OR_EXPORT [--clients 8 --requests-per-client 1
                                                   --max-tokens 64 --mode sequential|concurrent|both
                                                   --slots S --out FILE]
    python experiments/load_test.py --random-init gpt2_124m \
        --tokenizer-from runs/quickstart/export [--clients 8 ...]
    python experiments/load_test.py --url http://127.0.0.1:8000 [--api-key KEY] [--clients 8 ...]

The first two start `python -m jaxgpt.serve` on 127.0.0.1 and a free port (serve.slots=--slots, by
default the number of clients, at most 32), wait for GET /health, and stop it at the end; --url
tests a server already running. --random-init serves a random-init model of a config file in
experiments/configs (gpt2_124m, shakespeare_char, ...) with the tokenizer of --tokenizer-from,
keeping the config's vocab_size (gpt2_124m: 50304 rows) when it holds the tokenizer. `--set
KEY=VALUE` (repeatable) overrides that config, or is passed to the server when it serves a run
(model.dtype=bfloat16, screen.enabled=false, ...).

Each of --clients threads has its own openai.OpenAI client and sends --requests-per-client streamed
chat completions (temperature 0.8, a seed per request, a short prompt from PROMPTS). `sequential`
sends the same requests one after another, `concurrent` all clients at once, `both` sequential and
then concurrent. Per request: time to the first chunk with content, completion tokens (the usage
chunk), a finish_reason. One JSON line per mode on stdout (and appended to --out): requests and
completion tokens per second of wall time, ttft p50/p95, failures with the first error, the
server's model id and slots, the host's CPU. It times, it never asserts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]  # the config files are read from the checkout

# Short, and in plain lower-case words, so that even a char-level model with a 32-token context
# (the tests' tiny run) can encode them and leave room for a reply.
PROMPTS = ["hi! how are you?", "what do you like?", "good night", "tell me a story",
           "where are you from?", "is it cold today?"]
MAX_SLOTS = 32


class LoadTestError(Exception):
    pass


@dataclasses.dataclass
class Result:
    ttft_s: float | None = None  # None: no chunk with content (an empty reply, or a failure)
    tokens: int = 0
    end_s: float = 0.0           # since the mode's start
    error: str | None = None


# ---- the server ----

def free_port() -> int:
    with socket.socket() as s:  # free for the moment it takes the server to bind it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_init_export(preset: str, tokenizer_from: str, overrides: list[str], out: Path) -> Path:
    """A random-init export of experiments/configs/PRESET.py with the tokenizer of
    `tokenizer_from`."""
    # Only the server needs the accelerator: jax here stays on the CPU, so that it does not claim
    # the GPU's memory the server will want.
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from jaxgpt import config as config_lib
    from jaxgpt.errors import JaxgptError
    from jaxgpt.model.gpt import GPT
    from jaxgpt.store import export, runs

    path = ROOT / "experiments/configs" / f"{preset}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.py")))
        raise LoadTestError(f"--random-init {preset}: no {path.relative_to(ROOT)} "
                            f"(there are: {known})")
    try:
        cfg = config_lib.from_cli(path, overrides)
        tokenizer = runs.load_tokenizer(tokenizer_from)
        # the chat template's tokens (a jaxgpt tokenizer has them)
        tokenizer.special_id("<|assistant_start|>")
    except JaxgptError as e:
        raise LoadTestError(str(e)) from None
    # 0: the tokenizer's size, as training resolves it
    vocab = cfg.model.vocab_size or tokenizer.n_vocab
    if vocab < tokenizer.n_vocab:
        raise LoadTestError(f"--random-init {preset}: model.vocab_size={vocab} is smaller than the "
                            f"{tokenizer.n_vocab} tokens of {tokenizer_from}'s tokenizer")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    cfg = config_lib.validate(dataclasses.replace(cfg, model=model_cfg))
    params = GPT(cfg.model).init(jax.random.key(0))
    # OUT/PRESET/export: the server names the model after PRESET (serve.model_id_of)
    return export.export(out / preset / "export", cfg, jax.device_get(params), tokenizer)


def health(base: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
        return json.load(r)


def start_server(source: Path, port: int, slots: int, settings: list[str], log, env: dict,
                 timeout: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", str(source),
                              "serve.host=127.0.0.1", f"serve.port={port}", f"serve.slots={slots}",
                              *settings],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if child.poll() is not None:  # its last line says why (a missing run, a bad key)
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()
                last = (lines or ["(no output)"])[-1]
                raise LoadTestError(f"the server exited with {child.returncode} before it answered "
                                    f"/health: {last}")
            if time.monotonic() > deadline:
                raise LoadTestError(f"the server did not answer /health within {timeout:.0f} s")
            try:
                health(f"http://127.0.0.1:{port}", timeout=1.0)
                return child
            except OSError:  # not listening yet (it compiles first)
                time.sleep(0.25)
    except BaseException:  # a timeout, Ctrl-C: never leave the server running
        if child.poll() is None:
            stop_server(child)
        raise


def stop_server(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# ---- the clients ----

def one_request(client: openai.OpenAI, model: str, prompt: str, seed: int, max_tokens: int,
                t0: float) -> Result:
    result, finished, usage = Result(), False, None
    start = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.8, seed=seed, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content and result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - start
                finished = finished or choice.finish_reason is not None
        if not finished or usage is None:
            missing = "a finish_reason" if not finished else "usage"
            result.error = f"the stream ended without {missing}"
        else:
            result.tokens = usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - a load test counts failures, whatever they are
        result.error = f"{type(e).__name__}: {e}"
    result.end_s = time.perf_counter() - t0
    return result


def new_client(base: str, api_key: str) -> openai.OpenAI:
    # no retries: a retried request would hide a failure and count twice in the time
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=600)


def run_mode(mode: str, base: str, api_key: str, model: str, clients: int, per_client: int,
             max_tokens: int) -> tuple[list[Result], float]:
    """(results, wall seconds to the last reply's end) of clients x per_client requests; request i
    has seed i and PROMPTS[i % n]."""
    jobs = [[(c * per_client + i) for i in range(per_client)] for c in range(clients)]
    results: list[Result | None] = [None] * (clients * per_client)
    if mode == "sequential":
        client = new_client(base, api_key)
        t0 = time.perf_counter()
        for i in range(len(results)):
            results[i] = one_request(client, model, PROMPTS[i % len(PROMPTS)], i, max_tokens, t0)
        return results, max(r.end_s for r in results)
    ready = threading.Barrier(clients + 1)  # the clients are built before the clock starts
    t0 = 0.0

    def work(ids: list[int]) -> None:
        client = new_client(base, api_key)
        ready.wait()
        for i in ids:
            results[i] = one_request(client, model, PROMPTS[i % len(PROMPTS)], i, max_tokens, t0)
    threads = [threading.Thread(target=work, args=(ids,), daemon=True) for ids in jobs]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    ready.wait()
    for t in threads:
        t.join()
    return results, max(r.end_s for r in results)  # the last reply's end, not the threads' teardown


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (one of the values, so p50 <= p95 always)."""
    values = sorted(values)
    return values[max(math.ceil(q * len(values)) - 1, 0)] if values else None


def host_facts() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count()}


def summarize(mode: str, results: list[Result], wall: float, clients: int, max_tokens: int,
              model: str, slots: int | None, source: str) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.tokens for r in ok)
    out = {"bench": "load_test", "mode": mode, "clients": clients, "requests": len(results),
           "failed": len(results) - len(ok), "max_tokens": max_tokens, "wall_s": round(wall, 3),
           "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
           "ttft_p50_s": None if not ttfts else round(percentile(ttfts, 0.5), 4),
           "ttft_p95_s": None if not ttfts else round(percentile(ttfts, 0.95), 4),
           "mean_reply_tokens": round(tokens / len(ok), 2) if ok else None,
           "empty_replies": len(ok) - len(ttfts), "model": model, "slots": slots, "server": source,
           **host_facts()}
    if first := next((r.error for r in results if r.error), None):
        out["first_error"] = first
    return out


def load_test(base: str, api_key: str, args: argparse.Namespace, source: str) -> list[dict]:
    try:
        model = new_client(base, api_key).models.list().data[0].id
        slots = health(base).get("slots")
    except (openai.OpenAIError, OSError) as e:
        raise LoadTestError(f"{base}: {type(e).__name__}: {e}") from None
    # Warm-up, untimed: each prompt once, so that the server compiles every prefill length bucket
    # now and not inside the first timed requests.
    warm = new_client(base, api_key)
    for i, prompt in enumerate(PROMPTS):
        if (r := one_request(warm, model, prompt, i, min(args.max_tokens, 2),
                             time.perf_counter())).error:
            print(f"load_test: warm-up request failed: {r.error}", file=sys.stderr)
            break
    out = []
    for mode in ("sequential", "concurrent") if args.mode == "both" else (args.mode,):
        results, wall = run_mode(mode, base, api_key, model, args.clients, args.requests_per_client,
                                 args.max_tokens)
        out.append(summarize(mode, results, wall, args.clients, args.max_tokens, model, slots,
                             source))
        print(json.dumps(out[-1]), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(out[-1]) + "\n")
    if len(out) == 2 and out[0]["tokens_per_s"]:
        ratio = out[1]["tokens_per_s"] / out[0]["tokens_per_s"]
        print(f"load_test: concurrent/sequential tokens/s = {ratio:.2f}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="a run directory or export to serve")
    ap.add_argument("--url",
                    help="test a running server (http://HOST:PORT) instead of starting one")
    ap.add_argument("--random-init", metavar="PRESET",
                    help="serve a random-init model of experiments/configs/PRESET.py")
    ap.add_argument("--tokenizer-from", metavar="RUN_OR_EXPORT",
                    help="--random-init: whose tokenizer")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="--random-init: a config override; else a setting for the server")
    ap.add_argument("--api-key", default=os.environ.get("JAXGPT_API_KEY") or "none",
                    help="default $JAXGPT_API_KEY (a server started here takes it from there too)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mode", choices=("sequential", "concurrent", "both"), default="both")
    ap.add_argument("--slots", type=int,
                    help=f"serve.slots (default: --clients, at most {MAX_SLOTS})")
    ap.add_argument("--startup-timeout", type=float, default=600.0,
                    help="seconds to wait for /health")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    if sum(x is not None for x in (args.source, args.url, args.random_init)) != 1:
        ap.error("give one of RUN_OR_EXPORT, --url or --random-init")
    if args.random_init and not args.tokenizer_from:
        ap.error("--random-init needs --tokenizer-from RUN_OR_EXPORT")
    if min(args.clients, args.requests_per_client, args.max_tokens) < 1:
        ap.error("--clients, --requests-per-client and --max-tokens must be at least 1")
    try:
        if args.url:
            load_test(args.url.rstrip("/").removesuffix("/v1"), args.api_key, args, args.url)
            return
        env = dict(os.environ)  # before random_init_export pins this process's jax to the CPU
        with tempfile.TemporaryDirectory(prefix="load_test_") as tmp:
            if args.random_init:
                source = random_init_export(args.random_init, args.tokenizer_from, args.set,
                                            Path(tmp))
                settings, name = [], f"random-init {args.random_init}"
            else:
                source, settings, name = Path(args.source), args.set, args.source
            port, slots = free_port(), args.slots or min(args.clients, MAX_SLOTS)
            with open(Path(tmp) / "server.log", "w+b") as log:
                def show_log() -> None:  # the server's side of a failure: its traceback
                    log.seek(0)
                    sys.stderr.write("--- the server's log, last lines ---\n"
                                     + log.read().decode(errors="replace")[-3000:] + "\n")
                try:
                    child = start_server(source, port, slots, settings, log, env,
                                         args.startup_timeout)
                except LoadTestError:
                    show_log()
                    raise
                try:
                    reports = load_test(f"http://127.0.0.1:{port}", args.api_key, args, name)
                finally:
                    stop_server(child)
                if any(r["failed"] for r in reports):
                    show_log()
    except LoadTestError as e:
        sys.exit(f"load_test: {e}")
    except KeyboardInterrupt:  # the finally blocks above have stopped the server it started
        sys.exit("load_test: interrupted")


if __name__ == "__main__":
    main()
