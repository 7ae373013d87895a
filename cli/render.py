"""What the commands show people: every table, note and progress bar of the `upcycle` command.

Each command builds one Screen for its run (stdout for tables, stderr for notes and progress; with `--json -`
the tables go to stderr too, so that stdout carries the JSON alone) and hands the library's result to one
function here. Nothing here computes a number: it lays out what the library returned.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from upcycle.fmt import count, gib, human_bytes

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Screen:
    """Where one command's output goes: `out` for tables and results, `err` for notes and progress."""

    out: Console
    err: Console

    @classmethod
    def for_json(cls, json_out: str | None) -> Screen:
        """With `--json -`, stdout is for the JSON alone: the tables and notes go to stderr."""
        return cls(out=Console(stderr=json_out == "-"), err=Console(stderr=True))

    def say(self, text: str, **style: Any) -> None:
        """One plain line: no markup in paths, no wrapping, no padding."""
        self.out.print(text, markup=False, highlight=False, soft_wrap=True, **style)

    def note(self, text: str) -> None:
        """A `note: ...` line on stderr."""
        self.err.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)

    def show(self, title: str, table: Table) -> None:
        """A title line, then the table (a rich table title is padded with spaces to the table's width)."""
        self.say(title)
        self.out.print(table)


def say(console: Console, text: str, **style: Any) -> None:
    """One plain line on CONSOLE: no markup in paths, no wrapping, no padding."""
    console.print(text, markup=False, highlight=False, soft_wrap=True, **style)


def emit_json(data: dict[str, Any], target: str | None) -> None:
    """`--json FILE` writes the data to FILE; `--json -` to stdout; no --json, nothing."""
    if target is None:
        return
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        Path(target).write_text(text)


def spec_default(spec: type, name: str) -> Any:
    """The default of option NAME: the spec dataclass's field default (a method option: its default under its
    --init). Defaults live there only; the help text shows them from there."""
    from upcycle.convert.spec import METHOD_DEFAULTS, ConvertSpec

    if spec is ConvertSpec and name in METHOD_DEFAULTS:
        return METHOD_DEFAULTS[name]
    return {f.name: f.default for f in fields(spec)}[name]


