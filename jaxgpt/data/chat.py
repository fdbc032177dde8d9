"""Conversations as training data: the chat template, the loss mask, truncation and packing into
fixed-length rows. (No model code here, and no jax; the message format and the readers of dialog
datasets are dialogs.py's.)

The chat template, the only place it is written down (`render`):

    <|bos|> <|system_start|>...<|system_end|> <|user_start|>...<|user_end|>
            <|assistant_start|>...<|assistant_end|> <|user_start|>... (and so on)

A model imported from Hugging Face with its own chat template (ChatML, Llama 3's) keeps it: its
tokenizer's `chat_format` picks the pieces each message is wrapped in (CHAT_FORMATS), and everything
below, the mask, truncation, packing, the stop tokens of a reply, follows that layout.

The loss mask is over *targets*: mask[i] is True when token i is trained, i.e. the loss of
predicting token i from tokens 0..i-1 counts. True for every assistant content token and the
<|assistant_end|> closing it (so the model learns to stop); False for <|assistant_start|> (the
prompt supplies it), for <|bos|> and for all that the system or user wrote. A packed row of L+1
tokens becomes inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:].

    python -m jaxgpt.chat convert
        convert.source=chitchat|chatterbot[:LANG,...]|sharegpt:PATH|jsonl:PATH
        convert.out=F.jsonl [convert.limit=N convert.skip_bad=true]
    python -m jaxgpt.chat render render.file=F.jsonl render.tokenizer=SPEC [render.index=N
                                 render.seq_len=L render.ids=true]
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np

from jaxgpt.data.dialogs import ROLES, ChatDataError, Conversation, require_valid, split
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import TokenizerError

# ---- the chat template ----

@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How messages are laid out in tokens: `bos`, then each message as start(role) + content +
    end(role), and start("assistant") to prompt a reply. Each piece is a special token of the
    tokenizer (by name) or text, encoded on its own; "{role}" in a piece is the role's name."""
    bos: tuple[str, ...]
    start: tuple[str, ...]
    end: tuple[str, ...]

    def tokens(self, bos: bool = True) -> set[str]:
        """The special tokens a tokenizer needs for this format (with bos=False, those written
        around each message: a template writes its bos as a variable)."""
        pieces = (*self.bos, *self.start, *self.end) if bos else (*self.start, *self.end)
        return {p for p in pieces if is_token(p) and "{role}" not in p}


def is_token(piece: str) -> bool:
    return piece.startswith("<|") and piece.endswith("|>")


def piece_ids(tokenizer: Tokenizer, pieces: tuple[str, ...], role: str = "") -> list[int]:
    """The ids of a format's pieces: <|...|> a special token, anything else text."""
    ids = []
    for piece in pieces:
        piece = piece.replace("{role}", role)
        ids += [tokenizer.special_id(piece)] if is_token(piece) else tokenizer.encode(piece)
    return ids


# jaxgpt's own (the module docstring), and the formats of imported chat models
# (Tokenizer.chat_format, set by convert from the model's template): ChatML (SmolLM2, Qwen2.5:
# <|im_start|>user\n...<|im_end|>\n) and Llama 3's
# (<|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>). Every <|...|> piece must be a
# special token of the tokenizer.
CHAT_FORMATS = {
    "jaxgpt": ChatFormat(bos=("<|bos|>",), start=("<|{role}_start|>",), end=("<|{role}_end|>",)),
    "chatml": ChatFormat(bos=(), start=("<|im_start|>", "{role}\n"), end=("<|im_end|>", "\n")),
    "llama3": ChatFormat(bos=("<|begin_of_text|>",),
                         start=("<|start_header_id|>", "{role}", "<|end_header_id|>", "\n\n"),
                         end=("<|eot_id|>",)),
}


