"""What `--calibration-dtype bfloat16` changes in what calibration makes (issue 26), on SmolLM2 (float32).

The calibration pass (4,096 tokens of README.md, as `calibration_bench.py` runs it) in float32 and in bfloat16,
then on held-out text (the first 4,096 tokens of docs/convert.md, the dense model's float32 FFN inputs):
- `--router-init kmeans` (8 experts top-2, every layer): per layer, the share of held-out tokens whose top-2
  experts (as a set) and whose top-1 expert the bfloat16 rows pick as the float32 rows do, and the cosine of
  each pair of rows. For scale, the same figures between float32 rows of seed 0 and seed 1 (seed 1's rows put in
  the order that best matches seed 0's): two equally valid k-means solutions of the same inputs.
- `--split-by coactivation` (8 parts): at layers 0, 8, 16, 24, 29, coactivation_quality.py's coverage of each
  partition on the held-out activations (per token, the share of its firing neurons and of its |activation|
  mass inside its best 2 groups), for the float32 pass's partition, the bfloat16 pass's and a random one.

Writes benchmarks/results/calibration_dtype_quality_<yyyymmdd>.json.

    python benchmarks/calibration_dtype_quality.py
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coactivation_quality import LAYERS, activations, coverage

from upcycle.convert import calibrate as calibrate_module
from upcycle.convert import stream
from upcycle.convert.pipeline import plan_for
from upcycle.convert.spec import build_spec
from upcycle.source import Checkpoint, resolve

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 4096


def made(folder: Path, dtype: str, seed: int = 0, **flags) -> tuple[dict | None, dict | None]:
    """calibrate's router rows and partitions for SmolLM2 with these flags."""
    spec = build_spec(experts=8, top_k=2, calibration=str(ROOT / "README.md"), calibration_dtype=dtype, seed=seed,
                      **flags)  # fmt: skip
    dense, plan = plan_for(resolve("smollm2"), spec)
    rows, parts, _ = calibrate_module.calibrate(folder, dense.checkpoint, plan, spec)
    return rows, parts


def matched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B's rows [E, H] reordered to the permutation that best matches A's (largest summed cosine; every one of
    the E! orders tried, E = 8): k-means of another seed numbers the same clusters differently."""
    from itertools import permutations

    cos = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T  # [E, E]
    perms = torch.tensor(list(permutations(range(len(a)))))  # [E!, E]
    best = perms[cos[torch.arange(len(a)), perms].sum(1).argmax()]
    return b[best]


def agreement(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> dict:
    """Routers A and B [E, H] on inputs X [T, H]: same top-2 set, same top-1, and the rows' cosines."""
    ta, tb = (x @ a.T).topk(2, dim=1).indices, (x @ b.T).topk(2, dim=1).indices  # [T, 2] each
    same2 = (ta.sort(1).values == tb.sort(1).values).all(1).float().mean().item()
    same1 = (ta[:, 0] == tb[:, 0]).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"same_top2": same2, "same_top1": same1, "cos_min": cos.min().item(), "cos_mean": cos.mean().item()}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve("smollm2").folder
    tok = AutoTokenizer.from_pretrained(folder)
    held_ids = tok((ROOT / "docs" / "convert.md").read_text(), add_special_tokens=False, return_tensors="pt")
    held_ids = held_ids["input_ids"][0][:TOKENS]
    routers = {
        "float32": made(folder, "float32", router_init="kmeans")[0],
        "bfloat16": made(folder, "bfloat16", router_init="kmeans")[0],
        "float32-seed1": made(folder, "float32", seed=1, router_init="kmeans")[0],
    }
    ckpt = Checkpoint.open(folder)
    layers = tuple(sorted(routers["float32"]))
    held = dict(stream.ffn_inputs(folder, ckpt, list(held_ids.split(512)), layers, torch.float32))
    router_rows = []
    for layer in layers:
        x = torch.cat(held[layer])  # [T, H] float32
        row = {"layer": layer, "bf16_vs_f32": agreement(routers["float32"][layer], routers["bfloat16"][layer], x),
               "seed1_vs_seed0": agreement(routers["float32"][layer], routers["float32-seed1"][layer], x),
               "seed1_vs_seed0_matched": agreement(routers["float32"][layer],
                                                   matched(routers["float32"][layer], routers["float32-seed1"][layer]),
                                                   x)}  # fmt: skip
        router_rows.append(row)
        print(f"| {layer} | {row['bf16_vs_f32']['same_top2']:.3f} | {row['seed1_vs_seed0_matched']['same_top2']:.3f} | "
              f"{row['bf16_vs_f32']['cos_min']:.4f} |", flush=True)  # fmt: skip
    split = dict(init="split", split_by="coactivation")
    parts = {dtype: made(folder, dtype, **split)[1] for dtype in ("float32", "bfloat16")}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    acts = activations(model, held_ids.tolist())  # layer -> [T, I], LAYERS only
    del model
    part_rows = []
    for layer in LAYERS:
        row: dict = {"layer": layer}
        for dtype, found in parts.items():
            groups = found[layer][("coactivation", 8)]
            labels = torch.empty(sum(len(g) for g in groups), dtype=torch.long)
            for c, g in enumerate(groups):
                labels[g] = c
            row[dtype] = dict(zip(("cover_fires_held", "cover_mass_held", "max_load_held"),
                                  coverage(labels, acts[layer]), strict=True))  # fmt: skip
            row[f"{dtype}_labels"] = labels
        neurons = len(row["float32_labels"])
        rand = torch.randperm(neurons, generator=torch.Generator().manual_seed(layer)) % 8
        row["random"] = dict(zip(("cover_fires_held", "cover_mass_held", "max_load_held"),
                                 coverage(rand, acts[layer]), strict=True))  # fmt: skip
        a, b = row.pop("float32_labels"), row.pop("bfloat16_labels")
        same = (a[:, None] == a[None]) == (b[:, None] == b[None])  # [I, I]: pairs grouped alike
        row["rand_index"] = same.float().mean().item()
        part_rows.append(row)
        print(f"| {layer} | {row['float32']['cover_fires_held']:.3f} | {row['bfloat16']['cover_fires_held']:.3f} | "
              f"{row['random']['cover_fires_held']:.3f} | {row['rand_index']:.3f} |", flush=True)  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"calibration_dtype_quality_{datetime.now(UTC):%Y%m%d}.json"
    record = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "model": "smollm2",
              "calibration": "README.md", "held_out": "docs/convert.md", "tokens": TOKENS,
              "kmeans": router_rows, "coactivation": part_rows}  # fmt: skip
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
