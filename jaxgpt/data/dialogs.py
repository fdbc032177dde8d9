"""Conversations on disk: the message format and its checks, readers and converters of dialog
datasets, and the train/val split by source dialog. (No tokens here: the chat template is
chat.py's.)

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`: an
optional system message first, then user and assistant alternating, the user first. On disk it is
JSONL, one `{"messages": [...]}` per line, optionally with an `"id"` naming the source dialog: the
conversations cut from one dialog (chitchat gives two, one per speaker) share it, and `split` keeps
them on the same side so held-out numbers are not flattered by leaks.

    load("chitchat") | load("chatterbot:chinese") | load("sharegpt:dump.json")
        | load("jsonl:convs.jsonl")
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from jaxgpt.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant"}
Conversation = list  # of {"role": str, "content": str}
SKIP_HINT = "(skip_bad=True, or convert.skip_bad=true, skips and counts such records)"
_WHITESPACE = re.compile(r"[ \t\r\n]*")


class ChatDataError(DataError):
    """A malformed conversation or conversations file; the message names the file and line."""


class LoadedDialogs(NamedTuple):
    conversations: list[Conversation]
    ids: list[str]   # the source dialog of each conversation (for `split`)
    # source records that gave no conversation: malformed (with skip_bad) or nothing to train
    skipped: int


# ---- the message format ----

def problem_with(conversation, *, trainable: bool = True) -> str | None:
    """What is wrong with `conversation`, or None; `trainable` also asks for an assistant
    message."""
    if not isinstance(conversation, list) or not conversation:
        return "expected a non-empty list of messages"
    expected = "user"
    for i, m in enumerate(conversation):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
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


def require_valid(conversation, where: str = "conversation", *, trainable: bool = True) -> None:
    if (problem := problem_with(conversation, trainable=trainable)) is not None:
        raise ChatDataError(f"{where}: {problem}")


def _trimmed(conversation: Conversation) -> Conversation | None:
    """Without trailing user messages (nothing to learn from them); None if no assistant message
    is left."""
    end = len(conversation)
    while end and conversation[end - 1]["role"] != "assistant":
        end -= 1
    return conversation[:end] if end else None


# ---- the split by source dialog ----

def split(conversations: Sequence[Conversation], val_fraction: float, seed: int,
          ids: Sequence[str] | None = None) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val) by source dialog: a seeded `val_fraction` of the dialogs (each conversation its
    own dialog when `ids` is None) is held out whole; both keep their input order."""
    if not 0 <= val_fraction < 1:
        raise ChatDataError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    groups = list(ids) if ids is not None else list(range(len(conversations)))
    unique = list(dict.fromkeys(groups))
    n_val = round(len(unique) * val_fraction)
    if val_fraction > 0:  # hold out at least one dialog, and keep at least one to train on
        n_val = max(min(max(n_val, 1), len(unique) - 1), 0)
    held = {unique[k] for k in np.random.default_rng(seed).permutation(len(unique))[:n_val]}
    return ([c for c, g in zip(conversations, groups, strict=False) if g not in held],
            [c for c, g in zip(conversations, groups, strict=False) if g in held])


# ---- readers and converters: each gives LoadedDialogs(conversations, ids, skipped) ----

