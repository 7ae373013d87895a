"""The dense model run one decoder layer at a time, for calibration: each MoE layer's FFN input over a list of
token sequences, without ever holding more than one decoder layer's weights.

The model's own code does the work. Its base model (no LM head) is built on the meta device from config.json:
no memory. The input embedding is made real with only the rows of the token ids that occur (read from the
source, the ids renumbered), and the rotary module's buffers (and Gemma's embedding scale) are computed by
the model's own `_init_weights`, as `from_pretrained` does. One run of the base model's own `forward` per
sequence, with each decoder layer's `forward` replaced by a recorder, gives the layers' inputs exactly as the
whole model makes them: the (scaled) embeddings plus any position embedding going into the first layer, and
the arguments every layer is called with (rotary cos/sin, the causal or sliding-window mask of its layer type,
position ids). Then, layer after layer up to the last MoE layer: its weights are read from the source
(source.read_tensor: preads of its byte ranges) into the meta layer, every sequence is run through it (a
forward pre-hook on its `mlp` keeps the FFN input), the outputs are carried to the next layer, and the layer
goes back to the meta device. Whatever a family does inside a layer (sandwich norms, softcapping, parallel
attention and MLP, Granite's multipliers) is its own layer class's code.

Where that cannot be done (a model class transformers' AutoModel does not know, or a checkpoint whose keys do
not match the model's parameters), the whole model is loaded as before and run with the same hooks
(`whole_model_inputs`); `layer_plan` says why.

Memory: one decoder layer in the pass's dtype, the input embedding rows of the ids used, and the hidden states
of every sequence (tokens x hidden) in the pass's dtype, besides what the caller keeps of each layer's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compat import init_weights
from ..source import RangeReader, read_tensor

if TYPE_CHECKING:
    import torch

    from ..source import Checkpoint, TensorInfo


class _Recorded(Exception):
    """Raised by the last layer's recorder: the forward has given everything the layers need."""


class _Captured(Exception):
    """Raised by the last MoE layer's last hook: the rest of that layer (the MLP's output, and after a parallel
    MLP anything else) is never needed."""


@dataclass
class Intermediate:
    """Which layers' MLP intermediate the pass keeps beside their FFN inputs: the input of the MLP's down
    projection (in the gated families act(gate x) * (up x), the activations co-activation ranks), which the
    dense MLP computes anyway. `found[layer]` is set before the pass yields that layer (layer by layer only:
    the whole-model fallback sets none): [t_s, I] in the pass's dtype for each sequence of `sequences`, in order.
    """

    layers: frozenset[int]
    down: str  # the down projection's attribute name in the layer's `mlp`
    sequences: frozenset[int]  # indices of the sequences whose intermediate is kept
    check_rtol: float  # how close its first and last tokens must be to act(gate x) * (up x) (the pass's dtype)
    found: dict[int, list] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerPlan:
    """How the pass will run: `base` is the meta-device base model (None: the whole model, for `reason`)."""

    base: Any  # transformers PreTrainedModel on the meta device, or None
    layers: Any  # its ModuleList of decoder layers
    prefix: str  # what the checkpoint's keys add before the base model's parameter names
    reason: str = ""


