"""What one training step needs in memory per GPU (or in RAM on CPU), before the run starts (`--dry-run`).

Terms, each in bytes per rank:

- weights, grads and optimizer states, from the parameter counts and the precision (`PRECISIONS`); with FSDP
  (world_size > 1) all three are sharded, so they are divided by world_size, and the gathered working set of
  the root and two decoder layers (the one running and the one prefetched) is added; except the grads when FSDP
  reduces them on the last micro-batch of a step only (`unsharded_grads`: under --grad-accum > 1, when they fit):
  until then every rank accumulates the full, unsharded gradients (float32, FSDP2's reduce dtype);
- activations saved for backward, counted tensor by tensor for a Llama-style decoder block with a SwiGLU FFN or a
  top-k MoE FFN run by transformers' `grouped_mm`/`eager` experts and SDPA attention (no s² term);
- the logits and the cross-entropy over them, usually the largest single term;
- with gradient checkpointing: one saved input per layer plus one layer's activations, recomputed in backward.

Activation formula (elements per token, `a` = bytes of the compute dtype), adapted from Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1 (their 34·s·b·h + 5·a·s²·b for a
GPT block: no dropout masks here, RMSNorm instead of LayerNorm, SwiGLU, grouped-query attention, and flash/SDPA
attention so the s² scores are never stored):

    RMSNorm (x2 per layer)   2h fp32 (input upcast, normalised) + h·a (scaled output, the next matmul's input)
    attention                (3·d_q + 2·d_kv)·a   q, k after RoPE; v; SDPA output; its contiguous copy for o_proj
    dense SwiGLU FFN         4·i·a                gate out, silu(gate), up out, their product (down_proj's input)
    MoE FFN, per token       E·(a + 4) + k·(2h + 4·i_e)·a
                             router logits and fp32 softmax; per routed copy of the token: the gathered input,
                             gate_up out (2·i_e), silu (i_e), product (i_e) and the expert output kept for the
                             routing-weight multiply
    logits                   V·(a + 4·[a≠4] + 4 + 8)  logits, their fp32 copy, log-softmax saved by
                             cross-entropy, and in backward the fp32 gradients of both (transient, at the peak)
    logits, --lm-loss chunked  per step, not per token (lm_loss.py): min(N, C)·V·(a + 4·[a≠4]) for one chunk's
                             logits, their fp32 copy and their gradient; N·4h for the gradient of the head's input;
                             V·h·(8 + a·[a≠4]): the fp32 gradient of its weight, that times backward's scale, and the
                             weight in the compute dtype

The step's peak is taken as weights + grads + optimizer states + working copies + max(activations + logits, the
optimizer step's temporaries): an upper bound, since the gradients fill up while backward frees the activations.
The temporaries are the largest trainable tensor's, for optimizers that step one tensor at a time on CPU: twice
it in fp32 for Adafactor, six times for bitsandbytes' AdamW8bit (its CPU step dequantises both moments), which on
CPU also held HELD_8BIT_CPU bytes per trainable parameter more in whole runs (optim.py).

On CPU the figure is the process's peak RSS, so more terms count (measured with transformers 5.25, see
benchmarks/train_memory.py, which samples the anonymous and file-backed RSS of real runs):
- `runtime`: the interpreter with torch, transformers, the tokenizer and the data (RUNTIME_CPU), in every phase;
- `mapped`: a weight file in another dtype than float32 (a bf16 checkpoint), resident while it is loaded beside
  the fp32 weights it is cast into, and gone after loading (0.11 GiB file-backed at a bf16 run's later peak). An
  fp32 checkpoint is not counted again: its memory-mapped pages are the weights themselves (frozen weights stay
  file-backed, trained ones are copied on first write), so `weights` covers them;
- the load peak: runtime + mapped + the fp32 weights, and `load_extra`: a bf16 checkpoint adds about its own size
  again while it is cast; an fp32 one adds the parameters the loader stacks from several stored tensors (the
  per-expert tensors of Mixtral's and Qwen2-MoE's files), whose file pages stay resident beside the stacked copy
  until loading ends and pages.release_unread_pages gives them back (before it, they stayed for the whole run);
- the save peak: runtime + the states without the gradients (freed at the end of every step, before any save)
  + SAVE_SHARE of the bytes written (save_pretrained's and safetensors' copies: 0.05-1.14x in whole runs, the
  largest taken): the larger of a checkpoint (the whole model in fp32 with `--train all`, else the trainable
  parameters only) and final/ (the model in --save-dtype).
The whole run's peak is the largest of the load, step and save peaks. Not counted on a GPU: the CUDA context and
allocator fragmentation (leave ~1-2 GiB).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..arch import target_for_config
from .optim import HELD_8BIT_CPU, STEP_COPIES_8BIT
from .spec import TrainSpec

GiB = 1 << 30
FP32 = 4
RUNTIME_CPU = int(0.85 * GiB)  # RSS of the interpreter, torch, transformers, tokenizer and data before the model
SAVE_SHARE = 1.15  # a save's transient, as a share of the bytes written (benchmarks/README.md, train_memory.py)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}  # final/'s dtypes (--save-dtype)

Precision = Literal["fp32", "mixed", "bf16", "pure-bf16"]


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per parameter under one precision recipe."""

    param: int  # the parameters as stored (and sharded) between steps
    grad: int  # per trainable parameter
    optimizer: int  # per trainable parameter: AdamW's two moments, plus an fp32 master copy where params are bf16
    compute: int  # activations
    working: int  # per parameter: the low-precision copy the matmuls use, alive through forward and backward
    step_temp: int  # per trainable parameter: foreach AdamW's temporary (sqrt of the second moment), GPU only


