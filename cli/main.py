"""The `upcycle` command: a thin Typer layer; each command calls one library function.

Bad input raises UpcycleError in the library, and the operating system raises OSError; here either becomes
one line on stderr, with exit code 2 (the user can fix it) or 3 (the machine is at fault). With `--json -`,
stdout carries the JSON alone and everything meant for people goes to stderr.
"""

from __future__ import annotations

import gc
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Annotated, get_args

import typer
from rich.console import Console
from typer.core import TyperCommand

from upcycle.arch import GENERIC, targets
from upcycle.convert.methods import LAYOUTS
from upcycle.convert.spec import ConvertSpec
from upcycle.errors import UpcycleError, describe_os_error
from upcycle.train.spec import TrainSpec, TrainWhat

from . import render


def _default(spec: type, name: str) -> str:
    """The help text's ` [default: X]` for option NAME, generated from the spec dataclass (one place)."""
    return f" [default: {render.shown_default(render.spec_default(spec, name))}]"


def _or(names) -> str:
    """`a, b or c`: the choices of an option, from the registry or table that defines them."""
    names = list(names)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def _c(name: str) -> str:
    return _default(ConvertSpec, name)


def _t(name: str) -> str:
    return _default(TrainSpec, name)


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


def _version(value: bool) -> None:
    if value:
        from upcycle import __version__

        render.say(Console(), f"upcycle {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Turn a dense causal LM into a native transformers Mixture-of-Experts checkpoint."""


# --- convert -----------------------------------------------------------------------------------------


# Over 80 lines by its option declarations alone (one per flag, each with its help); the body is
# options -> spec -> one upcycle.api call -> render, under 65 lines.
@app.command()
def convert(
    src: Annotated[
        str,
        typer.Argument(metavar="SRC", help="Dense model: a folder, a Hub id (org/name), a .gguf file, or 'smollm2'."),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Argument(metavar="OUT", help="Folder to write the MoE checkpoint to (alone with --mergekit-config)."),
    ] = None,
    experts: Annotated[int | None, typer.Option(help="Experts per MoE layer." + _c("experts"))] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Experts each token is routed to." + _c("top_k"))] = None,
    every: Annotated[
        int | None,
        typer.Option(help="Layer i becomes MoE iff (i+1) % EVERY == 0; 2 = layers 1,3,5..." + _c("every")),
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Explicit MoE layers, e.g. 1,5,9 (overrides --every).")] = None,
    init: Annotated[str | None, typer.Option(help=f"Expert construction: {_or(LAYOUTS)}." + _c("init"))] = None,
    split_by: Annotated[
        str | None,
        typer.Option(
            help="With --init split: how neurons are grouped: random, cluster, or coactivation (MoEfication's "
            "co-activation graph on --calibration text)." + _c("split_by")
        ),
    ] = None,
    drop_ratio: Annotated[
        float | None,
        typer.Option(help="With --init drop: fraction of neurons re-initialised per expert." + _c("drop_ratio")),
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
            "each by G^(1/3), Megatron-Core: not exact through SiLU)." + _c("fine_grained_scale")
        ),
    ] = None,
    shared_experts: Annotated[
        int | None,
        typer.Option(
            help="Always-on shared expert from the dense FFN (targets with one: "
            f"{', '.join([*(n for n, t in targets().items() if t.shared), GENERIC])})." + _c("shared_experts")
        ),
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(
            help="topk-softmax (renormalise the kept weights) or softmax-topk (Qwen targets)." + _c("routing")
        ),
    ] = None,
    router_init: Annotated[
        str | None,
        typer.Option(
            help="Router weights: random, zero, kmeans (from --calibration text), hidden (mean hidden state of "
            "each expert's --expert-prompts) or cheap_embed (their mean token embedding, mergekit's)."
            + _c("router_init")
        ),
    ] = None,
    expert_prompts: Annotated[
        Path | None,
        typer.Option(
            help="With --router-init hidden or cheap_embed: a YAML (or JSON) list with one list of prompts per expert "
            "(or per --expert-from model)."
        ),
    ] = None,
    expert_from: Annotated[
        list[str] | None,
        typer.Option(
            "--expert-from",
            metavar="MODEL",
            help="Repeatable: a fine-tune of SRC whose FFNs become --experts / (number given) experts each, in "
            "order (Branch-Train-MiX, mergekit-moe); SRC itself may be one.",
        ),
    ] = None,
    shared_from: Annotated[
        str | None,
        typer.Option(
            "--shared-from",
            metavar="MODEL",
            help="With --expert-from: the model whose FFN is the always-on shared expert (SRC, 'base', or one of the "
            "--expert-from), targets with one (qwen2_moe); routed experts' down_proj is halved against its 1/2 gate.",
        ),
    ] = None,
    shared_weights: Annotated[
        str | None,
        typer.Option(
            help="With --expert-from: the tensors besides the experts: base (SRC's) or average (float32 mean of the "
            "--expert-from models, BTX)." + _c("shared_weights")
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="With --router-init kmeans or --split-by coactivation: a plain text file the dense model is run on."
        ),
    ] = None,
    calibration_tokens: Annotated[
        int | None, typer.Option(help="With --calibration: tokens of the text used." + _c("calibration_tokens"))
    ] = None,
    calibration_dtype: Annotated[
        str | None,
        typer.Option(
            help="With --calibration or --expert-prompts: the dtype the dense model runs in, float32, source "
            "(its own dtype: half the memory of a bf16 model's layer) or bfloat16 (faster on CPUs with bf16 "
            "matrix instructions)." + _c("calibration_dtype")
        ),
    ] = None,
    router_std: Annotated[float | None, typer.Option(help="Std of a random router." + _c("router_std"))] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for every random choice." + _c("seed"))] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help=f"Native class: auto, {', '.join(targets())}; or {GENERIC} (upcycle's own wrapper, which needs "
            "trust_remote_code outside upcycle)." + _c("target")
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="auto (as the source), bfloat16, float16, float32 (or bf16, fp16, fp32)." + _c("dtype")),
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="Largest shard, e.g. 5GB or 500MB." + _c("max_shard_size"))
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of SRC.")] = None,
    serve: Annotated[
        str | None,
        typer.Option(
            "--serve",
            metavar="ENGINE[,ENGINE]",
            help="Engines the output must run in: transformers, llama.cpp, vllm, sglang (default transformers); "
            "the layout they need is written where it costs no exactness, else the plan is refused.",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML recipe; flags given here win.")] = None,
    mergekit_config: Annotated[
        Path | None,
        typer.Option(
            "--mergekit-config",
            help="A mergekit-moe YAML (base_model, experts, gate_mode, ...): `upcycle convert --mergekit-config "
            "moe.yml OUT`; fields upcycle cannot honour are refused by name. Flags given here win.",
        ),
    ] = None,
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
    from upcycle.api import convert as run_convert
    from upcycle.convert.spec import build_spec

    screen = render.Screen.for_json(json_out)
    src, out_dir, recipe = _convert_inputs(src, out_dir, config, mergekit_config)
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
        calibration_dtype=calibration_dtype,
        expert_prompts=str(expert_prompts) if expert_prompts is not None else None,
        expert_from=tuple(expert_from) if expert_from else None,
        shared_weights=shared_weights,
        shared_from=shared_from,
        seed=seed,
        target=target,
        dtype=dtype,
        max_shard_size=max_shard_size,
        revision=revision,
        serve=serve,
    )
    if dry_run:
        result = run_convert(src, out_dir, spec, dry_run=True, base_model=base_model)
        render.convert_plan(screen, result.plan, title=f"Plan (dry run, nothing written): {src} -> {out_dir}")
        render.gguf_note(screen, result.source)
        plan = result.plan
        render.emit_json(plan.summary() | {"config": plan.config, "ops": plan.op_table()}, json_out)
        return
    with render.byte_progress(screen, "converting") as progress:
        result = run_convert(
            src,
            out_dir,
            spec,
            force=force,
            progress=progress,
            push_to_hub=push_to_hub,
            private=private,
            base_model=base_model,
            mergekit_config=mergekit_config,
        )
    render.convert_plan(screen, result.plan, title=f"Wrote {out_dir}")
    render.gguf_note(screen, result.source)
    if result.pushed is not None:
        screen.say(f"Pushed {len(result.pushed.files)} files to {result.pushed.repo_id}: {result.pushed.url}")
    render.emit_json(result.recipe["plan"] if result.recipe else result.plan.summary(), json_out)


def _convert_inputs(src: str, out: Path | None, config: Path | None, mergekit: Path | None):
    """SRC, OUT and the recipe: --config's, or a --mergekit-config's mapped (its prompts in a temporary file)."""
    from upcycle.convert.spec import load_recipe

    if mergekit is None:
        if out is None:
            raise UpcycleError("give OUT, the folder to write: upcycle convert SRC OUT")
        return src, out, load_recipe(config) if config else None
    if out is not None:
        raise UpcycleError("with --mergekit-config give only OUT: the YAML's base_model is the source")
    if config is not None:
        raise UpcycleError("--config and --mergekit-config exclude each other; give one recipe")
    import atexit
    import shutil
    import tempfile

    from upcycle.convert.mergekit import read_mergekit, recipe_options

    recipe = read_mergekit(mergekit)
    folder = Path(tempfile.mkdtemp(prefix="upcycle-mergekit-"))
    atexit.register(shutil.rmtree, folder, True)
    return recipe.base, Path(src), recipe_options(recipe, folder)


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
    dtype: Annotated[
        str, typer.Option(help="Compute dtype: float32, bfloat16 or float16 (or fp32, bf16, fp16).")
    ] = "float32",
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
    expert_from: Annotated[
        list[str] | None,
        typer.Option(
            "--expert-from",
            metavar="MODEL",
            help="Repeatable: the models MOE's experts came from (convert --expert-from), in order; then every "
            "tensor is checked against its own source.",
        ),
    ] = None,
) -> None:
    """Check on logits that MOE computes what DENSE computed. Exit 0 within tolerance, 1 outside.

    Loads both models whole when they fit in memory, and goes layer by layer otherwise."""
    from upcycle.api import verify as run_verify

    if layerwise and whole:
        raise UpcycleError("--layerwise and --whole exclude each other; give one (or neither: chosen by memory)")
    screen = render.Screen.for_json(json_out)
    runner = _engine_runner(engine, llama_cpp)
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
        notify=screen.note,
        sources=tuple(expert_from or ()),
    )
    render.verify_report(screen, report, title=f"verify {dense} vs {moe} ({report.moe_class})")
    engine_report = runner(dense, moe) if runner else None
    if engine_report is not None:
        render.engine_report(screen, engine_report)
    if report.recorded:
        screen.say(f"result stored in {moe}: {report.recorded}")
    render.emit_json(report.to_dict() | ({"engine": engine_report.to_dict()} if engine_report else {}), json_out)
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
    from upcycle.api import inspect as run_inspect

    screen = render.Screen.for_json(json_out)
    if families or path is None:
        _family_table(screen, json_out, markdown, given=path)
        return
    info = run_inspect(path, revision)
    render.inspect_info(screen, info, title=f"inspect {path}")
    render.emit_json(info, json_out)


