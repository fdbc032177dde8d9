"""Tests for jaxgpt.chat: the chat template, loss mask, truncation, packing and the command line."""
import json
import random

import numpy as np
import pytest
from conftest import CONVERSATION, synthetic, write_lines

from jaxgpt import chat as chat_command
from jaxgpt.data import chat, dialogs
from jaxgpt.data.chat import (
    ChatBatches,
    ChatDataError,
    first_fit,
    pack,
    render,
    render_truncated,
    render_windows,
)
from jaxgpt.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def byte():
    return Tokenizer.from_spec("byte")


def special(tok, name):
    return tok.special_id(f"<|{name}|>")


def as_text(conversation):
    return "<|bos|>" + "".join(f"<|{m['role']}_start|>{m['content']}<|{m['role']}_end|>"
                               for m in conversation)


def unpack(batch, b, end_id):
    """The token lists of the conversations in row b, rebuilt from inputs, targets and
    segment_ids."""
    tokens, segments = batch["inputs"][b].tolist(), batch["segment_ids"][b].tolist()
    # the row's last token continues the last conversation
    if tokens[-1] != end_id and segments[-1]:
        tokens, segments = tokens + [int(batch["targets"][b][-1])], segments + [segments[-1]]
    return [[t for t, s in zip(tokens, segments, strict=False) if s == k]
            for k in sorted(set(segments) - {0})]


# ---- the chat template and the loss mask ----

def test_render_ids_and_loss_mask_token_by_token(byte):
    ids, mask = render(CONVERSATION, byte)
    enc = byte.encode
    expected = [(special(byte, "bos"), 0), (special(byte, "system_start"), 0),
                *[(t, 0) for t in enc("Be brief.")], (special(byte, "system_end"), 0),
                (special(byte, "user_start"), 0), *[(t, 0) for t in enc("Hi")],
                (special(byte, "user_end"), 0),
                (special(byte, "assistant_start"), 0), *[(t, 1) for t in enc("Hello!")],
                (special(byte, "assistant_end"), 1),
                (special(byte, "user_start"), 0), *[(t, 0) for t in enc("2+2?")],
                (special(byte, "user_end"), 0),
                (special(byte, "assistant_start"), 0), (enc("4")[0], 1),
                (special(byte, "assistant_end"), 1)]
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    assert ids.tolist() == [t for t, _ in expected]
    assert mask.tolist() == [bool(m) for _, m in expected]
    assert byte.decode(ids) == as_text(CONVERSATION)
    assert byte.decode(ids[mask]) == "Hello!<|assistant_end|>4<|assistant_end|>"


def test_render_for_generation_prompts_the_reply(byte):
    ids, mask = render(CONVERSATION[:4], byte, for_generation=True)
    assert byte.decode(ids) == as_text(CONVERSATION[:4]) + "<|assistant_start|>"
    assert ids[-1] == special(byte, "assistant_start") and not mask[-1]
    assert mask.tolist() == render(CONVERSATION[:4], byte)[1].tolist() + [False]
    with pytest.raises(ChatDataError, match="last message must be the user's"):
        render(CONVERSATION, byte, for_generation=True)


def test_mask_marks_targets_after_packing(byte):
    """loss_mask[j] is 1 exactly where targets[j] (predicted from inputs[:j+1]) is an assistant
    token."""
    ids, mask = render(CONVERSATION, byte)
    batch = pack([(ids, mask)], seq_len=len(ids) - 1, batch_size=1)
    assert (batch["inputs"][0].tolist() == ids[:-1].tolist()
            and batch["targets"][0].tolist() == ids[1:].tolist())
    assert batch["loss_mask"][0].tolist() == mask[1:].astype(float).tolist()
    trained = batch["targets"][0][batch["loss_mask"][0] == 1]
    assert byte.decode(trained) == "Hello!<|assistant_end|>4<|assistant_end|>"


