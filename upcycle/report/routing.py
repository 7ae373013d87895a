"""`upcycle routing MODEL --text FILE --out REPORT_DIR`: where an MoE sends the tokens of a text.

Loads the MoE, tokenises the text with its tokenizer, runs it through routing_stats.py, and writes
routing.json (figures), load.png (train/load_plot.py) and tokens.html (routing_html.py) into REPORT_DIR,
built beside it and renamed into place.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..arch import families, target_for_config, targets
from ..errors import UpcycleError
from ..outdir import check_target, staged_folder
from ..pages import release_unread_pages
from ..source import read_config, resolve
from .routing_stats import LIFT_MIN_OCCURRENCES, TOP_TOKENS, routing_stats

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_SEQ_LEN = 2048
CHARS_PER_TOKEN_READ = 64  # read at most this many characters per requested token, so a huge file is not read whole
FILES = ("routing.json", "load.png", "tokens.html")
LOAD_SCALES = ("auto", "fixed")  # load.png's colour range: up to the largest share, or up to 1/k (comparable)


@dataclass(frozen=True)
class RoutingReport:
    out: Path
    data: dict[str, Any]  # what routing.json holds
    png_size: tuple[int, int]  # load.png (width, height) in pixels
    html_tokens: int  # tokens shown in tokens.html


def routing(
    model: str,
    text: Path,
    out: Path,
    *,
    max_tokens: int = 32768,
    seq_len: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    sample_tokens: int = 512,
    html_tokens: int = 4096,
    load_scale: str = "auto",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RoutingReport:
    import torch

    _check_options(max_tokens, seq_len, batch_size, device, dtype, sample_tokens, html_tokens)
    if load_scale not in LOAD_SCALES:
        raise UpcycleError(f"--load-scale {load_scale!r} is not one of: {', '.join(LOAD_SCALES)}")
    text, out = Path(text), Path(out)
    if not text.is_file():
        raise UpcycleError(f"--text {text} does not exist (or is not a file); give a text file to route")
    check_target(out, force)  # before the slow part: an existing REPORT_DIR is refused at once
    ref = resolve(model)
    config = read_config(ref.folder)
    target = _moe_target(model, config)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise UpcycleError("--device cuda, but torch sees no CUDA device; use --device cpu")
    dtype = ("bfloat16" if device == "cuda" else "float32") if dtype == "auto" else dtype
    context = int(config.get("max_position_embeddings") or DEFAULT_SEQ_LEN)
    if seq_len is not None and seq_len > context:
        raise UpcycleError(f"--seq-len {seq_len} is longer than the model's context ({context} tokens)")
    seq_len = seq_len or min(context, DEFAULT_SEQ_LEN)

    tokenizer = _tokenizer(ref.folder, model)
    ids, pieces = tokenize(tokenizer, text, max_tokens)
    moe = _load(ref.folder, model, dtype, device)
    stats = routing_stats(
        moe,
        torch.tensor(ids),
        target=target,
        seq_len=seq_len,
        batch_size=batch_size,
        sample_tokens=sample_tokens,
        decode=lambda token: token_text(tokenizer, token),
        progress=progress,
    )
    name = ref.id if ref.kind == "hub" else Path(model).expanduser().resolve().name
    layers = list(stats.layers)
    shown = min(html_tokens, len(ids))
    data = {
        "model": name,
        "architecture": type(moe).__name__,
        "text": text.name,
        "tokens": stats.tokens,
        "seq_len": seq_len,
        "dtype": dtype,
        "device": device,
        "experts": stats.experts,
        "top_k": stats.top_k,
        "moe_layers": layers,
        "load": "each expert's share of the layer's top-k assignments; CV = std / mean of the shares (0 = balanced)",
        "load_tokens": f"the {stats.tokens:,} tokens of {text.name}",
        "divergence": {
            "weight_cosine": _mean(f["weight_cosine"] for f in stats.layers.values()),
            "output_cosine": _mean(f["output_cosine"] for f in stats.layers.values()),
            "sample_tokens": min(sample_tokens, stats.tokens),
        },
        "token_tables": {
            "assignments": "a token counts for an expert each time the expert is among its top-k",
            "tokens_by_count": f"the {TOP_TOKENS} tokens with the most assignments to the expert",
            "tokens_by_lift": (
                f"the {TOP_TOKENS} tokens with the highest lift = (share of the token's occurrences routed to the "
                f"expert) / (share of all tokens routed to it); only tokens seen at least {LIFT_MIN_OCCURRENCES} times"
            ),
        },
        "html_tokens": shown,
        "layers": [{"layer": layer, **figures} for layer, figures in stats.layers.items()],
    }

    from ..train.load_plot import write_load_png
    from .routing_html import write_tokens_html

    with staged_folder(out, force) as tmp:
        (tmp / "routing.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        png = write_load_png(
            tmp / "load.png",
            stats.load_matrix(),
            layers,
            f"Expert load per MoE layer\n{name}: {stats.tokens} tokens of {text.name}, "
            f"top-{stats.top_k} of {stats.experts} experts",
            top=1.0 / stats.top_k if load_scale == "fixed" else None,
        )
        write_tokens_html(
            tmp / "tokens.html",
            pieces[:shown],
            layers,
            {layer: rec.indices for layer, rec in stats.records.items()},
            {layer: rec.weights for layer, rec in stats.records.items()},
            stats.experts,
            f"Routing of {text.name} through {name}",
            f"The first {shown} of {stats.tokens} tokens, top-{stats.top_k} of {stats.experts} experts.",
        )
    return RoutingReport(out=out, data=data, png_size=png, html_tokens=shown)


def _check_options(
    max_tokens: int, seq_len: int | None, batch_size: int, device: str, dtype: str, sample_tokens: int, html: int
) -> None:
    if max_tokens < 2:
        raise UpcycleError(f"--max-tokens {max_tokens} must be at least 2")
    if seq_len is not None and seq_len < 2:
        raise UpcycleError(f"--seq-len {seq_len} must be at least 2")
    if batch_size < 1:
        raise UpcycleError(f"--batch-size {batch_size} must be at least 1")
    if device not in DEVICES:
        raise UpcycleError(f"--device {device!r} is not one of: {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise UpcycleError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if sample_tokens < 1:
        raise UpcycleError(f"--sample-tokens {sample_tokens} must be at least 1")
    if html < 1:
        raise UpcycleError(f"--html-tokens {html} must be at least 1")


def _moe_target(model: str, config: dict):
    model_type = config.get("model_type")
    target = target_for_config(config)
    if target is not None:
        return target
    if any(model_type in fam.model_types for fam in families().values()):
        raise UpcycleError(
            f"{model} is a dense {model_type} model with no experts to route; "
            f"make an MoE of it first: upcycle convert {model} OUT"
        )
    raise UpcycleError(
        f"{model} has model type {model_type!r}; upcycle routing reads these MoE types: "
        f"{', '.join(t.model_type for t in targets().values())}"
    )


def _tokenizer(folder: Path, model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UpcycleError(f"{model} has no usable tokenizer: {exc}".splitlines()[0]) from None


def tokenize(tokenizer, text: Path, max_tokens: int) -> tuple[list[int], list[str]]:
    """Token ids of the text as it is (no special tokens) and the text piece of each token.

    With a fast tokenizer the pieces come from the character offsets, so together they are the text exactly
    (whitespace a tokenizer trims from an offset goes to the token after it; a character split over several
    tokens goes to the first). Otherwise each token is decoded on its own.
    """
    with open(text, encoding="utf-8", errors="replace") as fh:
        content = fh.read(max_tokens * CHARS_PER_TOKEN_READ)
    if not content:
        raise UpcycleError(f"--text {text} is empty; give a text of at least 2 tokens")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_tokens]
        pieces, done = [], 0
        for _start, end in enc["offset_mapping"][: len(ids)]:
            pieces.append(content[done:end] if end > done else "")
            done = max(done, end)
    else:
        ids = tokenizer(content, add_special_tokens=False)["input_ids"][:max_tokens]
        pieces = [tokenizer.decode([token]) for token in ids]
    if len(ids) < 2:
        raise UpcycleError(f"--text {text} gives {len(ids)} token(s); routing needs at least 2")
    return ids, pieces


def token_text(tokenizer, token: int) -> str:
    """One token as a reader should see it: its decoded text, or for a piece of a multi-byte character (which
    decodes alone to U+FFFD) its bytes, e.g. <e2 94>, read from the byte-level vocabulary entry."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text
    raw = tokenizer.convert_ids_to_tokens(token) or ""
    decoder = _byte_decoder()
    if raw and all(ch in decoder for ch in raw):
        return "<" + " ".join(f"{decoder[ch]:02x}" for ch in raw) + ">"
    return raw or text  # e.g. SentencePiece byte fallback: <0xE2> is already readable


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _load(folder: Path, model: str, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # Qwen2-MoE's shared expert has size 0 on purpose (README); torch warns
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
            moe = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), device_map=None if device == "cpu" else device
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UpcycleError(f"transformers could not load {model}: {exc}".splitlines()[0]) from None
    release_unread_pages(moe, folder)  # the file pages of stacked experts and cast weights (upcycle/pages.py)
    return moe.eval()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None
