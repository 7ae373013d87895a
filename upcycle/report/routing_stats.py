"""Routing statistics of a loaded MoE on given token ids: what each router chose, and how far the experts diverged.

`routing_stats(model, ids)` is the one entry point; `upcycle routing` calls it on a text, and the training loop
can call it on a held-out block at each save. It records through `RouterTap` (eval mode: it only records, so the
figures describe exactly what the model routes) and reduces each forward's records on the fly, so memory grows
with T·k, not T·E.

Legend: T tokens, E experts, k experts per token, H hidden size, I expert size, N sampled tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import Target, target_for_config
from ..errors import UpcycleError
from ..train.divergence import experts_at, output_cosine, weight_cosine
from ..train.losses import expert_counts, load_stats
from ..train.routing_hooks import find_routers, route_topk, tap_model

TOP_TOKENS = 10  # rows per expert in each token table
LIFT_MIN_OCCURRENCES = 5  # a token seen fewer times has a meaningless lift (one occurrence gives the maximum)


@dataclass
class LayerRecords:
    """One MoE layer over the whole input, on the CPU."""

    indices: torch.Tensor  # (T, k) int64, experts in the router's order (top-1 first)
    weights: torch.Tensor  # (T, k) float32, the weights the experts' outputs were mixed with
    entropy: torch.Tensor  # (T,) float32, entropy of softmax(logits) over all E, in nats
    counts: torch.Tensor  # (E,) float32, top-k assignments per expert
    sample: torch.Tensor | None = None  # (N, H) float32, the layer's expert inputs at the sampled positions


@dataclass
class RoutingStats:
    experts: int
    top_k: int
    tokens: int
    layers: dict[int, dict[str, Any]]  # MoE layer -> its figures (see layer_summary)
    records: dict[int, LayerRecords] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The per-layer figures in compact form (no token tables), for a training log line."""
        keep = ("cv", "max_expert", "min_expert", "entropy_norm", "consistency", "weight_cosine", "output_cosine")
        return {str(layer): {key: figures[key] for key in keep} for layer, figures in self.layers.items()}

    def load_matrix(self) -> torch.Tensor:
        """(L, E) share of each layer's top-k assignments per expert, layers in order."""
        return torch.stack([self.records[layer].counts / self.records[layer].counts.sum() for layer in self.layers])


def routing_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    target: Target | None = None,
    seq_len: int = 2048,
    batch_size: int = 4,
    sample_tokens: int = 512,
    decode: Callable[[int], str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RoutingStats:
    """Run `model` over `input_ids` (a 1-D tensor of T ids) in blocks of `seq_len`, `batch_size` blocks per forward.

    The model is put in eval mode for the call and restored after. `decode(id)` names tokens in the token tables
    (None: tables carry ids only). `sample_tokens` positions, evenly spread, feed the expert-output divergence.
    A RouterTap the caller already installed keeps recording during the call: pop() and discard its records after.
    """
    ids = input_ids.reshape(-1)  # (T,)
    if ids.numel() < 2:
        raise UpcycleError(f"routing statistics need at least 2 tokens, got {ids.numel()}")
    if seq_len < 1 or batch_size < 1:
        raise UpcycleError(f"--seq-len ({seq_len}) and --batch-size ({batch_size}) must be at least 1")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    target = target or target_for_config(config)
    if target is None:
        raise UpcycleError(f"model type {config.model_type!r} is not a native MoE upcycle reads")
    total = ids.numel()
    sample = torch.linspace(0, total - 1, min(sample_tokens, total)).round().long().unique()  # (N,) positions
    was_training = model.training
    model.eval()
    try:
        records = _record(model, target, ids, seq_len, batch_size, sample, progress)
    finally:
        model.train(was_training)
    num_experts = next(iter(records.values())).counts.numel()
    top_k = next(iter(records.values())).indices.shape[1]
    layers: dict[int, dict[str, Any]] = {}
    previous: LayerRecords | None = None
    for layer, rec in records.items():
        experts = experts_at(model, target, layer)
        layers[layer] = layer_summary(rec, ids, previous, decode) | {
            "weight_cosine": weight_cosine(experts),
            "output_cosine": output_cosine(experts, rec.sample) if rec.sample is not None else None,
        }
        previous = rec
    return RoutingStats(num_experts, top_k, total, layers, records)


def _record(
    model: nn.Module,
    target: Target,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    sample: torch.Tensor,
    progress: Callable[[int, int], None] | None,
) -> dict[int, LayerRecords]:
    """Forward passes over contiguous blocks; each forward's records are reduced and moved to the CPU at once."""
    device = model.get_input_embeddings().weight.device
    total = ids.numel()
    parts: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    samples: dict[int, list[torch.Tensor]] = {}
    span = [0, 0]  # global [start, end) of the tokens in the current forward
    with ExitStack() as stack, torch.no_grad():
        tap = stack.enter_context(tap_model(model, target))
        for layer in find_routers(model, target):
            experts = experts_at(model, target, layer)
            handle = experts.register_forward_pre_hook(_sampler(layer, samples, sample, span))
            stack.callback(handle.remove)
        for start, batch in _batches(ids, seq_len, batch_size):
            span[0], span[1] = start, start + batch.numel()
            model(input_ids=batch.to(device), use_cache=False)
            for layer, r in tap.pop().items():
                scores, _ = route_topk(r.logits, tap.top_k, tap.renormalize, torch.float32)  # (T, k), as the router
                logp = torch.log_softmax(r.logits.float(), dim=-1)  # (T, E)
                entropy = -(logp.exp() * logp).sum(dim=-1)  # (T,)
                counts = expert_counts(r, tap.num_experts)  # (E,)
                parts.setdefault(layer, []).append((r.indices.cpu(), scores.cpu(), entropy.cpu(), counts.cpu()))
            if progress is not None:
                progress(span[1], total)
    records = {}
    for layer, chunks in sorted(parts.items()):
        indices, weights, entropy, counts = zip(*chunks, strict=True)
        records[layer] = LayerRecords(
            indices=torch.cat(indices),  # (T, k)
            weights=torch.cat(weights),  # (T, k)
            entropy=torch.cat(entropy),  # (T,)
            counts=torch.stack(counts).sum(dim=0),  # (E,)
            sample=torch.cat(samples[layer]) if samples.get(layer) else None,  # (N, H)
        )
    return records


def _sampler(layer: int, samples: dict[int, list[torch.Tensor]], sample: torch.Tensor, span: list[int]):
    """A pre-hook on the experts module that keeps the rows of its input at the sampled global positions."""

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]  # (T_batch, H), flattened in global token order
        start, end = span
        picked = sample[(sample >= start) & (sample < end)] - start  # (n,) local rows
        if picked.numel():
            samples.setdefault(layer, []).append(x[picked.to(x.device)].detach().float().cpu())  # (n, H)

    return hook