def test_chinese_conversations_round_trip_through_the_template(byte):
    loaded = dialogs.read_chatterbot(["chinese"])
    assert len(loaded.conversations) == 467 and loaded.skipped == 0
    assert loaded.conversations[0][0] == {"role": "user", "content": "什么是ai"}
    assert max(map(len, loaded.conversations)) > 2
    corpus = "".join(m["content"] for c in loaded.conversations for m in c)
    for tok in (byte, Tokenizer.from_spec("char", corpus=corpus)):
        for conversation in loaded.conversations:
            ids, mask = render(conversation, tok)
            assert tok.decode(ids) == as_text(conversation)
            assert tok.decode(ids[mask]) == "".join(m["content"] + "<|assistant_end|>"
                                                    for m in conversation
                                                    if m["role"] == "assistant")


# ---- truncation ----

def test_truncation_drops_oldest_pairs_and_keeps_the_system(byte):
    long = CONVERSATION + [{"role": "user", "content": "And 3+3?"},
                           {"role": "assistant", "content": "Six, a long reply."}]
    full = render(long, byte)[0]
    assert render_truncated(long, byte, len(full) - 1)[0].tolist() == full.tolist()  # fits exactly
    two_pairs = long[:1] + long[3:]
    n = len(render(two_pairs, byte)[0])
    for seq_len in (n - 1, len(full) - 2):  # just fits two pairs, or one token short of all three
        assert (render_truncated(long, byte, seq_len)[0].tolist()
                == render(two_pairs, byte)[0].tolist())
    last = long[:1] + long[5:]
    ids, mask = render_truncated(long, byte, n - 2)
    assert ids.tolist() == render(last, byte)[0].tolist()
    # the trained reply is whole
    assert byte.decode(ids[mask]) == "Six, a long reply.<|assistant_end|>"
    # never split the reply
    assert render_truncated(long, byte, len(render(last, byte)[0]) - 2) is None


def test_truncation_without_system_and_trailing_user(byte):
    conversation = CONVERSATION[1:] + [{"role": "user", "content": "unanswered"}]
    assert (render_truncated(conversation, byte, 1000)[0].tolist()
            == render(CONVERSATION[1:], byte)[0].tolist())
    last = CONVERSATION[3:5]
    ids, _ = render_truncated(conversation, byte, len(render(last, byte)[0]) - 1)
    assert byte.decode(ids) == as_text(last)


