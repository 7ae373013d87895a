"""What the conversion learns by running the dense model: `--router-init kmeans` and `--split-by coactivation`
(from calibration text), `--router-init hidden` (from per-expert prompts).

One forward pass of the dense model (transformers, float32, CPU) over the first N tokens of the text captures,
with a forward pre-hook on each MoE layer's dense `mlp`, the hidden state the router will see (after the
post-attention norm). Per layer the rows are then:
- clone, drop (and noise): the k-means centroids of those inputs, one per expert: a token is routed to the
  experts whose centroid it points towards most;
- fine-grained: k-means with one centroid per virtual group, shared by the group's parts (as the random router
  shares its rows), which keeps the plan's exactness claim;
- split: for each expert e the ridge least-squares direction w_e with x . w_e ~ ||FFN_e(x)||, centred across
  experts (least squares is linear in its targets, so this regresses each expert's norm minus the mean expert
  norm: a common component would shift every logit alike and route nothing).
For --split-by coactivation, each layer's co-activation graph is built from the same captured inputs and cut
into balanced neuron groups (methods/split.py), one layer at a time. For --router-init hidden, row e is the mean
FFN input over every token of expert e's prompts (each prompt its own forward pass).
Every row is then scaled to the norm a random row has, router_std * sqrt(hidden), so the logits start at the
random router's scale and only their direction is learnt from data: training settings tuned for the random
router (learning rate, z-loss) see the same magnitudes.

Memory: the captured inputs of every MoE layer at once, tokens x hidden x layers float32 (4096 tokens of
SmolLM2-135M: 4096 x 576 x 30 x 4 B = 283 MB), plus the dense model in float32 for the pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UpcycleError
from .methods import LayerBuilder
from .ops import Router, by_coactivation
from .prompts import read_expert_prompts

if TYPE_CHECKING:
    import torch

    from ..source import Checkpoint
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


def capture(model, ids: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Each MoE layer's FFN input over the calibration ids: layer -> [T, H] float32.

    The ids are run in independent chunks of at most CHUNK tokens (each chunk starts a new sequence), through
    the decoder stack only: the LM head's logits (vocab x tokens) are never computed, and no KV cache is kept.
    """
    import torch

    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: seen[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for i in layers
    ]
    chunk = min(CHUNK, getattr(model.config, "max_position_embeddings", CHUNK))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), chunk):
                model.model(input_ids=ids[start : start + chunk][None], use_cache=False)  # no LM head
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(xs).float() for i, xs in seen.items()}


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = LLOYD_ITERS) -> torch.Tensor:
    """Centroids [k, D] of x [T, D]: k-means++ seeding, then Lloyd iterations until no assignment changes."""
    import torch

    first = int(torch.randint(len(x), (1,), generator=gen))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)  # [T]: squared distance to the nearest centroid so far
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        pick = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(x[pick])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    c = torch.stack(centroids)  # [k, D]
    labels = torch.full((len(x),), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)  # [T]
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):  # an empty cluster keeps its centroid
                c[j] = members.mean(0)
    return c