def _batches(ids: torch.Tensor, seq_len: int, batch_size: int):
    """(global start, (B, S) block batch): full blocks `batch_size` at a time, then the shorter last block alone.

    Consecutive blocks are contiguous, so a batch flattened row-major is the text in order."""
    full = ids.numel() // seq_len
    blocks = ids[: full * seq_len].view(full, seq_len)  # (full, S)
    for b in range(0, full, batch_size):
        yield b * seq_len, blocks[b : b + batch_size]
    if ids.numel() > full * seq_len:
        yield full * seq_len, ids[full * seq_len :].unsqueeze(0)  # (1, rest)


def layer_summary(
    rec: LayerRecords, ids: torch.Tensor, previous: LayerRecords | None, decode: Callable[[int], str] | None
) -> dict[str, Any]:
    """Load, its spread, router entropy, agreement with the previous MoE layer, and token tables per expert."""
    num_experts = rec.counts.numel()
    stats = load_stats(rec.counts)
    top1 = torch.bincount(rec.indices[:, 0], minlength=num_experts).double() / rec.indices.shape[0]  # (E,)
    entropy = float(rec.entropy.double().mean())
    same = None if previous is None else float((rec.indices[:, 0] == previous.indices[:, 0]).double().mean())
    by_count, by_lift = token_tables(rec, ids.cpu(), decode)
    experts = [
        {
            "expert": e,
            "load": stats["load"][e],
            "assignments": int(rec.counts[e]),
            "top1_share": float(top1[e]),
            "tokens_by_count": by_count[e],
            "tokens_by_lift": by_lift[e],
        }
        for e in range(num_experts)
    ]
    return {
        "cv": stats["cv"],
        "max_expert": int(torch.tensor(stats["load"]).argmax()),
        "min_expert": int(torch.tensor(stats["load"]).argmin()),
        "entropy": entropy,
        "entropy_norm": entropy / math.log(num_experts),
        "consistency": same,
        "experts": experts,
    }


def token_tables(
    rec: LayerRecords, ids: torch.Tensor, decode: Callable[[int], str] | None
) -> tuple[list[list[dict]], list[list[dict]]]:
    """Per expert, the tokens most often among its top-k assignments: by count, and by lift.

    lift = (share of the token's occurrences routed to the expert) / (share of all tokens routed to it); 1 means
    no preference. Only tokens seen at least LIFT_MIN_OCCURRENCES times are ranked by lift.
    Ties: higher count first, then smaller id.
    """
    num_experts = rec.counts.numel()
    total, top_k = rec.indices.shape
    vocab = int(ids.max()) + 1
    pairs = rec.indices.reshape(-1) * vocab + ids.repeat_interleave(top_k)  # (T·k,) expert·V + token id
    keys, counts = torch.unique(pairs, return_counts=True)  # (P,), (P,)
    occurrences = torch.bincount(ids, minlength=vocab).tolist()  # (V,)
    texts: dict[int, str | None] = {}

    def text(token: int) -> str | None:
        if token not in texts:
            texts[token] = decode(token) if decode else None
        return texts[token]

    by_count: list[list[dict]] = []
    by_lift: list[list[dict]] = []
    for e in range(num_experts):
        mine = (keys // vocab) == e
        expected = float(rec.counts[e]) / total  # share of all tokens routed to this expert
        rows = [
            (token, count, occurrences[token], (count / occurrences[token]) / expected)
            for token, count in zip((keys[mine] % vocab).tolist(), counts[mine].tolist(), strict=True)
        ]  # (id, count, occurrences, lift)
        rows.sort(key=lambda r: (-r[1], r[0]))
        lifted = sorted((r for r in rows if r[2] >= LIFT_MIN_OCCURRENCES), key=lambda r: (-r[3], -r[1], r[0]))
        for table, chosen in ((by_count, rows), (by_lift, lifted)):
            table.append(
                [
                    {"id": t, "text": text(t), "count": c, "occurrences": o, "lift": lift}
                    for t, c, o, lift in chosen[:TOP_TOKENS]
                ]
            )
    return by_count, by_lift
