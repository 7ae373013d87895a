"""Calibrated conversions (issue 26): time and peak RSS of each calibrated method beside clone, and the
co-activation partition's time per layer by FFN width.

`convert`: `upcycle convert MODEL OUT <flags>` in a child process per run (wall time and that child's peak RSS
from os.wait4), clone run before every calibrated method, so that each ratio compares runs made back to back
under the same load. MODEL is the embedded SmolLM2 (float32, 30 layers, width 1,536) or `llama-0.5b`, random
weights of a ~0.45B Llama shape saved in bfloat16 (hidden 896, width 4,864, 24 layers, SmolLM2's tokenizer and
vocabulary), built once under --work.

`coactivation`: random inputs and weights of the given widths (gate and up saved under --work in --dtype and
read a block of rows at a time, as conversion reads them), `coactivation_fires` and `CoactivationGraph`,
then `graph_partition` (8 parts, share 0.25), each width in a child process of its own (its peak RSS from
os.wait4). `methods_bench.py --coactivation` is the fuller version (the dense-matrix contender alternated).

    python benchmarks/calibration_bench.py convert --model smollm2
    python benchmarks/calibration_bench.py convert --model llama-0.5b --layers 0,8,16,23
    python benchmarks/calibration_bench.py convert --only kmeans,coactivation --rounds 2 --baseline /tmp/base
    python benchmarks/calibration_bench.py convert --only kmeans,kmeans-bf16,coactivation,coactivation-bf16 --rounds 3
    python benchmarks/calibration_bench.py coactivation --widths 1536,4864,14336

Results go to stdout as markdown rows and to benchmarks/results/calibration_<yyyymm>.json (appended by section).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_bench import coactivation_weights, code_env, measure
from published import public_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CALIBRATION = ["--calibration", str(ROOT / "README.md")]
PROMPTS = ["--router-init", "hidden", "--expert-prompts", str(HERE / "expert_prompts_8.yaml")]
METHODS = {  # name -> convert flags; clone runs before each of the others
    "kmeans": ["--experts", "8", "--top-k", "2", "--router-init", "kmeans", *CALIBRATION],
    "hidden": ["--experts", "8", "--top-k", "2", *PROMPTS],
    "split-ridge": ["--init", "split", "--experts", "8", "--top-k", "2", "--router-init", "kmeans", *CALIBRATION],
    "coactivation": ["--init", "split", "--split-by", "coactivation", "--experts", "8", "--top-k", "2", *CALIBRATION],
}
BF16 = ["--calibration-dtype", "bfloat16"]  # the pass in bfloat16 (a float32 source's weights rounded as read)
METHODS |= {f"{name}-bf16": [*flags, *BF16] for name, flags in list(METHODS.items()) if "--calibration" in flags}
CLONE = ["--experts", "8", "--top-k", "2"]
WIDTHS = {1536: 576, 4864: 896, 14336: 4096}  # FFN width -> hidden size of the model it comes from


def run_child(argv: list[str], timeout: float | None = None) -> dict:
    """ARGV's own wall time, ru_maxrss and exit code (methods_bench's measure), with its stdout/stderr."""
    return measure(argv, timeout)


def llama_05b(folder: Path) -> Path:
    """Random weights of a ~0.45B Llama shape in bfloat16, with SmolLM2's tokenizer (built once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from upcycle.source import resolve

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve("smollm2").folder).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of each weight file of a converted folder (to compare two versions' bytes)."""
    import hashlib

    found = {}
    for path in sorted(out.glob("*.safetensors")):
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        found[path.name] = h.hexdigest()
    return found


def convert_rows(args) -> list[dict]:
    """Per method and round: clone, then the method (and with --baseline the method under that code too, the two
    versions' order swapping every round); each run's wall time and peak RSS, its ratio to the clone just before,
    and with --baseline whether both versions wrote the same bytes."""
    upcycle = str(Path(sys.executable).parent / "upcycle")
    src = "smollm2" if args.model == "smollm2" else str(llama_05b(args.work / "llama-0.5b"))
    extra = ["--layers", args.layers] if args.layers else []
    codes = [("", None)] + ([("@base", args.baseline)] if args.baseline else [])
    rows = []
    for r in range(args.rounds):
        for name in args.only.split(",") if args.only else list(METHODS):
            runs = [("clone", CLONE, None)] + [(name + tag, METHODS[name], code)
                                                for tag, code in (codes if r % 2 == 0 else codes[::-1])]  # fmt: skip
            pair, hashes, loads = {}, {}, {}
            for label, flags, code in runs:
                out = args.work / "out"
                shutil.rmtree(out, ignore_errors=True)
                loads[label] = os.getloadavg()[0]
                stats = measure([upcycle, "convert", src, str(out), *flags, *extra], env=code_env(code))
                if stats["rc"] != 0:
                    print(f"{label}: convert failed: {stats['stderr'].strip().splitlines()[-2:]}", file=sys.stderr)
                if label != "clone" and args.baseline:
                    hashes[label] = output_hashes(out)
                pair[label] = stats
                shutil.rmtree(out, ignore_errors=True)
            clone = pair["clone"]
            for label, _, _ in runs[1:]:
                method = pair[label]
                row = {
                    "round": r + 1,
                    "model": args.model,
                    "method": label,
                    "flags": " ".join(public_path(a) for a in METHODS[name]),
                    "layers": args.layers,
                    "clone_s": clone["wall"],
                    "clone_rss_gib": clone["rss"] / 2**30,
                    "method_s": method["wall"],
                    "method_cpu_s": method["cpu"],
                    "method_rss_gib": method["rss"] / 2**30,
                    "time_ratio": method["wall"] / clone["wall"],
                    "rss_over_clone_gib": (method["rss"] - clone["rss"]) / 2**30,
                    "rc": method["rc"],
                    "load_avg": loads[label],
                }
                if args.baseline:
                    row["same_bytes_as_base"] = hashes[name] == hashes[name + "@base"] and bool(hashes[name])
                rows.append(row)
                print(
                    f"| {r + 1} | {args.model} | {label} | {clone['wall']:.1f} | {row['clone_rss_gib']:.2f} | "
                    f"{method['wall']:.1f} | {row['method_rss_gib']:.2f} | {row['time_ratio']:.2f}× | "
                    f"{row['load_avg']:.1f} | {row.get('same_bytes_as_base', '')} |",
                    flush=True,
                )
    return rows


def coactivation_one(width: int, tokens: int, weights: Path) -> None:
    """One width, in this process: prints the graph's and the partition's seconds as JSON. Gate and up come from
    WEIGHTS (methods_bench.coactivation_weights: saved in the source's dtype), read as conversion reads them."""
    import torch

    from upcycle.convert.calibrate import StoredRows
    from upcycle.convert.methods.base import generator
    from upcycle.convert.methods.coactivation import CoactivationGraph, coactivation_fires, graph_partition
    from upcycle.heap import hold_mmap_threshold
    from upcycle.source import read_header

    hold_mmap_threshold()  # as `convert` does
    hidden = WIDTHS.get(width, 1024)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))  # [T, H] float32
    stored = {info.name: StoredRows(info) for info in read_header(weights)}  # [I, H] each, read by rows
    t = time.perf_counter()
    with torch.no_grad():
        fires = coactivation_fires(x, stored["gate"], stored["up"], torch.nn.functional.silu, 0.25)  # [T, I] bool
    del x
    w = CoactivationGraph(fires)  # F [T, I] float32: the [I, I] graph is never formed
    del fires
    graph = time.perf_counter() - t
    t = time.perf_counter()
    labels = graph_partition(w, 8, generator(0, "coactivation", 0))
    part = time.perf_counter() - t
    assert torch.bincount(labels).tolist() == [width // 8] * 8
    print(json.dumps({"graph_s": graph, "partition_s": part}))


def coactivation_rows(args) -> list[dict]:
    rows = []
    for width in map(int, args.widths.split(",")):
        weights = coactivation_weights(args.work / "coactivation", width, args.dtype)
        argv = [sys.executable, __file__, "coactivation-one", "--width", str(width), "--tokens", str(args.tokens),
                "--weights", str(weights)]  # fmt: skip
        stats = run_child(argv, timeout=args.timeout)
        found = json.loads(stats["stdout"].strip().splitlines()[-1]) if stats["rc"] == 0 else {}
        row = {
            "width": width,
            "hidden": WIDTHS.get(width, 1024),
            "tokens": args.tokens,
            "graph_s": found.get("graph_s"),
            "partition_s": found.get("partition_s"),
            "total_s": stats["wall"],
            "peak_rss_gib": stats["rss"] / 2**30,
            "rc": stats["rc"],
            "load_avg": os.getloadavg()[0],
        }
        rows.append(row)
        shown = [f"{row[k]:.1f}" if row[k] is not None else "–" for k in ("graph_s", "partition_s")]
        print(
            f"| {width:,} | {row['hidden']:,} | {args.tokens:,} | {shown[0]} | {shown[1]} | {stats['wall']:.1f}"
            f"{' (timed out)' if stats['rc'] == 124 else ''} | {row['peak_rss_gib']:.2f} | {row['load_avg']:.0f} |",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["convert", "coactivation", "coactivation-one"])
    parser.add_argument("--model", choices=["smollm2", "llama-0.5b"], default="smollm2")
    parser.add_argument("--only", help=f"comma-separated methods (default: {','.join(METHODS)})")
    parser.add_argument("--layers", help="--layers for every conversion, clone's too (default: every layer)")
    parser.add_argument("--rounds", type=int, default=1, help="convert: rounds (each method after its own clone)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="convert: a folder with another version's upcycle/ and upcycle_cli/ (e.g. `git archive REV | tar -x` "
        "plus the link upcycle_cli -> cli); each method also runs under it, alternated (rows NAME@base), and the "
        "two versions' output bytes are compared",
    )
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--width", type=int)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="coactivation: the dtype the random gate and up are stored in")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per co-activation width")
    parser.add_argument("--work", type=Path, default=HERE / "_work" / "calibration")
    parser.add_argument("--results", type=Path, help="JSON to extend (default: results/calibration_<yyyymm>.json)")
    args = parser.parse_args(argv)
    if args.what == "coactivation-one":
        coactivation_one(args.width, args.tokens, args.weights)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = convert_rows(args) if args.what == "convert" else coactivation_rows(args)
    results = args.results or HERE / "results" / f"calibration_{datetime.now(UTC):%Y%m}.json"
    saved = json.loads(results.read_text()) if results.is_file() else {"runs": []}
    saved["runs"].append(
        {
            "what": args.what,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(),
            "rounds": args.rounds,
            "baseline": args.baseline.name if args.baseline else None,
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "rows": rows,
        }
    )
    results.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
