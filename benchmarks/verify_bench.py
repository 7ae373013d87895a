"""Benchmark `upcycle verify`: peak memory and time of whole against layerwise on a ~0.5B Qwen2-shaped model.

It writes (once) a random bf16 dense model with Qwen2.5-0.5B's shape (hidden 896, 24 layers, intermediate
4864, 14 heads, 2 KV heads, vocabulary 151936, tied embeddings, q/k/v biases), converts it to 8 experts
(`upcycle convert --experts 8`, Qwen2-MoE, bf16), then runs `upcycle verify DENSE MOE` once per (dtype, mode)
in a fresh child process and records

- wall s: the child's wall time;
- peak RSS: ru_maxrss of the child (os.wait4). It counts the pages of the memory-mapped safetensors files the
  child touched, which the kernel can drop at any time;
- peak anon: the largest RssAnon seen while polling /proc/<pid>/status every 20 ms: the memory that has to
  stay resident, and what MemAvailable must cover;
- estimate: what verify itself estimates a whole-model run needs (`whole_model_bytes`);
- the report: mode chosen, the note when auto switched, max |Δlogits|, pass/fail, bytes read by the tensor check.

    python benchmarks/verify_bench.py                        # every run below, then delete the models
    python benchmarks/verify_bench.py --runs bfloat16:whole,bfloat16:layerwise --keep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convert_bench import code_state, cpu_model, folder_bytes, machine, upcycle_command

HERE = Path(__file__).resolve().parent
GB = 1e9
MIB = 1 << 20
SHAPE = {  # Qwen2.5-0.5B
    "hidden": 896,
    "intermediate": 4864,
    "layers": 24,
    "heads": 14,
    "kv_heads": 2,
    "vocab": 151936,
}
# (dtype, mode[, UPCYCLE_MEMORY_LIMIT]): the default runs, in order.
RUNS = [
    "bfloat16:whole",
    "bfloat16:layerwise",
    "float32:whole",
    "float32:layerwise",
    "float32:auto:8GB",  # a machine with 8 GB free: auto must switch to layerwise
]


def tensors() -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    kv = SHAPE["kv_heads"] * h // SHAPE["heads"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(SHAPE["layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    return [*out, ("model.norm.weight", (h,))]  # tied: no lm_head tensor


def make_dense(folder: Path, shards: int = 3, seed: int = 0) -> Path:
    """A random bf16 Qwen2 checkpoint (config, shards, index), unless a complete one is there."""
    expected = sum(math.prod(s) for _, s in tensors()) * 2
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file() and json.loads(index_path.read_text())["metadata"]["total_size"] == expected:
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    Qwen2Config(
        vocab_size=SHAPE["vocab"],
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(tmp)
    gen = torch.Generator().manual_seed(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    offset = 0
    for name, dims in tensors():
        nbytes = math.prod(dims) * 2
        groups[min(shards - 1, (offset + nbytes // 2) * shards // expected)].append((name, dims))
        offset += nbytes
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        data = {}
        for name, dims in group:
            if name.endswith("norm.weight"):
                data[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                data[name] = (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(data, str(tmp / file), metadata={"format": "pt"})
        del data
    index = {"metadata": {"total_size": expected}, "weight_map": weight_map}
    index_path = tmp / "model.safetensors.index.json"
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# Runs in a fresh, small Python (-S): polls the child's RssAnon, then takes its rusage from os.wait4.
_MEASURE = """
import json, os, subprocess, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
peak = {"RssAnon": 0, "VmRSS": 0}
with open(log, "ab") as fh:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=fh, stderr=fh)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as st:
                for line in st:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "maxrss_kib": usage.ru_maxrss,
                  "peak_anon_kib": peak["RssAnon"], "returncode": os.waitstatus_to_exitcode(status)}))
