"""`upcycle inspect`: what a dense or MoE checkpoint holds, read from its config and headers only."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from .arch import families, target_for_model_type
from .source import Checkpoint, resolve

EXPERT_KEY = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.")
FUSED_EXPERT_KEY = re.compile(r"\.layers\.(\d+)\..*\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect(path: str, revision: str | None = None) -> dict[str, Any]:
    source = resolve(path, revision)
    ckpt = Checkpoint.open(source.folder)
    cfg = ckpt.config
    model_type = cfg.get("model_type")
    target = target_for_model_type(model_type)
    dense_family = next((f.name for f in families().values() if model_type in f.model_types), None)

    per_expert: dict[int, int] = defaultdict(int)  # layer -> parameters of one expert
    experts_seen: dict[int, set[int]] = defaultdict(set)
    total, by_dtype = 0, defaultdict(int)
    for name, info in ckpt.tensors.items():
        n = _numel(info.shape)
        total += n
        by_dtype[info.dtype] += info.nbytes
        if m := EXPERT_KEY.search(name):
            layer, e = int(m.group(1)), int(m.group(2))
            experts_seen[layer].add(e)
            if e == 0:
                per_expert[layer] += n
        elif (m := FUSED_EXPERT_KEY.search(name)) and info.shape:
            layer = int(m.group(1))
            experts_seen[layer].update(range(info.shape[0]))
            per_expert[layer] += n // info.shape[0]
    num_layers = int(cfg.get("num_hidden_layers") or 0)
    moe_layers = sorted(experts_seen)
    experts = max((len(v) for v in experts_seen.values()), default=0)
    top_k = cfg.get("num_experts_per_tok") if moe_layers else None
    active = total - sum((len(experts_seen[layer]) - (top_k or 0)) * per_expert[layer] for layer in moe_layers)
    return {
        "path": path,
        "model_type": model_type,
        "architecture": (cfg.get("architectures") or [None])[0],
        "kind": "moe" if moe_layers else "dense",
        "family": target.name if target and moe_layers else dense_family,
        "upcycle_supports": dense_family is not None,
        "layers": num_layers,
        "moe_layers": moe_layers,
        "experts": experts,
        "top_k": top_k,
        "total_params": total,
        "active_params": active,
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
        "bytes": sum(by_dtype.values()),
        "files": len(ckpt.files),
    }
