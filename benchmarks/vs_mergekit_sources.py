"""Experts from several fine-tunes (issue 23): one mergekit-moe recipe through mergekit-moe and through
`upcycle convert --mergekit-config`, per gate mode, then the two outputs compared tensor by tensor.

The recipe: a random Llama-shaped bf16 BASE (vs_mergekit.py's source) and three stand-in fine-tunes of it (BASE
with every FFN weight perturbed by N(0, (`--ft-scale` × the tensor's std)²), seeds 1-3, other tensors BASE's
bytes), merged into a Mixtral with one expert per fine-tune, top-2, bf16, every layer, each expert with its own
positive prompts (words of the source's tokenizer). The same YAML goes to both tools, once per gate mode
(`random`, `hidden`, `cheap_embed`); upcycle also gets `--router-std 1/sqrt(hidden)` for the prompted gates, so
its rows have mergekit's unit norm.

For each (gate mode, tool), alternated (upcycle first in odd repeats): wall time, peak RSS of the child tree,
`cp -r` of the output just written, and the ratio of the two (vs_mergekit.py's measurement). Then the last
outputs of the two tools are compared tensor by tensor, in one naming (mergekit under transformers 5 writes the
fused `mlp.experts.gate_up_proj` / `down_proj` and `mlp.gate`; upcycle the per-expert `block_sparse_moe`
names): which tensors are byte-identical, the largest |difference| of the others, and for the routers each
row's cosine and norm ratio between the tools.

mergekit is a contender, never a dependency: it runs from its own virtual environment (`--mergekit-venv`,
default vs_mergekit.py's `$UPCYCLE_CACHE/mergekit-venv`; `--install-mergekit` makes it). Without it only the
upcycle arm runs and the JSON says why.

    python benchmarks/vs_mergekit_sources.py --mergekit-venv /work/mkvenv       # 0.5b, 2 repeats
    python benchmarks/vs_mergekit_sources.py --size tiny --repeats 1           # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convert_bench import folder_bytes
from published import public_path
from vs_mergekit import (
    HERE,
    MERGEKIT_VERSION,
    SIZES,
    cache_root,
    install_mergekit,
    machine,
    make_source,
    mergekit_bin,
    mergekit_status,
    one_run,
    remove,
    summarise,
)

MODES = ("random", "hidden", "cheap_embed")
# one prompt list per fine-tune, in words of make_source's tokenizer (w0 ... w60)
PROMPTS = [
    ["w1 w2 w3 w4 w5", "w6 w7 w8", "w9 w10 w11 w12"],
    ["w20 w21 w22 w23", "w24 w25 w26 w27 w28 w29", "w30 w31"],
    ["w40 w41 w42", "w43 w44 w45 w46", "w47 w48 w49 w50 w51 w52"],
]


# --- the sources ----------------------------------------------------------------------------------------------


def make_finetunes(base: Path, work: Path, scale: float, count: int = 3) -> list[Path]:
    """COUNT copies of BASE with every FFN weight perturbed (seed i): stand-in fine-tunes; reused when complete."""
    import torch
    from safetensors.torch import load_file, save_file

    made = []
    for i in range(1, count + 1):
        dst = work / f"ft-{i}"
        done = dst / ".complete"
        key = {"base": (base / ".complete").read_text(), "scale": scale, "seed": i}
        made.append(dst)
        if done.is_file() and json.loads(done.read_text()) == key:
            continue
        remove(dst)
        dst.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        for f in sorted(base.iterdir()):
            if f.name == ".complete":
                continue
            if f.suffix != ".safetensors":
                shutil.copyfile(f, dst / f.name)
                continue
            sd = load_file(f)
            for name, x in sd.items():
                if ".mlp." in name:
                    noise = torch.randn(x.shape, generator=g) * (scale * float(x.float().std()))
                    sd[name] = (x.float() + noise).to(x.dtype)
            save_file(sd, dst / f.name, metadata={"format": "pt"})
            del sd
        done.write_text(json.dumps(key))
    return made


def recipe(base: Path, sources: list[Path], mode: str) -> str:
    """mergekit-moe's YAML: one expert per source with its prompts, top-2, bf16, Mixtral."""
    lines = [f"base_model: {base}", "architecture: mixtral", f"gate_mode: {mode}", "dtype: bfloat16",
             "experts_per_token: 2", "experts:"]  # fmt: skip
    for src, prompts in zip(sources, PROMPTS, strict=True):
        lines.append(f"  - source_model: {src}")
        lines.append("    positive_prompts:")
        lines += [f'      - "{p}"' for p in prompts]
    return "\n".join(lines) + "\n"


