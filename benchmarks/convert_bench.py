"""Benchmark `upcycle convert`: wall time, peak RSS and throughput against `cp -r` of the same output.

For each model size it generates (once, then reuses) a random dense Llama checkpoint in bfloat16, written
straight with safetensors, no nn.Module. For each conversion configuration and each repeat it then

1. removes the previous output (not timed), runs `upcycle convert DENSE OUT ... --force` in a fresh child
   process and records its wall time, user/sys CPU time and peak RSS (from `os.wait4`, so the number
   belongs to that one child), then the time of a `sync` that flushes what it left dirty in the page cache;
2. runs `cp -r OUT COPY` on that output, the reference for "time to write these bytes", with its own
   `sync`, then removes the copy.

Results go to stdout as a markdown table and to a JSON file under benchmarks/results/.

    python benchmarks/convert_bench.py                      # 0.1B and 0.5B models, 2 configs, 2 repeats
    python benchmarks/convert_bench.py --models 0.5b --configs e8k2 --repeats 3 --keep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from published import public_path

HERE = Path(__file__).resolve().parent


GB = 1e9
MIB = 1 << 20


@dataclass(frozen=True)
class ModelShape:
    """A Llama shape. Parameters: embeddings + head + per layer (attention + 3 FFN matrices + 2 norms) + norm."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor name and shape, in the order the checkpoint stores them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensors())

    @property
    def ffn_params(self) -> int:
        return self.layers * 3 * self.hidden * self.intermediate


