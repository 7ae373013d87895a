"""The `upcycle` command: a thin Typer layer; each command calls one library function.

Bad input raises UpcycleError in the library, and the operating system raises OSError; here either becomes
one line on stderr, with exit code 2 (the user can fix it) or 3 (the machine is at fault). With `--json -`,
stdout carries the JSON alone and everything meant for people goes to stderr.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from upcycle.errors import UpcycleError, describe_os_error


class _Command(TyperCommand):
    """Usage lines as people write them: `SRC OUT`, not typer's `{SRC} {OUT}` for required arguments."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


class _App(typer.Typer):
    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    name="upcycle",
    help="Turn a dense causal LM into a native transformers Mixture-of-Experts checkpoint.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()  # stdout, or stderr while stdout carries JSON (see _json_owns_stdout)
err = Console(stderr=True)


def _json_owns_stdout(json_out: str | None) -> None:
    """With `--json -`, stdout is for the JSON alone: the tables and notes go to stderr."""
    out.file = sys.stderr if json_out == "-" else None  # None: rich's default, the current sys.stdout


def _say(console: Console, text: str, **style: Any) -> None:
    """One plain line: no markup in paths, no wrapping, no padding."""
    console.print(text, markup=False, highlight=False, soft_wrap=True, **style)


def _show(title: str, table: Table) -> None:
    """A title line, then the table (a rich table title is padded with spaces to the table's width)."""
    _say(out, title)
    out.print(table)


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
    init: Annotated[
        str | None, typer.Option(help="Expert construction: clone, split, drop or fine-grained. [default: clone]")
    ] = None,
    split_by: Annotated[
        str | None,
        typer.Option(
            help="With --init split: how neurons are grouped: random, cluster, or coactivation (MoEfication's "
            "co-activation graph on --calibration text). [default: random]"
        ),
    ] = None,
    drop_ratio: Annotated[
        float | None,
        typer.Option(help="With --init drop: fraction of neurons re-initialised per expert. [default: 0.5]"),
    ] = None,
    noise: Annotated[
        float | None, typer.Option(help="With --init clone: std of multiplicative N(1, σ) noise on the experts.")
    ] = None,
    granularity: Annotated[
        int | None, typer.Option(help="With --init fine-grained: parts each FFN is cut into (divides N and top-k).")
    ] = None,
    fine_grained_scale: Annotated[
        str | None,
        typer.Option(
            help="With --init fine-grained: down (scale down_proj by G: exact) or cube-root (gate, up and down "
            "each by G^(1/3), Megatron-Core: not exact through SiLU). [default: down]"
        ),
    ] = None,
    shared_experts: Annotated[
        int | None, typer.Option(help="Always-on shared expert from the dense FFN (qwen2_moe only). [default: 0]")
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(
            help="topk-softmax (renormalise the kept weights) or softmax-topk (Qwen targets). [default: topk-softmax]"
        ),
    ] = None,
    router_init: Annotated[
        str | None,
        typer.Option(
            help="Router weights: random, zero, kmeans (from --calibration text) or hidden (mean hidden state of "
            "each expert's --expert-prompts). [default: random]"
        ),
    ] = None,
    expert_prompts: Annotated[
        Path | None,
        typer.Option(help="With --router-init hidden: a YAML (or JSON) list with one list of prompts per expert."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="With --router-init kmeans or --split-by coactivation: a plain text file the dense model is run on."
        ),
    ] = None,
    calibration_tokens: Annotated[
        int | None, typer.Option(help="With --calibration: tokens of the text used. [default: 4096]")
    ] = None,
    router_std: Annotated[float | None, typer.Option(help="Std of a random router. [default: 0.02]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for every random choice. [default: 0]")] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Native class: auto, mixtral, qwen2_moe, qwen3_moe, flex_olmo, granitemoe, ernie4_5_moe, "
            "hunyuan_v1_moe; or generic (upcycle's own wrapper, which needs trust_remote_code outside upcycle). "
            "[default: auto]"
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="auto (as the source), bfloat16, float16, float32 (or bf16, fp16, fp32). [default: auto]"),
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
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", metavar="ORG/NAME", help="Hub model SRC was made from, for the model card."),
    ] = None,
) -> None:
    """Convert a dense causal LM into a Mixture-of-Experts checkpoint."""
    from upcycle.convert.pipeline import convert as run_convert
    from upcycle.convert.spec import build_spec, load_recipe

    _json_owns_stdout(json_out)
    recipe = load_recipe(config) if config else None
    spec = build_spec(
        recipe,
        experts=experts,
        top_k=top_k,
        every=every,
        layers=layers,
        init=init,
        split_by=split_by,
        drop_ratio=drop_ratio,
        noise=noise,
        granularity=granularity,
        fine_grained_scale=fine_grained_scale,
        shared_experts=shared_experts,
        routing=routing,
        router_init=router_init,
        router_std=router_std,
        calibration=str(calibration) if calibration is not None else None,
        calibration_tokens=calibration_tokens,
        expert_prompts=str(expert_prompts) if expert_prompts is not None else None,
        seed=seed,
        target=target,
        dtype=dtype,
        max_shard_size=max_shard_size,
        revision=revision,
    )
    if dry_run:
        result = run_convert(src, out_dir, spec, dry_run=True, base_model=base_model)
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
            progress=progress,
            push_to_hub=push_to_hub,
            private=private,
            base_model=base_model,
        )
    _print_plan(result.plan, title=f"Wrote {out_dir}")
    _gguf_note(result.source)
    if result.pushed is not None:
        _say(out, f"Pushed {len(result.pushed.files)} files to {result.pushed.repo_id}: {result.pushed.url}")
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
        done = (
            f"was loaded whole through transformers and dequantized to float32, not streamed (cached in "
            f"{_short(source.folder)})"
            if source.folder
            else "is not dequantized yet: this plan comes from its metadata; the conversion loads it whole "
            "through transformers into float32 and caches that"
        )
        err.print(
            f"note: the GGUF source {done}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _placement(moe: list[int] | tuple[int, ...], num_layers: int) -> str:
    return f"{len(moe)} of {num_layers}: " + ("all" if len(moe) == num_layers else ", ".join(map(str, moe)))


def _print_plan(plan, title: str) -> None:
    from upcycle.publish.card import human_bytes

    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    moe = plan.moe_layers
    table.add_row("family -> target", f"{plan.family} -> {plan.architecture}")
    table.add_row("MoE layers", _placement(moe, plan.num_layers))
    table.add_row("experts / top-k", f"{plan.experts} / {plan.top_k}")
    table.add_row("exact at init", "yes" if plan.exact else "no")
    for cast in plan.casts:
        measured = " (measured on the weights)" if cast.check is not None else ""
        table.add_row("cast", cast.describe() + measured)
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
    _show(title, table)
    for note in plan.notes:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


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
    engine: Annotated[
        str | None,
        typer.Option(help="Also run MOE in this inference engine (llama.cpp) and compare its greedy tokens."),
    ] = None,
    llama_cpp: Annotated[
        Path | None, typer.Option(help="A llama.cpp tree with convert_hf_to_gguf.py and build/bin/ (--engine).")
    ] = None,
) -> None:
    """Check on logits that MOE computes what DENSE computed. Exit 0 within tolerance, 1 outside.

    Loads both models whole when they fit in memory, and goes layer by layer otherwise."""
    from upcycle.report.verify import verify as run_verify

    if layerwise and whole:
        raise UpcycleError("--layerwise and --whole exclude each other; give one (or neither: chosen by memory)")
    runner = _engine_runner(engine, llama_cpp)
    _json_owns_stdout(json_out)
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
    engine_report = runner(dense, moe) if runner else None
    if engine_report is not None:
        _print_engine(engine_report)
    if report.recorded:
        _say(out, f"result stored in {moe}: {report.recorded}")
    _emit_json(report.to_dict() | ({"engine": engine_report.to_dict()} if engine_report else {}), json_out)
    if not report.passed or (engine_report is not None and not engine_report.passed):
        raise typer.Exit(1)


