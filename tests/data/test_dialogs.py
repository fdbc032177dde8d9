"""Tests for jaxgpt.dialogs: the message format, readers and converters, the split by dialog."""
import json
from pathlib import Path

import pytest
from conftest import CONVERSATION, synthetic, write_lines

from jaxgpt.data import dialogs
from jaxgpt.data.dialogs import ChatDataError
from jaxgpt.errors import DataError

# ---- the message format ----

@pytest.mark.parametrize("conversation, problem", [
    ([], "non-empty list"),
    ([{"role": "user"}], "message 0 is not"),
    ([{"role": "bot", "content": "x"}], "role 'bot'; expected system, user or assistant"),
    ([{"role": "assistant", "content": "x"}],
     "message 0 has role 'assistant' where 'user' belongs"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "x"}],
     "message 1 has role 'system'"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
     "message 1 has role 'user'"),
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
     "no assistant message"),
])
def test_check_names_the_problem(conversation, problem):
    assert problem in dialogs.problem_with(conversation)


def test_check_accepts_well_formed():
    assert dialogs.problem_with(CONVERSATION) is None
    assert dialogs.problem_with(CONVERSATION[:4]) is None  # a trailing user message is fine
    assert dialogs.problem_with(CONVERSATION[:2], trainable=False) is None


# ---- converters ----

def test_read_jsonl_and_malformed_lines(tmp_path):
    good = json.dumps({"messages": CONVERSATION})
    named = json.dumps({"id": "d7", "messages": [{"role": "user", "content": "你好", "name": "x"},
                                                 {"role": "assistant", "content": "您好"}]},
                       ensure_ascii=False)
    no_reply = json.dumps({"messages": CONVERSATION[1:2]})
    path = write_lines(tmp_path / "chats.jsonl",
                       [good, "", named, "{not json", no_reply, json.dumps({"turns": []})])
    with pytest.raises(ChatDataError, match=r"chats\.jsonl:4: not JSON") as e:
        dialogs.read_jsonl(path)
    assert isinstance(e.value, DataError)
    loaded = dialogs.read_jsonl(path, skip_bad=True)
    assert loaded.conversations == [CONVERSATION, [{"role": "user", "content": "你好"},
                                                   {"role": "assistant", "content": "您好"}]]
    assert loaded.ids == [f"{path}:1", "d7"] and loaded.skipped == 3
    with pytest.raises(ChatDataError, match=r"b\.jsonl:5: it has no assistant message"):
        dialogs.read_jsonl(write_lines(tmp_path / "b.jsonl", [good, good, "", "", no_reply]))
    with pytest.raises(ChatDataError, match=r"c\.jsonl:2: expected \{\"messages\""):
        dialogs.read_jsonl(write_lines(tmp_path / "c.jsonl", [good, "[1, 2]"]))
    (tmp_path / "d.jsonl").write_bytes(good.encode() + b'\n\xff\xfe\n{"messages": []}\n')
    with pytest.raises(ChatDataError, match=r"d\.jsonl:2: not UTF-8"):
        dialogs.read_jsonl(tmp_path / "d.jsonl")
    assert dialogs.read_jsonl(tmp_path / "d.jsonl", skip_bad=True).skipped == 2


