"""Conversations for instruction tuning (`upcycle train --format chat`): records -> token ids with the loss on the
assistant's tokens only -> rows of at most `seq_len` tokens, packed or one conversation per row.

What DATA may be: a `.jsonl` file of records `{"messages": [{"role": ..., "content": ...}, ...]}` (one per line),
a `.json` file holding a list of such records, a `.parquet` file with a `messages` column, a folder of those files
(read recursively in sorted path order, hidden files skipped), or a `datasets` Hub id `org/name[:config]` (its
"train" split, through the datasets cache: offline, only what is cached). Roles are system, user and assistant.

Rendering: the tokenizer's own chat template (`apply_chat_template`), never a format of ours. Which tokens are the
assistant's is read from the template's own renderings, not from strings we guess: for the assistant turn i the
template renders the conversation up to turn i with the generation prompt (the text before the answer) and up to
turn i included (the text through the answer's end-of-turn marker); both must be prefixes of the whole rendering,
and the tokens that start between the two ends are the answer's. The labels are the token ids there and -100
everywhere else (system and user turns, the template's headers, padding). The generation prompt itself is not
trained; the end-of-turn marker after the answer is (so the model learns to stop).

A conversation longer than `seq_len` tokens is cut after its last assistant turn that fits (`--long-conversations
truncate`, whole turns only; one whose first answer does not fit is left out and counted) or refused with its
record named (`refuse`).

Rows: with packing, conversations in order are packed greedily into rows of at most `seq_len` tokens; each
conversation's position ids restart at 0, which transformers (5.x, with no attention mask and no cache) turns into
a block-diagonal causal mask, so no token attends across conversations. Without packing, one conversation per row.
A micro-batch is cut to its longest row; the rest is padding (its own segment, positions from 0, labels -100).

Held-out conversations: a seeded permutation of the conversations; the first `eval_fraction` (at least one) are the
eval set, or `--eval-data` gives one. Tokenised in memory at every start (no cache): conversations are small.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import UpcycleError
from ..seeds import generator as seeded_generator
from ..source import public_name
from .data import DataInfo

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
FIELD = "messages"
CHAT_EXTENSIONS = (".jsonl", ".json", ".parquet")
IGNORE = -100
LOSS_ON = "assistant tokens"


@dataclass(frozen=True)
class Record:
    """One conversation as read, with where it came from for messages ("chat.jsonl line 7")."""

    where: str
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class Tokenised:
    """One conversation rendered by the chat template: token ids and labels (-100 but on the assistant's tokens)."""

    ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ChatOptions:
    seq_len: int
    packing: bool = True
    long_conversations: str = "truncate"  # or "refuse"


# --------------------------------------------------------------------------------------------------------------
# Reading records


def looks_like_chat(data: str) -> bool:
    """Whether DATA's first record has a `messages` field (--format auto). A Hub id is loaded to look at its
    columns; anything unreadable is not chat here (the text reader then says what is wrong with it)."""
    try:
        first = next(_rows(data, "--data"), None)
    except (UpcycleError, OSError, ValueError):
        return False
    return first is not None and isinstance(first[1], dict) and FIELD in first[1]


def read_records(data: str, flag: str) -> Iterator[Record]:
    """Every record of DATA, checked, in order; a bad record is refused in one line naming it."""
    for where, row in _rows(data, flag):
        yield _record(row, where, flag)


def _rows(data: str, flag: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every record of DATA, unchecked."""
    path = Path(data).expanduser()
    if path.is_file():
        yield from _file_rows(path, path.name, flag)
    elif path.is_dir():
        files = _folder_files(path, data, flag)
        for f in files:
            yield from _file_rows(f, f"{path.name}/{f.relative_to(path).as_posix()}", flag)
    elif data.startswith((".", "/", "~")) or Path(data).suffix.lower() in CHAT_EXTENSIONS or data.count("/") > 1:
        raise UpcycleError(f"{flag} {data} does not exist")
    else:
        for i, row in enumerate(_hub_rows(data, flag), 1):
            yield f"{data} row {i}", row


def _folder_files(path: Path, data: str, flag: str) -> list[Path]:
    def visible(p: Path) -> bool:
        return p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)

    found = sorted((p for p in path.rglob("*") if visible(p)), key=lambda p: p.relative_to(path).as_posix())
    files = [p for p in found if p.suffix.lower() in CHAT_EXTENSIONS]
    if not files:
        raise UpcycleError(f"{flag} {data}: the folder has no .jsonl, .json or .parquet files of conversations")
    return files


def _file_rows(path: Path, label: str, flag: str) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise UpcycleError(f"{flag} {label}: not a readable parquet file ({_first_line(exc)})") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield f"{label} row {i}", row
        return
    if suffix not in (".jsonl", ".json"):
        raise UpcycleError(f"{flag} {label}: give conversations as .jsonl, .json or .parquet files")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UpcycleError(f"{flag} {label} is not UTF-8 text ({_first_line(exc)})") from None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UpcycleError(f"{flag} {label}: not valid JSON ({exc})") from None
        for i, row in enumerate(rows, 1):
            yield f"{label} item {i}", row
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UpcycleError(f"{flag} {label} line {number}: not valid JSON ({exc.msg})") from None
        yield f"{label} line {number}", row


def _hub_rows(name_config: str, flag: str) -> Iterator[dict[str, Any]]:
    import datasets

    name, _, config = name_config.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = "; offline, only a dataset already in the datasets cache can be read" if offline else ""
        raise UpcycleError(f"{flag} {name_config}: could not load it as a datasets Hub id{hint}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UpcycleError(f"{flag} {name_config} has no 'train' split (it has: {', '.join(loaded)})")
        loaded = loaded["train"]
    if FIELD not in loaded.column_names:
        columns = ", ".join(loaded.column_names)
        raise UpcycleError(f"{flag} {name_config} has no {FIELD!r} column (its columns: {columns})")
    yield from loaded


def _record(row: Any, where: str, flag: str) -> Record:
    """A record's messages, checked: a list of {role, content}, roles known, contents non-empty text, and at least
    one assistant turn. Anything else is refused in one line naming the record."""

    def bad(problem: str) -> UpcycleError:
        return UpcycleError(f"{flag} {where}: {problem}; fix or remove the record")

    if not isinstance(row, dict) or FIELD not in row:
        raise bad(f'no {FIELD!r} field (each record is {{"messages": [{{"role": ..., "content": ...}}, ...]}})')
    messages = row[FIELD]
    if not isinstance(messages, list) or not messages:
        raise bad(f"{FIELD!r} is not a non-empty list of messages")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or m["role"] is None:
            raise bad(f"message {i} has no role")
        if m["role"] not in ROLES:
            raise bad(f"message {i} has the unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise bad(f"message {i} ({m['role']}) has no content")
    if not any(m["role"] == "assistant" for m in messages):
        raise bad("no assistant turn, so nothing to train on")
    return Record(where, [{"role": m["role"], "content": m["content"]} for m in messages])


# --------------------------------------------------------------------------------------------------------------
# Rendering and labels


def check_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UpcycleError(
            "the model's tokenizer has no chat template, which --format chat needs to render conversations; "
            "train an instruct model (or set tokenizer.chat_template and save it), or train on text"
        )


def tokenise(record: Record, tokenizer: PreTrainedTokenizerBase, options: ChatOptions, flag: str) -> Tokenised | None:
    """The conversation's ids and labels through the tokenizer's chat template (see the module docstring); None
    when --long-conversations truncate leaves nothing (its first answer alone is longer than seq_len)."""
    full = _render(tokenizer, record, record.messages, False, flag)
    ids, starts = _encode(tokenizer, full)
    if len(ids) > options.seq_len and options.long_conversations == "refuse":
        raise UpcycleError(
            f"{flag} {record.where}: the conversation is {len(ids)} tokens, more than --seq-len {options.seq_len}; "
            "raise --seq-len, or pass --long-conversations truncate to cut it after the last whole turn that fits"
        )
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    kept = 0  # tokens up to the end of the last assistant turn that fits
    for i, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, record, record.messages[:i], True, flag)
        through = _render(tokenizer, record, record.messages[: i + 1], False, flag)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise UpcycleError(
                f"{flag} {record.where}: the chat template does not render this conversation as a sequence of "
                f"growing prefixes (turn {i + 1} renders differently inside the whole), so its assistant tokens "
                "cannot be told apart; use a model whose template does"
            )
        lo, hi = _token_at(starts, len(before)), _token_at(starts, len(through))
        if hi > options.seq_len:
            break
        labels[lo:hi] = ids[lo:hi]
        kept = hi
    if kept == 0:
        return None
    return Tokenised(ids[:kept].copy(), labels[:kept].copy())


def _render(
    tokenizer: PreTrainedTokenizerBase, record: Record, messages: list[dict[str, Any]], prompt: bool, flag: str
) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:  # templates raise their own errors
        raise UpcycleError(f"{flag} {record.where}: the chat template refused it: {_first_line(exc)}") from None


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[np.ndarray, list[int]]:
    """(ids (n,) int64, each token's start in `text`), encoded as apply_chat_template(tokenize=True) does: no
    special tokens added."""
    if not getattr(tokenizer, "is_fast", False):
        raise UpcycleError("--format chat needs a fast tokenizer (one that reports offsets); this model's is not")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return np.asarray(enc["input_ids"], dtype=np.int64), [start for start, _ in enc["offset_mapping"]]


def _token_at(starts: list[int], chars: int) -> int:
    """How many tokens start before character `chars`: the index of the token where the text from `chars` on
    begins."""
    return bisect.bisect_left(starts, chars)


# --------------------------------------------------------------------------------------------------------------
# Rows and batches


@dataclass(frozen=True)
class ChatBlocks:
    """Rows of conversations (packed or one each) of at most seq_len tokens; `inputs` makes a micro-batch of them."""

    seq_len: int
    rows: tuple[tuple[int, ...], ...]  # the conversations of each row, in order
    conversations: tuple[Tokenised, ...]
    pad_id: int
    left_out: int = 0  # conversations of DATA (and --eval-data) whose first answer alone is longer than seq_len
    loss_on: str = LOSS_ON

    @property
    def n_blocks(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self.conversations)

    def inputs(self, idx: Sequence[int], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels", "position_ids"}, each (len(idx), W) int64, W the longest row among them; the
        position ids restart at each conversation and at the padding."""
        rows = [self.rows[i] for i in idx]
        width = max(sum(len(self.conversations[c]) for c in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
        positions = torch.zeros((len(rows), width), dtype=torch.int64)
        for b, row in enumerate(rows):
            at = 0
            for c in row:
                conv = self.conversations[c]
                n = len(conv)
                ids[b, at : at + n] = torch.from_numpy(conv.ids)
                labels[b, at : at + n] = torch.from_numpy(conv.labels)
                positions[b, at : at + n] = torch.arange(n)
                at += n
            positions[b, at:] = torch.arange(width - at)  # the padding: a segment of its own
        out = {"input_ids": ids, "labels": labels, "position_ids": positions}
        return out if device is None else {k: v.to(device) for k, v in out.items()}


def pack(lengths: Sequence[int], seq_len: int, packing: bool) -> tuple[tuple[int, ...], ...]:
    """Rows of conversation indices: greedily in order, each row at most seq_len tokens (packing), or one each."""
    if not packing:
        return tuple((i,) for i in range(len(lengths)))
    rows: list[tuple[int, ...]] = []
    row: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if row and used + n > seq_len:
            rows.append(tuple(row))
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(tuple(row))
    return tuple(rows)


# --------------------------------------------------------------------------------------------------------------
# prepare_chat()


def prepare_chat(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    options: ChatOptions,
    *,
    eval_data: str | None = None,
    eval_fraction: float = 0.01,
    seed: int = 0,
) -> tuple[ChatBlocks, ChatBlocks, DataInfo]:
    """Train and held-out rows of DATA's conversations, and what was read (DataInfo: `documents` counts
    conversations, `*_tokens` the tokens kept). Refuses bad records and a tokenizer with no chat template."""
    check_template(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UpcycleError("the model's tokenizer has neither a pad nor an EOS token to pad conversations with")
    train, dropped = _tokenised(data, "--data", tokenizer, options)
    if eval_data is not None:
        held, dropped_eval = _tokenised(eval_data, "--eval-data", tokenizer, options)
        dropped += dropped_eval
        n_eval = len(held)
    else:
        if len(train) < 2:
            raise UpcycleError(
                f"--data {data} has {len(train)} usable conversation(s), too few to hold one out for evaluation "
                "and train on the rest; give more conversations or --eval-data"
            )
        order = torch.randperm(len(train), generator=seeded_generator("eval", seed))
        n_eval = max(1, round(eval_fraction * len(train)))
        held_set = set(order[:n_eval].tolist())
        held = [c for i, c in enumerate(train) if i in held_set]
        train = [c for i, c in enumerate(train) if i not in held_set]

    def blocks(convs: list[Tokenised], left_out: int) -> ChatBlocks:
        rows = pack([len(c) for c in convs], options.seq_len, options.packing)
        return ChatBlocks(options.seq_len, rows, tuple(convs), int(pad), left_out=left_out)

    train_blocks, eval_blocks = blocks(train, dropped), blocks(held, 0)
    info = DataInfo(
        sources=[public_name(data)],
        documents=len(train) + (0 if eval_data is not None else n_eval),
        train_tokens=train_blocks.n_tokens,
        eval_tokens=eval_blocks.n_tokens,
        cache_hit=False,
        key=_key(data, eval_data, tokenizer, options, eval_fraction, seed),
        eval_sources=[public_name(eval_data)] if eval_data else [],
        eval_documents=n_eval,
        dtype="int64",
        unit="conversations",
    )
    return train_blocks, eval_blocks, info


def _tokenised(data: str, flag: str, tokenizer: Any, options: ChatOptions) -> tuple[list[Tokenised], int]:
    out: list[Tokenised] = []
    dropped = 0
    for record in read_records(data, flag):
        conv = tokenise(record, tokenizer, options, flag)
        if conv is None:
            dropped += 1
        else:
            out.append(conv)
    if not out:
        why = f" ({dropped} whose first answer is longer than --seq-len {options.seq_len})" if dropped else ""
        raise UpcycleError(f"{flag} {data} holds no usable conversation{why}")
    return out, dropped


def _key(
    data: str, eval_data: str | None, tokenizer: Any, options: ChatOptions, eval_fraction: float, seed: int
) -> str:
    """What a resumed run must find again: the data's files (names, sizes, mtimes), the tokenizer and its template,
    and every option that shapes the rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    record = {
        "format": "chat",
        "data": _identity(data),
        "eval": _identity(eval_data) if eval_data else {"fraction": eval_fraction, "seed": seed},
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "template": tokenizer.chat_template,
        "options": [options.seq_len, options.packing, options.long_conversations],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _identity(data: str) -> list[Any]:
    path = Path(data).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return ["hub", data]
    names = [p.relative_to(path).as_posix() if path.is_dir() else p.name for p in files]
    return [[name, p.stat().st_size, p.stat().st_mtime_ns] for name, p in zip(names, files, strict=True)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
