"""What a training run records about its experts beyond the per-step load: the weight divergence of the experts
at each save (a `divergence` record in metrics.jsonl) and load.png of the load at the end.

Both are cheap: the divergence is a Gram matrix of the experts' weights per MoE layer (no forward pass), and
load.png draws load figures the loop already has. The maths and the heatmap live in upcycle/report (the
routing report reads the same figures back); they are imported here lazily, only when a run writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ..arch import Target

LOAD_PNG = "load.png"


def divergence_record(model: nn.Module, target: Target, layers: list[int], step: int) -> dict[str, Any]:
    """{"kind": "divergence", "step", "layers": {layer: mean pairwise weight cosine}, "mean"} from the model in
    memory (one process: the weights are whole here; under FSDP the caller skips it)."""
    from .divergence import experts_at, weight_cosine

    per_layer = {str(layer): weight_cosine(experts_at(model, target, layer)) for layer in layers}
    mean = sum(per_layer.values()) / len(per_layer) if per_layer else None
    return {"kind": "divergence", "step": step, "layers": per_layer, "mean": mean}


def write_load_png(run_dir: Path, rows: list[dict[str, Any]], what: str) -> Path | None:
    """RUN_DIR/load.png: the layers × experts heatmap of `rows` (layer_rows of the loop); None without rows."""
    if not rows:
        return None
    import torch

    from .load_plot import write_load_png as draw

    load = torch.tensor([row["load"] for row in rows], dtype=torch.float64)  # (L, E), rows sum to 1
    layers = [row["layer"] for row in rows]
    path = Path(run_dir) / LOAD_PNG
    tmp = path.with_name(f".{LOAD_PNG}.tmp.png")  # drawn beside and renamed: never a half-written PNG
    draw(tmp, load, layers, f"Expert load at the end of training\n{Path(run_dir).name}: {what}")
    tmp.replace(path)
    return path