def test_windows_keep_every_reply_that_fits(byte):
    long = CONVERSATION + [{"role": "user", "content": "x" * 50},
                           {"role": "assistant", "content": "too long to fit"},
                           {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Bye!"},
                           {"role": "user", "content": "unanswered"}]
    system, pairs = long[:1], [long[1:3], long[3:5], long[5:7], long[7:9]]
    # two short pairs fit, the long one never
    seq_len = len(render(system + pairs[0] + pairs[1], byte)[0]) - 1
    windows = render_windows(long, byte, seq_len)
    assert [byte.decode(ids) for ids, _ in windows] == [as_text(system + pairs[0] + pairs[1]),
                                                        as_text(system + pairs[3])]
    assert byte.decode(windows[-1][0]) == byte.decode(render_truncated(long, byte, seq_len)[0])
    assert [byte.decode(ids[mask]) for ids, mask in windows] == [
        "Hello!<|assistant_end|>4<|assistant_end|>", "Bye!<|assistant_end|>"]
    assert render_windows(long, byte, 1000)[0][0].tolist() == render(long[:9], byte)[0].tolist()
    batches = ChatBatches([long, CONVERSATION], byte, seq_len, 2, seed=0, windows=True)
    assert len(batches.train) == 3 and batches.train.dropped == 0


def byte_with_format(chat_format, default_system=""):
    """Bytes plus the special tokens a chat format writes (as an imported model's tokenizer has
    them), and the system message its template writes when there is none."""
    names = sorted(chat.CHAT_FORMATS[chat_format].tokens()
                   - set(chat.CHAT_FORMATS["jaxgpt"].tokens()))
    return Tokenizer(f"byte-{chat_format}", pattern=Tokenizer.from_spec("byte").pattern,
                     ranks={bytes([i]): i for i in range(256)},
                     specials={name: 256 + i for i, name in enumerate(names)},
                     chat_format=chat_format, default_system=default_system)


@pytest.mark.parametrize("chat_format", ["jaxgpt", "chatml", "llama3"])
def test_truncation_keeps_the_most_pairs_that_fit_in_every_format(chat_format):
    """For every context length, render_truncated keeps the system message and the most newest
    pairs whose rendering fits (what trying each in turn finds), and render_windows ends with that
    window."""
    tok = byte_with_format(chat_format)
    long = CONVERSATION + [{"role": "user", "content": "And 3+3?"},
                           {"role": "assistant", "content": "Six!"},
                           {"role": "user", "content": "unanswered"}]
    # all pairs, the newest two, the newest one
    candidates = [long[:1] + long[1 + 2 * k:7] for k in range(3)]
    lengths = [len(render(c, tok)[0]) for c in candidates]
    for seq_len in range(lengths[-1] - 3, lengths[0] + 2):
        fits = [c for c, n in zip(candidates, lengths, strict=False) if n <= seq_len + 1]
        got = render_truncated(long, tok, seq_len)
        if not fits:
            assert got is None
            continue
        ids, mask = got
        assert (ids.tolist() == render(fits[0], tok)[0].tolist()
                and mask.tolist() == render(fits[0], tok)[1].tolist())
        assert render_windows(long, tok, seq_len)[-1][0].tolist() == ids.tolist()
    prompt = chat.render_prompt(long, tok, 10_000)
    assert prompt.tolist() == render(long, tok, for_generation=True)[0].tolist()


@pytest.mark.parametrize("chat_format", ["jaxgpt", "chatml", "llama3"])
def test_a_default_system_message_is_laid_out_as_the_system_message(chat_format):
    """A tokenizer's default system message leads every rendering of a conversation without one,
    untrained, exactly as that message written out would, and truncation keeps it; a conversation
    with its own system message keeps that one alone."""
    tok, plain = byte_with_format(chat_format, "Be brief."), byte_with_format(chat_format)
    long = CONVERSATION + [{"role": "user", "content": "And 3+3?"},
                           {"role": "assistant", "content": "Six!"},
                           {"role": "user", "content": "unanswered"}]
    without, written = long[1:], long  # CONVERSATION's system message is "Be brief."
    ids, mask = render(without[:4], tok)
    assert (ids.tolist() == render(written[:5], plain)[0].tolist()
            and mask.tolist() == render(written[:5], plain)[1].tolist())
    lay = chat.layout(tok)
    n_system = len(lay.bos) + lay.overhead("system") + len(b"Be brief.")
    assert ids[len(lay.bos):n_system].tolist() == (lay.start["system"] + list(b"Be brief.")
                                                    + lay.end["system"])
    assert (not mask[:n_system].any()
            and mask.sum() == len(b"Hello!4") + 2 * len(lay.end["assistant"]))
    assert (render(without, tok, for_generation=True)[0].tolist()
            == render(written, plain, for_generation=True)[0].tolist())
    for n in range(len(render(written, plain)[0]) + 2):
        got, want = chat.render_prompt(without, tok, n), chat.render_prompt(written, plain, n)
        assert (got is None and want is None) or got.tolist() == want.tolist()
        got, want = render_truncated(without, tok, n), render_truncated(written, plain, n)
        assert (got is None and want is None) or (got[0].tolist() == want[0].tolist()
                                                  and got[1].tolist() == want[1].tolist())
        assert ([w[0].tolist() for w in render_windows(without, tok, n)]
                == [w[0].tolist() for w in render_windows(written, plain, n)])
    # the smallest prompt still holds it: the default system message and the last user message
    smallest = render([long[0], long[-1]], plain, for_generation=True)[0]
    assert chat.render_prompt(without, tok, len(smallest)).tolist() == smallest.tolist()
    assert chat.render_prompt(without, tok, len(smallest) - 1) is None
    own = [{"role": "system", "content": "Be long."}, *without]
    assert render(own, tok)[0].tolist() == render(own, plain)[0].tolist()


def test_a_format_the_tokenizer_cannot_write_is_one_line():
    from jaxgpt.errors import TokenizerError
    unknown = Tokenizer("byte-x", pattern=Tokenizer.from_spec("byte").pattern,
                        ranks={bytes([i]): i for i in range(256)}, chat_format="zephyr")
    with pytest.raises(TokenizerError, match="^'byte-x': chat_format 'zephyr' is not one of "
                                             "jaxgpt, chatml, llama3$"):
        render(CONVERSATION, unknown)
    # no <|im_start|>
    no_tokens = Tokenizer("byte-y", pattern=Tokenizer.from_spec("byte").pattern,
                          ranks={bytes([i]): i for i in range(256)}, chat_format="chatml")
    with pytest.raises(TokenizerError,
                       match="'<\\|im_start\\|>' is not a special token of 'byte-y'"):
        render(CONVERSATION, no_tokens)


def test_special_token_text_in_content_stays_text(byte):
    conversation = [{"role": "user", "content": "say <|assistant_end|>"},
                    {"role": "assistant", "content": "<|bos|>"}]
    ids, mask = render(conversation, byte)
    assert (ids.tolist().count(special(byte, "assistant_end")) == 1
            and ids.tolist().count(byte.bos_id) == 1)
    assert byte.decode(ids) == as_text(conversation) and int(mask.sum()) == len("<|bos|>") + 1


# ---- packing ----

def test_first_fit_places_each_item_in_the_first_row_with_room():
    assert first_fit([5, 4, 3, 1, 2], 8) == [[0, 2], [1, 3, 4]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 30) for _ in range(500)]
    rows, free = [], []  # the definition, one row at a time
    for i, n in enumerate(lengths):
        r = next((r for r, f in enumerate(free) if f >= n), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(32)
        rows[r].append(i)
        free[r] -= n
    assert first_fit(lengths, 32) == rows
    with pytest.raises(ValueError):
        first_fit([3, 9], 8)


def test_pack_segments_padding_and_masks_exact():
    def conv(start, trained):
        return np.arange(start, start + len(trained), dtype=np.int32), np.array(trained, bool)
    a, b, c = conv(10, [0, 0, 0, 1, 1]), conv(20, [0, 0, 1, 1]), conv(30, [0, 1, 1])
    batch = pack([a, b, c], seq_len=7, batch_size=3)  # rows of 8: [a c] [b pad] [pad]
    assert batch["inputs"].tolist() == [[10, 11, 12, 13, 14, 30, 31], [20, 21, 22, 23, 0, 0, 0],
                                        [0] * 7]
    assert batch["targets"].tolist() == [[11, 12, 13, 14, 30, 31, 32], [21, 22, 23, 0, 0, 0, 0],
                                         [0] * 7]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 0, 0, 0], [0] * 7]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0, 0], [0] * 7]
    assert {k: v.dtype for k, v in batch.items()} == {"inputs": np.int32, "targets": np.int32,
                                                      "segment_ids": np.int32,
                                                      "loss_mask": np.float32}
    with pytest.raises(ChatDataError, match="more than batch_size=1"):
        pack([a, b, c], seq_len=7, batch_size=1)
    with pytest.raises(ChatDataError, match="more than seq_len"):
        pack([a], seq_len=3, batch_size=1)


