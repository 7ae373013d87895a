"""`upcycle train`: continued pretraining of an upcycled MoE, from MODEL + text to RUN_DIR/final.

train() reads top to bottom: setup.py makes a Run (the model with its router hooks, the data, the optimizer and
the TrainPlan), train_loop() below steps it (step.py: one optimizer step; evaluate.py; checkpoint.py), and
export.py writes final/ and the summary. The data order is a pure function of the step (sampler.py), so a
checkpoint needs only the step, the model, optimizer and scheduler states and the RNG state to continue exactly
where the run was.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..compat import attention_implementation
from ..errors import UpcycleError
from ..heap import give_back_free_memory
from . import checkpoint as ckpt
from .balance import bias_tensors, sync_slots
from .bias_export import bias_export
from .distributed import barrier, destroy, full_model_state, full_optimizer_state, init_distributed
from .evaluate import Evaluation, evaluate, json_float
from .export import peak_gpu_memory, summary_load, write_final, write_load
from .frozen import FROZEN, trainable_state
from .lock import run_lock
from .metrics import Display, MetricsLog, layer_rows, truncate_metrics
from .model import process_state
from .plan import TrainPlan, model_identity
from .routing_log import divergence_record
from .setup import Run, plan_only, read_source, setup
from .spec import TrainSpec
from .step import StepResult, train_step

if TYPE_CHECKING:
    from rich.console import Console

    from ..publish.hub import PushResult

STOP_AFTER_NONFINITE = 3  # non-finite steps in a row that end the run


@dataclass(frozen=True)
class TrainResult:
    plan: TrainPlan  # what the run is (also the whole answer of --dry-run); plan.to_dict() is its JSON
    run_dir: Path | None = None
    final: Path | None = None
    summary: dict[str, Any] | None = None  # what `upcycle train --json` writes
    notes: list[str] = field(default_factory=list)
    pushed: PushResult | None = None  # with --push-to-hub
    is_main: bool = True  # under torchrun only rank 0 reports


def train(
    model: str,
    run_dir: Path | None,
    spec: TrainSpec,
    *,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train MODEL (an upcycled folder or Hub id) on spec.data into RUN_DIR; with dry_run, only plan it.

    `console` (a rich Console) receives notes and progress; None keeps the library silent."""
    env = init_distributed()
    finished = False
    try:
        display = Display(console if env.is_main else None)
        notes: list[str] = []

        def note(text: str) -> None:
            notes.append(text)
            display.note(text)

        source = read_source(model, run_dir, spec, env, dry_run=dry_run)
        if dry_run:
            result = TrainResult(plan=plan_only(source, spec, env, note=note), notes=notes, is_main=env.is_main)
        else:
            # one process per RUN_DIR (rank 0 holds the lock for all ranks); the global RNG, --deterministic,
            # progress bars: put back at the end
            lock = run_lock(Path(run_dir), note) if env.is_main else contextlib.nullcontext()
            with lock, process_state(env):
                run = setup(source, Path(run_dir), spec, env, resume=resume, force=force, note=note)
                display.info(_announcement(run))
                display.info(run.data.describe(run.spec.text_field))
                if run.eval_blocks.n_blocks == 0:
                    note("no held-out blocks to evaluate on; give --eval-data or more text")
                result = _published(run, train_loop(run, display), notes)
        finished = True
        return result
    finally:
        if finished:  # every rank done with its collectives before any tears the process group down
            barrier(env)
        destroy(env)


# --- the loop ---------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the loop carries from step to step."""

    skipped: list[int] = field(default_factory=list)  # steps not taken (non-finite loss or gradient)
    in_a_row: int = 0  # skipped steps since the last one taken
    trained_tokens: int = 0  # by this process's run (not counting a resumed run's earlier part)
    train_time: float = 0.0  # seconds in train_step over those tokens
    last_train: dict[str, Any] | None = None  # the record of the last step taken
    last_step: StepResult | None = None  # and its result (the load at the end when there is no evaluation)
    last_eval: Evaluation | None = None


