"""Served conversations and what people said about them, in one SQLite file; exported as SFT
conversations and preference pairs.

    python -m jaxgpt.feedback export runs/NAME/feedback.db export.sft=liked.jsonl \\
        export.pairs=pairs.jsonl
    python -m jaxgpt.feedback stats runs/NAME/feedback.db        # counts, as JSON

    fb = Feedback("runs/NAME/feedback.db")       # created if new; WAL mode; one writer thread
    # enqueue, return
    fb.start(completion_id, messages, model="m", source="api", sampling=params, n=1)
    fb.finish(completion_id, replies)            # replies.Reply-like: index, text, finish_reason,
                                                 # screened...
    fb.judge(completion_id, rating="up")         # waits for its write; the judgement's id
    fb.judge(chosen_id, better_than=rejected_id) # two replies to the same context
    fb.judge(completion_id, edit="what the person wanted")

Every write goes through one thread and its queue, so that a server's request threads and its
engine thread never wait for the disk: start() and finish() enqueue and return; judge() waits for
its own write (queued behind the reply's records, so a judgement sent as soon as a reply's id is
known finds it, and an unknown id is refused). The writer commits what is queued in one
transaction: a crash loses at most what was not yet committed, never what was, and never leaves
a torn file. A reply with n choices is one row per choice (`index`; 0 unless n > 1).

What export makes of the judgements (the latest one counts where a person changed their mind):
  - SFT conversations ({"id", "messages"} JSONL, what `data.chat=jsonl:PATH` trains on): the context
    plus the reply, for a reply rated up whose finish_reason is "stop" (a reply cut at the token
    limit, stopped or screened is no answer to imitate: SFT would teach ending there); the context
    plus the edit, for an edited reply (whatever the original's finish_reason; the edit wins over a
    rating).
  - Preference pairs ({"messages": context, "chosen", "rejected"} JSONL): each "this one is better"
    (chosen, rejected) between two replies to the same context, as they were shown; each edit (the
    edit chosen, the original rejected); and each reply rated up against each reply rated down to
    the same context (same messages, exactly). Not pairs: a lone rating, a reply whose generation
    failed (finish_reason "error") or never finished, a pair whose two texts are equal, and an up /
    down pair of two replies someone also compared with "better" (that judgement counts); a pair is
    written once.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxgpt.data import dialogs
from jaxgpt.errors import DataError

SCHEMA_VERSION = 1           # PRAGMA user_version
# PRAGMA application_id: "jxfb", tells our files from other SQLite files
APPLICATION_ID = 0x6A786662
SOURCES = ("page", "api", "talk")
RATINGS = ("up", "down")
SCHEMA = """
CREATE TABLE replies (
  id TEXT NOT NULL,               -- the completion id (chatcmpl-..., talk-...)
  choice INTEGER NOT NULL,        -- the choice's index (n > 1)
  created REAL NOT NULL,          -- unix time of the request
  model TEXT NOT NULL,
  source TEXT NOT NULL CHECK (source IN ('page', 'api', 'talk')),
  messages TEXT NOT NULL,         -- the context, JSON [{"role", "content"}, ...]
  sampling TEXT NOT NULL,         -- the sampling settings, JSON
  replaces TEXT,                  -- a regenerated reply: the completion id of the one it replaced
  finished REAL,                  -- unix time the reply finished, NULL while generating (or if the
                                  -- server died)
  reply TEXT,                     -- the text shown
  finish_reason TEXT,             -- stop | length | content_filter | cancelled | error
  screened TEXT,                  -- why the screen blocked it (or "low confidence"), if it did
  flagged INTEGER,                -- 1: below screen.min_mean_logprob
  mean_logprob REAL,
  PRIMARY KEY (id, choice)
);
CREATE TABLE judgements (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  created REAL NOT NULL,
  completion_id TEXT NOT NULL,
  choice INTEGER NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('up', 'down', 'better', 'edit')),
  other_id TEXT,                  -- better: the reply this one is better than
  other_choice INTEGER,
  edit TEXT,                      -- edit: the reply the person wanted
  FOREIGN KEY (completion_id, choice) REFERENCES replies (id, choice),
  FOREIGN KEY (other_id, other_choice) REFERENCES replies (id, choice)
);
"""


class FeedbackError(DataError):
    """Bad input (naming its field), an unknown completion id (status 404), or an unusable file."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


def default_path(source: str | Path) -> Path:
    """Where a server of `source` keeps its feedback: RUN/feedback.db for RUN, RUN/export and
    RUN/checkpoints[/STEP]; beside an export directory not in a run (a converted model:
    DIR/../feedback.db)."""
    path = Path(source).absolute()
    if path.parent.name == "checkpoints":
        path = path.parent.parent
    elif path.name == "checkpoints" or (path / "params").is_dir():  # an export: its parent
        path = path.parent
    return path / "feedback.db"


def _connect(path: Path) -> sqlite3.Connection:
    # transactions by hand; the writer's connection is made here and used by its thread alone
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")  # a committed judgement survives a power cut too
    return conn


