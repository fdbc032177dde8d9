"""Conversations as training data: the message format, converters, the chat template, the loss mask,
truncation and packing into fixed-length rows. (No model code here, and no jax.)

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`: an
optional system message first, then user and assistant alternating, the user first. On disk it is
JSONL, one `{"messages": [...]}` per line, optionally with an `"id"` naming the source dialog: the
conversations cut from one dialog (chitchat gives two, one per speaker) share it, and `split` keeps
them on the same side so held-out numbers are not flattered by leaks.

The chat template, the only place it is written down (`render`):

    <|bos|> <|system_start|>...<|system_end|> <|user_start|>...<|user_end|>
            <|assistant_start|>...<|assistant_end|> <|user_start|>... (and so on)

The loss mask is over *targets*: mask[i] is True when token i is trained, i.e. the loss of
predicting token i from tokens 0..i-1 counts. True for every assistant content token and the
<|assistant_end|> closing it (so the model learns to stop); False for <|assistant_start|> (the
prompt supplies it), for <|bos|> and for all that the system or user wrote. A packed row of L+1
tokens becomes inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:].

    python -m jaxgpt.chat convert --source chitchat|chatterbot[:LANG,...]|sharegpt:PATH|jsonl:PATH --out F.jsonl
    python -m jaxgpt.chat render --tokenizer SPEC F.jsonl [--index N] [--seq-len L] [--ids]
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from jaxgpt.errors import DataError, JaxgptError
from jaxgpt.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant"}
Conversation = list  # of {"role": str, "content": str}
SKIP_HINT = "(skip_bad=True, or --skip-bad, skips and counts such records)"
_WHITESPACE = re.compile(r"[ \t\r\n]*")


class ChatDataError(DataError):
    """A malformed conversation or conversations file; the message names the file and line."""


class Loaded(NamedTuple):
    conversations: list[Conversation]
    ids: list[str]   # the source dialog of each conversation (for `split`)
    skipped: int     # source records that gave no conversation: malformed (with skip_bad) or nothing to train


# ---- the message format ----

def check(conversation, *, trainable: bool = True) -> str | None:
    """What is wrong with `conversation`, or None; `trainable` also asks for an assistant message."""
    if not isinstance(conversation, list) or not conversation:
        return "expected a non-empty list of messages"
    expected = "user"
    for i, m in enumerate(conversation):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f'message {i} is not {{"role": str, "content": str}}'
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; expected system, user or assistant"
        if m["role"] == "system" and i == 0:
            continue
        if m["role"] != expected:
            return (f"message {i} has role {m['role']!r} where {expected!r} belongs "
                    f"(system only first, then user and assistant alternating)")
        expected = "assistant" if expected == "user" else "user"
    if trainable and not any(m["role"] == "assistant" for m in conversation):
        return "it has no assistant message to train on"
    return None


def validate(conversation, where: str = "conversation", *, trainable: bool = True) -> None:
    if (problem := check(conversation, trainable=trainable)) is not None:
        raise ChatDataError(f"{where}: {problem}")


def _trimmed(conversation: Conversation) -> Conversation | None:
    """Without trailing user messages (nothing to learn from them); None if no assistant message is left."""
    end = len(conversation)
    while end and conversation[end - 1]["role"] != "assistant":
        end -= 1
    return conversation[:end] if end else None


# ---- the chat template ----

def _template(roles: Sequence[str], contents: Sequence[Sequence[int]], tokenizer: Tokenizer,
              for_generation: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of already-encoded messages; see the module docstring for the layout."""
    special = tokenizer.special_id
    ids = np.empty(1 + sum(len(c) + 2 for c in contents) + for_generation, np.int32)
    mask = np.zeros(len(ids), np.bool_)
    ids[0], pos = tokenizer.bos_id, 1
    for role, content in zip(roles, contents):
        n = len(content)
        ids[pos], ids[pos + 1:pos + 1 + n], ids[pos + 1 + n] = (
            special(f"<|{role}_start|>"), content, special(f"<|{role}_end|>"))
        if role == "assistant":
            mask[pos + 1:pos + 2 + n] = True  # the content and <|assistant_end|>
        pos += n + 2
    if for_generation:
        ids[pos] = special("<|assistant_start|>")
    return ids, mask


