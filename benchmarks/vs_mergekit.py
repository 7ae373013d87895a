"""`upcycle convert` against mergekit-moe on the one job both can do, then what only upcycle does.

The job: a random Llama-shaped bf16 checkpoint (built with transformers and `save_pretrained`) turned into a
Mixtral with 8 experts, top-2, every layer MoE, every expert a copy of the dense FFN, random router
(mergekit-moe's `gate_mode: random`). The two tools run alternately (upcycle first in odd repeats, mergekit
first in even ones), each followed by `cp -r` of the output it just wrote. For each tool: median wall time,
its ratio to the median `cp -r` of its own output, the peak RSS of the child process tree (`ru_maxrss` from
`os.wait4` in a small helper: the largest process of the tree), the output bytes, and whether
`upcycle verify SRC OUT --layerwise` passes on the last output (logits of the MoE against the dense model).

mergekit lives in its own virtual environment, never in the project's: `--install-mergekit` creates it
(`python -m venv` + `pip install mergekit==VERSION torch==<the project's torch>`) under
$UPCYCLE_CACHE/mergekit-venv (default ~/.cache/upcycle/mergekit-venv). Without it the mergekit arm is
skipped and the JSON says why.

A second table times what only upcycle does (every other layer, split, fine-grained, Drop-Upcycling, shared
expert) on the same source, one run each.

    python benchmarks/vs_mergekit.py --install-mergekit          # 0.5B source, 3 repeats, extras
    python benchmarks/vs_mergekit.py --size tiny --repeats 1     # seconds: what the smoke test runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convert_bench import MIB, _pkg, cpu_model, folder_bytes, ram_bytes, timed_sync
from convert_bench import run_child as measure
from published import public_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs"
MERGEKIT_VERSION = "0.1.5"

# name -> LlamaConfig fields; 0.5b is convert_bench.py's 0.5b shape (506M parameters, 1.01 GB in bf16)
SIZES: dict[str, dict[str, int]] = {
    "0.5b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}

BOTH = ["--experts", "8", "--top-k", "2", "--init", "clone", "--router-init", "random", "--target", "mixtral"]
# what mergekit-moe cannot do: name -> upcycle convert flags
ONLY_UPCYCLE: dict[str, list[str]] = {
    "every other layer (Qwen2-MoE)": ["--experts", "8", "--top-k", "2", "--every", "2"],
    "split 8, top-2 (LLaMA-MoE)": ["--config", str(CONFIGS / "llama-moe-split8-top2.yaml")],
    "fine-grained 64, g=8, top-8": ["--config", str(CONFIGS / "fine-grained-virtual-groups.yaml")],
    "Drop-Upcycling r=0.5": ["--config", str(CONFIGS / "drop-upcycling-r0.5.yaml")],
    "shared expert 15+1, top-3": ["--config", str(CONFIGS / "shared-expert-split.yaml")],
}


def cache_root() -> Path:
    root = os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "upcycle"
    )
    return Path(root)


def run_child(argv: list[str], log: Path) -> dict[str, Any]:
    """Wall time, peak RSS of the process tree, CPU time and exit code of argv (convert_bench's measurement)."""
    run = measure(argv, log)
    return {
        "wall_s": run.wall_s,
        "peak_rss_bytes": round(run.peak_rss_mib * MIB),
        "cpu_s": run.user_s + run.sys_s,
        "rc": run.returncode,
    }


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- the source -----------------------------------------------------------------------------------------


def make_source(folder: Path, size: str) -> Path:
    """A random bf16 Llama with a small tokenizer (mergekit copies the base model's), reused when complete."""
    done = folder / ".complete"
    if done.is_file() and json.loads(done.read_text()).get("size") == size:
        return folder
    remove(folder)
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    words = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(61)]]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    done.write_text(json.dumps({"size": size, "params": model.num_parameters()}))
    return folder


# --- mergekit's environment -----------------------------------------------------------------------------


def mergekit_bin(venv: Path) -> Path:
    return venv / "bin" / "mergekit-moe"


