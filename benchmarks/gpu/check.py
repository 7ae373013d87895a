"""The GPU check of `upcycle train`: one command that runs, on a bare GPU machine with no network, every step that
only a GPU can show, and leaves each step's results as JSON and a log even when another step fails.

Steps, in order (each guarded and given the time left of --budget; a step that fails or runs out of time is
recorded as such and the next one still runs):

  env         the GPU, driver, torch, transformers and CUDA versions                    -> env.json
  pytest      `pytest -m gpu` (tests/test_gpu.py) with a per-test timeout               -> pytest.json, pytest.log
  e2e         a random model at SmolLM2-135M's shape (--tiny: a toy shape) and a BPE tokenizer trained on the
              carried text, `upcycle convert` to 8 experts top-2, `upcycle train --dry-run`, then a few hundred
              steps of `upcycle train`; the loss must fall and final/ must load natively  -> e2e.json, e2e.log
  throughput  benchmarks/train_throughput.py: dense parent vs its 8x top-2 MoE at two shapes, grouped_mm and
              eager, bf16 with fp32 masters (what `upcycle train` runs)                -> throughput.json, .log
  compile     the same with torch.compile, at the smollm2 shape (grouped_mm)           -> compile.json, .log
  profile     one step of the dense parent and its MoE (grouped_mm) at --profile-size under torch.profiler:
              GPU time by phase and by op category, the top ops                         -> profile.json, .log
  loops       benchmarks/train_loops.py: `upcycle train` against transformers' Trainer and a hand-written loop
              on the same SmolLM2-shape MoE, data and step, bf16 autocast               -> loops.json, .log

    python benchmarks/gpu/check.py --out OUT                       # on the GPU machine (benchmarks/gpu/run.sh)
    python benchmarks/gpu/check.py --out OUT --device cpu --tiny   # the same steps at toy size (CI)

The last thing printed is a one-screen summary; summary.json holds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("env", "pytest", "e2e", "throughput", "compile", "profile", "loops")


@dataclass
class Ctx:
    out: Path
    device: str
    tiny: bool
    text: Path
    args: argparse.Namespace
    deadline: float
    work: Path
    results: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def env(self) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the dry mode must not touch a GPU even where there is one
        return env

    def run(self, cmd: list[str], log: str, timeout: float) -> subprocess.CompletedProcess:
        """Run cmd with its output appended to OUT/log; never longer than timeout or the time left."""
        limit = max(1.0, min(timeout, self.left()))
        with open(self.out / log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            try:
                return subprocess.run(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env(), cwd=ROOT, timeout=limit, text=True
                )
            except subprocess.TimeoutExpired:
                fh.write(f"\n[timed out after {limit:.0f} s]\n")
                return subprocess.CompletedProcess(cmd, 124)


def upcycle(*args: str) -> list[str]:
    return [sys.executable, "-m", "upcycle_cli.main", *args]


# --- steps ----------------------------------------------------------------------------------------------


def step_env(ctx: Ctx) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("transformers", "tokenizers", "safetensors", "huggingface_hub", "datasets", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # a missing or broken package is what this step reports
            info[name] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if torch.cuda.is_available() and ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_mem_gib": props.total_memory / 2**30, "sm": f"{props.major}.{props.minor}"}
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return {"ok": ctx.device == "cpu" or bool(info["cuda_available"]), **info}


def step_pytest(ctx: Ctx) -> dict[str, Any]:
    xml = ctx.out / "pytest.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/test_gpu.py",
        "-p",
        "no:cacheprovider",
        "-rA",
        "-s",
        f"--junitxml={xml}",
    ]
    if ctx.args.pytest_k:
        cmd += ["-k", ctx.args.pytest_k]
    if importlib.util.find_spec("pytest_timeout") is not None:  # a per-test limit where the plugin is there
        cmd += ["--timeout", "240"]
    done = ctx.run(cmd, "pytest.log", timeout=min(ctx.left() - 5, 240 if ctx.device == "cuda" else 120))
    tests: dict[str, str] = {}
    if xml.is_file():
        for case in ET.parse(xml).iter("testcase"):
            status = "passed"
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    status = f"{kind}: {(node.get('message') or '')[:300]}"
            tests[case.get("name", "?")] = status
    failed = [n for n, s in tests.items() if s.startswith(("failure", "error"))]
    passed = [n for n, s in tests.items() if s == "passed"]
    return {
        "ok": done.returncode == 0,
        "returncode": done.returncode,
        "passed": len(passed),
        "failed": failed,
        "skipped": len(tests) - len(passed) - len(failed),
        "tests": tests,
    }


def make_parent(folder: Path, text: Path, tiny: bool) -> dict[str, Any]:
    """A random Llama at SmolLM2-135M's shape (or a toy one) with a byte-level BPE tokenizer trained on the text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = 2048 if tiny else 49152
    shape = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if tiny
        else dict(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
        )
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(text)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0])
    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(folder)  # as SmolLM2 is published: bf16
    fast.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": vocab, "learned_vocab": tok.get_vocab_size()}