def render(conversation: Conversation, tokenizer: Tokenizer, for_generation: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, loss mask bool) of a conversation; `for_generation` appends <|assistant_start|>
    after the user's last message, so the model writes the reply (no mask is trained there)."""
    validate(conversation, trainable=False)
    if for_generation and conversation[-1]["role"] != "user":
        raise ChatDataError("conversation: to prompt a reply the last message must be the user's")
    return _template([m["role"] for m in conversation], [tokenizer.encode(m["content"]) for m in conversation],
                     tokenizer, for_generation)


def _kept(roles: Sequence[str], lengths: Sequence[int], max_tokens: int) -> list[int] | None:
    """Indices of the messages a trainable conversation keeps within `max_tokens` rendered tokens:
    the system message, then the newest whole user/assistant pairs that fit (a trailing user message
    is dropped). None when not even the last pair fits: an assistant reply is never split."""
    head = [0] if roles[0] == "system" else []
    end = len(roles) - (roles[-1] == "user")
    budget, first = max_tokens - 1 - sum(lengths[i] + 2 for i in head), end
    for j in range(end - 2, len(head) - 1, -2):  # (user j, assistant j+1), newest first
        budget -= lengths[j] + lengths[j + 1] + 4
        if budget < 0:
            break
        first = j
    return head + list(range(first, end)) if first < end else None