def argv_for(tool: str, cfg: Path, out: Path, venv: Path, mode: str, hidden: int) -> list[str]:
    if tool == "mergekit":
        return [str(mergekit_bin(venv)), str(cfg), str(out)]
    flags = ["--router-std", repr(1 / math.sqrt(hidden))] if mode != "random" else []
    return [str(Path(sys.executable).parent / "upcycle"), "convert", "--mergekit-config", str(cfg), str(out), *flags]


# --- comparing the outputs ------------------------------------------------------------------------------------


def canonical(folder: Path) -> dict[str, tuple[Path, str, int | None, str | None]]:
    """name in upcycle's per-expert layout -> (file, stored name, expert index in a fused tensor, part)."""
    from safetensors import safe_open

    names: dict[str, tuple[Path, str, int | None, str | None]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for key in h.keys():
                parts = key.split(".")
                if ".mlp.experts.gate_up_proj" in key or ".mlp.experts.down_proj" in key:
                    layer, n = parts[2], h.get_slice(key).get_shape()[0]
                    for e in range(n):
                        stem = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                        if key.endswith("down_proj"):
                            names[f"{stem}.w2.weight"] = (f, key, e, None)
                        else:
                            names[f"{stem}.w1.weight"] = (f, key, e, "gate")
                            names[f"{stem}.w3.weight"] = (f, key, e, "up")
                elif key.endswith(".mlp.gate.weight"):
                    names[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = (f, key, None, None)
                else:
                    names[key] = (f, key, None, None)
    return names


def load(where: tuple[Path, str, int | None, str | None]):
    from safetensors import safe_open

    f, key, expert, part = where
    with safe_open(f, "pt") as h:
        x = h.get_tensor(key)
    if expert is None:
        return x
    x = x[expert]
    if part is not None:
        half = x.shape[0] // 2
        x = x[:half] if part == "gate" else x[half:]
    return x.contiguous()


def kind(name: str) -> str:
    if ".experts." in name:
        return "expert"
    return "router" if name.endswith("block_sparse_moe.gate.weight") else "other"


def compare(a: Path, b: Path) -> dict[str, Any]:
    """upcycle's output A against mergekit's B, tensor by tensor: equal bytes, or how far apart."""
    import torch

    left, right = canonical(a), canonical(b)
    rows: dict[str, dict[str, Any]] = {}
    unequal: list[dict[str, Any]] = []
    cosines, ratios = [], []
    for name in sorted(set(left) & set(right)):
        x, y = load(left[name]), load(right[name])
        group = rows.setdefault(kind(name), {"tensors": 0, "byte_identical": 0, "max_abs_diff": 0.0})
        group["tensors"] += 1
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        if same:
            group["byte_identical"] += 1
            continue
        diff = float((x.float() - y.float()).abs().max()) if x.shape == y.shape else math.inf
        group["max_abs_diff"] = max(group["max_abs_diff"], diff)
        if len(unequal) < 5:
            unequal.append({"name": name, "dtypes": [str(x.dtype), str(y.dtype)], "max_abs_diff": diff})
        if kind(name) == "router" and x.shape == y.shape:
            xf, yf = x.float(), y.float()
            cosines += torch.nn.functional.cosine_similarity(xf, yf, dim=1).tolist()
            ratios += (xf.norm(dim=1) / yf.norm(dim=1).clamp(min=1e-12)).tolist()
    out: dict[str, Any] = {
        "compared": len(set(left) & set(right)),
        "only_upcycle": sorted(set(left) - set(right))[:5],
        "only_mergekit": sorted(set(right) - set(left))[:5],
        "byte_identical": sum(r["byte_identical"] for r in rows.values()),
        "by_kind": rows,
        "first_unequal": unequal,
    }
    if cosines:
        out["router_rows"] = {
            "rows": len(cosines),
            "cosine_min": min(cosines),
            "cosine_median": sorted(cosines)[len(cosines) // 2],
            "cosine_max": max(cosines),
            "norm_ratio_min": min(ratios),
            "norm_ratio_max": max(ratios),
        }
    return out


def hidden_variants(base: Path) -> dict[str, Any]:
    """Router rows of the `hidden` gate under four definitions, computed here in float32 from BASE: which hidden
    state (the residual stream entering the layer, mergekit's; the FFN input after post_attention_layernorm,
    upcycle's) and which tokens (each prompt's last token, the prompts of an expert batched with left padding by
    BOS as mergekit does; every token of every prompt pooled, each prompt alone without BOS, as upcycle does).
    Each -> [layers, experts, hidden], unit rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id
    captured: list[torch.Tensor] = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda _m, _a, out: captured.append(out))
             for layer in model.model.layers]  # fmt: skip
    rows: dict[str, list[torch.Tensor]] = {f"{h}/{t}": [] for h in ("residual", "ffn_input") for t in ("last", "all")}
    with torch.no_grad():
        for prompts in PROMPTS:
            captured.clear()
            texts = [tok.bos_token + p for p in prompts]
            batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model(**batch, output_hidden_states=True)
            rows["residual/last"].append(torch.stack(out.hidden_states[:-1])[:, :, -1, :].mean(1))
            rows["ffn_input/last"].append(torch.stack(captured)[:, :, -1, :].mean(1))
            res, ffn = [], []
            for p in prompts:
                captured.clear()
                ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
                one = model(input_ids=ids, output_hidden_states=True)
                res.append(torch.stack(one.hidden_states[:-1])[:, 0])  # [layers, tokens, hidden]
                ffn.append(torch.stack(captured)[:, 0])
            rows["residual/all"].append(torch.cat(res, dim=1).mean(1))
            rows["ffn_input/all"].append(torch.cat(ffn, dim=1).mean(1))
    for h in hooks:
        h.remove()
    return {k: torch.nn.functional.normalize(torch.stack(v, dim=1), dim=-1) for k, v in rows.items()}


def explain_hidden(base: Path, outputs: dict[str, Path]) -> dict[str, Any]:
    """For each tool's routers, the cosine (min, median over rows) with each definition's rows: the definition a
    tool implements shows cosine ~1 (bf16 rounding aside)."""
    import torch

    variants = hidden_variants(base)
    layers = next(iter(variants.values())).shape[0]
    found: dict[str, Any] = {}
    for tool, folder in outputs.items():
        names = canonical(folder)
        routers = torch.stack([load(names[f"model.layers.{i}.block_sparse_moe.gate.weight"]).float()
                               for i in range(layers)])  # fmt: skip
        found[tool] = {}
        for name, rows in variants.items():
            cos = torch.nn.functional.cosine_similarity(routers, rows, dim=-1).flatten().sort().values
            found[tool][name] = {"cosine_min": float(cos[0]), "cosine_median": float(cos[len(cos) // 2])}
    return found


# --- the run ---------------------------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    print("\n| gate | tool | median s | cp -r s | × cp | peak RSS MiB | output GB | byte-identical (of compared) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, block in result["modes"].items():
        same = block.get("agreement") or {}
        for tool, s in block["summary"].items():
            if not s.get("ok"):
                print(f"| {mode} | {tool} | {s.get('skipped') or s.get('error')} | | | | | |")
                continue
            agree = f"{same['byte_identical']} of {same['compared']}" if same and tool == "mergekit" else ""
            print(
                f"| {mode} | {tool} | {s['median_wall_s']:.1f} | {s['median_cp_s']:.1f} | {s['ratio_to_cp']:.2f} | "
                f"{s['peak_rss_bytes'] / 2**20:.0f} | {s['output_bytes'] / 1e9:.2f} | {agree} |"
            )
        if same:
            kinds = ", ".join(f"{k} {r['byte_identical']}/{r['tensors']}" for k, r in same["by_kind"].items())
            rows = same.get("router_rows")
            extra = (f"; router rows cosine {rows['cosine_min']:.4f}–{rows['cosine_max']:.4f}, norm ratio "
                     f"{rows['norm_ratio_min']:.3f}–{rows['norm_ratio_max']:.3f}") if rows else ""  # fmt: skip
            print(f"  {mode}: {kinds}{extra}")
            for tool, defs in (same.get("definitions") or {}).items():
                text = ", ".join(f"{k} {v['cosine_min']:.4f}/{v['cosine_median']:.4f}" for k, v in defs.items())
                print(f"  {mode} {tool} rows vs definitions (cos min/median): {text}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated gate modes")
    parser.add_argument("--ft-scale", type=float, default=0.1, help="perturbation std / the FFN tensor's std")
    parser.add_argument("--work", type=Path, default=HERE / "_work" / "vs_mergekit_sources")
    parser.add_argument("--mergekit-venv", type=Path, default=cache_root() / "mergekit-venv")
    parser.add_argument("--install-mergekit", action="store_true", help="create the venv if it is missing")
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit arm")
    parser.add_argument("--results", type=Path, help="JSON path (default results/vs_mergekit_sources_<size>_<ym>.json)")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("")
    venv = args.mergekit_venv.expanduser()
    if args.install_mergekit and not mergekit_bin(venv).is_file() and not args.no_mergekit:
        install_mergekit(venv, log)
    usable, why = (False, "--no-mergekit") if args.no_mergekit else mergekit_status(venv)
    tools = ["upcycle", "mergekit"] if usable else ["upcycle"]
    if not usable:
        print(f"mergekit arm skipped: {why}", flush=True)

    t0 = time.perf_counter()
    base = make_source(work / f"dense-{args.size}", args.size)
    sources = make_finetunes(base, work / f"fine-tunes-{args.size}", args.ft_scale)
    print(f"BASE and 3 fine-tunes of {folder_bytes(base) / 1e9:.2f} GB each ({time.perf_counter() - t0:.0f} s)")
    hidden = SIZES[args.size]["hidden_size"]
    modes: dict[str, Any] = {}
    for mode in args.modes.split(","):
        cfg = work / f"moe-{mode}.yml"
        cfg.write_text(recipe(base, sources, mode))
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
        for rep in range(args.repeats):
            for tool in tools if rep % 2 == 0 else tools[::-1]:
                out = work / f"out-{tool}"
                run = one_run(tool, argv_for(tool, cfg, out, venv, mode, hidden), out, work, log)
                run["repeat"] = rep + 1
                runs[tool].append(run)
                extra = f", cp {run['cp_s']:.1f} s" if "cp_s" in run else f": {run.get('error')}"
                print(f"{mode} repeat {rep + 1} {tool}: {run['wall_s']:.1f} s, rc {run['rc']}{extra}", flush=True)
        summary = {t: summarise(r) for t, r in runs.items()}
        if not usable:
            summary["mergekit"] = {"ok": False, "skipped": why}
        both = all(summary.get(t, {}).get("ok") for t in ("upcycle", "mergekit"))
        agreement = compare(work / "out-upcycle", work / "out-mergekit") if both else None
        if both and mode == "hidden":
            outputs = {t: work / f"out-{t}" for t in tools}
            agreement["definitions"] = explain_hidden(base, outputs)
        command = None
        if summary["upcycle"].get("ok"):
            command = json.loads((work / "out-upcycle" / "upcycle.json").read_text())["command"]
        flags = argv_for("upcycle", Path("moe.yml"), Path("OUT"), venv, mode, hidden)[2:]
        modes[mode] = {"summary": summary, "runs": runs, "agreement": agreement, "upcycle_command": command,
                       "upcycle_flags": flags}  # fmt: skip
        for tool in tools:
            remove(work / f"out-{tool}")

    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/vs_mergekit_sources.py "
        + " ".join(map(public_path, sys.argv[1:] if argv is None else argv)),
        "machine": machine(why if usable else None),
        "base": {"size": args.size, "config": SIZES[args.size], "bytes": folder_bytes(base)}
        | json.loads((base / ".complete").read_text()),
        "fine_tunes": {"count": len(sources), "ft_scale": args.ft_scale, "perturbed": "every tensor with .mlp."},
        "recipe": recipe(Path("BASE"), [Path(f"ft-{i}") for i in range(1, 4)], "MODE"),
        "repeats": args.repeats,
        "mergekit": {"usable": usable, "version" if usable else "why": why, "pinned": MERGEKIT_VERSION},
        "modes": modes,
    }
    path = args.results or HERE / "results" / f"vs_mergekit_sources_{args.size}_{datetime.now(UTC):%Y%m}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {public_path(path.resolve())}")
    return result


if __name__ == "__main__":
    main()