def norm_directions(x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Ridge least squares: x [T, H], y [T, E] -> w [E, H] minimising ||x w^T - y||^2 + lam ||w||^2."""
    import torch

    gram = x.T.double() @ x.double()  # [H, H]
    lam = ridge * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x.T.double() @ y.double())  # [H, E]
    return w.T.float()


def scaled(rows: torch.Tensor, norm: float) -> torch.Tensor:
    """Each row [E, H] scaled to `norm` (a zero row stays zero)."""
    lengths = rows.norm(dim=1, keepdim=True)
    return rows / lengths.clamp_min(1e-30) * norm


def expert_norms(x: torch.Tensor, builder: LayerBuilder, experts: list[dict], act) -> torch.Tensor:
    """||FFN_e(x)|| of each routed expert over x [T, H]: [T, E]. `experts[e]` maps role -> transform."""
    import torch

    cols = []
    for transforms in experts:
        w = {
            role: builder.dense[role].float() if t is None else builder.tensor(role, t)
            for role, t in transforms.items()
        }
        out = (act(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T  # [T, I_e] -> [T, H]
        cols.append(out.norm(dim=1))
    return torch.stack(cols, 1)


def calibrate(
    folder: Path, ckpt: Checkpoint, plan: Plan, spec: ConvertSpec
) -> tuple[dict[int, torch.Tensor] | None, dict[int, dict] | None, dict]:
    """What the conversion needs from running the dense model, before anything is written:
    router rows (layer -> [E, H] float32) for --router-init kmeans/hidden, neuron partitions (layer -> (by, parts)
    -> groups) for --split-by coactivation, and what to record in upcycle.json about the text used."""
    import torch
    from transformers import AutoModelForCausalLM

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
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    records: dict = {}
    routers = partitions = None
    if ids is not None:
        inputs = capture(model, ids, tuple(sorted(groups)))
        records["calibration"] = {"file": Path(spec.calibration).name, "tokens": len(ids)}
        if spec.split_by == "coactivation":
            partitions = coactivation_partitions(inputs, ckpt, plan, spec, model)
        if spec.router_init == "kmeans":
            routers = kmeans_rows(inputs, ckpt, plan, spec, model, groups, partitions)
    if prompts is not None:
        routers, tokens = hidden_rows(folder, model, prompts, spec, groups)
        records["expert_prompts"] = {
            "file": Path(spec.expert_prompts).name,
            "prompts": sum(map(len, prompts)),
            "tokens": tokens,
        }
    return routers, partitions, records


def _dense_keys(plan: Plan) -> dict[int, dict[str, str]]:
    """layer -> role -> source key of its dense FFN tensors."""
    keys: dict[int, dict[str, str]] = {}
    for op in plan.expert_ops():
        if op.role is not None:
            keys.setdefault(op.layer, {})[op.role] = op.src
    return keys


def kmeans_rows(
    inputs: dict[int, torch.Tensor],
    ckpt: Checkpoint,
    plan: Plan,
    spec: ConvertSpec,
    model,
    groups: dict[int, int],
    partitions: dict[int, dict] | None,
) -> dict[int, torch.Tensor]:
    """--router-init kmeans: each layer's rows from its captured FFN inputs (freed as each layer is done)."""
    import torch
    from transformers.activations import ACT2FN

    from .router_init import layer_generator

    target_norm = spec.router_std * math.sqrt(model.config.hidden_size)  # a random N(0, std^2) row's norm
    routed = _routed_transforms(plan)
    keys = _dense_keys(plan)
    rows: dict[int, torch.Tensor] = {}
    for layer, group in groups.items():
        x = inputs.pop(layer)  # [T, H]
        if spec.init == "split":
            dense = {role: ckpt.load(key) for role, key in keys[layer].items()}
            builder = LayerBuilder(dense, spec.seed, layer, (partitions or {}).get(layer))
            act = ACT2FN[model.config.hidden_act]  # from the config: Phi-3's MLP names it activation_fn
            with torch.no_grad():
                y = expert_norms(x, builder, routed[layer], act)  # [T, E]
            w = norm_directions(x, y)  # [E, H]
            rows[layer] = scaled(w - w.mean(0, keepdim=True), target_norm)
        else:
            c = kmeans(x, spec.experts // group, layer_generator(spec.seed, layer))  # [E/G, H]
            rows[layer] = scaled(c, target_norm).repeat_interleave(group, dim=0)  # [E, H]
    return rows


def hidden_rows(
    folder: Path, model, prompts: list[list[str]], spec: ConvertSpec, groups: dict[int, int]
) -> tuple[dict[int, torch.Tensor], int]:
    """--router-init hidden (mergekit-moe's hidden gate, averaged over tokens): row e of every MoE layer is the
    mean FFN input over all tokens of expert e's prompts, scaled to a random row's norm. Returns the rows and
    how many prompt tokens made them."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    layers = tuple(sorted(groups))
    hidden = model.config.hidden_size
    sums = {layer: torch.zeros(len(prompts), hidden, dtype=torch.float64) for layer in layers}  # [E', H]
    total = 0
    for e, texts in enumerate(prompts):
        count = 0
        for text in texts:
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if not len(ids):
                raise UpcycleError(f"--expert-prompts: a prompt of expert {e} gives no tokens; give some text")
            for layer, x in capture(model, ids, layers).items():  # x [T, H]
                sums[layer][e] += x.double().sum(0)
            count += len(ids)
        for layer in layers:
            sums[layer][e] /= count
        total += count
    target_norm = spec.router_std * math.sqrt(hidden)
    rows = {
        layer: scaled(sums[layer].float(), target_norm).repeat_interleave(groups[layer], dim=0)  # [E, H]
        for layer in layers
    }
    return rows, total


def coactivation_partitions(
    inputs: dict[int, torch.Tensor], ckpt: Checkpoint, plan: Plan, spec: ConvertSpec, model
) -> dict[int, dict]:
    """--split-by coactivation: per MoE layer (one at a time), the balanced partition of its neurons that keeps
    co-activated neurons together: layer -> {("coactivation", parts): [groups of neuron indices]}."""
    import torch
    from transformers.activations import ACT2FN

    from .methods.base import generator
    from .methods.split import coactivation_graph, graph_partition

    wanted = {(op.layer, op.transform.parts) for op in plan.expert_ops() if by_coactivation(op)}
    keys = _dense_keys(plan)
    share = min(spec.top_k / spec.experts, 0.5)
    found: dict[int, dict] = {}
    for layer, parts in sorted(wanted):
        gate, up = (ckpt.load(keys[layer][role]).float() for role in ("gate", "up"))
        act = ACT2FN[model.config.hidden_act]
        with torch.no_grad():
            w = coactivation_graph(inputs[layer], gate, up, act, share)  # [I, I]
        labels = graph_partition(w, parts, generator(spec.seed, "coactivation", layer))
        groups = [torch.nonzero(labels == c).squeeze(1) for c in range(parts)]
        found.setdefault(layer, {})[("coactivation", parts)] = groups
    return found


def _routed_transforms(plan: Plan) -> dict[int, list[dict]]:
    """layer -> for each routed expert in order, role -> transform (None: the dense tensor)."""
    found: dict[int, dict[int, dict]] = {}
    for op in plan.expert_ops():
        if op.expert is not None:  # routed
            found.setdefault(op.layer, {}).setdefault(op.expert, {})[op.role] = op.transform
    return {layer: [by[e] for e in sorted(by)] for layer, by in found.items()}
