"""What the feedback store holds, read out: the liked and edited replies as SFT conversations, the
preference pairs people's judgements imply (the rules: feedback.py's docstring), and counts.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from jaxgpt import files
from jaxgpt.data import dialogs
from jaxgpt.serve import feedback


def _collect(conn: sqlite3.Connection) -> tuple[list[dict], list[dict]]:
    """(SFT records, pair records) by the rules in feedback.py's docstring."""
    rows = {(r[0], r[1]): r for r in conn.execute(
        "SELECT id, choice, messages, reply, finish_reason FROM replies WHERE reply IS NOT NULL "
        "ORDER BY rowid")}
    ratings, edits, better = {}, {}, {}  # the latest judgement of each kind wins
    for cid, choice, kind, other_id, other_choice, edit in conn.execute(
            "SELECT completion_id, choice, kind, other_id, other_choice, edit FROM judgements "
            "ORDER BY id"):
        key = (cid, choice)
        if kind in feedback.RATINGS:
            ratings[key] = kind
        elif kind == "edit":
            edits[key] = edit
        else:
            better.pop(frozenset((key, (other_id, other_choice))), None)  # re-judged: goes last
            better[frozenset((key, (other_id, other_choice)))] = (key, (other_id, other_choice))
    sft, pairs, seen = [], [], set()

    def pair(messages: str, chosen: str, rejected: str) -> None:
        if chosen != rejected and (messages, chosen, rejected) not in seen:
            seen.add((messages, chosen, rejected))
            pairs.append({"messages": json.loads(messages), "chosen": chosen, "rejected": rejected})
    usable = {key: r for key, r in rows.items() if r[4] != "error"}
    for key, r in rows.items():
        text = edits.get(key) or (r[3] if ratings.get(key) == "up" and r[4] == "stop" else None)
        if text is not None and dialogs.problem_with(json.loads(r[2])
                                              + [{"role": "assistant", "content": text}]) is None:
            sft.append({"id": key[0] if key[1] == 0 else f"{key[0]}#{key[1]}",
                        "messages": json.loads(r[2]) + [{"role": "assistant", "content": text}]})
    for chosen, rejected in better.values():
        if chosen in usable and rejected in usable:
            pair(usable[chosen][2], usable[chosen][3], usable[rejected][3])
    for key, r in usable.items():
        if key in edits:
            pair(r[2], edits[key], r[3])
    liked = [key for key in usable if ratings.get(key) == "up"]
    disliked = [key for key in usable if ratings.get(key) == "down"]
    for up in liked:
        for down in disliked:
            # "better" said otherwise
            if usable[up][2] == usable[down][2] and frozenset((up, down)) not in better:
                pair(usable[up][2], usable[up][3], usable[down][3])
    return sft, pairs


def write_datasets(path: str | Path, sft: str | Path | None = None,
           pairs: str | Path | None = None) -> dict:
    """Write the SFT conversations and / or the preference pairs of the database at `path`; the
    counts."""
    conn = feedback.open_database(Path(path), create=False)
    try:
        conversations, pair_records = _collect(conn)
    finally:
        conn.close()
    for where, name in ((sft, "export.sft"), (pairs, "export.pairs")):
        if where is not None and Path(where).is_dir():
            raise feedback.FeedbackError(f"{name}={where}: a directory, not a file", name)
    if sft is not None:
        dialogs.write_jsonl(sft, [c["messages"] for c in conversations],
                            [c["id"] for c in conversations])
    if pairs is not None:
        files.atomic_write(pairs, "".join(feedback.compact_json(p) + "\n" for p in pair_records))
    return {"sft": len(conversations), "pairs": len(pair_records)}


def stats(path: str | Path) -> dict:
    """Counts: replies (finished or not, by source and finish_reason), judgements by kind, and what
    export would write."""
    conn = feedback.open_database(Path(path), create=False)
    try:
        count = lambda sql: dict(conn.execute(sql).fetchall())  # noqa: E731
        out = {"path": str(path), "schema_version": feedback.SCHEMA_VERSION,
               "replies": conn.execute("SELECT count(*) FROM replies").fetchone()[0],
               "unfinished": conn.execute("SELECT count(*) FROM replies "
                                          "WHERE reply IS NULL").fetchone()[0],
               "by_source": count("SELECT source, count(*) FROM replies GROUP BY source "
                                  "ORDER BY source"),
               "by_finish_reason": count("SELECT finish_reason, count(*) FROM replies "
                                         "WHERE reply IS NOT NULL GROUP BY finish_reason "
                                         "ORDER BY finish_reason"),
               "judgements": {kind: 0 for kind in ("up", "down", "better", "edit")}
               | count("SELECT kind, count(*) FROM judgements GROUP BY kind")}
        sft, pairs = _collect(conn)
    finally:
        conn.close()
    return {**out, "export": {"sft": len(sft), "pairs": len(pairs)}}


# ---- command line ----