def layer_plan(folder: Path, ckpt: Checkpoint, last: int, dtype: torch.dtype) -> LayerPlan:
    """The base model on the meta device, and the checkpoint key prefix every parameter that runs is found under;
    or why the pass must load the whole model instead."""
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            base = AutoModel.from_config(config, dtype=dtype)
    except (ValueError, KeyError, ImportError, OSError, TypeError) as exc:
        return LayerPlan(None, None, "", f"the base model cannot be built from config.json: {exc}".splitlines()[0])
    base.eval()  # no dropout
    stacks = [m for m in base.children() if isinstance(m, torch.nn.ModuleList)]
    if len(stacks) != 1 or len(stacks[0]) <= last or not all(hasattr(m, "mlp") for m in stacks[0]):
        return LayerPlan(None, None, "", f"{type(base).__name__} has no single stack of decoder layers with an mlp")
    layers = stacks[0]
    stack = next(n for n, m in base.named_children() if m is layers)
    later = tuple(f"{stack}.{i}." for i in range(last + 1, len(layers)))  # layers the pass never runs
    needed = [n for n, _ in base.named_parameters() if not n.startswith(later)]
    for prefix in (f"{base.base_model_prefix}.", ""):
        if all(prefix + n in ckpt.tensors for n in needed):
            return LayerPlan(base, layers, prefix)
    missing = next(n for n in needed if f"{base.base_model_prefix}.{n}" not in ckpt.tensors)
    return LayerPlan(None, None, "", f"the checkpoint does not hold {missing} under the model's own names")


