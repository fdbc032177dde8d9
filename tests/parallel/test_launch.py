"""Tests for jaxgpt.launch: when a process joins others (jax.distributed settings from the config
or the environment), the launcher's arguments, output, signals and failures, and training over 2
local processes of 4 CPU devices each against 1 process of 8: same losses, a checkpoint that
restores in one process, metrics and export written once."""
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import subprocess_env, tiny

from jaxgpt.config import DistributedConfig
from jaxgpt.errors import ConfigError
from jaxgpt.parallel import launch
from jaxgpt.store import runs

AUTO = DistributedConfig()
CLUSTER_VARS = ("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def clean_env(**extra) -> dict:
    """A child's environment with no cluster of the machine running the tests leaking in."""
    env = {k: v for k, v in subprocess_env(**extra).items() if not k.startswith(CLUSTER_VARS)}
    return env


# ---- when a process joins others ----

@pytest.mark.parametrize("cfg, env, expected", [
    # one process: nothing changes
    (AUTO, {}, None),
    # launch.py's children: loopback only
    (AUTO, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "0"},
     {"coordinator_address": "127.0.0.1:5000", "num_processes": 2, "process_id": 0,
      "coordinator_bind_address": "127.0.0.1:5000"}),
    (AUTO, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:5000", "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.1:5000", "num_processes": 4, "process_id": 3}),
    # the config wins over the environment
    (DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=1,
                       local_device_ids="2,3"),
     {"JAX_PROCESS_ID": "0"},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1,
      "local_device_ids": [2, 3]}),
    (AUTO, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
     None),
    # jax finds the rest
    (AUTO, {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, {}),
    (AUTO, {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
    # a batch script, not an srun step
    (AUTO, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),
    (AUTO, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}),
    (AUTO, {"TPU_WORKER_HOSTNAMES": "t0"}, None),
    (DistributedConfig(enabled="on"),
     {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2"}, {}),
    (DistributedConfig(enabled="off"), {"TPU_WORKER_HOSTNAMES": "t0,t1"}, None),
])
def test_settings(cfg, env, expected):
    assert launch.settings(cfg, env, tpu_vm=False) == expected


def test_a_cloud_tpu_vm_lets_jax_ask_its_metadata_server():
    assert launch.settings(AUTO, {}, tpu_vm=True) == {}


@pytest.mark.parametrize("cfg, env, message", [
    (AUTO, {"JAX_COORDINATOR_ADDRESS": "h:1"},
     "set distributed.num_processes, distributed.process_id"),
    (DistributedConfig(enabled="on"), {},
     "set distributed.coordinator_address, distributed.num_processes, "
     "distributed.process_id (or JAX_COORDINATOR_ADDRESS"),
    (AUTO, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two': expected an integer"),
    (DistributedConfig(local_device_ids="0-3"), {},
     "distributed.local_device_ids='0-3': expected ids like 0,1"),
])
def test_incomplete_settings_are_one_line_errors(cfg, env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        launch.settings(cfg, env, tpu_vm=False)


def test_child_environments():
    base = {"XLA_FLAGS": "--xla_dump_to=x --xla_force_host_platform_device_count=2"}
    env = launch.child_env(1, 2, 4, 5555, base)
    assert [env[k] for k in (launch.ADDRESS, launch.COUNT, launch.RANK)] == ["127.0.0.1:5555", "2",
                                                                             "1"]
    assert env["XLA_FLAGS"] == "--xla_dump_to=x --xla_force_host_platform_device_count=4"
    assert env["JAX_LOCAL_DEVICE_IDS"] == "4,5,6,7"  # its own GPUs, on a GPU host
    one = launch.child_env(0, 1, 8, 5555, {})  # one process: no jax.distributed at all
    assert not any(k.startswith("JAX_") for k in one) and one["XLA_FLAGS"].endswith("count=8")


# ---- the launcher ----

def run_launch(*args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", "jaxgpt.launch", *args], env=clean_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2"], "error: no command: put it after `--`"),
    (["--nproc", "0", "--", "true"], "error: --nproc '0': expected a positive integer"),
    (["--nproc=x", "--", "true"], "error: --nproc 'x': expected a positive integer"),
    (["--devices-per-proc", "4", "--", "true"], "error: --nproc N is required"),
    (["--nproc", "2", "--fast", "--", "true"], "error: unknown option '--fast'"),
    (["--nproc", "2", "--"], "error: no command after `--`"),
    (["--nproc", "2", "--", "/nonexistent/python"], "error: cannot start '/nonexistent/python'"),
])
def test_bad_arguments_are_one_line_and_status_2(args, message):
    proc = run_launch(*args)
    assert (proc.returncode == 2 and proc.stderr.startswith(message)
            and proc.stderr.count("\n") == 1), proc.stderr


CHILD = "import os, sys, time; rank = int(os.environ['JAX_PROCESS_ID']); "


def test_output_is_prefixed_by_rank():
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.launch", "--nproc", "2", "--",
                           sys.executable, "-c", CHILD +
                           "print(f'hello from {rank} of', os.environ['JAX_NUM_PROCESSES']); "
                           "print('progress\\rdone', file=sys.stderr)"],
                          env=clean_env(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.decode().splitlines()) == ["[0] hello from 0 of 2",
                                                         "[1] hello from 1 of 2"]
    # a progress bar's \r starts a line too
    assert sorted(proc.stderr.decode().split("\n")[:2]) == ["[0] progress\r[0] done",
                                                            "[1] progress\r[1] done"]


def test_a_line_written_in_pieces_stays_whole():
    # both ranks write the first half of a line, wait, then the rest: the halves must not mix
    # (the CI once saw "[0] stopping after[1] stopping after 1 signal(s)")
    proc = run_launch("--nproc", "2", "--", sys.executable, "-c", CHILD +
                      "sys.stdout.write(f'first half of {rank}'); sys.stdout.flush(); "
                      "time.sleep(0.5); "
                      "sys.stdout.write(', second half\\nno line end'); sys.stdout.flush()")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["[0] first half of 0, second half",
                                                "[0] no line end",
                                                "[1] first half of 1, second half",
                                                "[1] no line end"]


def test_a_failed_child_stops_the_others_and_sets_the_status():
    t = time.monotonic()
    proc = run_launch("--nproc", "3", "--rank0-only", "--", sys.executable, "-c", CHILD +
                      "print('rank 1 fails here') if rank == 1 else None; "
                      "sys.exit(3) if rank == 1 else time.sleep(60)")
    assert proc.returncode == 3 and time.monotonic() - t < 30
    # rank 1's output is not shown while it runs, but its last lines are when it fails
    assert ("[1] rank 1 fails here" in proc.stderr
            and "launch: rank 1 exited with status 3" in proc.stderr)


def test_signals_reach_every_child_once():
    script = CHILD + ("import signal\n"
                      "got = []\n"
                      "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
                      "print('ready', flush=True)\n"
                      "while not got: time.sleep(0.01)\n"
                      "time.sleep(0.3)\n"
                      "print('stopping after', len(got), 'signal(s)', flush=True)\n"
                      "sys.exit(128 + got[0])")
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.launch", "--nproc", "2", "--",
                             sys.executable, "-c", script], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = [proc.stdout.readline() for _ in range(2)]
    assert sorted(ready) == ["[0] ready\n", "[1] ready\n"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert sorted(out.splitlines()) == ["[0] stopping after 1 signal(s)",
                                        "[1] stopping after 1 signal(s)"]


# ---- training over 2 processes against 1 ----

# One process of 8 devices: the reference for both meshes, then the 2-process checkpoint of step 3
# resumed (compiled programs shared through the persistent cache).
REFERENCE = """
import sys
from jaxgpt import config as config_lib
from jaxgpt.train import loop as train
config, root = sys.argv[1], sys.argv[2]
def run(name, *overrides):
    train.train(config_lib.validate(config_lib.apply_overrides(
        config_lib.load_file(config), [f"train.out_dir={root}/{name}", *overrides])))
run("one-fsdp", "mesh.data=2", "mesh.fsdp=4")
run("one-tensor", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
run("resumed", "mesh.data=2", "mesh.fsdp=4", f"train.resume={root}/two-fsdp/checkpoints/3")
"""
MESHES = {"fsdp": ["mesh.data=2", "mesh.fsdp=4"],
          "tensor": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs_1_and_2(text_file, tmp_path_factory):
    """Each mesh trained 5 steps by `python -m jaxgpt.launch` over 2 processes of 4 CPU devices,
    then by one process of 8 devices; {name: (run directory, launcher result)}."""
    root = tmp_path_factory.mktemp("multihost")
    # 1 layer: compiling is most of the time here; no biases (multidevice_worker.py says why)
    cfg = tiny(text_file, root / "unused", model={"n_layer": 1, "bias": False},
               train={"steps": 5, "log_every": 1, "eval_every": 0, "eval_max_tokens": 512},
               checkpoint={"every": 3})
    config = root / "config.json"
    config.write_text(cfg.to_json())
    out = {}
    for name, mesh in MESHES.items():
        command = ["--nproc", "2", "--devices-per-proc", "4", "--", sys.executable, "-m",
                   "jaxgpt.train", str(config), f"train.out_dir={root / ('two-' + name)}", *mesh]
        out["two-" + name] = (root / ("two-" + name), run_launch(*command, timeout=300))
        assert out["two-" + name][1].returncode == 0, out["two-" + name][1].stderr[-3000:]
    env = clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8",
                    JAX_COMPILATION_CACHE_DIR=str(root / "xla-cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(config), str(root)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out.update({name: (root / name, None) for name in ("one-fsdp", "one-tensor", "resumed")})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_train_like_one(runs_1_and_2, mesh):
    one, two = rows(runs_1_and_2["one-" + mesh][0]), rows(runs_1_and_2["two-" + mesh][0])
    # process 0 alone writes the metrics: one row per step
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4, 5]
    diffs = ([abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=False)]
             + [abs(one[-1]["val_loss"] - two[-1]["val_loss"])])
    assert max(diffs) < 1e-5, (mesh, [r["loss"] for r in one], [r["loss"] for r in two])
    assert two[-1]["val_loss"] < two[0]["loss"]
    # and alone prints the summary (gloo prints lines of its own on stdout)
    launched = runs_1_and_2["two-" + mesh][1]
    summaries = [line for line in launched.stdout.splitlines() if line[4:5] == "{"]
    assert len(summaries) == 1 and summaries[0].startswith("[0] "), launched.stdout
    assert json.loads(summaries[0][4:]) == two[-1]


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(runs_1_and_2):
    one, resumed = rows(runs_1_and_2["one-fsdp"][0]), rows(runs_1_and_2["resumed"][0])
    assert [r["step"] for r in resumed] == [4, 5]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one[3:], resumed, strict=False)) < 1e-5


@pytest.mark.slow
def test_process_0_writes_the_export(runs_1_and_2):
    two_dir, one_dir = runs_1_and_2["two-fsdp"][0], runs_1_and_2["one-fsdp"][0]
    cfg = runs.saved_config(two_dir / "export")
    two, _, _ = runs.load_params(two_dir / "export", cfg)
    one, _, _ = runs.load_params(one_dir / "export", cfg)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=False)) < 1e-5
    assert not (two_dir / "export.tmp").exists()
