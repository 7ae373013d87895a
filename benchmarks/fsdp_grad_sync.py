"""FSDP2 with gradient accumulation: reduce-scatter after every micro-batch (FSDP's default) or after the last only.

`upcycle train` under torchrun with `--grad-accum N > 1` turns FSDP2's gradient sync off for all but the last
micro-batch of a step (upcycle.train.plan.grad_sync_on_last_micro_batch decides, step.py calls
distributed.set_gradient_sync) whenever the unsharded gradients this holds between micro-batches still fit. This
benchmark measures what that buys and costs: the same torchrun run (2 processes, gloo on CPU by default) in two arms,

  last    the shipped rule (one reduce-scatter per step)
  every   the rule patched to "never" (N reduce-scatters per step: FSDP's default)

alternated for --rounds rounds, each a fresh `torchrun` started from a small launcher that patches the rule for the
`every` arm only. Per run: the mean step time over the timed steps (metrics.jsonl's `elapsed_s` between the first
and the last logged step, so loading and the first step are left out), the peak RSS of each rank (the launcher
writes its own ru_maxrss at exit), and every step's loss. Losses must agree across arms
to float tolerance (a reduce-scatter of the summed gradients equals the sum of reduce-scatters); the script says
the largest difference.

The model: a random dense Llama (hidden 256, FFN 1024, 4 layers, SmolLM2's tokenizer and vocabulary) upcycled to 8
experts top-2 on every layer (~42M parameters, ~170 MB of float32 gradients), trained on the jargon file.

    python benchmarks/fsdp_grad_sync.py --text jargon.txt                  # 3 rounds, grad-accum 4, 2 processes
    python benchmarks/fsdp_grad_sync.py --text jargon.txt --grad-accum 8 --rounds 5 --out results.json
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_memory as tm  # noqa: E402  (its smollm2 folder gives the tokenizer)

ARMS = ("last", "every")
LAUNCHER = """
import os
import sys

if os.environ.get("GRAD_SYNC_ARM") == "every":  # FSDP's default: reduce-scatter after every micro-batch
    from upcycle.train import plan

    plan.grad_sync_on_last_micro_batch = lambda env, spec, with_unsharded_grads: False

import resource
from pathlib import Path

from upcycle_cli.main import run

try:
    code = run(sys.argv[1:])
finally:  # this rank's peak RSS, for the benchmark
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (Path(os.environ["GRAD_SYNC_PEAKS"]) / f"rank{os.environ.get('RANK', '0')}").write_text(str(peak))
sys.exit(code)
"""

MAKE_LLAMA = r"""
import sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out, tok = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(tok)
cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(out)
tokenizer.save_pretrained(out)
"""


def model(work: Path) -> Path:
    out = work / "llama-moe"
    if (out / "config.json").is_file():
        return out
    dense = work / "llama-dense"
    if not (dense / "config.json").is_file():
        smol = tm.model_folder(work, "smollm2")
        subprocess.run([sys.executable, "-c", MAKE_LLAMA, str(dense), str(smol)], check=True)
    tm.upcycle("convert", str(dense), str(out), "--experts", "8", "--top-k", "2")
    return out


def one_run(arm: str, moe: Path, text: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    launcher = work / "launcher.py"
    launcher.write_text(LAUNCHER)
    run_dir = work / f"run-{arm}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd += [str(launcher), "train", str(moe), "--data", str(text), "--out", str(run_dir), "--force"]
    cmd += ["--steps", str(args.steps), "--seq-len", str(args.seq_len), "--micro-batch", "1"]
    cmd += ["--grad-accum", str(args.grad_accum), "--log-every", "1", "--eval-every", "0"]
    cmd += ["--save-every", str(args.steps), "--lr", "1e-3"]
    threads = str(max(1, (os.cpu_count() or 2) // args.nproc))
    peaks = work / f"peaks-{arm}"
    shutil.rmtree(peaks, ignore_errors=True)
    peaks.mkdir()
    env = {
        **os.environ,
        "GRAD_SYNC_ARM": arm,
        "GRAD_SYNC_PEAKS": str(peaks),
        "OMP_NUM_THREADS": threads,
        "HF_HUB_OFFLINE": "1",
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{arm} failed:\n{err[-3000:]}")
    rank_peaks = [int(f.read_text()) for f in sorted(peaks.iterdir())]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    timed = train[1:]  # the first step carries warm-up
    step_s = (timed[-1]["elapsed_s"] - train[0]["elapsed_s"]) / len(timed)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "arm": arm,
        "wall_s": round(wall, 2),
        "step_s": step_s,
        "rank_peak_rss": rank_peaks,
        "losses": [r["loss"] for r in train],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, required=True, help="training text (e.g. the jargon file)")
    p.add_argument("--work", type=Path, default=HERE / "_work" / "fsdp_grad_sync")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    moe = model(args.work)
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            load = os.getloadavg()[0]
            res = one_run(arm, moe, args.text, args, args.work)
            res.update(round=r, load_before=round(load, 2))
            runs.append(res)
            print(
                f"round {r} {arm:5s} step {res['step_s']:.3f} s  wall {res['wall_s']:.1f} s  load {load:.1f}",
                flush=True,
            )
    ratios = []
    for r in range(args.rounds):
        by = {x["arm"]: x for x in runs if x["round"] == r}
        ratios.append(by["every"]["step_s"] / by["last"]["step_s"])
    losses = {arm: [x["losses"] for x in runs if x["arm"] == arm] for arm in ARMS}
    max_diff = max(abs(a - b) for la in losses["last"] for lb in losses["every"] for a, b in zip(la, lb, strict=True))
    summary = {
        "rank_peak_rss_mib_median": {
            arm: statistics.median(max(x["rank_peak_rss"]) / 2**20 for x in runs if x["arm"] == arm) for arm in ARMS
        },
        "step_s_median": {arm: statistics.median(x["step_s"] for x in runs if x["arm"] == arm) for arm in ARMS},
        "every_over_last_per_round": [round(x, 3) for x in ratios],
        "every_over_last_median": round(statistics.median(ratios), 3),
        "max_loss_difference": max_diff,
        "reduce_scatters_per_step": {"last": 1, "every": args.grad_accum},
    }
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "torch": tm_version("torch"),
        "transformers": tm_version("transformers"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def tm_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