"""


def measure(cmd: list[str], log: Path, env_extra: dict[str, str]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env_extra}
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(f"{k}={v}" for k, v in env_extra.items()) + " " + " ".join(cmd) + "\n").encode())
    done = subprocess.run(
        [sys.executable, "-S", "-c", _MEASURE, str(log), *cmd], env=env, capture_output=True, text=True, check=True
    )
    data = json.loads(done.stdout)
    return {
        "wall_s": data["wall_s"],
        "cpu_s": data["user_s"] + data["sys_s"],
        "peak_rss_mib": data["maxrss_kib"] * 1024 / MIB,
        "peak_anon_mib": data["peak_anon_kib"] * 1024 / MIB,
        "returncode": data["returncode"],
    }


def available_now() -> int:
    from upcycle.report.verify import available_memory

    saved = os.environ.pop("UPCYCLE_MEMORY_LIMIT", None)
    try:
        return available_memory()
    finally:
        if saved is not None:
            os.environ["UPCYCLE_MEMORY_LIMIT"] = saved


def estimate(dense: Path, moe: Path, dtype: str, tokens: int) -> int:
    from upcycle.report.verify import whole_model_bytes
    from upcycle.source import Checkpoint

    return whole_model_bytes(Checkpoint.open(dense), Checkpoint.open(moe), dtype, tokens, SHAPE["vocab"])


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| dtype | asked | MEMORY_LIMIT | ran as | exit | wall s | peak RSS MiB | peak anon MiB | whole estimate GB "
        "| available GB | max abs dlogits | passed |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        rep = r.get("report") or {}
        lines.append(
            f"| {r['dtype']} | {r['mode']} | {r['memory_limit'] or '-'} | {rep.get('mode', '-')} | {r['returncode']} "
            f"| {r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} | {r['estimate'] / GB:.2f} "
            f"| {r['available'] / GB:.1f} | {rep.get('max_abs_diff', float('nan')):.3g} | {rep.get('passed', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=HERE / "_work", help="work folder (dense model, MoE, logs)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated dtype:mode[:UPCYCLE_MEMORY_LIMIT]")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=SHAPE["layers"], help="decoder layers (24 as Qwen2.5-0.5B)")
    p.add_argument("--results", type=Path, default=None, help="JSON results file (default: benchmarks/results/…)")
    p.add_argument("--keep", action="store_true", help="keep the dense model and the MoE (about 6.5 GB)")
    args = p.parse_args(argv)
    runs = [r.split(":") for r in args.runs.split(",") if r.strip()]
    SHAPE["layers"] = args.layers
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    need = 7 * GB  # dense bf16 ~1 GB, MoE bf16 ~5.4 GB
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"{work} has less than {need / GB:.0f} GB free; pass --work on a larger disk")
    upcycle = upcycle_command(None)
    name = f"qwen2-h{SHAPE['hidden']}-l{SHAPE['layers']}"
    dense, moe, log = work / f"dense-{name}", work / f"moe-{name}-e8", work / "log-verify.txt"
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    make_dense(dense)
    print(f"dense: {folder_bytes(dense) / GB:.2f} GB ({time.perf_counter() - start:.0f}s)", flush=True)
    if not (moe / "upcycle.json").is_file():
        conv = measure([*upcycle, "convert", str(dense), str(moe), "--experts", "8", "--force"], log, {})
        if conv["returncode"]:
            raise SystemExit(f"upcycle convert failed; see {log}")
    recipe = json.loads((moe / "upcycle.json").read_text())["plan"]
    print(
        f"MoE: {recipe['total_params'] / 1e9:.2f}B params ({recipe['dense_params'] / 1e9:.3f}B dense), "
        f"{folder_bytes(moe) / GB:.2f} GB",
        flush=True,
    )
    code_before = code_state()
    rows = []
    for dtype, mode, *limit in runs:
        report_path = work / f"report-{dtype}-{mode}.json"
        report_path.unlink(missing_ok=True)
        env = {"UPCYCLE_MEMORY_LIMIT": limit[0]} if limit else {}
        flags = {"whole": ["--whole"], "layerwise": ["--layerwise"], "auto": []}[mode]
        cmd = [*upcycle, "verify", str(dense), str(moe), "--dtype", dtype, "--tokens", str(args.tokens)]
        avail = available_now()
        row = {
            "dtype": dtype,
            "mode": mode,
            "memory_limit": limit[0] if limit else None,
            "available": avail,
            "estimate": estimate(dense, moe, dtype, args.tokens),
        }
        row |= measure([*cmd, *flags, "--no-record", "--json", str(report_path)], log, env)
        row["report"] = json.loads(report_path.read_text()) if report_path.is_file() else None
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    code = code_state()
    code["changed_during_run"] = code["sources_sha256"] != code_before.get("sources_sha256")
    result = {
        "benchmark": "upcycle verify: whole vs layerwise",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(work),
        "upcycle_code": code,
        "shape": SHAPE,
        "plan": recipe,
        "tokens": args.tokens,
        "runs": rows,
    }
    slug = "".join(c if c.isalnum() else "-" for c in cpu_model().lower()).strip("-")
    path = args.results or HERE / "results" / f"verify_{slug}-{os.cpu_count()}c_{datetime.now(UTC):%Y%m}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + table(rows) + f"\n\nresults written to {path}; log: {log}")
    if not args.keep:
        shutil.rmtree(moe, ignore_errors=True)
        shutil.rmtree(dense, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
