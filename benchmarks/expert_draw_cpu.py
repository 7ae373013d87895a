"""CPU time of making drop and --noise expert tensors, without the disk (issue 27): this code against another version.

Usage: python benchmarks/expert_draw_cpu.py [--baseline DIR] [--layers 2] [--rounds 3] [--hash] [--json FILE]

One child process per (method, code) run: it makes LAYERS random bf16 FFN layers of the ~0.5B shape of
`methods_bench.py --speed` (hidden 2048, FFN 5632), then every expert tensor of 8 experts per layer the way convert
makes them (methods/ahead.Ahead: the next 3 in 2 worker threads, across layers where the code does so,
LayerBuilder.written in bf16), writing each to /dev/null, and reports its CPU time (user + system, all threads)
and wall time for that part. With --hash also the sha256 of the bytes (equal across codes where the bytes for a
seed did not change), hashed inside the timed part: compare bytes, not times, in such a run. `--baseline DIR`: a
folder with another version's `upcycle/` (e.g. `git archive REV upcycle | tar -x -C DIR`), first on the child's
PYTHONPATH; the codes alternate within each round, their order swapping every round. CPU time stretches less than
wall time on a loaded machine, but both do:
record the load (printed, and in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import hashlib, inspect, json, os, resource, sys, time
import torch
from upcycle.convert.methods import LayerBuilder
from upcycle.convert.methods.ahead import Ahead
from upcycle.convert.ops import Drop, Noise
import upcycle

kind, layers, I, H, hashed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
E = 8
g = torch.Generator().manual_seed(0)
shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
dense = [{r: (torch.randn(s, generator=g) * 0.02).bfloat16() for r, s in shapes.items()} for _ in range(layers)]
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
sink, digest = open(os.devnull, "wb"), hashlib.sha256()
def transform(e):
    return Drop(e, 0.5, 1.0) if kind == "drop" else Noise(e, 0.01, 1.0)
def put(x):
    data = memoryview(x.contiguous().view(torch.uint8).reshape(-1).numpy())
    sink.write(data)
    if hashed:  # in the timed part: --hash runs time the hashing too (the same for every code)
        digest.update(data)
c0, t0 = cpu(), time.perf_counter()
if "make" in inspect.signature(Ahead).parameters:  # the window over the whole sequence, across layers
    builders = [LayerBuilder(dense[layer], 7, layer) for layer in range(layers)]
    sequence = [((layer, 0, role, transform(e)), tuple(dense[layer][role].shape))
                for layer in range(layers) for e in range(E) for role in ("gate", "up", "down")]
    ahead = Ahead(lambda key, out: builders[key[0]].written(key[2], key[3], key[4], out), sequence)
    for tensor, shape in sequence:
        x = ahead.get(tensor, shape, torch.bfloat16)
        put(x)
        ahead.release(x)
else:  # older code: one layer's window at a time
    ahead = Ahead()
    for layer in range(layers):
        builder = LayerBuilder(dense[layer], 7, layer)
        order = {}
        for e in range(E):
            for role in ("gate", "up", "down"):
                order[(role, transform(e))] = (len(order), tuple(dense[layer][role].shape))
        for (role, t), (_, shape) in order.items():
            x = ahead.get(builder, order, role, t, shape, torch.bfloat16)
            put(x)
            ahead.release(x)
cpu_s, wall_s = cpu() - c0, time.perf_counter() - t0
print(json.dumps({"cpu_s": cpu_s, "wall_s": wall_s, "sha256": digest.hexdigest() if hashed else None,
                  "code": os.path.dirname(upcycle.__file__)}))
"""


def run(kind: str, layers: int, code: Path | None, intermediate: int = 5632, hidden: int = 2048, hashed=False) -> dict:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-c", CHILD, kind, str(layers), str(intermediate), str(hidden), str(int(hashed))]
    out = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--intermediate", type=int, default=5632, help="FFN size (a smaller one for a smoke run)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument(
        "--hash", action="store_true", help="sha256 of the bytes (timed with them: compare bytes, not times)"
    )
    args = ap.parse_args()
    codes = [("this", None)] + ([("base", args.baseline)] if args.baseline else [])
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for kind in ("drop", "noise"):
            for label, code in codes if r % 2 == 0 else codes[::-1]:
                row = run(kind, args.layers, code, args.intermediate, args.hidden, args.hash) | {
                    "round": r + 1,
                    "load": os.getloadavg()[0],
                }
                imported = row.pop("code")  # where the child imported upcycle from: kept as which code it was
                row["code"] = (
                    label
                    if (code is None) != imported.startswith(str(code))
                    else f"{label}, but imported from elsewhere"
                )
                runs.setdefault(f"{kind}@{label}", []).append(row)
                print(f"round {r + 1} {kind}@{label}: CPU {row['cpu_s']:.2f} s, wall {row['wall_s']:.2f} s, "
                      f"load {row['load']:.1f}, sha256 {(row['sha256'] or '-')[:12]}", flush=True)  # fmt: skip
    rows = []
    for name, xs in runs.items():
        cpu = statistics.median(x["cpu_s"] for x in xs) / args.layers
        wall = statistics.median(x["wall_s"] for x in xs) / args.layers
        rows.append({"case": name, "cpu_s_per_layer": round(cpu, 3), "wall_s_per_layer": round(wall, 3),
                     "sha256": sorted({x["sha256"] for x in xs}), "runs": xs})  # fmt: skip
        print(f"| {name} | {cpu:.3f} | {wall:.3f} | {(xs[0]['sha256'] or '-')[:12]} |")
    if args.json:
        meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "layers": args.layers,
                "intermediate": args.intermediate, "hidden": args.hidden,
                "rounds": args.rounds, "hashed": args.hash, "baseline": args.baseline.name if args.baseline else None,
                "cpu_count": os.cpu_count()}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
