"""How many AdamW updates bf16 parameters would lose to rounding, on real SmolLM2 weights (issue 20).

`upcycle train` keeps the parameters and AdamW's moments in float32 ("master weights") and runs the matmuls in
bf16 under autocast (`--dtype bf16`); `final/` is written in `--save-dtype` (MODEL's dtype by default). This
measures why: it trains the embedded SmolLM2-135M-Instruct (dense, 135M parameters, the weights `upcycle convert`
upcycles) with fp32 AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices, as `upcycle train`) for
STEPS steps at each learning rate, on real text, and at every step compares each parameter's update Δ (the fp32
optimizer's, exact) with the bf16 grid at the weight:

- Δ is AdamW's exact update, computed in float64 from the optimizer's moments after the step
  (lr·m̂/(√v̂+ε) + lr·wd·w);
- `lost_bf16`: of the elements AdamW moves, the share where bf16(w) + Δ rounds back to bf16(w), so a model held
  in bf16 would not move at all: |Δ| below half an ulp of the weight in bf16 (an ulp is 2^-8 to 2^-7 of |w|),
  ties aside;
- `lost_fp32`: the same on the fp32 grid (an ulp is 2^-24 to 2^-23 of |w|): what fp32 master weights lose;
- `no_update`: the share AdamW does not move (zero gradient and no decay: embedding rows of absent tokens);
- `rel_update_median`: the median of |Δ| / |w| over the moved elements.

No learning-rate schedule (the peak lr throughout). The numbers are per step over every parameter element and
per kind of tensor (matrices, embeddings, norm weights). The same seed and batches for every lr.

    python benchmarks/bf16_rounding.py --text README.md --out benchmarks/results/bf16_rounding_202612.json

Note: the embedded SmolLM2 ships as a Q4_1 GGUF file; its weights are the dequantised ones (magnitudes as the
original's, values on a 4-bit grid per block of 32). That does not change the ulp of a weight, only its value.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def kind_of(name: str, param: torch.Tensor) -> str:
    if "embed" in name or "lm_head" in name:
        return "embeddings"
    return "norms" if param.ndim < 2 else "matrices"


def batches(text: Path, tokenizer: Any, seq_len: int, count: int, seed: int) -> list[torch.Tensor]:
    ids = tokenizer(text.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (count,), generator=gen)
    return [ids[s : s + seq_len].unsqueeze(0) for s in starts.tolist()]


def intended_updates(opt: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, float]]:
    """Each parameter's update of the step just taken, from AdamW's state (its formula, in float64): what a
    weight held in any precision should move by, as (the Adam term, the decay factor lr·wd). Keyed by id."""
    b1, b2 = 0.9, 0.95
    out = {}
    for group in opt.param_groups:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            st = opt.state[p]
            t = float(st["step"])
            m = st["exp_avg"].double() / (1 - b1**t)
            v = st["exp_avg_sq"].double() / (1 - b2**t)
            out[id(p)] = (lr * m / (v.sqrt() + eps), lr * wd)  # the decay term needs w before the step
    return out


def update_stats(
    before: dict[str, torch.Tensor], model: torch.nn.Module, updates: dict[int, Any]
) -> dict[str, dict[str, float]]:
    """Per kind (and "all"): of the elements AdamW moves, the share a bf16 (or fp32) weight would not move by
    rounding, the share AdamW does not move at all (zero gradient, no decay), and the median |Δ|/|w|."""
    counts: dict[str, list[int]] = {}
    rels: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        w0 = before[name]
        adam, decay = updates[id(p)]
        delta = -(adam + decay * w0.double())  # the exact update
        moved = delta != 0
        w_bf16 = w0.to(torch.bfloat16)
        lost_bf16 = (w_bf16.double() + delta).to(torch.bfloat16) == w_bf16
        lost_fp32 = (w0.double() + delta).to(torch.float32) == w0
        nonzero = moved & (w0 != 0)
        rel = (delta.abs()[nonzero] / w0.double().abs()[nonzero]).flatten()
        for key in ("all", kind_of(name, p)):
            c = counts.setdefault(key, [0, 0, 0, 0])
            c[0] += p.numel()
            c[1] += int(moved.sum())
            c[2] += int((lost_bf16 & moved).sum())
            c[3] += int((lost_fp32 & moved).sum())
            rels.setdefault(key, []).append(rel[:: max(1, len(rel) // 20000)])  # a strided sample per tensor
    out = {}
    for key, (n, moved_n, lost, lost32) in counts.items():
        out[key] = {
            "elements": n,
            "lost_bf16": lost / max(moved_n, 1),
            "lost_fp32": lost32 / max(moved_n, 1),
            "no_update": 1 - moved_n / n,
            "rel_update_median": float(torch.cat(rels[key]).median()),
        }
    return out


def run_lr(model_dir: Path, data: list[torch.Tensor], lr: float, weight_decay: float) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    steps = []
    t0 = time.time()
    for i, ids in enumerate(data):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = update_stats(before, model, intended_updates(opt))
        steps.append({"step": i + 1, "loss": round(loss.item(), 4), **stats})
        a = stats["all"]
        line = f"lr {lr:g} step {i + 1}: loss {loss.item():.3f}  lost to bf16 {a['lost_bf16']:.1%}  "
        print(line + f"lost to fp32 {a['lost_fp32']:.3%}  median |Δ|/|w| {a['rel_update_median']:.2e}", flush=True)
    summary: dict[str, Any] = {}
    for key in steps[0]:
        if key in ("step", "loss"):
            continue
        later = steps[1:] if len(steps) > 1 else steps  # step 1's update is lr·sign(g) for every element
        summary[key] = {
            f: statistics.median(s[key][f] for s in later)
            for f in ("lost_bf16", "lost_fp32", "no_update", "rel_update_median")
        }
        summary[key]["lost_bf16_step1"] = steps[0][key]["lost_bf16"]
    return {"lr": lr, "seconds": round(time.time() - t0, 1), "summary": summary, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, required=True, help="training text (a .txt or .md file)")
    ap.add_argument("--lrs", default="1e-5,1e-4,1e-3")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from upcycle.source import resolve

    model_dir = resolve("smollm2").folder
    assert model_dir is not None
    data = batches(args.text, AutoTokenizer.from_pretrained(model_dir), args.seq_len, args.steps, seed=0)
    runs = [run_lr(model_dir, data, float(lr), args.weight_decay) for lr in args.lrs.split(",")]
    for r in runs:
        s = r["summary"]
        print(f"lr {r['lr']:g}: " + ", ".join(f"{k} {v['lost_bf16']:.1%} lost" for k, v in s.items()))
    if args.out:
        meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.machine(),
                "cpus": os.cpu_count(), "torch": torch.__version__, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
                "steps": args.steps, "seq_len": args.seq_len, "weight_decay": args.weight_decay,
                "betas": [0.9, 0.95], "clip": 1.0, "load_average": os.getloadavg()[0]}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