def shown_default(value: Any) -> str:
    """A default as the help text shows it: on/off for a switch, 0.0001 for 1e-4, the value otherwise."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _short(path: Path) -> str:
    """A path as a person would type it: ~ for the home folder."""
    home, text = str(Path.home()), str(path)
    return "~" + text[len(home) :] if text.startswith(home + "/") else text


def _placement(moe: list[int] | tuple[int, ...], num_layers: int) -> str:
    return f"{len(moe)} of {num_layers}: " + ("all" if len(moe) == num_layers else ", ".join(map(str, moe)))


def _ok(good: bool) -> str:
    return "yes" if good else "NO"


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


# --- progress ----------------------------------------------------------------------------------------


@contextmanager
def byte_progress(screen: Screen, label: str) -> Iterator[Progress | None]:
    """A rich progress bar on a terminal; nothing at all in a pipe or a log file."""
    if not screen.err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Bar(*columns, console=screen.err, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def token_progress(screen: Screen) -> Iterator[Progress | None]:
    """A token counter on a terminal while the model runs; nothing in a pipe or a log file."""
    if not screen.err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn("routing"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn())
    with Bar(*columns, console=screen.err, transient=True) as bar:
        task = bar.add_task("routing", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# --- convert -----------------------------------------------------------------------------------------


def gguf_note(screen: Screen, source) -> None:
    if source.kind == "gguf":
        done = (
            f"was loaded whole through transformers and dequantized to float32, not streamed (cached in "
            f"{_short(source.folder)})"
            if source.folder
            else "is not dequantized yet: this plan comes from its metadata; the conversion loads it whole "
            "through transformers into float32 and caches that"
        )
        screen.note(f"the GGUF source {done}")


def convert_plan(screen: Screen, plan, title: str) -> None:
    """The plan of `convert` (dry run or written): placement, experts, exactness, casts, tensors, sizes."""
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("family -> target", f"{plan.family} -> {plan.architecture}")
    table.add_row("MoE layers", _placement(plan.moe_layers, plan.num_layers))
    table.add_row("experts / top-k", f"{plan.experts} / {plan.top_k}")
    table.add_row("exact at init", "yes" if plan.exact else f"no: {plan.inexact_reason()}")
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
        f"{count(plan.dense_params)} dense -> {count(plan.total_params)} total, "
        f"{count(plan.active_params)} active per token",
    )
    table.add_row("bytes on disk", human_bytes(plan.total_bytes) + f" ({plan.config['dtype']})")
    for v in plan.serving:  # which engines load it, and why (not)
        table.add_row(f"runs in {v.engine}", ("yes: " if v.loads else "no: ") + v.why)
    if plan.sources:
        shared = [op for op in plan.ops if op.kind in ("copy", "mean")]
        how = "their float32 mean" if any(op.kind == "mean" for op in shared) else "BASE's"
        each = plan.experts // len(plan.sources)
        table.add_row("experts from", f"{', '.join(plan.sources)} ({each} experts each); the other tensors are {how}")
        for row in plan.source_casts:
            table.add_row(f"casts of {row.source}", row.describe())
        differ = f"{len(plan.differences)} of {len(shared)} differ between the sources"
        table.add_row("shared tensors", f"not measured: {plan.unmeasured}" if plan.unmeasured else differ)
    screen.show(title, table)
    _differences(screen, plan)
    for note in plan.notes:
        screen.note(note)


DIFFERENCES_SHOWN = 10


def _differences(screen: Screen, plan) -> None:
    """The non-expert tensors that differ between the sources, most moved by averaging first."""
    if not plan.differences:
        return
    table = Table()
    for col in ("tensor", "differs in", "max |Δ| vs BASE", "mean moves BASE by"):
        table.add_column(col, overflow="fold")
    ranked = sorted(plan.differences, key=lambda d: -d.relative)
    for d in ranked[:DIFFERENCES_SHOWN]:
        table.add_row(
            d.name,
            ", ".join(plan.sources[i - 1] for i in d.differing),
            f"{d.max_abs:.3g}",
            f"{100 * d.relative:.3g}%",
        )
    screen.show("tensors besides the experts that differ between the sources", table)
    if len(ranked) > DIFFERENCES_SHOWN:
        screen.say(f"... and {len(ranked) - DIFFERENCES_SHOWN} more (all in --json: shared_differences)")


# --- verify ------------------------------------------------------------------------------------------


def _verify_layers(screen: Screen, report) -> None:
    moe_rows = [row for row in report.layers if row.block_max_abs_diff is not None]
    if not moe_rows:
        return
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
    screen.show("MoE layers: the block against the dense MLP on the same input", layers)


def _verify_table(report) -> Table:
    limits = report.limits
    table = Table()
    for col in ("metric", "value", "limit", "ok"):
        table.add_column(col)
    table.add_row("mode", report.mode, "", "")
    if report.mode != "sources":
        table.add_row("tokens", f"{report.tokens} ({report.input}, {report.dtype})", "", "")
    if report.plan_exact is not None:
        below = "" if report.mode == "sources" else " (note below)"  # sources: no logits to explain
        table.add_row("exact at init (plan)", "yes" if report.plan_exact else f"no{below}", "", "")
    if report.tensor_check is not None:
        check = report.tensor_check
        cast = f", {check.cast} after the cast" if check.cast else ""
        by = "the expert method or as averages" if report.mode == "sources" else "the expert method"
        computed = f", {check.computed} recomputed by {by}" if check.computed else ""
        table.add_row(
            "copied tensors",
            f"{check.equal} of {check.compared} equal to the source{'s' if report.mode == 'sources' else ''}"
            f"{cast}{computed} "
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
    if report.max_abs_diff is None:  # mode "sources": the tensors are the check
        return table
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
    return table


def verify_report(screen: Screen, report, title: str) -> None:
    """`verify`'s tables, the tensors and layers that failed, and PASS or FAIL."""
    _verify_layers(screen, report)
    screen.show(title, _verify_table(report))
    if report.tensor_check is not None:
        check = report.tensor_check
        problems = [("differs from its source", check.mismatched), ("missing", check.missing)]
        for what, names in [*problems, ("not in the plan", check.unexpected)]:
            for name in names[:10]:
                screen.say(f"tensor {what}: {name}")
            if len(names) > 10:
                screen.say(f"... and {len(names) - 10} more tensors {what} (all in --json)")
    for row in report.layers:
        if not row.passed:
            worse = f"MoE block max |Δ| {row.block_max_abs_diff:.3e} > limit {row.block_limit:.2e}"
            screen.say(f"layer {row.layer}: {worse}")
    if report.plan_exact is False and report.mode != "sources":  # a table cell would wrap the reason: own line
        why = f" ({report.plan_why})" if report.plan_why else ""
        screen.say(f"note: the plan did not claim this MoE exact at init{why}; the numbers are expected to differ")
    screen.say("PASS" if report.passed else "FAIL", style="bold green" if report.passed else "bold red")


