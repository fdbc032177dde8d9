"""Tests for jaxgpt.cli, the one command-line dialect, and for the bench command lines that speak
it."""
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
from conftest import REPO, corpus, write

from jaxgpt import cli, hardware
from jaxgpt.config import BenchCommand
from jaxgpt.perf import bench


@dataclass(frozen=True)
class ToySection:
    name: str = ""
    size: int = 3
    mode: Literal["fast", "slow"] | None = None
    ids: tuple[int, ...] = (1, 2)
    flag: bool = False


@dataclass(frozen=True)
class OtherSection:
    rate: float = 0.5


@dataclass(frozen=True)
class ToyRoot:
    toy: ToySection = field(default_factory=ToySection)
    other: OtherSection = field(default_factory=OtherSection)


@pytest.fixture
def toy(monkeypatch):
    """A two-verb command line over ToyRoot; run(*argv) -> (exit status, what main got); no host
    tuning."""
    tuned, calls = [], []
    monkeypatch.setattr(hardware, "tune_host", lambda cache=True: tuned.append(True))

    def fit(operands, settings):
        cfg = cli.tool_config(ToyRoot, settings, required=("toy.name",))
        calls.append((operands, cfg))

    commands = {"fit": cli.Command(fit, "RUN_DIR [toy.key=value ...]", ToyRoot, sections=("toy",),
                                   operands=(1, 2)),
                "show": cli.Command(lambda o, s: calls.append((o, s)), "[other.rate=R]", ToyRoot,
                                    operands=(0, 0), tune_host=False)}

    def run(*argv):
        calls.clear()
        try:
            cli.run("python -m toy", commands, list(argv))
        except SystemExit as e:
            return e.code, calls[:], tuned
        return 0, calls[:], tuned
    return run


def test_split_tells_operands_from_overrides():
    argv = ["runs/a", "toy.size=4", "--toy.flag=true", "model.n_layer=2", "CONFIG.py", "plain=1",
            "x.y", "--help"]
    assert cli.split(argv) == (["runs/a", "CONFIG.py", "plain=1", "x.y", "--help"],
                               ["toy.size=4", "--toy.flag=true", "model.n_layer=2"])
    # the value may hold = and spaces
    assert cli.split(["sample.prompt=a=b c"]) == ([], ["sample.prompt=a=b c"])


def test_keys_help_lists_every_key_with_type_and_default():
    text = cli.keys_help(ToyRoot)
    assert text.splitlines() == ["  toy.name=  (str)", "  toy.size=3  (int)",
                                 "  toy.mode=none  (fast | slow | none)",
                                 "  toy.ids=1,2  (comma-separated ints)",
                                 "  toy.flag=false  (bool)", "  other.rate=0.5  (float)"]
    assert cli.keys_help(ToyRoot, ("other",)) == "  other.rate=0.5  (float)"


def test_run_parses_settings_and_calls_main(toy):
    status, calls, tuned = toy("fit", "runs/a", "toy.name=x", "toy.ids=4,5,6", "toy.mode=slow",
                               "toy.flag=yes")
    assert status == 0 and tuned == [True]
    (operands, cfg), = calls
    assert operands == ["runs/a"] and cfg.toy == ToySection("x", 3, "slow", (4, 5, 6), True)
    assert cfg.other == OtherSection()
    status, calls, tuned = toy("show", "other.rate=2")
    # tune_host=False: not again
    assert status == 0 and calls == [([], ["other.rate=2"])] and tuned == [True]


@pytest.mark.parametrize("argv, message", [
    (["fit", "runs/a", "toy.nme=x"], "error: unknown config key 'toy.nme'; did you mean toy.name"),
    (["fit", "runs/a", "toy.size=big"], "error: toy.size=big: expected int"),
    (["fit", "runs/a", "toy.mode=medium"],
     "error: toy.mode=medium: expected one of fast, slow, none"),
    (["fit", "runs/a", "toy.size=2"], "error: toy.name is required (set toy.name=...)"),
    (["fit", "a", "b", "c", "toy.name=x"], "error: expected 1 to 2 operand(s) before the key=value "
                                           "settings, got 3 (a b c); usage: python -m toy fit "
                                           "RUN_DIR [toy.key=value ...]"),
    (["show", "extra"],
     "error: expected 0 operand(s) before the key=value settings, got 1 (extra)"),
])
def test_user_errors_are_one_line_and_exit_2(toy, capsys, argv, message):
    status, calls, _ = toy(*argv)
    captured = capsys.readouterr()
    assert status == 2 and captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(message), captured.err


def test_help_and_usage(toy, capsys):
    assert toy("fit", "--help")[0] == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m toy fit RUN_DIR [toy.key=value ...]\n\n"
                          "keys (set with section.key=value):\n")
    assert "  toy.size=3  (int)" in out and "other.rate" not in out  # only the verb's sections
    assert toy("--help")[0] == 0
    assert capsys.readouterr().out.splitlines() == [
        "usage: python -m toy fit RUN_DIR [toy.key=value ...]",
        "usage: python -m toy show [other.rate=R]"]
    # no such verb, no verb, a verb missing its operand: the usage, status 2
    for argv in (["nope"], [], ["fit"]):
        status, calls, _ = toy(*argv)
        assert status == 2 and not calls and "usage: python -m toy fit" in capsys.readouterr().err


