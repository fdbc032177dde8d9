"""Several processes training one model on JAX's own runtime (jax.distributed), and a launcher of
N local processes.

    python -m jaxgpt.launch --nproc 2 --devices-per-proc 4 -- \\
        python -m jaxgpt.train CONFIG.py [key=value ...]

The launcher gives each child JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES
and JAX_PROCESS_ID; with --devices-per-proc K also
XLA_FLAGS=--xla_force_host_platform_device_count=K (K simulated CPU devices) and
JAX_LOCAL_DEVICE_IDS (its own K GPUs). Children's lines come prefixed with their rank ("[1] ..."),
or with --rank0-only only rank 0's are shown (another rank's last lines when it fails).
Ctrl-C / SIGTERM go to every child once; when a child fails on its own the others are stopped and
the launcher exits with that child's status.

`initialize(cfg.distributed)` is what each process runs first (train's command line does). On a
cluster start one process per host with the cluster's own tool (srun, a TPU slice's workers):
jax.distributed finds the coordinator and the process count by itself there.
"""
from __future__ import annotations

import collections
import glob
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import NoReturn

from jaxgpt.config import DistributedConfig
from jaxgpt.errors import ConfigError, JaxgptError

# What launch() sets for each child and initialize() reads (jax reads JAX_COORDINATOR_ADDRESS and
# JAX_LOCAL_DEVICE_IDS itself too; it has no variables for the count and the id).
ADDRESS, COUNT, RANK, DEVICES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                 "JAX_LOCAL_DEVICE_IDS")


# ---- each process: joining the others ----

def _env_int(env, name: str, default: int) -> int:
    try:
        return int(env.get(name) or default)
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r}: expected an integer") from None


def cluster(env, tpu_vm: bool | None = None) -> str:
    """The cluster that runs several processes here and that jax.distributed detects by itself, or
    ""."""
    if ("SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env
            and _env_int(env, "SLURM_NTASKS", 1) > 1):
        return "slurm"  # inside an srun step of more than one task
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in workers or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"  # a multi-host slice (GKE, Ray) or several slices
    # a Cloud TPU VM: its hosts are known only to the metadata server, which jax asks
    if tpu_vm is None:
        tpu_vm = importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or
                                                                          glob.glob("/dev/vfio/[0-9]*"))
    return "tpu" if tpu_vm else ""


def settings(cfg: DistributedConfig, env=None, tpu_vm: bool | None = None) -> dict | None:
    """The arguments of jax.distributed.initialize for this process, or None: a one-process run,
    which calls nothing. The config's fields win over the environment's; what neither gives is left
    to jax's detection (SLURM, Cloud TPU)."""
    env = os.environ if env is None else env
    if cfg.enabled == "off":
        return None
    address = cfg.coordinator_address or env.get(ADDRESS, "")
    count = cfg.num_processes or _env_int(env, COUNT, 0)
    rank = cfg.process_id if cfg.process_id >= 0 else _env_int(env, RANK, -1)
    given = {}
    if address:
        given["coordinator_address"] = address
    if count:
        given["num_processes"] = count
    if rank >= 0:
        given["process_id"] = rank
    if cfg.local_device_ids:
        try:
            given["local_device_ids"] = [int(i) for i in cfg.local_device_ids.split(",")]
        except ValueError:
            raise ConfigError(f"distributed.local_device_ids={cfg.local_device_ids!r}: "
                              "expected ids like 0,1") from None
    found = cluster(env, tpu_vm)
    if count == 1 or (not given and not found and cfg.enabled == "auto"):
        return None
    missing = [k for k in ("coordinator_address", "num_processes", "process_id") if k not in given]
    if missing and not found and (given or cfg.enabled == "on"):
        raise ConfigError(f"distributed: set {', '.join('distributed.' + k for k in missing)} "
                          f"(or {ADDRESS}, {COUNT}, {RANK}); outside SLURM and Cloud TPU "
                          "jax cannot find them")
    if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        # processes of one machine: listen on loopback only
        given["coordinator_bind_address"] = address
    return given


def initialize(cfg: DistributedConfig, env=None) -> bool:
    """Join the run's other processes (jax.distributed.initialize) when it has several; True if so.
    Must come before anything touches a jax backend (jax.devices(), any computation)."""
    kwargs = settings(cfg, env)
    if kwargs is None:
        return False
    import jax  # here, not above: the launcher itself never needs jax
    if jax.distributed.is_initialized():
        return True
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # CPU processes exchange data through gloo over TCP (jax's default now; said so in case it
        # changes)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=cfg.timeout_s)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"distributed: {(str(e).strip().splitlines() or [''])[0]}") from e
    return True