def render_truncated(conversation: Conversation, tokenizer: Tokenizer, seq_len: int
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """`render` within a context of seq_len + 1 tokens, dropping the oldest user/assistant pairs
    (the system message stays); None when even the system message and the last pair do not fit."""
    validate(conversation)
    roles, encoded = [m["role"] for m in conversation], [tokenizer.encode(m["content"]) for m in conversation]
    keep = _kept(roles, [len(e) for e in encoded], seq_len + 1)
    return None if keep is None else _template([roles[i] for i in keep], [encoded[i] for i in keep], tokenizer)


def render_windows(conversation: Conversation, tokenizer: Tokenizer, seq_len: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """A long conversation as consecutive windows of whole pairs that each fit seq_len + 1 tokens
    (the system message in each), oldest first, so no reply is lost to truncation; a pair too long
    to fit even alone is dropped. The last window is `render_truncated`'s."""
    validate(conversation)
    roles, encoded = [m["role"] for m in conversation], [tokenizer.encode(m["content"]) for m in conversation]
    lengths, n_head = [len(e) for e in encoded], int(roles[0] == "system")
    windows, end = [], len(roles) - (roles[-1] == "user")
    while end > n_head:
        keep = _kept(roles[:end], lengths[:end], seq_len + 1)
        windows += [keep] if keep else []
        end = keep[n_head] if keep else end - 2  # before this window, or before the pair that never fits
    return [_template([roles[i] for i in keep], [encoded[i] for i in keep], tokenizer) for keep in windows[::-1]]


# ---- packing ----

def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: item i, in order, goes into the first row with room; returns rows of items.

    A max-tree over the rows' free space finds that row in O(log n) steps, so an epoch of a million
    conversations packs in seconds rather than the hours of scanning every open row."""
    n = len(lengths)
    size = 1 << max(n - 1, 0).bit_length()
    free = [0] * size + [capacity] * n + [0] * (size - n)  # leaf size + r is row r's free space
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for i, length in enumerate(map(int, lengths)):
        if length > capacity:
            raise ValueError(f"item {i} has {length} tokens, more than a row's {capacity}")
        node = 1
        while node < size:  # n rows of `capacity` exist, so some leaf always has room
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        free[node] -= length
        if node - size == len(rows):
            rows.append([])
        rows[node - size].append(i)
        node //= 2
        while node and free[node] != (best := max(free[2 * node], free[2 * node + 1])):
            free[node], node = best, node // 2
    return rows


@dataclasses.dataclass
class Rendered:
    """Rendered conversations stored flat: conversation i is ids[offsets[i]:offsets[i + 1]]."""
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    dropped: int = 0  # conversations that did not fit the context at all

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def of(cls, rendered: Sequence[tuple[np.ndarray, np.ndarray]], dropped: int = 0) -> Rendered:
        offsets = np.zeros(len(rendered) + 1, np.int64)
        np.cumsum([len(ids) for ids, _ in rendered], out=offsets[1:])
        cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
        return cls(cat([i for i, _ in rendered], np.int32), cat([m for _, m in rendered], np.bool_), offsets, dropped)

    @classmethod
    def build(cls, conversations: Sequence[Conversation], tokenizer: Tokenizer, seq_len: int,
              windows: bool = False) -> Rendered:
        """Validate and render every conversation within seq_len + 1 tokens: truncated, or as
        `render_windows` when `windows`; `dropped` counts the conversations that gave nothing."""
        out, dropped = [], 0
        for i, conversation in enumerate(conversations):
            validate(conversation, f"conversation {i}")
            if windows:
                got = render_windows(conversation, tokenizer, seq_len)
            else:
                got = [r] if (r := render_truncated(conversation, tokenizer, seq_len)) is not None else []
            out += got
            dropped += not got
        return cls.of(out, dropped)


def _assemble(data: Rendered, rows: Sequence[Sequence[int]], seq_len: int) -> dict:
    """A batch dict of [B, seq_len] arrays from rows of conversation indices (an empty row is padding)."""
    tokens, segments, mask = (np.zeros((len(rows), seq_len + 1), dt) for dt in (np.int32, np.int32, np.bool_))
    for b, row in enumerate(rows):
        pos = 0
        for segment, i in enumerate(row, 1):
            start, stop = data.offsets[i], data.offsets[i + 1]
            end = pos + stop - start
            tokens[b, pos:end], mask[b, pos:end] = data.ids[start:stop], data.mask[start:stop]
            segments[b, pos:end], pos = segment, end
    # The segment of position j is its input's: a target that starts the next conversation is its
    # <|bos|>, whose mask is False, so no loss ever crosses from one conversation into the next.
    return {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy(),
            "segment_ids": segments[:, :-1].copy(), "loss_mask": mask[:, 1:].astype(np.float32)}


def pack(rendered: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_size: int) -> dict:
    """First-fit the (ids, mask) conversations, in order, into batch_size rows of seq_len + 1 tokens:
    [B, seq_len] `inputs`, `targets`, `segment_ids` (1, 2, ... per conversation in a row, 0 = padding)
    and `loss_mask` (float32, 0 on padding)."""
    data = Rendered.of(rendered)
    if len(data) and (longest := int(data.lengths.max())) > seq_len + 1:
        raise ChatDataError(f"a conversation has {longest} tokens, more than seq_len + 1 = {seq_len + 1} "
                            f"(render_truncated fits it)")
    rows = first_fit(data.lengths, seq_len + 1)
    if len(rows) > batch_size:
        raise ChatDataError(f"{len(data)} conversations need {len(rows)} rows of {seq_len + 1} tokens, "
                            f"more than batch_size={batch_size}")
    return _assemble(data, rows + [[]] * (batch_size - len(rows)), seq_len)


def split(conversations: Sequence[Conversation], val_fraction: float, seed: int,
          ids: Sequence[str] | None = None) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val) by source dialog: a seeded `val_fraction` of the dialogs (each conversation its own
    dialog when `ids` is None) is held out whole; both keep their input order."""
    if not 0 <= val_fraction < 1:
        raise ChatDataError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    groups = list(ids) if ids is not None else list(range(len(conversations)))
    unique = list(dict.fromkeys(groups))
    n_val = round(len(unique) * val_fraction)
    if val_fraction > 0:  # hold out at least one dialog, and keep at least one to train on
        n_val = max(min(max(n_val, 1), len(unique) - 1), 0)
    held = {unique[k] for k in np.random.default_rng(seed).permutation(len(unique))[:n_val]}
    return ([c for c, g in zip(conversations, groups) if g not in held],
            [c for c, g in zip(conversations, groups) if g in held])


class ChatBatches:
    """Packed SFT batches; `batch_at(step)` is a pure function of (seed, step).

    Every conversation is rendered once. Each epoch shuffles the conversations (seeded by (seed,
    epoch)), first-fits them into rows of seq_len + 1 tokens, and shuffles the rows; the steps walk
    this stream of rows, batch_size at a time, from one epoch into the next. The held-out
    conversations (`val`, or a `val_fraction` split by `ids`) are packed once, in order.
    A conversation longer than the context is truncated (`render_truncated`), or with `windows`
    cut into windows of whole exchanges (`render_windows`), which keeps every reply that fits."""

    def __init__(self, conversations: Sequence[Conversation], tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, seed: int, *, val: Sequence[Conversation] = (), val_fraction: float = 0.0,
                 ids: Sequence[str] | None = None, windows: bool = False):
        if val_fraction and val:
            raise ChatDataError("give held-out conversations (val) or a val_fraction, not both")
        if val_fraction:
            conversations, val = split(conversations, val_fraction, seed, ids)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train, self.val = (Rendered.build(c, tokenizer, seq_len, windows) for c in (conversations, val))
        if not len(self.train):
            raise ChatDataError(f"none of the {len(conversations)} training conversations fits in "
                                f"seq_len + 1 = {seq_len + 1} tokens")
        self._epoch_starts = [0]             # global index of each packed epoch's first row
        self._epochs: dict[int, list] = {}   # the last two epochs' rows
        self._val_rows: list | None = None

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, 1, epoch])
            order = rng.permutation(len(self.train))
            rows = [order[row].tolist() for row in first_fit(self.train.lengths[order], self.seq_len + 1)]
            self._epochs = {e: r for e, r in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = [rows[k] for k in rng.permutation(len(rows))]
        return self._epochs[epoch]

    def batch_at(self, step: int) -> dict:
        rows, row = [], step * self.batch_size
        while len(rows) < self.batch_size:
            while self._epoch_starts[-1] <= row:  # pack epochs until the row's epoch is known
                self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_rows(len(self._epoch_starts) - 1)))
            epoch = bisect.bisect_right(self._epoch_starts, row) - 1
            first = row - self._epoch_starts[epoch]
            taken = self.epoch_rows(epoch)[first:first + self.batch_size - len(rows)]
            rows, row = rows + taken, row + len(taken)
        return _assemble(self.train, rows, self.seq_len)

    def val_batches(self) -> Iterator[dict]:
        """Every held-out conversation (that fits the context) exactly once; the last batch is padded."""
        if self._val_rows is None:
            self._val_rows = first_fit(self.val.lengths, self.seq_len + 1)
        for b in range(0, len(self._val_rows), self.batch_size):
            rows = self._val_rows[b:b + self.batch_size]
            yield _assemble(self.val, rows + [[]] * (self.batch_size - len(rows)), self.seq_len)


