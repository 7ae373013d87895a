"""Benchmark a training step: the dense parent against its upcycled MoE (8 experts, top-2, every layer).

For each model size it writes (once, then reuses) a random dense Llama with `save_pretrained`, converts it with
`upcycle convert` (upcycle.convert.pipeline.convert), and then, in a fresh child process per (model, experts
implementation), times forward + backward + gradient clipping + AdamW step on random token ids at the same shape and
batch for both models. Per run it records:

- tokens/s over the timed steps (after warm-up steps), and each step's time;
- peak memory: on GPU torch.cuda.max_memory_allocated; on CPU the child's peak RSS (VmHWM) above its RSS after a
  warm-up on a one-layer copy, less the file-backed RSS of the checkpoint that from_pretrained leaves mapped
  (reclaimable page cache), i.e. what the step itself needed, comparable with upcycle.train.memory's estimate;
- FLOPs per token = 6·N_active + 12·L·d_attn·S (torchtitan's count: N_active without the input embedding table,
  routed experts counted top_k/num_experts of their size; causal attention counted in full), and MFU = FLOPs/token ×
  tokens/s ÷ peak. The peak is the GPU's datasheet dense bf16/fp32 figure (--peak-tflops overrides it); on CPU there
  is no datasheet figure worth using, so the peak is *measured*: the best torch.mm rate at this dtype and thread count.

The MoE step includes the routing hooks of `upcycle train`: a RouterTap on every router and the balance and z
losses (coefficients 0.01 and 0.001) added to the LM loss, as the training loop does.

--rounds N runs every (model, implementation) N times, alternated, and reports medians with each round's ratios to
its own parent; --profile adds one step per run under torch.profiler (time by phase and by op category, the top
ops; GPU kernel time on CUDA), after the timed steps and the memory peaks.

    python benchmarks/train_throughput.py                                   # CPU: sizes cpu + tiny, fp32
    python benchmarks/train_throughput.py --threads 1 --sizes cpu --impls grouped_mm --rounds 5 --profile
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --sizes smollm2   # one H100
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MIB = 1 << 20

# Datasheet dense peaks in TFLOPS (no sparsity), by a substring of torch.cuda.get_device_name and the dtype.
GPU_PEAKS = {
    ("H100 PCIe", "bf16"): 756.0,
    ("H100", "bf16"): 989.4,  # SXM
    ("H200", "bf16"): 989.4,
    ("A100", "bf16"): 312.0,
    ("H100 PCIe", "fp32"): 51.0,
    ("H100", "fp32"): 67.0,
    ("H200", "fp32"): 67.0,
    ("A100", "fp32"): 19.5,
}


@dataclass(frozen=True)
class Size:
    """A Llama shape and the batch it is trained at."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    impls: tuple[str, ...]
    tied: bool = False
    family: str = "llama"  # the dense parent's model_type (qwen2 converts to qwen2_moe)
    store: str = "fp32"  # dtype the parent and its MoE are written in (bf16 halves the files of the GPU sizes)

    def config(self) -> dict[str, Any]:
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=max(self.seq, 2048),
            tie_word_embeddings=self.tied,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            bos_token_id=1,
            eos_token_id=2,
        )


SIZES = {
    # Runs in a minute or two per model on 2 CPU cores.
    "cpu": Size(hidden=512, ffn=1536, layers=8, heads=8, kv_heads=4, vocab=8192, seq=256, batch=4,
                impls=("eager", "grouped_mm")),
    # batched_mm copies a weight matrix per (token, expert): only at this size.
    "tiny": Size(hidden=128, ffn=384, layers=2, heads=4, kv_heads=2, vocab=2048, seq=128, batch=4,
                 impls=("eager", "grouped_mm", "batched_mm")),
    # SmolLM2-135M's shape (tied embeddings); for one H100 at bf16.
    "smollm2": Size(hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, vocab=49152, seq=2048, batch=16,
                    impls=("eager", "grouped_mm"), tied=True, store="bf16"),
    # Qwen2.5-0.5B's shape (tied embeddings, q/k/v biases); its MoE has 2.6B parameters. For one H100/H200.
    "qwen05": Size(hidden=896, ffn=4864, layers=24, heads=14, kv_heads=2, vocab=151936, seq=2048, batch=8,
                   impls=("eager", "grouped_mm"), tied=True, family="qwen2", store="bf16"),
}  # fmt: skip


