"""Neuron splitting (LLaMA-MoE, Zhu et al. 2024): the FFN's intermediate neurons are partitioned into disjoint
groups, one expert each.

An FFN is a sum over its neurons, y = sum_j down[:, j] * act(gate[j] x) * (up[j] x), so the parts' outputs
add up to the dense output. With renormalised top-k weights every kept expert gets 1/k under a zero router;
down_proj is scaled by N, which is LLaMA-MoE's N/k rescaling of the k selected experts' sum (k x N/k = N). With
top-k = N and a zero router every part runs with weight 1/N, and the MoE computes the dense FFN exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import UpcycleError
from .base import Layout, expert, generator, parts_transform, routing_factor, scaled, zero_router

if TYPE_CHECKING:
    import torch

    from ..spec import ConvertSpec

KMEANS_ITERS = 25


def check_divides(intermediate: int, parts: int, what: str, suggest: list[int]) -> None:
    if intermediate % parts:
        hint = f"; choose {', '.join(map(str, suggest[:6]))}" if suggest else ""
        raise UpcycleError(
            f"the FFN's intermediate size {intermediate} is not divisible by {what} = {parts}, so its neurons "
            f"cannot be split evenly{hint}"
        )


def layout(spec: ConvertSpec, hidden: int, intermediate: int) -> Layout:
    by, n, s = spec.split_method, spec.experts, spec.shared_experts
    parts = n + s
    what = f"--experts + --shared-experts ({n} + {s})" if s else "--experts"
    check_divides(intermediate, parts, what, [m - s for m in range(s + 2, intermediate + 1) if intermediate % m == 0])
    size = intermediate // parts
    scale = n * routing_factor(spec)
    experts = tuple(
        expert(hidden, size, parts_transform(by, parts, (e,), 1.0), parts_transform(by, parts, (e,), scale))
        for e in range(n)
    )
    shared = None
    if s:  # the last S parts, one shared expert; its gate starts at zero and lets sigmoid(0) = 1/2 through
        group = tuple(range(n, parts))
        gate_up, down = parts_transform(by, parts, group, 1.0), parts_transform(by, parts, group, 2.0)
        shared = expert(hidden, s * size, gate_up, down)
    return Layout(size, experts, *exactness(spec, scale), s * size, shared)


def exactness(spec: ConvertSpec, scale: float) -> tuple[bool, str]:
    n, k = spec.experts, spec.top_k
    scaled = f"down_proj scaled by {scale:g}"
    if k == n and zero_router(spec):
        shared = " and the shared part (down_proj x2 against its gate's 1/2)" if spec.shared_experts else ""
        return True, (
            f"the {n} experts hold disjoint parts of the FFN's neurons ({scaled}); with top-k = N and a zero "
            f"router each runs with weight 1/N, so they{shared} add up to the dense FFN"
        )
    if k == n:
        return (
            False,
            f"all {n} parts run, but a random router weights them unevenly; a zero router makes it exact",
        )
    return False, (
        f"each token runs only {k} of the {n} disjoint parts ({scaled}, LLaMA-MoE's rescaling), "
        "so the MoE approximates the dense FFN; top-k = N with a zero router would be exact"
    )


# --- execution: the partition of one layer's neurons -----------------------------------------------------


def partition(dense: dict[str, torch.Tensor], by: str, parts: int, seed: int, layer: int) -> list[torch.Tensor]:
    """The neuron indices of each part, each sorted: disjoint, of equal size, together all neurons."""
    import torch

    n = dense["gate"].shape[0]
    if by == "contiguous":
        return list(torch.arange(n).view(parts, n // parts))
    if by == "random":
        perm = torch.randperm(n, generator=generator(seed, "split", layer))
        return list(perm.view(parts, n // parts).sort(dim=1).values)
    if by == "cluster":
        features = torch.cat([dense["gate"], dense["up"]], dim=1).float()  # [I, 2H]: a neuron's input weights
        labels = balanced_kmeans(features, parts, generator(seed, "cluster", layer))
        return [torch.nonzero(labels == c).squeeze(1) for c in range(parts)]
    if by == "coactivation":  # needs the dense model run on calibration text: computed beforehand (calibrate.py)
        raise ValueError("the coactivation partition is computed from calibration text and handed to LayerBuilder")
    raise ValueError(f"unknown partition {by!r}")


def balanced_kmeans(x: torch.Tensor, parts: int, gen: torch.Generator, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """k-means whose clusters all hold len(x) / parts points: x [I, D] -> labels [I]."""
    import torch

    size = x.shape[0] // parts
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:parts]]  # [P, D]
    labels = torch.full((x.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        new = balanced_assign(torch.cdist(x, centroids), size)  # distances [I, P]
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([x[labels == c].mean(0) for c in range(parts)])
    return labels


def balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy balanced assignment, dist [I, P] -> labels [I], every cluster getting exactly `size` points.

    In rounds: every unassigned point proposes its nearest cluster that still has room, and each cluster takes
    its closest proposers up to its room. A round fills a cluster or places every proposer, so at most P rounds.
    """
    import torch

    n, p = dist.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((p,), size, dtype=torch.long)
    while (free := torch.nonzero(labels < 0).squeeze(1)).numel():
        d = dist[free].masked_fill(room == 0, float("inf"))  # [F, P]
        choice = d.argmin(1)  # [F]
        near = d.gather(1, choice[:, None]).squeeze(1)  # [F]
        order = torch.argsort(near, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # by cluster, then by distance
        chosen = choice[order]
        first = torch.searchsorted(chosen, torch.arange(p))  # where each cluster's proposers start
        rank = torch.arange(len(order)) - first[chosen]
        take = rank < room[chosen]
        labels[free[order[take]]] = chosen[take]
        room -= torch.bincount(chosen[take], minlength=p)
    return labels


def take(dense: torch.Tensor, role: str, groups: list[torch.Tensor], chosen: tuple[int, ...], scale: float):
    """The expert's slice of a dense tensor: rows of gate/up, columns of down (times `scale`)."""
    import torch

    idx = torch.cat([groups[i] for i in chosen])
    if role == "down":
        return dense.float()[:, idx] * scale  # [H, I] -> [H, |idx|]
    return dense.float()[idx] * scale  # [I, H] -> [|idx|, H]


def take_written(
    dense: torch.Tensor, role: str, groups: list[torch.Tensor], chosen: tuple[int, ...], scale: float, dtype
) -> torch.Tensor:
    """`take(...).to(dtype)` byte for byte: the neurons are picked in the dense dtype (a view where they are one
    contiguous range, as in fine-grained parts), then scaled in DTYPE where base.scaled finds that exact."""
    import torch

    idx = torch.cat([groups[i] for i in chosen])
    dim = 1 if role == "down" else 0
    first = int(idx[0]) if len(idx) else 0
    if torch.equal(idx, torch.arange(first, first + len(idx))):  # one range of neurons: a view, no gather
        part = dense.narrow(dim, first, len(idx))
    else:
        part = dense.index_select(dim, idx)
    return scaled(part, scale, dtype)