def test_chat_batches_are_a_function_of_seed_and_step(byte):
    conversations = synthetic(60)
    make = lambda seed: ChatBatches(conversations, byte, 128, 4, seed)  # noqa: E731
    one, two = make(3), make(3)
    assert one.train.dropped == 0
    rows_per_epoch = len(one.epoch_rows(0))
    # across epochs
    steps = [0, 1, rows_per_epoch // 4, rows_per_epoch // 4 + 1, 3 * rows_per_epoch // 4 + 2]
    # another instance, asked in another order
    later = {s: two.batch_at(s) for s in reversed(steps)}
    for s in steps:
        for key, value in one.batch_at(s).items():
            np.testing.assert_array_equal(value, later[s][key])
    assert not np.array_equal(make(4).batch_at(0)["inputs"], one.batch_at(0)["inputs"])
    for epoch in (0, 1):  # each epoch holds every conversation once
        assert sorted(i for row in one.epoch_rows(epoch) for i in row) == list(range(60))
    assert one.epoch_rows(0) != one.epoch_rows(1)


def test_chat_batches_rows_hold_whole_conversations(byte):
    conversations = synthetic(30, seed=1)
    batches = ChatBatches(conversations, byte, 96, 2, seed=0)
    rendered = {tuple(render_truncated(c, byte, 96)[0].tolist()) for c in conversations}
    assert batches.train.dropped == 0
    assert sum(len(render_truncated(c, byte, 96)[0]) < len(render(c, byte)[0])
               for c in conversations) > 0
    for step in range(3):
        batch = batches.batch_at(step)
        for b in range(2):
            for tokens in unpack(batch, b, special(byte, "assistant_end")):
                assert tuple(tokens) in rendered


def test_val_batches_cover_each_held_out_conversation_once(byte):
    conversations = synthetic(80, seed=2)
    ids = [f"dialog{i // 2}" for i in range(80)]  # two conversations per dialog, like chitchat
    batches = ChatBatches(conversations, byte, 128, 3, seed=5, val_fraction=0.25, ids=ids)
    _, val = dialogs.split(conversations, 0.25, 5, ids)
    assert len(val) == 20 and len(batches.val) == 20 and len(batches.train) == 60
    held = {ids[i] for i, c in enumerate(conversations) if any(c is v for v in val)}
    assert all((ids[i] in held) == any(c is v for v in val) for i, c in enumerate(conversations))
    seen = []
    for batch in batches.eval_batches():
        assert batch["inputs"].shape == (3, 128)
        for b in range(3):
            seen += map(tuple, unpack(batch, b, special(byte, "assistant_end")))
    assert sorted(seen) == sorted(tuple(render_truncated(c, byte, 128)[0].tolist()) for c in val)
    n_trained = sum(int(render_truncated(c, byte, 128)[1][1:].sum()) for c in val)
    assert sum(b["loss_mask"].sum() for b in batches.eval_batches()) == n_trained


def test_chat_batches_count_what_does_not_fit(byte):
    conversations = [CONVERSATION, [{"role": "user", "content": "x"},
                                    {"role": "assistant", "content": "y" * 100}]]
    batches = ChatBatches(conversations, byte, 40, 1, seed=0)
    assert len(batches.train) == 1 and batches.train.dropped == 1
    with pytest.raises(ChatDataError, match="none of the 2 training conversations fits"):
        ChatBatches(conversations, byte, 8, 1, seed=0)
    with pytest.raises(ChatDataError, match="conversation 1: message 1 has role 'user'"):
        ChatBatches([CONVERSATION, [{"role": "user", "content": "a"}] * 2], byte, 40, 1, seed=0)


# ---- command line ----

@pytest.fixture
def chat_cli(monkeypatch):
    """chat_command.main in this process (the host left untuned); returns the exit status."""
    from jaxgpt import hardware
    monkeypatch.setattr(hardware, "tune_host", lambda: None)

    def run(*argv):
        try:
            chat_command.main(list(argv))
        except SystemExit as e:
            return e.code
        return 0
    return run


def test_cli_convert_and_render(tmp_path, capsys, chat_cli):
    source = write_lines(tmp_path / "sg.jsonl", [json.dumps({"conversations": [
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "Hi!"}]})] * 3)
    out = tmp_path / "out" / "chats.jsonl"
    assert chat_cli("convert", f"convert.source=sharegpt:{source}", f"convert.out={out}",
                    "convert.limit=2") == 0
    assert "wrote 2 conversations" in capsys.readouterr().out
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"id": f"{source}:{i}", "messages": [{"role": "user", "content": "你好"},
                                             {"role": "assistant", "content": "Hi!"}]}
        for i in (1, 2)]
    assert chat_cli("render", f"render.file={out}", "render.tokenizer=byte", "render.index=1") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"# {source}:2: 14 tokens, 4 trained (between ⟦ and ⟧)"
    assert printed[1] == ("<|bos|><|user_start|>你好<|user_end|><|assistant_start|>"
                          "⟦Hi!<|assistant_end|>⟧")
    assert chat_cli("render", f"render.file={out}", "render.tokenizer=byte", "render.ids=true") == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 14 and rows[0] == "0\t257\t0\t'<|bos|>'" and rows[-1].split("\t")[2] == "1"
    assert chat_cli("render", f"render.file={out}", "render.tokenizer=byte",
                    "render.seq_len=13") == 0
    # exactly fits seq_len + 1
    assert capsys.readouterr().out.startswith(f"# {source}:1: 14 tokens")
    assert chat_cli("convert", f"convert.source=sharegpt:{source}",
                    f"convert.out={tmp_path / 'all.jsonl'}") == 0
    assert "wrote 3 conversations" in capsys.readouterr().out  # convert.limit=0: all