# ---- readers and converters: each gives Loaded(conversations, ids, skipped) ----

class _Bad(Exception):
    """Why a record is malformed; the reader adds where it is."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ChatDataError(f"{path}: cannot read it ({e.strerror or e})") from None


def _json_id(record) -> str | None:
    return record["id"] if isinstance(record, dict) and isinstance(record.get("id"), str) else None


def _json_records(path: Path) -> Iterator[tuple[str, str | None, object]]:
    """(where, its "id", record) for each line of a JSONL file, or each element of a JSON array."""
    data = _read_bytes(path)
    if data.lstrip()[:1] == b"[":
        yield from _json_array(path, data)
        return
    for line, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                record = _Bad("not UTF-8")
            except json.JSONDecodeError as e:
                record = _Bad(f"not JSON ({e.msg} at column {e.colno})")
            yield f"{path}:{line}", _json_id(record), record


def _json_array(path: Path, data: bytes) -> Iterator[tuple[str, str | None, object]]:
    """The elements of one JSON array (how ShareGPT dumps come), each placed at the line it starts on."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatDataError(f"{path}:{data.count(10, 0, e.start) + 1}: not UTF-8") from None
    decoder, line, counted = json.JSONDecoder(), 1, 0
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    while text[pos:pos + 1] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{path}:{e.lineno}: not JSON ({e.msg}); the rest cannot be read") from None
        yield f"{path}:{line}", _json_id(record), record
        pos = _WHITESPACE.match(text, pos).end()
        if text[pos:pos + 1] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise ChatDataError(f"{path}:{line}: expected ',' or ']' after the record starting here")