def open_database(path: Path, create: bool) -> sqlite3.Connection:
    """A connection to a checked feedback database (made with the schema if new and `create`)."""
    if path.is_dir() or (not create and not path.is_file()):
        raise FeedbackError(f"{path}: no feedback database there")
    conn = None
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path)
        app, version = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                        for p in ("application_id", "user_version"))
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app == 0 and tables == 0 and create:  # new (or an empty file): ours now
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            # nobody was faster
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for statement in f"{SCHEMA}; PRAGMA application_id={APPLICATION_ID}; " \
                                 f"PRAGMA user_version={SCHEMA_VERSION}".split(";"):
                    conn.execute(statement) if statement.strip() else None
            conn.execute("COMMIT")
            app, version = APPLICATION_ID, SCHEMA_VERSION
    except (sqlite3.Error, OSError) as e:
        if conn is not None:
            conn.close()
        raise FeedbackError(f"{path}: not a usable SQLite database "
                            f"({type(e).__name__}: {e})") from None
    if app != APPLICATION_ID:
        conn.close()
        raise FeedbackError(f"{path}: not a jaxgpt feedback database (SQLite application_id {app})")
    if version != SCHEMA_VERSION:
        conn.close()
        raise FeedbackError(f"{path}: feedback schema version {version}, this jaxgpt reads version "
                            f"{SCHEMA_VERSION} ({'older' if version < SCHEMA_VERSION else 'newer'}:"
                            " use the jaxgpt that wrote it)")
    if create and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def compact_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _string(value, field: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise FeedbackError(f"{field}: expected a non-empty string, got {json.dumps(value)[:80]}",
                            field)
    return value


def _index(value, field: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 31:
        raise FeedbackError(f"{field}: expected a choice index in [0, 2**31), got "
                            f"{json.dumps(value)[:80]}", field)
    return value


def stored(body: dict) -> dict | None:
    """What a chat request's OpenAI fields `store` and `metadata` ask to record: None without
    store: true, else the source ("page" when metadata.source says so, else "api") and the id of the
    reply a regenerated one replaces (metadata.replaces)."""
    store, metadata = body.get("store"), body.get("metadata")
    if store is not None and not isinstance(store, bool):
        raise FeedbackError(f"store: expected a boolean, got {json.dumps(store)[:80]}", "store")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise FeedbackError("metadata: expected an object of strings", "metadata")
    if not store:
        return None
    metadata = metadata or {}
    return {"source": "page" if metadata.get("source") == "page" else "api",
            "replaces": metadata.get("replaces") or None}


class _Job:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], wait: bool):
        self.fn, self.done, self.result, self.error = (fn, threading.Event() if wait else None,
                                                       None, None)


