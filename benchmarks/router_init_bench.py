"""Step-0 quality of random vs kmeans router init on the embedded SmolLM2: KL(dense || moe) and top-1 agreement.

Usage: python benchmarks/router_init_bench.py --calibration README.md --text /usr/share/common-licenses/GPL-3
Each (method, router) pair is converted into --work and compared with `verify(mode="whole")` on --text.
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

METHODS = {"clone": dict(init="clone"), "drop r=0.5": dict(init="drop", drop_ratio=0.5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/_work/router"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, options in METHODS.items():
        for router in ("random", "kmeans"):
            out = args.work / f"{options['init']}-{router}"
            shutil.rmtree(out, ignore_errors=True)
            extra = dict(router_init="kmeans", calibration=str(args.calibration)) if router == "kmeans" else {}
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
