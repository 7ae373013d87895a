"""Measure each expert method on the embedded SmolLM2: closeness to the dense model, conversion time, peak RSS.

For each method it runs `upcycle convert smollm2 OUT <flags>` in a child process (wall time and that child's
peak RSS from os.wait4), then `upcycle verify smollm2 OUT --text README.md --json - --no-record`, which runs
the same tokens of the project's README through the dense model and the MoE in float32. Results go to stdout
as a markdown table and to benchmarks/results/methods_<yyyymm>.json.

    python benchmarks/methods_bench.py                 # every method below
    python benchmarks/methods_bench.py --only split8-top2,drop

`--speed` measures conversion speed alone on a real-size shape instead: a random ~0.5B bf16 Llama (hidden 2048,
FFN 5632, 8 layers; made once under --work) converted by each method of SPEED (8 experts top-2 every layer, or
their own config), then `cp -r` of that output, round after round so that every method sees the same load; each
row gives the median of the rounds and of the ratios to clone in the same round. Results go to
benchmarks/results/methods_speed_<yyyymmdd>.json, rewritten after every conversion ("complete": false until the last).

    python benchmarks/methods_bench.py --speed --work /tmp/methods-speed --rounds 3
    python benchmarks/methods_bench.py --speed ... --baseline /tmp/base   # also another version's code, alternated

`--coactivation` times the co-activation partition of one layer (issue 26) at FFN widths 1,536, 4,864 and
14,336 (SmolLM2, the ~0.5B shape, Llama-3-8B; random inputs [T, H] float32 and weights, 8 parts, share 0.25 as
for 8 experts top-2): what fires, then `graph_partition`. The layer's random gate and up are saved once under
--work in the source's dtype (--dtype, bfloat16 by default, as those models ship) and read the way conversion
reads them (calibrate.StoredRows: a block of rows at a time, cast to float32 one block at a time), with glibc's
mmap threshold held as `convert` holds it (upcycle/heap.py). Each run is a child process of its own (its wall
time and peak RSS from os.wait4, everything in it counted: torch, the inputs, what it reads). Contenders,
alternated width by width within each round: `lowrank`, the graph held as the firing pattern F [T, I] (what
conversion runs), and `dense`, the same objective through the [I, I] matrices built from F (float32; the reference
of tests/test_coactivation.py). Results go to benchmarks/results/coactivation_<yyyymmdd>.json.

    python benchmarks/methods_bench.py --coactivation --rounds 2 --tokens 4096
    python benchmarks/methods_bench.py --coactivation --widths 14336 --contenders lowrank --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs"

# name -> convert flags (every layer MoE; Llama sources go to Mixtral unless a flag says otherwise)
METHODS = {
    "clone": ["--experts", "8", "--top-k", "2"],
    "clone-noise0.01": ["--experts", "8", "--top-k", "2", "--noise", "0.01"],
    "clone-softmax-topk-zero": [
        "--experts",
        "8",
        "--top-k",
        "2",
        "--routing",
        "softmax-topk",
        "--router-init",
        "zero",
        "--target",
        "qwen2_moe",
    ],
    "clone-shared": ["--experts", "8", "--top-k", "2", "--shared-experts", "1", "--target", "qwen2_moe"],
    "drop-r0.5": ["--config", str(CONFIGS / "drop-upcycling-r0.5.yaml")],
    "split8-top2": ["--config", str(CONFIGS / "llama-moe-split8-top2.yaml")],
    "split8-top2-cluster": ["--config", str(CONFIGS / "llama-moe-split8-top2.yaml"), "--split-by", "cluster"],
    "split16-top4": ["--config", str(CONFIGS / "llama-moe-split16-top4.yaml")],
    "split8-top8-zero": ["--init", "split", "--experts", "8", "--top-k", "8", "--router-init", "zero"],
    "fine-grained-64-g8-top8": ["--config", str(CONFIGS / "fine-grained-virtual-groups.yaml")],
    "fine-grained-64-g8-top8-cube-root": [
        "--config",
        str(CONFIGS / "fine-grained-virtual-groups.yaml"),
        "--fine-grained-scale",
        "cube-root",
    ],
    "shared-split-15+1-top3": ["--config", str(CONFIGS / "shared-expert-split.yaml")],
}


# name -> convert flags of the --speed rows (every layer MoE, Mixtral)
SPEED = {
    "clone": ["--experts", "8", "--top-k", "2"],
    "drop-r0.5": ["--config", str(CONFIGS / "drop-upcycling-r0.5.yaml")],
    "split8-top2": ["--config", str(CONFIGS / "llama-moe-split8-top2.yaml")],
    "fine-grained-64-g8-top8": ["--config", str(CONFIGS / "fine-grained-virtual-groups.yaml")],
    "clone-noise0.01": ["--experts", "8", "--top-k", "2", "--noise", "0.01"],
}
SPEED_SHAPE = dict(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=8)  # ~0.5B, 1.0 GB in bf16


# Runs argv in a forked child and prints the child's own wall time, ru_maxrss, CPU time (user + system, all its
# threads) and exit code as JSON on stderr.
MEASURE = (
    "import os, sys, time, json\n"
    "t = time.perf_counter(); pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write(json.dumps({'wall': time.perf_counter() - t, 'rss': usage.ru_maxrss * 1024,"
    " 'cpu': usage.ru_utime + usage.ru_stime, 'rc': os.waitstatus_to_exitcode(status)}) + '\\n')\n"
)


def measure(argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """ARGV's own wall time ('wall', s), peak RSS ('rss', bytes) and exit code ('rc'), with its stdout/stderr.
    ENV: the child's environment (default: this process's)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"wall": timeout, "rss": 0, "rc": 124, "stdout": "", "stderr": "timed out"}
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    return stats | {"stdout": proc.stdout, "stderr": proc.stderr}


