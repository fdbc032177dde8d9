"""Tests for jaxgpt.feedback: the SQLite store (concurrent writers, a kill mid-write, bad files),
its judgements and what export makes of them (golden SFT conversations and pairs)."""
import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxgpt import feedback as feedback_command
from jaxgpt.data import dialogs
from jaxgpt.serve import feedback, feedback_export
from jaxgpt.serve.feedback import Feedback, FeedbackError

REPO = Path(__file__).resolve().parents[2]
A = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
B = [{"role": "user", "content": "2+2?"}]
C = [{"role": "user", "content": "bye"}]


def reply(text, finish_reason="stop", index=0, **more):
    """What replies.Reply gives feedback (the fields it reads)."""
    return SimpleNamespace(index=index, text=text, finish_reason=finish_reason, **more)


def record(fb, cid, messages, *replies, source="api", **start):
    fb.record(cid, messages, list(replies), model="tiny", source=source, **start)


def count(db, sql="SELECT count(*) FROM replies"):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchone()[0]


def test_16_threads_writing_at_once_lose_no_row_and_the_file_is_in_wal_mode(tmp_path):
    db = tmp_path / "feedback.db"
    per_thread, errors, ids = 40, [], []
    with Feedback(db) as fb:
        start = threading.Barrier(16)

        def work(t):
            try:
                start.wait()
                for i in range(per_thread):
                    cid = f"c{t}-{i}"
                    fb.start(cid, A, model="tiny", source="api", sampling={"seed": i})
                    fb.finish(cid, [reply(f"reply {t} {i}")])
                    ids.append(fb.judge(cid, rating="up" if i % 2 else "down"))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert (count(db) == count(db, "SELECT count(*) FROM replies WHERE reply IS NOT NULL")
            == 16 * per_thread)
    assert count(db, "SELECT count(*) FROM judgements") == 16 * per_thread == len(set(ids))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert feedback_export.stats(db)["judgements"] == {"up": 320, "down": 320, "better": 0,
                                                       "edit": 0}


def golden_database(db):
    """A hand-made history: every rule of export once (see the expected values below)."""
    with Feedback(db) as fb:
        record(fb, "r1", A, reply("hello"), source="page")
        record(fb, "r2", A, reply("hey"), source="page", replaces="r1")
        record(fb, "r3", A, reply("yo", "length"))            # liked, but cut: no SFT
        record(fb, "r4", B, reply("5"))                        # edited
        record(fb, "r5", B, reply("four"))                     # up, then down
        record(fb, "r6", C, reply("bye!", "content_filter", screened="blocked: 'bye'"))
        record(fb, "r7", C, reply("ci", "error"))              # a failed generation
        record(fb, "r8", C, reply("see you", index=0), reply("later", index=1))  # n=2
        fb.start("r9", A, model="tiny", source="talk")         # never finished
        fb.judge("r1", rating="up")
        fb.judge("r2", rating="down")
        # the same pair as up x down: written once
        fb.judge("r1", better_than="r2")
        fb.judge("r3", rating="up")
        fb.judge("r4", edit="4")
        fb.judge("r5", rating="up")
        fb.judge("r5", rating="down")                          # the latest counts
        fb.judge("r6", rating="up")
        fb.judge("r7", rating="down")
        fb.judge("r8", index=1, better_than="r8", better_than_index=0)
        fb.judge("r9", rating="up")


SFT = [{"id": "r1", "messages": A + [{"role": "assistant", "content": "hello"}]},
       {"id": "r4", "messages": B + [{"role": "assistant", "content": "4"}]}]
PAIRS = [{"messages": A, "chosen": "hello", "rejected": "hey"},     # better
         {"messages": C, "chosen": "later", "rejected": "see you"},  # better, between two choices
         {"messages": B, "chosen": "4", "rejected": "5"},            # the edit
         {"messages": A, "chosen": "yo", "rejected": "hey"}]         # up x down, same context


