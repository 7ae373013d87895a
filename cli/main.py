"""The `upcycle` command: a thin Typer layer; each command calls one library function.

Bad input raises UpcycleError in the library; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from upcycle.errors import UpcycleError

app = typer.Typer(
    name="upcycle",
    help="Turn a dense causal LM into a native transformers Mixture-of-Experts checkpoint.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)


def _fmt_count(n: int) -> str:
    from upcycle.publish.card import _count

    return _count(n)


def _emit_json(data: dict[str, Any], target: str | None) -> None:
    if target is None:
        return
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        Path(target).write_text(text)


def _version(value: bool) -> None:
    if value:
        from upcycle import __version__

        out.print(f"upcycle {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Turn a dense causal LM into a native transformers Mixture-of-Experts checkpoint."""


# --- convert -----------------------------------------------------------------------------------------


@app.command()
def convert(
    src: Annotated[
        str,
        typer.Argument(metavar="SRC", help="Dense model: a folder, a Hub id (org/name), a .gguf file, or 'smollm2'."),
    ],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the MoE checkpoint to.")],
    experts: Annotated[int | None, typer.Option(help="Experts per MoE layer. [default: 8]")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Experts each token is routed to. [default: 2]")] = None,
    every: Annotated[
        int | None,
        typer.Option(help="Layer i becomes MoE iff (i+1) % EVERY == 0; 2 = layers 1,3,5... [default: 1]"),
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Explicit MoE layers, e.g. 1,5,9 (overrides --every).")] = None,
    init: Annotated[str | None, typer.Option(help="Expert construction: clone. [default: clone]")] = None,
    router_init: Annotated[str | None, typer.Option(help="Router weights: random or zero. [default: random]")] = None,
    router_std: Annotated[float | None, typer.Option(help="Std of a random router. [default: 0.02]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for every random choice. [default: 0]")] = None,
    target: Annotated[
        str | None, typer.Option(help="Native class: auto, mixtral, qwen2_moe, qwen3_moe. [default: auto]")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (as the source), bfloat16, float16, float32. [default: auto]")
    ] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="Largest shard, e.g. 5GB or 500MB. [default: 5GB]")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of SRC.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML recipe; flags given here win.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    json_out: Annotated[
        str | None,
        typer.Option("--json", help="Also write the plan summary as JSON to this file ('-': stdout)."),
    ] = None,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", metavar="REPO_ID", help="Publish OUT to this Hub repo when done.")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
) -> None:
    """Convert a dense causal LM into a Mixture-of-Experts checkpoint."""
    from upcycle.convert.pipeline import convert as run_convert
    from upcycle.convert.spec import build_spec, load_recipe

    recipe = load_recipe(config) if config else None
    spec = build_spec(
        recipe,
        experts=experts,
        top_k=top_k,
        every=every,
        layers=layers,
        init=init,
        router_init=router_init,
        router_std=router_std,
        seed=seed,
        target=target,
        dtype=dtype,
        max_shard_size=max_shard_size,
        revision=revision,
    )
    command = shlex.join(["upcycle", *sys.argv[1:]]) if sys.argv[1:2] == ["convert"] else None
    if dry_run:
        result = run_convert(src, out_dir, spec, dry_run=True)
        _print_plan(result.plan, title=f"Plan (dry run, nothing written): {src} -> {out_dir}")
        _gguf_note(result.source)
        _emit_json(result.plan.summary() | {"config": result.plan.config, "ops": result.plan.op_table()}, json_out)
        return
    with _byte_progress("converting") as progress:
        result = run_convert(
            src,
            out_dir,
            spec,
            force=force,
            command=command,
            progress=progress,
            push_to_hub=push_to_hub,
            private=private,
        )
    _print_plan(result.plan, title=f"Wrote {out_dir}")
    _gguf_note(result.source)
    if result.pushed is not None:
        out.print(f"Pushed {len(result.pushed.files)} files to {result.pushed.repo_id}: {result.pushed.url}")
    _emit_json(result.recipe["plan"] if result.recipe else result.plan.summary(), json_out)


@contextmanager
def _byte_progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal; nothing at all in a pipe or a log file."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _short(path: Path) -> str:
    """A path as a person would type it: ~ for the home folder."""
    home, text = str(Path.home()), str(path)
    return "~" + text[len(home) :] if text.startswith(home + "/") else text


def _gguf_note(source) -> None:
    if source.kind == "gguf":
        err.print(
            f"note: the GGUF source was loaded whole through transformers and dequantized to float32, "
            f"not streamed (cached in {_short(source.folder)})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _placement(moe: list[int] | tuple[int, ...], num_layers: int) -> str:
    return f"{len(moe)} of {num_layers}: " + ("all" if len(moe) == num_layers else ", ".join(map(str, moe)))


def _print_plan(plan, title: str) -> None:
    from upcycle.publish.card import human_bytes

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    moe = plan.moe_layers
    table.add_row("family -> target", f"{plan.family} -> {plan.architecture}")
    table.add_row("MoE layers", _placement(moe, plan.num_layers))
    table.add_row("experts / top-k", f"{plan.experts} / {plan.top_k}")
    table.add_row("exact at init", "yes" if plan.exact else "no")
    kinds: dict[str, list[int]] = {}
    for op in plan.ops:
        count_bytes = kinds.setdefault(op.kind, [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += op.nbytes
    table.add_row(
        "tensors written",
        f"{len(plan.ops)}: " + ", ".join(f"{n} {kind} ({human_bytes(b)})" for kind, (n, b) in kinds.items()),
    )
    table.add_row(
        "parameters",
        f"{_fmt_count(plan.dense_params)} dense -> {_fmt_count(plan.total_params)} total, "
        f"{_fmt_count(plan.active_params)} active per token",
    )
    table.add_row("bytes on disk", human_bytes(plan.total_bytes) + f" ({plan.config['dtype']})")
    out.print(table)


# --- verify ------------------------------------------------------------------------------------------


@app.command()
def verify(
    dense: Annotated[
        str, typer.Argument(metavar="DENSE", help="The dense source (folder, Hub id, .gguf or 'smollm2').")
    ],
    moe: Annotated[str, typer.Argument(metavar="MOE", help="The converted MoE (folder or Hub id).")],
    text: Annotated[Path | None, typer.Option(help="Text file to run; default: seeded random token ids.")] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to compare (capped by the models' context).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for the random token ids.")] = 0,
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")] = "float32",
    atol: Annotated[
        float | None,
        typer.Option(
            help="Largest allowed max |Δlogits|. [default: 1e-3 in float32; 1/16 (bfloat16) or 1/128 (float16) "
            "of the largest dense logit]"
        ),
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(help="Smallest allowed top-1 agreement (0..1). [default: 0.999 float32, 0.85 bf16, 0.95 fp16]"),
    ] = None,
    layerwise: Annotated[
        bool,
        typer.Option("--layerwise", help="Hold one layer at a time and check every copied tensor against its source."),
    ] = False,
    whole: Annotated[
        bool, typer.Option("--whole", help="Load both models whole; refuse if they do not fit in memory.")
    ] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the report as JSON to this file ('-': stdout).")
    ] = None,
    record: Annotated[
        bool, typer.Option("--record/--no-record", help="Store the result in MOE's upcycle.json and model card.")
    ] = True,
) -> None:
    """Check on logits that MOE computes what DENSE computed. Exit 0 within tolerance, 1 outside.

    Loads both models whole when they fit in memory, and goes layer by layer otherwise."""
    from upcycle.report.verify import verify as run_verify

    if layerwise and whole:
        raise UpcycleError("--layerwise and --whole exclude each other; give one (or neither: chosen by memory)")
    report = run_verify(
        dense,
        moe,
        text=text,
        tokens=tokens,
        seed=seed,
        dtype=dtype,
        atol=atol,
        min_agreement=min_agreement,
        mode="layerwise" if layerwise else "whole" if whole else "auto",
        record=record,
        notify=lambda note: err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True),
    )
    _print_verify(report, title=f"verify {dense} vs {moe} ({report.moe_class})")
    if report.recorded:
        out.print(f"result stored in {moe}: {report.recorded}", markup=False, highlight=False)
    _emit_json(report.to_dict(), json_out)
    if not report.passed:
        raise typer.Exit(1)


def _ok(good: bool) -> str:
    return "yes" if good else "NO"


def _print_verify(report, title: str) -> None:
    from upcycle.publish.card import human_bytes

    moe_rows = [row for row in report.layers if row.block_max_abs_diff is not None]
    if moe_rows:
        layers = Table(title="MoE layers: the block against the dense MLP on the same input", title_justify="left")
        for col in ("layer", "block max |Δ|", "limit", "hidden max |Δ| after", "ok"):
            layers.add_column(col)
        for row in moe_rows:
            layers.add_row(
                str(row.layer),
                f"{row.block_max_abs_diff:.3e}",
                f"≤ {row.block_limit:.2e}",
                f"{row.hidden_max_abs_diff:.3e}",
                _ok(row.passed),
            )
        out.print(layers)
    limits = report.limits
    table = Table(title=title, title_justify="left")
    for col in ("metric", "value", "limit", "ok"):
        table.add_column(col)
    table.add_row("mode", report.mode, "", "")
    table.add_row("tokens", f"{report.tokens} ({report.input}, {report.dtype})", "", "")
    if report.tensor_check is not None:
        check = report.tensor_check
        cast = f", {check.cast} after the cast" if check.cast else ""
        table.add_row(
            "copied tensors",
            f"{check.equal} of {check.compared} equal to the source{cast} ({human_bytes(check.bytes_read)} read)",
            "all",
            _ok(check.passed),
        )
    if report.layers:
        worst = [row for row in report.layers if row.block_max_abs_diff is not None]
        failed = [str(row.layer) for row in worst if not row.passed]
        table.add_row(
            "MoE blocks within limit",
            f"{len(worst) - len(failed)} of {len(worst)}" + (f"; failed: layer {', '.join(failed)}" if failed else ""),
            f"≤ {limits.layer_rtol:g} × max |MLP output|",
            _ok(not failed),
        )
    table.add_row(
        "max |Δlogits|",
        f"{report.max_abs_diff:.3e}",
        f"≤ {report.atol:.3g} ({limits.rule})" if limits else f"≤ {report.atol:g}",
        _ok(report.max_abs_diff <= report.atol),
    )
    table.add_row("mean KL(dense‖moe)", f"{report.mean_kl:.3e}", "", "")
    table.add_row(
        "top-1 agreement",
        f"{report.top1_agreement:.4%}",
        f"≥ {report.min_agreement:.2%}",
        _ok(report.top1_agreement >= report.min_agreement),
    )
    keys_ok = not report.missing_keys and not report.unexpected_keys
    table.add_row(
        "missing/unexpected keys",
        f"{len(report.missing_keys)}/{len(report.unexpected_keys)}",
        "0/0",
        _ok(keys_ok),
    )
    out.print(table)
    if report.tensor_check is not None:
        check = report.tensor_check
        problems = [("differs from its source", check.mismatched), ("missing", check.missing)]
        for what, names in [*problems, ("not in the plan", check.unexpected)]:
            for name in names[:10]:
                out.print(f"tensor {what}: {name}", markup=False, highlight=False, soft_wrap=True)
            if len(names) > 10:
                out.print(f"... and {len(names) - 10} more tensors {what} (all in --json)", markup=False)
    for row in report.layers:
        if not row.passed:
            out.print(
                f"layer {row.layer}: MoE block max |Δ| {row.block_max_abs_diff:.3e} > limit {row.block_limit:.2e}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    out.print("PASS" if report.passed else "FAIL", style="bold green" if report.passed else "bold red")


# --- inspect -----------------------------------------------------------------------------------------


@app.command()
def inspect(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="A dense or MoE model: folder, Hub id, .gguf or 'smollm2'.")
    ],
    revision: Annotated[str | None, typer.Option(help="Hub revision.")] = None,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the summary as JSON to this file ('-': stdout).")
    ] = None,
) -> None:
    """Show family, layers, MoE placement, experts, parameters and bytes of a checkpoint."""
    from upcycle.publish.card import human_bytes
    from upcycle.report.inspect import inspect as run_inspect

    info = run_inspect(path, revision)
    table = Table(title=f"inspect {path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("class", f"{info['architecture']} ({info['model_type']}, {info['kind']})")
    table.add_row("layers", str(info["layers"]))
    if info["kind"] == "moe":
        table.add_row("MoE layers", _placement(info["moe_layers"], info["layers"]))
        table.add_row("experts / top-k", f"{info['experts']} / {info['top_k']}")
    table.add_row(
        "parameters",
        f"{_fmt_count(info['total_params'])} total, {_fmt_count(info['active_params'])} active per token",
    )
    table.add_row("bytes on disk", ", ".join(f"{k}: {human_bytes(v)}" for k, v in info["bytes_by_dtype"].items()))
    if info["kind"] == "dense":
        table.add_row("upcycle can convert it", "yes" if info["upcycle_supports"] else "no (unsupported family)")
    out.print(table)
    _emit_json(info, json_out)


# --- push --------------------------------------------------------------------------------------------


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A folder written by `upcycle convert` (or train).")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repo to publish to, e.g. me/my-moe.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", "--branch", help="Branch to push to (created if missing).")
    ] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    include_checkpoints: Annotated[
        bool, typer.Option("--include-checkpoints", help="Also upload checkpoints/ (never optimizer states).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List every file and its size; upload nothing.")] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the file list as JSON to this file ('-': stdout).")
    ] = None,
) -> None:
    """Publish a converted model to the Hugging Face Hub."""
    from upcycle.publish.card import human_bytes
    from upcycle.publish.hub import push as run_push

    result = run_push(
        folder,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        include_checkpoints=include_checkpoints,
        dry_run=dry_run,
    )
    verb = "Would upload (dry run, nothing sent)" if dry_run else "Uploaded"
    out.print(f"{verb}: {result.folder} -> {repo_id}", markup=False, highlight=False)
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        table.add_row(path, human_bytes(size))
    table.add_row("total", human_bytes(result.total_bytes), style="bold")
    out.print(table)
    if result.skipped:
        out.print(f"left out: {', '.join(result.skipped)}")
    if result.url:
        out.print(f"{'Pull request' if result.pr_url else 'Commit'}: {result.pr_url or result.url}")
    _emit_json(result.to_dict(), json_out)


# --- entry point -------------------------------------------------------------------------------------


def _sigterm(signum, frame):  # turn a polite kill into the same clean-up as Ctrl-C
    raise KeyboardInterrupt


def run(argv: list[str] | None = None) -> int:
    """Console-script entry: one-line errors with exit code 2 for every bad input."""
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = app(args=argv, standalone_mode=False)  # returns the code of a typer.Exit raised by a command
    except UpcycleError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("interrupted; nothing was written", markup=False)
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            out.print(exc.format_message(), markup=False, highlight=False)
            return 2
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: upcycle {ctx.info_name} --help)" if ctx and ctx.info_name != "upcycle" else ""
        err.print(f"error: {exc.format_message()}{hint}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written", markup=False)
        return 130
    if code == 130:  # typer turns Ctrl-C inside a command into Exit(130)
        err.print("interrupted; nothing was written", markup=False)
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
