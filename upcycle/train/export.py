"""What a finished run leaves: final/ in the native format with its training record (upcycle.json and the model
card), load.png, and the summary that `upcycle train` prints (and writes with --json)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..options import command_line
from ..source import public_name
from . import checkpoint as ckpt
from .balance import slot_keys, sync_slots
from .distributed import full_model_state
from .evaluate import Evaluation, json_float
from .losses import LOSSES
from .metrics import layer_rows
from .model import save_dtype
from .routing_log import write_load_png
from .spec import TrainSpec

if TYPE_CHECKING:
    from .setup import Run


# card options that act on routers: a dense model's card leaves them out (it has none)
ROUTING_OPTIONS = {"balance_scope", "capacity_factor", "jitter", "router_noise", "router_lr_scale"}


def card_options() -> tuple[str, ...]:
    """Options recorded in the model card's training table (the rest are about how the run was operated); each
    router loss term's coefficient after "clip"."""
    return (
        "seq_len",
        "micro_batch",
        "grad_accum",
        "lr",
        "min_lr",
        "warmup",
        "weight_decay",
        "clip",
        *(term.coef for term in LOSSES.values()),
        "balance_scope",
        "balance",
        "balance_rate",
        "capacity_factor",
        "jitter",
        "router_noise",
        "train",
        "optimizer",
        "router_lr_scale",
        "dtype",
        "seed",
    )


def training_command(model: str, run_dir: Path, spec: TrainSpec) -> str:
    """The `upcycle train` command that reproduces the run: the options that differ from the defaults, with local
    paths by their last part only."""
    options = {k: v for k, v in spec.to_dict().items() if k not in ("push_to_hub", "gpu_mem", "force_memory")}
    for key in ("data", "eval_data"):
        if options.get(key) is not None:
            options[key] = public_name(options[key])
    words = ["upcycle", "train", public_name(model), "--out", Path(run_dir).name]
    return command_line(words, options, type(spec)().to_dict())


def write_final(run: Run, last_eval: Evaluation | None, bias: dict[str, Any] | None = None) -> Path | None:
    """final/ (rank 0 writes it; None on the other ranks): the model in --save-dtype, by default MODEL's own dtype
    (a bf16 MODEL gives a bf16 final/; checkpoints keep the fp32 masters), its tokenizer, and the recipe and card
    extended with the training record. bias: the `balance_bias` record of bias_export (--balance bias|both); the
    biases go into the target's slot, in float32, where it has one. Collective under FSDP: every rank joins the
    gathering of the full state."""
    env, plan = run.env, run.plan
    dtype = save_dtype(run.spec, run.source.ref.folder)
    model_state = full_model_state(run.model, env) if env.distributed else None
    if not env.distributed:
        run.model.to(dtype)
    if not env.is_main:
        return None
    written = sync_slots(run.tap, run.model, run.source.target, model_state)
    keep_fp32 = set(slot_keys(run.tap, run.source.target).values()) if written else set()
    fallback = {"tool": {"name": "upcycle", "version": __version__}, "source": {"id": plan.model}}
    return ckpt.write_final(
        run.run_dir,
        model=run.model,
        tokenizer=run.tokenizer,
        source_folder=run.source.ref.folder,
        model_state=model_state,
        dtype=dtype,
        keep_fp32=keep_fp32,
        recipe_fields={
            "training": training_record(run, last_eval) | ({"balance_bias": bias} if bias else {}),
            "name": run.run_dir.name,
            "hub_repo": None,
        },
        fallback_recipe=fallback,
    )


def training_record(run: Run, last_eval: Evaluation | None) -> dict[str, Any]:
    """The `training` section of final/upcycle.json, which the model card renders."""
    spec, plan = run.spec, run.plan
    routing = {term.coef for term in LOSSES.values()} | ROUTING_OPTIONS
    recipe = {key: getattr(spec, key) for key in card_options() if not (plan.dense and key in routing)}
    recipe |= {"min_lr": plan.min_lr, "warmup": plan.warmup, "dtype": plan.dtype}
    recipe["world_size"] = plan.world_size
    recipe["experts_impl"] = plan.experts_impl
    datasets = [public_name(spec.data)] + ([public_name(spec.eval_data)] if spec.eval_data else [])
    record: dict[str, Any] = {
        "datasets": datasets,
        "steps": plan.steps,
        "tokens": plan.tokens,
        "seq_len": spec.seq_len,
        "recipe": recipe,
        "command": training_command(run.source.name, run.run_dir, spec),
    }
    if last_eval:
        record["final_eval"] = {"loss": last_eval.eval_loss, "perplexity": json_float(last_eval.perplexity)}
    if last_eval and last_eval.counts:
        record["expert_load"] = [
            {k: row[k] for k in ("layer", "cv", "max", "min")} for row in layer_rows(last_eval.counts)
        ]
        record["expert_load_tokens"] = last_eval.load_tokens()
    return record


def write_load(run: Run, load: list[dict[str, Any]], last_eval: Evaluation | None) -> None:
    """RUN_DIR/load.png of the expert load at the end."""
    what = (
        f"{last_eval.eval_tokens:,} held-out tokens at step {last_eval.step}" if last_eval else "the last training step"
    )
    write_load_png(run.run_dir, load, f"{what}, top-{run.plan.top_k} of {run.plan.experts} experts")


def summary_load(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def peak_gpu_memory(run: Run) -> float | None:
    """torch.cuda.max_memory_allocated of this process in GiB (what --dry-run's memory plan estimates); None on CPU."""
    import torch

    if run.env.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(run.env.device) / (1 << 30)
