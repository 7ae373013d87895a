"""`upcycle routing RUN_DIR --out REPORT_DIR`: how the experts of a training run moved apart, step by step.

Reads the load CV per MoE layer from metrics.jsonl's train records and the weight divergence (mean pairwise
cosine of the experts' weights) from its divergence records; a checkpoint without such a record (a run under
torchrun, or older than these records) gets it computed from its safetensors, one layer's expert tensors at a
time. Writes divergence.png and divergence.json; with --text also the routing report of final/ (or, without
final/, of the newest checkpoint).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..arch import Target, target_for_config
from ..errors import UpcycleError
from ..outdir import check_target, staged_folder
from ..train.checkpoint import FINAL, checkpoints
from ..train.divergence import weight_cosine
from ..train.frozen import frozen_source, weight_files
from ..train.metrics import METRICS

LOAD_DEFINITION = "each expert's share of the layer's top-k assignments; CV = std / mean of the shares (0 = balanced)"
DPI = 100
FIGURE_SIZE = (9.0, 7.0)  # inches; at DPI the PNG's exact size in pixels
LEGEND_MAX_LAYERS = 8  # beyond this the layers are told apart by a colour bar, not a legend


@dataclass(frozen=True)
class RunReport:
    out: Path
    data: dict[str, Any]  # what divergence.json holds (+ "routing" with --text)
    png_size: tuple[int, int]


def is_run_dir(path: str | Path) -> bool:
    """A folder `upcycle train` wrote: it has metrics.jsonl or checkpoints/."""
    path = Path(path)
    return path.is_dir() and ((path / METRICS).is_file() or (path / "checkpoints").is_dir())


def routing_run(run_dir: Path, out: Path, *, text: Path | None = None, force: bool = False, **routing_options):
    run_dir, out = Path(run_dir), Path(out)
    saved = checkpoints(run_dir)
    final = run_dir / FINAL
    has_final = (final / "config.json").is_file()
    if not saved and not has_final:
        raise UpcycleError(
            f"{run_dir} has no checkpoints and no final/ to read; give a run directory that `upcycle train` saved to"
        )
    if text is not None and not Path(text).is_file():
        raise UpcycleError(f"--text {text} does not exist (or is not a file); give a text file to route")
    check_target(out, force)

    records = _records(run_dir)
    load_cv = cv_series(records, "train")
    held_out = cv_series(records, "eval")
    routed = [r.get("routed_tokens") for r in records if r.get("kind") == "eval" and r.get("layers")]
    cosine: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("kind") == "divergence":
            for layer, value in r["layers"].items():
                cosine.setdefault(layer, {})[int(r["step"])] = value
    logged_steps = {step for per_step in cosine.values() for step in per_step}
    computed = []
    for step, folder in saved:
        if step not in logged_steps:
            for layer, value in checkpoint_cosine(folder).items():
                cosine.setdefault(str(layer), {})[step] = value
            computed.append(step)
    weight = {layer: sorted([s, v] for s, v in per_step.items()) for layer, per_step in cosine.items()}
    data = {
        "run": run_dir.resolve().name,
        "checkpoints": [step for step, _ in saved],
        "final": has_final,
        "load": LOAD_DEFINITION,
        "load_cv": load_cv,  # per logged step, over that step's training tokens
        "load_cv_tokens": "the training tokens of each logged step (different tokens at every step)",
        "load_cv_eval": held_out,  # per evaluation, over the held-out tokens (the same at every evaluation)
        "load_cv_eval_tokens": (
            f"the {routed[-1]:,} held-out tokens of every evaluation (the same tokens each time; the last "
            "evaluation's load is the training summary's)"
            if held_out and routed and routed[-1]
            else None
        ),
        "weight_cosine": dict(sorted(weight.items(), key=lambda kv: int(kv[0]))),
        "weight_cosine_from_checkpoints": computed,  # steps whose figure was computed here, not read from metrics
    }
    with staged_folder(out, force) as tmp:
        shown, counted = (
            (held_out, "held-out tokens, the same at each evaluation")
            if held_out
            else (
                load_cv,
                "each step's training tokens",
            )
        )
        size = write_divergence_png(tmp / "divergence.png", shown, data["weight_cosine"], data["run"], counted)
        if text is not None:
            from .routing import routing

            model = final if has_final else saved[-1][1]
            if model != final and frozen_source(model) is not None:
                raise UpcycleError(
                    f"{run_dir} has no final/ yet and its newest checkpoint holds the trained tensors only; finish "
                    "the run with `upcycle train ... --resume` (it writes final/), then route it"
                )
            inner = tmp / ".routing"
            report = routing(str(model), Path(text), inner, **routing_options)
            for entry in inner.iterdir():
                entry.replace(tmp / entry.name)
            shutil.rmtree(inner)
            data["routing"] = report.data | {"model": f"{data['run']}/{model.relative_to(run_dir)}"}
        (tmp / "divergence.json").write_text(json.dumps(data, indent=1) + "\n")
    return RunReport(out=out, data=data, png_size=size)


def cv_series(records: list[dict[str, Any]], kind: str) -> dict[str, list[list[float]]]:
    """{layer: [[step, load CV], ...]} from the `kind` records ("train" or "eval") that carry per-layer load."""
    series: dict[str, list[list[float]]] = {}
    for r in records:
        if r.get("kind") == kind:
            for row in r.get("layers", []):
                series.setdefault(str(row["layer"]), []).append([r["step"], row["cv"]])
    return dict(sorted(series.items(), key=lambda kv: int(kv[0])))


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line a killed run cut short is skipped."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# --- divergence from a checkpoint's safetensors ------------------------------------------------------------


def _pattern(template: str, **groups: str) -> re.Pattern:
    """A key template with {layer}/{expert} as a regex capturing them."""
    text = re.escape(template)
    for name, group in groups.items():
        text = text.replace(re.escape("{" + name + "}"), group)
    return re.compile(text)


def checkpoint_cosine(folder: Path) -> dict[int, float]:
    """Mean pairwise weight cosine per MoE layer of a saved model, reading only the expert tensors of one layer at
    a time (per-expert gate/up/down keys, or fused gate_up_proj/down_proj where a version saves them so)."""
    import torch
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UpcycleError(f"{folder} has no readable config.json ({exc}); remove the damaged checkpoint") from None
    target: Target | None = target_for_config(config)
    if target is None:
        raise UpcycleError(f"{folder} is a {config.get('model_type')!r} model, not an MoE upcycle trains")
    experts = int(config[target.config["experts"]])
    where = weight_files(folder, frozen_source(folder))  # a checkpoint of the trained tensors only: + MODEL's
    router = _pattern(target.router, layer=r"(\d+)")
    layers = sorted(int(m.group(1)) for key in where if (m := router.fullmatch(key)))
    if not layers:
        raise UpcycleError(f"{folder} holds no router weights of a {target.architecture}; is it a damaged checkpoint?")

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise UpcycleError(f"{folder} lacks the expert tensor {key}; remove the damaged checkpoint")
        with safe_open(where[key], "pt") as fh:
            return fh.get_tensor(key)

    out = {}
    for layer in layers:
        fused = target.modules["experts"].format(layer=layer)
        if target.fused:  # the class's own fused keys on disk (GraniteMoe): [E, rows of the roles, cols] each
            parts = {}
            for template, roles in target.fused.items():
                parts |= dict(zip(roles, read(template.format(layer=layer)).chunk(len(roles), dim=1), strict=True))
            gate_up, down = torch.cat([parts["gate"], parts["up"]], dim=1), parts["down"]  # (E, 2I, H), (E, H, I)
        elif f"{fused}.gate_up_proj" in where:
            gate_up, down = read(f"{fused}.gate_up_proj"), read(f"{fused}.down_proj")  # (E, 2I, H), (E, H, I)
        else:

            def key(role: str, e: int, layer: int = layer) -> str:
                return target.expert[role].format(layer=layer, expert=e)

            first = [r for r in ("gate", "up", "gate_up") if r in target.expert]  # generic MLPs: up, or gate_up
            gate_up = torch.stack([torch.cat([read(key(role, e)) for role in first]) for e in range(experts)])
            down = torch.stack([read(key("down", e)) for e in range(experts)])  # (E, H, I)
        out[layer] = weight_cosine(SimpleNamespace(gate_up_proj=gate_up, down_proj=down))
    return out


# --- the picture ---------------------------------------------------------------------------------------


def write_divergence_png(
    path: Path,
    load_cv: dict[str, list[list[float]]],
    cosine: dict[str, list[list[float]]],
    run: str,
    counted: str = "each step's training tokens",
) -> tuple[int, int]:
    """Two panels over the training step: load CV per MoE layer (top, over the tokens `counted` names) and mean
    pairwise weight cosine (bottom). Steps and layers are integers on every axis and colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    layers = sorted({int(k) for k in (*load_cv, *cosine)})
    legend = len(layers) <= LEGEND_MAX_LAYERS
    norm = Normalize(min(layers, default=0), max(max(layers, default=0), min(layers, default=0) + 1))
    cmap = colormaps["tab10" if legend else "viridis"]

    def colour(layer: int):
        return cmap(layers.index(layer) % 10) if legend else cmap(norm(layer))

    fig = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    fig.suptitle(f"Expert load and divergence over training: {run}")
    for ax, series, what in ((top, load_cv, "load"), (bottom, cosine, "cosine")):
        for layer in layers:
            points = series.get(str(layer), [])
            if points:
                xs, ys = zip(*points, strict=True)
                marker = "o" if what == "cosine" or len(points) < 30 else None
                ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1.2, color=colour(layer), label=str(layer))
        if not series:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.grid(True, alpha=0.3)
    top.set_title(f"load imbalance: CV of the experts' shares of top-k assignments over {counted}", fontsize=10)
    top.set_ylabel("load CV")
    bottom.set_title("expert divergence: mean pairwise cosine of the experts' weights (1 = identical)", fontsize=10)
    bottom.set_ylabel("weight cosine")
    bottom.set_xlabel("training step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 2.5
    bottom.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))  # 0.99992, not 1e-5 + 0.9999
    if legend and layers:
        top.legend(title="MoE layer", fontsize=8, loc="best")
    elif layers:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[top, bottom], label="MoE layer", aspect=40)
        bar.locator = MaxNLocator(integer=True)  # layer indices: 0, 4, 8, not 2.5
        bar.update_ticks()
    fig.savefig(path, dpi=DPI)
    return round(FIGURE_SIZE[0] * DPI), round(FIGURE_SIZE[1] * DPI)