PRECISIONS: dict[str, PrecisionBytes] = {
    # fp32 everywhere (CPU default).
    "fp32": PrecisionBytes(param=4, grad=4, optimizer=8, compute=4, working=0, step_temp=4),
    # fp32 parameters, grads and AdamW; matmuls in bf16: FSDP2's MixedPrecisionPolicy(param_dtype=bf16,
    # reduce_dtype=fp32) (--dtype bf16 under torchrun), or torch.autocast on one process (its cast cache keeps a
    # bf16 copy of every weight; the benchmark's bf16 step).
    "mixed": PrecisionBytes(param=4, grad=4, optimizer=8, compute=2, working=2, step_temp=4),
    # bf16 parameters and grads, fp32 master weights and moments in the optimizer (Megatron-style).
    "bf16": PrecisionBytes(param=2, grad=2, optimizer=12, compute=2, working=0, step_temp=4),
    # bf16 everything, as torch.optim.AdamW does on a model simply loaded in bf16 (moments in the param dtype);
    # not what `upcycle train` runs, kept for comparison.
    "pure-bf16": PrecisionBytes(param=2, grad=2, optimizer=4, compute=2, working=0, step_temp=2),
}


def precision_for(spec: TrainSpec, on_gpu: bool, world_size: int = 1) -> Precision:
    """The recipe `upcycle train` runs with: with a bf16 compute dtype the model stays fp32 and the matmuls run in
    bf16 ("mixed"), through FSDP2's mixed-precision policy under torchrun on GPUs, else through autocast."""
    dtype = spec.dtype if spec.dtype != "auto" else ("bf16" if on_gpu else "fp32")
    return "fp32" if dtype == "fp32" else "mixed"


@dataclass(frozen=True)
class ModelShape:
    """What the activation formula needs from a config; dense models have no MoE layers."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dense_ffn: int
    moe_layers: int = 0
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    tied_embeddings: bool = False

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self, moe: bool) -> int:
        """Parameters of one decoder layer (biases and q/k norms left out: they are tiny)."""
        h = self.hidden
        attn = 2 * h * self.d_q + 2 * h * self.d_kv + 2 * h
        if not moe:
            return attn + 3 * h * self.dense_ffn
        return attn + self.experts * (3 * h * self.expert_ffn + h) + 3 * h * self.shared_ffn

    @property
    def root_params(self) -> int:
        """Embeddings, final norm and LM head: what FSDP's root unit holds."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden


