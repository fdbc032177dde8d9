"""Tests for jaxgpt.data.tasks: the built-in tasks with exact answers."""
import pytest

from jaxgpt.data import tasks
from jaxgpt.errors import ConfigError


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_are_fixed_distinct_and_disjoint(task):
    val, train = tasks.problems(task, "val", 200), tasks.problems(task, "train", 800)
    assert val == tasks.problems(task, "val", 200)
    assert train[:10] == tasks.problems(task, "train", 10)
    assert len({p.prompt for p in val}) == 200 and len({p.prompt for p in train}) == 800
    assert not {p.prompt for p in val} & {p.prompt for p in train}


def test_answers_are_right():
    for p in tasks.problems("arithmetic", "val", 200):
        a, op, b = p.prompt.removeprefix("What is ").split("?")[0].split()
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    for p in tasks.problems("spelling", "val", 200):
        letter, word = p.prompt.split("'")[1], p.prompt.split("'")[3]
        assert int(p.answer) == word.count(letter)
    assert tasks.problems("arithmetic", "val", 1)[0] == tasks.Problem(
        "What is 936 + 1510? Answer with the number.", "2446")


def test_reward_reads_the_last_number_of_the_reply():
    p = tasks.Problem("What is 1200 + 34?", "1234")
    assert tasks.reward(p, "1200 + 34 = 1234") == 1.0
    assert tasks.reward(p, "It is 1,234.") == 1.0
    assert tasks.reward(p, "1234? No: 1235") == 0.0
    assert tasks.reward(p, "I don't know") == 0.0
    assert tasks.last_number("from -3 to 7.") == "7" and tasks.last_number("-12") == "-12"


def test_bad_names_are_refused():
    with pytest.raises(ConfigError, match="task 'chess': expected one of arithmetic, spelling"):
        tasks.problems("chess", "val", 1)
    with pytest.raises(ConfigError, match="task split 'test': expected train or val"):
        tasks.problems("spelling", "test", 1)
    with pytest.raises(ConfigError, match="the held-out set has 200 problems, 201 asked"):
        tasks.problems("spelling", "val", 201)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_samples_are_fixed_by_seed_and_never_held_out(task):
    got = tasks.sample(task, 7, 300)
    assert got == tasks.sample(task, 7, 300) != tasks.sample(task, 8, 300)
    assert not {p.prompt for p in got} & {p.prompt for p in tasks.problems(task, "val", 200)}
    for p in got[:20]:
        assert tasks.reward(p, f"It is {p.answer}.") == 1.0