def train_loop(run: Run, display: Display) -> dict[str, Any]:
    """Step the run to plan.steps: train_step (micro-batches -> forward -> losses -> backward -> AdamW), then log,
    evaluate and save when due; final/ at the end. Returns the summary."""
    spec, env, plan = run.spec, run.env, run.plan
    progress = Progress()
    # rank 0 owns RUN_DIR (created, or moved aside with --force, only now); the other ranks start once it exists
    owner = (
        ckpt.run_directory(run.run_dir, resume=run.resume is not None, force=run.force)
        if env.is_main
        else contextlib.nullcontext()
    )
    with owner as rd:
        barrier(env)
        log = _open_log(run)
        display.start(run.start, plan.steps)
        if run.start == 0:
            _log_divergence(run, log, 0, display)  # the starting point: 1.0 for cloned experts
        if run.resume is not None:  # last, so nothing above draws from the restored generators
            ckpt.restore_rng(run.resume.rng)
            # a checkpoint written before the tap had generators of its own has none: they keep their seeds
            run.tap.set_rng_state(run.resume.rng.get("routing", run.tap.rng_state()))
        try:
            for step in range(run.start + 1, plan.steps + 1):
                t0 = time.perf_counter()
                result = train_step(run, step)
                elapsed = time.perf_counter() - t0
                tokens = step * plan.tokens_per_step
                if not result.finite:
                    _skip(run, progress, log, display, step, tokens, result.reason)
                    continue
                progress.in_a_row = 0
                progress.trained_tokens += plan.tokens_per_step
                progress.train_time += elapsed
                logged = step % spec.log_every == 0 or step == plan.steps or step == run.start + 1
                record = _train_record(step, tokens, result, plan.tokens_per_step / max(elapsed, 1e-9), logged)
                progress.last_train, progress.last_step = record, result
                if log and logged:
                    log.write(record)
                display.train(record, logged)
                if plan.eval_every and (step % plan.eval_every == 0 or step == plan.steps):  # 0: no evaluation
                    display.phase("evaluating")
                    progress.last_eval = _evaluate(run, log, display, step, tokens) or progress.last_eval
                if step % plan.save_every == 0 or step == plan.steps:
                    display.phase("saving")
                    _save(run, step, tokens)
                    if rd is not None:
                        rd.checkpoint_written()
                    _log_divergence(run, log, step, display)
        finally:
            display.close()
            if log:
                log.close()
        bias = bias_export(run, display.note)  # --balance bias|both: into the target's slot, or measured and dropped
        _give_back(run)
        final = write_final(run, progress.last_eval, bias)  # collective under FSDP; rank 0 writes
        barrier(env)
    return _summary(run, progress, final) | ({"balance_bias": bias} if bias is not None else {})


# --- what the loop does around a step ---------------------------------------------------------------------------


def _announcement(run: Run) -> str:
    plan, resume = run.plan, run.resume
    shape = (
        f"dense, {plan.layers} layers"
        if plan.dense
        else f"{len(plan.moe_layers)} MoE layers, {plan.experts} experts, top-{plan.top_k}"
    )
    return (
        f"training {plan.architecture} ({shape}) "
        f"on {plan.device} in {plan.dtype}, experts implementation {plan.experts_impl}; "
        f"{plan.params_trainable:,} of {plan.params_total:,} parameters trainable; {plan.steps} steps of "
        f"{plan.tokens_per_step:,} tokens"
        + (f"; resuming after step {resume.step} ({resume.folder.name})" if resume is not None else "")
    )


def _open_log(run: Run) -> MetricsLog | None:
    """RUN_DIR/metrics.jsonl on rank 0; a resumed run first forgets what was logged after its checkpoint."""
    if not run.env.is_main:
        return None
    if run.resume is not None:
        truncate_metrics(run.run_dir, run.start)
    return MetricsLog(run.run_dir, tensorboard=run.spec.tensorboard, start_step=run.start)


def _train_record(step: int, tokens: int, result: StepResult, tokens_per_s: float, logged: bool) -> dict[str, Any]:
    """The `train` record; the per-layer load rows (a host sync) only on steps that are logged."""
    record = {
        "kind": "train",
        "step": step,
        "tokens": tokens,
        "lr": result.lr,
        **result.terms,  # loss, lm, then each router loss term by name
        "grad_norm": result.grad_norm,
        "tokens_per_s": tokens_per_s,
    }
    if not logged or not result.counts:  # a dense model has no load to log
        return record
    return record | {"layers": layer_rows(result.counts, result.dropped)}


def _skip(
    run: Run, progress: Progress, log: MetricsLog | None, display: Display, step: int, tokens: int, reason: str | None
) -> None:
    """A step with a non-finite loss or gradient was not taken: log it; three in a row end the run."""
    progress.in_a_row += 1
    progress.skipped.append(step)
    record = {"kind": "skip", "step": step, "tokens": tokens, "reason": reason, "in_a_row": progress.in_a_row}
    if log:
        log.write(record)
    display.skip(record)
    if progress.in_a_row >= STOP_AFTER_NONFINITE:
        newest = ckpt.latest_checkpoint(run.run_dir)
        where = f"the newest checkpoint, {newest}, is intact" if newest else "no checkpoint was written"
        steps = ", ".join(map(str, progress.skipped[-progress.in_a_row :]))
        raise UpcycleError(
            f"the loss was not finite at {progress.in_a_row} steps in a row (steps {steps}); stopped, {where}. "
            "Lower --lr or check the data, then --resume"
        )


def _evaluate(run: Run, log: MetricsLog | None, display: Display, step: int, tokens: int) -> Evaluation | None:
    evaluated = evaluate(run, step)
    if evaluated is not None:
        record = evaluated.record(tokens)
        if log:
            log.write(record)
        display.eval(record)
    return evaluated