MODELS: dict[str, ModelShape] = {
    "0.1b": ModelShape(hidden=512, intermediate=2048, layers=16, heads=8, kv_heads=4),  # 96M
    "0.5b": ModelShape(hidden=1024, intermediate=4096, layers=28, heads=16, kv_heads=8),  # 506M
    "1b": ModelShape(hidden=2048, intermediate=8192, layers=16, heads=16, kv_heads=8),  # 1.14B
    # Few layers, a 1 GB embedding and head: the largest single tensors, for the casting path (e8k2-f32).
    "wide-vocab": ModelShape(hidden=2048, intermediate=2048, layers=2, heads=16, kv_heads=8, vocab=256000),  # 1.10B
}
CONFIGS: dict[str, list[str]] = {
    "e8k2": ["--experts", "8", "--top-k", "2"],  # every layer MoE -> Mixtral
    "e8k2-every2": ["--experts", "8", "--top-k", "2", "--every", "2"],  # every other layer -> Qwen2-MoE
    "e8k2-f32": ["--experts", "8", "--top-k", "2", "--dtype", "float32"],  # casts: the chunked read path
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- the dense model ------------------------------------------------------------------------------------


def make_dense(folder: Path, shape: ModelShape, shards: int, seed: int = 0) -> Path:
    """Write a random bf16 Llama checkpoint (config.json, N shards, index) unless a complete one is there."""
    index_path = folder / "model.safetensors.index.json"
    expected = sum(_numel(s) for _, s in shape.tensors()) * 2
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        files = set(index["weight_map"].values())
        if index["metadata"]["total_size"] == expected and all((folder / f).is_file() for f in files):
            return folder
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(tmp)

    # Cut the ordered tensors into `shards` files of about equal size (a tensor goes where its middle byte
    # falls); only one shard is held in memory at a time.
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    offset = 0
    for name, dims in shape.tensors():
        nbytes = _numel(dims) * 2
        groups[min(shards - 1, (offset + nbytes // 2) * shards // expected)].append((name, dims))
        offset += nbytes
    groups = [g for g in groups if g]
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {}
        for name, dims in group:
            if name.endswith("norm.weight"):
                data[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                data[name] = (torch.randn(dims, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(data, str(tmp / file), metadata={"format": "pt"})
        del data
    index = {"metadata": {"total_size": expected}, "weight_map": weight_map}
    (tmp / index_path.name).write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# --- measuring ------------------------------------------------------------------------------------------


@dataclass
class ChildRun:
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float
    returncode: int


# Runs in a fresh, small Python process: the kernel keeps a process's peak RSS across exec, so a child
# forked straight from this (torch-importing) process would report this process's peak as its own.
_MEASURE = """
import json, os, subprocess, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
with open(log, "ab") as fh:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
proc.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
                  "maxrss_kib": usage.ru_maxrss, "returncode": proc.returncode}))
"""


def run_child(cmd: list[str], log: Path) -> ChildRun:
    """Run cmd as a grandchild of a fresh small Python; its wall time and rusage (os.wait4, Linux units)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
    done = subprocess.run(
        [sys.executable, "-S", "-c", _MEASURE, str(log), *cmd], env=env, capture_output=True, text=True, check=True
    )
    data = json.loads(done.stdout)
    return ChildRun(
        wall_s=data["wall_s"],
        user_s=data["user_s"],
        sys_s=data["sys_s"],
        peak_rss_mib=data["maxrss_kib"] * 1024 / MIB,
        returncode=data["returncode"],
    )


def timed_sync() -> float:
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class Run:
    repeat: int
    bytes_written: int
    convert: ChildRun
    convert_sync_s: float
    cp: ChildRun
    cp_sync_s: float
    derived: dict[str, float] = field(default_factory=dict)

    def derive(self) -> None:
        conv_total = self.convert.wall_s + self.convert_sync_s
        cp_total = self.cp.wall_s + self.cp_sync_s
        self.derived = {
            "convert_gbps": self.bytes_written / GB / self.convert.wall_s,
            "convert_sync_gbps": self.bytes_written / GB / conv_total,
            "cp_gbps": self.bytes_written / GB / self.cp.wall_s,
            "ratio_convert_cp": self.convert.wall_s / self.cp.wall_s,
            "ratio_convert_cp_sync": conv_total / cp_total,
        }


def fail(what: str, run: ChildRun, log: Path) -> None:
    tail = log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"{what} failed with exit code {run.returncode}; log {log}:\n{tail}")


def bench_config(
    upcycle: list[str], dense: Path, work: Path, config: str, repeats: int, keep: bool
) -> tuple[list[Run], ChildRun]:
    name = f"{dense.name.removeprefix('dense-')}-{config}"
    out, copy, log = work / f"out-{name}", work / f"copy-{name}", work / f"log-{name}.txt"
    flags = CONFIGS[config]
    log.unlink(missing_ok=True)
    dry = run_child([*upcycle, "convert", str(dense), str(out), *flags, "--dry-run"], log)
    if dry.returncode:
        fail("upcycle convert --dry-run", dry, log)
    runs: list[Run] = []
    for repeat in range(1, repeats + 1):
        shutil.rmtree(out, ignore_errors=True)  # so the timed run does not also pay for deleting the old one
        shutil.rmtree(copy, ignore_errors=True)
        os.sync()
        conv = run_child([*upcycle, "convert", str(dense), str(out), *flags, "--force"], log)
        if conv.returncode:
            fail("upcycle convert", conv, log)
        conv_sync = timed_sync()
        nbytes = folder_bytes(out)
        cp = run_child(["cp", "-r", str(out), str(copy)], log)
        if cp.returncode:
            fail("cp -r", cp, log)
        cp_sync = timed_sync()
        shutil.rmtree(copy)
        run = Run(repeat, nbytes, conv, conv_sync, cp, cp_sync)
        run.derive()
        runs.append(run)
        print(
            f"  {config} run {repeat}: {nbytes / GB:.2f} GB, convert {conv.wall_s:.1f}s (+sync {conv_sync:.1f}s), "
            f"peak RSS {conv.peak_rss_mib:.0f} MiB, cp -r {cp.wall_s:.1f}s (+sync {cp_sync:.1f}s)",
            flush=True,
        )
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return runs, dry


# --- the machine ----------------------------------------------------------------------------------------


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def disk_of(path: Path) -> dict[str, Any]:
    """The file system holding `path` (from /proc/mounts) and its free space."""
    real, best = str(path.resolve()), ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    usage = shutil.disk_usage(path)
    rotational = None
    name = Path(best[0]).name
    rot = Path(f"/sys/block/{name}/queue/rotational")
    if rot.is_file():
        rotational = rot.read_text().strip() == "1"
    return {
        "device": best[0],
        "mount": best[1],
        "fstype": best[2],
        "rotational": rotational,
        "free_bytes": usage.free,
        "total_bytes": usage.total,
    }


def code_state() -> dict[str, Any]:
    """Which upcycle was measured: git commit, whether the tree is dirty, and a hash of the package sources."""
    import importlib.util

    spec = importlib.util.find_spec("upcycle")
    if spec is None or spec.origin is None:
        return {"found": False}
    pkg = Path(spec.origin).parent
    digest = hashlib.sha256()
    for folder in (pkg, pkg.parent / "cli"):
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix in (".py", ".json", ".md"):
                digest.update(str(file.relative_to(pkg.parent)).encode() + b"\0" + file.read_bytes() + b"\0")
    commit = _git(pkg.parent, "rev-parse", "HEAD")
    status = _git(pkg.parent, "status", "--porcelain", "--", "upcycle", "cli")
    return {
        "path": public_path(pkg),
        "sources_sha256": digest.hexdigest(),
        "git_commit": commit or None,
        "git_dirty": bool(status) if commit else None,
    }


def _git(repo: Path, *args: str) -> str | None:
    """stdout of a git command in repo, or None when git or the repository is missing."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine(work: Path) -> dict[str, Any]:
    cp = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "ram_bytes": ram_bytes(),
        "os": platform.platform(),
        "disk": disk_of(work),
        "versions": {
            "python": platform.python_version(),
            "torch": _pkg("torch"),
            "transformers": _pkg("transformers"),
            "safetensors": _pkg("safetensors"),
            "upcycle": _pkg("upcycle"),
            "cp": cp[0] if cp else "unknown",
        },
    }


# --- reporting ------------------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| model | config | run | output GB | convert s | +sync s | GB/s | peak RSS MiB | user+sys s "
        "| cp -r s | +sync s | convert/cp | convert/cp (+sync) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        for run in res["runs"]:
            c, d = run["convert"], run["derived"]
            lines.append(
                f"| {res['model']} | {res['config']} | {run['repeat']} | {run['bytes_written'] / GB:.2f} "
                f"| {c['wall_s']:.1f} | {run['convert_sync_s']:.1f} | {d['convert_gbps']:.2f} "
                f"| {c['peak_rss_mib']:.0f} | {c['user_s'] + c['sys_s']:.1f} | {run['cp']['wall_s']:.1f} "
                f"| {run['cp_sync_s']:.1f} | {d['ratio_convert_cp']:.2f} | {d['ratio_convert_cp_sync']:.2f} |"
            )
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, config): the best (smallest) times over the repeats, and the largest peak RSS."""
    rows = []
    for res in results:
        runs = res["runs"]
        conv = min(r["convert"]["wall_s"] for r in runs)
        conv_sync = min(r["convert"]["wall_s"] + r["convert_sync_s"] for r in runs)
        cp = min(r["cp"]["wall_s"] for r in runs)
        cp_sync = min(r["cp"]["wall_s"] + r["cp_sync_s"] for r in runs)
        rows.append(
            {
                "model": res["model"],
                "config": res["config"],
                "params": res["params"],
                "bytes_written": runs[0]["bytes_written"],
                "best_convert_s": conv,
                "best_convert_sync_s": conv_sync,
                "best_cp_s": cp,
                "best_cp_sync_s": cp_sync,
                "convert_gbps": runs[0]["bytes_written"] / GB / conv,
                "ratio_convert_cp": conv / cp,
                "ratio_convert_cp_sync": conv_sync / cp_sync,
                "max_peak_rss_mib": max(r["convert"]["peak_rss_mib"] for r in runs),
                "dry_run_s": res["dry_run"]["wall_s"],
                "dry_run_peak_rss_mib": res["dry_run"]["peak_rss_mib"],
            }
        )
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | params | config | output GB | convert s | convert+sync s | GB/s | peak RSS MiB | cp -r s "
        "| cp -r+sync s | convert/cp | convert/cp (+sync) | dry run s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.3f}B | {r['config']} | {r['bytes_written'] / GB:.2f} "
            f"| {r['best_convert_s']:.1f} | {r['best_convert_sync_s']:.1f} | {r['convert_gbps']:.2f} "
            f"| {r['max_peak_rss_mib']:.0f} | {r['best_cp_s']:.1f} | {r['best_cp_sync_s']:.1f} "
            f"| {r['ratio_convert_cp']:.2f} | {r['ratio_convert_cp_sync']:.2f} | {r['dry_run_s']:.1f} |"
        )
    return "\n".join(lines)


def default_results_path(tag: str | None) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "cpu"
    suffix = f"_{tag}" if tag else ""
    return HERE / "results" / f"convert_{slug}-{os.cpu_count()}c_{datetime.now(UTC):%Y%m}{suffix}.json"


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=HERE / "_work", help="work folder (dense models, outputs)")
    p.add_argument("--models", default="0.1b,0.5b", help=f"comma-separated sizes from: {', '.join(MODELS)}")
    p.add_argument("--configs", default="e8k2,e8k2-every2", help=f"comma-separated from: {', '.join(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=2, help="runs of each (model, config); all are reported")
    p.add_argument("--dense-shards", type=int, default=3, help="safetensors files the dense model is cut into")
    p.add_argument("--upcycle", default=None, help="the upcycle command (default: the one beside this python)")
    p.add_argument("--results", type=Path, default=None, help="JSON results file (default: benchmarks/results/…)")
    p.add_argument("--tag", default=None, help="suffix for the default results file name, e.g. cast")
    p.add_argument("--keep", action="store_true", help="keep the converted outputs")
    p.add_argument("--remove-dense", action="store_true", help="also remove the generated dense models")
    args = p.parse_args(argv)
    for key, table_ in (("models", MODELS), ("configs", CONFIGS)):
        items = [s.strip() for s in getattr(args, key).split(",") if s.strip()]
        bad = [s for s in items if s not in table_]
        if bad or not items:
            p.error(f"--{key}: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(table_)}")
        setattr(args, key, items)
    if args.repeats < 1:
        p.error("--repeats must be 1 or more")
    return args


def upcycle_command(given: str | None) -> list[str]:
    if given:
        return shlex.split(given)
    beside = Path(sys.executable).parent / "upcycle"
    found = str(beside) if beside.is_file() else shutil.which("upcycle")
    if not found:
        raise SystemExit("no `upcycle` command found; install the package or pass --upcycle")
    return [found]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    upcycle = upcycle_command(args.upcycle)
    # Output and its copy (f32 doubles them), plus every dense model (bf16), which are kept between models.
    scale = 2 if any("float32" in CONFIGS[c] for c in args.configs) else 1
    need = max(MODELS[m].ffn_params * 8 + MODELS[m].params for m in args.models) * 2 * 2 * scale
    need += sum(MODELS[m].params * 2 for m in args.models)
    free = shutil.disk_usage(work).free
    print(f"work folder {work}: {free / GB:.1f} GB free, this run needs up to about {need / GB:.1f} GB")
    if free < need * 1.1:
        raise SystemExit("not enough free space; pass --work on a larger disk or use smaller --models")

    code_before = code_state()
    results: list[dict[str, Any]] = []
    for model in args.models:
        shape = MODELS[model]
        start = time.perf_counter()
        dense = make_dense(work / f"dense-{model}", shape, args.dense_shards)
        gen_s = time.perf_counter() - start
        dense_bytes = folder_bytes(dense)
        print(f"{model}: {shape.params / 1e9:.3f}B params, {dense_bytes / GB:.2f} GB dense ({gen_s:.1f}s to prepare)")
        for config in args.configs:
            runs, dry = bench_config(upcycle, dense, work, config, args.repeats, args.keep)
            results.append(
                {
                    "model": model,
                    "shape": asdict(shape),
                    "params": shape.params,
                    "dense_bytes": dense_bytes,
                    "dense_prepare_s": gen_s,
                    "config": config,
                    "flags": CONFIGS[config],
                    "dry_run": asdict(dry),
                    "runs": [asdict(r) for r in runs],
                }
            )
        if args.remove_dense:
            shutil.rmtree(dense, ignore_errors=True)

    code = code_state()
    code["changed_during_run"] = code["sources_sha256"] != code_before.get("sources_sha256")
    report = {
        "benchmark": "upcycle convert vs cp -r",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(work),
        "upcycle_code": code,
        "work": public_path(work),
        "repeats": args.repeats,
        "notes": [
            "Each run starts with the previous output removed and os.sync(); the dense source is in the page "
            "cache for every run (it was just generated or read by the run before).",
            "convert s and cp -r s are the child's wall time; +sync s is a following os.sync(), which "
            "flushes what the child left dirty in the page cache.",
            "peak RSS is ru_maxrss of that one child (os.wait4 in a small helper process, so the benchmark's "
            "own memory is not inherited; the helper's ~11 MiB is, which is all cp -r shows).",
            "dry_run is `upcycle convert --dry-run`: imports, header reading and planning, no weights written.",
        ],
        "results": results,
        "summary": summary(results),
    }
    path = args.results or default_results_path(args.tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("\nEvery run:\n")
    print(table(results))
    print(f"\nBest of {args.repeats} (smallest times, largest peak RSS):\n")
    print(summary_table(report["summary"]))
    print(f"\nresults written to {path}")
    if code["changed_during_run"]:
        print("warning: the upcycle sources changed during the run; the runs measured different code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
