"""What the conversion learns by running the dense model: `--router-init kmeans` and `--split-by coactivation`
(from calibration text), `--router-init hidden` (from per-expert prompts).

One pass of the dense model (stream.py: one decoder layer at a time, CPU, in float32, the source's dtype or
bfloat16 per --calibration-dtype) over the first N tokens of the text captures, with a forward pre-hook on each
MoE layer's dense `mlp`, the hidden state the router will see (after the post-attention norm). Per layer the rows
are then:
- clone, drop (and noise): the k-means centroids of those inputs, one per expert: a token is routed to the
  experts whose centroid it points towards most;
- fine-grained: k-means with one centroid per virtual group, shared by the group's parts (as the random router
  shares its rows), which keeps the plan's exactness claim;
- split: for each expert e the ridge least-squares direction w_e with x . w_e ~ ||FFN_e(x)||, centred across
  experts (least squares is linear in its targets, so this regresses each expert's norm minus the mean expert
  norm: a common component would shift every logit alike and route nothing).
For --split-by coactivation, each layer's co-activation graph is built from the same captured inputs and cut
into balanced neuron groups (methods/split.py). For --router-init hidden, row e is the mean FFN input over every
token of router row e's prompts (each prompt its own sequence, in the same pass). Each MoE layer's result is
computed as soon as the pass yields its inputs, which are then dropped.
Every row is then scaled to the norm a random row has, router_std * sqrt(hidden), so the logits start at the
random router's scale and only their direction is learnt from data: training settings tuned for the random
router (learning rate, z-loss) see the same magnitudes.

Memory, beyond the clone conversion's: one decoder layer and the hidden states of every chunk (stream.py), one
MoE layer's captured inputs (tokens x hidden float32: 4096 x 576 x 4 B = 9.4 MB for SmolLM2), and what its
method computes from them (co-activation: which neurons fire on which token, tokens x intermediate float32,
0.22 GiB at 4,096 x 14,336, found from activations of that size and gate/up read a block of rows at a time
(StoredRows); the [I, I] graph is never formed; split's ridge rows: the MLP intermediate of the layer's tokens,
tokens x intermediate float32, the same size, which the pass keeps so as not to compute it again).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UpcycleError
from .methods import LayerBuilder
from .methods.coactivation import CHECK_RTOL
from .ops import Router, by_coactivation
from .prompts import read_expert_prompts
from .stream import Intermediate, ffn_inputs

if TYPE_CHECKING:
    import torch

    from ..source import Checkpoint, TensorInfo
    from .ops import Plan
    from .spec import ConvertSpec

LLOYD_ITERS = 50  # a fixed cap; the loop stops earlier once no assignment changes
RIDGE = 1e-3  # ridge lambda, relative to the mean eigenvalue of X^T X
CHUNK = 512  # tokens per forward pass (at most the model's max_position_embeddings)
CHARS_PER_TOKEN = 8  # first guess at the characters of text per token when reading a prefix of the file


def calibration_ids(folder: Path, text_file: Path, tokens: int) -> torch.Tensor:
    """The first `tokens` token ids of the calibration text: [T].

    Only as much of the file is read and tokenised as gives them: a prefix of CHARS_PER_TOKEN characters per
    token, cut at its last whitespace (a word boundary, so the tokens before the cut are those the whole text
    gives), doubled until it yields more than `tokens` ids or is the whole file.
    """
    from transformers import AutoTokenizer

    if not text_file.is_file():
        raise UpcycleError(f"--calibration {text_file.name}: no such file; give a plain text file")
    tok = AutoTokenizer.from_pretrained(folder)
    chars = CHARS_PER_TOKEN * max(tokens, 1)
    while True:
        text, whole = text_prefix(text_file, chars)
        if not whole:
            cut = max(text.rfind(" "), text.rfind("\n"))
            text = text[:cut] if cut > 0 else text
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if whole or len(ids) > tokens:
            return ids[:tokens]
        chars *= 2


def text_prefix(text_file: Path, chars: int) -> tuple[str, bool]:
    """The first `chars` characters of a UTF-8 file, and whether that is the whole file."""
    try:
        with text_file.open(encoding="utf-8") as f:
            text = f.read(chars)
            return text, not f.read(1)
    except UnicodeDecodeError:
        raise UpcycleError(f"--calibration {text_file.name} is not UTF-8 text; give a plain text file") from None


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = LLOYD_ITERS) -> torch.Tensor:
    """Centroids [k, D] of x [T, D]: k-means++ seeding, then Lloyd iterations until no assignment changes."""
    import torch

    # squared distances as ||x||^2 - 2 x.c + ||c||^2, one matrix-vector product per centroid: no [T, D] copy of
    # the activations (x - c and its square were two per centroid)
    xx = torch.einsum("td,td->t", x, x)  # [T]

    def dist2(c: torch.Tensor) -> torch.Tensor:
        return (xx - 2 * (x @ c) + c @ c).clamp_min_(0)  # [T]

    first = int(torch.randint(len(x), (1,), generator=gen))
    centroids = [x[first]]
    d2 = dist2(x[first])  # [T]: squared distance to the nearest centroid so far
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        pick = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(x[pick])
        d2 = torch.minimum(d2, dist2(x[pick]))
    c = torch.stack(centroids)  # [k, D]
    labels = torch.full((len(x),), -1, dtype=torch.long)
    for _ in range(iters):
        # the nearest centroid: ||x - c||^2 less the ||x||^2 every centroid shares, as one product (torch.cdist
        # against a few centroids, and a mask per cluster, were most of a calibrated conversion's time)
        new = ((c * c).sum(1)[None, :] - 2 * (x @ c.T)).argmin(1)  # [T]
        if torch.equal(new, labels):
            break
        labels = new
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [T, k]
        counts = onehot.sum(0)  # [k]
        members = counts > 0  # an empty cluster keeps its centroid
        c[members] = (onehot.T @ x)[members] / counts[members, None]
    return c


def norm_directions(x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Ridge least squares: x [T, H], y [T, E] -> w [E, H] minimising ||x w^T - y||^2 + lam ||w||^2."""
    import torch

    xd = x.double()  # [T, H], once (exact)
    gram = xd.T @ xd  # [H, H]
    lam = ridge * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xd.T @ y.double())  # [H, E]
    return w.T.float()