def step_e2e(ctx: Ctx) -> dict[str, Any]:
    parent, moe, run = ctx.work / "parent", ctx.work / "moe", ctx.work / "run"
    res: dict[str, Any] = {"parent": make_parent(parent, ctx.text, ctx.tiny)}
    done = ctx.run(
        upcycle("convert", str(parent), str(moe), "--experts", "8", "--top-k", "2", "--force"), "e2e.log", timeout=180
    )
    if done.returncode != 0:
        return res | {"ok": False, "failed_at": "convert"}
    steps = str(ctx.args.e2e_steps or (30 if ctx.tiny else 200))
    seq, micro = ("128", "4") if ctx.tiny else ("1024", "16")
    args = [
        str(moe),
        "--data",
        str(ctx.text),
        "--steps",
        steps,
        "--seq-len",
        seq,
        "--micro-batch",
        micro,
        "--lr",
        "2e-3",
        "--warmup",
        "20",
        "--log-every",
        "5",
        "--eval-every",
        "100",
        "--save-every",
        steps,
    ]
    plan_file, summary_file = ctx.out / "e2e_plan.json", ctx.out / "e2e_summary.json"
    done = ctx.run(upcycle("train", *args, "--dry-run", "--json", str(plan_file)), "e2e.log", timeout=120)
    if done.returncode != 0:
        return res | {"ok": False, "failed_at": "train --dry-run"}
    plan = json.loads(plan_file.read_text())
    t0 = time.monotonic()
    done = ctx.run(
        upcycle("train", *args, "--out", str(run), "--force", "--json", str(summary_file)),
        "e2e.log",
        timeout=min(ctx.left() - 20, 150),
    )
    res["train_wall_s"] = time.monotonic() - t0
    if done.returncode != 0 or not summary_file.is_file():
        return res | {"ok": False, "failed_at": "train", "returncode": done.returncode}
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lm = [r["lm"] for r in records if r["kind"] == "train"]
    head, tail = sum(lm[:3]) / 3, sum(lm[-3:]) / 3
    loads = check_final(run / "final")
    estimate = plan["memory"]["total"] / 2**30
    peak = summary.get("peak_gpu_memory_gib")
    res |= {
        "plan": {k: plan[k] for k in ("architecture", "params_total", "dtype", "experts_impl", "tokens_per_step")},
        "steps": int(steps),
        "tokens_per_s": summary["tokens_per_s"],
        "lm_first3": head,
        "lm_last3": tail,
        "eval_loss": summary["eval_loss"],
        "experts_implementation": summary["experts_implementation"],
        "memory_estimate_gib": estimate,
        "peak_gpu_memory_gib": peak,
        "estimate_over_peak": estimate / peak if peak else None,
        "final": loads,
    }
    res["ok"] = tail < head - (0.3 if ctx.tiny else 1.0) and loads["ok"]
    return res


