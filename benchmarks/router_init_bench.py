"""Step-0 quality of router inits (random, kmeans, hidden) and of the coactivation split on the embedded SmolLM2:
KL(dense || moe) and top-1 agreement.

Usage: python benchmarks/router_init_bench.py --calibration README.md --text /usr/share/common-licenses/GPL-3
       python benchmarks/router_init_bench.py ... --only "clone/hidden,split 8 top-2 coactivation/random"
Each (method, router) pair is converted into --work and compared with `verify(mode="whole")` on --text. The
`hidden` router reads --prompts (default: benchmarks/expert_prompts_8.yaml, eight topics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.report.verify import verify

HERE = Path(__file__).resolve().parent
METHODS = {
    "clone": dict(init="clone"),
    "drop r=0.5": dict(init="drop", drop_ratio=0.5),
    "split 8 top-2 random": dict(init="split", split_by="random"),
    "split 8 top-2 cluster": dict(init="split", split_by="cluster"),
    "split 8 top-2 coactivation": dict(init="split", split_by="coactivation"),
}
ROUTERS = {
    "clone": ("random", "kmeans", "hidden"),
    "drop r=0.5": ("random", "kmeans", "hidden"),
    "split 8 top-2 random": ("random",),
    "split 8 top-2 cluster": ("random",),
    "split 8 top-2 coactivation": ("random", "kmeans"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/_work/router"))
    ap.add_argument("--prompts", type=Path, default=HERE / "expert_prompts_8.yaml")
    ap.add_argument("--only", help="comma-separated method/router pairs, e.g. clone/hidden (default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for method, options in METHODS.items():
        for router in ROUTERS[method]:
            if only is not None and f"{method}/{router}" not in only:
                continue
            out = args.work / f"{options['init']}-{options.get('split_by', '')}-{router}"
            shutil.rmtree(out, ignore_errors=True)
            extra: dict = {}
            if router == "kmeans" or options.get("split_by") == "coactivation":
                extra["calibration"] = str(args.calibration)
            if router != "random":
                extra["router_init"] = router
            if router == "hidden":
                extra["expert_prompts"] = str(args.prompts)
            start = time.perf_counter()
            convert("smollm2", out, build_spec(experts=8, top_k=2, **options, **extra), force=True)
            seconds = time.perf_counter() - start
            rep = verify("smollm2", str(out), text=args.text, tokens=args.tokens, mode="whole")
            rows.append(
                dict(
                    method=method,
                    router=router,
                    convert_s=round(seconds, 1),
                    max_abs=rep.max_abs_diff,
                    mean_kl=rep.mean_kl,
                    top1=rep.top1_agreement,
                )
            )
            print(
                f"| {method} | {router} | {rep.max_abs_diff:.3g} | {rep.mean_kl:.4g} | {rep.top1_agreement:.3f} "
                f"| {seconds:.1f} |",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
