"""Documents -> token ids, with every tokenizer call bounded in size however long one document is.

A fast tokenizer needs ~130-240 bytes of memory per character it is given in one call (the encodings keep
offsets, token strings and masks until the call returns), so a 50 MB line tokenised whole takes over 10 GB.
Here a document longer than PIECE_CHARS characters is cut into pieces of at most PIECE_CHARS, and each call gets
at most CALL_CHARS characters (several short documents, or a few pieces of a long one); a document's ids are the
concatenation of its pieces' ids.

Where a cut goes: before a space (U+0020) that is followed by a character that is not whitespace, the last such
place in the second half of the piece's window. Byte-level BPE tokenizers split their pre-tokens there and never
merge across a pre-token (GPT-2, Llama 3, Qwen2, SmolLM2 and the other tokenizers whose regex pre-tokenizer
starts a word with its leading space), so for them the pieces give exactly the ids of the whole document. For a
window with no such place (a 64K-character run without a space) the cut is made at the window's end; then, and
for tokenizers that do not split before a space (e.g. a SentencePiece normaliser that prepends "▁" to every
input), the one or two tokens at each cut may differ from tokenising the document whole: one cut per PIECE_CHARS
characters of a document that long, a negligible share of its tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

PIECE_CHARS = 1 << 16  # characters of one piece of a long document
CALL_CHARS = 1 << 20  # characters given to the tokenizer in one call

_LAST_CUT = re.compile(r".* (?=\S)", re.S)  # greedy: matches up to the LAST space followed by a non-space


@dataclass(frozen=True)
class Encoded:
    """The ids of a batch of documents, each followed by EOS; documents that gave no ids are left out."""

    ids: np.ndarray  # (tokens,) int64, the documents' ids one after another, each + EOS
    lengths: np.ndarray  # (documents kept,) int64, tokens of each document, EOS included


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """TEXT in consecutive pieces of at most SIZE characters, cut as the module docstring says."""
    start, n = 0, len(text)
    while n - start > size:
        limit = start + size
        found = _LAST_CUT.match(text, start + size // 2, limit + 1)  # +1: the lookahead may see text[limit]
        cut = limit if found is None else found.end() - 1  # found.end() - 1 is the space, > start
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_documents(tokenizer: Any, texts: list[str], eos: int) -> Encoded:
    """Tokenise TEXTS without special tokens, in calls of at most CALL_CHARS characters (see the module docstring)."""
    per_doc: list[list[np.ndarray]] = [[] for _ in texts]  # each document's id arrays, one per piece
    batch: list[str] = []
    owners: list[int] = []
    chars = 0

    def flush() -> None:
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for owner, ids in zip(owners, enc["input_ids"], strict=True):
            per_doc[owner].append(np.asarray(ids, dtype=np.int64))
        batch.clear()
        owners.clear()

    for d, text in enumerate(texts):
        for piece in pieces(text):
            if batch and chars + len(piece) > CALL_CHARS:
                flush()
                chars = 0
            batch.append(piece)
            owners.append(d)
            chars += len(piece)
    if batch:
        flush()
    tail = np.array([eos], dtype=np.int64)
    docs = [[*arrays, tail] for arrays in per_doc if sum(len(a) for a in arrays)]
    lengths = np.array([sum(len(a) for a in arrays) for arrays in docs], dtype=np.int64)
    ids = np.concatenate([a for arrays in docs for a in arrays]) if docs else np.zeros(0, dtype=np.int64)
    return Encoded(ids, lengths)
