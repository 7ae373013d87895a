"""Two versions of upcycle on the same work, alternated: did a change of code (a refactor) cost time or memory?

The older version is checked out from git into a detached worktree (`--old REV`, default the last commit before
issue 19's restructure); the newer is this checkout. Each round runs every case once under each version, the
order rotating between rounds, each run a fresh child process measured by convert_bench's `run_child` (wall time
and the child's own peak RSS). Alternating makes the ratio robust to a machine whose load changes during the
run; the absolute times are only as good as the machine was idle (say so when you record them).

Cases (on convert_bench's random bf16 dense Llama, default 0.1b):
  convert-bf16   `upcycle convert DENSE OUT --experts 8 --top-k 2`             (byte copies)
  convert-f32    the same with `--dtype float32`                               (the cast path)
  verify-layer   `upcycle verify DENSE OUT --layerwise` on convert-bf16's output

    python benchmarks/versions_ab.py                          # 3 rounds, 0.1b
    python benchmarks/versions_ab.py --old 63b1b41 --rounds 5 --model 0.5b
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import convert_bench as cb  # noqa: E402

BASELINE = "3b3d24a"  # main before issue 19's code moved (typed ops, one interpreter, thin CLI)
CASES = ("convert-bf16", "convert-f32", "verify-layer")


def worktree(rev: str, work: Path) -> Path:
    """A detached checkout of `rev` under work/, with the `upcycle_cli -> cli` link the package layout needs."""
    tree = work / f"tree-{rev}"
    if not tree.is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True
        )
    link = tree / "upcycle_cli"
    if not link.exists():
        link.symlink_to("cli")
    return tree


def command(tree: Path, case: str, dense: Path, out: Path) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from upcycle_cli.main import main; sys.exit(main())"
    run = [sys.executable, "-c", code]  # the tree first on sys.path: before the cwd and the editable install
    if case == "verify-layer":
        return [*run, "verify", str(dense), str(out / "convert-bf16"), "--layerwise"]
    dtype = ["--dtype", "float32"] if case == "convert-f32" else []
    return [*run, "convert", str(dense), str(out / case), "--experts", "8", "--top-k", "2", *dtype, "--force"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default=BASELINE, help=f"git revision of the older version (default {BASELINE})")
    p.add_argument("--model", default="0.1b", choices=sorted(cb.MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=HERE / "_work" / "versions_ab")
    p.add_argument("--results", type=Path, default=None, help="JSON file (default benchmarks/results/versions_ab_…)")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    dense = cb.make_dense(HERE / "_work" / f"dense-{args.model}", cb.MODELS[args.model], shards=3)
    trees = {"old": worktree(args.old, args.work), "new": ROOT}
    outs = {name: args.work / f"out-{name}" for name in trees}
    for out in outs.values():
        out.mkdir(exist_ok=True)
    log = args.work / "runs.log"
    runs: list[dict] = []
    for rnd in range(args.rounds):
        order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
        for case in CASES:
            for name in order:
                r = cb.run_child(command(trees[name], case, dense, outs[name]), log)
                if r.returncode != 0:
                    print(f"error: {name} {case} exited {r.returncode}; see {log}", file=sys.stderr)
                    return 1
                flush = cb.timed_sync()  # what the run left dirty: a version that fsyncs pays it inside its wall time
                runs.append(
                    {
                        "round": rnd,
                        "version": name,
                        "case": case,
                        "wall_s": r.wall_s,
                        "sync_s": flush,
                        "wall_sync_s": r.wall_s + flush,
                        "peak_rss_mib": r.peak_rss_mib,
                    }
                )
                print(
                    f"round {rnd} {case:13} {name}: {r.wall_s:6.2f} s + sync {flush:5.2f} s {r.peak_rss_mib:7.0f} MiB",
                    flush=True,
                )

    rows = []
    for case in CASES:
        med = {
            name: {
                k: statistics.median(x[k] for x in runs if x["version"] == name and x["case"] == case)
                for k in ("wall_s", "wall_sync_s", "peak_rss_mib")
            }
            for name in trees
        }
        rows.append(
            {
                "case": case,
                "old": med["old"],
                "new": med["new"],
                "wall_ratio": med["new"]["wall_s"] / med["old"]["wall_s"],
                "wall_sync_ratio": med["new"]["wall_sync_s"] / med["old"]["wall_sync_s"],
                "rss_ratio": med["new"]["peak_rss_mib"] / med["old"]["peak_rss_mib"],
            }
        )
    print(
        f"\n| case | old wall s | new wall s | new/old | old wall+sync s | new wall+sync s | new/old | "
        f"old peak MiB | new peak MiB | new/old |  (medians of {args.rounds}, old = {args.old})"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, n = r["old"], r["new"]
        print(
            f"| {r['case']} | {o['wall_s']:.2f} | {n['wall_s']:.2f} | {r['wall_ratio']:.2f} | "
            f"{o['wall_sync_s']:.2f} | {n['wall_sync_s']:.2f} | {r['wall_sync_ratio']:.2f} | "
            f"{o['peak_rss_mib']:.0f} | {n['peak_rss_mib']:.0f} | {r['rss_ratio']:.2f} |"
        )
    results = args.results or HERE / "results" / f"versions_ab_{datetime.now(UTC):%Y%m%d}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "old": args.old,
                "new": cb.code_state(),
                "model": args.model,
                "machine": cb.machine(args.work),
                "runs": runs,
                "summary": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}")
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
