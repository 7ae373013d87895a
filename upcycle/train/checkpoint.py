"""The run directory on disk: atomic step checkpoints, what exact resume needs, and final/ in the native format.

A checkpoint is complete when its folder is named `checkpoints/step-N`: it is written under a hidden temporary
name beside that and renamed into place only once every file is there, so a run killed at any moment leaves
either a complete checkpoint or a hidden leftover that the next `--resume` removes. Tensors go through
safetensors (the model, via save_pretrained) or torch.save read back with weights_only=True (optimizer,
scheduler and RNG states: plain tensors, numbers and lists).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UpcycleError
from ..outdir import staged_folder
from ..publish.card import CARD, RECIPE, update_recipe

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE = "trainer_state.json"  # step, tokens, the spec and what the data was
STATE_TENSORS = "trainer_state.safetensors"  # training-only weights that are not part of the model (router noise)
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng_state.pt"
STEP_DIR = re.compile(r"step-(\d+)")

# Options that fix the data order or the model being trained: a resumed run must not change them.
RESUME_FIXED = (
    "data",
    "text_field",
    "eval_data",
    "eval_fraction",
    "seq_len",
    "micro_batch",
    "grad_accum",
    "seed",
    "train",
    "router_noise",
    # optimizer.load_state_dict brings back each group's lr and weight decay: a new value would be ignored
    "lr",
    "weight_decay",
    "router_lr_scale",
)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / STATE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def stop_note(run_dir: Path) -> str:
    """What a stopped run left in RUN_DIR, as found after its clean-up (for the interrupted/terminated line)."""
    run_dir = Path(run_dir)
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return f"{run_dir} keeps its complete checkpoints (newest {newest.name}): continue with --resume"
    if run_dir.is_dir():
        return f"{run_dir} has no complete checkpoint yet, so there is nothing to resume; start again with --force"
    return f"no checkpoint was written and {run_dir} was not kept; start the run again"


def remove_partial(run_dir: Path) -> None:
    """Delete what a killed run left half-written: hidden folders under checkpoints/ and beside final/."""
    for parent in (Path(run_dir) / CHECKPOINTS, Path(run_dir)):
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
                    shutil.rmtree(entry, ignore_errors=True)


def _remove_tree(path: Path) -> None:
    """Rename out of the way first, so an interrupted delete never leaves a damaged folder under its real name."""
    doomed = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> list[int]:
    """Keep the newest `keep_last` complete checkpoints; returns the steps deleted."""
    found = checkpoints(run_dir)
    doomed = found[:-keep_last] if keep_last > 0 else found
    for _, path in doomed:
        _remove_tree(path)
    return [step for step, _ in doomed]


# --- RNG --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch's global generators: the CPU one and, on a GPU, each CUDA one (save_checkpoint adds the run's own, the
    router jitter and noise generators; the data order is a pure function of the step, so it needs no state)."""
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- step checkpoints -------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """What a checkpoint holds besides the model weights."""

    folder: Path
    state: dict[str, Any]  # trainer_state.json
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)  # trainer_state.safetensors

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically: model (native format, from_pretrained loads it), tokenizer,
    optimizer, scheduler, RNG states and trainer_state.json (last, though the rename is what makes it count).
    model_state / optimizer_state: full states gathered from FSDP shards, used instead of the module's own.
    rng: generator states of the run's own beside torch's (e.g. {"routing": RouterTap.rng_state()}).
    trainable: with part of the model frozen, the trainable tensors, written (with config.json) instead of the
    whole model; `state` then says where the frozen rest comes from (frozen.py)."""
    import torch
    from safetensors.torch import save_file

    from .frozen import TRAINABLE

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{step}"
    weights = trainable if trainable is not None else model_state if model_state is not None else model.state_dict()
    _check_free_space(root, final, weights)
    try:
        with staged_folder(final, force=True) as tmp:  # a step folder left by an abandoned later part is replaced
            if trainable is not None:
                model.config.save_pretrained(tmp)
                save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / TRAINABLE)
            else:
                model.save_pretrained(tmp, state_dict=model_state)
            tokenizer.save_pretrained(tmp)
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / OPTIMIZER)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            torch.save(rng_state() | (rng or {}), tmp / RNG)
            if tensors:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / STATE_TENSORS)
            (tmp / STATE).write_text(json.dumps(state | {"step": step}, indent=2) + "\n")
            write_checksums(tmp)  # staged_folder fsyncs the files and the folder before and after the rename
    except BaseException as exc:
        if not isinstance(exc, OSError) and _disk_full(exc):  # torch's zip writer, safetensors: no errno of theirs
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from None
        raise
    return final


# A full disk as the writers report it: torch's zip writer (a RuntimeError) and safetensors' SafetensorError
# (its Rust io::Error, StorageFull) do not raise OSError.
_DISK_FULL = ("No space left", "StorageFull", "file write failed", "Disk quota", "QuotaExceeded")
SAVE_MARGIN = 3  # a checkpoint's size is at most about this many times the model's weights (+ AdamW's 2 moments)


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and any(mark in str(exc) for mark in _DISK_FULL)


def _check_free_space(root: Path, final: Path, weights: dict[str, Any]) -> None:
    """Refuse to start a checkpoint that cannot fit: an OSError ENOSPC naming it (exit 3), the earlier ones intact."""
    need = SAVE_MARGIN * sum(t.numel() * t.element_size() for t in weights.values())
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(errno.ENOSPC, f"needs about {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free", str(final))


CHECKSUMS = "checksums.json"  # sha256 of every other file of the checkpoint, written at save, verified on resume
STATE_FIELDS = ("step", "fixed", "spec")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {p.relative_to(folder).as_posix(): _sha256(p) for p in files}
    (Path(folder) / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files (None when every checksum matches; a checkpoint written before
    checksums existed is taken as it is)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return None
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{CHECKSUMS} is unreadable"
    for name, expected in sums.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if _sha256(folder / name) != expected:
            return f"{name} does not match its checksum"
    return None


def load_training_state(folder: Path) -> TrainingState:
    import torch

    folder = Path(folder)
    problem = damage(folder)
    if problem is not None:
        raise UpcycleError(f"the checkpoint {folder} is damaged ({problem}); remove it to resume from an older one")
    try:
        state = json.loads((folder / STATE).read_text())
        missing = [name for name in STATE_FIELDS if name not in state]
        if missing:
            raise ValueError(f"{STATE} lacks {', '.join(missing)}")
        optimizer = torch.load(folder / OPTIMIZER, weights_only=True, map_location="cpu")
        scheduler = torch.load(folder / SCHEDULER, weights_only=True, map_location="cpu")
        rng = torch.load(folder / RNG, weights_only=True, map_location="cpu")
    except Exception as exc:  # a garbage file fails to unpickle with any exception
        raise UpcycleError(
            f"the checkpoint {folder} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "remove it to resume from an older one"
        ) from None
    tensors = {}
    if (folder / STATE_TENSORS).is_file():
        from safetensors.torch import load_file

        tensors = load_file(folder / STATE_TENSORS)
    return TrainingState(folder, state, optimizer, scheduler, rng, tensors)


def fixed_options(spec: Any) -> dict[str, Any]:
    """The options a resumed run must keep, with local data paths made absolute (the cwd may have changed)."""
    fixed = {name: getattr(spec, name) for name in RESUME_FIXED}
    for name in ("data", "eval_data"):
        if fixed[name] is not None and Path(fixed[name]).expanduser().exists():
            fixed[name] = str(Path(fixed[name]).expanduser().resolve())
    return fixed


# Options a resumed run may change, though the curve then differs from the run it continues: each gets a note.
RESUME_NOTED = ("aux_loss_coef", "z_loss_coef", "balance_rate", "warmup", "min_lr", "clip", "dtype")


def curve_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """A note for each RESUME_NOTED option that differs from the checkpoint's."""
    return [
        f"--{name.replace('_', '-')} is {current.get(name)!r} where the run had {saved.get(name)!r}: the resumed "
        "steps follow the new value, so the curve will not match an uninterrupted run"
        for name in RESUME_NOTED
        if name in saved and saved.get(name) != current.get(name)
    ]


