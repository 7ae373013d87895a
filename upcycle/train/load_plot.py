"""load.png: a layers × experts heatmap of expert load, white at the uniform share 1/E (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import torch

DPI = 100
ANNOTATE_MAX_CELLS = 48 * 16  # beyond this the numbers in the cells become unreadable


def figure_size(layers: int, experts: int) -> tuple[float, float]:
    """Inches (width, height); at DPI this is the PNG's exact size in pixels (no tight bounding box)."""
    return max(6.0, 0.55 * experts + 3.0), max(3.5, 0.3 * layers + 2.0)


def write_load_png(
    path: Path, load: torch.Tensor, layers: list[int], title: str, *, top: float | None = None
) -> tuple[int, int]:
    """Heatmap of load (L, E) (each row sums to 1); returns the (width, height) written in pixels.

    Diverging colours centred on 1/E: red cells get more than their share, blue ones less, white is uniform. One
    colour range for every layer: 0 to `top`, which is by default the largest share drawn (at least 2/E); give
    top=1/k (the most one expert can get of top-k assignments) for a fixed scale that compares across models.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the user's backend
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    num_layers, num_experts = load.shape
    uniform = 1.0 / num_experts
    values = load.double().numpy()
    if top is None:
        top = max(float(values.max()), 2 * uniform)  # at least as far above uniform as 0 is below it
    fig = Figure(figsize=figure_size(num_layers, num_experts), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        values,
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=top),
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers), [str(layer) for layer in layers])
    ax.tick_params(axis="y", labelsize=8 if num_layers > 24 else 10)
    if num_layers * num_experts <= ANNOTATE_MAX_CELLS:
        size = 9 if num_layers * num_experts <= 200 else 7
        for row in range(num_layers):
            for col in range(num_experts):
                value = values[row, col]
                far = abs(value - uniform) > 0.6 * (top - uniform if value > uniform else uniform)
                colour = "white" if far else "black"
                ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=size, color=colour)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, aspect=max(20, 1.5 * num_layers))
    bar.set_label("share of the layer's top-k assignments, %")
    bar.set_ticks([0.0, uniform, top], labels=["0", f"uniform 1/E = {100 * uniform:.3g}", f"{100 * top:.3g}"])
    bar.ax.axhline(uniform, color="black", linewidth=1.0)
    fig.savefig(path, dpi=DPI)
    width, height = figure_size(num_layers, num_experts)
    return round(width * DPI), round(height * DPI)
