"""One optimizer step: for each micro-batch the model's own forward gives the LM loss (labels = input ids;
`output_router_logits` is left off, so the model adds no aux loss of its own), RouterTap's hooks on the router
modules hand over each MoE layer's logits, and the router loss terms of losses.LOSSES are computed from them in
float32: total = lm + Σ coef·term (today lm + α·balance + β·z). With --balance-scope global the expert counts f
of the balance loss cover the step's micro-batches seen so far on every rank (summed over ranks each micro-batch),
as Qwen's global-batch balancing does; with micro they cover the local micro-batch only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .distributed import all_reduce_sum, grad_norm_value
from .losses import LOSSES, dropped_fraction, expert_counts, router_terms

if TYPE_CHECKING:
    import torch

    from .setup import Run


@dataclass(frozen=True)
class StepResult:
    terms: dict[str, float]  # "loss", "lm", then each LOSSES term: means over the step's micro-batches and ranks
    grad_norm: float  # before clipping; nan when the loss was not finite
    lr: float  # the peak lr this step used (router groups use it times --router-lr-scale)
    counts: dict[int, torch.Tensor]  # (E,) routed assignments per expert over the step, all ranks
    dropped: dict[int, float]  # fraction of assignments dropped by the capacity limit
    reason: str | None = None  # why the step was not taken (a non-finite loss or gradient); None: it was

    @property
    def finite(self) -> bool:
        return self.reason is None


def train_step(run: Run, step: int) -> StepResult:
    """Forward and backward over the step's micro-batches, then one AdamW step (skipped if anything is not finite)."""
    import torch

    spec, env, model = run.spec, run.env, run.model
    layers, experts = run.plan.moe_layers, run.plan.experts
    device = env.device
    model.train()
    run.optimizer.zero_grad(set_to_none=True)
    counts = torch.zeros(len(layers), experts, device=device)  # (L, E) assignments over the step
    names = ["loss", "lm", *LOSSES]
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)  # each named term, summed over micro-batches
    dropped = torch.zeros(len(layers), dtype=torch.float64, device=device)  # (L,) share dropped by capacity
    for micro in range(spec.grad_accum):
        idx = run.sampler.indices(step - 1, micro)
        ids = run.train_blocks.blocks(idx).to(device)  # (micro_batch, seq_len)
        with run.compute():  # forward only: backward follows the dtypes autocast chose
            out = model(input_ids=ids, labels=ids, use_cache=False)
        records = run.tap.pop()
        local = torch.stack([expert_counts(records[layer], experts) for layer in layers]).to(counts)  # (L, E)
        if spec.balance_scope == "global":  # f over the step's micro-batches so far, on every rank: one all-reduce
            counts += all_reduce_sum(local, env)
            terms = router_terms(records, dict(zip(layers, counts, strict=True)))
        else:
            counts += local
            terms = router_terms(records, None)
        lm = out.loss.float()
        loss = lm
        for name, value in terms.items():
            loss = loss + getattr(spec, LOSSES[name].coef) * value.float()
        (loss / spec.grad_accum).backward()
        run.tap.pop()  # activation checkpointing re-runs the routers in backward; those records are not ours
        with torch.no_grad():
            logged = [loss, lm, *terms.values()]  # in the order of `names`
            sums += torch.stack([t.detach().float() for t in logged]).double()
            dropped += torch.tensor(
                [dropped_fraction(records[layer]) for layer in layers], dtype=torch.float64, device=device
            )
    if spec.balance_scope != "global":
        all_reduce_sum(counts, env)  # the logged load covers every rank either way
    means = all_reduce_sum(torch.cat([sums, dropped]), env) / (spec.grad_accum * env.world_size)
    values = dict(zip(names, (float(x) for x in means[: len(names)]), strict=True))
    reason = None if all(math.isfinite(v) for v in values.values()) else f"loss is not finite ({values['loss']})"
    grad_norm = float("nan")
    if reason is None:
        max_norm = spec.clip if spec.clip > 0 else float("inf")
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(run.params, max_norm))  # DTensor under FSDP
        if not math.isfinite(grad_norm):
            reason = f"gradient norm is not finite ({grad_norm})"
    group = run.optimizer.param_groups[0]
    lr = spec.lr * group["lr"] / group["initial_lr"]
    if reason is None:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # the lr is a function of the step, also when a step was skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        run.scheduler.step()
    dropped_v = {layer: float(v) for layer, v in zip(layers, means[len(names) :], strict=True)}
    per_layer = dict(zip(layers, counts, strict=True))
    return StepResult(values, grad_norm, lr, per_layer, dropped_v, reason)
