"""CPU time of one --noise expert tensor made in spans of different sizes, in a worker thread (issue 27).

Usage: python benchmarks/noise_span_cpu.py [--spans 1048576,32752] [--rounds 5] [--json FILE]

Makes a 5632 x 2048 bf16 tensor's N(1, 0.01) noise (the ~0.5B shape of `methods_bench.py --speed`) 4 times per run
in one ThreadPoolExecutor thread, as methods/ahead.py's workers do, and reports the process's CPU time (user +
system, every thread: an OpenMP team's spin-waits included) per tensor. `old<N>`: the loop of the code before
issue 27's third pass (spans of N values, slices per span); `now`: `noise.perturb_written` as it is (spans of
noise.DRAW_CHUNK). Contenders alternate, their order reversed every other round; each checks its bytes against
`noise.perturb` first.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from upcycle.convert.methods import noise
from upcycle.convert.methods.base import generator


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def old_loop(dense, sigma, seed, layer, e, role, scale, dtype, out, work, chunk):
    """perturb_written before issue 27's third pass (its spans of CHUNK values)."""
    src, dst = dense.reshape(-1), out.view(-1)
    factor_buf, dense_buf = work
    gen = generator(seed, "noise", layer, e, role)
    for start, stop in noise.spans(src.numel(), chunk):
        m = stop - start
        f = dst[start:stop] if dtype == torch.float32 else factor_buf[:m]
        f.normal_(1.0, sigma, generator=gen)
        d = src[start:stop]
        f.mul_(d if d.dtype == torch.float32 else dense_buf[:m].copy_(d))
        if scale != 1.0:
            f.mul_(scale)
        if dtype != torch.float32:
            dst[start:stop].copy_(f)
    return out


def make(name: str, dense: torch.Tensor, out: torch.Tensor, expert: int) -> torch.Tensor:
    if name == "now":
        need = noise.work_size(dense.numel())
        work = (torch.empty(need), torch.empty(need))
        return noise.perturb_written(dense, 0.01, 7, 0, expert, "gate", 1.0, torch.bfloat16, out, work)
    chunk = int(name.removeprefix("old"))
    work = (torch.empty(chunk + 15), torch.empty(chunk + 15))
    return old_loop(dense, 0.01, 7, 0, expert, "gate", 1.0, torch.bfloat16, out, work, chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contenders", default="old1048576,old32752,now")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    dense = (torch.randn(5632, 2048, generator=g) * 0.02).bfloat16()
    out = torch.empty_like(dense)
    pool = ThreadPoolExecutor(1)
    names = args.contenders.split(",")
    want = noise.perturb(dense, "gate", 0.01, 7, 0, 0, 1.0).bfloat16().view(torch.int16)
    for name in names:
        assert torch.equal(pool.submit(make, name, dense, out, 0).result().view(torch.int16), want), name
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c0 = cpu()
            pool.submit(lambda name=name: [make(name, dense, out, e) for e in range(4)]).result()
            runs[name].append((cpu() - c0) / 4 * 1000)
    print("| contender | CPU ms per tensor, median | runs |\n|---|---|---|")
    for name, xs in runs.items():
        print(f"| {name} | {statistics.median(xs):.1f} | {', '.join(f'{x:.1f}' for x in xs)} |")
    if args.json:
        meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rounds": args.rounds,
                "torch_threads": torch.get_num_threads(), "draw_chunk": noise.DRAW_CHUNK}  # fmt: skip
        rows = [
            {"contender": n, "cpu_ms_per_tensor_median": statistics.median(xs), "runs": xs} for n, xs in runs.items()
        ]
        with open(args.json, "w") as fh:
            fh.write(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
