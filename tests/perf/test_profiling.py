"""profiling.py on XLA:CPU: a traced program's ops summed per run, busiest first."""
import jax
import jax.numpy as jnp
import pytest

from jaxgpt.perf import profiling


def test_busiest_ops_sum_each_ops_time_per_run(tmp_path):
    step = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b)
    a = jnp.ones((256, 256))
    step(a, a).block_until_ready()
    with profiling.trace(tmp_path):
        for _ in range(4):
            step(a, a).block_until_ready()
    events = profiling.op_events(tmp_path)
    assert len(events) % 4 == 0 and events and all(us >= 0 for _, _, us in events)
    rows = profiling.busiest_ops(tmp_path, runs=4)
    assert [r["ms_per_run"] for r in rows] == sorted((r["ms_per_run"] for r in rows), reverse=True)
    # every op of the program ran once per run, and the shares cover all op time
    assert {r["calls_per_run"] for r in rows} == {1.0}
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-3)
    assert profiling.total_ms(tmp_path, 4) == pytest.approx(sum(r["ms_per_run"] for r in rows),
                                                            abs=0.01)
    assert profiling.busiest_ops(tmp_path, runs=4, top=1) == rows[:1]


def test_a_directory_without_a_trace_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no perfetto_trace.json.gz"):
        profiling.op_events(tmp_path)
