"""Benchmark `upcycle train`'s memory estimate against the peak RSS of real runs on CPU.

For each configuration it asks the estimate (upcycle.train.loop.train with dry_run, the figures `--dry-run` prints),
then runs the real command, `upcycle train MODEL --data TEXT --steps 2 --eval-every 2 --save-every 2 ...`, in a
child process and reads the child's peak RSS (`ru_maxrss` from wait4: the whole run, loading, steps, the evaluation,
the checkpoint and final/ included). One run at a time.

Models:
- `smollm2`: the demo SmolLM2-135M-Instruct upcycled by `upcycle convert smollm2 OUT` (Mixtral, 8 experts top-2,
  692M parameters, float32 files);
- `qwen05-L`: a dense Qwen2 at Qwen2.5-0.5B's dimensions (hidden 896, FFN 4864, 14 heads, 2 KV heads, vocab 151,936,
  tied embeddings) with random bfloat16 weights and L layers (24 is the real depth; fewer keep a run under the
  machine's memory), SmolLM2's tokenizer, upcycled with `--experts 8 --top-k 2 --every 2` (Qwen2-MoE);
  a bf16 checkpoint that training materialises in float32.

    python benchmarks/train_memory.py --work /tmp/mem --text some.txt                  # every configuration
    python benchmarks/train_memory.py --work /tmp/mem --text some.txt --only smollm2:router:mb1
    python benchmarks/train_memory.py --work /tmp/mem --text some.txt --estimate-only  # no runs: the table of
                                                                                       # estimates (any size)
    python benchmarks/train_memory.py --work /tmp/mem --text some.txt --measured a.json b.json --out all.json
                                        # the measurements of earlier runs beside the current code's estimates
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GiB = 1 << 30


@dataclass(frozen=True)
class Config:
    model: str  # "smollm2" or "qwen05-L"
    train: str
    micro_batch: int = 1
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    seq_len: int = 256
    lm_loss: str = "model"

    @property
    def name(self) -> str:
        extra = f":{self.optimizer}" if self.optimizer != "adamw" else ""
        extra += ":ckpt" if self.grad_checkpointing else ""
        extra += f":s{self.seq_len}" if self.seq_len != 256 else ""
        extra += ":chunked" if self.lm_loss == "chunked" else ""
        return f"{self.model}:{self.train}:mb{self.micro_batch}{extra}"

    def flags(self) -> list[str]:
        out = ["--train", self.train, "--micro-batch", str(self.micro_batch), "--seq-len", str(self.seq_len)]
        out += ["--optimizer", self.optimizer, "--lm-loss", self.lm_loss]
        return out + (["--grad-checkpointing"] if self.grad_checkpointing else [])


MEASURED = [  # smallest first; a run whose estimate (+15%, +1 GiB) exceeds the RAM available is skipped (--margin)
    Config("smollm2", "router"),
    Config("smollm2", "router", micro_batch=2),
    Config("smollm2", "router", micro_batch=2, grad_checkpointing=True),
    Config("smollm2", "all", optimizer="adafactor"),
    Config("smollm2", "all", optimizer="adamw8bit"),
    Config("smollm2", "all"),
    Config("qwen05-12", "router"),
    Config("qwen05-12", "router", micro_batch=2),
    Config("qwen05-12", "experts", optimizer="adafactor", grad_checkpointing=True),
    Config("qwen05-12", "experts", optimizer="adamw8bit", grad_checkpointing=True),
    Config("qwen05-12", "all", optimizer="adafactor"),
    Config("qwen05-24", "router"),
    Config("qwen05-24", "all", optimizer="adafactor"),
    # the LM loss over all the logits against --lm-loss chunked, where the logits are most of the step
    Config("smollm2", "router", micro_batch=4, grad_checkpointing=True, seq_len=1024),
    Config("smollm2", "router", micro_batch=4, grad_checkpointing=True, seq_len=1024, lm_loss="chunked"),
    Config("qwen05-12", "router", micro_batch=4, grad_checkpointing=True, seq_len=512),
    Config("qwen05-12", "router", micro_batch=4, grad_checkpointing=True, seq_len=512, lm_loss="chunked"),
]
ESTIMATED = [  # the full-depth shape: estimates only (AdamW on all of it needs more than the machine has)
    Config("qwen05-24", "all"),
    Config("qwen05-24", "all", grad_checkpointing=True),
    Config("qwen05-24", "all", optimizer="adafactor", grad_checkpointing=True),
    Config("qwen05-24", "experts", optimizer="adafactor"),
    Config("qwen05-24", "router", micro_batch=2),
]


def upcycle(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "upcycle_cli.main", *args], check=True, stdout=subprocess.DEVNULL)


def model_folder(work: Path, name: str) -> Path:
    """The upcycled model of `name`, written once into WORK."""
    out = work / f"{name}-moe"
    if (out / "config.json").is_file():
        return out
    if name == "smollm2":
        upcycle("convert", "smollm2", str(out))
        return out
    layers = int(name.split("-")[1])
    dense = work / f"{name}-dense"
    if not (dense / "config.json").is_file():
        smol = model_folder(work, "smollm2")  # its tokenizer
        subprocess.run([sys.executable, "-c", MAKE_QWEN, str(dense), str(layers), str(smol)], check=True)
    upcycle("convert", str(dense), str(out), "--experts", "8", "--top-k", "2", "--every", "2")
    return out


MAKE_QWEN = r"""
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
out, layers, tok = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
    tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6, dtype="bfloat16")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(tok).save_pretrained(out)
