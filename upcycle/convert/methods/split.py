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
REFINE_ROUNDS = 20  # cap on the balanced reassignment rounds of graph_partition (each must raise the score)
DENSE_EIGH_BELOW = 1024  # graphs smaller than this take the full eigendecomposition (cheap, and exact)
SUBSPACE_ITERS = 40  # block power iterations of the spectral start above DENSE_EIGH_BELOW neurons (at most)
SUBSPACE_TOL = 1e-3  # ... stopped once an iteration turns the subspace by less than this (Frobenius norm)
BLOCK = 1024  # neurons per block of the co-activation graph's symmetric product
OVERSAMPLE = 8  # extra columns carried by the subspace iteration (faster, steadier convergence of the top P)


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


# --- coactivation (MoEfication, Zhang et al. 2022): a balanced partition of the co-activation graph ---------


def coactivation_graph(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act, share: float, chunk: int = 1024
) -> torch.Tensor:
    """Edge weights [I, I] between the FFN's neurons from its inputs x [T, H] on calibration text.

    MoEfication's neurons are ReLUs, which fire (output > 0) on few tokens; a SwiGLU neuron's output
    act(gate x) * (up x) is never exactly zero, so here a neuron fires on a token when its |output| is among the
    token's largest, as many neurons as the token will run after the split (share = top-k / N of them, at most
    half). The weight of an edge is how much more often the two neurons fire together than chance would have
    them: P(i and j) - P(i) P(j), clamped at 0, with no self-loops (frequent neurons would otherwise attach to all).
    """
    import torch

    neurons = gate.shape[0]
    count = max(1, round(share * neurons))
    # [I, I] float32 counts of the tokens on which i and j both fire: sums of 0/1 products, whole numbers, so
    # float32 holds them exactly up to 2^24 tokens (no float64 accumulator, no [I, I] temporary per chunk)
    both = torch.zeros(neurons, neurons)
    for xs in x.split(chunk):
        h = act(xs @ gate.T).mul_(xs @ up.T).abs_()  # [t, I], in place: two [t, I] temporaries, not four
        fires = torch.zeros_like(h).scatter_(1, h.topk(count, dim=1).indices, 1.0)  # [t, I] 0/1
        del h
        for b in range(0, neurons, BLOCK):  # the symmetric product's upper block triangle only (about half)
            both[b : b + BLOCK, b:].addmm_(fires[:, b : b + BLOCK].T, fires[:, b:])
    for b in range(0, neurons, BLOCK):  # the lower triangle mirrored from the upper: whole counts, so exact
        for c in range(b + BLOCK, neurons, BLOCK):
            both[c : c + BLOCK, b : b + BLOCK].copy_(both[b : b + BLOCK, c : c + BLOCK].T)
    tokens = len(x)
    p = both.diagonal() / tokens  # [I]: how often each neuron fires
    w = both.div_(tokens)  # in place: the graph is the accumulator's memory
    for rows in range(0, neurons, chunk):  # minus P(i) P(j), a block of rows at a time (no [I, I] outer product)
        w[rows : rows + chunk].sub_(p[rows : rows + chunk, None] * p[None, :])
    w.clamp_min_(0)
    w.fill_diagonal_(0)
    return w


def graph_partition(w: torch.Tensor, parts: int, gen: torch.Generator, rounds: int = REFINE_ROUNDS) -> torch.Tensor:
    """Labels [I] of a partition of the graph w [I, I] into `parts` groups of equal size with a large weight
    inside the groups: a hand-written stand-in for the METIS call of MoEfication.

    Spectral start (the normalised-cut relaxation): the top `parts` eigenvectors of D^-1/2 W D^-1/2
    (spectral_embedding: only those, not all I of them), rows normalised, grouped by balanced k-means. Then
    rounds of balanced reassignment: each neuron is offered the group it is most connected to (balanced_assign
    on the affinities W @ onehot), kept while the total weight inside the groups grows.
    """
    import torch

    size = w.shape[0] // parts
    emb = spectral_embedding(w, parts, gen)  # [I, P]
    emb = (emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    best = balanced_kmeans(emb, parts, gen)
    best_score = inside_weight(w, best)
    for _ in range(rounds):
        onehot = torch.nn.functional.one_hot(best, parts).to(w.dtype)  # [I, P]
        labels = balanced_assign(-(w @ onehot), size)  # most connected first
        score = inside_weight(w, labels)
        if score <= best_score:
            break
        best, best_score = labels, score
    return best


def spectral_embedding(w: torch.Tensor, parts: int, gen: torch.Generator) -> torch.Tensor:
    """The eigenvectors [I, P] of the `parts` largest eigenvalues of D^-1/2 W D^-1/2 (w [I, I], D its degrees).

    Below DENSE_EIGH_BELOW neurons the full eigendecomposition, O(I^3). Above, randomized subspace iteration
    for the P vectors alone: up to SUBSPACE_ITERS products of the graph with a seeded random [I, P + OVERSAMPLE]
    block (O(I^2 P) each, re-orthonormalised, until the block's span stops turning; D^-1/2 applied to the block
    on either side, so the normalised graph is never formed beside W), then Rayleigh-Ritz on that block.
    (torch.lobpcg was tried and was several times slower at these sizes: its Python-level bookkeeping dominates.)
    """
    import torch

    n = w.shape[0]
    d = w.sum(1).clamp_min(1e-12).rsqrt()  # [I]
    if n < max(DENSE_EIGH_BELOW, parts + OVERSAMPLE):
        d = d.double()
        _, vecs = torch.linalg.eigh(d[:, None] * w.double() * d[None, :])  # ascending eigenvalues
        return vecs[:, -parts:]
    w = w.float()
    dc = d.float()[:, None]  # [I, 1]

    def shifted(q: torch.Tensor) -> torch.Tensor:
        """(D^-1/2 W D^-1/2 + 1) q for q [I, m], without forming the normalised graph: one [I, I] product."""
        return torch.addcmul(q, dc, w @ (dc * q))

    # The spectrum is shifted by +1 (a normalised graph's eigenvalues lie in [-1, 1]) so that the largest
    # eigenvalues are also the largest in magnitude, which subspace iteration converges to.
    q = torch.linalg.qr(torch.randn(n, parts + OVERSAMPLE, generator=gen))[0]  # [I, P + p]
    for _ in range(SUBSPACE_ITERS):
        new = torch.linalg.qr(shifted(q))[0]
        moved = float((new - q @ (q.T @ new)).norm())  # how far the subspace turned (0: it is invariant)
        q = new
        if moved < SUBSPACE_TOL:
            break
    _, small = torch.linalg.eigh((q.T @ shifted(q)).double())  # Rayleigh-Ritz on the [P + p] block, ascending
    return q.double() @ small[:, -parts:]


def inside_weight(w: torch.Tensor, labels: torch.Tensor) -> float:
    """Total edge weight between neurons of the same group: the [I, I] product in w's dtype (float32), its
    [I, P] result summed in float64 (no float64 copy of the graph)."""
    import torch

    onehot = torch.nn.functional.one_hot(labels).to(w.dtype)  # [I, P]
    into = (w @ onehot).gather(1, labels[:, None])  # [I, 1]: each neuron's weight into its own group
    return float(into.double().sum())
