"""Quality of co-activation partitions on SmolLM2's real activations (issue 26): the clamped dense graph of
the earlier versions against the low-rank graph conversion now uses, and the uncentred co-firing graph.

For layers 0, 8, 16, 24, 29: each token's intermediate activations on the first 4,096 tokens of README.md
(calibration) and of docs/convert.md (held out), fires = each token's top quarter by |activation| (8 experts
top-2). Partitions into 8 groups: `old` max(0, P(i and j) - P(i)P(j)) as a dense [I, I] graph, `new` the
low-rank T^2 (P(i and j) - P(i)P(j)) (CoactivationGraph, what conversion runs), `raw` the co-firing counts
T F^T F without the chance term (also low-rank), `random`, `contiguous`. Coverage: per token, the share of its
firing neurons (and of its |activation| mass) inside its best 2 groups, averaged over tokens; oracle routing,
so an upper bound on what a router can keep; and the busiest group's load over the mean (4.0 at most: every
token picks it). Writes benchmarks/results/coactivation_quality_<yyyymmdd>.json.

    python benchmarks/coactivation_quality.py
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import torch

from upcycle.convert.methods.base import generator
from upcycle.convert.methods.coactivation import CoactivationGraph, graph_partition, inside_weight
from upcycle.source import resolve

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [0, 8, 16, 24, 29]
PARTS, TOP_K, SHARE, TOKENS = 8, 2, 0.25, 4096


def activations(model, ids: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's act(gate x) * (up x) over the tokens, 512-token chunks: [T, I]."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in LAYERS}
    hooks = [
        model.model.layers[i].mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0][0]))
        for i in LAYERS
    ]
    with torch.no_grad():
        for s in range(0, len(ids), 512):
            model(input_ids=torch.tensor([ids[s : s + 512]]))
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def fires_of(h: torch.Tensor) -> torch.Tensor:
    count = round(SHARE * h.shape[1])
    return torch.zeros_like(h, dtype=torch.bool).scatter_(1, h.abs().topk(count, 1).indices, True)  # [T, I]


def clamped_graph(f: torch.Tensor) -> torch.Tensor:
    """The earlier versions' graph: max(0, P(i and j) - P(i)P(j)), no self-loops, dense [I, I] float32."""
    f = f.double()
    p = f.mean(0)
    return (f.T @ f / len(f) - p[:, None] * p[None]).clamp_min(0).fill_diagonal_(0).float()


def uncentred(f: torch.Tensor) -> CoactivationGraph:
    """T F^T F without self-loops: the co-activation graph with its chance term c c^T left out."""
    graph = CoactivationGraph(f)
    graph.diag = graph.tokens * graph.c  # the diagonal of T F^T F
    graph.c = torch.zeros_like(graph.c)
    return graph


def coverage(labels: torch.Tensor, h: torch.Tensor) -> tuple[float, float, float]:
    """Mean share of each token's firing neurons, and of its |activation| mass, in its best TOP_K groups; and
    the busiest group's load over the mean when each token picks its TOP_K groups of largest mass."""
    m = torch.nn.functional.one_hot(labels, PARTS).float()  # [I, P]
    fm, mass = fires_of(h).float() @ m, h.abs() @ m  # [T, P]
    share = [(x.topk(TOP_K, 1).values.sum(1) / x.sum(1)).mean().item() for x in (fm, mass)]
    load = torch.bincount(mass.topk(TOP_K, 1).indices.flatten(), minlength=PARTS).float()  # [P]
    return share[0], share[1], (load.max() / load.mean()).item()


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve("smollm2").folder
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = {name: tok(ROOT.joinpath(name).read_text(), add_special_tokens=False)["input_ids"][:TOKENS]
           for name in ("README.md", "docs/convert.md")}  # fmt: skip
    calib, held = activations(model, ids["README.md"]), activations(model, ids["docs/convert.md"])
    rows = []
    for i in LAYERS:
        f = fires_of(calib[i])
        neurons = f.shape[1]
        graph, old_w = CoactivationGraph(f), clamped_graph(f)
        found = {
            "old": graph_partition(old_w, PARTS, generator(0, "coactivation", i)),
            "new": graph_partition(graph, PARTS, generator(0, "coactivation", i)),
            "raw": graph_partition(uncentred(f), PARTS, generator(0, "coactivation", i)),
            "random": torch.randperm(neurons, generator=torch.Generator().manual_seed(i)) % PARTS,
            "contiguous": torch.arange(neurons) // (neurons // PARTS),
        }
        row: dict = {"layer": i}
        for name, labels in found.items():
            fires_held, mass_held, load_held = coverage(labels, held[i])
            row[name] = {"cover_fires_calib": coverage(labels, calib[i])[0], "cover_fires_held": fires_held,
                         "cover_mass_held": mass_held, "max_load_held": load_held,
                         "old_objective": inside_weight(old_w, labels),
                         "new_objective": graph.score(labels)}  # fmt: skip
        rows.append(row)
        print(f"| {i} | " + " | ".join(f"{row[n]['cover_fires_held']:.3f} / {row[n]['cover_mass_held']:.3f}"
                                      for n in found) + " |", flush=True)  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"coactivation_quality_{datetime.now(UTC):%Y%m%d}.json"
    out.write_text(json.dumps({"created": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