def _engine_runner(engine: str | None, llama_cpp: Path | None):
    """The engine check `verify --engine` runs after the logits, found before any model loads (or None)."""
    if engine is None:
        if llama_cpp is not None:
            raise UpcycleError("--llama-cpp DIR is used with --engine llama.cpp; add it")
        return None
    if engine.lower() not in ("llama.cpp", "llamacpp", "llama-cpp"):
        raise UpcycleError(f"--engine {engine!r} is not one we can run; the one available is llama.cpp")
    from upcycle.report.engines import llama_cpp as engine_mod

    found = engine_mod.find(llama_cpp)
    return lambda dense, moe: engine_mod.check(dense, moe, engine=found)


def _print_engine(report) -> None:
    table = Table()
    for col in ("metric", "value", "limit", "ok"):
        table.add_column(col)
    table.add_row("engine", f"{report.engine} ({report.where})", "", "")
    table.add_row("GGUF (llama.cpp's converter)", f"{report.gguf_bytes / 1e6:.1f} MB", "", "")
    table.add_row(
        "greedy tokens equal to transformers (dense)",
        f"{report.matching} of {len(report.expected)}",
        "all",
        _ok(report.passed),
    )
    _show(f"{report.engine}: greedy continuation of {report.prompt!r}", table)


def _ok(good: bool) -> str:
    return "yes" if good else "NO"