"""


def estimate(model: Path, text: Path, cfg: Config) -> dict[str, Any]:
    from upcycle.train import loop
    from upcycle.train.spec import build_train_spec

    spec = build_train_spec(
        data=str(text),
        steps=2,
        seq_len=cfg.seq_len,
        micro_batch=cfg.micro_batch,
        train=cfg.train,
        optimizer=cfg.optimizer,
        grad_checkpointing=cfg.grad_checkpointing,
        lm_loss=cfg.lm_loss,
        eval_every=2,
        save_every=2,
    )
    plan = loop.train(str(model), None, spec, dry_run=True).plan
    return {"params_total": plan.params_total, "params_trainable": plan.params_trainable, **plan["memory"]}


def measure(model: Path, text: Path, cfg: Config, work: Path) -> dict[str, Any]:
    """Peak RSS of the real run (ru_maxrss from wait4), and from /proc/PID/status sampled every 0.2 s: the
    anonymous and file-backed parts at the sampled peak and what the run had printed last by then, and the sampled
    peak of each phase (load, step, save: phase_of), beside the estimate's peak of each."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))  # its own: a refused run removes nobody else's
    args = [sys.executable, "-m", "upcycle_cli.main", "train", str(model), "--data", str(text), "--out", str(run_dir)]
    args += ["--force", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--force-memory", *cfg.flags()]
    args += ["--log-every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # its lines as they are printed
    t0 = time.time()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    peak: dict[str, Any] = {"rss": 0}
    done = threading.Event()

    def read() -> None:  # the progress lines ("step 2/2 ...", "evaluating...", "saving...") go to stderr
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.time() - t0, line.strip()[:80]))

    phases: dict[str, dict[str, int]] = {}

    def sample() -> None:
        while not done.is_set():
            status = proc_status(proc.pid)
            now = {"rss": status.get("VmRSS", 0), "anon": status.get("RssAnon", 0), "file": status.get("RssFile", 0)}
            after = next((text for _, text in reversed(lines) if text), "(loading)")
            if now["rss"] > peak["rss"]:
                peak.update(now, at_s=round(time.time() - t0, 1), after=after)
            phase = phases.setdefault(phase_of(after), {"rss": 0})
            if now["rss"] > phase["rss"]:
                phase.update(now)
            time.sleep(0.2)

    threads = [threading.Thread(target=read), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    for t in threads:
        t.join()
    err = "\n".join(text for _, text in lines[-20:])
    shutil.rmtree(run_dir, ignore_errors=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cfg.name} failed:\n{err[-2000:]}")
    sampled = {f"sampled_{k}": v for k, v in peak.items()}
    return {"peak_rss": usage.ru_maxrss * 1024, "seconds": round(time.time() - t0, 1), **sampled,
            "sampled_phases": phases}  # fmt: skip


def phase_of(line: str) -> str:
    """The plan's phase a run is in after printing LINE last: load (nothing yet, or the plan), step (a step or an
    evaluation), save (a checkpoint or final/)."""
    if line.startswith("sav"):
        return "save"
    if line.startswith(("step", "evaluat")):
        return "step"
    return "load"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in bytes (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rows = [line.split() for line in f if line.startswith(("VmRSS:", "RssAnon:", "RssFile:"))]
    except OSError:
        return {}
    return {row[0].rstrip(":"): int(row[1]) * 1024 for row in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the models are written (and reused)")
    ap.add_argument("--text", type=Path, required=True, help="training text (a .txt file)")
    ap.add_argument("--only", nargs="*", help="configuration names to run, in this order (default: all)")
    ap.add_argument("--estimate-only", action="store_true", help="estimates of every configuration, no runs")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--margin", type=float, default=1.15, help="run only when estimate x MARGIN + 1 GiB is available")
    ap.add_argument("--headroom", type=float, default=3.0, help="... and estimate + HEADROOM GiB (a shared machine)")
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for that much memory before skipping")
    ap.add_argument("--measured", type=Path, nargs="*", default=[],
                    help="earlier results JSON: reuse their measurements (the newest of each configuration) with "
                         "the current estimates, no runs (after a change to the estimate only)")  # fmt: skip
    args = ap.parse_args()
    earlier = {}
    for path in args.measured:
        for old in json.loads(path.read_text())["rows"]:
            if "peak_rss" in old:
                earlier[old["config"]] = {k: v for k, v in old.items() if k not in ("config", "estimate", "ratio")}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    known = {c.name: c for c in MEASURED + ESTIMATED}
    if unknown := [n for n in args.only or [] if n not in known]:
        raise SystemExit(f"unknown configurations: {', '.join(unknown)}; known: {', '.join(known)}")
    configs = [known[n] for n in args.only] if args.only else MEASURED + ESTIMATED  # in the order given
    for cfg in configs:
        model = model_folder(args.work, cfg.model)
        est = estimate(model, args.text, cfg)
        row: dict[str, Any] = {"config": cfg.name, "estimate": est}
        need = max(est["total"] * args.margin + GiB, est["total"] + args.headroom * GiB)
        runs = not args.estimate_only and not args.measured and cfg in MEASURED
        free = wait_for(need, args.wait) if runs else ram_available()
        if args.measured:
            if cfg.name in earlier:
                row |= earlier[cfg.name]
                row["ratio"] = round(est["total"] / row["peak_rss"], 3)
        elif not args.estimate_only and cfg in MEASURED and need > free:  # other jobs share the machine
            row["skipped"] = f"{free / GiB:.1f} GiB available, {need / GiB:.1f} GiB wanted"
        elif not args.estimate_only and cfg in MEASURED:
            row["load_average_start"] = round(os.getloadavg()[0], 1)
            row |= measure(model, args.text, cfg, args.work)
            row["ratio"] = round(est["total"] / row["peak_rss"], 3)
            row["load_average"] = round(os.getloadavg()[0], 1)
            row["available_before"] = free
        rows.append(row)
        if args.out:  # after every row: a later run that fails keeps the earlier ones
            write(args.out, rows)
        measured = f"measured {row['peak_rss'] / GiB:.2f} GiB, ratio {row['ratio']}" if "peak_rss" in row else ""
        measured = f"skipped: {row['skipped']}" if "skipped" in row else measured
        print(
            f"{cfg.name:44s} {est['params_trainable'] / 1e6:8.1f}M of {est['params_total'] / 1e6:.1f}M trainable  "
            f"estimate {est['total'] / GiB:.2f} GiB ({est['phase']})  {measured}",
            flush=True,
        )


def wait_for(need: float, seconds: float) -> int:
    """The RAM available, once it is at least `need` or after `seconds` (polled every 10 s)."""
    deadline = time.time() + seconds
    while (free := ram_available()) < need and time.time() < deadline:
        time.sleep(10)
    return free


def ram_available() -> int:
    from upcycle.train.memory import available_memory

    return available_memory()[0]


def write(out: Path, rows: list[dict[str, Any]]) -> None:
    import torch
    import transformers

    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