def check_final(final: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    clean = not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        finite = bool(torch.isfinite(model(ids).logits.float()).all())
    return {
        "ok": clean and finite,
        "class": type(model).__name__,
        "dtypes": dtypes,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "logits_finite": finite,
    }


def _throughput(ctx: Ctx, name: str, extra: list[str], sizes: str) -> dict[str, Any]:
    results = ctx.out / f"{name}_bench.json"
    cmd = [
        sys.executable,
        "benchmarks/train_throughput.py",
        "--device",
        ctx.device,
        "--sizes",
        sizes,
        "--work",
        str(ctx.work / "bench"),
        "--results",
        str(results),
        *extra,
    ]
    if ctx.device == "cuda":
        cmd += ["--dtype", "bf16", "--precision", "mixed"]
        cmd += ["--steps", "3", "--warmup", "2"] if "--profile" in extra else ["--steps", "10", "--warmup", "3"]
        cmd += ["--impls", ctx.args.impls] if ctx.args.impls and "--impls" not in extra else []
    else:
        cmd += ["--steps", "2", "--warmup", "1"] + ([] if "--impls" in extra else ["--impls", "grouped_mm"])
    done = ctx.run(cmd, f"{name}.log", timeout=ctx.left() - 5)
    if done.returncode != 0 or not results.is_file():
        return {"ok": False, "returncode": done.returncode}
    data = json.loads(results.read_text())
    rows = [
        {
            k: r.get(k)
            for k in (
                "size",
                "model",
                "experts_impl",
                "lm_loss",
                "tokens_per_s",
                "vs_dense",
                "peak_mib",
                "estimate_mib",
                "mfu",
                "mfu_measured_peak",
                "compile",
                "compile_backend",
                "graph_breaks",
                "profile",
            )
        }
        for r in data["runs"]
    ]
    return {
        "ok": True,
        "peak_tflops": data["peak_tflops"],
        "measured_peak_tflops": data.get("measured_peak_tflops"),
        "rows": rows,
    }


def step_throughput(ctx: Ctx) -> dict[str, Any]:
    batch = ["--batch", str(ctx.args.throughput_batch)] if ctx.args.throughput_batch else []
    lm_loss = ctx.args.throughput_lm_loss or ("model,chunked" if ctx.tiny else "model")
    return _throughput(ctx, "throughput", [*batch, "--lm-loss", lm_loss], "tiny" if ctx.tiny else ctx.args.sizes)


def step_compile(ctx: Ctx) -> dict[str, Any]:
    return _throughput(
        ctx,
        "compile",
        # the CPU dry mode traces the same graphs, and leaves inductor's code generation (minutes cold) to the GPU
        ["--compile"] + (["--compile-backend", "aot_eager"] if ctx.tiny else ["--impls", "grouped_mm"]),
        "tiny" if ctx.tiny else "smollm2",
    )


def step_profile(ctx: Ctx) -> dict[str, Any]:
    """Where the MoE's step goes against its parent's: the same timed runs, then one step each under the profiler."""
    size = "tiny" if ctx.tiny else ctx.args.profile_size
    batch = ["--batch", str(ctx.args.profile_batch)] if ctx.args.profile_batch else []
    return _throughput(ctx, "profile", ["--profile", "--impls", "grouped_mm", *batch], size)


def step_loops(ctx: Ctx) -> dict[str, Any]:
    """Tokens/s of `upcycle train`, the Trainer and a hand-written loop, one round each, the ratios to the Trainer."""
    results = ctx.out / "loops_bench.json"
    cmd = [sys.executable, "benchmarks/train_loops.py", "--device", ctx.device, "--rounds", "1", "--contenders",
           "upcycle,trainer,hand", "--work", str(ctx.work / "loops"), "--results", str(results)]  # fmt: skip
    cmd += ["--sizes", "tiny", "--steps", "2", "--warmup", "1"] if ctx.tiny else ["--steps", "8", "--warmup", "3"]
    done = ctx.run(cmd, "loops.log", timeout=ctx.left() - 5)
    if done.returncode != 0 or not results.is_file():
        return {"ok": False, "returncode": done.returncode}
    (size, by), *_ = json.loads(results.read_text())["summary"].items()
    trainer = by["trainer"]["median"]
    rows = [{"contender": k, "tokens_per_s": v["median"], "vs_trainer": v["median"] / trainer} for k, v in by.items()]
    return {"ok": True, "size": size, "rows": rows}


STEP_FUNCS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "env": step_env,
    "pytest": step_pytest,
    "e2e": step_e2e,
    "throughput": step_throughput,
    "compile": step_compile,
    "profile": step_profile,
    "loops": step_loops,
}
MIN_SECONDS = {"env": 1, "pytest": 30, "e2e": 40, "throughput": 40, "compile": 40, "profile": 40, "loops": 60}