def run_child(argv: list[str]) -> tuple[float, float, str, str, int]:
    """`measure` as (wall s, peak RSS GB, stdout, stderr, exit code)."""
    stats = measure(argv)
    return stats["wall"], stats["rss"] / 1e9, stats["stdout"], stats["stderr"], stats["rc"]


def code_env(baseline: Path | None) -> dict | None:
    """The environment that runs BASELINE's code (a folder holding `upcycle/` and `upcycle_cli/`, first on
    PYTHONPATH); None: this process's environment, the code it imports."""
    if baseline is None:
        return None
    return os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(baseline), os.environ.get("PYTHONPATH")) if p)}


def speed(work: Path, rounds: int, names: list[str], results: Path | None = None, baseline: Path | None = None) -> None:
    """Wall time and peak RSS of `upcycle convert` per method on the ~0.5B shape, beside `cp -r` of its output.

    Round after round over every method (alternated, so each sees the same load); the results JSON is rewritten
    after every conversion ("complete": false until the last), with the load average at each run. BASELINE: a
    folder with another version's `upcycle/` and `upcycle_cli/`; each method then also runs under that code (rows
    `NAME@base`, its ratios to `clone@base` of the same round), the two versions' order swapping every round."""
    from convert_bench import ModelShape, make_dense

    upcycle = str(Path(sys.executable).parent / "upcycle")
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 1e9
    if free < 12:
        raise SystemExit(f"{work}: {free:.1f} GB free; --speed writes up to ~10 GB at a time (output and its copy)")
    dense = make_dense(work / "dense-0.5b", ModelShape(**SPEED_SHAPE), shards=2)
    results = results or HERE / "results" / f"methods_speed_{datetime.now(UTC):%Y%m%d}.json"
    codes = [("", None)] + ([("@base", baseline)] if baseline is not None else [])
    for tag, code in codes:  # which code each label runs (as the upcycle script imports it: the cwd not on sys.path)
        where = subprocess.run([sys.executable, "-c", "import upcycle; print(upcycle.__file__)"], cwd="/",
                               env=code_env(code), capture_output=True, text=True).stdout.strip()  # fmt: skip
        print(f"code{tag or ' (this)'}: {where}", flush=True)
    labels = [name + tag for name in names for tag, _ in codes]
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(rounds):
        for name, (tag, code) in [(n, c) for n in names for c in (codes if r % 2 == 0 else codes[::-1])]:
            out, copy = work / "out", work / "copy"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            load = os.getloadavg()[0]
            stats = measure([upcycle, "convert", str(dense), str(out), *SPEED[name]], env=code_env(code))
            wall, rss, err, rc = stats["wall"], stats["rss"] / 1e9, stats["stderr"], stats["rc"]
            if rc != 0:
                raise SystemExit(f"{name}: convert failed: {err.strip().splitlines()[-2:]}")
            os.sync()
            cp_wall, _, _, _, _ = run_child(["cp", "-r", str(out), str(copy)])
            size = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9
            shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            row = {"round": r + 1, "convert_s": wall, "cpu_s": stats["cpu"], "peak_rss_gib": rss * 1e9 / 2**30,
                   "cp_s": cp_wall, "output_gb": size, "load_before": load,
                   "load_after": os.getloadavg()[0]}  # fmt: skip
            runs[name + tag].append(row)
            print(f"round {r + 1} {name + tag}: {wall:.1f} s (CPU {stats['cpu']:.1f} s), {rss * 1e9 / 2**30:.2f} GiB, "
                  f"cp -r {cp_wall:.1f} s, load {load:.1f}", flush=True)  # fmt: skip
            done = r == rounds - 1 and all(len(x) == rounds for x in runs.values())
            save_speed(results, labels, runs, rounds, done, baseline)
    print(f"wrote {results}")