def test_read_sharegpt_jsonl_and_json_array(tmp_path):
    record = {"id": "s1", "conversations": [{"from": "system", "value": "Be brief."},
                                             {"from": "human", "value": "Hi"},
                                             {"from": "gpt", "value": "Hello!"}]}
    bad = {"conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "no"}]}
    expected = [CONVERSATION[0], CONVERSATION[1], CONVERSATION[2]]
    path = write_lines(tmp_path / "sg.jsonl", [json.dumps(record), json.dumps(bad)])
    with pytest.raises(ChatDataError, match=r"sg\.jsonl:2: message 0 has role 'assistant'"):
        dialogs.read_sharegpt(path)
    loaded = dialogs.read_sharegpt(path, skip_bad=True)
    assert loaded.conversations == [expected] and loaded.ids == ["s1"] and loaded.skipped == 1
    array = tmp_path / "sg.json"  # ShareGPT dumps are one JSON array; records are placed by line
    array.write_text(json.dumps([record, record,
                                 {"conversations": [{"from": "bot", "value": "?"}]}], indent=1))
    third = [i for i, line in enumerate(array.read_text().splitlines(), 1) if line == " {"][2]
    with pytest.raises(ChatDataError, match=rf"sg\.json:{third}: turn 0 is not") as e:
        dialogs.read_sharegpt(array)
    assert dialogs.read_sharegpt(array, skip_bad=True).conversations == [expected, expected]
    assert e.value.args[0].count("\n") == 0


def test_chitchat_gives_both_directions_of_the_first_dialog():
    import chitchat_dataset
    raw = json.loads(Path(chitchat_dataset.__file__).with_name("dataset.json").read_text())
    key, dialog = next(iter(raw.items()))
    turns = []  # (sender, text) with a speaker's consecutive lines joined
    for message in dialog["messages"]:
        texts = [u["text"].strip() for u in message if u["text"].strip()]
        if turns and turns[-1][0] == message[0]["sender"]:
            turns[-1] = (turns[-1][0], turns[-1][1] + "\n" + "\n".join(texts))
        elif texts:
            turns.append((message[0]["sender"], "\n".join(texts)))
    a, b = turns[0][0], turns[1][0]
    def expect(user, ts):
        return [{"role": "user" if s == user else "assistant", "content": t} for s, t in ts]
    a_user, b_user = expect(a, turns), expect(b, turns[1:])
    a_user, b_user = (c[:len(c) - (c[-1]["role"] == "user")] for c in (a_user, b_user))
    loaded = dialogs.read_chitchat(limit=2)
    assert loaded.conversations == [a_user, b_user] and loaded.ids == [f"chitchat:{key}"] * 2
    assert loaded.conversations[0][0]["content"] == "Hello\nHow are you doing today?"
    assert loaded.conversations[1][0]["content"] == loaded.conversations[0][1]["content"]
    assert len(a_user) >= 30 and all(dialogs.problem_with(c) is None for c in loaded.conversations)


def test_chatterbot_malformed_dialogs_name_file_and_line(tmp_path):
    (tmp_path / "xx").mkdir()
    (tmp_path / "xx" / "a.yml").write_text(
        "categories:\n- a\nconversations:\n- - no\n  - yes\n  - 3\n"
        "- - only one line\n- not a list - of lines\n", encoding="utf-8")
    with pytest.raises(ChatDataError, match=r"a\.yml:8: the dialog is not a list of lines"):
        dialogs.read_chatterbot(directory=tmp_path)
    loaded = dialogs.read_chatterbot(["xx"], directory=tmp_path, skip_bad=True)
    assert loaded.conversations == [[{"role": "user", "content": "no"},
                                     {"role": "assistant", "content": "yes"}]]
    assert loaded.ids == ["chatterbot:xx/a.yml:4"] and loaded.skipped == 2
    with pytest.raises(ChatDataError, match="no chatterbot language 'zz'"):
        dialogs.read_chatterbot(["zz"], directory=tmp_path)


def test_split_by_dialog_is_seeded():
    conversations = synthetic(10)
    train, val = dialogs.split(conversations, 0.3, seed=1)
    assert (len(val) == 3 and len(train) == 7
            and (train, val) == dialogs.split(conversations, 0.3, seed=1))
    assert [c for c in conversations if any(c is t for t in train)] == train  # input order kept
    assert dialogs.split(conversations, 0.0, 1) == (conversations, [])
    with pytest.raises(ChatDataError, match="val_fraction=1"):
        dialogs.split(conversations, 1, 0)