def _print_verify(report, title: str) -> None:
    from upcycle.publish.card import human_bytes

    moe_rows = [row for row in report.layers if row.block_max_abs_diff is not None]
    if moe_rows:
        layers = Table()
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
        _show("MoE layers: the block against the dense MLP on the same input", layers)
    limits = report.limits
    table = Table()
    for col in ("metric", "value", "limit", "ok"):
        table.add_column(col)
    table.add_row("mode", report.mode, "", "")
    table.add_row("tokens", f"{report.tokens} ({report.input}, {report.dtype})", "", "")
    if report.plan_exact is not None:
        table.add_row("exact at init (plan)", "yes" if report.plan_exact else "no (note below)", "", "")
    if report.tensor_check is not None:
        check = report.tensor_check
        cast = f", {check.cast} after the cast" if check.cast else ""
        computed = f", {check.computed} recomputed by the expert method" if check.computed else ""
        table.add_row(
            "copied tensors",
            f"{check.equal} of {check.compared} equal to the source{cast}{computed} "
            f"({human_bytes(check.bytes_read)} read)",
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
    _show(title, table)
    if report.tensor_check is not None:
        check = report.tensor_check
        problems = [("differs from its source", check.mismatched), ("missing", check.missing)]
        for what, names in [*problems, ("not in the plan", check.unexpected)]:
            for name in names[:10]:
                _say(out, f"tensor {what}: {name}")
            if len(names) > 10:
                _say(out, f"... and {len(names) - 10} more tensors {what} (all in --json)")
    for row in report.layers:
        if not row.passed:
            worse = f"MoE block max |Δ| {row.block_max_abs_diff:.3e} > limit {row.block_limit:.2e}"
            _say(out, f"layer {row.layer}: {worse}")
    if report.plan_exact is False:  # a table cell would wrap the reason: it gets a line of its own
        why = f" ({report.plan_why})" if report.plan_why else ""
        _say(out, f"note: the plan did not claim this MoE exact at init{why}; the numbers are expected to differ")
    _say(out, "PASS" if report.passed else "FAIL", style="bold green" if report.passed else "bold red")


# --- inspect -----------------------------------------------------------------------------------------


@app.command()
def inspect(
    path: Annotated[
        str | None,
        typer.Argument(metavar="PATH", help="A dense or MoE model: folder, Hub id, .gguf or 'smollm2'."),
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision.")] = None,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the summary as JSON to this file ('-': stdout).")
    ] = None,
    families: Annotated[
        bool, typer.Option("--families", help="List every dense family upcycle converts: targets, exactness, caveats.")
    ] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="With --families: print the README's Markdown table.")
    ] = False,
) -> None:
    """Show family, layers, MoE placement, experts, parameters and bytes of a checkpoint (or, with --families,
    the table of supported dense families)."""
    from upcycle.publish.card import human_bytes
    from upcycle.report.inspect import inspect as run_inspect

    _json_owns_stdout(json_out)
    if families or path is None:
        _family_table(json_out, markdown, given=path)
        return
    info = run_inspect(path, revision)
    table = Table(show_header=False)
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
    if info.get("format") == "gguf":
        quant = f"{info['file_type']}; tensor types {', '.join(info['quantization'])}"
        table.add_row("GGUF file", f"{human_bytes(info['file_bytes'])} ({quant}); read from its header only")
    if info["kind"] == "dense":
        table.add_row("upcycle can convert it", "yes" if info["upcycle_supports"] else "no (unsupported family)")
    _show(f"inspect {path}", table)
    _emit_json(info, json_out)


