"""experiments/gpu_check.sh at toy size on the CPU (GPU_CHECK_SMOKE=1): every step of the script
runs and lands in its JSON table, so the one run a lent GPU gets is not spent on a broken script."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_step_and_writes_its_table(tmp_path):
    env = subprocess_env(GPU_CHECK_SMOKE="1", PYTHON=sys.executable, OUT=str(tmp_path),
                         PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", str(REPO / "experiments/gpu_check.sh")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads((tmp_path / "gpu_check.json").read_text())
    assert table == json.loads(out.stdout[out.stdout.index("{"):])
    # each implementation, then the variants beside the first: packed documents, the whole logits,
    # fp32 logits, twice the batch (on a CPU the update is skipped by a cond in every row; the
    # variant names it, a GPU's default selects)
    assert [(row["kernels"], row["batch"], row["segments"], row["loss_chunks"],
             row["logits_dtype"], row["skip_update"]) for row in table["train"]] == [
        ("xla", 4, False, 8, "bfloat16", "cond"), ("xla", 4, True, 8, "bfloat16", "cond"),
        ("xla", 4, False, 8, "bfloat16", "cond"), ("xla", 4, False, 0, "bfloat16", "cond"),
        ("xla", 4, False, 8, "float32", "cond"), ("xla", 8, False, 8, "bfloat16", "cond"),
        ("xla", 8, False, 8, "bfloat16", "cond")]
    # the last one (twice the batch) under the script's extra XLA flag (on a GPU, Triton's matmuls
    # off), beside the inherited ones
    assert ["--xla_cpu_enable_fast_math=false" in row["xla_flags"].split()
            for row in table["train"]] == [False] * 6 + [True]
    for train in table["train"]:
        assert (train["tokens_per_s"] > 0 and math.isfinite(train["final_loss"])
                and 0 < train["mfu"] < 1)
    (plan,) = table["compile"]
    assert plan["estimate_gb"]["total"] > 0 and plan["xla_bytes"]["temporaries"] > 0
    assert [(row["batch"], row["decode_steps"], row["cache_window"])
            for row in table["generate"]] == [
        (1, 8, "auto"), (2, 8, "auto"), (1, 1, "auto"), (2, 1, "auto"), (1, 8, "whole"),
        (2, 8, "whole")] + [(1, 8, "auto"), (2, 8, "auto")] * 2
    # the last four: SmolLM2's shape (toy-sized here), its weights as they are and in int8
    assert [row["weights"] for row in table["generate"]] == ["float"] * 8 + ["int8"] * 2
    assert all(row["tok_per_s"] > 0 for row in table["generate"])
    # the first train row, its last variant and the decode rows were traced: their busiest ops, and
    # the traces kept
    assert (["busiest_ops" in row for row in table["train"]]
            == [True, False, False, False, False, True, False])
    assert [len(row.get("busiest_ops", ())) for row in table["generate"]] == [8, 8] + [0] * 8
    assert sorted(p.name for p in tmp_path.glob("*_trace.json.gz")) == [
        "generate_batch1_trace.json.gz", "generate_batch2_trace.json.gz",
        "train_xla_larger_trace.json.gz", "train_xla_trace.json.gz"]
    # the rows as they came, for a run stopped at the device's limit: every train step first,
    # decoding last
    came = [json.loads(line)["bench"]
            for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert came == ["train"] * 7 + ["compile"] + ["generate"] * 10