def _give_back(run: Run) -> None:
    """On a CPU, the heap's free pages back to the system before a save: the steps kept them (heap.py)."""
    if run.env.device.type == "cpu":
        give_back_free_memory()


def _save(run: Run, step: int, tokens: int) -> None:
    """checkpoints/step-N, then prune to --keep-last. Under FSDP every rank joins the gathering of the full states;
    rank 0 writes them."""
    env = run.env
    _give_back(run)
    model_state = full_model_state(run.model, env) if env.distributed else None
    optimizer_state = full_optimizer_state(run.model, run.optimizer, env) if env.distributed else None
    if env.is_main:
        sync_slots(run.tap, run.model, run.source.target, model_state)  # a target with a slot routes as the run
        state = {
            "spec": run.spec.to_dict(),
            "fixed": ckpt.fixed_options(run.spec),
            "data_key": run.data.key,
            "world_size": env.world_size,
            "model": run.plan.model,
            "source": model_identity(run.source.name),  # what --resume must name again
            "upcycle": __version__,
            "tokens": tokens,
        }
        trainable = None
        if run.trainable is not None:  # part of the model is frozen: store the trained tensors, reference the rest
            state[FROZEN] = {
                "source": state["source"],
                "sha256": run.source_sha256,
                "tensors": len(run.trainable),
            }
            trainable = trainable_state(run.model, run.trainable, model_state)
        ckpt.save_checkpoint(
            run.run_dir,
            step,
            model=run.model,
            tokenizer=run.tokenizer,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            state=state,
            tensors={f"noise.{k}": v for k, v in run.tap.noise_modules.state_dict().items()} | bias_tensors(run.tap),
            rng={"routing": run.tap.rng_state()},
            model_state=model_state,
            optimizer_state=optimizer_state,
            trainable=trainable,
        )
        ckpt.prune(run.run_dir, run.spec.keep_last)
    barrier(env)


def _log_divergence(run: Run, log: MetricsLog | None, step: int, display: Display) -> None:
    """A `divergence` record (mean pairwise cosine of each MoE layer's expert weights) at the start and each save.
    Under FSDP the experts are sharded across ranks, so it is skipped (once, with a note) rather than gathered."""
    if log is None or run.plan.dense:
        return
    if run.env.distributed:
        if step == 0:
            display.note(
                "expert divergence is not logged under torchrun; `upcycle routing RUN_DIR` reads it "
                "from the checkpoints"
            )
        return
    log.write(divergence_record(run.model, run.source.target, list(run.plan.moe_layers), step))


def _summary(run: Run, progress: Progress, final: Path | None) -> dict[str, Any]:
    """What `upcycle train` prints at the end; also load.png, of the expert load over the final evaluation, else
    over the last step taken."""
    plan, last_train, last_eval, last_step = run.plan, progress.last_train, progress.last_eval, progress.last_step
    load = layer_rows(last_eval.counts) if last_eval else (layer_rows(last_step.counts) if last_step else [])
    counted = last_eval.load_tokens() if last_eval else f"the {plan.tokens_per_step:,} training tokens of the last step"
    if run.env.is_main:
        write_load(run, load, last_eval)
    return {
        "run_dir": str(run.run_dir),
        "final": str(final) if final else None,
        "steps": plan.steps,
        "resumed_from": run.start or None,
        "tokens": plan.tokens,
        "tokens_trained_now": progress.trained_tokens,
        "tokens_per_s": progress.trained_tokens / progress.train_time if progress.train_time else None,
        "train_loss": last_train["loss"] if last_train else None,
        "lm": last_train["lm"] if last_train else None,
        "eval_loss": last_eval.eval_loss if last_eval else None,
        "perplexity": json_float(last_eval.perplexity) if last_eval else None,
        "loss_on": getattr(run.train_blocks, "loss_on", "all tokens"),  # "assistant tokens" for conversations
        "skipped_steps": progress.skipped,
        "documents": run.data.documents,  # of DATA, held-out ones included
        "skipped_rows": {"empty": run.data.skipped_empty, "without_text": run.data.skipped_bad},
        "expert_load": summary_load(load),
        "expert_load_tokens": counted if load else None,  # which tokens the load counts
        "peak_gpu_memory_gib": peak_gpu_memory(run),
        "experts_implementation": plan.experts_impl,
        "attention_implementation": attention_implementation(run.model),
    }


def _published(run: Run, summary: dict[str, Any], notes: list[str]) -> TrainResult:
    """The result of a run, after pushing final/ to the Hub with --push-to-hub (rank 0)."""
    pushed = None
    if run.spec.push_to_hub and run.env.is_main:
        from ..publish.hub import push

        pushed = push(run.run_dir / ckpt.FINAL, run.spec.push_to_hub)
        summary = summary | {"pushed": pushed.url}
    return TrainResult(
        plan=run.plan,
        run_dir=run.run_dir,
        final=run.run_dir / ckpt.FINAL,
        summary=summary,
        notes=notes,
        pushed=pushed,
        is_main=run.env.is_main,
    )