def _family_table(json_out: str | None, markdown: bool, given: str | None) -> None:
    from upcycle.report.families import COLUMNS, family_markdown, family_rows

    if given is not None:
        raise UpcycleError(f"inspect --families lists the families; give PATH ({given}) without --families")
    if markdown:
        sys.stdout.write(family_markdown())
        return
    table = Table()
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    rows = family_rows()
    for row in rows:
        table.add_row(*(str(row[c]) for c in COLUMNS))
    _show("dense families upcycle converts", table)
    _emit_json({"families": rows}, json_out)


# --- routing -----------------------------------------------------------------------------------------


@app.command()
def routing(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="An MoE (folder or Hub id), or a RUN_DIR of `upcycle train` (divergence.png)."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", metavar="REPORT_DIR", help="Folder for the report.")],
    text: Annotated[
        Path | None,
        typer.Option(help="Text file to route (tokenised with the model's tokenizer); optional for a RUN_DIR."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Route at most this many tokens of the text.")] = 32768,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per block. [default: the model's context, at most 2048]")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Blocks per forward pass.")] = 4,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16.")
    ] = "auto",
    sample_tokens: Annotated[int, typer.Option(help="Tokens each expert is run on for the output divergence.")] = 512,
    html_tokens: Annotated[int, typer.Option(help="Tokens shown in tokens.html (the first N).")] = 4096,
    force: Annotated[bool, typer.Option("--force", help="Replace REPORT_DIR if it exists.")] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Also write routing.json's content to this file ('-': stdout).")
    ] = None,
) -> None:
    """Where an MoE routes the tokens of a text: load, entropy, specialisation, divergence (JSON, PNG, HTML)."""
    from upcycle.report.routing import FILES
    from upcycle.report.routing import routing as run_routing
    from upcycle.report.routing_run import is_run_dir

    console = err if json_out == "-" else out  # with --json -, stdout carries the JSON only
    options = dict(
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        sample_tokens=sample_tokens,
        html_tokens=html_tokens,
    )
    if is_run_dir(model):
        _routing_run(Path(model), text, out_dir, force, options, json_out, console)
        return
    if text is None:
        raise UpcycleError("say what text to route: --text FILE (only a RUN_DIR of `upcycle train` needs none)")
    with _token_progress() as progress:
        report = run_routing(model, text, out_dir, force=force, progress=progress, **options)
    data = report.data
    from rich import box

    table = Table(
        title=f"routing {data['model']}: {data['tokens']} tokens of {data['text']}, "
        f"top-{data['top_k']} of {data['experts']} experts",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    headers = (
        "layer",
        "load\nCV",
        "most\nloaded",
        "least\nloaded",
        "entropy",
        "same\ntop-1",
        "weight\ncos",
        "output\ncos",
    )
    for col in headers:
        table.add_column(col, justify="left" if col.endswith("loaded") else "right", no_wrap=True)

    def share(layer: dict, key: str) -> str:
        expert = layer[key]
        return f"{expert} ({layer['experts'][expert]['load']:.1%})"

    def num(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for layer in data["layers"]:
        table.add_row(
            str(layer["layer"]),
            f"{layer['cv']:.3f}",
            share(layer, "max_expert"),
            share(layer, "min_expert"),
            f"{layer['entropy_norm']:.3f}",
            num(layer["consistency"], ".1%"),
            num(layer["weight_cosine"], ".5f"),
            num(layer["output_cosine"], ".5f"),
        )
    console.print(table)
    console.print(
        f"most/least: expert (its share of the top-k assignments; uniform is 1/{data['experts']} = "
        f"{1 / data['experts']:.1%}); entropy: mean router entropy / ln E (1 = uniform probabilities); same top-1: "
        "tokens whose top-1 expert is the previous MoE layer's; cos: mean pairwise cosine of the experts' weights "
        "and outputs (1 = identical)",
        markup=False,
        highlight=False,
    )
    console.print(f"Wrote {report.out}: {', '.join(FILES)}", markup=False, highlight=False)
    _emit_json(data, json_out)


def _routing_run(run_dir: Path, text, out_dir: Path, force: bool, options, json_out, console) -> None:
    from upcycle.report.routing import FILES
    from upcycle.report.routing_run import routing_run

    with _token_progress() as progress:
        report = routing_run(run_dir, out_dir, text=text, force=force, progress=progress, **options)
    data = report.data
    table = Table(title=f"run {data['run']}: expert load and divergence", title_justify="left")
    for col in ("MoE layer", "load CV first → last", "weight cos first → last", "records (load / cos)"):
        table.add_column(col, justify="right")
    for layer in sorted({*data["load_cv"], *data["weight_cosine"]}, key=int):
        cv, cos = data["load_cv"].get(layer, []), data["weight_cosine"].get(layer, [])
        table.add_row(
            layer,
            f"{cv[0][1]:.3f} → {cv[-1][1]:.3f}" if cv else "-",
            f"{cos[0][1]:.5f} → {cos[-1][1]:.5f}" if cos else "-",
            f"{len(cv)} / {len(cos)}",
        )
    console.print(table)
    if data["weight_cosine_from_checkpoints"]:
        steps = ", ".join(map(str, data["weight_cosine_from_checkpoints"]))
        console.print(f"weight cosine computed from the checkpoints of steps {steps}", markup=False, highlight=False)
    files = ["divergence.png", "divergence.json"] + (list(FILES) if "routing" in data else [])
    console.print(f"Wrote {report.out}: {', '.join(files)}", markup=False, highlight=False)
    _emit_json(data, json_out)


@contextmanager
def _token_progress() -> Iterator[Callable[[int, int], None] | None]:
    """A token counter on a terminal while the model runs; nothing in a pipe or a log file."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("routing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("routing", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


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

    _json_owns_stdout(json_out)
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
    _say(out, f"{verb}: {result.folder} -> {repo_id}")
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        table.add_row(path, human_bytes(size))
    table.add_row("total", human_bytes(result.total_bytes), style="bold")
    out.print(table)
    if result.skipped:
        _say(out, f"left out: {', '.join(result.skipped)}")
    if result.url:
        _say(out, f"{'Pull request' if result.pr_url else 'Commit'}: {result.pr_url or result.url}")
    _emit_json(result.to_dict(), json_out)


# --- train -------------------------------------------------------------------------------------------


@app.command()
def train(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="An upcycled MoE: a folder or a Hub id.")],
    data: Annotated[
        str | None, typer.Option(help="Text: .txt/.jsonl/.json/.parquet, a folder of them, or a datasets id.")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="RUN_DIR", help="The run directory.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML run config; flags given here win.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Text field of .jsonl/.json/.parquet. [default: text]")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Held-out text. [default: a held-out share of DATA]")] = None,
    eval_fraction: Annotated[float | None, typer.Option(help="Share of DATA held out. [default: 0.01]")] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per sequence (capped at the model's limit). [2048]")
    ] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Sequences per forward pass. [default: 4]")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step. [default: 1]")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (or give --tokens).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens to train on (or give --steps).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate. [default: 1e-4]")] = None,
    min_lr: Annotated[float | None, typer.Option(help="Learning rate at the end. [default: 10% of --lr]")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warmup steps. [default: 1% of the steps]")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW decay (not on norms, biases, embeddings, routers). [default: 0.1]")
    ] = None,
    clip: Annotated[float | None, typer.Option(help="Gradient norm clip; 0 turns it off. [default: 1.0]")] = None,
    aux_loss_coef: Annotated[float | None, typer.Option(help="α of the balance loss. [default: 0.01]")] = None,
    z_loss_coef: Annotated[float | None, typer.Option(help="β of the router z-loss. [default: 0.001]")] = None,
    balance_scope: Annotated[
        str | None, typer.Option(help="Expert counts of the balance loss: global or micro. [default: global]")
    ] = None,
    capacity_factor: Annotated[
        float | None, typer.Option(help="Drop assignments over C = factor·tokens·k/E per expert. [default: off]")
    ] = None,
    jitter: Annotated[float | None, typer.Option(help="Router input jitter ε. [default: 0]")] = None,
    router_noise: Annotated[
        bool | None, typer.Option("--router-noise/--no-router-noise", help="Noisy top-k routing. [default: off]")
    ] = None,
    train_what: Annotated[
        str | None, typer.Option("--train", help="What trains: all, experts, non-experts, router. [default: all]")
    ] = None,
    router_lr_scale: Annotated[float | None, typer.Option(help="Router lr = lr × this. [default: 1]")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32.")] = None,
    experts_impl: Annotated[
        str | None, typer.Option(help="transformers experts kernel: grouped_mm or eager. [default: grouped_mm]")
    ] = None,
    grad_checkpointing: Annotated[
        bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations.")
    ] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Deterministic GPU kernels: a rerun or resume repeats every bit (slower). [default: off]",
        ),
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps. [default: 10% of the steps]")] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps. [default: 10% of the steps]")
    ] = None,
    keep_last: Annotated[int | None, typer.Option(help="Complete checkpoints kept. [default: 2]")] = None,
    log_every: Annotated[int | None, typer.Option(help="Log every N steps. [default: 10]")] = None,
    tensorboard: Annotated[
        bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard events.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data order and every random draw. [default: 0]")] = None,
    gpu_mem: Annotated[float | None, typer.Option(help="GiB per GPU for --dry-run's fit check.")] = None,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", metavar="REPO_ID", help="Publish final/ when the run succeeds.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue RUN_DIR from its newest checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace RUN_DIR if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Also write the summary as JSON to this file ('-': stdout).")
    ] = None,
) -> None:
    """Continue pretraining an upcycled MoE on text; checkpoints, metrics and final/ go to RUN_DIR."""
    from upcycle.train.loop import train as run_train
    from upcycle.train.spec import build_train_spec, load_run_config

    global _interrupt_note
    _json_owns_stdout(json_out)
    if not dry_run:  # a training run keeps what it has checkpointed; say so if it is stopped
        _interrupt_note = f"{out_dir} keeps its complete checkpoints: continue with --resume"

    spec = build_train_spec(
        load_run_config(config) if config else None,
        data=data,
        text_field=text_field,
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        seq_len=seq_len,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        steps=steps,
        tokens=tokens,
        lr=lr,
        min_lr=min_lr,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=z_loss_coef,
        balance_scope=balance_scope,
        capacity_factor=capacity_factor,
        jitter=jitter,
        router_noise=router_noise,
        train=train_what,
        router_lr_scale=router_lr_scale,
        dtype=dtype,
        experts_impl=experts_impl,
        grad_checkpointing=grad_checkpointing,
        compile=compile_model,
        deterministic=deterministic,
        eval_every=eval_every,
        save_every=save_every,
        keep_last=keep_last,
        log_every=log_every,
        tensorboard=tensorboard,
        seed=seed,
        gpu_mem=gpu_mem,
        push_to_hub=push_to_hub,
    )
    result = run_train(model, out_dir, spec, resume=resume, force=force, dry_run=dry_run, console=err)
    if not result.is_main:  # under torchrun, rank 0 prints and writes --json
        return
    if dry_run:
        plan = result.plan.to_dict()
        _print_train_plan(plan, title=f"Plan (dry run, nothing written): {model}")
        _emit_json(plan, json_out)
        return
    _print_train_summary(result.summary, title=f"Trained {model} -> {out_dir}")
    if result.pushed is not None:
        out.print(f"Pushed {len(result.pushed.files)} files to {result.pushed.repo_id}: {result.pushed.url}")
    _emit_json(result.summary, json_out)


def _print_train_plan(plan: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{plan['model']} ({plan['architecture']})")
    table.add_row("MoE layers", _placement(plan["moe_layers"], plan["layers"]))
    table.add_row("experts / top-k", f"{plan['experts']} / {plan['top_k']}")
    table.add_row(
        "parameters",
        f"{_fmt_count(plan['params_total'])} total, {_fmt_count(plan['params_trainable'])} trainable "
        f"(--train {plan['train']})",
    )
    table.add_row(
        "batch",
        f"{plan['tokens_per_step']:,} tokens per step = {plan['micro_batch']} × {plan['seq_len']} tokens "
        f"× {plan['grad_accum']} accumulation × {plan['world_size']} process(es)",
    )
    table.add_row("steps", f"{plan['steps']:,} ({_fmt_count(plan['tokens'])} tokens)")
    table.add_row(
        "lr schedule",
        f"{plan['warmup']} warmup steps to {plan['lr']:g}, cosine to {plan['min_lr']:g}",
    )
    table.add_row("device", f"{plan['device']}, {plan['dtype']}, experts {plan['experts_impl']}")
    if plan.get("sharding"):
        table.add_row("sharding", plan["sharding"])
    table.add_row("eval / save", f"every {plan['eval_every']} / {plan['save_every']} steps")
    if plan.get("memory"):
        _memory_rows(table, plan["memory"])
    out.print(table)


def _memory_rows(table: Table, mem: dict[str, Any]) -> None:
    """[train-dist] the estimate of upcycle.train.memory, per process."""

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    parts = [("weights", "weights"), ("grads", "grads"), ("AdamW", "optimizer"), ("working copies", "working")]
    states = ", ".join(f"{label} {gib(mem[key])}" for label, key in parts if mem[key])
    table.add_row("memory per process", f"{states} ({mem['precision']} precision, {mem['world_size']} process(es))")
    table.add_row(
        "activations",
        f"{gib(mem['activations'])} ({gib(mem['activations_checkpointed'])} with --grad-checkpointing) "
        f"+ logits {gib(mem['logits'])}, at {mem['tokens']:,} tokens per micro-batch",
    )
    verdict = "fits" if mem["fits"] else "does NOT fit"
    line = f"{gib(mem['total'])}: {verdict} in {gib(mem['available'])} ({mem['available_what']})"
    if not mem["grad_checkpointing"]:
        ok = "fits" if mem["fits_with_checkpointing"] else "does not fit"
        line += f"; with --grad-checkpointing {gib(mem['total_with_checkpointing'])}, {ok}"
    table.add_row("peak estimate", line)


def _print_train_summary(summary: dict[str, Any], title: str) -> None:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("final train loss", num(summary["train_loss"], ".4f"))
    table.add_row("eval loss / perplexity", f"{num(summary['eval_loss'], '.4f')} / {num(summary['perplexity'], '.2f')}")
    table.add_row("steps / tokens", f"{summary['steps']:,} / {summary['tokens']:,}")
    table.add_row("tokens/s", num(summary["tokens_per_s"], ",.0f") + f" (experts {summary['experts_implementation']})")
    if summary.get("peak_gpu_memory_gib") is not None:
        table.add_row("peak GPU memory", f"{summary['peak_gpu_memory_gib']:.2f} GiB (torch.cuda.max_memory_allocated)")
    if summary["skipped_steps"]:
        table.add_row("skipped steps", ", ".join(map(str, summary["skipped_steps"])))
    table.add_row("final model", str(summary["final"]))
    out.print(table)
    if summary["expert_load"]:
        load = Table(title="expert load at the end (share of routed assignments)", title_justify="left")
        for col in ("MoE layer", "CV", "most loaded", "least loaded"):
            load.add_column(col, justify="right")
        for row in summary["expert_load"]:
            load.add_row(
                str(row["layer"]),
                f"{row['cv']:.3f}",
                f"expert {row['most']}: {row['max']:.3f}",
                f"expert {row['least']}: {row['min']:.3f}",
            )
        out.print(load)


# --- entry point -------------------------------------------------------------------------------------

EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # SIGTERM: 128 + SIGTERM
_terminated = False
_interrupt_note = "nothing was written"


def _sigterm(signum, frame):
    """Turn a polite kill into the same clean-up as Ctrl-C, remembering which it was for the exit code."""
    global _terminated
    _terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second kill must not cut the clean-up short
    raise KeyboardInterrupt


def _interrupted() -> int:
    _say(err, f"{'terminated' if _terminated else 'interrupted'}; {_interrupt_note}")
    return EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED


class _Notes(logging.Handler):
    """The library's notes (logger "upcycle", e.g. a stale temporary folder removed) as `note: ...` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        _say(err, f"note: {record.getMessage()}")


def _notes_to_stderr() -> None:
    logger = logging.getLogger("upcycle")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes())


def run(argv: list[str] | None = None) -> int:
    """Console-script entry: every failure is one line on stderr and an exit code (README: Exit codes)."""
    global _terminated, _interrupt_note
    _terminated, _interrupt_note = False, "nothing was written"
    _notes_to_stderr()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
        out.file = None


def _run(argv: list[str] | None) -> int:
    try:
        # returns the code of a typer.Exit raised by a command; the name, however Python was started
        code = app(args=argv, prog_name="upcycle", standalone_mode=False)
    except UpcycleError as exc:
        _say(err, f"error: {exc}")
        return exc.exit_code
    except OSError as exc:  # anything the file system refused, wherever it happened
        code, message = describe_os_error(exc)
        _say(err, f"error: {message}")
        return code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted()
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            _say(out, exc.format_message())
            return 2
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: upcycle {ctx.info_name} --help)" if ctx and ctx.info_name != "upcycle" else ""
        _say(err, f"error: {exc.format_message()}{hint}")
        return 2
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C inside a command into Exit(130)
        return _interrupted()
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
