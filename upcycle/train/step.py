"""One optimizer step: for each micro-batch the model's own forward gives the LM loss (labels = input ids;
`output_router_logits` is left off, so the model adds no aux loss of its own), RouterTap's hooks on the router
modules hand over each MoE layer's logits, and the router loss terms of losses.LOSSES are computed from them in
float32: total = lm + Σ coef·term (today lm + α·balance + β·z). With --balance-scope global the expert counts f
of the balance loss cover the step's micro-batches seen so far on every rank (summed over ranks each micro-batch),
as Qwen's global-batch balancing does; with micro they cover the local micro-batch only. With --balance bias|both
the routers' balancing biases move after each step taken (balance.py), from the step's counts over every rank;
--balance bias leaves the balance term out of the total (it is still logged).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .balance import update_biases
from .batch import model_inputs
from .distributed import all_reduce_sum, full_tensor, set_gradient_sync
from .losses import LOSSES, dropped_share, expert_counts, router_terms

if TYPE_CHECKING:
    import torch

    from .setup import Run


@dataclass(frozen=True)
class StepResult:
    terms: dict[str, float]  # "loss", "lm", then each LOSSES term: means over the step's micro-batches and ranks
    grad_norm: float  # before clipping; nan when the loss was not finite
    lr: float  # the peak lr this step used (router groups use it times --router-lr-scale)
    counts: dict[int, torch.Tensor]  # (E,) routed assignments per expert over the step, all ranks (on the device)
    dropped: dict[int, float]  # share of assignments dropped by the capacity limit (0 without --capacity-factor)
    reason: str | None = None  # why the step was not taken (a non-finite loss or gradient); None: it was

    @property
    def finite(self) -> bool:
        return self.reason is None


def train_step(run: Run, step: int) -> StepResult:
    """Forward and backward over the step's micro-batches, then one AdamW step (skipped if anything is not finite).

    One host sync per step: the read-back of the step's means and gradient norm, which decides whether the
    optimizer steps. The expert counts stay on the device (the loop makes per-layer rows of them on logged steps
    only), and the dropped shares are computed only with a capacity limit."""
    import torch

    spec, env = run.spec, run.env
    layers = run.plan.moe_layers
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    names = ["loss", "lm", *(LOSSES if layers else ())]  # a dense model has no router loss terms
    counts = torch.zeros(len(layers), run.plan.experts, device=env.device)  # (L, E) assignments over the step
    sums = torch.zeros(len(names) + len(layers), dtype=torch.float64, device=env.device)  # named terms, dropped (L)
    for micro in range(spec.grad_accum):
        if run.plan.sync_last_micro_batch_only:  # FSDP: reduce-scatter once, after the last micro-batch's backward
            set_gradient_sync(run.model, env, micro == spec.grad_accum - 1)
        inputs = model_inputs(run.train_blocks, run.sampler.indices(step - 1, micro), env.device)
        logged, dropped = _forward_backward(run, inputs, counts)
        sums[: len(names)] += logged
        if dropped is not None:
            sums[len(names) :] += dropped
    if spec.balance_scope != "global":
        all_reduce_sum(counts, env)  # the logged load covers every rank either way
    means = all_reduce_sum(sums, env) / (spec.grad_accum * env.world_size)
    max_norm = spec.clip if spec.clip > 0 else float("inf")
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.params, max_norm))  # ()
    values = torch.cat([means, norm.double().reshape(1)]).tolist()  # the step's one host sync
    terms = dict(zip(names, values[: len(names)], strict=True))
    grad_norm, reason = values[-1], None
    if not all(math.isfinite(v) for v in terms.values()):
        grad_norm, reason = float("nan"), f"loss is not finite ({terms['loss']})"
    elif not math.isfinite(grad_norm):
        reason = f"gradient norm is not finite ({grad_norm})"
    group = run.optimizer.param_groups[0]
    lr = spec.lr * group["lr"] / group["initial_lr"]
    if reason is None:
        run.optimizer.step()
        if spec.selection_bias:  # counts: (L, E) over the step's micro-batches and every rank
            update_biases(run.tap, dict(zip(layers, counts, strict=True)), spec.balance_rate)
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # the lr is a function of the step, also when a step was skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        run.scheduler.step()
    dropped_v = dict(zip(layers, values[len(names) : -1], strict=True))
    return StepResult(terms, grad_norm, lr, dict(zip(layers, counts, strict=True)), dropped_v, reason)


def _forward_backward(
    run: Run, inputs: dict[str, torch.Tensor], counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch (`inputs`: batch.model_inputs): forward, the named loss terms, backward (scaled by
    1/grad_accum); adds its expert counts to `counts` (L, E). Returns the terms to log, (loss, lm, each LOSSES term;
    a dense model: loss, lm) float64, and with a capacity limit the share of assignments dropped per MoE layer (L,)
    float64; no host sync."""
    import torch

    spec, env, layers = run.spec, run.env, run.plan.moe_layers
    with run.compute():  # forward only: backward follows the dtypes autocast chose
        out = run.model(**inputs, use_cache=False)
    records = run.tap.pop()
    terms: dict[str, torch.Tensor] = {}  # a dense model: no routers
    if layers:
        local = torch.stack([expert_counts(records[layer], run.plan.experts) for layer in layers]).to(counts)  # (L, E)
        if spec.balance_scope == "global":  # f over the step's micro-batches so far, on every rank: one all-reduce
            counts += all_reduce_sum(local, env)
            f = counts
        else:  # f over this micro-batch
            counts += local
            f = local
        terms = router_terms(records, dict(zip(layers, f, strict=True)))
    lm = out.loss.float()
    loss = lm
    for name, value in terms.items():
        loss = loss + spec.loss_weight(LOSSES[name].coef) * value.float()
    (loss / spec.grad_accum).backward()
    run.tap.pop()  # activation checkpointing re-runs the routers in backward; those records are not ours
    with torch.no_grad():
        logged = torch.stack([t.detach().float() for t in (loss, lm, *terms.values())]).double()
        if spec.capacity_factor is None or not layers:
            return logged, None
        return logged, torch.stack([dropped_share(records[layer]) for layer in layers])  # (L,)
