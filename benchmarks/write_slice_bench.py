"""System CPU of writing a file with os.write in slices of different sizes, beside copy_file_range (issue 27).

Usage: python benchmarks/write_slice_bench.py [--gb 1.1] [--slices 256,512,1024,2048,4096,8192] [--rounds 4]
       [--dir /tmp] [--json FILE]

Each run writes GB of one reused 23 MiB torch tensor (the size of one expert tensor of the ~0.5B shape) to a new file in
DIR with os.write, SLICE KiB per call, as writer._write_all does; `cfr` copies a file of GB / 5 made beforehand
five times with os.copy_file_range, as the writer copies source byte ranges (clone's tensors). The file is synced
away before each run (os.sync, outside the timing). Reported per run: system and user CPU of this process
(getrusage) and wall time; the contenders alternate within each round, their order reversed every other round.
System CPU is the kernel's work for the bytes, which the writer thread pays in convert.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def one(contender: str, target: Path, total: int, buf: memoryview, source: Path) -> dict:
    os.sync()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    (u0, s0), t0 = cpu(), time.perf_counter()
    try:
        if contender == "cfr":
            n = source.stat().st_size
            for _ in range(5):
                src = os.open(source, os.O_RDONLY)
                done = 0
                while done < n:
                    done += os.copy_file_range(src, fd, n - done, done)
                os.close(src)
        else:
            step, done = int(contender) << 10, 0
            while done < total:
                for k in range(0, len(buf), step):
                    done += os.write(fd, buf[k : k + step])
        (u1, s1), wall = cpu(), time.perf_counter() - t0
    finally:
        os.close(fd)
    size = target.stat().st_size
    target.unlink()
    return {"contender": contender, "sys_s": s1 - s0, "user_s": u1 - u0, "wall_s": wall, "bytes": size,
            "load": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.1)
    ap.add_argument("--slices", default="256,512,1024,2048,4096,8192", help="KiB per os.write")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    total = int(args.gb * 1e9)
    import torch  # the writer writes torch tensors' memory: the same allocator here

    g = torch.Generator().manual_seed(0)
    buf = memoryview(torch.randint(0, 256, (23 << 20,), dtype=torch.uint8, generator=g).numpy())  # one expert tensor
    work = args.dir / f"write-slice-{os.getpid()}"
    work.mkdir(parents=True)
    source = work / "source"
    with open(source, "wb") as fh:  # GB / 5, copied five times by `cfr`
        for _ in range(max(1, total // 5 // len(buf))):
            fh.write(buf)
    contenders = ["cfr", *args.slices.split(",")]
    runs = []
    try:
        for r in range(args.rounds):
            for c in contenders if r % 2 == 0 else contenders[::-1]:
                row = one(c, work / "out", total, buf, source) | {"round": r + 1}
                runs.append(row)
                print(f"round {r + 1} {c}: sys {row['sys_s']:.2f} s, user {row['user_s']:.2f} s, "
                      f"wall {row['wall_s']:.2f} s, {row['bytes'] / 1e9:.2f} GB, load {row['load']:.1f}",
                      flush=True)  # fmt: skip
    finally:
        source.unlink(missing_ok=True)
        work.rmdir()
    rows = []
    print("\n| os.write slice | system CPU s per GB (median; runs) | wall s per GB (median) |\n|---|---|---|")
    for c in contenders:
        mine = [x for x in runs if x["contender"] == c]
        per_gb = [x["sys_s"] / (x["bytes"] / 1e9) for x in mine]
        wall = statistics.median(x["wall_s"] / (x["bytes"] / 1e9) for x in mine)
        rows.append({"contender": c, "sys_s_per_gb_median": statistics.median(per_gb), "sys_s_per_gb": per_gb,
                     "wall_s_per_gb_median": wall})  # fmt: skip
        name = "copy_file_range" if c == "cfr" else f"{c} KiB"
        print(f"| {name} | {statistics.median(per_gb):.2f} ({', '.join(f'{x:.2f}' for x in per_gb)}) | {wall:.2f} |")
    if args.json:
        meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gb": args.gb,
                "rounds": args.rounds, "kernel": os.uname().release, "cpu_count": os.cpu_count()}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": rows, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
