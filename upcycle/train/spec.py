"""What the user asked `upcycle train` for: every option, from flags and/or a YAML file (`--config run.yaml`).

The field names are the YAML keys and, with dashes, the flag names; they are part of the interface.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import UpcycleError
from ..options import dtype_short, merge_options, read_yaml_options

TrainWhat = Literal["all", "experts", "non-experts", "router"]
DType = Literal["auto", "bf16", "fp32"]
BalanceScope = Literal["global", "micro"]
Balance = Literal["aux", "bias", "both"]
BiasExport = Literal["drop", "refuse"]
ExpertsImpl = Literal["grouped_mm", "eager", "batched_mm", "deepgemm", "sonicmoe"]
OptimizerName = Literal["adamw", "adafactor", "adamw8bit"]
SaveDType = Literal["source", "float32", "bfloat16", "float16"]
DataFormat = Literal["auto", "text", "chat"]
Packing = Literal["on", "off"]
LongConversations = Literal["truncate", "refuse"]
LmLoss = Literal["model", "chunked"]

CHOICES = {
    "train": get_args(TrainWhat),
    "dtype": get_args(DType),
    "balance_scope": get_args(BalanceScope),
    "balance": get_args(Balance),
    "bias_export": get_args(BiasExport),
    "experts_impl": get_args(ExpertsImpl),
    "optimizer": get_args(OptimizerName),
    "save_dtype": get_args(SaveDType),
    "format": get_args(DataFormat),
    "packing": get_args(Packing),
    "long_conversations": get_args(LongConversations),
    "lm_loss": get_args(LmLoss),
}
INTS = (
    "seq_len",
    "micro_batch",
    "grad_accum",
    "steps",
    "tokens",
    "warmup",
    "eval_every",
    "save_every",
    "keep_last",
    "log_every",
    "seed",
)
FLOATS = (  # and every loss coefficient (a field ending in _coef), checked after "clip"
    "lr",
    "min_lr",
    "weight_decay",
    "clip",
    "capacity_factor",
    "jitter",
    "balance_rate",
    "router_lr_scale",
    "gpu_mem",
    "eval_fraction",
    "expert_dropout",
)
BOOLS = (
    "router_noise",
    "grad_checkpointing",
    "compile",
    "deterministic",
    "tensorboard",
    "force_memory",
    "skip_bad_rows",
)


@dataclass(frozen=True)
class TrainSpec:
    """Every option of `upcycle train` except MODEL, --out, --resume, --force and --dry-run (how to run, not what)."""

    data: str | None = None  # a file, a folder of files, a saved dataset or a datasets Hub id
    text_field: str = "text"
    skip_bad_rows: bool = False  # leave out rows without text_field (else they are refused), counting them
    format: DataFormat = "auto"  # chat: conversations ({"messages": [...]}), the loss on the assistant's tokens
    packing: Packing = "on"  # chat: several conversations per sequence, attention masked per conversation
    long_conversations: LongConversations = "truncate"  # chat: a conversation over --seq-len, cut by whole turns
    eval_data: str | None = None  # else a held-out `eval_fraction` of DATA
    eval_fraction: float = 0.01
    seq_len: int = 2048  # capped at the model's max_position_embeddings, with a note
    micro_batch: int = 4
    grad_accum: int = 1
    steps: int | None = None  # exactly one of steps / tokens
    tokens: int | None = None
    lr: float = 1e-4
    min_lr: float | None = None  # default 10% of lr
    warmup: int | None = None  # default 1% of steps
    weight_decay: float = 0.1  # not on norms, biases, embeddings or routers
    clip: float = 1.0
    aux_loss_coef: float = 0.01  # α: Switch balance loss (losses.LOSSES["balance"])
    z_loss_coef: float = 0.001  # β: ST-MoE router z-loss (losses.LOSSES["z"])
    balance_scope: BalanceScope = "global"
    # aux: the balance loss (α); bias: DeepSeek-V3's aux-loss-free balancing, a per-expert bias on the selection
    # scores moved by balance_rate after each step, no balance loss; both: the two together (balance.py)
    balance: Balance = "aux"
    balance_rate: float = 1e-3  # u of the bias update b += u·sign(mean load - load)
    bias_export: BiasExport = "drop"  # a target with no slot for the bias: final/ routes without it, or refuse the run
    capacity_factor: float | None = None  # None: no token dropping
    jitter: float = 0.0  # ε of the router input jitter
    router_noise: bool = False  # noisy top-k (Shazeer 2017)
    expert_dropout: float = 0.0  # dropout inside the experts (their hidden activations), in training only
    train: TrainWhat = "all"
    optimizer: OptimizerName = "adamw"  # adafactor: factored second moments, no first moment (ST-MoE's optimizer);
    # adamw8bit: bitsandbytes' AdamW with 8-bit blockwise moments (optim.py)
    router_lr_scale: float = 1.0
    dtype: DType = "auto"  # bf16 on GPU, fp32 on CPU
    save_dtype: SaveDType = "source"  # final/'s dtype: MODEL's own by default (checkpoints keep the fp32 masters)
    experts_impl: ExpertsImpl = "grouped_mm"
    grad_checkpointing: bool = False
    # model: the model's own loss over all the logits; chunked: the same loss a chunk of tokens at a time (lm_loss.py)
    lm_loss: LmLoss = "model"
    compile: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable GPU steps
    eval_every: int | None = None  # default: scales with the run (default_every); 0: no evaluation
    save_every: int | None = None  # default: scales with the run (default_every)
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = False
    seed: int = 0
    gpu_mem: float | None = None  # GiB: the memory the fit check compares with (else the GPU's free memory, or RAM)
    force_memory: bool = False  # start a run whose memory estimate does not fit
    push_to_hub: str | None = None

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise UpcycleError(f"--{_flag(name)} {getattr(self, name)!r} is not one of: {', '.join(choices)}")
        for name in INTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UpcycleError(f"--{_flag(name)} {value!r} must be a whole number")
        coefs = loss_coefficients(self)
        for name in (*FLOATS[:4], *coefs, *FLOATS[4:]):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise UpcycleError(f"--{_flag(name)} {value!r} must be a number")
            if value is not None and not math.isfinite(value):
                raise UpcycleError(f"--{_flag(name)} {value!r} must be a finite number")
        for name in BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise UpcycleError(f"{name} {getattr(self, name)!r} must be true or false")
        positive = ("seq_len", "micro_batch", "grad_accum", "steps", "tokens", "save_every", "log_every")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UpcycleError(f"--{_flag(name)} {value} must be 1 or more")
        if self.steps is not None and self.tokens is not None:
            raise UpcycleError("give --steps or --tokens, not both")
        if self.lr <= 0:
            raise UpcycleError(f"--lr {self.lr} must be positive")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise UpcycleError(f"--min-lr {self.min_lr} must be between 0 and --lr ({self.lr})")
        for name in ("weight_decay", "clip", *coefs, "jitter", "router_lr_scale", "balance_rate"):
            if getattr(self, name) < 0:
                raise UpcycleError(f"--{_flag(name)} {getattr(self, name)} must not be negative")
        if self.eval_every is not None and self.eval_every < 0:
            raise UpcycleError(f"--eval-every {self.eval_every} must be 0 (no evaluation) or more")
        if self.warmup is not None and self.warmup < 0:
            raise UpcycleError(f"--warmup {self.warmup} must not be negative")
        if not 0 <= self.expert_dropout < 1:
            raise UpcycleError(f"--expert-dropout {self.expert_dropout} must be in [0, 1) (Switch uses 0.4)")
        if self.jitter >= 1:
            raise UpcycleError(f"--jitter {self.jitter} must be below 1 (ST-MoE uses 0.01)")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UpcycleError(f"--capacity-factor {self.capacity_factor} must be positive (1.0-1.25 is typical)")
        if not 0 < self.eval_fraction < 1:
            raise UpcycleError(f"--eval-fraction {self.eval_fraction} must be between 0 and 1")
        if self.keep_last < 1:
            raise UpcycleError(f"--keep-last {self.keep_last} must be 1 or more")
        if self.gpu_mem is not None and self.gpu_mem <= 0:
            raise UpcycleError(f"--gpu-mem {self.gpu_mem} must be a positive number of GiB")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def loss_weight(self, coef: str) -> float:
        """The weight of a router loss term in the total (its `_coef` field); --balance bias drops the balance loss
        (it is still logged)."""
        if coef == "aux_loss_coef" and self.balance == "bias":
            return 0.0
        return getattr(self, coef)

    @property
    def selection_bias(self) -> bool:
        """Whether the routers choose their experts with the balancing bias (--balance bias or both)."""
        return self.balance != "aux"

    # --- derived values (the defaults that depend on other options) ---------------------------------------

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum * world_size

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step(world_size)))
        raise UpcycleError("say how long to train: --steps N or --tokens N")

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else max(0, round(0.01 * total))

    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else 0.1 * self.lr

    def every(self, name: str, total: int) -> int:
        """eval_every / save_every as given (eval_every 0: no evaluation), else default_every(total)."""
        value = getattr(self, name)
        return value if value is not None else default_every(total)


def default_every(total: int) -> int:
    """The default save and eval cadence, scaled to the run's length: a run of up to 50 steps evaluates and saves
    at its end only (on a CPU such runs are mostly I/O otherwise), a longer one every 50 steps or every tenth of
    the run, whichever is rarer."""
    if total <= 50:
        return total
    return max(50, total // 10)


def loss_coefficients(spec: TrainSpec | type[TrainSpec] = TrainSpec) -> tuple[str, ...]:
    """The coefficient fields of the router loss terms (losses.LOSSES names one for each): floats, not negative."""
    return tuple(f.name for f in fields(spec) if f.name.endswith("_coef"))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def load_run_config(path: Path) -> dict[str, Any]:
    """Read a YAML run config; keys are TrainSpec fields (dashes or underscores). Errors name line and column."""
    return read_yaml_options(path, "run config")


def build_train_spec(config: dict[str, Any] | None = None, **flags: Any) -> TrainSpec:
    """Defaults, then the YAML config, then the flags that were given (not None): later wins."""
    merged = merge_options({f.name for f in fields(TrainSpec)}, config, "run config", flags)
    if "dtype" in merged:
        merged["dtype"] = dtype_short(merged["dtype"])
    if isinstance(merged.get("packing"), bool):  # YAML reads `packing: on` as true
        merged["packing"] = "on" if merged["packing"] else "off"
    return TrainSpec(**merged)