def check_resumable(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """Refuse to resume with options that change the data order or the model being trained."""
    for name in RESUME_FIXED:
        if saved.get(name) != current.get(name):
            raise UpcycleError(
                f"--{name.replace('_', '-')} is {current.get(name)!r} but the run in {folder.parent.parent} was "
                f"started with {saved.get(name)!r}; resume with the same value (or start a new run with --force)"
            )


# --- the run directory ------------------------------------------------------------------------------------


class RunDir:
    """RUN_DIR's lifetime. A new run creates it only once every check has passed. With --force the previous run
    is moved aside (a hidden folder beside it) and deleted once the new run has written its first checkpoint; if
    the new run fails before that, the new folder is removed and the previous run is put back."""

    def __init__(self, path: Path, *, resume: bool, force: bool) -> None:
        self.path = Path(path)
        self.resume = resume
        self.force = force
        self._aside: Path | None = None
        self._kept = resume  # a resumed run already has checkpoints worth keeping

    def open(self) -> None:
        if self.resume:
            remove_partial(self.path)
            return
        if self.path.exists():
            if not self.force:
                raise UpcycleError(f"{self.path} already exists; pass --resume to continue it or --force to replace it")
            self._aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, self._aside / "previous")
        self.path.mkdir()

    def checkpoint_written(self) -> None:
        """The new run now holds something worth keeping: the previous run can go."""
        self._kept = True
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def close(self, ok: bool) -> None:
        if ok or self._kept:
            self.checkpoint_written()
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if self._aside is not None:
            os.replace(self._aside / "previous", self.path)
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None