def speed_rows(names: list[str], runs: dict[str, list[dict]]) -> list[dict]:
    """Per method: the medians over its runs so far, and each run's time over clone's of the same round."""
    from statistics import median

    rows = []
    for name in names:
        if not runs[name]:
            continue
        tag = name[name.index("@") :] if "@" in name else ""
        base = {x["round"]: x["convert_s"] for x in runs.get("clone" + tag, [])}  # clone of the same code
        keys = ("convert_s", "cpu_s", "peak_rss_gib", "cp_s", "output_gb")
        m = {k: median(x[k] for x in runs[name]) for k in keys if all(k in x for x in runs[name])}
        ratios = [x["convert_s"] / base[x["round"]] for x in runs[name] if x["round"] in base]
        rows.append({"method": name, "flags": [os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a
                                               for a in SPEED[name.split("@")[0]]],
                     "median": m, "ratio_to_clone_same_round": ratios,
                     "median_ratio_to_clone": median(ratios) if ratios else None, "runs": runs[name]})  # fmt: skip
    return rows


def save_speed(
    results: Path, names: list[str], runs: dict[str, list[dict]], rounds: int, complete: bool, baseline=None
) -> None:
    rows = speed_rows(names, runs)
    meta = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "complete": complete, "shape": SPEED_SHAPE, "rounds": rounds,
            "baseline": baseline.name if baseline else None}  # fmt: skip
    results.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    if complete:
        print("\n| method | convert s | × clone (same round, median) | peak RSS GiB | cp -r s | output GB |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            m, ratio = row["median"], row["median_ratio_to_clone"]
            print(f"| {row['method']} | {m['convert_s']:.1f} | {ratio:.2f} | {m['peak_rss_gib']:.2f} | "
                  f"{m['cp_s']:.1f} | {m['output_gb']:.2f} |")  # fmt: skip


COACTIVATION_WIDTHS = {1536: 576, 4864: 896, 14336: 4096}  # FFN width -> hidden size of the model it comes from


def coactivation_weights(work: Path, width: int, dtype: str) -> Path:
    """Random gate and up [I, H] of one width in DTYPE, in a safetensors file under WORK (made once): the
    layer's weights as a conversion finds them."""
    path = work / f"ffn_{width}_{dtype}.safetensors"
    if path.is_file():
        return path
    import torch
    from safetensors.torch import save_file

    hidden = COACTIVATION_WIDTHS.get(width, 1024)
    g = torch.Generator().manual_seed(0)
    weights = {role: (torch.randn(width, hidden, generator=g) / hidden**0.5).to(getattr(torch, dtype))
               for role in ("gate", "up")}  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(weights, tmp)
    os.replace(tmp, path)
    return path


def coactivation_one(width: int, tokens: int, contender: str, weights: Path) -> None:
    """One layer's co-activation partition in this process: prints seconds per step as JSON."""
    import time

    import torch

    from upcycle.convert.calibrate import StoredRows
    from upcycle.convert.methods.base import generator
    from upcycle.convert.methods.coactivation import CoactivationGraph, DenseGraph, coactivation_fires, graph_partition
    from upcycle.heap import hold_mmap_threshold
    from upcycle.source import read_header

    hold_mmap_threshold()  # as `convert` does
    hidden = COACTIVATION_WIDTHS.get(width, 1024)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))  # [T, H], captured in float32
    stored = {info.name: StoredRows(info) for info in read_header(weights)}  # [I, H] each, read by rows
    assert stored["gate"].shape == (width, hidden)
    t0 = time.perf_counter()
    with torch.no_grad():
        fires = coactivation_fires(x, stored["gate"], stored["up"], torch.nn.functional.silu, 0.25)  # [T, I] bool
    del x
    t1 = time.perf_counter()
    graph = CoactivationGraph(fires)
    del fires
    if contender == "dense":  # the same W and S as [I, I] float32 matrices
        f = graph.f
        s = f.T @ f  # [I, I] co-firing counts
        w = s * graph.tokens
        c = graph.c.float()
        for rows in range(0, width, 1024):  # - c c^T, a block of rows at a time
            w[rows : rows + 1024].sub_(c[rows : rows + 1024, None] * c[None, :])
        graph = DenseGraph(w.fill_diagonal_(0), s, shift=0.0)
    t2 = time.perf_counter()
    labels = graph_partition(graph, 8, generator(0, "coactivation", 0))
    t3 = time.perf_counter()
    assert torch.bincount(labels).tolist() == [width // 8] * 8
    found = {"fires_s": t1 - t0, "graph_s": t2 - t1, "partition_s": t3 - t2, "score": graph.score(labels)}
    print(json.dumps(found))


def coactivation(
    widths: list[int], tokens: int, rounds: int, contenders: list[str], results: Path | None, work: Path, dtype: str
) -> None:
    """Each width and contender in a child process, alternated within each round; medians and dense/lowrank."""
    from statistics import median

    results = results or HERE / "results" / f"coactivation_{datetime.now(UTC):%Y%m%d}.json"
    weights = {width: coactivation_weights(work / "coactivation", width, dtype) for width in widths}
    runs = []
    for r in range(rounds):
        for width in widths:
            for name in contenders if r % 2 == 0 else contenders[::-1]:
                load = os.getloadavg()
                argv = [sys.executable, __file__, "--coactivation-one", str(width), "--contender", name,
                        "--tokens", str(tokens), "--weights", str(weights[width])]  # fmt: skip
                stats = measure(argv, timeout=900)
                if stats["rc"] != 0:
                    raise SystemExit(f"{name} {width}: failed: {stats['stderr'].strip().splitlines()[-3:]}")
                found = json.loads(stats["stdout"].strip().splitlines()[-1])
                run = {"round": r + 1, "width": width, "hidden": COACTIVATION_WIDTHS.get(width, 1024),
                       "contender": name, **found,
                       "layer_s": found["fires_s"] + found["graph_s"] + found["partition_s"],
                       "child_wall_s": stats["wall"], "cpu_s": stats["cpu"], "peak_rss_gib": stats["rss"] / 2**30,
                       "load_before": load, "load_after": os.getloadavg()}  # fmt: skip
                runs.append(run)
                print(f"round {r + 1} {name} {width}: layer {run['layer_s']:.1f} s (fires {found['fires_s']:.1f}, "
                      f"graph {found['graph_s']:.1f}, partition {found['partition_s']:.1f}), "
                      f"child {stats['wall']:.1f} s, "
                      f"{run['peak_rss_gib']:.2f} GiB, load {load[0]:.1f}", flush=True)  # fmt: skip
    rows = []
    for width in widths:
        row: dict = {"width": width}
        for name in contenders:
            mine = [x for x in runs if x["width"] == width and x["contender"] == name]
            for k in ("fires_s", "graph_s", "partition_s", "layer_s", "peak_rss_gib", "score"):
                row[f"{name}_{k}"] = median(x[k] for x in mine)
        if {"dense", "lowrank"} <= set(contenders):
            ratios = [d["layer_s"] / lr["layer_s"] for d in runs for lr in runs
                      if d["width"] == lr["width"] == width and d["round"] == lr["round"]
                      and d["contender"] == "dense" and lr["contender"] == "lowrank"]  # fmt: skip
            row["dense_over_lowrank_same_round"] = ratios
        rows.append(row)
    meta = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "tokens": tokens, "parts": 8, "share": 0.25, "rounds": rounds, "weights_dtype": dtype,
            "threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    results.write_text(json.dumps({**meta, "rows": rows, "runs": runs}, indent=2) + "\n")
    print("\n| width | hidden | contender | fires s | graph s | partition s | layer s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for name in contenders:
            v = [row[f"{name}_{k}"] for k in ("fires_s", "graph_s", "partition_s", "layer_s", "peak_rss_gib")]
            print(f"| {row['width']:,} | {COACTIVATION_WIDTHS.get(row['width'], 1024):,} | {name} | "
                  + " | ".join(f"{a:.2f}" for a in v) + " |")  # fmt: skip
    print(f"wrote {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated method names (default: all)")
    parser.add_argument("--work", type=Path, default=HERE / "_work" / "methods")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--results", type=Path, help="JSON to write (default: results/methods_<yyyymm>.json)")
    parser.add_argument("--speed", action="store_true", help="conversion speed on the ~0.5B shape (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="--speed, --coactivation: rounds (medians)")
    parser.add_argument("--coactivation", action="store_true", help="co-activation partition per layer (see above)")
    parser.add_argument("--widths", default=",".join(map(str, COACTIVATION_WIDTHS)), help="--coactivation widths")
    parser.add_argument("--contenders", default="lowrank,dense", help="--coactivation: lowrank and/or dense")
    parser.add_argument("--coactivation-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--contender", default="lowrank", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="--coactivation: the dtype the layer's random gate and up are stored in")  # fmt: skip
    parser.add_argument(
        "--baseline",
        type=Path,
        help="--speed: a folder with another version's upcycle/ and upcycle_cli/ (e.g. `git archive REV | tar -x` "
        "plus the link upcycle_cli -> cli), run beside this code, alternated (rows NAME@base)",
    )
    args = parser.parse_args()
    if args.coactivation_one:
        return coactivation_one(args.coactivation_one, args.tokens, args.contender, args.weights)
    if args.coactivation:
        widths = [int(w) for w in args.widths.split(",")]
        contenders = args.contenders.split(",")
        return coactivation(widths, args.tokens, args.rounds, contenders, args.results, args.work, args.dtype)
    if args.speed:
        names = args.only.split(",") if args.only else list(SPEED)
        return speed(args.work, args.rounds, names, args.results, args.baseline)
    upcycle = str(Path(sys.executable).parent / "upcycle")
    names = args.only.split(",") if args.only else list(METHODS)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, _, err, rc = run_child([upcycle, "convert", "smollm2", str(out), *METHODS[name]])
        if rc != 0:
            print(f"{name}: convert failed: {err.strip().splitlines()[-2:]}", file=sys.stderr)
            continue
        plan = json.loads((out / "upcycle.json").read_text())["plan"]
        verify = subprocess.run(
            [
                upcycle,
                "verify",
                "smollm2",
                str(out),
                "--text",
                str(ROOT / "README.md"),
                "--tokens",
                str(args.tokens),
                "--json",
                "-",
                "--no-record",
            ],
            capture_output=True,
            text=True,
        )
        report = json.loads(verify.stdout)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9
        rows.append(
            {
                "method": name,
                "flags": " ".join(
                    a if not a.startswith(str(ROOT)) else os.path.relpath(a, ROOT) for a in METHODS[name]
                ),
                "exact_at_init": plan["exact_at_init"],
                "max_abs_diff": report["max_abs_diff"],
                "mean_kl": report["mean_kl"],
                "top1_agreement": report["top1_agreement"],
                "tokens": report["tokens"],
                "convert_s": wall,
                "peak_rss_gb": rss,
                "output_gb": size,
                "total_params": plan["total_params"],
                "active_params": plan["active_params"],
            }
        )
        r = rows[-1]
        print(
            f"| {name} | {'yes' if r['exact_at_init'] else 'no'} | {r['max_abs_diff']:.3g} | {r['mean_kl']:.3g} | "
            f"{100 * r['top1_agreement']:.1f}% | {wall:.1f} | {rss:.2f} | {size:.2f} |",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    results = args.results or HERE / "results" / f"methods_{datetime.now(UTC):%Y%m}.json"
    results.write_text(
        json.dumps(
            {"created": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(), "rows": rows},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