def ffn_inputs(
    folder: Path,
    ckpt: Checkpoint,
    sequences: list[torch.Tensor],
    layers: tuple[int, ...],
    dtype: torch.dtype,
    inner: Intermediate | None = None,
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Each of `layers`' FFN input over each sequence of token ids, in increasing layer order:
    (layer, [[t_s, H] float32 for each sequence s]). Each sequence is run on its own (its own positions from 0).
    With INNER, the MLP intermediate of its layers too (in inner.found; the layer-by-layer pass only)."""
    if not layers:
        return
    plan = layer_plan(folder, ckpt, max(layers), dtype)
    if plan.base is None:
        yield from whole_model_inputs(folder, sequences, layers, dtype)
    else:
        yield from layered_inputs(plan, ckpt, sequences, layers, dtype, inner)


def layered_inputs(
    plan: LayerPlan,
    ckpt: Checkpoint,
    sequences: list[torch.Tensor],
    layers: tuple[int, ...],
    dtype: torch.dtype,
    inner: Intermediate | None = None,
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """ffn_inputs, one decoder layer in memory at a time (see the module's docstring). The last layer runs only
    up to its last hook: its output is never needed."""
    import torch

    base, stack, last = plan.base, plan.layers, max(layers)
    ids = _make_front_real(plan, ckpt, sequences, dtype)
    hidden, calls = _record_calls(base, stack, ids, last)
    names = {id(m): n for n, m in base.named_modules()}
    for i in range(last + 1):
        layer = stack[i]
        weights = {
            n: read_tensor(ckpt.tensors[f"{plan.prefix}{names[id(layer)]}.{n}"]).to(dtype)
            for n, _ in layer.named_parameters()
        }
        layer.load_state_dict(weights, assign=True, strict=True)
        del weights
        seen: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []  # the MLP intermediate of inner.sequences, where asked for
        down = getattr(layer.mlp, inner.down, None) if inner is not None and i in inner.layers else None
        at = [-1]  # the sequence being run
        hooks = [
            layer.mlp.register_forward_pre_hook(_keep(seen, last=i == last and down is None)),
            *([down.register_forward_pre_hook(_keep(kept, i == last, at, inner.sequences))] if down else []),
        ]
        try:
            with torch.no_grad():
                for s, h in enumerate(hidden):
                    args, kwargs = calls[i][h.shape[1]]
                    at[0] = s
                    try:
                        out = layer(h, *args, **kwargs)
                    except _Captured:  # the last layer: everything it was run for is kept
                        continue
                    hidden[s] = out[0] if isinstance(out, tuple) else out
        finally:
            for hook in hooks:
                hook.remove()
            layer.to("meta")  # frees the layer's weights
        if down is not None:
            inner.found[i] = kept
        del kept
        if i in layers:
            yield i, seen


def _keep(into: list, last: bool, at: list[int] | None = None, which: frozenset[int] | None = None):
    """A forward pre-hook appending its module's input (one sequence: [t, D], float32 if not already) to INTO,
    for the sequences WHICH (all if None; AT[0] the one being run); on the LAST layer it then stops the layer's
    forward (_Captured): what follows is never used."""

    def hook(_module, args) -> None:
        if which is None or at[0] in which:
            into.append(args[0].detach()[0].float())
        if last:
            raise _Captured

    return hook


def _make_front_real(plan: LayerPlan, ckpt: Checkpoint, sequences: list[torch.Tensor], dtype) -> list:
    """Everything of the base model outside the decoder stack made real, and the sequences renumbered.

    The input embedding gets only the rows of the ids the sequences use (read from the source row by row), the
    ids renumbered into them. Buffers (rotary frequencies, Gemma's embedding scale) are computed by the model's
    own _init_weights, as from_pretrained computes them; every parameter is then read from the source (a
    position embedding such as GPT-2's wpe whole)."""
    import torch

    base = plan.base
    embed = base.get_input_embeddings()
    embed_name = next(n for n, p in base.named_parameters() if p is embed.weight)
    used, inverse = torch.unique(torch.cat(sequences), return_inverse=True)
    shape = (len(used), embed.weight.shape[1])
    embed.weight = torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dtype), requires_grad=False)
    embed.num_embeddings, embed.padding_idx = len(used), None  # padding_idx only matters to gradients
    front = [(n, m) for n, m in base.named_children() if m is not plan.layers]
    with torch.no_grad():
        for _, module in front:
            module.to_empty(device="cpu")
            for sub in module.modules():
                init_weights(base, sub)
        for at, module in front:
            for n, p in module.named_parameters():
                name = f"{at}.{n}"
                info = ckpt.tensors[plan.prefix + name]
                p.copy_(read_rows(info, used.tolist()) if name == embed_name else read_tensor(info))
    return list(inverse.split([len(s) for s in sequences]))


def _record_calls(base, stack, ids: list, last: int) -> tuple[list, list[dict]]:
    """One forward of the base model per sequence with every decoder layer recording what it is called with:
    the first layer's input hidden states per sequence, and per layer, sequence length -> (args, kwargs)."""
    import torch

    hidden: list = []
    calls: list[dict] = [{} for _ in range(last + 1)]

    def recorder(i: int):
        def forward(h, *args, **kwargs):
            if i == 0:
                hidden.append(h)
            calls[i][h.shape[1]] = (args, kwargs)
            if i == last:
                raise _Recorded
            return h

        return forward

    for i in range(last + 1):
        stack[i].forward = recorder(i)
    try:
        with torch.no_grad():
            for seq in ids:
                with suppress(_Recorded):
                    base(input_ids=seq[None], use_cache=False)
    finally:
        for i in range(last + 1):
            del stack[i].forward
    return hidden, calls


def read_rows(info: TensorInfo, rows: list[int]) -> torch.Tensor:
    """Rows `rows` of a 2-D tensor [N, D] of the source, read one by one: [len(rows), D] in its dtype."""
    import torch

    from ..dtypes import DTYPE_BYTES, torch_dtype

    width = info.shape[1] * DTYPE_BYTES[info.dtype]
    raw = bytearray(width * len(rows))
    view = memoryview(raw)
    with RangeReader(info.file) as reader:
        for k, row in enumerate(rows):
            reader.readinto(view[k * width : (k + 1) * width], info.offset + row * width, info.name)
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).reshape(len(rows), info.shape[1])


def whole_model_inputs(
    folder: Path, sequences: list[torch.Tensor], layers: tuple[int, ...], dtype: torch.dtype
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """ffn_inputs with the whole model loaded, as before the layer-by-layer pass (only its base model runs: no
    LM head logits), each layer's `mlp` hooked."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    base = model.base_model
    stack = next(m for m in base.children() if isinstance(m, torch.nn.ModuleList))
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [
        stack[i].mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].detach()[0].float()))
        for i in layers
    ]
    try:
        with torch.no_grad():
            for seq in sequences:
                base(input_ids=seq[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    del model, base
    for i in sorted(layers):
        yield i, seen.pop(i)