@contextmanager
def run_directory(path: Path, *, resume: bool, force: bool) -> Iterator[RunDir]:
    run = RunDir(path, resume=resume, force=force)
    run.open()
    ok = False
    try:
        yield run
        ok = True
    finally:
        run.close(ok)


# --- final/ ---------------------------------------------------------------------------------------------


def write_final(
    run_dir: Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    source_folder: Path,
    recipe_fields: dict[str, Any],
    fallback_recipe: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    keep_fp32: Collection[str] = (),
) -> Path:
    """final/: the trained model in the native format, its tokenizer, and upcycle.json + model card. The source's
    recipe and card are carried over and extended with `recipe_fields` (the `training` record); a source that
    upcycle did not write gets `fallback_recipe` + `recipe_fields` as its upcycle.json.

    model_state: the full state gathered from FSDP shards (float32 masters), written in `dtype` when given, with
    config.json's dtype saying so (save_pretrained would take the dtype of the sharded fp32 model), except the
    entries named in `keep_fp32` (the selection-bias slot, which the single-process path also keeps in float32)."""
    final = Path(run_dir) / FINAL
    if model_state is not None and dtype is not None:
        model_state = {
            k: v.to(dtype) if v.is_floating_point() and k not in keep_fp32 else v for k, v in model_state.items()
        }
    with staged_folder(final, force=True) as tmp:
        model.save_pretrained(tmp, state_dict=model_state)
        if model_state is not None and dtype is not None:
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        for name in (RECIPE, CARD):
            if (Path(source_folder) / name).is_file():
                shutil.copyfile(Path(source_folder) / name, tmp / name)
        if not update_recipe(tmp, **recipe_fields) and not (tmp / RECIPE).is_file():
            (tmp / RECIPE).write_text(json.dumps(fallback_recipe | recipe_fields, indent=2) + "\n")
    return final