# --- the summary ----------------------------------------------------------------------------------------


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "=== GPU check summary ==="]
    env = results.get("env", {})
    lines.append(
        f"machine: {env.get('gpu', 'no GPU')} | {env.get('nvidia_smi', '')} | torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}) | transformers {env.get('transformers')}"
    )
    for name in STEPS:
        r = results.get(name)
        if r is None:
            continue
        status = "ok" if r.get("ok") else ("SKIPPED" if r.get("skipped") else "FAILED")
        detail = ""
        if name == "pytest":
            detail = f"{r.get('passed', 0)} passed, {len(r.get('failed', []))} failed, {r.get('skipped', 0)} skipped"
            if r.get("failed"):
                detail += ": " + ", ".join(r["failed"])
        elif name == "e2e" and "lm_first3" in r:
            detail = (
                f"lm {r['lm_first3']:.3f} -> {r['lm_last3']:.3f} in {r['steps']} steps, "
                f"{r['tokens_per_s'] or 0:,.0f} tokens/s, memory plan {r['memory_estimate_gib']:.2f} GiB "
                f"vs peak {r['peak_gpu_memory_gib'] or 0:.2f} GiB, final {r['final']['class']} "
                f"{'/'.join(r['final']['dtypes'])}"
            )
        elif name == "loops" and r.get("rows"):
            detail = f"{r['size']}: " + ", ".join(
                f"{row['contender']} {row['tokens_per_s']:,.0f} tok/s (x{row['vs_trainer']:.2f} Trainer)"
                for row in r["rows"]
            )
        elif r.get("error"):
            detail = r["error"].splitlines()[-1][:200]
        elif r.get("failed_at"):
            detail = f"failed at {r['failed_at']}"
        lines.append(f"{name:11s} {status:8s} {r.get('seconds', 0):6.1f} s  {detail}")
        for row in r.get("rows", []) if name in ("throughput", "compile", "profile") else []:
            mfu_m = f" / {100 * row['mfu_measured_peak']:.1f}%" if row.get("mfu_measured_peak") else ""
            lines.append(
                f"    {row['size']:8s} {row['model']:13s} {row['experts_impl']:10s} "
                f"{row['tokens_per_s']:>10,.0f} tok/s  x{row['vs_dense'] or 0:.2f}  MFU {100 * row['mfu']:.1f}%"
                f"{mfu_m}  peak {row['peak_mib']:,.0f} MiB (est {row['estimate_mib']:,.0f})"
                + (f"  graph breaks {row['graph_breaks']}" if row.get("graph_breaks") is not None else "")
            )
            if row.get("profile"):  # the step's phases, then its three largest op categories
                prof = row["profile"]
                phases = " ".join(f"{k} {v:,.0f}" for k, v in prof["phases_ms"].items())
                cats = ", ".join(f"{k} {v:,.0f}" for k, v in list(prof["categories_ms"].items())[:3])
                lines.append(f"      ms: {phases} | {prof['clock']}: {cats}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON results and logs (created)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: the CPU dry mode that CI runs")
    p.add_argument("--text", type=Path, default=None, help="training text (default: the cached Jargon File)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    p.add_argument("--pytest-k", default=None, help="only the GPU tests matching this pytest -k expression")
    p.add_argument("--e2e-steps", type=int, default=None, help="steps of the end-to-end run (default 200; tiny 30)")
    p.add_argument("--sizes", default="smollm2,qwen05", help="throughput shapes (benchmarks/train_throughput.py)")
    p.add_argument("--impls", default="grouped_mm,eager", help="experts implementations of the throughput step")
    p.add_argument("--profile-size", default="smollm2", help="the shape of the profile step")
    p.add_argument(
        "--profile-batch",
        type=int,
        default=None,
        help="sequences a step in the profile step (default: the shape's own, halved until the plan fits the card; "
        "smollm2's 16 took 75 GB on an H200)",
    )
    p.add_argument(
        "--throughput-batch",
        type=int,
        default=None,
        help="sequences a step in the throughput step, for every shape (default: each shape's own, halved until the "
        "plan fits the card: the qwen05 MoE's 8 plan 127 GiB, an H200's; 2 on an H100)",
    )
    p.add_argument(
        "--throughput-lm-loss",
        default=None,
        help="upcycle train --lm-loss values the throughput step runs, each a contender (default: model; the CPU "
        "dry mode: model,chunked)",
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder for models and runs (default: a temp dir)")
    return p.parse_args(argv)


def default_text() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from realtext import cache_root, jargon_file

    return jargon_file(cache_root(os.environ.get("UPCYCLE_CACHE")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="upcycle-gpu-check-"))  # models: never under OUT
    ctx = Ctx(
        out=args.out,
        device=args.device,
        tiny=args.tiny,
        text=args.text or default_text(),
        args=args,
        deadline=start + args.budget,
        work=work,
    )
    ctx.work.mkdir(parents=True, exist_ok=True)
    for name in args.steps.split(","):
        t0 = time.monotonic()
        if ctx.left() < MIN_SECONDS[name]:
            ctx.results[name] = {"ok": False, "skipped": True, "why": f"{ctx.left():.0f} s left of --budget"}
        else:
            print(f"[{time.monotonic() - start:6.1f} s] {name} ...", flush=True)
            try:
                ctx.results[name] = STEP_FUNCS[name](ctx)
            except Exception:  # one step's failure must leave the others' results
                ctx.results[name] = {"ok": False, "error": traceback.format_exc()}
        ctx.results[name]["seconds"] = time.monotonic() - t0
        (args.out / f"{name}.json").write_text(json.dumps(ctx.results[name], indent=1, default=str))
    ctx.results["total_s"] = time.monotonic() - start
    (args.out / "summary.json").write_text(json.dumps(ctx.results, indent=1, default=str))
    print("\n".join(summary_lines(ctx.results)))
    return 0 if all(r.get("ok") for k, r in ctx.results.items() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