# ---- the bench command lines ----

def test_bench_splits_config_keys_from_bench_keys_and_tunes_the_host_unless_asked(
        monkeypatch, capsys):
    tuned, got = [], {}
    monkeypatch.setattr(hardware, "tune_host", lambda cache=True: tuned.append(True))
    monkeypatch.setattr(bench, "bench_train", lambda cfg, steps, warmup, **profile: got.update(
        cfg=cfg, steps=steps, warmup=warmup, profile=profile) or {"ms_per_iter": 1.0})
    monkeypatch.setattr(bench, "bench_data",
                        lambda prep, b: got.update(prep=prep, bench=b) or [{"mb_per_s": 2.0}])
    config = str(REPO / "experiments/configs/shakespeare_char.py")
    bench.main(["train", config, "data.path=x.txt", "bench.steps=7", "model.n_layer=2",
                "bench.warmup=3"])
    assert got["cfg"].data.path == "x.txt" and got["cfg"].model.n_layer == 2
    assert (got["steps"], got["warmup"]) == (7, 3) and tuned == [True]
    # not traced unless bench.profile names a directory
    assert got["profile"] == {"profile": "", "profile_runs": 3}
    assert json.loads(capsys.readouterr().out) == {"ms_per_iter": 1.0}
    bench.main(["train", config, "bench.untuned_host=true"])
    assert tuned == [True] and got["steps"] == 200  # not tuned again
    capsys.readouterr()
    bench.main(["data", "prepare.source=chitchat", "prepare.tokenizer=bpe:300",
                "prepare.doc_split=line", "bench.workers=1,3", "bench.untuned_host=1"])
    assert (got["prep"].source == "chitchat" and got["prep"].doc_split == "line"
            and got["bench"].workers == (1, 3))
    assert tuned == [True] and json.loads(capsys.readouterr().out) == {"mb_per_s": 2.0}
    assert "bench" in {f.name for f in dataclasses.fields(BenchCommand)}


@pytest.mark.parametrize("argv, message", [
    (["train", "experiments/configs/shakespeare_char.py", "bench.stpes=3"],
     "error: unknown config key 'bench.stpes'"),
    (["train", "experiments/configs/shakespeare_char.py", "prepare.source=x"],
     "error: bench train takes no prepare.*"),
    (["train", "experiments/configs/shakespeare_char.py", "model.n_head=5"],
     "error: model.d_model=128 must be "),
    (["train", "missing.py"], "error: config file missing.py not found"),
    (["data", "prepare.source=text:missing.txt", "prepare.tokenizer=byte"],
     "error: prepare.source=text:missing.txt: no .txt files at missing.txt"),
    (["data", "prepare.source=chitchat"], "error: prepare.tokenizer is required"),
    (["data", "prepare.source=chitchat", "prepare.tokenizer=byte", "train.steps=2"],
     "error: bench data takes no train.* keys (it takes prepare.* and bench.*)"),
])
def test_bench_user_errors_are_one_line(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(hardware, "tune_host", lambda cache=True: None)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    captured = capsys.readouterr()
    assert (e.value.code == 2 and captured.out == ""
            and len(captured.err.splitlines()) == 1), captured.err
    assert captured.err.startswith(message), captured.err


@pytest.mark.slow
def test_bench_train_as_the_benchmark_script_calls_it(tmp_path, run_env):
    """`python -m jaxgpt.bench train CONFIG.py data.path=X` prints one JSON line with
    ms_per_iter."""
    text = write(tmp_path / "input.txt", corpus(20_000))
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.bench", "train",
                           "experiments/configs/shakespeare_char.py", f"data.path={text}",
                           "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                           "model.seq_len=16", "data.batch_size=2", "bench.steps=2",
                           "bench.warmup=1"],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    result = json.loads(line)
    assert result["bench"] == "train" and result["steps"] == 2 and result["ms_per_iter"] > 0
    assert result["cpu_steal"] is None or 0 <= result["cpu_steal"] <= 1
    bad = subprocess.run([sys.executable, "-m", "jaxgpt.bench", "train",
                          "experiments/configs/shakespeare_char.py", "--steps", "3"],
                         capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=120)
    assert (bad.returncode == 2 and "Traceback" not in bad.stderr
            and len(bad.stderr.splitlines()) == 1)
    assert bad.stderr.startswith("error: expected 1 operand(s) before the key=value settings, "
                                 "got 3")


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def interrupted(operands, settings):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        command = cli.Command(interrupted, "X", ToyRoot, tune_host=False)
        cli.run("python -m jaxgpt.toy", command, ["x"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["python -m jaxgpt.toy: interrupted"]
