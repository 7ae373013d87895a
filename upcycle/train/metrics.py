"""What a run reports: metrics.jsonl (+ TensorBoard) in RUN_DIR, and the progress a person watches.

Records are plain dicts, one JSON object per line, with `kind` "train", "skip", "eval" or "divergence" (see
docs/train.md), each stamped with `time` (UTC, ISO 8601) and `elapsed_s` (seconds since this process's run began).
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fmt import si

if TYPE_CHECKING:
    import torch

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Forget what a killed run logged after the checkpoint it resumes from, so the file shows one curve."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{METRICS}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl (flushed each time, so a killed run keeps what it logged) and,
    with --tensorboard, writes the same numbers as TensorBoard scalars under RUN_DIR/tensorboard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, start_step: int = 0) -> None:
        self._file = open(Path(run_dir) / METRICS, "a")  # noqa: SIM115 - closed in close()
        self._t0 = time.monotonic()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run wrote after the checkpoint this run resumes from
            self._tb = SummaryWriter(
                str(Path(run_dir) / TENSORBOARD), purge_step=start_step + 1 if start_step else None
            )

    def write(self, record: dict[str, Any]) -> None:
        stamp = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "elapsed_s": self.elapsed()}
        self._file.write(json.dumps(record | stamp) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        step, prefix = record["step"], record["kind"]
        for key, value in record.items():
            if key not in ("step", "kind") and isinstance(value, int | float) and not isinstance(value, bool):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        import torch

        layers = record.get("layers", [])
        if isinstance(layers, dict):  # divergence: {layer: mean pairwise weight cosine}
            for layer, value in layers.items():
                self._tb.add_scalar(f"divergence/weight_cosine/layer_{layer}", value, step)
            layers = []
        router = "router" if prefix == "train" else f"{prefix}/router"  # eval: the load over the held-out tokens
        for row in layers:
            self._tb.add_scalar(f"{router}/cv/layer_{row['layer']}", row["cv"], step)
            if "dropped" in row:
                self._tb.add_scalar(f"{router}/dropped/layer_{row['layer']}", row["dropped"], step)
            # the E load shares of the layer as a distribution: a wide one is an unbalanced layer
            self._tb.add_histogram(f"{router}/load/layer_{row['layer']}", torch.tensor(row["load"]), step)
        self._tb.flush()

    def elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def layer_rows(counts: dict[int, torch.Tensor], dropped: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """The `layers` rows of a train record (and of the summary's load): per MoE layer, each expert's share of the
    routed assignments, their CV, max and min, and with `dropped` the share capacity dropped. One host sync for
    all the layers."""
    import torch

    from .losses import load_row

    layers = sorted(counts)
    table = torch.stack([load_row(counts[layer]) for layer in layers]).tolist() if layers else []  # (L, E + 3)
    rows = []
    for layer, values in zip(layers, table, strict=True):
        row = {"layer": layer, "load": values[:-3], "cv": values[-3], "max": values[-2], "min": values[-1]}
        if dropped is not None:
            row["dropped"] = dropped[layer]
        rows.append(row)
    return rows


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def train_line(r: dict[str, Any], total: int, eta: float | None = None) -> str:
    from .losses import LOSSES

    names = [name for name in ("loss", "lm", *LOSSES) if name in r]  # a dense model's records have no router terms
    terms = "".join(f"{name} {r[name]:.4f}  " for name in names)
    return (
        f"step {r['step']}/{total}  {terms}lr {r['lr']:.2e}  grad-norm {r['grad_norm']:.3f}  "
        f"{si(r['tokens_per_s'])} tok/s" + (f"  ETA {duration(eta)}" if eta is not None else "")
    )


def eval_line(r: dict[str, Any]) -> str:
    ppl = r["perplexity"] if r["perplexity"] is not None else math.inf  # the record writes an overflow as null
    on = " on assistant tokens" if r.get("loss_on") == "assistant tokens" else ""
    return f"eval at step {r['step']}: loss{on} {r['eval_loss']:.4f}, perplexity {ppl:.2f}" + (
        "" if math.isfinite(ppl) else " (overflow)"
    )


class Display:
    """A rich progress bar with the key figures on a terminal, one plain line per logged step otherwise; silent
    without a console (library use, tests)."""

    def __init__(self, console: Any | None) -> None:
        self.console = console
        self._bar = None
        self._task = None
        self._total = 0
        self._start = (0, 0.0)  # (step, monotonic time) when the loop started

    def eta(self, step: int) -> float | None:
        """Seconds left at the pace since the loop started (evaluations and saves included)."""
        first, t0 = self._start
        if step <= first:
            return None
        return (time.monotonic() - t0) / (step - first) * (self._total - step)

    def _print(self, text: str) -> None:
        if self.console is not None:
            target = self._bar.console if self._bar is not None else self.console
            target.print(text, markup=False, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        self._print(f"note: {text}")

    def info(self, text: str) -> None:
        self._print(text)

    def start(self, start_step: int, total: int) -> None:
        self._total = total
        self._start = (start_step, time.monotonic())
        if self.console is None or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.fields[phase]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=total, completed=start_step, figures="", phase="training")

    def phase(self, name: str) -> None:
        """What the run is doing after a step ("evaluating", "saving"): in the bar until the next step; on a plain
        console, a line."""
        if self._bar is not None:
            self._bar.update(self._task, phase=name)
        elif self.console is not None:
            self._print(f"{name}...")

    def train(self, record: dict[str, Any], logged: bool) -> None:
        if self._bar is not None:
            figures = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {si(record['tokens_per_s'])} tok/s"
            self._bar.update(self._task, completed=record["step"], figures=figures, phase="training")
        elif logged:
            self._print(train_line(record, self._total, self.eta(record["step"])))

    def skip(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"])
        self._print(f"step {record['step']}: {record['reason']}; step skipped (no update)")

    def eval(self, record: dict[str, Any]) -> None:
        self._print(eval_line(record))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