class Layout:
    """A tokenizer's chat format in ids: the bos ids, each role's start and end ids, and what ends a
    reply (stop_ids: the assistant's end, a user's start for a model that goes on to write the next
    turn, end of text)."""

    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.chat_format not in CHAT_FORMATS:  # a hand-edited tokenizer.json
            raise TokenizerError(f"'{tokenizer.name}': chat_format {tokenizer.chat_format!r} "
                                 f"is not one of {', '.join(CHAT_FORMATS)}")
        fmt = CHAT_FORMATS[tokenizer.chat_format]
        self.bos = piece_ids(tokenizer, fmt.bos)
        self.start = {role: piece_ids(tokenizer, fmt.start, role) for role in ROLES}
        self.end = {role: piece_ids(tokenizer, fmt.end, role) for role in ROLES}
        self.stop_ids = (self.end["assistant"][0], self.start["user"][0], tokenizer.eot_id)
        # encoded once: a data run renders it into every conversation without a system message
        self.default_system = tokenizer.encode(tokenizer.default_system)

    def overhead(self, role: str) -> int:
        """The ids a message adds around its content."""
        return len(self.start[role]) + len(self.end[role])


# per tokenizer object: a data run renders every conversation with one
@functools.lru_cache(maxsize=8)
def layout(tokenizer: Tokenizer) -> Layout:
    return Layout(tokenizer)


def _encoded(conversation: Conversation, tokenizer: Tokenizer) -> tuple[list, list]:
    """Each message's role and encoded content, led by the tokenizer's default system message (its
    template's) when there is none: every rendering and truncation keeps it as a system message."""
    roles, encoded = ([m["role"] for m in conversation],
                      [tokenizer.encode(m["content"]) for m in conversation])
    if tokenizer.default_system and roles[0] != "system":
        roles, encoded = ["system", *roles], [layout(tokenizer).default_system, *encoded]
    return roles, encoded


