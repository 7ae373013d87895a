"""`upcycle train`: continued pretraining of an upcycled MoE, from MODEL + text to RUN_DIR/final.

One optimizer step: for each micro-batch the model's own forward gives the LM loss (labels = input ids;
`output_router_logits` is left off, so the model adds no aux loss of its own), RouterTap's hooks on the router
modules hand over each MoE layer's logits, and the balance and z-losses are computed from them in float32:
total = lm + α·balance + β·z. With --balance-scope global the expert counts f of the balance loss cover the
step's micro-batches seen so far on every rank (summed over ranks each micro-batch), as Qwen's global-batch
balancing does; with micro they cover the local micro-batch only.

The data order is a pure function of the step (BlockSampler), so a checkpoint needs only the step, the model,
optimizer and scheduler states and the RNG state to continue exactly where the run was.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..arch import Target, family_for, target_for_config
from ..compat import enable_activation_checkpointing, enable_grouped_mm_autocast, experts_implementation
from ..errors import UpcycleError
from ..source import SourceRef, cache_dir, read_config, resolve
from . import checkpoint as ckpt
from .data import prepare
from .distributed import (  # [train-dist] FSDP2 helpers
    DistEnv,
    all_reduce_sum,
    barrier,
    destroy,
    full_model_state,
    full_optimizer_state,
    grad_norm_value,
    init_distributed,
    load_full_optimizer_state,
    mixed_precision,
    sharding,
    wrap_model,
)
from .losses import dropped_fraction, expert_counts, load_stats, router_losses
from .metrics import Display, MetricsLog, truncate_metrics
from .optim import build_optimizer, build_scheduler, module_params, param_groups, set_trainable
from .routing_hooks import RouterTap, find_routers
from .routing_log import divergence_record, write_load_png
from .sampler import BlockSampler
from .spec import TrainSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

# Options recorded in the model card's training table (the rest are about how the run was operated).
CARD_OPTIONS = (
    "seq_len",
    "micro_batch",
    "grad_accum",
    "lr",
    "min_lr",
    "warmup",
    "weight_decay",
    "clip",
    "aux_loss_coef",
    "z_loss_coef",
    "balance_scope",
    "capacity_factor",
    "jitter",
    "router_noise",
    "train",
    "router_lr_scale",
    "dtype",
    "seed",
)
STOP_AFTER_NONFINITE = 3  # non-finite steps in a row that end the run


@dataclass
class TrainResult:
    plan: dict[str, Any]  # what the run is (also the whole answer of --dry-run)
    run_dir: Path | None = None
    final: Path | None = None
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    pushed: Any = None  # PushResult with --push-to-hub
    is_main: bool = True  # [train-dist] under torchrun only rank 0 reports


# --- the model ------------------------------------------------------------------------------------------


def moe_target(config: dict[str, Any], model: str) -> Target:
    """The native MoE target of a model's config; a dense model is refused with the command that converts it."""
    target = target_for_config(config)
    if target is not None:
        return target
    try:
        family_for(config.get("model_type"))
    except UpcycleError:
        raise UpcycleError(
            f"{model} is a {config.get('model_type')!r} model, which upcycle cannot train; give a folder or Hub id "
            "written by `upcycle convert`"
        ) from None
    raise UpcycleError(
        f"{model} is a dense {config.get('model_type')} model; convert it to an MoE first: "
        f"upcycle convert {model} MOE_DIR, then train MOE_DIR"
    )


def cap_seq_len(spec: TrainSpec, config: dict[str, Any]) -> tuple[TrainSpec, str | None]:
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and spec.seq_len > limit:
        note = f"--seq-len {spec.seq_len} is above the model's limit of {limit} positions; training with {limit}"
        return replace(spec, seq_len=limit), note
    return spec, None


