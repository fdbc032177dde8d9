import json

import pytest
import reply_quality as rq


def test_words_ignore_case_and_punctuation():
    assert rq.words("Hi!  I'm FINE, thanks...\nyou?") == ["hi", "i'm", "fine", "thanks", "you"]


def test_distinct_counts_ngrams_within_each_reply():
    replies = ["a b a", "a c"]
    # unigrams a b a a c: 3 distinct of 5; bigrams (a b) (b a) (a c): 3 of 3 (none spans two
    # replies)
    assert rq.distinct(replies, 1) == pytest.approx(3 / 5)
    assert rq.distinct(replies, 2) == pytest.approx(1.0)
    assert rq.distinct(["same thing", "same thing"], 2) == pytest.approx(0.5)
    assert rq.distinct(["", "one"], 2) == 0.0  # no bigram at all


def test_a_repeated_line_or_sentence():
    assert rq.repeats_a_line("i like it\nI like it!")
    assert rq.repeats_a_line("yes. no. Yes.")
    assert not rq.repeats_a_line("i like it\ni like it a lot")
    assert not rq.repeats_a_line("...\n!!")  # empty pieces are not lines


def test_same_opening_needs_four_words_in_another_reply():
    replies = ["I am not sure if i can", "i am NOT sure, really", "I am not", "I am not",
               "something else entirely here"]
    # "I am not" has 3 words only
    assert rq.same_opening(replies) == [True, True, False, False, False]


def test_measures_of_a_set_of_replies():
    replies = ["i am not sure if i go", "I am not sure at all", "hello there\nhello there", ""]
    m = rq.measures(replies)
    assert m["replies"] == 4
    assert m["repeats_a_line"] == pytest.approx(1 / 4)
    assert m["same_opening"] == pytest.approx(2 / 4)
    assert m["empty"] == pytest.approx(1 / 4)
    assert m["mean_words"] == pytest.approx((7 + 6 + 4 + 0) / 4)
    # 17 words, distinct: i am not sure if go at all hello there = 10
    assert m["distinct_1"] == pytest.approx(10 / 17)
    assert rq.measures([])["replies"] == 0


def test_contexts_end_with_a_user_turn_and_are_seeded(tmp_path):
    path = tmp_path / "c.jsonl"
    conversations = [[{"role": "user", "content": f"u{i}{k}"} if k % 2 == 0
                      else {"role": "assistant", "content": f"a{i}{k}"}
                      for k in range(4)] for i in range(10)]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    picked = rq.contexts(f"jsonl:{path}", 5, seed=3, fits=lambda c: c[-1]["content"] != "u00")
    assert len(picked) == 5 and all(c[-1]["role"] == "user" for c in picked)
    # prefixes of the originals
    assert all(c == conversations[int(c[0]["content"][1])][:len(c)] for c in picked)
    assert all(c[-1]["content"] != "u00" for c in picked)
    assert rq.contexts(f"jsonl:{path}", 5, seed=3,
                       fits=lambda c: c[-1]["content"] != "u00") == picked


def test_exchanges_pair_each_context_with_the_reply_it_got(tmp_path):
    path = tmp_path / "c.jsonl"
    # dialogue 0 ends on a user turn: that turn has no answer and is never picked
    conversations = [[{"role": "user", "content": "u00"}, {"role": "assistant", "content": "a01"},
                      {"role": "user", "content": "u02"}],
                     [{"role": "user", "content": "u10"}, {"role": "assistant", "content": "a11"}]]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    pairs = rq.exchanges(f"jsonl:{path}", 5, seed=0, fits=lambda c: True)
    assert sorted((c[-1]["content"], reply) for c, reply in pairs) == [("u00", "a01"),
                                                                       ("u10", "a11")]
    assert all(len(c) == 1 for c, _ in pairs)


def test_distance_sums_the_rate_differences():
    ours = {"distinct_1": 0.2, "distinct_2": 0.5, "repeats_a_line": 0.1, "same_opening": 0.3,
            "empty": 0.0, "mean_words": 12.0}
    theirs = {"distinct_1": 0.3, "distinct_2": 0.8, "repeats_a_line": 0.0, "same_opening": 0.05,
              "empty": 0.0, "mean_words": 30.0}
    # mean_words is not counted
    assert rq.distance(ours, theirs) == pytest.approx(0.1 + 0.3 + 0.1 + 0.25)
    assert rq.distance(ours, ours) == 0.0