def scaled(rows: torch.Tensor, norm: float) -> torch.Tensor:
    """Each row [E, H] scaled to `norm` (a zero row stays zero)."""
    lengths = rows.norm(dim=1, keepdim=True)
    return rows / lengths.clamp_min(1e-30) * norm


def expert_norms(
    x: torch.Tensor, builder: LayerBuilder, experts: list[dict], act, inner: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """||FFN_e(x)|| of each routed expert over x [T, H]: [T, E]. `experts[e]` maps role -> transform. INNER, where
    given, is the dense MLP's intermediate act(gate x) * (up x) of x's tokens ([t_s, I] float32 pieces, x's rows
    in order, checked by the caller): an expert made of dense neurons (split's, LayerBuilder.neurons) is then its
    down applied to their columns of it, a third of the products of computing gate and up again."""
    import torch

    cols = []
    for transforms in experts:
        idx = builder.neurons(transforms) if inner is not None else None
        if idx is not None:
            down = builder.tensor("down", transforms["down"])  # [H, I_e]
            first = int(idx[0]) if len(idx) else 0
            if torch.equal(idx, torch.arange(first, first + len(idx))):  # one range of neurons (split's default)
                idx = slice(first, first + len(idx))  # a view of the columns, no gather
            cols.append(torch.cat([(piece[:, idx] @ down.T).norm(dim=1) for piece in inner]))  # [t_s, H] -> [T]
            continue
        w = {
            role: builder.dense[role].float() if t is None else builder.tensor(role, t)
            for role, t in transforms.items()
        }
        out = (act(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T  # [T, I_e] -> [T, H]
        cols.append(out.norm(dim=1))
    return torch.stack(cols, 1)


@dataclass(frozen=True)
class Sequences:
    """The token sequences of the pass (each run on its own, positions from 0) and whose each is: -1 for a chunk
    of the calibration text, e for a chunk of a prompt of router row e (--expert-prompts)."""

    ids: list[torch.Tensor]
    owner: list[int]

    @classmethod
    def of(cls, calibration: torch.Tensor | None, prompts: list[list[torch.Tensor]], chunk: int) -> Sequences:
        ids, owner = [], []
        for e, texts in [(-1, [calibration] if calibration is not None else []), *enumerate(prompts)]:
            for t in texts:
                pieces = list(t.split(chunk))
                ids += pieces
                owner += [e] * len(pieces)
        return cls(ids, owner)

    def calibration(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The captured rows of the calibration text: [T, H]."""
        import torch

        return torch.cat([x for x, e in zip(xs, self.owner, strict=True) if e < 0])


def calibrate(
    folder: Path, ckpt: Checkpoint, plan: Plan, spec: ConvertSpec
) -> tuple[dict[int, torch.Tensor] | None, dict[int, dict] | None, dict]:
    """What the conversion needs from running the dense model, the whole pass run here:
    router rows (layer -> [E, H] float32) for --router-init kmeans/hidden, neuron partitions (layer -> (by, parts)
    -> groups) for --split-by coactivation, and what to record in upcycle.json about the text used.

    One pass over the dense model, one decoder layer at a time (stream.py), serves every user at once; each MoE
    layer's result is computed as soon as its FFN inputs are captured, and those inputs are then dropped.
    (`convert` runs the same pass beside its writer instead: beside.py.)"""
    work = prepare(folder, ckpt, plan, spec)
    for _ in work.layers():
        pass
    return work.results.routers, work.results.partitions, work.records


@dataclass
class Calibration:
    """A calibration pass made ready: its inputs read and checked (a bad file or too short a text has failed
    already), what upcycle.json will record, and `layers()`, which runs the pass."""

    folder: Path
    ckpt: Checkpoint
    seqs: Sequences
    layer_order: tuple[int, ...]  # the MoE layers, in the order the pass reaches them
    dtype: torch.dtype
    results: LayerResults  # filled layer by layer: .routers, .partitions
    records: dict

    def layers(self, ahead: bool = False) -> Iterator[int]:
        """Run the pass: each MoE layer once its results are in `results`, in increasing order. With AHEAD the
        forward runs in a thread of its own, one layer ahead of the methods (beside.one_ahead): the same inputs
        and results, the forward's products beside the methods' many small serial steps."""
        import torch

        from .beside import one_ahead

        def inputs() -> Iterator[tuple[int, list[torch.Tensor]]]:
            inner = self.results.intermediate
            return ffn_inputs(self.folder, self.ckpt, self.seqs.ids, self.layer_order, self.dtype, inner)

        for layer, xs in one_ahead(inputs, torch.get_num_threads()) if ahead else inputs():
            self.results.add(layer, xs, self.seqs)
            del xs
            yield layer


def prepare(folder: Path, ckpt: Checkpoint, plan: Plan, spec: ConvertSpec) -> Calibration:
    """Everything of the calibration that can fail on bad input, done now, and the pass ready to run."""
    from transformers import AutoConfig

    groups = {op.layer: op.group for op in plan.ops if isinstance(op, Router)}
    prompts = None
    if spec.router_init == "hidden":  # read the file before the model: a bad file fails fast
        group = max(groups.values(), default=1)
        what = f"replica rows (--experts / --granularity = {spec.experts // group})" if group > 1 else "experts"
        prompts = read_expert_prompts(Path(spec.expert_prompts), spec.experts // group, what, len(spec.expert_from))
    ids = calibration_ids(folder, Path(spec.calibration), spec.calibration_tokens) if spec.calibration else None
    if ids is not None:
        need = 2
        if spec.router_init == "kmeans":
            need = spec.experts if spec.init == "split" else spec.experts // max(groups.values(), default=1)
        if len(ids) < max(need, 2):
            raise UpcycleError(
                f"--calibration {Path(spec.calibration).name} gives {len(ids)} tokens, fewer than the {max(need, 2)} "
                "the conversion needs (one per cluster, at least 2); give a longer text"
            )
    config = AutoConfig.from_pretrained(folder)
    prompt_ids = prompt_token_ids(folder, prompts) if prompts is not None else []
    chunk = min(CHUNK, getattr(config, "max_position_embeddings", CHUNK) or CHUNK)
    seqs = Sequences.of(ids, prompt_ids, chunk)
    dtype = pass_dtype(ckpt, spec.calibration_dtype)
    wanted = coactivation_wanted(plan)
    ridge = frozenset(groups) if ridge_rows(spec) else frozenset()  # split experts' rows: their MLP intermediate
    inner = intermediate_for(frozenset(layer for layer, _ in wanted) | ridge, config, seqs, dtype)
    layer_results = LayerResults(ckpt, plan, spec, config, groups, prompts is not None, wanted, inner)
    records: dict = {}
    if ids is not None:
        records["calibration"] = {"file": Path(spec.calibration).name, "tokens": len(ids)}
    if prompts is not None:
        records["expert_prompts"] = {
            "file": Path(spec.expert_prompts).name,
            "prompts": sum(map(len, prompts)),
            "tokens": sum(len(t) for texts in prompt_ids for t in texts),
        }
    return Calibration(folder, ckpt, seqs, tuple(sorted(groups)), dtype, layer_results, records)


def coactivation_wanted(plan: Plan) -> frozenset[tuple[int, int]]:
    """(layer, parts) of every expert op split by co-activation: the partitions the pass must make."""
    return frozenset((op.layer, op.transform.parts) for op in plan.expert_ops() if by_coactivation(op))


def ridge_rows(spec: ConvertSpec) -> bool:
    """Whether the router rows are split's ridge rows (--router-init kmeans with --init split): made from each
    expert's output norms, which its dense neurons' activations give (expert_norms)."""
    return spec.router_init == "kmeans" and spec.init == "split"


def intermediate_for(layers: frozenset[int], config, seqs: Sequences, dtype: torch.dtype) -> Intermediate | None:
    """What the pass keeps of LAYERS' (the co-activation layers', and the split's ridge-row layers') MLP
    intermediate (the down projection's input, which the dense MLP computes anyway), so that neither
    coactivation_partition nor expert_norms need compute act(gate x) * (up x) again:
    the calibration sequences', for a family whose MLP has a gate, an up and a down projection. In a float32 pass
    they are the float32 activations a recompute gives (checked within float32 rounding); in a bfloat16 (or
    float16) pass, the model's own activations in that dtype (checked within its rounding), which the method then
    ranks. None: nothing kept (each layer's activations are then computed from its inputs in float32)."""
    import torch

    from ..arch import family_for

    mlp = family_for(config.model_type).mlp
    if not layers or not all(mlp.get(role) for role in ("gate", "up", "down")):
        return None
    rtol = max(CHECK_RTOL, 4 * torch.finfo(dtype).eps)  # float32: 1e-4; bfloat16: 2^-5
    return Intermediate(layers, mlp["down"], frozenset(i for i, e in enumerate(seqs.owner) if e < 0), rtol)


def pass_dtype(ckpt: Checkpoint, choice: str) -> torch.dtype:
    """The dtype the dense model runs in: float32 (as the whole-model pass always did), with "source" the
    floating dtype most of the source's tensors are stored in, or bfloat16 whatever they are stored in (the
    weights rounded to it: on a CPU with bfloat16 matrix instructions its products run ~2.5x as fast as
    float32's)."""
    import torch

    from ..dtypes import FLOAT_DTYPES, torch_dtype

    if choice in ("float32", "bfloat16"):
        return getattr(torch, choice)
    stored = Counter(t.dtype for t in ckpt.tensors.values() if t.dtype in FLOAT_DTYPES)
    return torch_dtype(stored.most_common(1)[0][0]) if stored else torch.float32


def prompt_token_ids(folder: Path, prompts: list[list[str]]) -> list[list[torch.Tensor]]:
    """The token ids of every prompt of every router row (no special tokens), as the prompts are listed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    found = []
    for e, texts in enumerate(prompts):
        found.append([tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for text in texts])
        if any(not len(t) for t in found[-1]):
            raise UpcycleError(f"--expert-prompts: a prompt of expert {e} gives no tokens; give some text")
    return found


class LayerResults:
    """Each calibration user's result, layer by layer as the pass yields each MoE layer's FFN inputs."""

    def __init__(
        self,
        ckpt: Checkpoint,
        plan: Plan,
        spec: ConvertSpec,
        config,
        groups: dict[int, int],
        hidden: bool,
        wanted: frozenset[tuple[int, int]],  # (layer, parts) split by co-activation: coactivation_wanted(plan)
        intermediate: Intermediate | None,  # what the pass keeps of those layers' MLPs: intermediate_for(...)
    ):
        from transformers.activations import ACT2FN

        from ..arch import family_for

        self.ckpt, self.plan, self.spec, self.groups, self.hidden = ckpt, plan, spec, groups, hidden
        self.act = ACT2FN[getattr(config, family_for(config.model_type).mlp.get("act") or "hidden_act")]
        self.target_norm = spec.router_std * math.sqrt(config.hidden_size)  # a random N(0, std^2) row's norm
        self.keys = _dense_keys(plan)
        self.routed = _routed_transforms(plan) if spec.router_init == "kmeans" and spec.init == "split" else {}
        self.wanted = wanted
        self.routers: dict[int, torch.Tensor] | None = {} if spec.router_init in ("kmeans", "hidden") else None
        self.partitions: dict[int, dict] | None = {} if self.wanted else None
        self.intermediate = intermediate

    def add(self, layer: int, xs: list[torch.Tensor], seqs: Sequences) -> None:
        """One MoE layer's FFN inputs, xs[s] [t_s, H] for each sequence s."""
        wanted = sorted(p for at, p in self.wanted if at == layer)
        x = seqs.calibration(xs) if wanted or self.spec.router_init == "kmeans" else None  # [T, H], made once
        kept = self.intermediate
        inner = kept.found.pop(layer, None) if kept is not None else None
        rtol = kept.check_rtol if kept is not None else CHECK_RTOL  # read only with a kept intermediate
        if wanted:
            ridge = ridge_rows(self.spec)  # the ridge rows read the intermediate after: the partition leaves it
            found = coactivation_partition(x, self.ckpt, self.keys[layer], self.act, self.spec, inner, rtol, ridge)
            self.partitions[layer] = {("coactivation", parts): found(layer, parts) for parts in wanted}
        if self.spec.router_init == "kmeans":
            self.routers[layer] = self.kmeans_row(layer, x, inner, rtol)
        elif self.hidden:
            self.routers[layer] = hidden_row(xs, seqs.owner, self.target_norm, self.groups[layer])

    def kmeans_row(
        self, layer: int, x: torch.Tensor, inner: list[torch.Tensor] | None = None, rtol: float = CHECK_RTOL
    ) -> torch.Tensor:
        """--router-init kmeans: the layer's rows from its captured FFN inputs x [T, H] (and for split's rows the
        MLP intermediate INNER the pass kept of the same tokens, used once same_as finds it within RTOL)."""
        import torch

        from .methods.coactivation import same_as
        from .router_init import layer_generator

        spec, group = self.spec, self.groups[layer]
        if spec.init == "split":
            keys = self.keys[layer]
            if inner is not None:
                gate, up = (StoredRows(self.ckpt.tensors[keys[role]]) for role in ("gate", "up"))
                with torch.no_grad():
                    inner = inner if same_as(inner, x, gate, up, self.act, rtol=rtol) else None
            dense = {role: self.ckpt.load(key) for role, key in keys.items()}
            builder = LayerBuilder(dense, spec.seed, layer, (self.partitions or {}).get(layer))
            with torch.no_grad():
                y = expert_norms(x, builder, self.routed[layer], self.act, inner)  # [T, E]
            w = norm_directions(x, y)  # [E, H]
            return scaled(w - w.mean(0, keepdim=True), self.target_norm)
        c = kmeans(x, spec.experts // group, layer_generator(spec.seed, layer))  # [E/G, H]
        return scaled(c, self.target_norm).repeat_interleave(group, dim=0)  # [E, H]


def hidden_row(xs: list[torch.Tensor], owner: list[int], norm: float, group: int) -> torch.Tensor:
    """--router-init hidden (mergekit-moe's hidden gate, averaged over tokens): row e is the mean FFN input over
    all tokens of router row e's prompts, scaled to a random row's norm: [E, H]."""
    import torch

    rows = max(owner) + 1
    sums = torch.zeros(rows, xs[0].shape[1], dtype=torch.float64)  # [E', H]
    counts = torch.zeros(rows, dtype=torch.float64)
    for x, e in zip(xs, owner, strict=True):
        if e >= 0:
            sums[e] += x.double().sum(0)
            counts[e] += len(x)
    return scaled((sums / counts[:, None]).float(), norm).repeat_interleave(group, dim=0)  # [E, H]


def coactivation_partition(
    x: torch.Tensor,
    ckpt: Checkpoint,
    keys: dict[str, str],
    act,
    spec: ConvertSpec,
    inner: list[torch.Tensor] | None = None,
    rtol: float = CHECK_RTOL,
    keep: bool = False,
):
    """--split-by coactivation for one MoE layer: a function (layer, parts) -> the balanced partition of its
    neurons that keeps co-activated neurons together (methods/split.py), from its FFN inputs x [T, H]. INNER,
    where the pass kept it, is the MLP intermediate of the same tokens ([t_s, I] float32 pieces, x's rows in
    order; consumed, unless KEEP: then left as they are, for expert_norms): used as the activations once a few
    tokens' check shows it is act(gate x) * (up x) within RTOL (the pass dtype's rounding:
    Intermediate.check_rtol); otherwise they are computed from x."""
    import torch

    from .methods.base import generator
    from .methods.coactivation import CoactivationGraph, coactivation_fires, fires_of, graph_partition, same_as

    share = min(spec.top_k / spec.experts, 0.5)
    gate, up = (StoredRows(ckpt.tensors[keys[role]]) for role in ("gate", "up"))  # read a block of rows at a time
    with torch.no_grad():
        if inner is not None and same_as(inner, x, gate, up, act, rtol=rtol):
            fires = fires_of(inner, share, consume=not keep)  # [T, I] bool
        else:
            fires = coactivation_fires(x, gate, up, act, share)  # [T, I] bool
    graph = CoactivationGraph(fires)  # held as F [T, I] float32: the [I, I] graph is never formed
    del fires

    def found(layer: int, parts: int) -> list[torch.Tensor]:
        labels = graph_partition(graph, parts, generator(spec.seed, "coactivation", layer))
        return [torch.nonzero(labels == c).squeeze(1) for c in range(parts)]

    return found


class StoredRows:
    """A 2-D tensor of the source [N, D] read a block of rows at a time (`rows[a:b]`, in the source's dtype: one
    byte range each, source.read_row_block), for coactivation_fires: never the whole matrix in memory."""

    def __init__(self, info: TensorInfo):
        self.info, self.shape = info, tuple(info.shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        from ..source import read_row_block

        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("StoredRows reads blocks of consecutive rows only")
        return read_row_block(self.info, start, stop)


def _dense_keys(plan: Plan) -> dict[int, dict[str, str]]:
    """layer -> role -> source key of its dense FFN tensors."""
    keys: dict[int, dict[str, str]] = {}
    for op in plan.expert_ops():
        if op.role is not None:
            keys.setdefault(op.layer, {})[op.role] = op.src
    return keys


def _routed_transforms(plan: Plan) -> dict[int, list[dict]]:
    """layer -> for each routed expert in order, role -> transform (None: the dense tensor)."""
    found: dict[int, dict[int, dict]] = {}
    for op in plan.expert_ops():
        if op.expert is not None:  # routed
            found.setdefault(op.layer, {}).setdefault(op.expert, {})[op.role] = op.transform
    return {layer: [by[e] for e in sorted(by)] for layer, by in found.items()}