def _family_table(screen: render.Screen, json_out: str | None, markdown: bool, given: str | None) -> None:
    from upcycle.report.families import COLUMNS, family_markdown, family_rows

    if given is not None:
        raise UpcycleError(f"inspect --families lists the families; give PATH ({given}) without --families")
    if markdown:
        sys.stdout.write(family_markdown())
        return
    rows = family_rows()
    render.family_table(screen, COLUMNS, rows)
    render.emit_json({"families": rows}, json_out)


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
        str,
        typer.Option(help="auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16 (or fp32, bf16, fp16)."),
    ] = "auto",
    sample_tokens: Annotated[int, typer.Option(help="Tokens each expert is run on for the output divergence.")] = 512,
    html_tokens: Annotated[int, typer.Option(help="Tokens shown in tokens.html (the first N).")] = 4096,
    load_scale: Annotated[
        str, typer.Option(help="load.png colours: auto (up to the largest share) or fixed (0 to 1/k: comparable).")
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace REPORT_DIR if it exists.")] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Also write routing.json's content to this file ('-': stdout).")
    ] = None,
) -> None:
    """Where an MoE routes the tokens of a text: load, entropy, specialisation, divergence (JSON, PNG, HTML)."""
    from upcycle.api import routing as run_routing
    from upcycle.report.routing import FILES
    from upcycle.report.routing_run import RunReport

    screen = render.Screen.for_json(json_out)
    with render.token_progress(screen) as progress:
        report = run_routing(
            model,
            out_dir,
            text=text,
            max_tokens=max_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            sample_tokens=sample_tokens,
            html_tokens=html_tokens,
            load_scale=load_scale,
            force=force,
            progress=progress,
        )
    if isinstance(report, RunReport):  # MODEL was a run directory of `upcycle train`
        render.routing_run_report(screen, report.data, report.out, FILES)
    else:
        render.routing_report(screen, report.data, report.out, FILES)
    render.emit_json(report.data, json_out)


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
    from upcycle.api import push as run_push

    screen = render.Screen.for_json(json_out)
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
    render.push_result(screen, result, repo_id, dry_run)
    render.emit_json(result.to_dict(), json_out)