class Feedback:
    """The feedback database of one server (or chat session): thread-safe, writes on its own
    thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # checked (or made) here: a bad file stops the start
        self._conn = open_database(self.path, create=True)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed, self._lock = False, threading.Lock()  # nothing is queued behind the last job
        self._thread = threading.Thread(target=self._write, name="jaxgpt-feedback", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Feedback":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def flush(self) -> None:
        """Return once everything queued before has been committed."""
        self._submit(lambda conn: None, wait=True)

    # ---- records ----
    def start(self, completion_id: str, messages: Sequence[dict], *, model: str, source: str,
              sampling: Any = None, n: int = 1, replaces: str | None = None,
              created: float | None = None) -> None:
        """A reply is being generated for `messages` (its context): n rows, their replies to
        come."""
        _string(completion_id, "completion_id")
        if source not in SOURCES:
            raise FeedbackError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}",
                                "source")
        context = [{"role": m.get("role"), "content": m.get("content")}
                   if isinstance(m, dict) else m for m in messages]
        if ((problem := dialogs.problem_with(context, trainable=False)) is not None
                or context[-1]["role"] != "user"):
            raise FeedbackError(f"messages: {problem or 'the last message must be a user message'}",
                                "messages")
        if dataclasses.is_dataclass(sampling):
            sampling = dataclasses.asdict(sampling)
        row = (completion_id, time.time() if created is None else created, model, source,
               compact_json(context), compact_json(sampling or {}),
               _string(replaces, "replaces", required=False))
        self._submit(lambda conn: conn.executemany(
            "INSERT INTO replies (id, choice, created, model, source, messages, sampling, replaces)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(row[0], i, *row[1:]) for i in range(n)]))

    def finish(self, completion_id: str, replies: Sequence[Any]) -> None:
        """The replies of a started completion are in (replies.Reply-like objects: index, text,
        finish_reason, screened, flagged, mean_logprob); from any thread, the engine's included."""
        now = time.time()
        rows = [(now, r.text, r.finish_reason, getattr(r, "screened", None),
                 int(bool(getattr(r, "flagged", False))), getattr(r, "mean_logprob", None),
                 completion_id, r.index) for r in replies if r is not None]
        self._submit(lambda conn: conn.executemany(
            "UPDATE replies SET finished=?, reply=?, finish_reason=?, screened=?, flagged=?, "
            "mean_logprob=? WHERE id=? AND choice=?", rows))

    def record(self, completion_id: str, messages: Sequence[dict], replies: Sequence[Any],
               **start) -> None:
        """start() and finish() at once, for a reply already finished."""
        self.start(completion_id, messages, n=max((r.index for r in replies), default=0) + 1,
                   **start)
        self.finish(completion_id, replies)

    # ---- judgements ----
    def judge(self, completion_id: str, *, rating: str | None = None,
              better_than: str | None = None, edit: str | None = None, index: int = 0,
              better_than_index: int = 0) -> int:
        """Store one judgement of reply (completion_id, index) once the write has landed: its id.
        FeedbackError naming the field for bad input, with status 404 for an unknown id."""
        _string(completion_id, "completion_id")
        index, better_than_index = (_index(index, "index"),
                                    _index(better_than_index, "better_than_index"))
        given = [name for name, v in (("rating", rating), ("better_than", better_than),
                                      ("edit", edit)) if v is not None]
        if len(given) != 1:
            name = given[1] if given else "rating"
            raise FeedbackError(f"{name}: give exactly one of rating, better_than or edit", name)
        if rating is not None and rating not in RATINGS:
            raise FeedbackError(f"rating: expected \"up\" or \"down\", got "
                                f"{json.dumps(rating)[:80]}", "rating")
        if better_than is not None and ((_string(better_than, "better_than"), better_than_index)
                                        == (completion_id, index)):
            raise FeedbackError("better_than: a reply cannot be better than itself", "better_than")
        if edit is not None and (not isinstance(edit, str) or not edit.strip()):
            raise FeedbackError(f"edit: expected the reply's new text, got {json.dumps(edit)[:80]}",
                                "edit")
        kind = rating or ("better" if better_than is not None else "edit")

        def write(conn: sqlite3.Connection) -> int:
            def context(cid: str, choice: int, field: str) -> str:
                row = conn.execute("SELECT messages FROM replies WHERE id=? AND choice=?",
                                   (cid, choice)).fetchone()
                if row is None:
                    raise FeedbackError(f"{field}: no recorded reply {cid!r}"
                                        + (f" (choice {choice})" if choice else ""),
                                        field, status=404)
                return row[0]
            mine = context(completion_id, index, "completion_id")
            if (better_than is not None
                    and context(better_than, better_than_index, "better_than") != mine):
                raise FeedbackError("better_than: that reply answers a different conversation; "
                                    "\"better\" compares two replies to the same context",
                                    "better_than")
            return conn.execute(
                "INSERT INTO judgements (created, completion_id, choice, kind, other_id, "
                "other_choice, edit) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), completion_id, index, kind, better_than,
                 better_than_index if better_than is not None else None, edit)).lastrowid
        return self._submit(write, wait=True)

    def judge_request(self, body: dict) -> dict:
        """judge() from the JSON body of POST /v1/feedback: the stored judgement, as the API
        answers it."""
        cid = body.get("completion_id")
        if cid is None:
            raise FeedbackError("completion_id: required", "completion_id")
        fields = {name: body.get(name)
                  for name in ("rating", "better_than", "edit", "index", "better_than_index")}
        for name in ("rating", "edit"):
            if fields[name] is not None and not isinstance(fields[name], str):
                raise FeedbackError(f"{name}: expected a string, got "
                                    f"{json.dumps(fields[name])[:80]}", name)
        judgement_id = self.judge(cid, **fields)
        kind = fields["rating"] or ("better" if fields["better_than"] is not None else "edit")
        return {"id": judgement_id, "object": "feedback", "completion_id": cid, "kind": kind}

    # ---- the writer ----
    def _submit(self, fn: Callable[[sqlite3.Connection], Any], wait: bool = False):
        job = _Job(fn, wait)
        with self._lock:
            if self._closed:  # (a reply finishing after the server stopped recording: dropped)
                if wait:
                    raise FeedbackError(f"{self.path}: the feedback database is closed", status=503)
                return None
            self._queue.put(job)
        if not wait:
            return None
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _write(self) -> None:
        conn = self._conn
        stop = False
        while not stop:
            jobs = [self._queue.get()]
            while len(jobs) < 512:  # what else is queued goes in the same transaction
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in jobs
            jobs = [j for j in jobs if j is not None]
            try:
                conn.execute("BEGIN IMMEDIATE")
                for job in jobs:
                    try:
                        job.result = job.fn(conn)
                    except FeedbackError as e:  # refused before it wrote anything
                        job.error = e
                    except sqlite3.IntegrityError as e:  # only this statement is undone
                        job.error = FeedbackError(f"{self.path}: refused: {e}")
                        if job.done is None:
                            print(f"jaxgpt feedback: {job.error}", file=sys.stderr, flush=True)
                conn.execute("COMMIT")
            except sqlite3.Error as e:  # the disk: this batch is lost, what was committed stays
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                error = FeedbackError(f"{self.path}: writing failed ({type(e).__name__}: {e})",
                                      status=500)
                print(f"jaxgpt feedback: {error} ({len(jobs)} records lost)", file=sys.stderr,
                      flush=True)
                for job in jobs:
                    job.error = error
            for job in jobs:
                if job.done is not None:
                    job.done.set()
        conn.close()
