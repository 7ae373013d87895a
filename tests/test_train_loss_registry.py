"""A new router loss is one function and one spec field: a throwaway term goes through losses.LOSSES into the
step's total, metrics.jsonl, the progress line and the card's recipe, with nothing else changed."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console
from test_train import moe_store, text  # noqa: F401  (fixtures)

from upcycle.errors import UpcycleError
from upcycle.train import loop
from upcycle.train.losses import LOSSES, LossTerm
from upcycle.train.metrics import read_metrics
from upcycle.train.spec import TrainSpec, loss_coefficients


@dataclass(frozen=True)
class EntropySpec(TrainSpec):
    """TrainSpec with one more field, as a new loss would add it to spec.py."""

    entropy_loss_coef: float = 0.05


def router_entropy(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the routing distribution over the T tokens, float32: (T, E) -> ()."""
    p = torch.softmax(logits.float(), dim=-1)  # (T, E)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean()


def test_a_new_router_loss_is_one_function_and_one_spec_field(moe_store, text, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(LOSSES, "entropy", LossTerm(router_entropy, "entropy_loss_coef"))
    assert loss_coefficients(EntropySpec) == ("aux_loss_coef", "z_loss_coef", "entropy_loss_coef")
    with pytest.raises(UpcycleError, match="--entropy-loss-coef -1 must not be negative"):
        EntropySpec(entropy_loss_coef=-1)
    spec = EntropySpec(data=str(text), steps=3, seq_len=32, micro_batch=2, log_every=1, save_every=3, eval_every=3)
    shown = io.StringIO()
    out = tmp_path / "run"
    loop.train(str(moe_store("mixtral")), out, spec, console=Console(file=shown, width=300))
    records = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert list(r)[4:9] == ["loss", "lm", "balance", "z", "entropy"]
        total = r["lm"] + 0.01 * r["balance"] + 0.001 * r["z"] + 0.05 * r["entropy"]
        assert r["loss"] == pytest.approx(total, rel=1e-6)
        assert 0 < r["entropy"] <= math.log(4) + 1e-6  # 4 experts
    assert "entropy 1." in shown.getvalue()  # the progress line names it
    recipe = json.loads((out / "final" / "upcycle.json").read_text())["training"]["recipe"]
    assert recipe["entropy_loss_coef"] == 0.05
