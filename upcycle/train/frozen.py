"""Checkpoints that hold what changed.

With part of the model frozen (`--train experts|non-experts|router`), a checkpoint stores the trainable parameters
only, in float32 (TRAINABLE, by the loaded model's parameter names, which can differ from the layout of MODEL's
files: transformers converts some on loading, e.g. per-expert tensors to fused ones), beside their optimizer state,
the router-noise weights and the rest of the training state. The frozen parameters are MODEL's own weights,
referenced by MODEL's identity and a sha256 of its weight files (config.json, *.safetensors and their index),
hashed once per run, recorded in each checkpoint's trainer_state.json and compared on --resume: a resumed run loads
MODEL, checks the hash, and puts the checkpoint's trainable tensors over it. final/ is written from the model in
memory, which is that same reassembly.

With `--train all` every parameter trains, so the checkpoint holds the whole model as save_pretrained writes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UpcycleError

if TYPE_CHECKING:
    import torch
    from torch import nn

TRAINABLE = "trainable.safetensors"
FROZEN = "frozen"  # the trainer_state.json key: {"source": MODEL's identity, "sha256": ..., "trainable": [names]}


def source_sha256(folder: Path) -> str:
    """sha256 over the names and bytes of MODEL's config.json, weight files and their index (one pass; once per run)."""
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")))
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def trainable_names(model: nn.Module) -> list[str]:
    """The model's parameters that train, by native name (a tied weight once, under its first name)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(
    model: nn.Module, names: list[str], full_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The trainable tensors to store: from the module, or from a full state gathered from FSDP shards."""
    if full_state is not None:
        return {name: full_state[name] for name in names}
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().contiguous() for name in names}


def load_trainable(model: nn.Module, folder: Path, names: list[str]) -> None:
    """Put a checkpoint's trainable tensors over the model (loaded from MODEL): exactly the names this run trains."""
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(Path(folder) / TRAINABLE)
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise UpcycleError(f"the checkpoint {folder} is damaged ({TRAINABLE}: {exc}".splitlines()[0] + ")") from None
    if sorted(tensors) != sorted(names):
        raise UpcycleError(
            f"the checkpoint {folder} holds {len(tensors)} trainable tensors where this run trains {len(names)}; "
            "resume with the same --train (or start a new run with --force)"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            target = params[name]
            if target.shape != value.shape:
                raise UpcycleError(f"the checkpoint {folder} holds {name} with shape {tuple(value.shape)}, "
                                   f"the model {tuple(target.shape)}; resume with the same MODEL")  # fmt: skip
            target.copy_(value.to(target.dtype))


def check_source(saved: dict[str, Any], sha256: str, model: str, folder: Path) -> None:
    """Refuse to resume a checkpoint whose frozen weights are MODEL's when MODEL's files changed since."""
    if saved["sha256"] != sha256:
        raise UpcycleError(
            f"the checkpoint {folder} holds only the trained tensors and takes the rest from MODEL {model}, whose "
            f"files changed since (sha256 {saved['sha256'][:12]}… then, {sha256[:12]}… now); resume with the "
            "files the run started from (or start a new run with --force)"
        )


def weight_files(folder: Path, source: Path | None) -> dict[str, Path]:
    """Every tensor name of a checkpoint -> the safetensors file holding it: the checkpoint's own, and for a
    checkpoint that holds the trained tensors only, MODEL's files (`source`) for the rest."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for root in (source, Path(folder)):  # the checkpoint's tensors last, so they win
        if root is None:
            continue
        for file in sorted(Path(root).glob("*.safetensors")):
            if file.name.startswith("trainer_state"):
                continue
            with safe_open(file, "pt") as fh:
                where.update(dict.fromkeys(fh.keys(), file))
    return where


def frozen_source(folder: Path) -> Path | None:
    """The folder of the MODEL whose weights a checkpoint's frozen part is (None for a whole-model checkpoint)."""
    import json

    from ..source import resolve

    try:
        saved = json.loads((Path(folder) / "trainer_state.json").read_text()).get(FROZEN)
    except (OSError, ValueError):
        return None
    if not saved:
        return None
    try:
        return resolve(saved["source"], materialize=False, local_only=True).folder
    except UpcycleError:
        raise UpcycleError(
            f"the checkpoint {folder} holds only the trained tensors and takes the rest from MODEL "
            f"{saved['source']}, which is not on this machine; give the run directory where MODEL is"
        ) from None