def compute_dtype(spec: TrainSpec, device: torch.device) -> torch.dtype:
    import torch

    name = spec.dtype if spec.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def compute_context(env: DistEnv, spec: TrainSpec, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """What forward runs under. The weights and AdamW states are always float32 (master weights: a bf16 weight
    rounds away updates below ~0.4% of itself, so lr ~1e-4 would barely move it); with a bf16 compute dtype the
    matmuls run in bf16 through FSDP2's mixed-precision policy under torchrun on GPUs, else through autocast."""
    import torch

    if dtype == torch.float32 or mixed_precision(env, spec) is not None:
        return contextlib.nullcontext()
    enable_grouped_mm_autocast(env.device.type, dtype)
    return torch.autocast(env.device.type, dtype=dtype)


def use_deterministic_algorithms() -> None:
    """Kernels that give the same bits on every run (cuBLAS needs a fixed workspace, read when its handle is made,
    so this must run before the first matmul on the GPU). Ops with no deterministic kernel warn, not fail."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_model(folder: Path, dtype: torch.dtype, spec: TrainSpec, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    placement = {"device_map": str(device)} if device.type == "cuda" else {}  # straight onto the GPU
    try:
        with _quiet_zero_init():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, experts_implementation=spec.experts_impl, **placement
            )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise UpcycleError(f"transformers could not load {folder}: {exc}".splitlines()[0]) from None
    impl = experts_implementation(model)
    if device.type == "cuda" and impl == "eager" and spec.experts_impl != "eager":
        raise UpcycleError(
            f"the experts fell back to the eager per-expert loop (asked for {spec.experts_impl}), which is 4-11x "
            "slower on a GPU; install a torch with grouped_mm for this GPU, or pass --experts-impl eager to accept it"
        )
    return model.to(device)


@contextmanager
def _quiet_zero_init() -> Iterator[None]:
    """Qwen2-MoE's size-0 shared expert makes torch warn that initialising it does nothing; true, and noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


def moe_shape(config: dict[str, Any], target: Target) -> tuple[int, int, bool]:
    """(experts, top-k, renormalise kept weights) from the target's config fields."""
    experts = int(config[target.config["experts"]])
    top_k = int(config[target.config["top_k"]])
    renorm = target.renormalize == "always" or bool(config.get(target.renormalize))
    return experts, top_k, renorm


def attach_routing(model: nn.Module, target: Target, config: dict[str, Any], spec: TrainSpec):
    """RouterTap on every MoE layer's router; then --train decides what stays trainable."""
    routers = find_routers(model, target)
    experts, top_k, renorm = moe_shape(config, target)
    tap = RouterTap(
        routers,
        num_experts=experts,
        top_k=top_k,
        renormalize=renorm,
        capacity_factor=spec.capacity_factor,
        jitter=spec.jitter,
        noise=spec.router_noise,
        hidden_size=int(config["hidden_size"]),
        generator=None,  # the global RNG: saved in checkpoints and replayed by activation checkpointing
    )
    layers = sorted(routers)
    noise = list(tap.noise_modules.parameters())
    set_trainable(model, target, layers, spec.train, noise)
    return tap, layers


def count_params(model: nn.Module, extra: list[nn.Parameter]) -> tuple[int, int]:
    seen: dict[int, nn.Parameter] = {}
    for p in [*model.parameters(), *extra]:
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    return total, sum(p.numel() for p in seen.values() if p.requires_grad)


# --- names that may be published ------------------------------------------------------------------------


def public_name(value: str) -> str:
    """A data source or model as the card and upcycle.json may name it: a local path by its last part only."""
    path = Path(value).expanduser()
    return path.resolve().name if path.exists() else value


def training_command(model: str, run_dir: Path, spec: TrainSpec) -> str:
    defaults = TrainSpec()
    parts = ["upcycle", "train", public_name(model), "--out", Path(run_dir).name]
    for key, value in spec.to_dict().items():
        if value is None or value == getattr(defaults, key) or key in ("push_to_hub", "gpu_mem"):
            continue
        if key in ("data", "eval_data"):
            value = public_name(value)
        flag = f"--{key.replace('_', '-')}"
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


# --- the plan -------------------------------------------------------------------------------------------


def memory_plan(config: dict[str, Any], params: tuple[int, int], spec: TrainSpec, env: DistEnv) -> dict[str, Any]:
    """Memory per process (weights, gradients, AdamW states, activations with and without grad checkpointing) and
    whether it fits the GPU present, --gpu-mem, or on CPU the RAM available (upcycle/train/memory.py)."""
    from .memory import available_memory, estimate  # [train-dist]

    on_gpu = env.device.type == "cuda"
    est = estimate(
        config,
        spec,
        trainable_params=params[1],
        total_params=params[0],
        world_size=env.world_size,
        on_gpu=on_gpu,
        sharded=env.distributed,
    )
    available, what = available_memory(spec.gpu_mem)
    return est.to_dict() | {
        "available": available,
        "available_what": what,
        "fits": est.fits(available),
        "fits_with_checkpointing": est.fits(available, checkpointed=True),
    }


def make_plan(
    model_name: str,
    config: dict[str, Any],
    target: Target,
    layers: list[int],
    params: tuple[int, int],
    spec: TrainSpec,
    env: DistEnv,
    dtype: torch.dtype,
) -> dict[str, Any]:
    total = spec.total_steps(env.world_size)
    experts, top_k, _ = moe_shape(config, target)
    return {
        "model": public_name(model_name),
        "architecture": target.architecture,
        "moe_layers": layers,
        "layers": int(config.get("num_hidden_layers", 0)),
        "experts": experts,
        "top_k": top_k,
        "params_total": params[0],
        "params_trainable": params[1],
        "train": spec.train,
        "world_size": env.world_size,
        "sharding": sharding(env),
        "device": env.device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "experts_impl": spec.experts_impl,
        "seq_len": spec.seq_len,
        "micro_batch": spec.micro_batch,
        "grad_accum": spec.grad_accum,
        "tokens_per_step": spec.tokens_per_step(env.world_size),
        "steps": total,
        "tokens": total * spec.tokens_per_step(env.world_size),
        "lr": spec.lr,
        "min_lr": spec.final_lr(),
        "warmup": spec.warmup_steps(total),
        "eval_every": spec.every("eval_every", total),
        "save_every": spec.every("save_every", total),
        "memory": None,
    }


def _meta_model(folder: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"), _quiet_zero_init():
        return AutoModelForCausalLM.from_config(cfg)


# --- one step -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a step needs."""

    spec: TrainSpec
    env: DistEnv
    model: nn.Module
    tap: Any
    layers: list[int]
    experts: int
    target: Target
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[nn.Parameter]
    train_blocks: Any
    eval_blocks: Any
    sampler: Any
    compute: Any = contextlib.nullcontext  # () -> the context forward runs under (compute_context)


@dataclass
class StepResult:
    finite: bool
    reason: str | None
    loss: float
    lm: float
    balance: float
    z: float
    grad_norm: float
    counts: dict[int, torch.Tensor]  # (E,) routed assignments per expert over the step, all ranks
    dropped: dict[int, float]  # fraction of assignments dropped by the capacity limit
    lr: float  # the peak lr this step used (router groups use it times --router-lr-scale)


def train_step(run: Run, step: int) -> StepResult:
    """Forward and backward over the step's micro-batches, then one AdamW step (skipped if anything is not finite)."""
    import torch

    spec, env, model = run.spec, run.env, run.model
    device = env.device
    model.train()
    run.optimizer.zero_grad(set_to_none=True)
    counts = torch.zeros(len(run.layers), run.experts, device=device)  # (L, E) assignments over the step
    sums = torch.zeros(4 + len(run.layers), dtype=torch.float64, device=device)  # loss, lm, balance, z, dropped (L)
    for micro in range(spec.grad_accum):
        idx = run.sampler.indices(step - 1, micro)
        ids = run.train_blocks.blocks(idx).to(device)  # (micro_batch, seq_len)
        with run.compute():  # forward only: backward follows the dtypes autocast chose
            out = model(input_ids=ids, labels=ids, use_cache=False)
        records = run.tap.pop()
        local = torch.stack([expert_counts(records[layer], run.experts) for layer in run.layers]).to(counts)  # (L, E)
        if spec.balance_scope == "global":  # f over the step's micro-batches so far, on every rank: one all-reduce
            counts += all_reduce_sum(local, env)
            balance, z = router_losses(records, dict(zip(run.layers, counts, strict=True)))
        else:
            counts += local
            balance, z = router_losses(records, None)
        lm = out.loss.float()
        loss = lm + spec.aux_loss_coef * balance.float() + spec.z_loss_coef * z.float()
        (loss / spec.grad_accum).backward()
        run.tap.pop()  # activation checkpointing re-runs the routers in backward; those records are not ours
        with torch.no_grad():
            terms = torch.stack([loss.detach(), lm.detach(), balance.detach().float(), z.detach().float()])
            dropped = [dropped_fraction(records[layer]) for layer in run.layers]
            sums += torch.cat([terms.double(), torch.tensor(dropped, dtype=torch.float64, device=device)])
    if spec.balance_scope != "global":
        all_reduce_sum(counts, env)  # the logged load covers every rank either way
    sums = all_reduce_sum(sums, env) / (spec.grad_accum * env.world_size)
    loss_v, lm_v, bal_v, z_v = (float(x) for x in sums[:4])
    finite = all(math.isfinite(v) for v in (loss_v, lm_v, bal_v, z_v))
    reason = None if finite else f"loss is not finite ({loss_v})"
    grad_norm = float("nan")
    if finite:
        max_norm = spec.clip if spec.clip > 0 else float("inf")
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(run.params, max_norm))  # [train-dist] DTensor
        if not math.isfinite(grad_norm):
            finite, reason = False, f"gradient norm is not finite ({grad_norm})"
    group = run.optimizer.param_groups[0]
    lr = spec.lr * group["lr"] / group["initial_lr"]
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # the lr is a function of the step, also when a step was skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
        run.scheduler.step()
    dropped_v = {layer: float(v) for layer, v in zip(run.layers, sums[4:], strict=True)}
    per_layer = dict(zip(run.layers, counts, strict=True))
    return StepResult(finite, reason, loss_v, lm_v, bal_v, z_v, grad_norm, per_layer, dropped_v, lr)


def evaluate(run: Run) -> dict[str, Any] | None:
    """Mean LM loss over the held-out blocks (eval mode: no capacity, jitter or noise) and the expert load."""
    import torch

    blocks = run.eval_blocks
    if blocks is None or blocks.n_blocks == 0:
        return None
    spec, env, model = run.spec, run.env, run.model
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    n_pred = torch.zeros((), dtype=torch.float64, device=env.device)
    counts = {layer: torch.zeros(run.experts, device=env.device) for layer in run.layers}
    per_round = spec.micro_batch * env.world_size
    with torch.no_grad():
        for start in range(0, blocks.n_blocks, per_round):
            first = start + env.rank * spec.micro_batch
            idx = list(range(first, min(first + spec.micro_batch, blocks.n_blocks)))
            weight = 1.0 if idx else 0.0
            ids = blocks.blocks(idx or [0]).to(env.device)  # every rank runs the same number of forwards
            with run.compute():
                out = model(input_ids=ids, labels=ids, use_cache=False)
            predicted = ids.shape[0] * (ids.shape[1] - 1)
            loss_sum += out.loss.double() * predicted * weight
            n_pred += predicted * weight
            for layer, r in run.tap.pop().items():
                counts[layer] += expert_counts(r, run.experts).to(counts[layer].dtype) * weight
    model.train()
    all_reduce_sum(loss_sum, env)
    all_reduce_sum(n_pred, env)
    for layer in run.layers:
        all_reduce_sum(counts[layer], env)
    eval_loss = float(loss_sum / n_pred)
    return {
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if eval_loss < 700 else float("inf"),
        "eval_tokens": int(n_pred),
        "counts": counts,
    }


def layer_rows(counts: dict[int, torch.Tensor], dropped: dict[int, float] | None = None) -> list[dict[str, Any]]:
    rows = []
    for layer, c in sorted(counts.items()):
        stats = load_stats(c)
        row = {"layer": layer, "load": [float(x) for x in stats["load"]], "cv": float(stats["cv"])}
        row |= {"max": float(stats["max"]), "min": float(stats["min"])}
        if dropped is not None:
            row["dropped"] = dropped[layer]
        rows.append(row)
    return rows


# --- the run --------------------------------------------------------------------------------------------


def train(
    model: str,
    run_dir: Path | None,
    spec: TrainSpec,
    *,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    console: Any | None = None,
) -> TrainResult:
    """Train MODEL (an upcycled folder or Hub id) on spec.data into RUN_DIR; with dry_run, only plan it.

    `console` (a rich Console) receives notes and progress; None keeps the library silent."""
    env = init_distributed()
    finished = False
    try:
        result = _train(model, run_dir, spec, env, resume=resume, force=force, dry_run=dry_run, console=console)
        finished = True
        return result
    finally:
        if finished:  # every rank done with its collectives before any tears the process group down
            barrier(env)
        destroy(env)


def _train(model, run_dir, spec, env, *, resume, force, dry_run, console) -> TrainResult:
    import torch

    display = Display(console if env.is_main else None)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        display.note(text)

    if not dry_run and run_dir is None:
        raise UpcycleError("say where the run goes: --out RUN_DIR")
    if spec.experts_impl == "batched_mm":
        raise UpcycleError(
            "--experts-impl batched_mm copies every token's expert weights and is for inference only; "
            "train with grouped_mm (the default) or eager"
        )
    if spec.data is None:
        raise UpcycleError("say what to train on: --data FILE, FOLDER or DATASET")
    spec.total_steps(env.world_size)  # refuses a run that says neither --steps nor --tokens
    source = resolve(model)
    config = read_config(source.folder)
    target = moe_target(config, model)
    spec, capped = cap_seq_len(spec, config)
    total = spec.total_steps(env.world_size)  # with --tokens, the steps depend on the capped seq-len
    dtype = compute_dtype(spec, env.device)

    if dry_run:
        if capped:
            note(capped)
        meta = _meta_model(source.folder)
        tap, layers = attach_routing(meta, target, config, spec)
        params = count_params(meta, list(tap.noise_modules.parameters()))
        plan = make_plan(model, config, target, layers, params, spec, env, dtype)
        plan["memory"] = memory_plan(config, params, spec, env)
        tap.remove()
        return TrainResult(plan=plan, notes=notes, is_main=env.is_main)

    run_dir = Path(run_dir)
    resume_from = _check_run_dir(run_dir, resume=resume, force=force)
    if spec.push_to_hub:
        from ..publish.hub import require_token

        require_token()
    state = ckpt.load_training_state(resume_from) if resume_from else None
    if state is not None:
        ckpt.check_resumable(state.state["fixed"], ckpt.fixed_options(spec), resume_from)
        if state.state.get("world_size", 1) != env.world_size:
            raise UpcycleError(
                f"{resume_from} was written by {state.state.get('world_size', 1)} process(es) and this run has "
                f"{env.world_size}; the global batch and its data order would change. Resume with the same number"
            )
        if state.step >= total:
            raise UpcycleError(
                f"the run in {run_dir} already reached step {state.step}; pass a larger --steps to train further"
            )

    tokenizer = _tokenizer(source)
    train_blocks, eval_blocks, info = _data(spec, tokenizer, env)
    if capped:  # after every refusal, so that bad input gets one line
        note(capped)
    if state is not None and state.state.get("data_key") not in (None, info.key):
        raise UpcycleError(
            f"the text behind --data {spec.data} changed since {resume_from} was written; resume with the same "
            "data (or start a new run with --force)"
        )

    if env.distributed and spec.router_noise:  # [train-dist] noise weights live outside FSDP's shards
        raise UpcycleError("--router-noise is not supported under torchrun yet; train in one process or drop it")
    if spec.deterministic:
        use_deterministic_algorithms()
    # float32 weights (the master weights) whatever the compute dtype: see compute_context
    net = load_model(resume_from or source.folder, torch.float32, spec, env.device)
    impl = experts_implementation(net)
    torch.manual_seed(spec.seed)
    tap, layers = attach_routing(net, target, config, spec)
    noise = list(tap.noise_modules.parameters())
    params_count = count_params(net, noise)
    plan = make_plan(model, config, target, layers, params_count, spec, env, dtype)
    plan["experts_impl"] = impl
    if spec.grad_checkpointing:
        enable_activation_checkpointing(net)
    net = wrap_model(net, env, spec)
    if spec.compile:
        net.compile()
    routers = [*module_params(net, target.modules["router"], layers), *noise]
    groups = param_groups(net, routers, spec)
    optimizer = build_optimizer(groups, env.device)
    scheduler = build_scheduler(optimizer, spec, total)
    sampler = BlockSampler(
        train_blocks.n_blocks,
        micro_batch=spec.micro_batch,
        grad_accum=spec.grad_accum,
        world_size=env.world_size,
        rank=env.rank,
        seed=spec.seed,
    )
    run = Run(
        spec=spec,
        env=env,
        model=net,
        tap=tap,
        layers=layers,
        experts=plan["experts"],
        target=target,
        optimizer=optimizer,
        scheduler=scheduler,
        params=[p for g in groups for p in g["params"]],
        train_blocks=train_blocks,
        eval_blocks=eval_blocks,
        sampler=sampler,
        compute=lambda: compute_context(env, spec, dtype),
    )
    start = 0
    if state is not None:
        if env.distributed:  # [train-dist] saved by name as full tensors; each rank takes its shard
            load_full_optimizer_state(net, optimizer, state.optimizer, env, from_rank0=False)
        else:
            optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if noise:
            tap.noise_modules.load_state_dict({k.removeprefix("noise."): v for k, v in state.tensors.items()})
        start = state.step
    display.info(
        f"training {plan['architecture']} ({len(layers)} MoE layers, {plan['experts']} experts, top-{plan['top_k']}) "
        f"on {env.device.type} in {plan['dtype']}, experts implementation {impl}; "
        f"{params_count[1]:,} of {params_count[0]:,} parameters trainable; {total} steps of "
        f"{plan['tokens_per_step']:,} tokens" + (f"; resuming after step {start} ({resume_from.name})" if start else "")
    )
    if eval_blocks is None or eval_blocks.n_blocks == 0:
        note("no held-out blocks to evaluate on; give --eval-data or more text")

    summary = _loop(run, run_dir, model, source, tokenizer, info, plan, state, resume, force, display)
    summary["experts_implementation"] = impl
    final = run_dir / ckpt.FINAL
    result = TrainResult(plan=plan, run_dir=run_dir, final=final, summary=summary, notes=notes, is_main=env.is_main)
    if spec.push_to_hub and env.is_main:
        from ..publish.hub import push

        result.pushed = push(run_dir / ckpt.FINAL, spec.push_to_hub)
        summary["pushed"] = result.pushed.url
    return result


def _check_run_dir(run_dir: Path, *, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuse what would overwrite or cannot continue."""
    if resume and force:
        raise UpcycleError("--resume continues RUN_DIR and --force replaces it; pass one of them")
    if resume:
        if not run_dir.is_dir():
            raise UpcycleError(f"{run_dir} does not exist, so there is nothing to --resume; drop --resume to start")
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise UpcycleError(
                f"{run_dir} has no complete checkpoint to resume from; start again with --force (it replaces the run)"
            )
        return latest
    if run_dir.exists() and not force:
        raise UpcycleError(f"{run_dir} already exists; pass --resume to continue that run or --force to replace it")
    if not run_dir.parent.exists():
        raise UpcycleError(f"the folder {run_dir.parent} does not exist; create it first")
    return None


def _tokenizer(source: SourceRef):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UpcycleError(f"the model has no usable tokenizer to read the text with: {exc}".splitlines()[0]) from None


def _data(spec: TrainSpec, tokenizer, env: DistEnv):
    """Tokenise on rank 0 first; the other ranks then find the cache entry it wrote."""

    def run():
        return prepare(
            spec.data,
            tokenizer,
            spec.seq_len,
            text_field=spec.text_field,
            eval_data=spec.eval_data,
            eval_fraction=spec.eval_fraction,
            cache_dir=cache_dir() / "tokens",
            seed=spec.seed,
        )

    prepared = run() if env.is_main else None
    barrier(env)
    return prepared if prepared is not None else run()


def _loop(run: Run, run_dir, model_name, source, tokenizer, info, plan, state, resume, force, display) -> dict:
    import torch

    spec, env = run.spec, run.env
    total = plan["steps"]
    tokens_per_step = plan["tokens_per_step"]
    eval_every, save_every = plan["eval_every"], plan["save_every"]
    start = state.step if state is not None else 0
    saved_state = {
        "spec": spec.to_dict(),
        "fixed": ckpt.fixed_options(spec),
        "data_key": info.key,
        "world_size": env.world_size,
        "model": public_name(model_name),
        "upcycle": __version__,
    }
    last_train: dict[str, Any] | None = None
    last_eval: dict[str, Any] | None = None
    skipped: list[int] = []
    in_a_row = 0
    trained_tokens, train_time = 0, 0.0
    # [train-dist] rank 0 owns RUN_DIR; the other ranks start once it exists
    owner = ckpt.run_directory(run_dir, resume=resume, force=force) if env.is_main else contextlib.nullcontext()
    with owner as rd:
        barrier(env)
        if resume and env.is_main:
            truncate_metrics(run_dir, start)
        log = MetricsLog(run_dir, tensorboard=spec.tensorboard, start_step=start) if env.is_main else None
        display.start(start, total)
        if start == 0:
            _log_divergence(run, log, 0, display)  # the starting point: 1.0 for cloned experts
        if state is not None:
            ckpt.restore_rng(state.rng)  # last, so nothing above draws from the restored generators
        try:
            for step in range(start + 1, total + 1):
                t0 = time.perf_counter()
                result = train_step(run, step)
                elapsed = time.perf_counter() - t0
                base = {"step": step, "tokens": step * tokens_per_step}
                if not result.finite:
                    in_a_row += 1
                    skipped.append(step)
                    record = {"kind": "skip", **base, "reason": result.reason, "in_a_row": in_a_row}
                    if log:
                        log.write(record)
                    display.skip(record)
                    if in_a_row >= STOP_AFTER_NONFINITE:
                        newest = ckpt.latest_checkpoint(run_dir)
                        where = f"the newest checkpoint, {newest}, is intact" if newest else "no checkpoint was written"
                        raise UpcycleError(
                            f"the loss was not finite at {in_a_row} steps in a row (steps "
                            f"{', '.join(map(str, skipped[-in_a_row:]))}); stopped, {where}. Lower --lr or check the "
                            "data, then --resume"
                        )
                    continue
                in_a_row = 0
                trained_tokens += tokens_per_step
                train_time += elapsed
                record = {
                    "kind": "train",
                    **base,
                    "lr": result.lr,
                    "loss": result.loss,
                    "lm": result.lm,
                    "balance": result.balance,
                    "z": result.z,
                    "grad_norm": result.grad_norm,
                    "tokens_per_s": tokens_per_step / max(elapsed, 1e-9),
                    "layers": layer_rows(result.counts, result.dropped),
                }
                last_train = record
                logged = step % spec.log_every == 0 or step == total or step == start + 1
                if log and logged:
                    log.write(record)
                display.train(record, logged)
                if step % eval_every == 0 or step == total:
                    evaluated = evaluate(run)
                    if evaluated is not None:
                        last_eval = {"step": step, **evaluated}
                        eval_record = {"kind": "eval", "step": step, "tokens": base["tokens"]}
                        eval_record |= {k: v for k, v in evaluated.items() if k != "counts"}
                        eval_record["perplexity"] = _json_float(eval_record["perplexity"])
                        if log:
                            log.write(eval_record)
                        display.eval(eval_record)
                if step % save_every == 0 or step == total:
                    _save(run, run_dir, step, tokenizer, saved_state | {"tokens": step * tokens_per_step})
                    if rd is not None:
                        rd.checkpoint_written()
                    _log_divergence(run, log, step, display)
        finally:
            display.close()
            if log:
                log.close()
        final = None
        model_state = full_model_state(run.model, env) if env.distributed else None  # [train-dist] collective
        if not env.distributed:  # final/ in the compute dtype (bf16 halves it); checkpoints keep the fp32 masters
            run.model.to(getattr(torch, plan["dtype"]))
        if env.is_main:
            training = _training_record(run, model_name, run_dir, info, plan, last_eval)
            fallback = {"tool": {"name": "upcycle", "version": __version__}, "source": {"id": plan["model"]}}
            final = ckpt.write_final(
                run_dir,
                model=run.model,
                tokenizer=tokenizer,
                source_folder=source.folder,
                model_state=model_state,
                dtype=getattr(torch, plan["dtype"]),
                recipe_fields={"training": training, "name": Path(run_dir).name, "hub_repo": None},
                fallback_recipe=fallback,
            )
        barrier(env)
    # the expert load at the end: over the final evaluation, else over the last training step
    load = layer_rows(last_eval["counts"]) if last_eval else (last_train["layers"] if last_train else [])
    if env.is_main:
        _write_load_png(run_dir, load, plan, last_eval)
    return {
        "run_dir": str(run_dir),
        "final": str(final) if final else None,
        "steps": total,
        "resumed_from": start or None,
        "tokens": total * tokens_per_step,
        "tokens_trained_now": trained_tokens,
        "tokens_per_s": trained_tokens / train_time if train_time else None,
        "train_loss": last_train["loss"] if last_train else None,
        "lm": last_train["lm"] if last_train else None,
        "eval_loss": last_eval["eval_loss"] if last_eval else None,
        "perplexity": _json_float(last_eval["perplexity"]) if last_eval else None,
        "skipped_steps": skipped,
        "expert_load": _load_rows(load),
        "peak_gpu_memory_gib": _peak_gpu_memory(env),
    }


def _peak_gpu_memory(env) -> float | None:
    """torch.cuda.max_memory_allocated of this process in GiB (what --dry-run's memory plan estimates); None on CPU."""
    import torch

    if env.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(env.device) / (1 << 30)


def _load_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per MoE layer: CV, and the most and least loaded expert with their share of the routed assignments."""
    out = []
    for row in rows:
        shares = row["load"]
        most = max(range(len(shares)), key=shares.__getitem__)
        least = min(range(len(shares)), key=shares.__getitem__)
        out.append(
            {
                "layer": row["layer"],
                "cv": row["cv"],
                "max": shares[most],
                "min": shares[least],
                "most": most,
                "least": least,
            }
        )
    return out


def _log_divergence(run: Run, log: MetricsLog | None, step: int, display: Display) -> None:
    """A `divergence` record (mean pairwise cosine of each MoE layer's expert weights) at the start and each save.
    Under FSDP the experts are sharded across ranks, so it is skipped (once, with a note) rather than gathered."""
    if log is None:
        return
    if run.env.distributed:
        if step == 0:
            display.note(
                "expert divergence is not logged under torchrun; `upcycle routing RUN_DIR` reads it "
                "from the checkpoints"
            )
        return
    log.write(divergence_record(run.model, run.target, run.layers, step))


def _write_load_png(run_dir: Path, load: list[dict[str, Any]], plan: dict[str, Any], last_eval) -> None:
    what = (
        f"{last_eval['eval_tokens']:,} held-out tokens at step {last_eval['step']}"
        if last_eval
        else "the last training step"
    )
    write_load_png(run_dir, load, f"{what}, top-{plan['top_k']} of {plan['experts']} experts")


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _save(run: Run, run_dir: Path, step: int, tokenizer, state: dict[str, Any]) -> None:
    # [train-dist] under FSDP every rank joins the gathering of the full states; rank 0 writes them
    model_state = full_model_state(run.model, run.env) if run.env.distributed else None
    optimizer_state = full_optimizer_state(run.model, run.optimizer, run.env) if run.env.distributed else None
    if run.env.is_main:
        tensors = {f"noise.{k}": v for k, v in run.tap.noise_modules.state_dict().items()}
        ckpt.save_checkpoint(
            run_dir,
            step,
            model=run.model,
            tokenizer=tokenizer,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            state=state,
            tensors=tensors,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        ckpt.prune(run_dir, run.spec.keep_last)
    barrier(run.env)


def _training_record(run: Run, model_name, run_dir, info, plan, last_eval) -> dict[str, Any]:
    spec = run.spec
    recipe = {key: getattr(spec, key) for key in CARD_OPTIONS}
    recipe |= {"min_lr": plan["min_lr"], "warmup": plan["warmup"], "dtype": plan["dtype"]}
    recipe["world_size"] = plan["world_size"]
    recipe["experts_impl"] = plan["experts_impl"]
    datasets = [public_name(spec.data)] + ([public_name(spec.eval_data)] if spec.eval_data else [])
    record: dict[str, Any] = {
        "datasets": datasets,
        "steps": plan["steps"],
        "tokens": plan["tokens"],
        "seq_len": spec.seq_len,
        "recipe": recipe,
        "command": training_command(model_name, run_dir, spec),
    }
    if last_eval:
        record["final_eval"] = {"loss": last_eval["eval_loss"], "perplexity": _json_float(last_eval["perplexity"])}
        record["expert_load"] = [
            {k: row[k] for k in ("layer", "cv", "max", "min")} for row in layer_rows(last_eval["counts"])
        ]
    return record