def _collect(records, convert, skip_bad: bool, limit: int | None = None) -> Loaded:
    """`convert` (record -> conversations) over (where, dialog id or None, record) triples."""
    conversations, ids, skipped = [], [], 0
    for where, dialog_id, record in records:
        try:
            if isinstance(record, _Bad):
                raise record
            got = convert(record)
            for conversation in got:
                if (problem := check(conversation)) is not None:
                    raise _Bad(problem)
        except _Bad as e:
            if not skip_bad:
                raise ChatDataError(f"{where}: {e} {SKIP_HINT}") from None
            skipped += 1
            continue
        skipped += not got
        conversations += got
        ids += [dialog_id or where] * len(got)
        if limit and len(conversations) >= limit:
            break
    return Loaded(conversations[:limit or None], ids[:limit or None], skipped)


def _from_messages(record) -> list[Conversation]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise _Bad('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    return [[{"role": m["role"], "content": m["content"]} if isinstance(m, dict) and {"role", "content"} <= m.keys()
             else m for m in record["messages"]]]  # other keys ("name", ...) are dropped


def _from_sharegpt(record) -> list[Conversation]:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise _Bad('expected {"conversations": [{"from": ..., "value": ...}, ...]}')
    conversation = []
    for i, turn in enumerate(record["conversations"]):
        who = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(who, str) or who not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise _Bad(f'turn {i} is not {{"from": {"|".join(SHAREGPT_ROLES)}, "value": str}}')
        conversation.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
    return [conversation]


def read_jsonl(path: str | os.PathLike, *, skip_bad: bool = False, limit: int | None = None) -> Loaded:
    """Conversations from `{"messages": [...]}` JSONL (an "id" is kept, other keys are ignored)."""
    return _collect(_json_records(Path(path)), _from_messages, skip_bad, limit)


def read_sharegpt(path: str | os.PathLike, *, skip_bad: bool = False, limit: int | None = None) -> Loaded:
    """Conversations from ShareGPT records, as JSONL or one JSON array; "from" is one of SHAREGPT_ROLES."""
    return _collect(_json_records(Path(path)), _from_sharegpt, skip_bad, limit)


def _from_chitchat(dialog) -> list[Conversation]:
    """Both directions of a two-person dialog: the first speaker as the user, then the second (that
    version starts at the second's first message). A speaker's consecutive chat lines join by newlines."""
    try:
        lines = [(u["sender"], u["text"]) for message in dialog["messages"] for u in message]
    except (KeyError, TypeError):
        raise _Bad('expected {"messages": [[{"sender": ..., "text": ...}, ...], ...]}') from None
    turns: list[tuple[str, list[str]]] = []
    for sender, text in lines:
        if not isinstance(text, str) or not isinstance(sender, str):
            raise _Bad("a chat line's sender or text is not a string")
        if not text.strip():
            continue
        if turns and turns[-1][0] == sender:
            turns[-1][1].append(text.strip())
        else:
            turns.append((sender, [text.strip()]))
    speakers = list(dict.fromkeys(sender for sender, _ in turns))
    if len(speakers) > 2:
        raise _Bad(f"{len(speakers)} speakers; a dialog has two")
    out = []
    for user in speakers if len(speakers) == 2 else ():
        conversation = [{"role": "user" if s == user else "assistant", "content": "\n".join(t)} for s, t in turns]
        conversation = _trimmed(conversation[conversation[0]["role"] == "assistant":])
        out += [conversation] if conversation else []
    return out