def test_export_gives_the_expected_conversations_and_pairs(tmp_path):
    db = tmp_path / "feedback.db"
    golden_database(db)
    counts = feedback_export.write_datasets(db, tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl")
    assert counts == {"sft": 2, "pairs": 4}
    assert [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()] == SFT
    assert [json.loads(line)
            for line in (tmp_path / "pairs.jsonl").read_text().splitlines()] == PAIRS
    loaded = dialogs.load(f"jsonl:{tmp_path / 'sft.jsonl'}")  # what data.chat=jsonl:PATH reads
    assert loaded.conversations == [c["messages"] for c in SFT] and loaded.ids == ["r1", "r4"]
    stats = feedback_export.stats(db)
    assert stats["replies"] == 10 and stats["unfinished"] == 1
    # r8: two rows and stats["export"] == counts
    assert stats["by_source"] == {"api": 7, "page": 2, "talk": 1}
    assert stats["judgements"] == {"up": 5, "down": 3, "better": 2, "edit": 1}
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT source, replaces, finish_reason, screened FROM replies "
                           "WHERE id='r2'").fetchone()
        assert row == ("page", "r1", "stop", None)
        assert (conn.execute("SELECT screened FROM replies WHERE id='r6'").fetchone()[0]
                == "blocked: 'bye'")


def test_the_sft_export_trains_as_data_chat(tmp_path):
    from jaxgpt.config import Config
    from jaxgpt.data import tokens as data
    from jaxgpt.data.tokenizer import Tokenizer

    db = tmp_path / "feedback.db"
    golden_database(db)
    feedback_export.write_datasets(db, sft=tmp_path / "sft.jsonl")
    cfg = Config()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                            chat=f"jsonl:{tmp_path / 'sft.jsonl'}",
                                                            batch_size=2, val_fraction=0.0),
                              model=dataclasses.replace(cfg.model, seq_len=64))
    batches = data.open_batches(
        cfg, Tokenizer.from_spec("char", corpus="abcdefghijklmnopqrstuvwxyz 2+?!45"))
    batch = batches.batch_at(0)
    assert batch["inputs"].shape == (2, 64) and batch["loss_mask"].sum() > 0


def test_the_command_line_exports_and_counts(tmp_path, run_env):
    db = tmp_path / "feedback.db"
    golden_database(db)
    out = subprocess.run([sys.executable, "-m", "jaxgpt.feedback", "export", str(db),
                          f"export.sft={tmp_path}/s.jsonl", f"export.pairs={tmp_path}/p.jsonl"],
                         cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"sft": 2, "pairs": 4, "sft_file": f"{tmp_path}/s.jsonl",
                                      "pairs_file": f"{tmp_path}/p.jsonl"}
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == PAIRS


def test_stats_help_and_errors_from_main(tmp_path, capsys):
    db = tmp_path / "feedback.db"
    golden_database(db)
    feedback_command.main(["stats", str(db)])
    assert json.loads(capsys.readouterr().out)["export"] == {"sft": 2, "pairs": 4}
    with pytest.raises(SystemExit) as exit_:
        feedback_command.main(["export", "--help"])
    assert exit_.value.code == 0 and "export.pairs=" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("not a database at all\n" * 20)
    for argv in (["stats", str(tmp_path / "notes.txt")], ["export", str(db)],
                 ["export", str(tmp_path / "missing.db"), "export.sft=x.jsonl"]):
        with pytest.raises(SystemExit) as exit_:
            feedback_command.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "missing.db").exists()  # reading never makes a database