# --- train -------------------------------------------------------------------------------------------


# Over 80 lines by its option declarations alone (one per flag, each with its help); the body is
# options -> spec -> one upcycle.api call -> render, under 65 lines.
@app.command()
def train(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="An MoE or a dense model: a folder or a Hub id.")],
    data: Annotated[
        str | None, typer.Option(help="Text: .txt/.jsonl/.json/.parquet, a folder of them, or a datasets id.")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="RUN_DIR", help="The run directory.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML run config; flags given here win.")] = None,
    text_field: Annotated[
        str | None,
        typer.Option(
            help="Text field of .jsonl/.json/.parquet (a field of token-id lists: already tokenised)."
            + _t("text_field")
        ),
    ] = None,
    skip_bad_rows: Annotated[
        bool | None,
        typer.Option(
            "--skip-bad-rows/--no-skip-bad-rows",
            help="Leave out rows without the text field (else refused), counting them." + _t("skip_bad_rows"),
        ),
    ] = None,
    data_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help='text, chat ({"messages": [...]} records), or auto (chat if DATA\'s records '
            "have messages)." + _t("format"),
        ),
    ] = None,
    packing: Annotated[
        str | None, typer.Option(help="chat: several conversations per sequence (on) or one (off)." + _t("packing"))
    ] = None,
    long_conversations: Annotated[
        str | None,
        typer.Option(
            help="chat: a conversation over --seq-len: truncate (whole turns) or refuse." + _t("long_conversations")
        ),
    ] = None,
    eval_data: Annotated[str | None, typer.Option(help="Held-out text. [default: a held-out share of DATA]")] = None,
    eval_fraction: Annotated[float | None, typer.Option(help="Share of DATA held out." + _t("eval_fraction"))] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per sequence (capped at the model's limit)." + _t("seq_len"))
    ] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Sequences per forward pass." + _t("micro_batch"))] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step." + _t("grad_accum"))] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (or give --tokens).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens to train on (or give --steps).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate." + _t("lr"))] = None,
    min_lr: Annotated[float | None, typer.Option(help="Learning rate at the end. [default: 10% of --lr]")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warmup steps. [default: 1% of the steps]")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW decay (not on norms, biases, embeddings, routers)." + _t("weight_decay"))
    ] = None,
    clip: Annotated[float | None, typer.Option(help="Gradient norm clip; 0 turns it off." + _t("clip"))] = None,
    aux_loss_coef: Annotated[float | None, typer.Option(help="α of the balance loss." + _t("aux_loss_coef"))] = None,
    z_loss_coef: Annotated[float | None, typer.Option(help="β of the router z-loss." + _t("z_loss_coef"))] = None,
    balance_scope: Annotated[
        str | None, typer.Option(help="Expert counts of the balance loss: global or micro." + _t("balance_scope"))
    ] = None,
    balance: Annotated[
        str | None,
        typer.Option(help="Balancing: aux (loss α), bias (DeepSeek-V3 routing bias, no α), both." + _t("balance")),
    ] = None,
    balance_rate: Annotated[
        float | None, typer.Option(help="Step of the routing bias per optimizer step." + _t("balance_rate"))
    ] = None,
    bias_export: Annotated[
        str | None,
        typer.Option(help="Target with no place for the bias: drop it (measured) or refuse." + _t("bias_export")),
    ] = None,
    capacity_factor: Annotated[
        float | None, typer.Option(help="Drop assignments over C = factor·tokens·k/E per expert. [default: off]")
    ] = None,
    jitter: Annotated[float | None, typer.Option(help="Router input jitter ε." + _t("jitter"))] = None,
    router_noise: Annotated[
        bool | None,
        typer.Option("--router-noise/--no-router-noise", help="Noisy top-k routing." + _t("router_noise")),
    ] = None,
    expert_dropout: Annotated[
        float | None, typer.Option(help="Dropout inside the experts, in training (Switch: 0.4)." + _t("expert_dropout"))
    ] = None,
    train_what: Annotated[
        str | None,
        typer.Option(
            "--train",
            help=f"What trains: {_or(get_args(TrainWhat))} (non-experts: ST-MoE's for fine-tuning)." + _t("train"),
        ),
    ] = None,
    router_lr_scale: Annotated[
        float | None, typer.Option(help="Router lr = lr × this." + _t("router_lr_scale"))
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32 (or bfloat16, float32).")
    ] = None,
    save_dtype: Annotated[
        str | None,
        typer.Option(help="final/'s dtype: source (MODEL's), float32, bfloat16 or float16." + _t("save_dtype")),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="adamw, adafactor (factored second moments; lr is relative) or adamw8bit (8-bit moments, needs "
            "bitsandbytes: pip install 'upcycle[adamw8bit]')." + _t("optimizer")
        ),
    ] = None,
    experts_impl: Annotated[
        str | None, typer.Option(help="transformers experts kernel: grouped_mm or eager." + _t("experts_impl"))
    ] = None,
    grad_checkpointing: Annotated[
        bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations.")
    ] = None,
    lm_loss: Annotated[
        str | None,
        typer.Option(
            help="LM loss: model (over all the logits) or chunked (a chunk of tokens at a time: far less memory)."
            + _t("lm_loss")
        ),
    ] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Deterministic GPU kernels: a rerun or resume repeats every bit (slower)." + _t("deterministic"),
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help="Evaluate every N steps; 0: never. [default: at the end of a run ≤ 50 steps, "
            "else every max(50, 10% of the steps)]"
        ),
    ] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps. [default: as --eval-every]")] = None,
    keep_last: Annotated[int | None, typer.Option(help="Complete checkpoints kept." + _t("keep_last"))] = None,
    log_every: Annotated[int | None, typer.Option(help="Log every N steps." + _t("log_every"))] = None,
    tensorboard: Annotated[
        bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard events.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data order and every random draw." + _t("seed"))] = None,
    gpu_mem: Annotated[
        float | None, typer.Option(help="GiB per process for the memory check (default: free GPU memory, or RAM).")
    ] = None,
    force_memory: Annotated[
        bool, typer.Option("--force-memory", help="Start even when the memory estimate does not fit.")
    ] = False,
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
    """Continue pretraining an upcycled MoE (or a dense model) on text, or instruction-tune it on conversations;
    checkpoints, metrics and final/ go to RUN_DIR."""
    from upcycle.api import train as run_train
    from upcycle.train.spec import build_train_spec, load_run_config

    screen = render.Screen.for_json(json_out)
    spec = build_train_spec(
        load_run_config(config) if config else None,
        data=data,
        text_field=text_field,
        skip_bad_rows=skip_bad_rows,
        format=data_format,
        packing=packing,
        long_conversations=long_conversations,
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
        balance=balance,
        balance_rate=balance_rate,
        bias_export=bias_export,
        capacity_factor=capacity_factor,
        jitter=jitter,
        router_noise=router_noise,
        expert_dropout=expert_dropout,
        train=train_what,
        optimizer=optimizer,
        router_lr_scale=router_lr_scale,
        dtype=dtype,
        save_dtype=save_dtype,
        experts_impl=experts_impl,
        grad_checkpointing=grad_checkpointing,
        lm_loss=lm_loss,
        compile=compile_model,
        deterministic=deterministic,
        eval_every=eval_every,
        save_every=save_every,
        keep_last=keep_last,
        log_every=log_every,
        tensorboard=tensorboard,
        seed=seed,
        gpu_mem=gpu_mem,
        force_memory=force_memory or None,
        push_to_hub=push_to_hub,
    )
    try:
        result = run_train(model, out_dir, spec, resume=resume, force=force, dry_run=dry_run, console=screen.err)
    except KeyboardInterrupt as exc:
        if dry_run:
            raise
        # say what RUN_DIR really holds, found once the run has cleaned up
        from upcycle.train.checkpoint import stop_note

        raise Stopped(stop_note(out_dir) if out_dir is not None else "nothing was written") from exc
    if not result.is_main:  # under torchrun, rank 0 prints and writes --json
        return
    if dry_run:
        plan = result.plan.to_dict()
        render.train_plan(screen, plan, title=f"Plan (dry run, nothing written): {model}")
        render.emit_json(plan, json_out)
        return
    render.train_summary(screen, result.summary, title=f"Trained {model} -> {out_dir}")
    if result.pushed is not None:
        screen.out.print(f"Pushed {len(result.pushed.files)} files to {result.pushed.repo_id}: {result.pushed.url}")
    render.emit_json(result.summary, json_out)


# --- entry point -------------------------------------------------------------------------------------

EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # SIGTERM: 128 + SIGTERM


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside a command that keeps something: `note` says what (default: nothing was written)."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


def _interrupted(exc: BaseException | None, terminated: bool) -> int:
    note = "nothing was written"
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the Stopped may be wrapped in click's Abort or Exit
        seen.add(id(exc))
        if isinstance(exc, Stopped):
            note = exc.note
            break
        exc = exc.__cause__ or exc.__context__
    render.say(Console(stderr=True), f"{'terminated' if terminated else 'interrupted'}; {note}")
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


class _Notes(logging.Handler):
    """The library's notes (logger "upcycle", e.g. a stale temporary folder removed) as `note: ...` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        render.say(Console(stderr=True), f"note: {record.getMessage()}")


def _notes_to_stderr() -> None:
    logger = logging.getLogger("upcycle")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes())


def run(argv: list[str] | None = None) -> int:
    """Console-script entry: every failure is one line on stderr and an exit code (README: Exit codes)."""
    terminated: list[int] = []

    def on_sigterm(signum, frame):
        """Turn a polite kill into the same clean-up as Ctrl-C, remembering which it was for the exit code."""
        terminated.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second kill must not cut the clean-up short
        raise KeyboardInterrupt

    _notes_to_stderr()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _run(argv, terminated)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None, terminated: list[int]) -> int:
    err = Console(stderr=True)
    try:
        # returns the code of a typer.Exit raised by a command; the name, however Python was started
        code = app(args=argv, prog_name="upcycle", standalone_mode=False)
    except UpcycleError as exc:
        render.say(err, f"error: {exc}")
        return exc.exit_code
    except OSError as exc:  # anything the file system refused, wherever it happened
        code, message = describe_os_error(exc)
        render.say(err, f"error: {message}")
        return code
    except typer.Exit as exc:
        if exc.exit_code == EXIT_INTERRUPTED:
            return _interrupted(exc, bool(terminated))
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt) as exc:
        return _interrupted(exc, bool(terminated))
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        # typer vendors click privately (typer._click); typer itself tells this one by name (rich_utils.py)
        if type(exc).__name__ == "NoArgsIsHelpError":
            render.say(Console(), exc.format_message())
            return 2
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: upcycle {ctx.info_name} --help)" if ctx and ctx.info_name != "upcycle" else ""
        render.say(err, f"error: {exc.format_message()}{hint}")
        return 2
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C inside a command into Exit(130)
        return _interrupted(None, bool(terminated))
    return code if isinstance(code, int) else 0


def main() -> None:
    code = run()
    # The process ends here. Python's last collection at exit would walk every object torch and transformers made
    # (about 1 s of CPU on a 2-core machine); frozen, they are skipped (upcycle/collector.py).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()
