"""--split-by coactivation (MoEfication, Zhang et al. 2022): a balanced partition of one FFN's neurons that keeps
neurons which fire together in one part, a hand-written stand-in for MoEfication's METIS call.

Firing. MoEfication's neurons are ReLUs, which fire (output > 0) on few tokens; a SwiGLU neuron's output
act(gate x) * (up x) is never exactly zero, so here a neuron fires on a token when its |output| is among the
token's largest, as many neurons as the token will run after the split (share = top-k / N of them, at most half).
F [T, I] is 0/1: F[t, i] = 1 when neuron i fires on token t; c = F^T 1 [I] counts how often each neuron fires.

The graph is never formed. Its edges are how much more (or less) often two neurons fire together than chance,
on the scale of counts (T^2 times the probabilities, so that every weight is a whole number):

    W = T F^T F - c c^T, diagonal zeroed        W_ij = T^2 (P(i and j) - P(i) P(j))

W has rank at most T + 1 (T tokens, a few thousand, against I neurons, up to 14,336 and more), so every product
the partition needs goes through F: W M = T F^T (F M) - c (c^T M) - diag(W0) M for M [I, P], O(T I P), and the
[I, I] matrix (0.77 GiB at 14,336) is never built; memory is F, T x I float32 (0.22 GiB at 4,096 x 14,336).
Negative edges are kept (an earlier version clamped W at 0, which is not low-rank): a part's inside weight is
then T^2 times the variance over tokens of how many of its neurons fire (minus each neuron's own variance),
so the partition gathers neurons whose firing rises and falls together, and keeps apart pairs that avoid each
other.

The spectral start cuts the co-firing graph S = F^T F (whole counts, never negative; with self-loops, which
only shift the spectrum of its normalised form since every token fires the same number of neurons): the top P
eigenvectors of D^-1/2 S D^-1/2 (D = diag(S 1) its degrees), as the normalised-cut relaxation. S and W differ
by the chance term c c^T / T, which on the normalised graph is the trivial eigenvector's component alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .split import balanced_assign, balanced_kmeans

if TYPE_CHECKING:
    import torch

REFINE_ROUNDS = 20  # cap on the balanced reassignment rounds of graph_partition (each must raise the score)
DENSE_EIGH_BELOW = 1024  # graphs smaller than this take the full eigendecomposition (cheap, and exact)
SUBSPACE_ITERS = 40  # block power iterations of the spectral start above DENSE_EIGH_BELOW neurons (at most)
SUBSPACE_TOL = 1e-3  # ... stopped once an iteration turns the top P Ritz vectors by less than this (Frobenius)
OVERSAMPLE = 8  # extra columns carried by the subspace iteration (faster, steadier convergence of the top P)
CHUNK = 512  # tokens per top-k while finding what fires (its values and indices: CHUNK x share I each)
BLOCK = 1024  # neurons per block of gate/up rows cast to float32 at a time (a multiple of 32: see coactivation_fires)
CHECK = 4  # tokens at each end whose kept MLP intermediate is checked against the activations computed from x
CHECK_RTOL = 1e-4  # ... within float32 rounding (relative, and absolute to the largest activation's size)
NARROW = 12  # F^T y with fewer columns than this is taken as (y^T F)^T (see transposed_product)


class Rows(Protocol):
    """A 2-D weight [I, H] read a block of rows at a time in its own dtype: a tensor, or the source's bytes
    (calibrate.StoredRows), so that the whole matrix need never be held in float32."""

    shape: tuple[int, ...]

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


def coactivation_fires(
    x: torch.Tensor, gate: Rows, up: Rows, act, share: float, chunk: int = CHUNK, block: int = BLOCK
) -> torch.Tensor:
    """Which neurons fire on which token, from the FFN's inputs x [T, H] float32 and its gate, up [I, H] (any
    dtype, read by rows): bool [T, I], each row with round(share * I) (at least 1) neurons set, those of the
    token's largest |act(gate x) * (up x)|.

    The activations are made BLOCK neurons at a time from gate and up rows cast to float32 one block at a time,
    into one [T, I] float32 matrix (the size of F's float32 copy the partition holds later), then each token's
    top-k is taken CHUNK tokens at a time. Memory: the activations, two blocks of rows and three [T, BLOCK]
    temporaries; never gate or up whole in float32 (0.44 GiB at 14,336 x 4,096). Every activation equals the
    one [T, H] @ [H, I] products would give (each is one dot product over H, the same whichever block holds it:
    tests/test_coactivation.py), so F is the same as from gate and up whole.
    """
    return fires_of([activations(x, gate, up, act, block)], share, chunk)


def activations(x: torch.Tensor, gate: Rows, up: Rows, act, block: int = BLOCK) -> torch.Tensor:
    """act(x gate^T) * (x up^T) for x [T, H] float32: [T, I] float32, made BLOCK neurons at a time from gate and
    up rows cast to float32 one block at a time."""
    import torch

    neurons = gate.shape[0]
    h = torch.empty(len(x), neurons)  # [T, I] float32
    for a in range(0, neurons, block):
        g, u = gate[a : a + block].float(), up[a : a + block].float()  # [b, H] each, one block in float32
        h[:, a : a + block] = act(x @ g.T).mul_(x @ u.T)  # [T, b]
        del g, u
    return h


def fires_of(pieces: list[torch.Tensor], share: float, chunk: int = CHUNK, consume: bool = True) -> torch.Tensor:
    """F from the activations of all tokens, given as pieces [t_s, I] float32 of consecutive tokens (with CONSUME
    each is made its absolute value in place and dropped from the list once used; else they are left as they
    are, a piece's absolute values made aside one piece at a time): bool [T, I], each row with
    round(share * I) (at least 1) neurons set, those of the token's largest |activation| (top-k CHUNK tokens at
    a time; each row's top-k is its own, however the tokens are cut).

    The top-k is taken unsorted: F needs the set, not its order. torch's CPU top-k selects the set first (one
    nth_element, or a partial sort when k is at most 1/64 of the row) and with `sorted` only then orders it, so
    the set, ties at the k-th value included, is the one a sorted top-k gives (tests/test_coactivation.py);
    the sort was about 40% of the top-k's time at SmolLM2's width (issue 26)."""
    import torch

    tokens, neurons = sum(len(p) for p in pieces), pieces[0].shape[1]
    count = max(1, round(share * neurons))
    fires = torch.zeros(tokens, neurons, dtype=torch.bool)  # [T, I]: 1 byte a neuron-token
    at = 0
    queue = pieces if consume else list(pieces)
    while queue:
        piece = queue.pop(0)
        h = piece.abs_() if consume else piece.abs()  # [t, I]
        for s in range(0, len(h), chunk):
            fires[at + s : at + s + chunk].scatter_(1, h[s : s + chunk].topk(count, dim=1, sorted=False).indices, True)
        at += len(h)
        del h
    return fires


def same_as(
    pieces: list[torch.Tensor], x: torch.Tensor, gate: Rows, up: Rows, act, check: int = CHECK, rtol: float = CHECK_RTOL
) -> bool:
    """Whether PIECES (an MLP intermediate kept by the pass: [t_s, I] float32 over x's tokens, in order) are the
    activations act(x gate^T) * (x up^T) that coactivation_fires would compute: their shapes, and the values of
    the first and last CHECK tokens within RTOL (relative, and absolute to the largest activation's size: float32
    rounding by default, a bfloat16 pass's rounding for its intermediate). A family whose MLP computes something
    else, such as biases the activations here leave out, fails and is computed from x instead."""
    import torch

    if not pieces or sum(len(p) for p in pieces) != len(x) or any(p.shape[1:] != (gate.shape[0],) for p in pieces):
        return False
    if any(p.dtype != torch.float32 for p in pieces):
        return False
    k = min(check, len(pieces[0]), len(pieces[-1]))
    got = torch.cat([pieces[0][:k], pieces[-1][len(pieces[-1]) - k :]])  # [2k, I]
    want = activations(torch.cat([x[:k], x[len(x) - k :]]), gate, up, act)  # [2k, I]
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(got, want, rtol=rtol, atol=rtol * scale))


class Graph(Protocol):
    """What graph_partition needs from a graph on n neurons: its normalised form for the spectral start, and
    the objective (weights W) through products with a membership matrix."""

    n: int
    shift: float  # added to the normalised graph's spectrum so that its top eigenvalues are the largest in size

    def normalised_dense(self) -> torch.Tensor: ...  # float64 [I, I], D^-1/2 S D^-1/2 (small graphs only)

    def shifted(self, q: torch.Tensor) -> torch.Tensor: ...  # (D^-1/2 S D^-1/2 + shift) q, q [I, m] float32

    def affinity(self, labels: torch.Tensor) -> torch.Tensor: ...  # W @ onehot(labels): [I, P]

    def score(self, labels: torch.Tensor) -> float: ...  # the total weight of W inside the groups


class DenseGraph:
    """A graph held as a dense [I, I] tensor w (the objective), with `spectral` (default: w itself) the graph
    whose normalised form gives the spectral start. Any symmetric graph; tests use it as the reference."""

    def __init__(self, w: torch.Tensor, spectral: torch.Tensor | None = None, shift: float = 1.0):
        self.w, self.s, self.shift = w, (w if spectral is None else spectral), shift
        self.n = w.shape[0]
        self.dc = self.s.sum(1).clamp_min(1e-12).rsqrt().float()[:, None]  # [I, 1]: D^-1/2
        self.s32 = self.s.float()  # the spectral start's products in float32 (the same tensor where it is)

    def normalised_dense(self) -> torch.Tensor:
        d = self.s.sum(1).clamp_min(1e-12).rsqrt().double()  # [I]
        return d[:, None] * self.s.double() * d[None, :]

    def shifted(self, q: torch.Tensor) -> torch.Tensor:
        """(D^-1/2 S D^-1/2 + shift) q for q [I, m], without forming the normalised graph: one [I, I] product."""
        import torch

        product = self.s32 @ (self.dc * q)  # [I, m]
        return torch.addcmul(q, self.dc, product) if self.shift == 1 else self.dc * product + self.shift * q

    def affinity(self, labels: torch.Tensor) -> torch.Tensor:
        import torch

        return self.w @ torch.nn.functional.one_hot(labels).to(self.w.dtype)

    def score(self, labels: torch.Tensor) -> float:
        return inside_weight(self.w, labels)


class CoactivationGraph:
    """The co-activation graph of F [T, I] (module docstring), held as F alone: W = T F^T F - c c^T with its
    diagonal zeroed for the objective, S = F^T F for the spectral start. Memory T x I float32."""

    shift = 0.0  # S = F^T F is positive semi-definite: D^-1/2 S D^-1/2 has its eigenvalues in [0, 1]

    def __init__(self, fires: torch.Tensor):

        self.f = fires.float()  # [T, I] 0/1
        self.tokens, self.n = fires.shape
        # [I]: how often each neuron fires, summed in float32 (whole numbers below 2^24 tokens: exact) then widened;
        # fires.sum(0, dtype=torch.float64) made a float64 copy of all of F first (0.44 GiB at 4,096 x 14,336)
        self.c = self.f.sum(0).double()
        self.diag = self.tokens * self.c - self.c * self.c  # [I]: W's diagonal before it is zeroed (F_ti^2 = F_ti)
        # degrees of S: S 1 = F^T (F 1), whole numbers (exact in float32 below 2^24)
        self.d = transposed_product(self.f, self.f.sum(1, keepdim=True))[:, 0].double()  # [I]
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # labels, F M (members)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, S) as float64 [I, I] matrices: the reference the low-rank products must match (tests only)."""
        s = self.f.double().T @ self.f.double()  # [I, I] co-firing counts
        w = (self.tokens * s - self.c[:, None] * self.c[None, :]).fill_diagonal_(0)
        return w, s

    def normalised_dense(self) -> torch.Tensor:
        d = self.d.clamp_min(1e-12).rsqrt()  # [I]
        return d[:, None] * (self.f.T @ self.f).double() * d[None, :]  # [I, I]: small graphs only

    def shifted(self, q: torch.Tensor) -> torch.Tensor:
        """D^-1/2 F^T F D^-1/2 q for q [I, m]: two thin products, O(T I m)."""
        dc = self.d.clamp_min(1e-12).rsqrt().float()[:, None]  # [I, 1]
        return dc * transposed_product(self.f, self.f @ (dc * q))  # [I, T] @ ([T, I] @ [I, m]) -> [I, m]

    def members(self, labels: torch.Tensor) -> torch.Tensor:
        """F M [T, P] float32 for M = onehot(labels): how many of each group's neurons fire on each token (whole
        numbers, exact). The last one is kept: a round scores its labels, then the next takes their affinities."""
        import torch

        if self.last is None or not torch.equal(self.last[0], labels):
            self.last = labels.clone(), self.f @ torch.nn.functional.one_hot(labels).float()  # [T, I] @ [I, P]
        return self.last[1]

    def affinity(self, labels: torch.Tensor) -> torch.Tensor:
        """W @ onehot(labels) [I, P] float64: T F^T (F M) - c (c^T M) - diag * M. F^T (F M) sums at most T whole
        numbers per entry (exact while T x I / P < 2^24, float32 rounding beyond)."""
        import torch

        m = torch.nn.functional.one_hot(labels).double()  # [I, P]
        inside = self.tokens * transposed_product(self.f, self.members(labels)).double()  # [I, P]
        return inside - self.c[:, None] * (self.c @ m)[None, :] - self.diag[:, None] * m

    def score(self, labels: torch.Tensor) -> float:
        """sum over groups g of m_g^T W m_g = T ||F m_g||^2 - (c^T m_g)^2, less the zeroed diagonal: whole
        numbers summed in float64, exact."""
        import torch

        fm = self.members(labels).double()  # [T, P]
        cm = self.c @ torch.nn.functional.one_hot(labels).double()  # [P]
        return float(self.tokens * fm.square().sum() - cm.square().sum() - self.diag.sum())


def transposed_product(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F^T y for F [T, I], y [T, m] -> [I, m]. With few columns (m < NARROW) as (y^T F)^T: the BLAS's path for
    a transposed tall operand times a narrow one is several times slower here (4,096 x 14,336 by 8 columns:
    0.63 s against 0.11 s; from 12 columns on, the direct product is the faster, 0.08 s against 0.13 s at 16)."""
    return (y.T @ f).T if y.shape[1] < NARROW else f.T @ y


def graph_partition(graph, parts: int, gen: torch.Generator, rounds: int = REFINE_ROUNDS) -> torch.Tensor:
    """Labels [I] of a partition of `graph` (a Graph, or a dense symmetric [I, I] tensor) into `parts` groups of
    equal size with a large weight inside the groups.

    Spectral start (the normalised-cut relaxation): the top `parts` eigenvectors of the normalised graph
    (spectral_embedding: only those, not all I of them), rows normalised, grouped by balanced k-means. Then
    rounds of balanced reassignment: each neuron is offered the group it is most connected to (balanced_assign
    on the affinities W @ onehot), kept while the total weight inside the groups grows.
    """
    import torch

    if isinstance(graph, torch.Tensor):
        graph = DenseGraph(graph)
    size = graph.n // parts
    emb = spectral_embedding(graph, parts, gen)  # [I, P]
    emb = (emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    best = balanced_kmeans(emb, parts, gen)
    best_score = graph.score(best)
    for _ in range(rounds):
        labels = balanced_assign(-graph.affinity(best), size)  # [I, P] affinities, most connected first
        score = graph.score(labels)
        if score <= best_score:
            break
        best, best_score = labels, score
    return best


def spectral_embedding(graph: Graph, parts: int, gen: torch.Generator) -> torch.Tensor:
    """The eigenvectors [I, P] of the `parts` largest eigenvalues of the graph's normalised form D^-1/2 S D^-1/2.

    Below DENSE_EIGH_BELOW neurons the full eigendecomposition, O(I^3). Above, randomized subspace iteration
    for the P vectors alone: up to SUBSPACE_ITERS products of the normalised graph (graph.shifted: never formed)
    with a seeded random [I, P + OVERSAMPLE] block, re-orthonormalised, each followed by Rayleigh-Ritz on the
    block, until its top P Ritz vectors stop turning. (torch.lobpcg was tried and was several times slower at
    these sizes: its Python-level bookkeeping dominates.)
    """
    import torch

    n = graph.n
    if n < max(DENSE_EIGH_BELOW, parts + OVERSAMPLE):
        _, vecs = torch.linalg.eigh(graph.normalised_dense())  # ascending eigenvalues
        return vecs[:, -parts:]
    # A general graph's spectrum is shifted by +1 (a normalised graph's eigenvalues lie in [-1, 1]) so that the
    # largest eigenvalues are also the largest in magnitude, which subspace iteration converges to.
    q = torch.linalg.qr(torch.randn(n, parts + OVERSAMPLE, generator=gen))[0]  # [I, P + p]
    top = None  # the current estimate of the P eigenvectors: the block's top Ritz vectors, [I, P]
    for _ in range(SUBSPACE_ITERS):
        y = graph.shifted(q)  # [I, P + p]
        _, small = torch.linalg.eigh((q.T @ y).double())  # Rayleigh-Ritz on the block: [P + p, P + p], free
        ritz = q @ small[:, -parts:].to(q.dtype)  # [I, P], orthonormal
        # stop once the P wanted vectors stop turning (0: invariant). The whole block's turn is no test: its
        # oversampled columns converge at the rate of the spectrum's tail and did not settle in 40 steps on
        # SmolLM2's layers, where the top P did in 12-21
        if top is not None and float((ritz - top @ (top.T @ ritz)).norm()) < SUBSPACE_TOL:
            return ritz.double()
        top = ritz
        q = torch.linalg.qr(y)[0]
    return top.double()


def inside_weight(w: torch.Tensor, labels: torch.Tensor) -> float:
    """Total edge weight of a dense graph w [I, I] between neurons of the same group: the [I, I] product in w's
    dtype, its [I, P] result summed in float64 (no float64 copy of the graph)."""
    import torch

    onehot = torch.nn.functional.one_hot(labels).to(w.dtype)  # [I, P]
    into = (w @ onehot).gather(1, labels[:, None])  # [I, 1]: each neuron's weight into its own group
    return float(into.double().sum())
