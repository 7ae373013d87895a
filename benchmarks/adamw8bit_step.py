"""CPU optimizer step time and optimizer-state memory of `upcycle train --optimizer adamw|adafactor|adamw8bit`
(issue 20), on one MoE layer's experts of the SmolLM2 MoE (`upcycle convert smollm2`: 8 experts of hidden 576 and
FFN 1536, stored as transformers' fused tensors gate_up_proj (8, 3072, 576) and down_proj (8, 576, 1536):
21.2M parameters, fp32).

The optimizers are the ones `upcycle train` builds (upcycle.train.optim.build_optimizer: fused AdamW betas
0.9/0.95; torch's Adafactor; bitsandbytes' AdamW8bit). Each has its own copy of the parameters with fixed random
gradients.

- time: one `optimizer.step()`, the contenders alternated round by round (the order rotates), after WARMUP steps
  each; the median and the ratio to AdamW's median are reported;
- state: the bytes of the tensors in `optimizer.state` after the first step, and what upcycle's memory plan
  counts for them (optim.optimizer_state_bytes);
- RSS: in a fresh child per optimizer, the resident memory the first step adds (the state, allocated then) and how
  far RSS went above that during the next steps, sampled every millisecond (the step's temporaries; the plan
  counts 2 fp32 copies of the largest tensor for Adafactor and STEP_COPIES_8BIT for AdamW8bit).

    python benchmarks/adamw8bit_step.py --rounds 9 --out benchmarks/results/adamw8bit_step_202612.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
SHAPES = {"gate_up_proj": (8, 2 * 1536, 576), "down_proj": (8, 576, 1536)}  # one SmolLM2-MoE layer's experts
MiB = 1 << 20


def make(name: str, seed: int) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    from upcycle.train.optim import build_optimizer

    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES.values():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    group = {"params": params, "weight_decay": 0.1, "lr": 1e-4 if name != "adafactor" else 1e-3, "name": "decay"}
    return params, build_optimizer([group], torch.device("cpu"), name)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name: str, steps: int) -> dict[str, int]:
    """In a fresh process: RSS added by the first step (the state) and the peak above it over the next steps
    (RSS sampled every millisecond by a thread: the kernels release the GIL)."""
    _params, opt = make(name, 0)  # the parameters stay alive with it
    before = rss()
    opt.step()
    after_first = rss()
    peak = [after_first]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    for _ in range(steps):
        opt.step()
    done.set()
    thread.join()
    return {"rss_state": after_first - before, "rss_peak_above_state": peak[0] - after_first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, 3)))
        return
    from upcycle.train.optim import optimizer_state_bytes

    contenders = {name: make(name, i) for i, name in enumerate(OPTIMIZERS)}
    results: dict[str, dict[str, Any]] = {}
    for name, (params, opt) in contenders.items():
        for _ in range(args.warmup):
            opt.step()
        results[name] = {"state_bytes": state_bytes(opt), "planned_state_bytes": optimizer_state_bytes(params, name)}
        results[name]["seconds"] = []
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = OPTIMIZERS[r % 3 :] + OPTIMIZERS[: r % 3]
        for name in order:
            opt = contenders[name][1]
            t0 = time.perf_counter()
            opt.step()
            results[name]["seconds"].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    for name in OPTIMIZERS:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        results[name] |= json.loads(out.strip().splitlines()[-1])
    base = statistics.median(results["adamw"]["seconds"])
    params = sum(torch.Size(s).numel() for s in SHAPES.values())
    print(f"{params / 1e6:.1f}M parameters, {args.rounds} rounds, load average {min(load):.1f}-{max(load):.1f}")
    for name in OPTIMIZERS:
        r = results[name]
        r["median_s"] = statistics.median(r["seconds"])
        r["ratio_to_adamw"] = round(r["median_s"] / base, 2)
        print(f"{name:10s} step {r['median_s'] * 1e3:8.1f} ms ({r['ratio_to_adamw']}x)  "
              f"state {r['state_bytes'] / MiB:7.1f} MiB (plan {r['planned_state_bytes'] / MiB:.1f})  "
              f"RSS +{r['rss_state'] / MiB:.0f} MiB at the first step, peak +{r['rss_peak_above_state'] / MiB:.0f} MiB "
              f"above it")  # fmt: skip
    if args.out:
        import transformers

        bnb = __import__("bitsandbytes").__version__
        meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.machine(),
                "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                "transformers": transformers.__version__, "bitsandbytes": bnb, "params": params,
                "shapes": SHAPES, "rounds": args.rounds, "load_average": [min(load), max(load)]}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
