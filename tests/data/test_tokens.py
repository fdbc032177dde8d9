"""Tests for jaxgpt.data: loading prepared directories and the batch loader."""
import json

import numpy as np
import pytest
from conftest import corpus, write

from jaxgpt.config import DataConfig, PrepareConfig
from jaxgpt.data import prepare
from jaxgpt.data import tokens as data
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.data.tokens import window_batches, windows
from jaxgpt.errors import DataError


@pytest.fixture(scope="module", autouse=True)
def offline(offline_tiktoken):
    yield


# ---- the loader ----

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared directory with several train shards and many short documents."""
    tmp = tmp_path_factory.mktemp("prepared")
    rows = [{"text": f"doc {i}: " + "tok " * (i % 17)} for i in range(500)]
    write(tmp / "in.jsonl", "\n".join(map(json.dumps, rows)))
    prepare.prepare(PrepareConfig(source=f"jsonl:{tmp / 'in.jsonl'}", tokenizer="byte",
                                  out=str(tmp / "out"), workers=1, val_fraction=0.1,
                                  chunk_bytes=500, shard_tokens=2000, progress=False))
    return data.load_dir(tmp / "out")


def test_sharded_tokens_read_across_shard_ends(prepared):
    tokens = prepared.train
    assert isinstance(tokens, data.ShardedTokens) and len(tokens.arrays) > 3
    whole = np.concatenate([np.asarray(a) for a in tokens.arrays])
    idx = np.random.default_rng(0).integers(0, len(whole), size=(7, 300))
    np.testing.assert_array_equal(tokens[idx], whole[idx])
    edge = int(tokens.starts[2])
    np.testing.assert_array_equal(tokens[edge - 5:edge + 5], whole[edge - 5:edge + 5])
    np.testing.assert_array_equal(np.asarray(tokens), whole)


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_batches_are_a_pure_function_of_seed_and_step_and_resume_exactly(prepared, sampling):
    def make(step):
        return data.batch_at(prepared.train, 3, step, 8, 32, sampling,
                             eot_id=prepared.tokenizer.eot_id, segments=True)
    straight = list(data.Prefetcher(make, 0, 12))
    resumed = list(data.Prefetcher(make, 5, 12))
    assert [s for s, _ in resumed] == list(range(5, 12))
    for (_, a), (_, b) in zip(straight[5:], resumed, strict=False):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(straight[0][1]["inputs"], straight[1][1]["inputs"])
    np.testing.assert_array_equal(straight[0][1]["targets"][:, :-1],
                                  straight[0][1]["inputs"][:, 1:])


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_two_processes_together_produce_the_global_batch(prepared, sampling):
    kw = dict(eot_id=prepared.tokenizer.eot_id, segments=True)
    for step in (0, 1, 9):
        whole = data.batch_at(prepared.train, 11, step, 6, 24, sampling, **kw)
        parts = [data.batch_at(prepared.train, 11, step, 6, 24, sampling, process_index=p,
                               process_count=2, **kw)
                 for p in range(2)]
        for k in whole:
            assert parts[0][k].shape == (3, 24)
            np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
    with pytest.raises(DataError, match="data.batch_size=5 does not split evenly over 2 processes"):
        data.batch_at(prepared.train, 0, 0, 5, 24, process_index=0, process_count=2)


def test_segment_ids_restart_after_each_end_of_text():
    E = 99
    tokens = np.array([1, 2, E, 3, 4, 5, E, E, 6, 7, 8, 9, E, 10, 11, 12], np.uint16)
    batch = data.batch_at(tokens, 0, 0, 2, 6, "sequential", eot_id=E, segments=True)
    np.testing.assert_array_equal(batch["inputs"], [[1, 2, E, 3, 4, 5], [E, E, 6, 7, 8, 9]])
    np.testing.assert_array_equal(batch["targets"], [[2, E, 3, 4, 5, E], [E, 6, 7, 8, 9, E]])
    # the eot closes its document; the token after it starts the next segment
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 2], [1, 2, 3, 3, 3, 3]])
    plain = data.batch_at(tokens, 0, 0, 2, 6, "sequential", eot_id=E)
    np.testing.assert_array_equal(plain["segment_ids"], np.ones((2, 6)))
    np.testing.assert_array_equal(plain["loss_mask"], np.ones((2, 6)))


def test_text_file_path_is_tokenized_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CACHE", tmp_path / "cache")
    # multi-byte characters: bytes per token > 1
    text = corpus(20_000) + "ünï 你好 ünï\r\n" * 500
    path = write(tmp_path / "s.txt", text)
    cfg = DataConfig(path=str(path), tokenizer="char", val_fraction=0.1)
    td = data.load(cfg)
    n = int(len(text) * 0.9)
    assert (td.tokenizer.decode(np.asarray(td.train)) == text[:n]
            and td.tokenizer.decode(np.asarray(td.val)) == text[n:])
    assert td.bytes_per_token["train"] == len(text[:n].encode()) / n
    assert (prepare.tokenize_text_file(path, "char", 0.1)
            == prepare.tokenize_text_file(path, "char", 0.1))
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1


def test_a_text_file_with_invalid_utf8_suggests_data_errors_replace(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "CACHE", tmp_path / "cache")
    path = write(tmp_path / "latin1.txt", "hello\n".encode() * 10 + "café\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        prepare.tokenize_text_file(path, "char", 0.1)
    assert str(e.value) == (f"{path}: invalid UTF-8 at byte offset 63 "
                            "(data.errors=replace substitutes U+FFFD)")
    assert (not (tmp_path / "cache").exists()
            or not list((tmp_path / "cache" / "tokens").glob("*/meta.json")))
    out = prepare.tokenize_text_file(path, "char", 0.1, errors="replace")
    assert "warning:" in capsys.readouterr().err
    td = data.load_dir(out)
    assert "\ufffd" in td.tokenizer.decode(np.concatenate([np.asarray(td.train),
                                                           np.asarray(td.val)]))
    # strict is not served the replaced tokens
    with pytest.raises(DataError, match="data.errors=replace"):
        prepare.tokenize_text_file(path, "char", 0.1)


# ---- train and evaluate take a prepared directory ----

def test_train_takes_a_prepared_dir_and_refuses_a_mismatched_vocabulary(prepared):
    from jaxgpt import config as config_lib
    from jaxgpt.train.trainer import Trainer
    cfg = config_lib.validate(config_lib.apply_overrides(config_lib.Config(), [
        f"data.dir={prepared.meta['dir']}", "data.segments=true", "data.batch_size=4",
        "model.n_layer=1", "model.bias=false", "model.d_model=32", "model.n_head=2",
        "model.seq_len=16", "train.steps=2"]))
    batch = Trainer(cfg).batch(3)
    expected = data.batch_at(prepared.train, cfg.train.seed, 3, 4, 16,
                             eot_id=prepared.tokenizer.eot_id, segments=True)
    for k in expected:
        np.testing.assert_array_equal(np.asarray(batch[k]), expected[k])
    assert int(expected["segment_ids"].max()) > 1
    small = config_lib.apply_overrides(cfg, ["model.vocab_size=256"])
    with pytest.raises(DataError,
                       match=r"the data's tokenizer byte has 264 tokens but model.vocab_size=256"):
        Trainer(small)
    with pytest.raises(DataError, match=r"with byte \(264 tokens\) but the model uses "
                                        r"cl100k_base \(100\d+ tok"):
        data.check_same_tokenizer(prepared.tokenizer, Tokenizer.from_spec("cl100k_base"))


# ---- windows for exact evaluation (every target scored once) ----

def scored(n_tokens, seq_len, stride):
    """(target index, context length) for every target the windows score."""
    out = []
    for start, first in windows(n_tokens, seq_len, stride):
        assert 0 <= first < seq_len
        n = min(seq_len, n_tokens - 1 - start)  # targets this window has
        out += [(start + p + 1, p + 1) for p in range(first, n)]
    return out


@pytest.mark.parametrize("n_tokens", [2, 3, 8, 9, 10, 17, 64, 65, 100, 101])
@pytest.mark.parametrize("seq_len", [1, 4, 8])
@pytest.mark.parametrize("stride", [0, 1, 3, 4, 8, 20])
def test_windows_score_every_target_once(n_tokens, seq_len, stride):
    result = scored(n_tokens, seq_len, stride)
    assert sorted(t for t, _ in result) == list(range(1, n_tokens))
    effective = min(stride or seq_len, seq_len)
    for target, context in result:
        # each prediction sees all tokens so far or at least seq_len - stride + 1 of them
        assert context >= min(target, seq_len - effective + 1)


def test_windows_values():
    assert list(windows(10, 4, 4)) == [(0, 0), (4, 0), (8, 0)]
    assert list(windows(10, 4, 2)) == [(0, 0), (2, 2), (4, 2), (6, 2)]
    assert list(windows(9, 4, 0)) == [(0, 0), (4, 0)]  # stride 0 means seq_len
    assert list(windows(1, 4, 4)) == []                # a single token has no target


def test_window_batches_shapes_and_masks():
    tokens = np.arange(1, 12)  # 11 tokens: 10 targets
    batches = list(window_batches(tokens, seq_len=4, stride=2, batch_size=3))
    assert len(batches) == 2 and all(b["inputs"].shape == (3, 4) for b in batches)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    # windows start at 0, 2, 4, 6 (the last one has 4 targets: 7..10)
    # and 2 padding rows fill the batch
    np.testing.assert_array_equal(rows["inputs"][:4],
                                  [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10]])
    np.testing.assert_array_equal(rows["targets"][:4], rows["inputs"][:4] + 1)
    np.testing.assert_array_equal(rows["loss_mask"][:4],
                                  [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(rows["segment_ids"][4:], 0)
    np.testing.assert_array_equal(rows["loss_mask"][4:], 0)
    assert rows["loss_mask"].sum() == 10
    # a short tail: padded positions are segment 0 and unscored
    (tail,) = list(window_batches(np.arange(1, 7), seq_len=8, stride=8, batch_size=1))
    np.testing.assert_array_equal(tail["segment_ids"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(tail["loss_mask"][0], [1, 1, 1, 1, 1, 0, 0, 0])


# ---- batch sources ----

def test_token_batches_are_the_batches_of_step_and_process(make_config):
    cfg = make_config()
    source = data.open_batches(cfg)
    assert isinstance(source, data.TokenBatches) and source.tokenizer.name == "char"
    whole = source.batch_at(3)
    halves = [source.batch_at(3, p, 2) for p in (0, 1)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    np.testing.assert_array_equal(whole["inputs"], data.batch_at(
        source.data.split("train"), cfg.train.seed, 3, cfg.data.batch_size,
        cfg.model.seq_len)["inputs"])
    n_train, n_val = len(source.data.split("train")), len(source.data.split("val"))
    scored = {split: sum(int(b["loss_mask"].sum()) for b in source.eval_batches(split))
              for split in ("train", "val", "all")}
    assert scored == {"train": n_train - 1, "val": n_val - 1, "all": n_train + n_val - 1}
    np.testing.assert_array_equal(source.token_bytes, source.tokenizer.token_byte_lengths())


def test_open_batches_serves_conversations_when_data_chat_is_set(make_config, tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": "good night"},
                                      {"role": "assistant", "content": f"sweet lord {i}"}]})
             for i in range(8)]
    path = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    cfg = make_config(data={"chat": f"jsonl:{path}", "tokenizer": "byte"})
    source = data.open_batches(cfg)
    assert type(source).__name__ == "ChatBatches" and source.tokenizer.name == "byte"
    assert source.batch_at(0)["inputs"].shape == (cfg.data.batch_size, cfg.model.seq_len)
    eval_only = data.open_batches(make_config(data={"chat_val": f"jsonl:{path}",
                                                    "tokenizer": "byte"}), training=False)
    assert (sum(int(b["loss_mask"].sum()) for b in eval_only.eval_batches())
            == sum(len(f"sweet lord {i}") + 1 for i in range(8)))


def test_only_plain_packed_text_has_rows_of_one_document():
    assert not data.rows_have_segments(DataConfig(path="x.txt"))
    for kw in ({"segments": True}, {"chat": "chitchat"}, {"preferences": "jsonl:p.jsonl"}):
        assert data.rows_have_segments(DataConfig(path="x.txt", **kw)), kw