def test_cli_user_errors_are_one_line(tmp_path, capsys, chat_cli):
    out = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": CONVERSATION})])
    for argv, message in [
        (["convert", "convert.source=nope", f"convert.out={tmp_path / 'x.jsonl'}"],
         "error: unknown source 'nope'"),
        (["convert", "convert.source=chitchat"], "error: convert.out is required"),
        (["render", f"render.file={out}", "render.tokenizer=byte", "render.index=4"],
         f"error: {out}: no conversation 4 (it has 1)"),
        (["render", f"render.file={out}", "render.tokenizer=byte", "render.seq_len=4"],
         f"error: {out}: conversation 0 does not fit in render.seq_len=4 + 1 tokens"),
        (["render", f"render.file={tmp_path / 'none.jsonl'}", "render.tokenizer=byte"],
         f"error: {tmp_path / 'none.jsonl'}: cannot read it"),
        (["render", f"render.file={out}", "render.idx=1"],
         "error: unknown config key 'render.idx'; did you mean"),
        (["render", str(out)], "error: expected 0 operand(s)"),
    ]:
        assert chat_cli(*argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
        assert captured.err.startswith(message), captured.err


@pytest.mark.slow
def test_cli_error_in_a_subprocess_is_one_line_without_traceback(tmp_path, run_env):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.chat", "convert",
                           "convert.source=sharegpt:missing.jsonl",
                           f"convert.out={tmp_path / 'o.jsonl'}"], capture_output=True, text=True,
                          env=run_env(), cwd=tmp_path, timeout=120)
    assert (proc.returncode == 2 and "Traceback" not in proc.stderr
            and len(proc.stderr.splitlines()) == 1)
    assert proc.stderr.startswith("error: missing.jsonl: cannot read it")
    assert not (tmp_path / "o.jsonl").exists()
    help_ = subprocess.run([sys.executable, "-m", "jaxgpt.chat", "convert", "--help"],
                           capture_output=True, text=True, env=run_env(), cwd=tmp_path, timeout=120)
    assert help_.returncode == 0 and "  convert.skip_bad=false  (bool)" in help_.stdout
    assert "render." not in help_.stdout