def test_judgements_are_checked_and_an_unknown_id_is_refused(tmp_path):
    with Feedback(tmp_path / "feedback.db") as fb:
        record(fb, "x", A, reply("hello"))
        record(fb, "y", B, reply("4"))
        cases = [(dict(completion_id="nope", rating="up"), "completion_id", 404),
                 (dict(completion_id="x", better_than="nope"), "better_than", 404),
                 (dict(completion_id="x", index=1, rating="up"), "completion_id", 404),
                 # another conversation
                 (dict(completion_id="x", better_than="y"), "better_than", 400),
                 (dict(completion_id="x", better_than="x"), "better_than", 400),
                 (dict(completion_id="x", rating="meh"), "rating", 400),
                 (dict(completion_id="x"), "rating", 400),
                 (dict(completion_id="x", rating="up", edit="hi"), "edit", 400),
                 (dict(completion_id="x", edit="  "), "edit", 400),
                 (dict(completion_id="x", edit=3), "edit", 400),
                 (dict(completion_id="x", rating="up", index=-1), "index", 400),
                 (dict(completion_id=7, rating="up"), "completion_id", 400),
                 (dict(rating="up"), "completion_id", 400)]
        for body, field, status in cases:
            with pytest.raises(FeedbackError) as e:
                fb.judge_request(body)
            assert (e.value.field, e.value.status) == (field, status), body
            assert str(e.value).startswith(f"{field}: ") and "\n" not in str(e.value)
        assert fb.judge_request({"completion_id": "x", "rating": "up"}) == {
            "id": 1, "object": "feedback", "completion_id": "x", "kind": "up"}
        with pytest.raises(FeedbackError, match="source: "):
            fb.start("z", A, model="tiny", source="elsewhere")
        with pytest.raises(FeedbackError, match="messages: "):
            fb.start("z", [{"role": "bot", "content": "?"}], model="tiny", source="api")
    # nothing refused was written
    assert count(tmp_path / "feedback.db", "SELECT count(*) FROM judgements") == 1


def test_an_older_schema_another_database_or_a_text_file_is_one_line_naming_the_file(tmp_path):
    old = tmp_path / "old.db"
    # as a version 0 would have been: our application id, user_version 0
    with sqlite3.connect(old) as conn:
        conn.execute(f"PRAGMA application_id={feedback.APPLICATION_ID}")
        conn.execute("CREATE TABLE conversations (id TEXT, body TEXT)")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    text = tmp_path / "feedback.txt"
    text.write_text("SQLite format 2? no: " + "x" * 200)
    for path, words in ((old, "schema version 0"), (other, "not a jaxgpt feedback database"),
                        (text, "not a usable SQLite database")):
        for open_it in (Feedback, feedback_export.stats):
            with pytest.raises(FeedbackError) as e:
                open_it(path)
            assert (str(e.value).startswith(f"{path}: ") and words in str(e.value)
                    and "\n" not in str(e.value))
    assert text.read_text().startswith("SQLite format 2?")  # left as it was


def test_a_writer_killed_mid_write_loses_nothing_it_committed(tmp_path, run_env):
    db = tmp_path / "feedback.db"
    script = ("import sys\nfrom types import SimpleNamespace as R\n"
              "from jaxgpt.serve.feedback import Feedback\n"
              "fb, i = Feedback(sys.argv[1]), 0\n"
              "while True:\n"
              "    for _ in range(25):\n"
              "        fb.record(f'c{i}', [{'role': 'user', 'content': 'x' * 300}],\n"
              "                  [R(index=0, text='y' * 3000, finish_reason='stop')], "
              "model='m', source='api')\n"
              "        i += 1\n"
              "    fb.flush()\n"
              "    print(i, flush=True)\n"
              "    if i == 100: assert 'jax' not in sys.modules\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(db)], cwd=REPO, env=run_env(),
                             stdout=subprocess.PIPE, text=True)
    committed = 0
    while committed < 400:
        line = child.stdout.readline()
        assert line, "the writer died"
        committed = int(line)
    child.send_signal(signal.SIGKILL)  # in the middle of a later batch, most likely
    child.wait(30)
    assert child.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert count(db, "SELECT count(*) FROM replies WHERE reply IS NOT NULL") >= committed
    with Feedback(db) as fb:  # and it takes more
        assert fb.judge("c0", rating="up") == 1


def test_the_default_place_is_the_run_directory(tmp_path):
    run = tmp_path / "runs" / "tiny"
    (run / "export" / "params").mkdir(parents=True)
    (run / "checkpoints" / "30").mkdir(parents=True)
    converted = tmp_path / "models" / "gpt2"
    (converted / "params").mkdir(parents=True)
    for source in (run, run / "export", run / "checkpoints", run / "checkpoints" / "30"):
        assert feedback.default_path(source) == run / "feedback.db"
    assert feedback.default_path(converted) == tmp_path / "models" / "feedback.db"
