"""What final/ does with the balancing bias of --balance bias|both (balance.py).

A target with a slot for it routes exactly as the run did: Ernie 4.5-MoE adds `e_score_correction_bias` to its
softmax probabilities to choose the top-k, and so does upcycle's generic wrapper; the biases are written there.
Mixtral, Qwen2/3-MoE, OLMoE/FlexOlmo, GraniteMoE and HunYuan-MoE route by the probabilities alone, so final/ routes
without the bias. Before writing such a final/ the run measures what that costs on held-out text: two forwards of
the trained model, with the bias (as trained) and without (as exported), compared per MoE layer (how often the
first choice is the same, the share of the top-k choices kept) and at the output (max |Δ logits|, the LM loss of
each). --bias-export refuse stops such a run before it starts instead (setup.read_source).

Legend: T tokens, E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .balance import SLOT

if TYPE_CHECKING:
    from .setup import Run

MAX_BLOCKS = 64  # held-out blocks the comparison reads at most (two forwards each)


@dataclass(frozen=True)
class BiasDrop:
    """How the routing of a final/ without the bias differs from the run's routing with it."""

    tokens: int  # routed tokens compared
    text: str  # "held-out" or "training" (when the run has no held-out blocks)
    top1_agreement: dict[int, float]  # MoE layer -> share of tokens whose first choice is the same
    topk_kept: dict[int, float]  # MoE layer -> share of the T·k choices that are the same experts
    max_abs_dlogits: float  # max over the tokens and vocabulary of |logits with bias − logits without|
    loss_with: float  # mean LM loss over the tokens, routed with the bias (as trained)
    loss_without: float  # and without it (as final/ routes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top1_agreement"] = {str(k): v for k, v in self.top1_agreement.items()}
        d["topk_kept"] = {str(k): v for k, v in self.topk_kept.items()}
        return d

    def line(self, architecture: str, top_k: int) -> str:
        """The note the run prints."""
        top1 = self.top1_agreement.values()
        kept = self.topk_kept.values()
        return (
            f"final/ routes without the balancing bias ({architecture} has no place for it): on {self.tokens:,} "
            f"{self.text} tokens the first expert choice stays the same for {100 * _mean(top1):.1f}% of them "
            f"(lowest layer {100 * min(top1):.1f}%), {100 * _mean(kept):.1f}% of the top-{top_k} choices stay, "
            f"max |Δ logits| {self.max_abs_dlogits:.3g}, loss {self.loss_with:.4f} with the bias, "
            f"{self.loss_without:.4f} without; see docs/train.md (aux-loss-free balancing)"
        )


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def measure_bias_drop(run: Run, max_blocks: int = MAX_BLOCKS) -> BiasDrop:
    """Compare the trained model's routing with and without the bias on up to `max_blocks` held-out blocks (the
    first ones of the training text when there are none). Every rank runs the same forwards (FSDP's are collective)
    and gets the same figures."""
    import torch

    text = "held-out" if run.eval_blocks.n_blocks else "training"
    blocks = run.eval_blocks if run.eval_blocks.n_blocks else run.train_blocks
    n, layers, tap, model = min(blocks.n_blocks, max_blocks), run.plan.moe_layers, run.tap, run.model
    device = run.env.device
    top1 = torch.zeros(len(layers), dtype=torch.float64, device=device)  # (L,) tokens whose first choice agrees
    kept = torch.zeros(len(layers), dtype=torch.float64, device=device)  # (L,) top-k choices that agree
    losses = torch.zeros(2, dtype=torch.float64, device=device)  # Σ loss·predicted, with and without the bias
    max_delta = torch.zeros((), dtype=torch.float64, device=device)
    routed = predicted = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, run.spec.micro_batch):
            ids = blocks.blocks(list(range(start, min(start + run.spec.micro_batch, n))), device)  # (B, S)
            with run.compute():
                biased = model(input_ids=ids, labels=ids, use_cache=False)
            with_bias = tap.pop()
            with tap.without_bias(), run.compute():
                plain = model(input_ids=ids, labels=ids, use_cache=False)
            without = tap.pop()
            count = ids.shape[0] * (ids.shape[1] - 1)
            losses += torch.stack([biased.loss.double(), plain.loss.double()]) * count
            predicted += count
            routed += ids.numel()
            delta = (biased.logits.float() - plain.logits.float()).abs().max().double()  # ()
            max_delta = torch.maximum(max_delta, delta)
            for i, layer in enumerate(layers):
                a, b = with_bias[layer].indices, without[layer].indices  # (T, k) each
                top1[i] += (a[:, 0] == b[:, 0]).sum()
                chosen_a = torch.zeros(a.shape[0], run.plan.experts, device=a.device).scatter_(1, a, 1.0)  # (T, E)
                chosen_b = torch.zeros_like(chosen_a).scatter_(1, b, 1.0)  # (T, E)
                kept[i] += (chosen_a * chosen_b).sum()
    model.train()
    values = torch.cat([top1 / routed, kept / (routed * run.plan.top_k), losses / predicted, max_delta.reshape(1)])
    v = values.tolist()  # one host sync
    count_l = len(layers)
    return BiasDrop(
        tokens=routed,
        text=text,
        top1_agreement=dict(zip(layers, v[:count_l], strict=True)),
        topk_kept=dict(zip(layers, v[count_l : 2 * count_l], strict=True)),
        max_abs_dlogits=v[-1],
        loss_with=v[-3],
        loss_without=v[-2],
    )


def bias_export(run: Run, note: Any) -> dict[str, Any] | None:
    """Before final/ is written: what happens to the bias, as the `balance_bias` record of the summary and of
    final/upcycle.json; the measurement and its note where the target has no slot. None with --balance aux."""
    if not run.tap.bias:
        return None
    spread = max(float(b.abs().max()) for b in run.tap.bias.values())  # the largest |bias| of any expert
    if SLOT in run.source.target.modules:
        where = run.source.target.modules[SLOT].replace("{layer}", "N")
        return {"exported": "slot", "slot": where, "max_abs_bias": spread}
    drop = measure_bias_drop(run)
    note(drop.line(run.plan.architecture, run.plan.top_k))
    return {"exported": "dropped", "max_abs_bias": spread, **drop.to_dict()}
