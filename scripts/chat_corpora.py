"""Real conversations with no network: two PyPI packages that ship them, converted to the `messages` records
`upcycle train --format chat` reads (one JSON object per line).

    pip install chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3
    python scripts/chat_corpora.py chitchat chitchat.jsonl --max-messages 8
    python scripts/chat_corpora.py chatterbot chatterbot.jsonl

- chitchat-dataset (MIT): 7,168 human-human conversations (BYU's "Chit-Chat Challenge"), stored as runs of messages
  by one sender. The first sender becomes "user", the other "assistant"; a run's messages are joined with a
  newline. `--max-messages N` cuts a long conversation into windows of N messages, each starting with the user.
- chatterbot-corpus (BSD): ~2,000 short English conversations in YAML, one topic per file; lines alternate
  user / assistant.
A conversation is written only if it has an assistant turn; a trailing user message (no answer) is dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

Message = dict[str, str]


def chitchat(max_messages: int | None = None) -> Iterator[list[Message]]:
    """chitchat-dataset's conversations, in the package's order."""
    data = json.loads(files("chitchat_dataset").joinpath("dataset.json").read_text(encoding="utf-8"))
    for conversation in data.values():
        runs = [run for run in conversation["messages"] if run]
        if not runs:
            continue
        first = runs[0][0]["sender"]
        messages = []
        for run in runs:
            text = "\n".join(m["text"].strip() for m in run if m["text"].strip())
            if text:
                role = "user" if run[0]["sender"] == first else "assistant"
                if messages and messages[-1]["role"] == role:  # an empty run between two of one sender
                    messages[-1]["content"] += "\n" + text
                else:
                    messages.append({"role": role, "content": text})
        yield from _windows(messages, max_messages)


def chatterbot(language: str = "english") -> Iterator[list[Message]]:
    """chatterbot-corpus's conversations of one language, file by file in name order."""
    import yaml

    folder = files("chatterbot_corpus").joinpath("data", language)
    for name in sorted(p.name for p in folder.iterdir() if p.name.endswith(".yml")):
        doc: Any = yaml.safe_load(folder.joinpath(name).read_text(encoding="utf-8"))
        for lines in doc.get("conversations") or []:
            texts = [str(line).strip() for line in lines if line is not None and str(line).strip()]
            roles = ("user", "assistant")
            yield from _windows([{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)], None)


def _windows(messages: list[Message], size: int | None) -> Iterator[list[Message]]:
    """The conversation, or windows of at most `size` messages each starting with the user; every window ends
    with an assistant turn."""
    start = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if start is None:
        return
    messages = messages[start:]
    step = size if size else len(messages)
    for lo in range(0, len(messages), step):
        window = messages[lo : lo + step]
        while window and window[-1]["role"] != "assistant":
            window = window[:-1]
        if window and window[0]["role"] == "user":
            yield window


def write(conversations: Iterator[list[Message]], out: Path, limit: int | None = None) -> int:
    """One {"messages": [...]} per line into `out` (written beside and renamed into place); -> conversations."""
    tmp = out.with_name(f".{out.name}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for messages in conversations:
            if limit is not None and count >= limit:
                break
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(out)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", choices=["chitchat", "chatterbot"])
    parser.add_argument("out", type=Path, help="the .jsonl file to write")
    parser.add_argument("--max-messages", type=int, default=None, help="chitchat: cut into windows of N messages")
    parser.add_argument("--limit", type=int, default=None, help="write at most N conversations")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"error: {args.out} already exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        source = chitchat(args.max_messages) if args.corpus == "chitchat" else chatterbot()
        n = write(source, args.out, args.limit)
    except ModuleNotFoundError as exc:
        package = {"chitchat_dataset": "chitchat-dataset==0.9.0", "chatterbot_corpus": "chatterbot-corpus==1.3.3"}
        print(f"error: {exc.name} is not installed; pip install {package.get(exc.name, exc.name)}", file=sys.stderr)
        return 2
    print(f"wrote {n} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
