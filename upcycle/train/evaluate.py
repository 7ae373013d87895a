"""The held-out evaluation: mean LM loss over the eval blocks (in eval mode: no capacity, jitter or noise) and the
expert load over them, every rank taking its share of the blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .batch import model_inputs, predicted_tokens
from .distributed import all_reduce_sum
from .losses import expert_counts
from .metrics import layer_rows

if TYPE_CHECKING:
    import torch

    from .setup import Run


@dataclass(frozen=True)
class Evaluation:
    step: int
    eval_loss: float  # mean over the predicted tokens of every eval block
    perplexity: float  # inf when exp overflows
    eval_tokens: int  # predicted tokens
    counts: dict[int, torch.Tensor]  # (E,) routed assignments per expert, per MoE layer, all ranks
    routed_tokens: int = 0  # tokens the routers saw (every position of every held-out block): what `counts` counts
    loss_on: str = "all tokens"  # which tokens the loss counts: "assistant tokens" for conversations

    def record(self, tokens: int) -> dict[str, Any]:
        """The `eval` record of metrics.jsonl (a perplexity that overflowed is written as null), with the expert
        load over the held-out tokens per MoE layer: the same tokens at every evaluation, so its CVs compare
        across steps, and the last one is the training summary's."""
        return {
            "kind": "eval",
            "step": self.step,
            "tokens": tokens,
            "eval_loss": self.eval_loss,
            "perplexity": json_float(self.perplexity),
            "eval_tokens": self.eval_tokens,
            "loss_on": self.loss_on,
        } | ({"routed_tokens": self.routed_tokens, "layers": layer_rows(self.counts)} if self.counts else {})

    def load_tokens(self) -> str:
        """Which tokens the load counts, for the reports."""
        return f"{self.routed_tokens:,} held-out tokens at step {self.step} (the same at every evaluation)"


def json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def evaluate(run: Run, step: int) -> Evaluation | None:
    """Mean LM loss over the held-out blocks and the expert load over them; None without eval blocks."""
    import torch

    blocks = run.eval_blocks
    if blocks.n_blocks == 0:
        return None
    spec, env, model = run.spec, run.env, run.model
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    n_pred = torch.zeros((), dtype=torch.float64, device=env.device)
    n_routed = torch.zeros((), dtype=torch.float64, device=env.device)
    counts = {layer: torch.zeros(run.plan.experts, device=env.device) for layer in run.plan.moe_layers}
    per_round = spec.micro_batch * env.world_size
    with torch.no_grad():
        for start in range(0, blocks.n_blocks, per_round):
            first = start + env.rank * spec.micro_batch
            idx = list(range(first, min(first + spec.micro_batch, blocks.n_blocks)))
            weight = 1.0 if idx else 0.0
            inputs = model_inputs(blocks, idx or [0], env.device)  # every rank runs the same number of forwards
            with run.compute():
                out = model(**inputs, use_cache=False)
            predicted = predicted_tokens(inputs)  # every token after the first of text; an assistant's of chat
            loss_sum += out.loss.double() * predicted * weight
            n_pred += predicted * weight
            n_routed += inputs["input_ids"].numel() * weight
            for layer, r in run.tap.pop().items():
                counts[layer] += expert_counts(r, run.plan.experts).to(counts[layer].dtype) * weight
    model.train()
    all_reduce_sum(loss_sum, env)
    all_reduce_sum(n_pred, env)
    all_reduce_sum(n_routed, env)
    for layer in run.plan.moe_layers:
        all_reduce_sum(counts[layer], env)
    eval_loss = float(loss_sum / n_pred)
    loss_on = getattr(blocks, "loss_on", "all tokens")
    return Evaluation(step, eval_loss, perplexity_of(eval_loss), int(n_pred), counts, int(n_routed), loss_on)


def perplexity_of(loss: float) -> float:
    """exp(loss); inf where it overflows, NaN for a NaN loss (both written as null)."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf
