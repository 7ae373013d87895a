"""Everything before the first step: the refusals, the model and its routing, the data, the optimizer and what a
resumed run continues from, gathered into one `Run` (with its `TrainPlan`) for the loop.

Order matters for the user: every refusal that needs no model (options, RUN_DIR, the checkpoint to resume) comes
before the text is tokenised, and the text before the model is loaded, so bad input fails fast with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arch import Target
from ..compat import enable_activation_checkpointing, experts_implementation, trace_checkpointed_side_effects
from ..errors import UpcycleError
from ..heap import give_back_free_memory, keep_buffers_for_reuse
from ..source import SourceRef, cache_dir, read_config, resolve
from . import checkpoint as ckpt
from . import frozen
from .attention import causal_attention_without_mask
from .balance import SLOT, add_slots, restore_biases
from .chat import ChatBlocks, ChatOptions, looks_like_chat, prepare_chat
from .data import DataInfo, TokenBlocks, prepare
from .distributed import DistEnv, barrier, load_full_optimizer_state, wrap_model
from .expert_dropout import add_expert_dropout
from .lm_loss import check_chunked
from .memory import available_memory
from .model import (
    attach_routing,
    cap_seq_len,
    clone_warning,
    compute_dtype,
    count_params,
    footprint,
    forward_context,
    load_model,
    moe_target,
    use_deterministic_algorithms,
)
from .optim import build_optimizer, build_scheduler, check_optimizer, module_params, param_groups
from .plan import Footprint, TrainPlan, make_plan, memory_plan, model_identity
from .routing_hooks import RouterTap
from .sampler import BlockSampler
from .spec import TrainSpec

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

Note = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """MODEL as read before anything is loaded."""

    name: str  # as the user gave it
    ref: SourceRef
    config: dict[str, Any]
    target: Target | None  # None: a dense model, trained as it is


@dataclass(frozen=True)
class Run:
    """Everything the loop, a step, an evaluation and the export need; made by setup()."""

    spec: TrainSpec  # with --seq-len capped at the model's limit
    env: DistEnv
    plan: TrainPlan
    source: Source
    run_dir: Path
    force: bool  # --force: a new run replaces RUN_DIR
    resume: ckpt.TrainingState | None  # the checkpoint a resumed run continues from
    model: nn.Module  # float32 masters; FSDP2-sharded under torchrun
    tap: RouterTap
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]  # what the optimizer updates (gradient clipping covers these)
    trainable: list[str] | None  # names of the trainable parameters when part of the model is frozen, else None
    source_sha256: str | None  # of MODEL's weight files, when checkpoints take the frozen part from it (frozen.py)
    tokenizer: PreTrainedTokenizerBase
    data: DataInfo
    train_blocks: TokenBlocks | ChatBlocks  # ChatBlocks: conversations (--format chat), the loss on the answers
    eval_blocks: TokenBlocks | ChatBlocks
    sampler: BlockSampler
    compute: Callable[[], AbstractContextManager]  # the context forward runs under (model.forward_context)

    @property
    def start(self) -> int:
        """The last step already taken: 0 for a new run, the checkpoint's step for a resumed one."""
        return self.resume.step if self.resume is not None else 0


def read_source(model: str, run_dir: Path | None, spec: TrainSpec, env: DistEnv, *, dry_run: bool) -> Source:
    """MODEL's config and target, after the refusals that need nothing but the options."""
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
    ref = resolve(model)
    config = read_config(ref.folder)
    target = moe_target(config, model)
    if spec.lm_loss == "chunked":
        check_chunked(config)
    if target is None:
        _check_dense_options(spec, model, config)
    elif spec.selection_bias and spec.bias_export == "refuse" and SLOT not in target.modules:
        raise UpcycleError(
            f"--balance {spec.balance} trains a routing bias that {target.architecture} has no place for, so "
            "final/ would route without it, and --bias-export is refuse; use --bias-export drop (the export then "
            "says how much the routing changes) or --balance aux"
        )
    return Source(model, ref, config, target)


def _check_dense_options(spec: TrainSpec, model: str, config: dict[str, Any]) -> None:
    """A dense model has no routers or experts: refuse the options that act on them rather than ignore them."""
    routing = {
        "--train": spec.train != "all",
        "--capacity-factor": spec.capacity_factor is not None,
        "--jitter": spec.jitter > 0,
        "--router-noise": spec.router_noise,
        "--expert-dropout": spec.expert_dropout > 0,
        "--balance": spec.balance != "aux",
    }
    given = [flag for flag, set_ in routing.items() if set_]
    if given:
        raise UpcycleError(
            f"{model} is a dense {config.get('model_type')} model (no routers or experts), so {', '.join(given)} "
            "cannot apply; drop them, or convert it first: upcycle convert MODEL MOE_DIR"
        )


def plan_only(source: Source, spec: TrainSpec, env: DistEnv, *, note: Note) -> TrainPlan:
    """--dry-run: the plan from a meta-device model (no weight is read) with the memory estimate."""
    spec, capped = cap_seq_len(spec, source.config)
    if capped:
        note(capped)
    fp, layers = footprint(source.ref.folder, source.target, source.config, spec)
    dtype = compute_dtype(spec, env.device)
    plan = make_plan(
        source.name,
        source.config,
        source.target,
        spec,
        env,
        layers=layers,
        params=fp.params[spec.train],
        dtype=dtype,
        experts_impl=spec.experts_impl if source.target is not None else "none (dense)",
        available=available_memory(spec.gpu_mem),
        dry_run=True,
        footprint=fp,
    )
    if plan.memory is not None and not plan.memory.fits:
        note(f"does not fit, so a run would be refused: {plan.memory.refusal()}")
    return plan


def setup(
    source: Source, run_dir: Path, spec: TrainSpec, env: DistEnv, *, resume: bool, force: bool, note: Note
) -> Run:
    """Check RUN_DIR and the checkpoint to resume, tokenise the data, load and wrap the model, build the optimizer
    and restore its state: a Run whose first step is `run.start + 1`. A --seq-len above the model's limit is capped,
    and `note` says so once the refusals are behind."""
    import torch

    spec, capped = cap_seq_len(spec, source.config)
    total = spec.total_steps(env.world_size)  # with --tokens, the steps depend on the capped seq-len
    state = _checkpoint_to_resume(run_dir, spec, env, total, resume=resume, force=force, note=note)
    check_optimizer(spec.optimizer, env.distributed)  # before the data and the model: a missing package is exit 3
    if state is not None:
        _check_same_model(state, source)
    # checkpoints of a run with frozen parameters hold the trained ones only: the rest is MODEL's, hashed once here
    sha256 = frozen.source_sha256(source.ref.folder) if spec.train != "all" else None
    saved_frozen = state.state.get(frozen.FROZEN) if state is not None else None
    if saved_frozen is not None and sha256 is not None:
        frozen.check_source(saved_frozen, sha256, source.name, state.folder)
    # a whole-model checkpoint is loaded as it is; one with the trained tensors only goes over MODEL once loaded
    load_from = state.folder if state is not None and saved_frozen is None else source.ref.folder
    tokenizer = _tokenizer(source.ref)
    train_blocks, eval_blocks, info = _data(spec, tokenizer, env)
    if capped:  # after every refusal, so that bad input gets one line
        note(capped)
    if isinstance(train_blocks, ChatBlocks) and train_blocks.left_out:
        note(
            f"{train_blocks.left_out} conversation(s) left out: even their first answer is longer than --seq-len "
            f"{spec.seq_len}"
        )
    _check_after_reading(state, spec, env, info)
    if state is not None:
        for changed in ckpt.curve_changes(state.state.get("spec", {}), spec.to_dict()):
            note(changed)
    if spec.deterministic:
        use_deterministic_algorithms()
    dtype = compute_dtype(spec, env.device)
    available = available_memory(spec.gpu_mem, env.device.index or 0)  # before the model takes its share
    fp = _check_memory(source, load_from, spec, env, available, note)
    # float32 weights (the master weights) whatever the compute dtype: see model.compute_context
    dense = source.target is None
    net = load_model(load_from, torch.float32, spec, env.device, dense=dense)
    impl = "none (dense)" if dense else experts_implementation(net)
    if isinstance(train_blocks, TokenBlocks):  # unpacked, unpadded blocks: no mask to build (attention.py)
        causal_attention_without_mask(net, spec.seq_len)
    torch.manual_seed(spec.seed)  # the global RNG, for whatever in the model draws from it (dropout)
    tap = attach_routing(net, source.target, source.config, spec)
    if source.target is not None:
        add_expert_dropout(net, source.target, tap.layers, spec.expert_dropout)
        add_slots(net, source.target, tap)  # --balance bias|both: where the model keeps the bias, and where it starts
    trainable = frozen.trainable_names(net) if sha256 is not None else None
    if saved_frozen is not None and trainable is not None:
        frozen.load_trainable(net, state.folder, trainable)
    noise = list(tap.noise_modules.parameters())
    params = count_params(net, noise)
    plan = make_plan(
        source.name,
        source.config,
        source.target,
        spec,
        env,
        layers=tap.layers,
        params=params,
        dtype=dtype,
        experts_impl=impl,
        available=available,
        dry_run=False,
        footprint=fp,
    )
    if state is None and (warning := clone_warning(net, source.target, source.config, spec, tap.layers)):
        note(warning)
    if spec.grad_checkpointing:
        enable_activation_checkpointing(net)
        if spec.compile:  # one graph: the layers' forward side effects are not replayed in the recompute
            trace_checkpointed_side_effects()
    net = wrap_model(net, env, spec)
    if spec.compile:
        net.compile()
    router_modules = source.target.modules["router"] if source.target is not None else ""
    routers = [*module_params(net, router_modules, tap.layers), *noise]
    groups = param_groups(net, routers, spec)
    optimizer = build_optimizer(groups, env.device, spec.optimizer)
    scheduler = build_scheduler(optimizer, spec, total)
    if state is not None:
        _restore(state, net, optimizer, scheduler, tap, env)
    if env.device.type == "cpu":  # from here each step's buffers stay in the heap for the next (heap.py); what
        give_back_free_memory()  # loading and restoring freed goes back first (their buffers are not reused)
        keep_buffers_for_reuse()
    return Run(
        spec=spec,
        env=env,
        plan=plan,
        source=source,
        run_dir=run_dir,
        force=force,
        resume=state,
        model=net,
        tap=tap,
        optimizer=optimizer,
        scheduler=scheduler,
        params=[p for g in groups for p in g["params"]],
        trainable=trainable,
        source_sha256=sha256,
        tokenizer=tokenizer,
        data=info,
        train_blocks=train_blocks,
        eval_blocks=eval_blocks,
        sampler=BlockSampler(
            train_blocks.n_blocks,
            micro_batch=spec.micro_batch,
            grad_accum=spec.grad_accum,
            world_size=env.world_size,
            rank=env.rank,
            seed=spec.seed,
        ),
        compute=lambda: forward_context(net, env, spec, dtype),
    )


def _check_memory(
    source: Source, folder: Path, spec: TrainSpec, env: DistEnv, available: tuple[int, str], note: Note
) -> Footprint:
    """Refuse, before the model is loaded, a run whose estimated peak does not fit the memory available, naming
    the options that would make it fit (--force-memory starts it anyway, with a note)."""
    fp, _ = footprint(folder, source.target, source.config, spec)
    memory = memory_plan(source.config, fp.params[spec.train], spec, env, available, footprint=fp)
    if not memory.fits:
        if not spec.force_memory:
            raise UpcycleError(memory.refusal())
        note(f"{memory.refusal().split('; ')[0]}; starting anyway (--force-memory)")
    return fp


def _restore(
    state: ckpt.TrainingState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tap: RouterTap,
    env: DistEnv,
) -> None:
    """A resumed run's optimizer, scheduler, router-noise weights and balancing biases (the model was loaded from the
    checkpoint; the
    RNG states, the tap's included, are restored by the loop, right before the first step)."""
    if env.distributed:  # saved by name as full tensors; each rank takes its shard
        load_full_optimizer_state(model, optimizer, state.optimizer, env, from_rank0=False)
    else:
        optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    if len(tap.noise_modules):
        noise = {k.removeprefix("noise."): v for k, v in state.tensors.items() if k.startswith("noise.")}
        tap.noise_modules.load_state_dict(noise)
    restore_biases(tap, state.tensors)


def _checkpoint_to_resume(
    run_dir: Path, spec: TrainSpec, env: DistEnv, total: int, *, resume: bool, force: bool, note: Note
) -> ckpt.TrainingState | None:
    """The refusals before any text is read: RUN_DIR, the Hub token for --push-to-hub, and a checkpoint that this
    run could not continue. Returns what a resumed run continues from (None for a new run)."""
    resume_from = _check_run_dir(run_dir, resume=resume, force=force)
    if spec.push_to_hub:
        from ..publish.hub import require_token

        require_token()
    state = _intact_checkpoint(run_dir, note) if resume_from else None
    if state is not None:
        _check_resumable(state, spec, env, run_dir, total)
    return state


def _intact_checkpoint(run_dir: Path, note: Note) -> ckpt.TrainingState:
    """The newest checkpoint whose files match their checksums and load; a damaged one is named and the run falls
    back to the one before it (refused in one line when none is left)."""
    damaged: list[str] = []
    for _, folder in reversed(ckpt.checkpoints(run_dir)):
        try:
            state = ckpt.load_training_state(folder)
        except UpcycleError as exc:
            damaged.append(str(exc).split(";")[0])
            continue
        for reason in damaged:
            note(f"{reason}; resuming from {folder.name}, the newest intact checkpoint")
        return state
    raise UpcycleError(
        f"{run_dir} has no intact checkpoint to resume from ({'; '.join(damaged)}); start again with --force"
    )


def _check_after_reading(state: ckpt.TrainingState | None, spec: TrainSpec, env: DistEnv, info: DataInfo) -> None:
    """The refusals left once the data is read: a resumed run's text must be the same; no router noise under FSDP."""
    if state is not None and state.state.get("data_key") not in (None, info.key):
        raise UpcycleError(
            f"the text behind --data {spec.data} changed since {state.folder} was written; resume with the same "
            "data (or start a new run with --force)"
        )
    if env.distributed and spec.router_noise:  # the noise weights live outside FSDP's shards
        raise UpcycleError("--router-noise is not supported under torchrun yet; train in one process or drop it")


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


def _check_resumable(state: ckpt.TrainingState, spec: TrainSpec, env: DistEnv, run_dir: Path, total: int) -> None:
    ckpt.check_resumable(state.state["fixed"], ckpt.fixed_options(spec), state.folder)
    saved_balance = state.state.get("spec", {}).get("balance", "aux")  # runs before --balance balanced with α
    if saved_balance != spec.balance:
        raise UpcycleError(
            f"--balance is {spec.balance!r} but the run in {run_dir} was started with {saved_balance!r}; resume with "
            "the same value (or start a new run with --force)"
        )
    saved_optimizer = state.state.get("spec", {}).get("optimizer", "adamw")  # runs before --optimizer used AdamW
    if saved_optimizer != spec.optimizer:
        raise UpcycleError(
            f"--optimizer is {spec.optimizer!r} but the run in {run_dir} was started with {saved_optimizer!r}, whose "
            "state the checkpoint holds; resume with the same optimizer (or start a new run with --force)"
        )
    if state.state.get("world_size", 1) != env.world_size:
        raise UpcycleError(
            f"{state.folder} was written by {state.state.get('world_size', 1)} process(es) and this run has "
            f"{env.world_size}; the global batch and its data order would change. Resume with the same number"
        )
    if state.step >= total and (run_dir / ckpt.FINAL / "config.json").is_file():
        raise UpcycleError(
            f"the run in {run_dir} already reached step {state.step}; pass a larger --steps to train further"
        )


def _check_same_model(state: ckpt.TrainingState, source: Source) -> None:
    """A resumed run trains the checkpoint's weights and writes final/ with MODEL's recipe and card: refuse another
    MODEL than the one the run started from."""
    saved = state.state.get("source")  # older checkpoints have only the public name, which cannot tell folders apart
    if saved is not None and saved != model_identity(source.name):
        raise UpcycleError(
            f"the run in {state.folder.parent.parent} was started from MODEL {saved} and this --resume names "
            f"{source.name}; resume with the same MODEL (or start a new run with --force)"
        )


def _tokenizer(source: SourceRef) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UpcycleError(f"the model has no usable tokenizer to read the text with: {exc}".splitlines()[0]) from None


def _data(
    spec: TrainSpec, tokenizer: PreTrainedTokenizerBase, env: DistEnv
) -> tuple[TokenBlocks | ChatBlocks, TokenBlocks | ChatBlocks, DataInfo]:
    """Conversations (--format chat, or auto and DATA's records have `messages`): tokenised by every rank (they are
    small and need no cache). Text: tokenised on rank 0 first; the other ranks then find the cache entry it wrote."""
    if is_chat(spec):
        options = ChatOptions(spec.seq_len, spec.packing == "on", spec.long_conversations)
        return prepare_chat(
            spec.data, tokenizer, options, eval_data=spec.eval_data, eval_fraction=spec.eval_fraction, seed=spec.seed
        )

    def run() -> tuple[TokenBlocks, TokenBlocks, DataInfo]:
        return prepare(
            spec.data,
            tokenizer,
            spec.seq_len,
            text_field=spec.text_field,
            eval_data=spec.eval_data,
            eval_fraction=spec.eval_fraction,
            cache_dir=cache_dir() / "tokens",
            seed=spec.seed,
            skip_bad_rows=spec.skip_bad_rows,
        )

    prepared = run() if env.is_main else None
    barrier(env)
    return prepared if prepared is not None else run()


def is_chat(spec: TrainSpec) -> bool:
    """--format chat, or --format auto with DATA's first record holding `messages`."""
    if spec.format == "auto":
        return spec.data is not None and looks_like_chat(spec.data)
    return spec.format == "chat"