def install_mergekit(venv: Path, log: Path) -> None:
    """A venv of its own with mergekit and the same torch as ours (so both tools use one torch build)."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_version = _pkg("torch").split("+")[0]
    cmd = [str(venv / "bin" / "pip"), "install", "-q", f"mergekit=={MERGEKIT_VERSION}", f"torch=={torch_version}"]
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def mergekit_status(venv: Path) -> tuple[bool, str]:
    """(usable, why not / its version)."""
    exe = mergekit_bin(venv)
    if not exe.is_file():
        return False, f"no mergekit-moe in {venv} (run with --install-mergekit, which needs PyPI)"
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return False, f"mergekit in {venv} does not import: {probe.stderr.strip().splitlines()[-1:]}"
    return True, probe.stdout.strip()


def mergekit_config(src: Path, path: Path | None) -> str:
    """mergekit-moe's YAML for 8 copies of SRC's FFN, top-2, random router, bf16, Mixtral output."""
    lines = [
        f"base_model: {src}",
        "architecture: mixtral",
        "gate_mode: random",
        "dtype: bfloat16",
        "experts_per_token: 2",
        "experts:",
        *[f"  - source_model: {src}" for _ in range(8)],
    ]
    text = "\n".join(lines) + "\n"
    if path is not None:
        path.write_text(text)
    return text


# --- the runs -------------------------------------------------------------------------------------------


def convert_argv(tool: str, src: Path, out: Path, work: Path, venv: Path) -> list[str]:
    if tool == "upcycle":
        return [str(Path(sys.executable).parent / "upcycle"), "convert", str(src), str(out), *BOTH]
    cfg = work / "mergekit-moe.yaml"
    mergekit_config(src, cfg)
    # all experts are the same model on purpose (upcycling); mergekit asks for this flag to accept that
    return [str(mergekit_bin(venv)), str(cfg), str(out), "--i-understand-this-is-not-useful-without-training"]


def one_run(tool: str, argv: list[str], out: Path, work: Path, log: Path) -> dict[str, Any]:
    remove(out)
    os.sync()  # nothing dirty from the previous run is flushed on this run's time
    run = run_child(argv, log)
    run["sync_s"] = timed_sync()
    if run["rc"] != 0:
        run["error"] = _last_line(log)
        return run
    run["output_bytes"] = folder_bytes(out)
    copy = work / f"cp-{tool}"
    remove(copy)
    os.sync()
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    run["cp_s"] = time.perf_counter() - t
    run["cp_sync_s"] = timed_sync()
    remove(copy)
    return run


def verify(src: Path, out: Path, log: Path) -> dict[str, Any]:
    argv = [str(Path(sys.executable).parent / "upcycle"), "verify", str(src), str(out), "--layerwise"]
    argv += ["--json", "-", "--no-record"]
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n{proc.stderr}\n")
    if proc.returncode not in (0, 1):
        return {"passed": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "wall_s": wall}
    report = json.loads(proc.stdout)
    keys = ("passed", "max_abs_diff", "top1_agreement", "mean_kl", "mode", "missing_keys", "unexpected_keys")
    out_d = {k: report.get(k) for k in keys} | {"wall_s": wall}
    # passed needs the logits, every MoE block and the tensor check; the tensor check compares names in
    # upcycle's own layout (per-expert w1/w2/w3), so the logit verdict is kept apart from it
    out_d["atol"], out_d["min_agreement"] = report.get("atol"), report.get("min_agreement")
    out_d["logits_passed"] = (
        report["max_abs_diff"] <= report["atol"]
        and report["top1_agreement"] >= report["min_agreement"]
        and all(row.get("passed") for row in report.get("layers", []))
        and not report.get("missing_keys")
        and not report.get("unexpected_keys")
    )
    out_d["moe_blocks_passed"] = sum(bool(row.get("passed")) for row in report.get("layers", []))
    out_d["moe_blocks"] = len(report.get("layers", []))
    check = report.get("tensor_check") or {}
    out_d["tensor_check"] = {k: check.get(k) for k in ("passed", "compared", "equal", "cast", "computed")} | {
        "missing": len(check.get("missing") or []),
        "unexpected": len(check.get("unexpected") or []),
        "mismatched": len(check.get("mismatched") or []),
        "first_missing": (check.get("missing") or [None])[0],
        "first_unexpected": (check.get("unexpected") or [None])[0],
    }
    return out_d


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {"ok": False, "error": runs[-1].get("error") if runs else "not run"}
    wall = statistics.median(r["wall_s"] for r in ok)
    cp = statistics.median(r["cp_s"] for r in ok)
    return {
        "ok": True,
        "runs": len(ok),
        "median_wall_s": wall,
        "median_cp_s": cp,
        "ratio_to_cp": wall / cp if cp > 0 else None,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
        "output_bytes": ok[-1]["output_bytes"],
        "median_cpu_s": statistics.median(r["cpu_s"] for r in ok),
    }


def only_upcycle(src: Path, work: Path, log: Path) -> list[dict[str, Any]]:
    rows = []
    exe = str(Path(sys.executable).parent / "upcycle")
    for name, flags in ONLY_UPCYCLE.items():
        out = work / "out-extra"
        remove(out)
        os.sync()
        run = run_child([exe, "convert", str(src), str(out), *flags], log)
        row: dict[str, Any] = {"what": name, "flags": " ".join(public_path(a) for a in flags)} | run
        if run["rc"] == 0:
            plan = json.loads((out / "upcycle.json").read_text())["plan"]
            row |= {
                "output_bytes": folder_bytes(out),
                "exact_at_init": plan.get("exact_at_init"),
                "total_params": plan.get("total_params"),
                "active_params": plan.get("active_params"),
                "target": plan.get("target") or plan.get("architecture"),
            }
        else:
            row["error"] = _last_line(log)
        rows.append(row)
        print(f"  {name}: {run['wall_s']:.1f} s, rc {run['rc']}", flush=True)
        remove(out)
    return rows


# --- bookkeeping ----------------------------------------------------------------------------------------


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith("{")]
    return lines[-1] if lines else "no output"


def machine(mergekit_version: str | None) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "ram_bytes": ram_bytes(),
        "os": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": _pkg("torch"),
            "transformers": _pkg("transformers"),
            "safetensors": _pkg("safetensors"),
            "upcycle": _pkg("upcycle"),
            "mergekit": mergekit_version,
        },
    }


def print_tables(result: dict[str, Any]) -> None:
    print("\n| tool | median s | cp -r s | × cp | peak RSS MiB | output GB | logits (max abs diff) | verify: all |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, s in result["summary"].items():
        if not s.get("ok"):
            print(f"| {tool} | {s.get('skipped') or s.get('error')} | | | | | | |")
            continue
        v = result["verify"].get(tool) or {}
        logits = f"{'pass' if v.get('logits_passed') else 'FAIL'} ({v.get('max_abs_diff'):.3g})" if v else "not run"
        ver = ("pass" if v.get("passed") else "FAIL") if v else "not run"
        print(
            f"| {tool} | {s['median_wall_s']:.1f} | {s['median_cp_s']:.1f} | {s['ratio_to_cp']:.2f} | "
            f"{s['peak_rss_bytes'] / 2**20:.0f} | {s['output_bytes'] / 1e9:.2f} | {logits} | {ver} |"
        )
    if result["only_upcycle"]:
        print("\n| upcycle only | s | peak RSS MiB | output GB | exact at init |")
        print("|---|---|---|---|---|")
        for r in result["only_upcycle"]:
            size = f"{r['output_bytes'] / 1e9:.2f}" if "output_bytes" in r else r.get("error", "")
            print(
                f"| {r['what']} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | {size} | "
                f"{r.get('exact_at_init')} |"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "_work" / "vs_mergekit")
    parser.add_argument("--mergekit-venv", type=Path, default=cache_root() / "mergekit-venv")
    parser.add_argument("--install-mergekit", action="store_true", help="create the venv if it is missing")
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit arm")
    parser.add_argument("--no-extras", action="store_true", help="skip the upcycle-only table")
    parser.add_argument(
        "--results", type=Path, help="JSON path (default benchmarks/results/vs_mergekit_<size>_<yyyymm>.json)"
    )
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("")
    venv = args.mergekit_venv.expanduser()
    if args.install_mergekit and not mergekit_bin(venv).is_file() and not args.no_mergekit:
        print(f"installing mergekit {MERGEKIT_VERSION} into {venv}", flush=True)
        try:
            install_mergekit(venv, log)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"could not install mergekit: {exc}; see {log}", file=sys.stderr)
    usable, why = (False, "--no-mergekit") if args.no_mergekit else mergekit_status(venv)
    tools = ["upcycle", "mergekit"] if usable else ["upcycle"]
    if not usable:
        print(f"mergekit arm skipped: {why}", flush=True)

    t0 = time.perf_counter()
    src = make_source(work / f"dense-{args.size}", args.size)
    print(f"source: {src.name}, {folder_bytes(src) / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    for rep in range(args.repeats):
        order = tools if rep % 2 == 0 else tools[::-1]
        for tool in order:
            out = work / f"out-{tool}"
            run = one_run(tool, convert_argv(tool, src, out, work, venv), out, work, log)
            run["repeat"] = rep + 1
            runs[tool].append(run)
            extra = f", cp {run['cp_s']:.1f} s" if "cp_s" in run else f": {run.get('error')}"
            print(f"repeat {rep + 1} {tool}: {run['wall_s']:.1f} s, rc {run['rc']}{extra}", flush=True)
    summary = {t: summarise(r) for t, r in runs.items()}
    if not usable:
        summary["mergekit"] = {"ok": False, "skipped": why}
    checks = {}
    for tool in tools:
        out = work / f"out-{tool}"
        if summary[tool].get("ok"):
            checks[tool] = verify(src, out, log)
            print(f"verify {tool}: {checks[tool]}", flush=True)
        remove(out)
    extras = [] if args.no_extras else only_upcycle(src, work, log)

    meta = json.loads((src / ".complete").read_text())
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/vs_mergekit.py "
        + " ".join(map(public_path, sys.argv[1:] if argv is None else argv)),
        "machine": machine(why if usable else None),
        "source": {
            "size": args.size,
            "params": meta["params"],
            "bytes": folder_bytes(src),
            "config": SIZES[args.size],
        },
        "job": {"upcycle_flags": " ".join(BOTH), "mergekit_config": mergekit_config(Path("DENSE"), None)},
        "repeats": args.repeats,
        "mergekit": {"usable": usable, "why" if not usable else "version": why},
        "runs": runs,
        "summary": summary,
        "verify": checks,
        "only_upcycle": extras,
    }
    path = args.results or HERE / "results" / f"vs_mergekit_{args.size}_{datetime.now(UTC):%Y%m}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"wrote {public_path(str(path.resolve()))}")
    return result


if __name__ == "__main__":
    main()