class BadRecord(Exception):
    """Why a record is malformed; the reader adds where it is."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ChatDataError(f"{path}: cannot read it ({e.strerror or e})") from None


def _json_id(record) -> str | None:
    return record["id"] if isinstance(record, dict) and isinstance(record.get("id"), str) else None


def json_records(path: Path) -> Iterator[tuple[str, str | None, object]]:
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
                record = BadRecord("not UTF-8")
            except json.JSONDecodeError as e:
                record = BadRecord(f"not JSON ({e.msg} at column {e.colno})")
            yield f"{path}:{line}", _json_id(record), record


def _json_array(path: Path, data: bytes) -> Iterator[tuple[str, str | None, object]]:
    """The elements of one JSON array (how ShareGPT dumps come), each placed at the line it starts
    on."""
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
            raise ChatDataError(f"{path}:{e.lineno}: not JSON ({e.msg}); "
                                "the rest cannot be read") from None
        yield f"{path}:{line}", _json_id(record), record
        pos = _WHITESPACE.match(text, pos).end()
        if text[pos:pos + 1] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise ChatDataError(f"{path}:{line}: expected ',' or ']' after the record "
                                "starting here")


def _collect(records, convert, skip_bad: bool, limit: int | None = None) -> LoadedDialogs:
    """`convert` (record -> conversations) over (where, dialog id or None, record) triples."""
    conversations, ids, skipped = [], [], 0
    for where, dialog_id, record in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            got = convert(record)
            for conversation in got:
                if (problem := problem_with(conversation)) is not None:
                    raise BadRecord(problem)
        except BadRecord as e:
            if not skip_bad:
                raise ChatDataError(f"{where}: {e} {SKIP_HINT}") from None
            skipped += 1
            continue
        skipped += not got
        conversations += got
        ids += [dialog_id or where] * len(got)
        if limit and len(conversations) >= limit:
            break
    return LoadedDialogs(conversations[:limit or None], ids[:limit or None], skipped)


def _from_messages(record) -> list[Conversation]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise BadRecord('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    return [[{"role": m["role"], "content": m["content"]}
             if isinstance(m, dict) and {"role", "content"} <= m.keys()
             else m for m in record["messages"]]]  # other keys ("name", ...) are dropped


def _from_sharegpt(record) -> list[Conversation]:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise BadRecord('expected {"conversations": [{"from": ..., "value": ...}, ...]}')
    conversation = []
    for i, turn in enumerate(record["conversations"]):
        who = turn.get("from") if isinstance(turn, dict) else None
        if (not isinstance(who, str) or who not in SHAREGPT_ROLES
                or not isinstance(turn.get("value"), str)):
            raise BadRecord(f'turn {i} is not {{"from": {"|".join(SHAREGPT_ROLES)}, "value": str}}')
        conversation.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
    return [conversation]


def read_jsonl(path: str | os.PathLike, *, skip_bad: bool = False,
               limit: int | None = None) -> LoadedDialogs:
    """Conversations from `{"messages": [...]}` JSONL (an "id" is kept, other keys are ignored)."""
    return _collect(json_records(Path(path)), _from_messages, skip_bad, limit)


def read_sharegpt(path: str | os.PathLike, *, skip_bad: bool = False,
                  limit: int | None = None) -> LoadedDialogs:
    """Conversations from ShareGPT records, as JSONL or one JSON array; "from" is one of
    SHAREGPT_ROLES."""
    return _collect(json_records(Path(path)), _from_sharegpt, skip_bad, limit)


def _from_chitchat(dialog) -> list[Conversation]:
    """Both directions of a two-person dialog: the first speaker as the user, then the second (that
    version starts at the second's first message). A speaker's consecutive chat lines join by
    newlines."""
    try:
        lines = [(u["sender"], u["text"]) for message in dialog["messages"] for u in message]
    except (KeyError, TypeError):
        raise BadRecord('expected '
                        '{"messages": [[{"sender": ..., "text": ...}, ...], ...]}') from None
    turns: list[tuple[str, list[str]]] = []
    for sender, text in lines:
        if not isinstance(text, str) or not isinstance(sender, str):
            raise BadRecord("a chat line's sender or text is not a string")
        if not text.strip():
            continue
        if turns and turns[-1][0] == sender:
            turns[-1][1].append(text.strip())
        else:
            turns.append((sender, [text.strip()]))
    speakers = list(dict.fromkeys(sender for sender, _ in turns))
    if len(speakers) > 2:
        raise BadRecord(f"{len(speakers)} speakers; a dialog has two")
    out = []
    for user in speakers if len(speakers) == 2 else ():
        conversation = [{"role": "user" if s == user else "assistant", "content": "\n".join(t)}
                        for s, t in turns]
        conversation = _trimmed(conversation[conversation[0]["role"] == "assistant":])
        out += [conversation] if conversation else []
    return out


def read_chitchat(path: str | os.PathLike | None = None, *, skip_bad: bool = False,
                  limit: int | None = None) -> LoadedDialogs:
    """chitchat-dataset (the `chitchat_dataset` package's dataset.json unless `path` is given), each
    dialog twice, once per speaker as the user; a dialog with one speaker gives nothing
    (counted)."""
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
    records = ((f"{path}: dialog {key}", f"chitchat:{key}", dialog)
               for key, dialog in dialogs.items())
    return _collect(records, _from_chitchat, skip_bad, limit)


def _yaml_dialogs(path: Path, root: Path) -> Iterator[tuple[str, str, object]]:
    """(where, id, lines) per entry of a chatterbot file's `conversations` list. Composed, not
    loaded, so that every line stays a string (YAML would read `no` as False) and keeps its line
    number."""
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
        ok = (isinstance(node, yaml.SequenceNode)
              and all(isinstance(x, yaml.ScalarNode) for x in node.value))
        yield (f"{path}:{line}", f"chatterbot:{path.relative_to(root).as_posix()}:{line}",
               [x.value for x in node.value] if ok
               else BadRecord("the dialog is not a list of lines (mis-indented?)"))


def _from_chatterbot(lines: list[str]) -> list[Conversation]:
    conversation = _trimmed([{"role": ("user", "assistant")[i % 2], "content": t}
                             for i, t in enumerate(lines)])
    return [conversation] if conversation else []


def read_chatterbot(languages: Sequence[str] | None = None,
                    directory: str | os.PathLike | None = None, *, skip_bad: bool = False,
                    limit: int | None = None) -> LoadedDialogs:
    """chatterbot-corpus dialogs (all languages, or those named, e.g. ["chinese"]): alternating
    lines become user and assistant messages; a one-line dialog gives nothing (counted)."""
    if directory is None:
        from chatterbot_corpus import corpus  # only this converter needs the package
        directory = corpus.DATA_DIRECTORY
    root = Path(directory)
    available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if unknown := [lang for lang in languages or () if lang not in available]:
        raise ChatDataError(f"{root}: no chatterbot language {unknown[0]!r}; there are "
                            f"{', '.join(available)}")
    files = [f for lang in languages or available for f in sorted((root / lang).glob("*.yml"))]
    return _collect((record for f in files for record in _yaml_dialogs(f, root)), _from_chatterbot,
                    skip_bad, limit)


def load(source: str, *, skip_bad: bool = False, limit: int | None = None) -> LoadedDialogs:
    """chitchat[:PATH] | chatterbot[:LANG,LANG...] | sharegpt:PATH | jsonl:PATH."""
    kind, _, arg = source.partition(":")
    if kind == "chitchat":
        return read_chitchat(arg or None, skip_bad=skip_bad, limit=limit)
    if kind == "chatterbot":
        return read_chatterbot(arg.split(",") if arg else None, skip_bad=skip_bad, limit=limit)
    if kind in ("sharegpt", "jsonl") and arg:
        reader = read_sharegpt if kind == "sharegpt" else read_jsonl
        return reader(arg, skip_bad=skip_bad, limit=limit)
    raise ChatDataError(f"unknown source {source!r}: expected chitchat, chatterbot[:LANG,...], "
                        "sharegpt:PATH or jsonl:PATH")


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