def _template(roles: Sequence[str], contents: Sequence[Sequence[int]], tokenizer: Tokenizer,
              for_generation: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of already-encoded messages; see the module docstring for the layout."""
    lay = layout(tokenizer)
    ids, mask = list(lay.bos), [False] * len(lay.bos)
    for role, content in zip(roles, contents, strict=False):
        content = list(content)
        ids += lay.start[role] + content + lay.end[role]
        trained = role == "assistant"  # the content and the end that closes it
        mask += [False] * len(lay.start[role]) + [trained] * (len(content) + len(lay.end[role]))
    if for_generation:
        ids += lay.start["assistant"]
        mask += [False] * len(lay.start["assistant"])
    return np.asarray(ids, np.int32), np.asarray(mask, np.bool_)


def render(conversation: Conversation, tokenizer: Tokenizer, for_generation: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, loss mask bool) of a conversation; `for_generation` appends the assistant's start
    after the user's last message, so the model writes the reply (no mask is trained there)."""
    require_valid(conversation, trainable=False)
    if for_generation and conversation[-1]["role"] != "user":
        raise ChatDataError("conversation: to prompt a reply the last message must be the user's")
    return _template(*_encoded(conversation, tokenizer), tokenizer, for_generation)


def render_prompt(conversation: Conversation, tokenizer: Tokenizer, max_tokens: int
                  ) -> np.ndarray | None:
    """The ids that prompt the next reply (`render(..., for_generation=True)`) within max_tokens,
    dropping the oldest user/assistant pairs (the system message and the last user message stay);
    None when even those two do not fit. Each message is encoded once, however many are dropped."""
    require_valid(conversation, trainable=False)
    if conversation[-1]["role"] != "user":
        raise ChatDataError("conversation: to prompt a reply the last message must be the user's")
    roles, encoded = _encoded(conversation, tokenizer)
    head = [0] if roles[0] == "system" else []
    first = len(head)
    while True:
        keep = head + list(range(min(first, len(roles) - 1), len(roles)))
        ids, _ = _template([roles[i] for i in keep], [encoded[i] for i in keep], tokenizer,
                           for_generation=True)
        if len(ids) <= max_tokens or first >= len(roles) - 1:
            return ids if len(ids) <= max_tokens else None
        first += 2  # a (user, assistant) pair, oldest first


def _kept(roles: Sequence[str], lengths: Sequence[int], max_tokens: int) -> list[int] | None:
    """Indices of the messages a trainable conversation keeps within `max_tokens` rendered tokens
    (`lengths`: each message's, rendered; max_tokens less the bos ids): the system message, then the
    newest whole user/assistant pairs that fit (a trailing user message is dropped). None when not
    even the last pair fits: an assistant reply is never split."""
    head = [0] if roles[0] == "system" else []
    end = len(roles) - (roles[-1] == "user")
    budget, first = max_tokens - sum(lengths[i] for i in head), end
    for j in range(end - 2, len(head) - 1, -2):  # (user j, assistant j+1), newest first
        budget -= lengths[j] + lengths[j + 1]
        if budget < 0:
            break
        first = j
    return head + list(range(first, end)) if first < end else None


def render_truncated(conversation: Conversation, tokenizer: Tokenizer, seq_len: int
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """`render` within a context of seq_len + 1 tokens, dropping the oldest user/assistant pairs
    (the system message stays); None when even the system message and the last pair do not fit."""
    require_valid(conversation)
    roles, encoded = _encoded(conversation, tokenizer)
    lay = layout(tokenizer)
    keep = _kept(roles, [len(e) + lay.overhead(r) for r, e in zip(roles, encoded, strict=False)],
                 seq_len + 1 - len(lay.bos))
    return (None if keep is None
            else _template([roles[i] for i in keep], [encoded[i] for i in keep], tokenizer))


def render_windows(conversation: Conversation, tokenizer: Tokenizer, seq_len: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """A long conversation as consecutive windows of whole pairs that each fit seq_len + 1 tokens
    (the system message in each), oldest first, so no reply is lost to truncation; a pair too long
    to fit even alone is dropped. The last window is `render_truncated`'s."""
    require_valid(conversation)
    roles, encoded = _encoded(conversation, tokenizer)
    lay = layout(tokenizer)
    lengths, n_head = ([len(e) + lay.overhead(r) for r, e in zip(roles, encoded, strict=False)],
                       int(roles[0] == "system"))
    windows, end = [], len(roles) - (roles[-1] == "user")
    while end > n_head:
        keep = _kept(roles[:end], lengths[:end], seq_len + 1 - len(lay.bos))
        windows += [keep] if keep else []
        # before this window, or before the pair that never fits
        end = keep[n_head] if keep else end - 2
    return [_template([roles[i] for i in keep], [encoded[i] for i in keep], tokenizer)
            for keep in windows[::-1]]


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
        return cls(cat([i for i, _ in rendered], np.int32), cat([m for _, m in rendered], np.bool_),
                   offsets, dropped)

    @classmethod
    def build(cls, conversations: Sequence[Conversation], tokenizer: Tokenizer, seq_len: int,
              windows: bool = False) -> Rendered:
        """Validate and render every conversation within seq_len + 1 tokens: truncated, or as
        `render_windows` when `windows`; `dropped` counts the conversations that gave nothing."""
        out, dropped = [], 0
        for i, conversation in enumerate(conversations):
            require_valid(conversation, f"conversation {i}")
            if windows:
                got = render_windows(conversation, tokenizer, seq_len)
            else:
                got = ([r] if (r := render_truncated(conversation, tokenizer, seq_len)) is not None
                       else [])
            out += got
            dropped += not got
        return cls.of(out, dropped)


def assemble(data: Rendered, rows: Sequence[Sequence[int]], seq_len: int) -> dict:
    """A batch dict of [B, seq_len] arrays from rows of conversation indices (an empty row is
    padding)."""
    tokens, segments, mask = (np.zeros((len(rows), seq_len + 1), dt)
                              for dt in (np.int32, np.int32, np.bool_))
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
    """First-fit the (ids, mask) conversations, in order, into batch_size rows of seq_len + 1
    tokens: [B, seq_len] `inputs`, `targets`, `segment_ids` (1, 2, ... per conversation in a row,
    0 = padding) and `loss_mask` (float32, 0 on padding)."""
    data = Rendered.of(rendered)
    if len(data) and (longest := int(data.lengths.max())) > seq_len + 1:
        raise ChatDataError(f"a conversation has {longest} tokens, more than seq_len + 1 = "
                            f"{seq_len + 1} (render_truncated fits it)")
    rows = first_fit(data.lengths, seq_len + 1)
    if len(rows) > batch_size:
        raise ChatDataError(f"{len(data)} conversations need {len(rows)} rows of {seq_len + 1} "
                            f"tokens, more than batch_size={batch_size}")
    return assemble(data, rows + [[]] * (batch_size - len(rows)), seq_len)


def shuffled_rows(rng: np.random.Generator, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """One epoch of packed rows: the items in a seeded order, first-fit into rows of `capacity`
    tokens, the rows shuffled."""
    order = rng.permutation(len(lengths))
    rows = [order[row].tolist() for row in first_fit(lengths[order], capacity)]
    return [rows[k] for k in rng.permutation(len(rows))]


def step_rows(source, step: int, process_index: int = 0, process_count: int = 1) -> list[list[int]]:
    """Process p's rows [p*B/P, (p+1)*B/P) of step `step`'s batch, from the stream of rows that
    source.epoch_rows(0), epoch_rows(1), ... make (source._epoch_starts caches where each
    starts)."""
    starts, rows, row = source._epoch_starts, [], step * source.batch_size
    while len(rows) < source.batch_size:
        while starts[-1] <= row:  # pack epochs until the row's epoch is known
            starts.append(starts[-1] + len(source.epoch_rows(len(starts) - 1)))
        epoch = bisect.bisect_right(starts, row) - 1
        first = row - starts[epoch]
        taken = source.epoch_rows(epoch)[first:first + source.batch_size - len(rows)]
        rows, row = rows + taken, row + len(taken)
    per_process = source.batch_size // process_count
    return rows[process_index * per_process:(process_index + 1) * per_process]


class ChatBatches:
    """Packed SFT batches, a batch source (see tokens.py): `batch_at(step)` is a pure function of
    (seed, step).

    Every conversation is rendered once. Each epoch shuffles the conversations (seeded by (seed,
    epoch)), first-fits them into rows of seq_len + 1 tokens, and shuffles the rows; the steps walk
    this stream of rows, batch_size at a time, from one epoch into the next. The held-out
    conversations (`val`, or a `val_fraction` split by `ids`) are packed once, in order.
    A conversation longer than the context is truncated (`render_truncated`), or with `windows`
    cut into windows of whole exchanges (`render_windows`), which keeps every reply that fits.
    `training=False` (evaluation only) accepts having no training conversations."""

    def __init__(self, conversations: Sequence[Conversation], tokenizer: Tokenizer, seq_len: int,
                 batch_size: int, seed: int, *, val: Sequence[Conversation] = (),
                 val_fraction: float = 0.0, ids: Sequence[str] | None = None, windows: bool = False,
                 training: bool = True):
        if val_fraction and val:
            raise ChatDataError("give held-out conversations (val) or a val_fraction, not both")
        if val_fraction:
            conversations, val = split(conversations, val_fraction, seed, ids)
        self.tokenizer, self.token_bytes = tokenizer, tokenizer.token_byte_lengths()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train, self.val = (Rendered.build(c, tokenizer, seq_len, windows)
                                for c in (conversations, val))
        if training and not len(self.train):
            raise ChatDataError(f"none of the {len(conversations)} training conversations fits in "
                                f"seq_len + 1 = {seq_len + 1} tokens")
        self._epoch_starts = [0]             # global index of each packed epoch's first row
        self._epochs: dict[int, list] = {}   # the last two epochs' rows

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rows = shuffled_rows(np.random.default_rng([self.seed, 1, epoch]), self.train.lengths,
                                 self.seq_len + 1)
            self._epochs = {e: r for e, r in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = rows
        return self._epochs[epoch]

    def batch_at(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """Process p's rows [p*B/P, (p+1)*B/P) of the global batch of `step`."""
        return assemble(self.train, step_rows(self, step, process_index, process_count),
                        self.seq_len)

    def eval_batches(self, split: str = "val", batch_size: int = 0, stride: int = 0,
                     max_tokens: int = 0) -> Iterator[dict]:
        """Every conversation of the split (`val`, `train` or `all`) that fits the context, exactly
        once, packed in order; the last batch is padded. (stride and max_tokens are for token
        data.)"""
        batch_size = batch_size or self.batch_size
        parts = {"val": [self.val], "train": [self.train], "all": [self.train, self.val]}[split]
        data = Rendered.of([(p.ids[p.offsets[i]:p.offsets[i + 1]],
                             p.mask[p.offsets[i]:p.offsets[i + 1]])
                            for p in parts for i in range(len(p))]) if len(parts) > 1 else parts[0]
        rows = first_fit(data.lengths, self.seq_len + 1)
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            yield assemble(data, chunk + [[]] * (batch_size - len(chunk)), self.seq_len)