# --- models ---------------------------------------------------------------------------------------------


def make_models(size: Size, work: Path) -> tuple[Path, Path]:
    """The dense parent (random, fp32) and its 8-expert top-2 MoE, written once under `work` and reused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec

    tag = f"h{size.hidden}-f{size.ffn}-l{size.layers}-v{size.vocab}{'-tied' if size.tied else ''}"
    tag = f"{size.family}-{tag}-{size.store}"
    dense, moe = work / f"dense-{tag}", work / f"moe8x2-{tag}"
    if not (dense / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(size.family, **size.config()))
        model.to(torch.bfloat16 if size.store == "bf16" else torch.float32).save_pretrained(dense)
    if not (moe / "config.json").is_file():
        convert(str(dense), moe, build_spec(experts=8, top_k=2), force=True)
    return dense, moe


def flops_per_token(config: dict[str, Any], seq: int) -> tuple[int, int, int]:
    """(FLOPs per token, N_active, total parameters) from the config: 6·N_active + 12·L·d_attn·S."""
    from upcycle.train.memory import model_shape

    s = model_shape(config)
    h = s.hidden
    attn = 2 * h * s.d_q + 2 * h * s.d_kv + 2 * h  # q, o, k, v projections and the two norms
    dense_ffn = 3 * h * s.dense_ffn
    moe_total = s.experts * (3 * h * s.expert_ffn + h) + 3 * h * s.shared_ffn
    moe_active = s.top_k * 3 * h * s.expert_ffn + s.experts * h + 3 * h * s.shared_ffn
    dense_layers = s.layers - s.moe_layers
    head = s.vocab * h + h  # lm_head (tied or not: the matmul happens either way) + final norm
    active = s.layers * attn + dense_layers * dense_ffn + s.moe_layers * moe_active + head
    total = s.root_params + s.layers * attn + dense_layers * dense_ffn + s.moe_layers * moe_total
    return 6 * active + 12 * s.layers * s.d_q * seq, active, total


# --- the child: one (model, implementation) run ---------------------------------------------------------


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def routing_hooks(model: Any) -> tuple[Any, Any]:
    """(RouterTap, router_losses) from upcycle.train for an MoE, so the step pays for our hooks and losses."""
    from upcycle.arch import target_for_model_type
    from upcycle.train.losses import router_losses
    from upcycle.train.routing_hooks import tap_model

    target = target_for_model_type(model.config.model_type)
    return tap_model(model, target), router_losses


# What a profiled step's time is spent on, by op name (first match wins); the rest is "other".
CATEGORIES = (
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_grouped_mm|_scaled_mm)$"),
    ("attention", r"scaled_dot_product|flash|efficient_attention|cudnn_attention"),
    ("optimizer", r"^aten::_fused_adamw|^aten::_fused_adam|^aten::_foreach_(add|addcmul|addcdiv|lerp|sqrt|div)"),
    ("clip (norm, scale)", r"^aten::(_foreach_norm|linalg_vector_norm|_foreach_mul_?)$"),
    ("routing (top-k, sort, gather, scatter)", r"^aten::(topk|sort|argsort|histc|bincount|cumsum|index|index_select|"
     r"index_add_?|index_put_?|_index_put_impl_|index_copy_?|gather|scatter|scatter_add_?|cat|stack|repeat_interleave)$"),
    ("softmax, loss", r"softmax|nll_loss|cross_entropy|logsumexp"),
    ("casts, copies", r"^aten::(copy_|_to_copy|clone|contiguous)$"),
    ("fills", r"^aten::(fill_|zero_|zeros|ones|full)$"),
    ("element-wise", r"^aten::(mul_?|add_?|sub_?|div_?|silu|silu_backward|sigmoid|pow|rsqrt|mean|neg|sum|where|exp|"
     r"clamp|clamp_min|threshold_backward|mul_backward|embedding_dense_backward|embedding)$"),
)  # fmt: skip
PHASES = ("forward", "losses", "backward", "clip", "optimizer")


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if re.search(pattern, name)), "other")


def profile_summary(prof: Any, on_gpu: bool, phases_ms: dict[str, float], top: int = 25) -> dict[str, Any]:
    """One profiled step: wall time per phase, self time (GPU kernels on CUDA, CPU elsewhere) per op category and the
    top ops, in ms. On CUDA a kernel counts for the aten op that launched it."""
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    time_of = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    by_cat: dict[str, float] = {}
    for e in ops:
        by_cat[category(e.key)] = by_cat.get(category(e.key), 0.0) + time_of(e) / 1e3
    ranked = sorted(ops, key=time_of, reverse=True)[:top]
    return {
        "clock": "GPU kernel time" if on_gpu else "CPU time",
        "phases_ms": phases_ms,
        "step_ms": sum(phases_ms.values()),
        "categories_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "top_ops": [
            {"op": e.key, "self_ms": time_of(e) / 1e3, "calls": e.count, "category": category(e.key)} for e in ranked
        ],
    }


def _as_upcycle_train(model: Any, job: dict[str, Any]) -> str:
    """The attention implementation upcycle train runs text with (no mask to build: upcycle/train/attention.py);
    the code under test may predate it (an A/B against an older commit), and then the model keeps its own."""
    try:
        from upcycle.train.attention import causal_attention_without_mask
    except ImportError:
        return str(model.config._attn_implementation)
    return causal_attention_without_mask(model, job["seq"])


def child(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(job["device"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if device.type == "cpu" and job.get("heap", "reuse") == "reuse":  # as upcycle train does on a CPU (heap.py)
        from upcycle.heap import keep_buffers_for_reuse

        keep_buffers_for_reuse()
    torch.manual_seed(0)
    # "mixed": fp32 weights and AdamW with a bf16 autocast (grouped_mm included), as `upcycle train --dtype bf16`
    # runs in one process (FSDP2's mixed-precision policy does the same under torchrun); "pure": the weights (and
    # so AdamW's moments) in bf16, for comparison
    pure_bf16 = job["dtype"] == "bf16" and job["precision"] == "pure"
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if pure_bf16 else torch.float32}
    if job["impl"] != "dense":
        kwargs["experts_implementation"] = job["impl"]
    if device.type == "cpu":  # imports and first-call allocations out of the measured peak
        small = AutoModelForCausalLM.from_pretrained(job["model"], num_hidden_layers=1, **kwargs)
        ids = torch.randint(0, 64, (1, 8))
        small(ids, labels=ids).loss.backward()
        torch.optim.AdamW(small.parameters()).step()
        del small
    base, base_file = _rss("VmRSS:"), _rss("RssFile:")
    model = AutoModelForCausalLM.from_pretrained(job["model"], **kwargs).to(device)
    model.train()
    # what transformers actually dispatches to (it may fall back silently), not what was asked for
    if job["impl"] != "dense":
        from upcycle.compat import experts_implementation

        impl_got = experts_implementation(model)
    else:
        impl_got = "dense"
    attention = _as_upcycle_train(model, job)
    tap, router_losses = routing_hooks(model) if job["impl"] != "dense" else (None, None)
    if job.get("grad_checkpointing"):  # as `upcycle train --grad-checkpointing`, after the hooks
        from upcycle import compat

        compat.enable_activation_checkpointing(model)
        if job.get("compile") and hasattr(compat, "trace_checkpointed_side_effects"):  # absent before e9d44e9
            compat.trace_checkpointed_side_effects()
    if job.get("compile"):  # as `upcycle train --compile`: after the hooks, before the optimizer
        model.compile(backend=job.get("compile_backend") or "inductor")
    fused = True  # as upcycle.train.optim.build_optimizer (CPU and CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (job["batch"], job["seq"]), generator=gen).to(device) for _ in range(4)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["dtype"] == "bf16" and not pure_bf16)
    if job["dtype"] == "bf16" and not pure_bf16:  # the experts follow autocast too, as in upcycle train
        from upcycle.compat import enable_grouped_mm_autocast

        result_autocast = enable_grouped_mm_autocast(device.type, torch.bfloat16)
    else:
        result_autocast = None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def lm_loss() -> contextlib.AbstractContextManager:  # as upcycle train --lm-loss (model.forward_context)
        if job.get("lm_loss", "model") == "model":
            return contextlib.nullcontext()
        from upcycle.train.lm_loss import chunk_tokens, lm_loss_in_chunks

        return lm_loss_in_chunks(model, chunk_tokens(vocab))

    def step(ids: torch.Tensor, mark: Callable[[str], None]) -> torch.Tensor:
        with autocast, lm_loss():
            out = model(ids, labels=ids, use_cache=False)  # as upcycle train: no KV cache to build
        mark("forward")
        loss = out.loss
        if tap is not None:  # --aux-loss-coef and --z-loss-coef defaults of upcycle train
            balance, z = router_losses(tap.pop())
            loss = loss + 0.01 * balance + 0.001 * z
        mark("losses")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mark("clip")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")
        return loss.detach()

    times, losses, first = [], [], []
    for i in range(job["warmup"] + job["steps"]):
        ids = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        loss = step(ids, lambda phase: None)
        sync()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        else:  # warm-up steps: with --compile the first holds the compilation
            first.append(time.perf_counter() - t0)
    result = {
        "experts_impl": impl_got,
        "attention_impl": attention,
        "step": "forward, backward, clip 1.0, AdamW" + (" + RouterTap, balance and z losses" if tap else ""),
        "step_s": times,
        "tokens_per_step": job["batch"] * job["seq"],
        "tokens_per_s": job["batch"] * job["seq"] * len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "loss_last": losses[-1],
        "params": sum(p.numel() for p in model.parameters()),
        "compile": bool(job.get("compile")),
        "grad_checkpointing": bool(job.get("grad_checkpointing")),
        "compile_backend": (job.get("compile_backend") or "inductor") if job.get("compile") else None,
        # where torch.compile had to split the model (0: one graph, the routers' hooks included)
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()) if job.get("compile") else None,
        "grouped_mm_autocast": result_autocast,
        "first_steps_s": first,
    }
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        result["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
        result["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        # from_pretrained leaves the safetensors file mapped: page cache, counted in RSS but reclaimable
        file_backed = _rss("RssFile:") - base_file
        result["peak_mib"] = (_rss("VmHWM:") - base - file_backed) / MIB
        result["peak_rss_mib"] = _rss("VmHWM:") / MIB
        result["file_backed_mib"] = file_backed / MIB
        result["peak_kind"] = "peak RSS above the warmed-up process, less the mapped checkpoint (file-backed RSS)"
    if job.get("profile"):  # one more step, after the peaks were read: the profiler holds memory of its own
        result["profile"] = profile_step(step, batches[0], device, sync)
    return result


def profile_step(step: Callable[..., Any], ids: Any, device: Any, sync: Callable[[], None]) -> dict[str, Any]:
    """Runs `step` once under torch.profiler, timing its phases (CUDA events on a GPU, the clock on a CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    marks: list[tuple[str, Any]] = []

    def mark(phase: str) -> None:
        if on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((phase, event))
        else:
            marks.append((phase, time.perf_counter()))

    sync()
    with profile(activities=activities) as prof:
        mark("start")
        step(ids, mark)
        sync()
    if on_gpu:
        phases = {b[0]: a[1].elapsed_time(b[1]) for a, b in itertools.pairwise(marks)}
    else:
        phases = {b[0]: (b[1] - a[1]) * 1e3 for a, b in itertools.pairwise(marks)}
    return profile_summary(prof, on_gpu, phases)


# --- the parent -----------------------------------------------------------------------------------------


def matmul_peak_tflops(device: str, dtype: str, threads: int | None, seconds: float = 3.0) -> float:
    """Best torch.mm rate seen (TFLOPS) for square matrices at this dtype: the CPU's measured peak."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for n in (1024, 2048, 4096) if device == "cpu" else (8192,):
        a = torch.randn(n, n, dtype=dt, device=device)
        b = torch.randn(n, n, dtype=dt, device=device)
        torch.mm(a, b)
        end = time.perf_counter() + seconds / 3
        while time.perf_counter() < end:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10 if device == "cuda" else 1):
                torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            dt_s = (time.perf_counter() - t0) / (10 if device == "cuda" else 1)
            best = max(best, 2 * n**3 / dt_s / 1e12)
    return best


def peak_for(device: str, dtype: str, threads: int | None, given: float | None) -> tuple[float, str]:
    if given:
        return given, f"--peak-tflops {given:g}"
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        for (part, dt), tflops in GPU_PEAKS.items():
            if part in name and dt == dtype:
                return tflops, f"datasheet dense {dtype} peak of {name}"
        measured = matmul_peak_tflops(device, dtype, threads)
        return measured, f"measured torch.mm peak on {name} (no datasheet entry)"
    measured = matmul_peak_tflops(device, dtype, threads)
    return measured, f"measured torch.mm {dtype} peak on this CPU, {threads or os.cpu_count()} threads"


def estimate_mib(
    config: dict[str, Any], size: Size, dtype: str, precision: str, device: str, params: int, lm_loss: str = "model"
) -> float:
    from upcycle.train.memory import estimate
    from upcycle.train.spec import TrainSpec

    spec = TrainSpec(seq_len=size.seq, micro_batch=size.batch, dtype=dtype, lm_loss=lm_loss)
    recipe = "fp32" if dtype == "fp32" else ("pure-bf16" if precision == "pure" else "mixed")
    est = estimate(
        config, spec, trainable_params=params, total_params=params, on_gpu=device == "cuda", precision=recipe
    )
    return (est.step_peak(False) - est.host) / MIB  # the step alone: the child measures above its runtime


FIT_SHARE = 0.92  # of the memory free at the start: what a step's plan may take (the child's runtime, fragmentation)


def fit_batch(
    size: Size,
    configs: list[dict[str, Any]],
    dtype: str,
    precision: str,
    device: str,
    budget: int,
    lm_losses: tuple[str, ...] = ("model",),
) -> tuple[Size, float]:
    """`size` at its own batch, halved until the step plan of every model in `configs` fits `budget` bytes
    (parent and MoE always run at one batch), and the largest plan in MiB. At batch 1 it is returned even if it
    does not fit: the caller refuses it then."""
    batch = size.batch
    while True:
        trial = replace(size, batch=batch)
        worst = max(
            estimate_mib(cfg, trial, dtype, precision, device, flops_per_token(cfg, size.seq)[2], lm)
            for cfg in configs
            for lm in lm_losses
        )
        if worst * MIB <= budget or batch == 1:
            return trial, worst
        batch //= 2


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if job["threads"]:
        env["OMP_NUM_THREADS"] = str(job["threads"])
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"child failed for {job['name']} / {job['impl']}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "os": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
        "versions": {name: _pkg(name) for name in ("torch", "transformers", "upcycle")},
    }
    info["versions"]["python"] = platform.python_version()
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "../upcycle"], capture_output=True)
    info["upcycle_commit"] = commit.stdout.strip() or None
    info["upcycle_dirty"] = bool(dirty.stdout.strip())
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def table(rows: list[dict[str, Any]], mfu_label: str) -> str:
    measured = any(r.get("mfu_measured_peak") for r in rows)
    head = (
        "| size | model | experts impl | params | active | tokens/step | tokens/s | × dense | peak MiB "
        f"| estimate MiB | GFLOPs/token | {mfu_label} |" + (" MFU (measured mm peak) |" if measured else "")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        model = r["model"] + (" (compiled)" if r.get("compile") else "")
        line = (
            f"| {r['size']} | {model} | {r['experts_impl']} | {r['params'] / 1e6:.1f}M | {r['active'] / 1e6:.1f}M "
            f"| {r['tokens_per_step']} | {r['tokens_per_s']:,.0f} | {r['vs_dense'] or 0:.2f} | {r['peak_mib']:,.0f} "
            f"| {r['estimate_mib']:,.0f} | {r['flops_per_token'] / 1e9:.3f} | {100 * r['mfu']:.1f}% |"
        )
        if measured:
            line += f" {100 * (r.get('mfu_measured_peak') or 0):.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """Medians over the rounds (contenders alternated within each): tokens/s, × the parent, × the FLOP ceiling."""
    lines = [
        "| size | model | experts impl | tokens/s by round | median | × dense (median of rounds) | × FLOP ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["model"], r["experts_impl"]), []).append(r)
    for (size, model, impl), rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs]
        vs = [r["vs_dense"] for r in rs if r.get("vs_dense") is not None]
        ceil = [r["vs_flop_ceiling"] for r in rs if r.get("vs_flop_ceiling") is not None]
        lines.append(
            f"| {size} | {model} | {impl} | {', '.join(f'{t:,.0f}' for t in tps)} | {statistics.median(tps):,.0f} "
            f"| {statistics.median(vs):.3f} | {statistics.median(ceil) if ceil else 1.0:.3f} |"
        )
    return "\n".join(lines)


def profile_table(rows: list[dict[str, Any]]) -> str:
    """The profiled step of each (size, model, implementation) by phase and by op category, in ms: medians over the
    rounds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("profile"):
            groups.setdefault(f"{r['size']} {r['model'].split()[0]} {r['experts_impl']}", []).append(r["profile"])
    if not groups:
        return "(no profile)"

    def med(profiles: list[dict[str, Any]], key: str, name: str) -> float:
        return statistics.median(p[key].get(name, 0.0) for p in profiles)

    rounds = max(len(ps) for ps in groups.values())
    lines = [
        "| ms" + (f" (median of {rounds} rounds)" if rounds > 1 else "") + " | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for phase in PHASES:
        lines.append(
            f"| phase: {phase} | " + " | ".join(f"{med(ps, 'phases_ms', phase):,.1f}" for ps in groups.values()) + " |"
        )
    steps = (statistics.median(p["step_ms"] for p in ps) for ps in groups.values())
    lines.append("| **step** | " + " | ".join(f"**{v:,.1f}**" for v in steps) + " |")
    clock = next(iter(groups.values()))[0]["clock"]
    cats = list(dict.fromkeys(c for ps in groups.values() for p in ps for c in p["categories_ms"]))
    for cat in cats:
        lines.append(
            f"| {clock}: {cat} | "
            + " | ".join(f"{med(ps, 'categories_ms', cat):,.1f}" for ps in groups.values())
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument(
        "--precision",
        choices=("pure", "mixed"),
        default="mixed",
        help="with bf16: fp32 weights and AdamW + autocast, as upcycle train (mixed), or all in bf16 (pure)",
    )
    p.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SIZES)} (default: cpu,tiny / smollm2)")
    p.add_argument("--impls", default=None, help="override every size's experts implementations (comma list)")
    p.add_argument("--batch", type=int, default=None, help="override the sizes' micro-batch (default: fitted)")
    fit_help = "plan against this many GiB instead of the device's free memory (GPU) or RAM available (CPU)"
    p.add_argument("--fit-gib", type=float, default=None, help=fit_help)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 4 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU against this peak instead")
    heap_help = "CPU: the step's buffers kept in the C heap, as upcycle train keeps them (reuse), or glibc's default"
    p.add_argument("--heap", choices=("reuse", "default"), default="reuse", help=heap_help)
    p.add_argument("--compile", action="store_true", help="torch.compile each model (as upcycle train --compile)")
    backend_help = "torch.compile backend (aot_eager: the same graphs without code generation, for dry runs)"
    p.add_argument("--compile-backend", default="inductor", help=backend_help)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward (as upcycle train)")
    lm_help = "comma list of upcycle train --lm-loss values, each a contender of its own (default: model)"
    p.add_argument("--lm-loss", default="model", help=lm_help)
    p.add_argument("--work", type=Path, default=HERE / "_work", help="where the models are written and reused")
    p.add_argument("--results", type=Path, default=None, help="JSON output (default: benchmarks/results/...)")
    p.add_argument("--tag", default=None, help="suffix of the default JSON name")
    p.add_argument(
        "--rounds", type=int, default=1, help="run every (model, implementation) this many times, alternated; medians"
    )
    p.add_argument(
        "--profile", action="store_true", help="after the timed steps, one step under torch.profiler: where it goes"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    on_gpu = args.device == "cuda"
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    sizes = (args.sizes or ("smollm2" if on_gpu else "cpu,tiny")).split(",")
    steps = args.steps or (20 if on_gpu else 4)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    peak, peak_label = peak_for(args.device, dtype, args.threads, args.peak_tflops)
    print(f"MFU peak: {peak:.3f} TFLOPS ({peak_label})", flush=True)
    # on a GPU also the rate this card really reaches (a large bf16 torch.mm): MFU against both
    measured_peak = matmul_peak_tflops(args.device, dtype, args.threads) if on_gpu else None
    if measured_peak:
        print(f"measured torch.mm {dtype} peak: {measured_peak:.1f} TFLOPS", flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or _cpu_model()).lower()).strip("-")
    where = f"{slug}-{os.cpu_count()}c" if not on_gpu else slug
    suffix = f"_{args.tag}" if args.tag else ""
    out = args.results or HERE / "results" / f"train_{where}_{dtype}_{datetime.now(UTC):%Y%m}{suffix}.json"
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []

    def save() -> None:  # after every run, so that a benchmark stopped part-way keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        precision = "fp32" if dtype == "fp32" else {
            "pure": "bf16 weights and AdamW moments",
            "mixed": "fp32 weights and AdamW, bf16 autocast (upcycle train, one process)",
        }[args.precision]  # fmt: skip
        record = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": args.device,
            "dtype": dtype,
            "precision": precision,
            "steps": steps,
            "warmup": warmup,
            "threads": args.threads,
            "peak_tflops": peak,
            "peak_label": peak_label,
            "measured_peak_tflops": measured_peak,
            "compile": args.compile,
            "grad_checkpointing": args.grad_checkpointing,
            "heap": args.heap if args.device == "cpu" else None,
            "memory_budget": None if args.batch else {"gib": budget / MIB / 1024, "of": budget_label},
            "flops_formula": "6*N_active + 12*L*d_attn*S (N_active without the input embedding)",
            "machine": info,
            "runs": rows,
            "failures": failures,
        }
        out.write_text(json.dumps(record, indent=1))

    from upcycle.train.memory import available_memory

    budget, budget_label = available_memory(args.fit_gib)
    budget = int(budget * (1 if args.fit_gib else FIT_SHARE))
    lm_losses = tuple(args.lm_loss.split(","))
    if unknown := set(lm_losses) - {"model", "chunked"}:
        raise SystemExit(f"error: --lm-loss {', '.join(sorted(unknown))}: use model and/or chunked")
    plan = []  # (size name, Size, model, folder, impl, LM loss) in the order of one round
    for name in sizes:
        size = SIZES[name]
        dense, moe = make_models(size, args.work)
        configs = [json.loads((f / "config.json").read_text()) for f in (dense, moe)]
        if args.batch:
            size = replace(size, batch=args.batch)
        else:  # the largest of batch, batch/2, ... whose plan fits this machine, for parent and MoE alike
            fitted, worst = fit_batch(size, configs, dtype, args.precision, args.device, budget, lm_losses)
            if fitted.batch != size.batch:
                print(f"{name}: batch {size.batch} -> {fitted.batch} to fit {budget / MIB / 1024:,.1f} GiB "
                      f"({budget_label})", flush=True)  # fmt: skip
            if worst * MIB > budget:
                why = f"the step plans {worst / 1024:,.1f} GiB at batch 1; {budget / MIB / 1024:,.1f} GiB fit"
                print(f"{name}: not run: {why}", flush=True)
                failures.append({"size": name, "model": "all", "impl": "all", "round": 0, "error": why})
                continue
            size = fitted
        impls = tuple(args.impls.split(",")) if args.impls else size.impls
        for lm in lm_losses:  # each LM loss: the parent, then its MoEs (× dense within the same LM loss)
            tag = "" if lm == "model" else f" ({lm} loss)"
            plan += [(name, size, "dense" + tag, dense, "dense", lm)]
            plan += [(name, size, "moe 8x top-2" + tag, moe, i, lm) for i in impls]
    dense_tps = dense_fpt = None  # the round's dense parent of the size being run
    for rnd, (name, size, model, folder, impl, lm) in ((r, p) for r in range(args.rounds) for p in plan):
        if impl == "dense":
            dense_tps = dense_fpt = None
        cfg = json.loads((folder / "config.json").read_text())
        job = dict(name=name, model=str(folder), impl=impl, device=args.device, dtype=dtype,
                   precision=args.precision, seq=size.seq, batch=size.batch, steps=steps, warmup=warmup,
                   threads=args.threads, compile=args.compile, heap=args.heap, profile=args.profile,
                   grad_checkpointing=args.grad_checkpointing, compile_backend=args.compile_backend,
                   lm_loss=lm)  # fmt: skip
        try:
            res = run_child(job)
        except SystemExit as exc:  # one failed run (out of memory, a kernel missing) leaves the others
            print(exc, flush=True)
            failures.append({"size": name, "model": model, "impl": impl, "round": rnd, "error": str(exc)[-2000:]})
            save()
            continue
        fpt, active, _ = flops_per_token(cfg, size.seq)
        if impl == "dense":
            dense_tps, dense_fpt = res["tokens_per_s"], fpt
        vs_dense = res["tokens_per_s"] / dense_tps if dense_tps else None
        row = {
            "size": name,
            "model": model,
            "round": rnd,
            **res,
            "shape": asdict(size),
            "active": active,
            "flops_per_token": fpt,
            "mfu": fpt * res["tokens_per_s"] / (peak * 1e12),
            "mfu_measured_peak": fpt * res["tokens_per_s"] / (measured_peak * 1e12) if measured_peak else None,
            "vs_dense": vs_dense,
            # the MoE's tokens/s against the parent's, over what equal MFU would give (parent's FLOPs/token over its)
            "vs_flop_ceiling": vs_dense / (dense_fpt / fpt) if vs_dense and dense_fpt else None,
            "lm_loss": lm,
            "estimate_mib": estimate_mib(cfg, size, dtype, args.precision, args.device, res["params"], lm),
        }
        rows.append(row)
        save()
        print(f"{name:8s} {model:13s} {res['experts_impl']:10s} {res['tokens_per_s']:10,.0f} tokens/s  "
              f"peak {res['peak_mib']:8,.0f} MiB (estimate {row['estimate_mib']:,.0f})"
              + (f"  round {rnd + 1}" if args.rounds > 1 else ""), flush=True)  # fmt: skip
    mfu_label = "MFU (vs measured mm peak)" if not on_gpu and not args.peak_tflops else "MFU"
    print()
    print(table(rows, mfu_label))
    if args.rounds > 1:
        print()
        print(rounds_table(rows))
    if args.profile:
        print()
        print(profile_table(rows))
    save()
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