def model_shape(config: Any) -> ModelShape:
    """Read a ModelShape from a transformers config (object or dict); MoE fields are found through the target tables."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    common = dict(
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or h // heads),
        vocab=int(cfg["vocab_size"]),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    target = target_for_config(cfg)
    if target is None:
        return ModelShape(dense_ffn=int(cfg["intermediate_size"]), **common)
    fields = target.config
    experts = int(cfg[fields["experts"]])
    dense_layers = set(cfg.get(fields.get("dense_layers", ""), None) or [])
    step = int(cfg.get("decoder_sparse_step") or 1)
    moe = [i for i in range(layers) if i not in dense_layers and experts > 0 and (i + 1) % step == 0]
    dense_ffn = int(cfg[fields["dense_size"]]) if "dense_size" in fields else int(cfg[fields["expert_size"]])
    return ModelShape(
        dense_ffn=dense_ffn,
        moe_layers=len(moe),
        experts=experts,
        top_k=int(cfg[fields["top_k"]]),
        expert_ffn=int(cfg[fields["expert_size"]]),
        shared_ffn=int(cfg.get("shared_expert_intermediate_size") or 0),
        **common,
    )


def layer_activation_bytes_per_token(shape: ModelShape, compute: int, moe: bool) -> int:
    """Bytes one decoder layer saves for backward, per token (see the module docstring for each term)."""
    h, a = shape.hidden, compute
    norms = 2 * (2 * h * FP32 + h * a)
    attention = (3 * shape.d_q + 2 * shape.d_kv) * a
    if not moe:
        return norms + attention + 4 * shape.dense_ffn * a
    router = shape.experts * (a + FP32)
    routed = shape.top_k * (2 * h + 4 * shape.expert_ffn) * a
    shared = 4 * shape.shared_ffn * a + (h * a if shape.shared_ffn else 0)
    return norms + attention + router + routed + shared


def logits_bytes_per_token(shape: ModelShape, compute: int) -> int:
    upcast = FP32 if compute != FP32 else 0
    return shape.vocab * (compute + upcast + FP32 + 2 * FP32)


def chunked_logits_bytes(shape: ModelShape, compute: int, tokens: int) -> int:
    """The LM loss's memory with --lm-loss chunked, for a micro-batch of `tokens` (see the module docstring)."""
    from .lm_loss import chunk_tokens  # torch: imported when a plan is made, not with this module

    upcast = FP32 if compute != FP32 else 0
    chunk = min(tokens, chunk_tokens(shape.vocab)) * shape.vocab * (compute + upcast)
    weight = shape.vocab * shape.hidden * (2 * FP32 + (compute if upcast else 0))  # its grad, scaled, bf16 copy
    return chunk + tokens * shape.hidden * FP32 + weight


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank for one training step; `total` is the figure to compare with the memory available."""

    precision: str
    world_size: int
    tokens: int  # per micro-batch on this rank: micro_batch × seq_len
    grad_checkpointing: bool
    weights: int
    grads: int
    optimizer: int  # AdamW moments (+ fp32 master weights)
    working: int  # bf16 working copies of the weights, or FSDP's gathered root + two layers
    optimizer_step: int  # foreach AdamW's temporaries during optimizer.step() (freed activations by then)
    activations: int  # without checkpointing: every layer's saved tensors + the final norm
    activations_checkpointed: int  # with checkpointing: each layer's input + one layer recomputed + final norm
    logits: int  # the LM loss: over all the logits (--lm-loss model), or one chunk of them (chunked)
    optimizer_name: str = "adamw"  # --optimizer
    lm_loss: str = "model"  # --lm-loss
    logits_chunked: int | None = None  # what `logits` would be with --lm-loss chunked; None: not for this model
    runtime: int = 0  # CPU: the interpreter and libraries (RUNTIME_CPU); 0 on a GPU
    mapped: int = 0  # CPU: a weight file in another dtype than fp32, resident while it is loaded and cast
    load_extra: int = 0  # CPU: the cast of a checkpoint stored in another dtype than the fp32 it is loaded in
    save_extra: int = 0  # CPU: what a save adds on top of the step's states

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optimizer + self.working

    @property
    def host(self) -> int:
        """What every phase holds besides the model: the runtime (CPU only)."""
        return self.runtime

    @property
    def load_peak(self) -> int:
        return self.host + self.mapped + self.weights + self.load_extra

    @property
    def save_peak(self) -> int:
        """The gradients are gone by then: every step ends with zero_grad(set_to_none=True), before any save."""
        return self.host + self.states - self.grads + self.save_extra

    def step_peak(self, checkpointed: bool) -> int:
        acts = self.activations_checkpointed if checkpointed else self.activations
        return self.host + self.states + max(acts + self.logits, self.optimizer_step)

    def phase(self, checkpointed: bool | None = None) -> str:
        """Which phase sets the peak: "load", "step" or "save"."""
        ckpt = self.grad_checkpointing if checkpointed is None else checkpointed
        peaks = {"step": self.step_peak(ckpt), "save": self.save_peak, "load": self.load_peak}
        return max(peaks, key=peaks.__getitem__)

    @property
    def total_without_checkpointing(self) -> int:
        return max(self.load_peak, self.step_peak(False), self.save_peak)

    @property
    def total_with_checkpointing(self) -> int:
        return max(self.load_peak, self.step_peak(True), self.save_peak)

    @property
    def total(self) -> int:
        return self.total_with_checkpointing if self.grad_checkpointing else self.total_without_checkpointing

    def fits(self, available_bytes: int, checkpointed: bool | None = None) -> bool:
        """Whether the step fits in `available_bytes` (with the run's own checkpointing setting unless given)."""
        ckpt = self.grad_checkpointing if checkpointed is None else checkpointed
        return (self.total_with_checkpointing if ckpt else self.total_without_checkpointing) <= available_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            states=self.states,
            load_peak=self.load_peak,
            step_peak=self.step_peak(self.grad_checkpointing),
            save_peak=self.save_peak,
            phase=self.phase(),
            total=self.total,
            total_without_checkpointing=self.total_without_checkpointing,
            total_with_checkpointing=self.total_with_checkpointing,
        )
        return out


