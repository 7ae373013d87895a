"""`upcycle verify`: prove on logits that an MoE computes what its dense source computed."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UpcycleError
from ..source import Checkpoint, resolve

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class VerifyReport:
    dense: str
    moe: str
    moe_class: str
    tokens: int
    input: str  # "text:<file>" or "random:<seed>"
    dtype: str
    max_abs_diff: float
    mean_kl: float  # mean over positions of KL(dense ‖ moe), in nats
    top1_agreement: float
    atol: float
    min_agreement: float
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    recorded: str | None = None  # where the report was stored in MOE's folder, if it was

    @property
    def passed(self) -> bool:
        return (
            not self.missing_keys
            and not self.unexpected_keys
            and self.max_abs_diff <= self.atol
            and self.top1_agreement >= self.min_agreement
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["missing_keys"], d["unexpected_keys"] = list(self.missing_keys), list(self.unexpected_keys)
        d["passed"] = self.passed
        d.pop("recorded")
        return d


def _load(src: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our table is the report; per-tensor loading bars are noise here
    folder = resolve(src).folder
    Checkpoint.open(folder)  # config and every shard readable and whole, else an error that names the file
    try:
        with warnings.catch_warnings():  # Qwen2-MoE's shared expert has size 0 on purpose (README); torch warns
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), output_loading_info=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if getattr(exc, "errno", None):
            raise  # the file system refused: the CLI names the file and says what to do
        raise UpcycleError(f"transformers could not load {src}: {exc}".splitlines()[0]) from None
    return folder, model.eval(), info


def input_ids(dense_folder: Path, vocab_size: int, *, text: Path | None, tokens: int, seed: int):
    import torch

    if text is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, tokens), generator=gen)
    if not text.is_file():
        raise UpcycleError(f"--text {text} does not exist")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(dense_folder)
    except (OSError, ValueError) as exc:
        if getattr(exc, "errno", None):
            raise  # the file system refused: the CLI names the file and says what to do
        raise UpcycleError(f"the dense model has no usable tokenizer for --text: {exc}".splitlines()[0]) from None
    ids = tokenizer(text.read_text(errors="replace"), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < 2:
        raise UpcycleError(f"--text {text} gives fewer than 2 tokens; give a longer text")
    return ids


def compare_logits(dense_logits, moe_logits) -> tuple[float, float, float]:
    """max |Δ|, mean KL(dense ‖ moe) and top-1 agreement over every position (computed in float64)."""
    import torch

    a, b = dense_logits.double().flatten(0, -2), moe_logits.double().flatten(0, -2)
    max_abs = (a - b).abs().max().item()
    logp, logq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).mean().item()
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return max_abs, kl, agree


def verify(
    dense: str,
    moe: str,
    *,
    text: Path | None = None,
    tokens: int = 256,
    seed: int = 0,
    dtype: str = "float32",
    atol: float = 1e-3,
    min_agreement: float = 0.999,
    record: bool = False,
) -> VerifyReport:
    """Compare logits; with `record`, store the report in MOE's upcycle.json and model card (local folders)."""
    import torch

    if dtype not in DTYPES:
        raise UpcycleError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if tokens < 2:
        raise UpcycleError(f"--tokens {tokens} must be at least 2")
    dense_folder, dense_model, _ = _load(dense, dtype)
    _, moe_model, info = _load(moe, dtype)
    vocab = dense_model.config.vocab_size
    if moe_model.config.vocab_size != vocab:
        raise UpcycleError(
            f"the vocabularies differ ({vocab} vs {moe_model.config.vocab_size}); {moe} was not made from {dense}"
        )
    limit = min(dense_model.config.max_position_embeddings, moe_model.config.max_position_embeddings)
    ids = input_ids(dense_folder, vocab, text=text, tokens=min(tokens, limit), seed=seed)
    with torch.no_grad():
        a = dense_model(input_ids=ids).logits
        b = moe_model(input_ids=ids).logits
    max_abs, kl, agree = compare_logits(a, b)
    report = VerifyReport(
        dense=dense,
        moe=moe,
        moe_class=type(moe_model).__name__,
        tokens=int(ids.numel()),
        input=f"text:{Path(text).name}" if text else f"random:{seed}",
        dtype=dtype,
        max_abs_diff=max_abs,
        mean_kl=kl,
        top1_agreement=agree,
        atol=atol,
        min_agreement=min_agreement,
        missing_keys=tuple(sorted(info.get("missing_keys", ()))),
        unexpected_keys=tuple(sorted(info.get("unexpected_keys", ()))),
    )
    if record and Path(moe).is_dir():
        from dataclasses import replace

        from ..publish.card import read_recipe, update_recipe

        if read_recipe(Path(moe)) is not None:
            try:
                # what is recorded may be published: local models by their folder name, never their path
                dense_id = Path(dense).name if Path(dense).expanduser().exists() else dense
                public = {"dense": dense_id, "moe": Path(moe).name}
                card = update_recipe(Path(moe), verify=report.to_dict() | public)
            except OSError as exc:  # a read-only folder: the check itself still stands
                return replace(report, recorded=f"not recorded ({exc.strerror})")
            report = replace(report, recorded="upcycle.json and README.md" if card else "upcycle.json")
    return report
