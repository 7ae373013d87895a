"""Throughput of candidate normal generators on one thread (issue 27): what drawing N float32 N(0, 1) values costs.

Usage: python benchmarks/rng_bench.py [--values 50000000] [--rounds 3] [--json results/rng_<date>.json]

Contenders, alternated round by round (each round runs every contender once, in the listed order), into buffers
made beforehand so only the draw (and a cast where named) is timed:

* torch `normal_` with a `torch.Generator` (mt19937 + Box-Muller), into float32, and straight into bfloat16;
  `uniform_` into float32 (the mt19937 part alone, for scale);
* numpy `Generator(BitGenerator).standard_normal(dtype=float32, out=...)` (ziggurat) for PCG64, PCG64DXSM, SFC64,
  Philox and MT19937, and PCG64 into float64 (numpy's default dtype, for scale);
* numpy PCG64 float32, then `torch.from_numpy(...)` cast to bfloat16 (the draw plus the cast a bf16 write needs).

Medians over the rounds, Mvalues/s, and each contender's ratio to torch float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def contenders(n: int) -> dict[str, Callable[[], None]]:
    f32 = torch.empty(n)
    b16 = torch.empty(n, dtype=torch.bfloat16)
    a32 = np.empty(n, dtype=np.float32)
    a64 = np.empty(n, dtype=np.float64)
    gen = torch.Generator().manual_seed(1234)
    numpy = {name: np.random.Generator(getattr(np.random, name)(1234)) for name in
             ("PCG64", "PCG64DXSM", "SFC64", "Philox", "MT19937")}  # fmt: skip
    out = {
        "torch normal_ f32 (mt19937)": lambda: f32.normal_(0.0, 1.0, generator=gen),
        "torch normal_ bf16 (mt19937)": lambda: b16.normal_(0.0, 1.0, generator=gen),
        "torch uniform_ f32 (mt19937, no transform)": lambda: f32.uniform_(0.0, 1.0, generator=gen),
    }
    for name, g in numpy.items():
        out[f"numpy {name} f32"] = lambda g=g: g.standard_normal(dtype=np.float32, out=a32)
    out["numpy PCG64 f64"] = lambda: numpy["PCG64"].standard_normal(dtype=np.float64, out=a64)
    out["numpy PCG64 f32 + cast bf16"] = lambda: b16.copy_(
        torch.from_numpy(numpy["PCG64"].standard_normal(dtype=np.float32, out=a32))
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=50_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {}
    todo = contenders(args.values)
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for name, draw in todo.items():
            start = time.perf_counter()
            draw()
            runs.setdefault(name, []).append(time.perf_counter() - start)
    load.append(os.getloadavg())
    base = statistics.median(runs["torch normal_ f32 (mt19937)"])
    rows = []
    for name, seconds in runs.items():
        med = statistics.median(seconds)
        rate = args.values / med / 1e6
        times = [round(s, 3) for s in seconds]
        rows.append(
            dict(contender=name, seconds=times, median_s=round(med, 3), mvalues_per_s=round(rate, 1),
                 speedup_vs_torch=round(base / med, 2))
        )  # fmt: skip
        print(f"| {name} | {med:.3f} | {args.values / med / 1e6:.0f} | {base / med:.2f} |")
    print(f"load average before/after: {load[0]} / {load[1]}")
    if args.json:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        meta = dict(values=args.values, rounds=args.rounds, threads=1, torch=torch.__version__, numpy=np.__version__,
                    load_before=load[0], load_after=load[1], date=date)  # fmt: skip
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