# --- inspect -----------------------------------------------------------------------------------------


def inspect_info(screen: Screen, info: dict[str, Any], title: str) -> None:
    """One checkpoint: class, layers, MoE placement, experts, parameters and bytes."""
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("class", f"{info['architecture']} ({info['model_type']}, {info['kind']})")
    table.add_row("layers", str(info["layers"]))
    if info["kind"] == "moe":
        table.add_row("MoE layers", _placement(info["moe_layers"], info["layers"]))
        table.add_row("experts / top-k", f"{info['experts']} / {info['top_k']}")
    table.add_row("parameters", f"{count(info['total_params'])} total, {count(info['active_params'])} active per token")
    table.add_row("bytes on disk", ", ".join(f"{k}: {human_bytes(v)}" for k, v in info["bytes_by_dtype"].items()))
    if info.get("format") == "gguf":
        quant = f"{info['file_type']}; tensor types {', '.join(info['quantization'])}"
        table.add_row("GGUF file", f"{human_bytes(info['file_bytes'])} ({quant}); read from its header only")
    if info["kind"] == "dense":
        table.add_row("upcycle can convert it", "yes" if info["upcycle_supports"] else "no (unsupported family)")
    screen.show(title, table)


def family_table(screen: Screen, columns: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> None:
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    screen.show("dense families upcycle converts", table)


# --- routing -----------------------------------------------------------------------------------------

ROUTING_HEADERS = (
    "layer",
    "load\nCV",
    "most\nloaded",
    "least\nloaded",
    "entropy",
    "same\ntop-1",
    "weight\ncos",
    "output\ncos",
)


def routing_report(screen: Screen, data: dict[str, Any], out: Path, files: tuple[str, ...] | list[str]) -> None:
    """`routing`'s per-layer table (load, entropy, consistency, divergence) and the legend."""
    from rich import box

    title = (
        f"routing {data['model']}: {data['tokens']} tokens of {data['text']}, "
        f"top-{data['top_k']} of {data['experts']} experts"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ROUTING_HEADERS:
        table.add_column(col, justify="left" if col.endswith("loaded") else "right", no_wrap=True)

    def share(layer: dict, key: str) -> str:
        expert = layer[key]
        return f"{expert} ({layer['experts'][expert]['load']:.1%})"

    for layer in data["layers"]:
        table.add_row(
            str(layer["layer"]),
            f"{layer['cv']:.3f}",
            share(layer, "max_expert"),
            share(layer, "min_expert"),
            f"{layer['entropy_norm']:.3f}",
            _num(layer["consistency"], ".1%", "–"),
            _num(layer["weight_cosine"], ".5f", "–"),
            _num(layer["output_cosine"], ".5f", "–"),
        )
    screen.out.print(table)
    screen.out.print(
        f"most/least: expert (its share of the top-k assignments; uniform is 1/{data['experts']} = "
        f"{1 / data['experts']:.1%}); entropy: mean router entropy / ln E (1 = uniform probabilities); same top-1: "
        "tokens whose top-1 expert is the previous MoE layer's; cos: mean pairwise cosine of the experts' weights "
        "and outputs (1 = identical)",
        markup=False,
        highlight=False,
    )
    screen.out.print(f"Wrote {out}: {', '.join(files)}", markup=False, highlight=False)


def routing_run_report(screen: Screen, data: dict[str, Any], out: Path, files: tuple[str, ...] | list[str]) -> None:
    """`routing RUN_DIR`: expert load and divergence over a training run."""
    table = Table(title=f"run {data['run']}: expert load and divergence", title_justify="left")
    for col in ("MoE layer", "load CV first → last", "weight cos first → last", "records (load / cos)"):
        table.add_column(col, justify="right")
    held_out = bool(data["load_cv_eval"])  # the held-out tokens: the same at every evaluation, as the summary's
    series = data["load_cv_eval"] if held_out else data["load_cv"]
    for layer in sorted({*series, *data["weight_cosine"]}, key=int):
        cv, cos = series.get(layer, []), data["weight_cosine"].get(layer, [])
        table.add_row(
            layer,
            f"{cv[0][1]:.3f} → {cv[-1][1]:.3f}" if cv else "-",
            f"{cos[0][1]:.5f} → {cos[-1][1]:.5f}" if cos else "-",
            f"{len(cv)} / {len(cos)}",
        )
    screen.out.print(table)
    counted = data["load_cv_eval_tokens"] if held_out else data["load_cv_tokens"]
    screen.out.print(f"load: {data['load']}; counted over {counted}", markup=False, highlight=False)
    if data["weight_cosine_from_checkpoints"]:
        steps = ", ".join(map(str, data["weight_cosine_from_checkpoints"]))
        screen.out.print(f"weight cosine computed from the checkpoints of steps {steps}", markup=False, highlight=False)
    written = ["divergence.png", "divergence.json"] + (list(files) if "routing" in data else [])
    screen.out.print(f"Wrote {out}: {', '.join(written)}", markup=False, highlight=False)


# --- push --------------------------------------------------------------------------------------------


def push_result(screen: Screen, result, repo_id: str, dry_run: bool) -> None:
    """The files `push` sent (or would send), their sizes, and the commit or pull request."""
    verb = "Would upload (dry run, nothing sent)" if dry_run else "Uploaded"
    screen.say(f"{verb}: {result.folder} -> {repo_id}")
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        table.add_row(path, human_bytes(size))
    table.add_row("total", human_bytes(result.total_bytes), style="bold")
    screen.out.print(table)
    if result.skipped:
        screen.say(f"left out: {', '.join(result.skipped)}")
    if result.url:
        screen.say(f"{'Pull request' if result.pr_url else 'Commit'}: {result.pr_url or result.url}")


# --- train -------------------------------------------------------------------------------------------


def train_plan(screen: Screen, plan: dict[str, Any], title: str) -> None:
    """`train --dry-run`: the run's shape, schedule, device and memory estimate."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{plan['model']} ({plan['architecture']})")
    if plan["moe_layers"]:
        table.add_row("MoE layers", _placement(plan["moe_layers"], plan["layers"]))
        table.add_row("experts / top-k", f"{plan['experts']} / {plan['top_k']}")
    else:
        table.add_row("MoE layers", f"none: a dense model of {plan['layers']} layers (no router losses)")
    table.add_row(
        "parameters",
        f"{count(plan['params_total'])} total, {count(plan['params_trainable'])} trainable (--train {plan['train']})",
    )
    table.add_row(
        "batch",
        f"{plan['tokens_per_step']:,} tokens per step = {plan['micro_batch']} × {plan['seq_len']} tokens "
        f"× {plan['grad_accum']} accumulation × {plan['world_size']} process(es)",
    )
    table.add_row("steps", f"{plan['steps']:,} ({count(plan['tokens'])} tokens)")
    table.add_row("lr schedule", f"{plan['warmup']} warmup steps to {plan['lr']:g}, cosine to {plan['min_lr']:g}")
    table.add_row("device", f"{plan['device']}, {plan['dtype']}, experts {plan['experts_impl']}")
    if plan.get("sharding"):
        table.add_row("sharding", plan["sharding"])
    evals = f"every {plan['eval_every']}" if plan["eval_every"] else "no evaluation"
    table.add_row("eval / save", f"{evals} / every {plan['save_every']} steps")
    if plan.get("memory"):
        _memory_rows(table, plan["memory"])
    screen.out.print(table)


def _chunked_note(mem: dict[str, Any]) -> str:
    """How the LM loss's share changes with the other --lm-loss, where this model can take the chunked one."""
    if mem.get("lm_loss") == "chunked":
        return " (--lm-loss chunked)"
    if mem.get("logits_chunked") is None:
        return ""
    return f" ({gib(mem['logits_chunked'])} with --lm-loss chunked)"


def _memory_rows(table: Table, mem: dict[str, Any]) -> None:
    """The estimate of upcycle.train.memory, per process."""
    names = {"adamw": "AdamW", "adafactor": "Adafactor", "adamw8bit": "AdamW8bit"}
    optimizer = names.get(mem["optimizer_name"], mem["optimizer_name"])
    parts = [("weights", "weights"), ("grads", "grads"), (optimizer, "optimizer"), ("working copies", "working")]
    states = ", ".join(f"{label} {gib(mem[key])}" for label, key in parts if mem[key])
    table.add_row("memory per process", f"{states} ({mem['precision']} precision, {mem['world_size']} process(es))")
    table.add_row(
        "activations",
        f"{gib(mem['activations'])} ({gib(mem['activations_checkpointed'])} with --grad-checkpointing) "
        f"+ logits {gib(mem['logits'])}{_chunked_note(mem)}, at {mem['tokens']:,} tokens per micro-batch",
    )
    if mem["runtime"] or mem["mapped"]:
        table.add_row(
            "peaks",
            f"load {gib(mem['load_peak'])}, step {gib(mem['step_peak'])}, save {gib(mem['save_peak'])} (with "
            f"{gib(mem['runtime'])} runtime; loading: {gib(mem['mapped'])} of weight files to cast)",
        )
    verdict = "fits" if mem["fits"] else "does NOT fit"
    line = f"{gib(mem['total'])} ({mem['phase']}): {verdict} in {gib(mem['available'])} ({mem['available_what']})"
    if not mem["grad_checkpointing"] and mem["total_with_checkpointing"] != mem["total"]:
        ok = "fits" if mem["fits_with_checkpointing"] else "does not fit"
        line += f"; with --grad-checkpointing {gib(mem['total_with_checkpointing'])}, {ok}"
    table.add_row("peak estimate", line)
    if not mem["fits"]:
        fits = "; ".join(f"{o['flags']} ({gib(o['total'])})" for o in mem["options"]) or "nothing tried"
        table.add_row("would fit", f"{fits}; a run that does not fit needs --force-memory")


def train_summary(screen: Screen, summary: dict[str, Any], title: str) -> None:
    """After a run: final losses, throughput, skipped steps, the final model and the expert load."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("final train loss", _num(summary["train_loss"], ".4f"))
    eval_line = f"{_num(summary['eval_loss'], '.4f')} / {_num(summary['perplexity'], '.2f')}"
    on = " (assistant tokens)" if summary.get("loss_on") == "assistant tokens" else ""
    table.add_row(f"eval loss / perplexity{on}", eval_line)
    table.add_row("steps / tokens", f"{summary['steps']:,} / {summary['tokens']:,}")
    speed = _num(summary["tokens_per_s"], ",.0f") + f" (experts {summary['experts_implementation']})"
    table.add_row("tokens/s", speed)
    if summary.get("peak_gpu_memory_gib") is not None:
        table.add_row("peak GPU memory", f"{summary['peak_gpu_memory_gib']:.2f} GiB (torch.cuda.max_memory_allocated)")
    if summary["skipped_steps"]:
        table.add_row("skipped steps", ", ".join(map(str, summary["skipped_steps"])))
    if summary.get("documents") is not None:
        skipped = [f"{n:,} {what.replace('_', ' ')}" for what, n in (summary.get("skipped_rows") or {}).items() if n]
        left_out = f" ({', '.join(skipped)} skipped)" if skipped else ""
        table.add_row("documents", f"{summary['documents']:,}{left_out}")
    table.add_row("final model", str(summary["final"]))
    if bias := summary.get("balance_bias"):
        table.add_row("balancing bias", _bias_line(bias))
    screen.out.print(table)
    if summary["expert_load"]:
        counted = summary.get("expert_load_tokens") or "the last step"
        title = f"expert load at the end: share of the top-k assignments over {counted}"
        load = Table(title=title, title_justify="left")
        for col in ("MoE layer", "CV", "most loaded", "least loaded"):
            load.add_column(col, justify="right")
        for row in summary["expert_load"]:
            load.add_row(
                str(row["layer"]),
                f"{row['cv']:.3f}",
                f"expert {row['most']}: {row['max']:.3f}",
                f"expert {row['least']}: {row['min']:.3f}",
            )
        screen.out.print(load)


def _bias_line(bias: dict[str, Any]) -> str:
    """Where the routing bias of --balance bias|both went in final/."""
    if bias["exported"] == "slot":
        return f"in final/ ({bias['slot']}): it routes as the run did"
    top1 = bias["top1_agreement"].values()
    return (
        f"dropped (no place for it): first choice kept for {100 * sum(top1) / len(top1):.1f}% of {bias['tokens']:,} "
        f"{bias['text']} tokens, max |Δ logits| {bias['max_abs_dlogits']:.3g}, "
        f"loss {bias['loss_with']:.4f} -> {bias['loss_without']:.4f}"
    )


def engine_report(screen: Screen, report: Any) -> None:
    """`verify --engine`: the engine's greedy continuation against transformers' on the dense model."""
    table = Table(title=f"{report.engine}: greedy continuation of {report.prompt!r}", title_justify="left")
    for col in ("metric", "value", "limit", "ok"):
        table.add_column(col)
    table.add_row("engine", f"{report.engine} ({report.where})", "", "")
    table.add_row("GGUF (llama.cpp's converter)", f"{report.gguf_bytes / 1e6:.1f} MB", "", "")
    matching = f"{report.matching} of {len(report.expected)}"
    table.add_row("greedy tokens equal to transformers (dense)", matching, "all", "yes" if report.passed else "NO")
    screen.out.print(table)
