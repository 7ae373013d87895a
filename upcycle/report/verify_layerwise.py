"""`upcycle verify --layerwise`: the whole-model proof, holding one layer in memory at a time.

Two checks, both streamed from the safetensors shards.

* Tensors. Every tensor the conversion copied is compared with its source through the byte ranges of the
  shards, in pieces: byte for byte, or after the cast the conversion made (`convert --dtype`). What came
  from where is the conversion plan, rebuilt from upcycle.json's recipe (or, without one, from the MoE
  config), so the experts are checked against the dense FFN they were cloned from. Expert tensors that an
  expert method computes (split, drop, fine-grained, noise, scaled down_proj) are recomputed by the
  converter's own code, one layer's dense FFN at a time, and compared byte for byte.
* Forward. Each model's own transformers class is built on the meta device (no memory), and its own forward
  runs with hooks that load a unit (the embedding, one decoder layer, the final norm, the head) just before
  it runs and drop it right after. The MoE's per-expert keys are fused by transformers' own loader. The
  dense run records each layer's output and, for MoE layers, the input and output of its MLP; the MoE run
  feeds that same input to its MoE block, the module users run, and compares. The end-to-end hidden states
  and logits are compared as the whole-model verify compares them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..arch import family_for, target_for_config
from ..compat import init_weights, tied_weights_keys, weight_loader
from ..convert.ops import Copy, Expert, Fused, Mean, Router, Zeros, by_coactivation, flat
from ..dtypes import torch_dtype
from ..errors import UpcycleError
from ..source import Checkpoint, TensorInfo, read_tensor

# --- the tensor check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorCheck:
    compared: int  # copied or computed tensors (attention, norms, embeddings, dense FFNs, experts) compared
    equal: int  # of those, equal to the source (byte for byte, or after the cast), or to their recomputation
    cast: int  # of those compared, how many were compared after a cast
    computed: int  # of those compared, expert tensors a method computes: recomputed and compared
    zeros: int  # tensors the target needs as zeros (e.g. Qwen2-MoE's empty shared expert), checked to be zero
    skipped: int  # routers: drawn at random by design, nothing to compare them with
    bytes_read: int  # bytes of the MoE read
    mismatched: tuple[str, ...] = ()  # MoE tensors that differ from their source (or have the wrong shape/dtype)
    missing: tuple[str, ...] = ()  # planned, absent from the MoE
    unexpected: tuple[str, ...] = ()  # in the MoE, not planned

    @property
    def passed(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "equal": self.equal,
            "cast": self.cast,
            "computed": self.computed,
            "zeros": self.zeros,
            "skipped": self.skipped,
            "bytes_read": self.bytes_read,
            "mismatched": list(self.mismatched),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "passed": self.passed,
        }


def conversion_plan(dense: Checkpoint, moe: Checkpoint, recipe: dict[str, Any] | None):
    """The plan that made MOE from DENSE, and its spec: from upcycle.json's recipe, or inferred from the MoE
    config (then plain cloning: a method's computed experts cannot be told apart without the recipe)."""
    from ..convert.pipeline import dense_config
    from ..convert.planner import make_plan
    from ..convert.spec import ConvertSpec, build_spec

    if recipe is not None and isinstance(recipe.get("recipe"), dict):
        spec = build_spec(None, **recipe["recipe"])
    else:
        target = target_for_config(moe.config)
        if target is None:
            raise UpcycleError(
                f"{moe.folder} is a {moe.config.get('model_type')!r} model, which upcycle does not write, and has no "
                "upcycle.json; --layerwise cannot tell which dense tensor each tensor came from (use --whole)"
            )
        n = int(moe.config["num_hidden_layers"])
        dense_layers = set(moe.config.get(target.config.get("dense_layers", ""), None) or ())
        if target.layer_range:  # MoE layers as a range and a step (Ernie 4.5)
            start, end, step = (int(moe.config[target.layer_range[k]]) for k in ("start", "end", "interval"))
            dense_layers = {i for i in range(n) if not (start <= i <= end and (i + 1) % step == 0)}
        spec = ConvertSpec(
            experts=int(moe.config[target.config["experts"]]),
            top_k=int(moe.config[target.config["top_k"]]),
            layers=tuple(i for i in range(n) if i not in dense_layers) if dense_layers else None,
            target=target.name,
        )
    try:
        return make_plan(dense_config(dense.folder).to_dict(), dense.tensors, spec), spec
    except UpcycleError as exc:
        raise UpcycleError(f"--layerwise could not rebuild the conversion plan: {exc}") from None


def check_tensors(
    plan, dense: Checkpoint, moe: Checkpoint, *, strict_dtype: bool, seed: int = 0, others: tuple[Checkpoint, ...] = ()
) -> TensorCheck:
    """Compare every planned tensor of MOE with what the converter produces for it, streaming; `strict_dtype`: the
    plan knows the dtypes; `seed`: the conversion's, which the seeded methods (split by cluster, drop, noise) drew
    with; `others`: the --expert-from models (each expert against its own source's FFN, averages recomputed)."""
    from ..convert.execute import LayerFFNs, Sources, same_as_produced, with_dtype
    from ..convert.pipeline import dense_config, with_family_views

    dense = with_family_views(dense, dense_config(dense.folder).to_dict())  # fused tensors read as their views
    others = tuple(with_family_views(o, dense_config(o.folder).to_dict()) for o in others)
    moe = per_expert_views(plan, moe)  # an MoE saved in transformers' fused layout, read under upcycle's names
    planned = {op.name for op in plan.ops}
    mismatched: list[str] = []
    partitions, unrecovered = written_partitions(plan, dense, moe)
    sources = Sources(dense, LayerFFNs(dense, plan, seed, partitions, others))  # one layer's FFN per source
    tally = dict.fromkeys(("compared", "equal", "cast", "computed", "zeros", "skipped", "bytes_read"), 0)
    for op in plan.ops:
        got = moe.tensors.get(op.name)
        if got is None:
            continue
        if any(by_coactivation(part) and part.layer in unrecovered for part in flat(op)):
            mismatched.append(op.name)  # its gate rows are not a partition of the dense neurons
            continue
        if got.shape != op.shape or (strict_dtype and got.dtype != op.dtype):
            mismatched.append(op.name)
            continue
        if isinstance(op, Router):  # drawn at random by design: nothing to compare with
            tally["skipped"] += 1
            continue
        tally["bytes_read"] += got.nbytes
        for key, count in counts(op, sources, got.dtype).items():
            tally[key] += count
        ok = same_as_produced(with_dtype(op, got.dtype), got, sources)  # the bytes the converter writes
        tally["equal"] += ok and not isinstance(op, Zeros)
        if not ok:
            mismatched.append(op.name)
    return TensorCheck(
        **tally,
        mismatched=tuple(mismatched),
        missing=tuple(sorted(planned - moe.tensors.keys())),
        unexpected=tuple(sorted(moe.tensors.keys() - planned)),
    )


def counts(op, sources, dtype: str) -> dict[str, int]:
    """What comparing OP with a tensor of DTYPE counts as: zeros, or compared (and cast, computed)."""
    if isinstance(op, Zeros):
        return {"zeros": 1}
    if isinstance(op, Fused):  # every expert's part, at its place in the fused tensor
        computed = any(part.transform is not None for part in op.parts)
        return {"compared": 1, "computed": computed, "cast": any(sources.info(p).dtype != dtype for p in op.parts)}
    if isinstance(op, Mean):  # the float32 mean of the sources, recomputed
        return {"compared": 1, "computed": 1}
    if isinstance(op, Copy) and op.values is not None:  # changed element-wise by the family (Gemma's 1+w)
        return {"compared": 1}
    if isinstance(op, Expert) and op.transform is not None:  # computed by the expert method
        return {"compared": 1, "computed": 1}
    return {"compared": 1, "cast": int(sources.info(op).dtype != dtype)}


def per_expert_views(plan, moe: Checkpoint) -> Checkpoint:
    """MOE with transformers 5's in-memory layout (`save_pretrained(save_original_format=False)`, mergekit-moe)
    read under the per-expert names the plan uses.

    That layout keeps a layer's experts in `experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its
    up rows) and `experts.down_proj` [E, H, I], and the router under the module's name. Each expert's gate, up
    and down is one contiguous byte range of those, so the tensor check reads them in place, as it reads a
    per-expert file. A checkpoint in the per-expert layout comes back unchanged."""
    from dataclasses import replace

    from ..arch import targets

    target = targets().get(plan.target)
    if target is None or not target.modules:
        return moe
    tensors = dict(moe.tensors)
    used: set[str] = set()
    for op in plan.flat_ops():
        if op.name in tensors or op.layer is None:
            continue
        if isinstance(op, Router):
            fused = tensors.get(target.modules["router"].format(layer=op.layer) + ".weight")
            if fused is not None and fused.shape == op.shape:
                tensors[op.name] = replace(fused, name=op.name)
                used.add(fused.name)
            continue
        if not isinstance(op, Expert) or op.expert is None or op.role not in ("gate", "up", "down"):
            continue
        experts = target.modules["experts"].format(layer=op.layer)
        fused = tensors.get(f"{experts}.{'down_proj' if op.role == 'down' else 'gate_up_proj'}")
        if fused is None or len(fused.shape) != 3:
            continue
        n, rows, cols = fused.shape
        per_expert = fused.nbytes // n
        if op.role == "down":
            ok, start = (rows, cols) == op.shape, op.expert * per_expert
        else:  # gate rows first, then up rows
            ok = rows == 2 * op.shape[0] and cols == op.shape[1]
            start = op.expert * per_expert + (per_expert // 2 if op.role == "up" else 0)
            per_expert //= 2
        if ok and op.expert < n:
            tensors[op.name] = TensorInfo(op.name, fused.dtype, op.shape, fused.file, fused.offset + start, per_expert)
            used.add(fused.name)
    if not used:
        return moe
    return replace(moe, tensors={k: v for k, v in tensors.items() if k not in used})


def part_pieces(op, got: TensorInfo) -> Iterator[tuple[Any, TensorInfo]]:
    """(part, where its bytes are in GOT) for each per-expert part of a fused op, in order (a plain op: itself)."""
    offset = 0
    for part in flat(op):
        yield part, TensorInfo(part.name, got.dtype, part.shape, got.file, got.offset + offset, part.nbytes)
        offset += part.nbytes


def _written(plan, moe: Checkpoint):
    """name -> where its bytes are in MOE, for plain tensors and for the per-expert parts of fused ones."""
    where: dict[str, TensorInfo] = {}
    for op in plan.ops:
        got = moe.tensors.get(op.name)
        if got is not None:
            where.update((part.name, piece) for part, piece in part_pieces(op, got))
    return where


def written_partitions(plan, dense: Checkpoint, moe: Checkpoint) -> tuple[dict[int, dict], set[int]]:
    """The --split-by coactivation neuron groups, read back from the MoE itself.

    They came from calibration text the check does not have, but each expert's gate rows are dense gate rows:
    each is found by its bytes, which gives the groups; up and down are then recomputed from those groups and
    compared like any computed tensor. -> (layer -> {("coactivation", parts): groups}, layers whose gate rows are
    not a balanced partition of the dense neurons)."""
    import torch

    gates: dict[int, list] = {}
    for op in plan.expert_ops():
        if op.role == "gate" and by_coactivation(op):
            gates.setdefault(op.layer, []).append(op)
    where = _written(plan, moe)
    found: dict[int, dict] = {}
    bad: set[int] = set()
    for layer, ops in gates.items():
        parts = ops[0].transform.parts
        source = dense.load(ops[0].src).float()  # [I, H]
        size = source.shape[0] // parts
        groups: dict[int, torch.Tensor] = {}
        ok = True
        for op in ops:
            info = where.get(op.name)
            if info is None:
                continue
            chosen, scale = op.transform.chosen, op.transform.scale
            rows = (source * scale).to(torch_dtype(info.dtype))
            index = {bytes(r.contiguous().view(torch.uint8).numpy()): i for i, r in enumerate(rows)}
            got = read_tensor(info)
            idx = torch.tensor([index.get(bytes(r.contiguous().view(torch.uint8).numpy()), -1) for r in got])
            for j, g in enumerate(chosen):
                seg = idx[j * size : (j + 1) * size]
                if g in groups and not torch.equal(groups[g], seg):
                    ok = False
                groups[g] = seg
        covered = torch.cat(list(groups.values())).sort().values if groups else torch.empty(0, dtype=torch.long)
        ok = ok and len(groups) == parts and torch.equal(covered, torch.arange(source.shape[0]))
        if ok:
            found[layer] = {("coactivation", parts): [groups[g] for g in range(parts)]}
        else:
            bad.add(layer)
    return found, bad


# --- the forward check --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    layer: int
    moe: bool
    block_max_abs_diff: float | None  # MoE block vs dense MLP on the same input (MoE layers)
    block_scale: float | None  # max |dense MLP output| of that input
    block_limit: float | None
    hidden_max_abs_diff: float  # hidden states after the layer, each model run on its own from the tokens

    @property
    def passed(self) -> bool:
        return self.block_max_abs_diff is None or self.block_max_abs_diff <= self.block_limit


@dataclass(frozen=True)
class LayerwiseRun:
    dense_logits: Any  # [1, T, V]
    moe_logits: Any  # [1, T, V]
    rows: tuple[LayerRow, ...]
    moe_class: str
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


@dataclass
class _Unit:
    prefix: str  # module path in the model, e.g. model.layers.3
    module: Any
    layer: int | None  # index of a decoder layer
    keys: list[str]  # checkpoint keys that load into it
    tied: list[tuple[str, str]]  # (parameter, checkpoint key of the parameter it is tied to)


def _units(module, prefix: str = "") -> Iterator[tuple[str, Any, int | None]]:
    """The pieces loaded one at a time: each element of a ModuleList (the decoder layers), and every other
    child that holds weights (embedding, final norm, head). Weightless children (rotary tables) are skipped."""
    import torch

    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, torch.nn.ModuleList):
            for i, layer in enumerate(child):
                yield f"{path}.{i}", layer, i
        elif any(isinstance(m, torch.nn.ModuleList) for m in child.modules()):
            yield from _units(child, path + ".")
        elif child.state_dict():
            yield path, child, None


def _common_path(paths: list[str]) -> str:
    """The module that holds all these modules: their longest common dotted prefix."""
    parts = [p.split(".") for p in paths]
    common = parts[0]
    for other in parts[1:]:
        n = 0
        while n < min(len(common), len(other)) and common[n] == other[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


class StreamedModel:
    """A transformers model built on the meta device whose units are read from the shards only while they run."""

    def __init__(self, folder: Path, dtype: str, label: str):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        loader = weight_loader()
        if loader is None:  # pragma: no cover - the pinned transformers 5.x has it
            raise UpcycleError("--layerwise needs transformers' 5.x weight loader; upgrade transformers")
        self.loader = loader

        self.ckpt = Checkpoint.open(folder)
        self.dtype = getattr(torch, dtype)
        try:
            config = AutoConfig.from_pretrained(folder)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "initializing zero-element tensors": size-0 experts
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UpcycleError(f"transformers could not build {label}: {exc}".splitlines()[0]) from None
        self.model = model.eval()
        self.config = config
        self.mapping = loader.conversion_mapping(model)
        self._materialize_buffers()

        meta_state = model.state_dict()
        renamings = [m for m in self.mapping if isinstance(m, loader.renaming)]
        converters = [m for m in self.mapping if isinstance(m, loader.converter)]
        self.units = [_Unit(p, m, i, [], []) for p, m, i in _units(model)]
        by_prefix = sorted(self.units, key=lambda u: len(u.prefix), reverse=True)
        self.stray: list[str] = []  # checkpoint keys that belong to no parameter of the model
        plain: dict[str, str] = {}  # parameter -> checkpoint key, where no fusing is involved
        for key in self.ckpt.tensors:
            name, pattern = loader.rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            unit = next((u for u in by_prefix if name.startswith(u.prefix + ".")), None)
            if unit is None or name not in meta_state:
                self.stray.append(key)
                continue
            unit.keys.append(key)
            if pattern is None:
                plain[name] = key
        for target, source in tied_weights_keys(model).items():
            unit = next((u for u in by_prefix if target.startswith(u.prefix + ".")), None)
            if unit is not None and target not in plain and source in plain:
                unit.tied.append((target, plain[source]))
        self.missing: set[str] = set()

    def _materialize_buffers(self) -> None:
        """Non-persistent buffers (rotary tables) are computed, not stored: build them as from_pretrained does."""
        import torch

        owners = set()
        for name, buf in list(self.model.named_non_persistent_buffers()):
            owner, _, attr = name.rpartition(".")
            self.model.get_submodule(owner)._buffers[attr] = torch.empty_like(buf, device="cpu")
            owners.add(owner)
        for owner in owners:
            init_weights(self.model, self.model.get_submodule(owner))

    def load(self, unit: _Unit) -> None:
        """Read the unit's tensors and hand them to transformers' loader (renaming, fusing experts, casting)."""
        import torch
        from safetensors import safe_open

        state: dict[str, Any] = {}
        with ExitStack() as stack:
            files: dict[Path, Any] = {}

            def read(key: str):
                info = self.ckpt.tensors[key]
                if info.file not in files:
                    files[info.file] = stack.enter_context(safe_open(info.file, framework="pt"))
                return files[info.file].get_tensor(key)

            for key in unit.keys:
                state[key] = read(key)
            for target, key in unit.tied:
                state[target] = read(key)
        load_config = self.loader.load_config(dtype=self.dtype, weight_mapping=self.mapping)
        self.loader.load_state_dict(self.model, state, load_config)
        del state
        for name, tensor in list(unit.module.named_parameters()) + list(unit.module.named_buffers()):
            if tensor.is_meta:  # not in the checkpoint (or the wrong shape): zeros, so the forward still runs
                self.missing.add(f"{unit.prefix}.{name}")
                owner, _, attr = name.rpartition(".")
                holder = unit.module.get_submodule(owner)
                value = torch.zeros(tensor.shape, dtype=tensor.dtype)
                if attr in holder._parameters:
                    holder._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
                else:
                    holder._buffers[attr] = value

    def run(self, ids, after_layer: Callable[[int, Any], None]):
        """The model's own forward on `ids`; after_layer(index, output) runs while that decoder layer is loaded."""
        import torch

        hooks = []

        def after(unit: _Unit, module, args, output) -> None:
            if unit.layer is not None:
                after_layer(unit.layer, output[0] if isinstance(output, tuple) else output)
            unit.module.to("meta")  # drop the weights

        for unit in self.units:
            hooks.append(unit.module.register_forward_pre_hook(lambda module, args, u=unit: self.load(u)))
            hooks.append(unit.module.register_forward_hook(partial(after, unit)))
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()
            for unit in self.units:
                unit.module.to("meta")


def run_layerwise(dense_folder: Path, moe_folder: Path, ids, dtype: str, layer_rtol: float) -> LayerwiseRun:
    """Both forwards, one unit in memory at a time; per-layer differences and both models' logits."""
    dense = StreamedModel(dense_folder, dtype, "the dense model")
    if dense.stray == list(dense.ckpt.tensors):
        raise UpcycleError(f"none of the tensors of {dense_folder} fits its own model class; the checkpoint is broken")
    family = family_for(dense.config.model_type)
    mlp_path = _common_path([key.rsplit(".", 1)[0] for key in family.ffn.values()])  # model.layers.{layer}.mlp
    moe = StreamedModel(moe_folder, dtype, "the MoE")
    target = target_for_config(moe.config)
    if target is None:
        raise UpcycleError(
            f"{moe_folder} is a {moe.config.model_type!r} model, not one of the MoE classes upcycle writes; "
            "--layerwise cannot find its MoE blocks (use --whole)"
        )
    if moe.config.num_hidden_layers != dense.config.num_hidden_layers:
        raise UpcycleError(
            f"the MoE has {moe.config.num_hidden_layers} layers and the dense model {dense.config.num_hidden_layers}; "
            "it was not made from this dense model"
        )
    block_path = _common_path(list(target.modules.values()))  # the block holding router and experts
    moe_layers = []
    for i in range(dense.config.num_hidden_layers):
        try:
            moe.model.get_submodule(target.modules["experts"].format(layer=i))
            moe_layers.append(i)
        except AttributeError:
            pass

    # Dense pass: each layer's output, and the MLP's input and output where the MoE has a block.
    hidden: dict[int, Any] = {}
    mlp_io: dict[int, tuple[Any, Any]] = {}
    hooks = []

    def keep_mlp_io(i: int, module, args, kwargs, output) -> None:
        mlp_io[i] = (args[0] if args else next(iter(kwargs.values())), output)

    for i in moe_layers:
        mlp = dense.model.get_submodule(mlp_path.format(layer=i))
        hooks.append(mlp.register_forward_hook(partial(keep_mlp_io, i), with_kwargs=True))
    try:
        dense_logits = dense.run(ids, lambda i, out: hidden.__setitem__(i, out))
    finally:
        for hook in hooks:
            hook.remove()
    if dense.missing:
        first = sorted(dense.missing)[0]
        raise UpcycleError(
            f"the dense checkpoint has no tensor for {first} ({len(dense.missing)} missing); it is incomplete"
        )

    # MoE pass: the block on the dense MLP's input while its layer is loaded, and the drift after each layer.
    rows: dict[int, LayerRow] = {}

    def after_moe_layer(i: int, out) -> None:
        block_diff = scale = limit = None
        if i in mlp_io:
            x, want = mlp_io.pop(i)
            got = moe.model.get_submodule(block_path.format(layer=i))(x)
            block_diff = _max_abs(got, want)
            scale = want.double().abs().max().item()
            limit = layer_rtol * scale if scale > 0 else layer_rtol
        rows[i] = LayerRow(i, i in moe_layers, block_diff, scale, limit, _max_abs(out, hidden.pop(i)))

    moe_logits = moe.run(ids, after_moe_layer)
    return LayerwiseRun(
        dense_logits=dense_logits,
        moe_logits=moe_logits,
        rows=tuple(rows[i] for i in sorted(rows)),
        moe_class=type(moe.model).__name__,
        missing_keys=tuple(sorted(moe.missing)),
        unexpected_keys=tuple(sorted(moe.stray)),
    )


def _max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()