def estimate(
    config: Any,
    spec: TrainSpec,
    *,
    trainable_params: int,
    total_params: int,
    world_size: int = 1,
    precision: Precision | None = None,
    on_gpu: bool | None = None,
    sharded: bool | None = None,
    unsharded_grads: bool = False,
    optimizer_state: int | None = None,
    biggest_param: int = 0,
    source_bytes: int = 0,
    source_cast: bool = False,
    source_restacked: int = 0,
    save_param_bytes: int = FP32,
) -> MemoryEstimate:
    """Memory per rank for `spec` on a model with this config (a transformers config, object or dict).

    sharded: the model is wrapped in FSDP2 (under torchrun, even with one process); by default world_size > 1.
    unsharded_grads: FSDP2 skips the gradient reduce-scatter until the step's last micro-batch, so each rank holds
    full-size gradients of every trainable parameter (plan.grad_sync_on_last_micro_batch decides).
    precision: the recipe (PRECISIONS); by default the one `upcycle train` uses for spec.dtype on this device
    (on_gpu defaults to whether CUDA is available). micro_batch and seq_len are per rank, as in the run.
    optimizer_state: bytes of the optimizer's state over the trainable parameters (optim.optimizer_state_bytes,
    exact for Adafactor's factored moments); by default AdamW's two fp32 moments per trainable parameter.
    biggest_param: elements of the largest trainable tensor (Adafactor's step makes a full-size temporary of it).
    source_bytes: the size of the weight files loaded; source_cast: they hold another dtype than float32, so
    loading reads them beside the fp32 weights and casts them (CPU: twice their size while loading; an fp32 file
    is the weights' own memory).
    source_restacked: bytes of the float32 parameters the loader builds from several stored tensors of an fp32
    file (per-expert tensors stacked), which sit beside the file pages they were read from while loading.
    save_param_bytes: bytes per parameter of final/ (--save-dtype; MODEL's dtype by default).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= trainable_params <= total_params:
        raise ValueError(f"trainable_params ({trainable_params}) must be between 0 and total_params ({total_params})")
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    precision = precision or precision_for(spec, on_gpu, world_size)
    p = PRECISIONS[precision]
    shape = model_shape(config)
    tokens = spec.micro_batch * spec.seq_len
    a = p.compute

    dense_layers = shape.layers - shape.moe_layers
    per_token = dense_layers * layer_activation_bytes_per_token(shape, a, moe=False)
    per_token += shape.moe_layers * layer_activation_bytes_per_token(shape, a, moe=True)
    biggest_layer = layer_activation_bytes_per_token(shape, a, moe=shape.moe_layers > 0)
    final_norm = 2 * shape.hidden * FP32 + shape.hidden * a
    layer_inputs = shape.layers * shape.hidden * a

    from .lm_loss import chunked_available

    chunked = chunked_logits_bytes(shape, a, tokens)
    biggest_layer_params = shape.layer_params(moe=shape.moe_layers > 0)
    if sharded if sharded is not None else world_size > 1:
        # FSDP2: the root stays gathered through the step; two layers in compute dtype, one layer's full grads.
        working = (shape.root_params + 2 * biggest_layer_params) * a + biggest_layer_params * p.grad
    else:
        working = total_params * p.working
    step_temp = trainable_params * p.step_temp if on_gpu else biggest_layer_params * FP32  # CPU: per-tensor loop
    if spec.optimizer == "adafactor":  # one tensor at a time: its full-size variance estimate and update
        step_temp = max(step_temp if on_gpu else 0, 2 * biggest_param * FP32)
    if spec.optimizer == "adamw8bit" and not on_gpu:  # one tensor at a time, its moments dequantised to fp32
        step_temp = STEP_COPIES_8BIT * biggest_param * FP32 + int(HELD_8BIT_CPU * trainable_params)
    moments = trainable_params * p.optimizer
    if spec.optimizer == "adamw8bit":  # two 1-byte moments instead of two fp32 ones (absmax blocks left out)
        moments -= trainable_params * 2 * (FP32 - 1)
    if optimizer_state is not None:  # the optimizer's own state, plus the fp32 master copies a recipe keeps
        moments = optimizer_state + trainable_params * max(0, p.optimizer - 2 * FP32)

    def shard(n: int) -> int:
        return math.ceil(n / world_size)

    # a checkpoint holds the whole model only when all of it trains; else the trainable tensors (frozen.py)
    checkpoint_bytes = (total_params if spec.train == "all" else trainable_params) * FP32

    return MemoryEstimate(
        precision=precision,
        world_size=world_size,
        tokens=tokens,
        grad_checkpointing=spec.grad_checkpointing,
        weights=shard(total_params * p.param),
        grads=trainable_params * p.grad if unsharded_grads else shard(trainable_params * p.grad),
        optimizer=shard(moments),
        working=working,
        optimizer_step=shard(step_temp) if on_gpu else step_temp,
        activations=tokens * (per_token + final_norm),
        activations_checkpointed=tokens * (layer_inputs + biggest_layer + final_norm),
        logits=chunked if spec.lm_loss == "chunked" else tokens * logits_bytes_per_token(shape, a),
        optimizer_name=spec.optimizer,
        lm_loss=spec.lm_loss,
        logits_chunked=chunked if chunked_available(config) else None,
        runtime=0 if on_gpu else RUNTIME_CPU,
        mapped=0 if on_gpu or not source_cast else source_bytes,
        load_extra=0 if on_gpu else source_bytes if source_cast else source_restacked,
        save_extra=0 if on_gpu else int(SAVE_SHARE * max(checkpoint_bytes, total_params * save_param_bytes)),
    )


def available_memory(gpu_mem: float | None = None, gpu: int = 0) -> tuple[int, str]:
    """(bytes, what they are): `--gpu-mem` GiB when given, else the free memory of GPU `gpu`, else the RAM
    available."""
    if gpu_mem is not None:
        return int(gpu_mem * GiB), f"--gpu-mem {gpu_mem:g} GiB"
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(gpu)
        name = torch.cuda.get_device_name(gpu)
        return int(free), f"GPU {gpu}: {name} ({total / GiB:.1f} GiB, {free / GiB:.1f} GiB free)"
    return _ram_available(), "RAM"


def _ram_available() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