def read_chitchat(path: str | os.PathLike | None = None, *, skip_bad: bool = False,
                  limit: int | None = None) -> Loaded:
    """chitchat-dataset (the `chitchat_dataset` package's dataset.json unless `path` is given), each
    dialog twice, once per speaker as the user; a dialog with one speaker gives nothing (counted)."""
    if path is None:
        import chitchat_dataset  # only this converter needs the package
        path = Path(chitchat_dataset.__file__).with_name("dataset.json")
    path = Path(path)
    try:
        dialogs = json.loads(_read_bytes(path))
    except ValueError as e:
        raise ChatDataError(f"{path}: not JSON ({e})") from None
    if not isinstance(dialogs, dict):
        raise ChatDataError(f"{path}: expected the chitchat layout, an object of dialogs by id")
    records = ((f"{path}: dialog {key}", f"chitchat:{key}", dialog) for key, dialog in dialogs.items())
    return _collect(records, _from_chitchat, skip_bad, limit)


def _yaml_dialogs(path: Path, root: Path) -> Iterator[tuple[str, str, object]]:
    """(where, id, lines) per entry of a chatterbot file's `conversations` list. Composed, not loaded,
    so that every line stays a string (YAML would read `no` as False) and keeps its line number."""
    import yaml  # PyYAML, which orbax already requires
    try:
        document = yaml.compose(_read_bytes(path).decode("utf-8"), Loader=yaml.BaseLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        raise ChatDataError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                            f"({getattr(e, 'problem', None) or type(e).__name__})") from None
    pairs = document.value if isinstance(document, yaml.MappingNode) else []
    dialogs = next((v for k, v in pairs if getattr(k, "value", None) == "conversations"), None)
    if not isinstance(dialogs, yaml.SequenceNode):
        raise ChatDataError(f"{path}: no 'conversations' list")
    for node in dialogs.value:
        line = node.start_mark.line + 1
        ok = isinstance(node, yaml.SequenceNode) and all(isinstance(x, yaml.ScalarNode) for x in node.value)
        yield (f"{path}:{line}", f"chatterbot:{path.relative_to(root).as_posix()}:{line}",
               [x.value for x in node.value] if ok else _Bad("the dialog is not a list of lines (mis-indented?)"))


def _from_chatterbot(lines: list[str]) -> list[Conversation]:
    conversation = _trimmed([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(lines)])
    return [conversation] if conversation else []


def read_chatterbot(languages: Sequence[str] | None = None, directory: str | os.PathLike | None = None, *,
                    skip_bad: bool = False, limit: int | None = None) -> Loaded:
    """chatterbot-corpus dialogs (all languages, or those named, e.g. ["chinese"]): alternating lines
    become user and assistant messages; a one-line dialog gives nothing (counted)."""
    if directory is None:
        from chatterbot_corpus import corpus  # only this converter needs the package
        directory = corpus.DATA_DIRECTORY
    root = Path(directory)
    available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if unknown := [lang for lang in languages or () if lang not in available]:
        raise ChatDataError(f"{root}: no chatterbot language {unknown[0]!r}; there are {', '.join(available)}")
    files = [f for lang in languages or available for f in sorted((root / lang).glob("*.yml"))]
    return _collect((record for f in files for record in _yaml_dialogs(f, root)), _from_chatterbot, skip_bad, limit)