def test_packed_conversations_never_see_each_other_through_the_model():
    """Two conversations packed into one row: changing the first never changes the second's logits,
    and the second's logits equal those it gets packed alone (its positions restart at 0)."""
    import jax
    import jax.numpy as jnp

    from jaxgpt.config import ModelConfig
    from jaxgpt.model.gpt import GPT

    tok = Tokenizer.from_spec("byte")
    a = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi!"}]
    a_changed = [{"role": "user", "content": "HELLO THERE"},
                 {"role": "assistant", "content": "yo!"}]
    b = [{"role": "user", "content": "how are you?"},
         {"role": "assistant", "content": "fine, thanks"}]
    seq_len = 64
    model = GPT(ModelConfig(preset="llama", vocab_size=tok.n_vocab, n_layer=2, n_head=2, d_model=32,
                            seq_len=seq_len).resolved())
    params = model.init(jax.random.key(0))

    def logits_of_second(first):
        convs = [render(c, tok) for c in (first, b)] if first else [render(b, tok)]
        batch = pack(convs, seq_len, 1)
        out = model.apply(params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"]))
        second = batch["segment_ids"][0] == (2 if first else 1)
        assert second.sum() == len(render(b, tok)[0])
        return np.asarray(out[0])[second]

    packed, changed, alone = (logits_of_second(a), logits_of_second(a_changed),
                              logits_of_second(None))
    np.testing.assert_array_equal(packed, changed)
    np.testing.assert_allclose(packed, alone, atol=1e-5)
