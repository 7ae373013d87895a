"""The public Python API: one function per command, the same functions the `upcycle` command calls.

    from upcycle import convert, verify
    result = convert("smollm2", "moe", experts=4, top_k=2)   # options: ConvertSpec fields
    report = verify("smollm2", "moe")                         # report.passed, report.max_abs_diff

Options are keyword arguments named like the YAML keys and the flags (`top_k` for `--top-k`), validated as the
flags are; a `recipe` / `config` dict stands for `--config FILE`. Bad input raises UpcycleError (its
`exit_code` is the command's); nothing here prints, exits, or touches the process beyond what the command does.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import UpcycleError
from .options import dtype_name

if TYPE_CHECKING:
    from rich.console import Console

    from .convert.pipeline import ConvertResult
    from .convert.spec import ConvertSpec
    from .publish.hub import PushResult
    from .report.routing import RoutingReport
    from .report.routing_run import RunReport
    from .report.verify import VerifyReport
    from .train.loop import TrainResult
    from .train.spec import TrainSpec

Progress = Callable[[int, int], None]


def convert(
    src: str,
    out: str | Path,
    spec: ConvertSpec | None = None,
    *,
    recipe: dict[str, Any] | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    mergekit_config: str | Path | None = None,
    **options: Any,
) -> ConvertResult:
    """Convert the dense model SRC (folder, Hub id, .gguf file or 'smollm2') into an MoE checkpoint at OUT.

    Give a ConvertSpec, or its fields as keyword options (`experts=8, top_k=2, init="split"`) over an optional
    `recipe` dict (a YAML recipe's content). With `dry_run`, only plan: `result.plan` says what would be
    written. `progress(done_bytes, total_bytes)` is called while writing. Returns the plan, the source and
    the recipe written to OUT/upcycle.json (and the push, with `push_to_hub`). `mergekit_config`: the
    mergekit-moe YAML the options came from (OUT keeps a copy, which the recorded command names).
    """
    from .convert.pipeline import convert as run
    from .convert.spec import ConvertSpec, build_spec

    if spec is not None and (options or recipe):
        raise UpcycleError("give either a ConvertSpec or its options (and recipe), not both")
    _known_options(options, ConvertSpec)
    spec = spec if spec is not None else build_spec(recipe, **options)
    return run(
        src,
        Path(out),
        spec,
        force=force,
        dry_run=dry_run,
        progress=progress,
        push_to_hub=push_to_hub,
        private=private,
        base_model=base_model,
        mergekit_config=Path(mergekit_config) if mergekit_config is not None else None,
    )


def verify(
    dense: str,
    moe: str | Path,
    *,
    text: str | Path | None = None,
    tokens: int = 256,
    seed: int = 0,
    dtype: str = "float32",
    atol: float | None = None,
    min_agreement: float | None = None,
    mode: Literal["auto", "whole", "layerwise"] = "auto",
    record: bool = False,
    notify: Callable[[str], None] | None = None,
    sources: tuple[str, ...] | list[str] = (),
) -> VerifyReport:
    """Check on logits that MOE computes what DENSE computed; `report.passed` says whether it is within tolerance.

    `text` is a text file to run (default: seeded random token ids). `mode` "whole" loads both models,
    "layerwise" holds one layer at a time and also compares every copied tensor with its source; "auto"
    chooses by memory. With `record`, the result is stored in MOE's upcycle.json and model card.
    `notify(line)` receives notes (e.g. which mode was chosen and why). `sources`: the --expert-from models an MoE
    was made from, in order: each tensor is then checked against its own source (mode "sources").
    """
    from .report.verify import verify as run

    return run(
        dense,
        str(moe),
        text=Path(text) if text is not None else None,
        tokens=tokens,
        seed=seed,
        dtype=dtype_name(dtype),
        atol=atol,
        min_agreement=min_agreement,
        mode=mode,
        record=record,
        notify=notify,
        sources=tuple(sources),
    )


def inspect(path: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Family, layers, MoE placement, experts, parameters and bytes of a checkpoint (the `--json` of inspect)."""
    from .report.inspect import inspect as run

    return run(str(path), revision)


def routing(
    model: str | Path,
    out: str | Path,
    *,
    text: str | Path | None = None,
    max_tokens: int = 32768,
    seq_len: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    sample_tokens: int = 512,
    html_tokens: int = 4096,
    load_scale: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> RoutingReport | RunReport:
    """Where an MoE routes the tokens of TEXT, written to OUT (routing.json, PNGs, tokens.html).

    MODEL is an MoE (folder or Hub id), or a run directory of `train`: then OUT gets the expert load and
    divergence over the run (divergence.png/json), and the routing report of final/ when `text` is given.
    `report.data` is what routing.json holds.
    """
    from .report.routing import routing as run
    from .report.routing_run import is_run_dir, routing_run

    options = dict(
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        dtype=dtype_name(dtype),
        sample_tokens=sample_tokens,
        html_tokens=html_tokens,
        load_scale=load_scale,
    )
    text_path = Path(text) if text is not None else None
    if is_run_dir(model):
        return routing_run(Path(model), Path(out), text=text_path, force=force, progress=progress, **options)
    if text_path is None:
        raise UpcycleError("say what text to route: --text FILE (only a RUN_DIR of `upcycle train` needs none)")
    return run(str(model), text_path, Path(out), force=force, progress=progress, **options)


def train(
    model: str | Path,
    run_dir: str | Path | None,
    spec: TrainSpec | None = None,
    *,
    config: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    console: Console | None = None,
    **options: Any,
) -> TrainResult:
    """Continue pretraining the upcycled MoE MODEL on text; checkpoints, metrics and final/ go to RUN_DIR.

    Give a TrainSpec, or its fields as keyword options (`data="corpus.txt", steps=100, lr=1e-4`) over an
    optional `config` dict (a YAML run config's content). With `dry_run`, only plan: `result.plan`.
    `console` (a rich Console) receives notes and progress; None keeps the run silent.
    """
    from .train.loop import train as run
    from .train.spec import TrainSpec, build_train_spec

    if spec is not None and (options or config):
        raise UpcycleError("give either a TrainSpec or its options (and config), not both")
    _known_options(options, TrainSpec)
    spec = spec if spec is not None else build_train_spec(config, **options)
    folder = Path(run_dir) if run_dir is not None else None
    return run(str(model), folder, spec, resume=resume, force=force, dry_run=dry_run, console=console)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    include_checkpoints: bool = False,
    dry_run: bool = False,
) -> PushResult:
    """Publish FOLDER (written by convert or train) to the Hub repo REPO_ID; `dry_run` lists files, sends nothing."""
    from .publish.hub import push as run

    return run(
        Path(folder),
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        include_checkpoints=include_checkpoints,
        dry_run=dry_run,
    )


def _known_options(options: dict[str, Any], spec_class: type) -> None:
    """A misspelt keyword is an error here (the flags' builder skips names it does not know)."""
    known = {f.name for f in fields(spec_class)} - {"extra"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UpcycleError(
            f"unknown option {', '.join(unknown)} for {spec_class.__name__}; known: {', '.join(sorted(known))}"
        )


class CallablePackage(types.ModuleType):
    """A package that is also the API function of its name: `upcycle.convert` stays the package (its modules
    import as before) and `upcycle.convert(src, out, ...)` calls `api.convert`. `__wrapped__` is that function,
    so `inspect.signature` and `help(upcycle.convert.__wrapped__)` show its arguments and docstring."""

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)


def make_callable(package: types.ModuleType, function: Callable[..., Any]) -> None:
    package.__class__ = CallablePackage
    package.__wrapped__ = function  # type: ignore[attr-defined]