def load(source: str, *, skip_bad: bool = False, limit: int | None = None) -> Loaded:
    """chitchat[:PATH] | chatterbot[:LANG,LANG...] | sharegpt:PATH | jsonl:PATH."""
    kind, _, arg = source.partition(":")
    if kind == "chitchat":
        return read_chitchat(arg or None, skip_bad=skip_bad, limit=limit)
    if kind == "chatterbot":
        return read_chatterbot(arg.split(",") if arg else None, skip_bad=skip_bad, limit=limit)
    if kind in ("sharegpt", "jsonl") and arg:
        return (read_sharegpt if kind == "sharegpt" else read_jsonl)(arg, skip_bad=skip_bad, limit=limit)
    raise ChatDataError(f"unknown source {source!r}: expected chitchat, chatterbot[:LANG,...], sharegpt:PATH "
                        f"or jsonl:PATH")


def write_jsonl(path: str | os.PathLike, conversations: Sequence[Conversation],
                ids: Sequence[str] | None = None) -> Path:
    """`{"id": ..., "messages": [...]}` per line, written atomically (the id only when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, conversation in enumerate(conversations):
            record = ({"id": ids[i]} if ids is not None else {}) | {"messages": conversation}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---- command line ----

def show(ids: np.ndarray, mask: np.ndarray, tokenizer: Tokenizer, marks: tuple[str, str] = ("⟦", "⟧")) -> str:
    """The rendered text with each run of trained tokens between `marks` (runs start and end at
    special tokens, so decoding them run by run never splits a character)."""
    edges = [0, *(np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist(), len(ids)]
    return "".join(marks[0] + tokenizer.decode(ids[a:b]) + marks[1] if mask[a] else tokenizer.decode(ids[a:b])
                   for a, b in zip(edges, edges[1:]) if b > a)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.chat", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write conversations from a source as {\"messages\": ...} JSONL")
    convert.add_argument("--source", required=True,
                         help="chitchat | chatterbot[:LANG,...] (e.g. chatterbot:chinese) | sharegpt:PATH | jsonl:PATH")
    convert.add_argument("--out", required=True, metavar="FILE.jsonl")
    convert.add_argument("--limit", type=int, metavar="N", help="stop after N conversations")
    convert.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    show_cmd = sub.add_parser("render", help="print a conversation through the chat template, trained tokens marked")
    show_cmd.add_argument("--tokenizer", required=True, metavar="SPEC", help="gpt2, cl100k_base, byte, a saved dir...")
    show_cmd.add_argument("--index", type=int, default=0, help="which conversation of the file (default 0)")
    show_cmd.add_argument("--seq-len", type=int, metavar="L", help="truncate to a context of L + 1 tokens first")
    show_cmd.add_argument("--ids", action="store_true", help="also list each token: position, id, trained, text")
    show_cmd.add_argument("file", metavar="FILE.jsonl")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            loaded = load(args.source, skip_bad=args.skip_bad, limit=args.limit)
            path = write_jsonl(args.out, loaded.conversations, loaded.ids)
            print(f"wrote {len(loaded.conversations)} conversations to {path} "
                  f"({loaded.skipped} source records skipped: malformed or nothing to train on)")
            return 0
        loaded = read_jsonl(args.file, limit=args.index + 1)
        if args.index >= len(loaded.conversations):
            raise ChatDataError(f"{args.file}: no conversation {args.index} (it has {len(loaded.conversations)})")
        tokenizer, conversation = Tokenizer.from_spec(args.tokenizer), loaded.conversations[args.index]
        rendered = (render(conversation, tokenizer) if args.seq_len is None
                    else render_truncated(conversation, tokenizer, args.seq_len))
        if rendered is None:
            raise ChatDataError(f"{args.file}: conversation {args.index} does not fit in --seq-len {args.seq_len} + 1 "
                                f"tokens even with only its last exchange")
        ids, mask = rendered
        print(f"# {loaded.ids[args.index]}: {len(ids)} tokens, {int(mask.sum())} trained (between ⟦ and ⟧)")
        print(show(ids, mask, tokenizer))
        for i, (token, trained) in enumerate(zip(ids.tolist(), mask.tolist()) if args.ids else ()):
            print(f"{i}\t{token}\t{int(trained)}\t{tokenizer.decode([token])!r}")
    except (JaxgptError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