def exit_now(e: BaseException) -> NoReturn:
    """Exit at once after an error in one process of several, reported as the command line would
    report it. A normal exit would wait (up to 5 minutes) at jax.distributed's shutdown barrier for
    the other processes, which are waiting for this one; the launcher or the cluster stops them."""
    if isinstance(e, JaxgptError):
        print(f"error: {e}", file=sys.stderr)
        code = 2
    elif isinstance(e, SystemExit):
        code = e.code if isinstance(e.code, int) else 1
    else:
        traceback.print_exception(e)
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(name: str) -> None:
    """Wait until every process gets here (with one process: nothing)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def largest(value: int) -> int:
    """The largest `value` over all processes, which every process must call: a decision they
    share."""
    import jax
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


# ---- the launcher ----

USAGE = ("usage: python -m jaxgpt.launch --nproc N [--devices-per-proc K] [--rank0-only] -- "
         "COMMAND [ARG ...]")


def parse(argv: list[str]) -> tuple[int, int, bool, list[str]]:
    """(nproc, devices per process or 0, rank 0's output only, the command)."""
    if "--" not in argv:
        raise ConfigError(f"no command: put it after `--` ({USAGE})")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    values = {"--nproc": 0, "--devices-per-proc": 0}
    rank0_only, i = False, 0
    while i < len(options):
        name, _, value = options[i].partition("=")
        if name == "--rank0-only" and not value:
            rank0_only = True
        elif name in values:
            if not value:
                i += 1
                value = options[i] if i < len(options) else ""
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{name} {value!r}: expected a positive integer")
            values[name] = int(value)
        else:
            raise ConfigError(f"unknown option {options[i]!r} ({USAGE})")
        i += 1
    if not values["--nproc"]:
        raise ConfigError(f"--nproc N is required ({USAGE})")
    if not command:
        raise ConfigError(f"no command after `--` ({USAGE})")
    return values["--nproc"], values["--devices-per-proc"], rank0_only, command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(rank: int, nproc: int, devices: int, port: int, base=None) -> dict:
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines as they come, not when a pipe's buffer fills
    if nproc > 1:
        env.update({ADDRESS: f"127.0.0.1:{port}", COUNT: str(nproc), RANK: str(rank)})
    if devices:
        flag = "--xla_force_host_platform_device_count"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
        env["XLA_FLAGS"] = " ".join(flags + [f"{flag}={devices}"])
        if nproc > 1:
            env[DEVICES] = ",".join(str(rank * devices + d) for d in range(devices))
    return env


# one whole line at a time on the launcher's stdout/stderr, whatever rank it is from
_WRITE = threading.Lock()


def _pump(pipe, out, prefix: bytes, tail) -> None:
    """Copy a child's output with `prefix` at the start of each line (a \\r ends one too: progress
    bars), or keep its last lines in `tail` when `out` is None. A piece of a line waits for its end
    (or the pipe's, which ends it), so two ranks' lines never mix when a child writes one in
    pieces."""
    pending = b""
    for chunk in iter(lambda: pipe.read1(65536), b""):
        *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)  # each line keeps its end
        _emit(out, prefix, lines, tail)
    # an unended last line: ended here
    _emit(out, prefix, [pending + b"\n"] if pending else [], tail)
    pipe.close()


def _emit(out, prefix: bytes, lines: list[bytes], tail) -> None:
    if not lines:
        return
    if out is None:
        tail.extend(b"".join(lines).decode(errors="replace").splitlines())
        return
    with _WRITE:
        out.write(b"".join(prefix + line for line in lines))
        out.flush()


def _status(returncode: int) -> int:
    # killed by signal N: 128 + N, as a shell says
    return returncode if returncode > 0 else 128 - returncode


def launch(nproc: int, devices: int, command: list[str], rank0_only: bool = False,
           grace_s: float = 10.0) -> int:
    """Run `command` as ranks 0..nproc-1; the exit status: 0, or the first failed rank's."""
    port = free_port()
    children, pumps, tails = [], [], []
    stopping = []  # signals the user sent: the children then stop on their own (train saves first)

    def forward(signum, frame):
        stopping.append(signum)
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = None
    try:
        for rank in range(nproc):
            # each in its own session: a terminal's Ctrl-C reaches the launcher alone, which
            # forwards it once
            try:
                child = subprocess.Popen(command, env=child_env(rank, nproc, devices, port),
                                         start_new_session=True, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
            except OSError as e:
                _stop(children, 0)
                raise ConfigError(f"cannot start {command[0]!r}: {e.strerror or e}") from None
            children.append(child)
            tails.append(collections.deque(maxlen=20))
            shown = not rank0_only or rank == 0
            prefix = b"" if rank0_only else f"[{rank}] ".encode()
            for pipe, out in ((child.stdout, sys.stdout.buffer), (child.stderr, sys.stderr.buffer)):
                pumps.append(threading.Thread(target=_pump, daemon=True,
                                              args=(pipe, out if shown else None, prefix,
                                                    tails[-1])))
                pumps[-1].start()
        while failed is None and None in [c.poll() for c in children]:  # a list: poll every child
            failed = next((r for r, c in enumerate(children) if c.returncode), None)
            time.sleep(0.05)
        if failed is not None and not stopping:
            _stop(children, grace_s)  # it failed on its own: the others would wait for it forever
        for c in children:
            c.wait()
        failed = (next((r for r, c in enumerate(children) if c.returncode), None)
                  if failed is None else failed)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in pumps:
            p.join(5)
    if failed is None:
        return 0
    status = _status(children[failed].returncode)
    if rank0_only and failed:
        sys.stderr.write("".join(f"[{failed}] {line}\n" for line in tails[failed]))
    print(f"launch: rank {failed} exited with status {status}"
          + ("" if stopping else "; stopped the others"), file=sys.stderr)
    return status


def _stop(children, grace_s: float) -> None:
    """SIGTERM to the children still running, SIGKILL to those still there after `grace_s`: one
    blocked in a collective with the dead rank never gets to its signal handler."""
    alive = [c for c in children if c.poll() is None]
    for c in alive:
        c.terminate()
    deadline = time.monotonic() + grace_s
    for c in alive:
        try:
            c.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        sys.exit(0)
    try:
        nproc, devices, rank0_only, command = parse(argv)
        sys.exit(launch(nproc, devices, command, rank0_only))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
