"""Does upcycling pay? From one dense parent, train each arm for the same tokens and compare held-out perplexity.

Arms (issue 14): `dense` (the parent, trained on), `moe-all` (clone-upcycled Mixtral, 8 experts, top-2, every
layer), `moe-every2` (Qwen2-MoE, 8 experts, top-2, every other layer) and `drop-r0.5` (Drop-Upcycling, 8×top-2,
every layer). Every arm and seed: same text in the same order (the seed sets the data order, and the conversion's
seed), same AdamW, warmup and cosine decay to 10%, same tokens. Held-out perplexity on one fixed set that no phase
trains on, at the start and along the way.

Training goes through `upcycle.train.loop.train`, the function behind `upcycle train`. That function trains MoE
checkpoints only, so the dense model trains as a Mixtral with ONE expert and top-1: the softmax over one logit is
1, so its MoE block is exactly the dense FFN (checked on logits when the folder is made), with no balance or
z-loss (their coefficients are 0 for the dense runs). The parent is pretrained from scratch the same way and
turned back into a Llama folder, which `upcycle convert` then upcycles.

Text: the Jargon File, `fortunes`, Perl's manual (perl-doc) and Git's (git-doc) from Debian packages (apt-get
download, cached), and the source files of this Python's standard library (~47 MB, ~15.7M tokens with the 4k
BPE); a byte-level BPE tokenizer trained on the training parts with the `tokenizers` library (the gpu preset uses
SmolLM2 and its own tokenizer). Documents (paragraphs) are shuffled once with a fixed seed and cut into three
disjoint parts: held-out, parent pretraining, continuation (the arms).

Outputs under benchmarks/results/: upcycle_vs_dense_<preset>.json (rewritten as each run finishes, so an
interrupted study keeps what it finished), upcycle_vs_dense_<preset>_tokens.png and _flops.png.

    python benchmarks/upcycle_vs_dense.py --preset cpu          # <= 45 min on 2 idle cores
    python benchmarks/upcycle_vs_dense.py --preset cpu-long     # then: cpu's parent, 3 seeds, 2x the tokens
    python benchmarks/upcycle_vs_dense.py --preset smoke        # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs"

# arm -> `upcycle convert` flags (None: the dense arm, a one-expert Mixtral of the parent)
ARMS: dict[str, list[str] | None] = {
    "dense": None,
    "moe-all": ["--experts", "8", "--top-k", "2"],
    "moe-every2": ["--experts", "8", "--top-k", "2", "--every", "2"],
    "drop-r0.5": ["--config", str(CONFIGS / "drop-upcycling-r0.5.yaml")],
}
ARM_LABELS = {
    "dense": "dense (continued)",
    "moe-all": "clone MoE 8×top-2, every layer",
    "moe-every2": "clone MoE 8×top-2, every other layer",
    "drop-r0.5": "Drop-Upcycling r=0.5, 8×top-2",
}
DEBIAN = {  # package -> the member folder or file the text is read from
    "jargon-text": "usr/share/doc/jargon-text/jargon.txt.gz",
    "fortunes": "usr/share/games/fortunes",
    "perl-doc": "usr/share/perl",  # Perl's manual: */pod/*.pod
    "git-doc": "usr/share/doc/git-doc",  # Git's manual pages and guides: *.txt (AsciiDoc)
}
MANUALS = {"perl-doc": "*.pod", "git-doc": "*.txt"}  # package -> the files of its folder that are text


@dataclass(frozen=True)
class Preset:
    """One size of the study. Token counts are per run; `parent` is "scratch" or a model upcycle can resolve."""

    parent: str = "scratch"
    hidden: int = 128
    layers: int = 4
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 4096
    seq_len: int = 256
    micro_batch: int = 16
    parent_tokens: int = 12_000_000  # pretraining of the parent (scratch only)
    parent_lr: float = 3e-3
    arm_tokens: int = 2_000_000
    continue_tokens: int | None = None  # what the continuation part of the corpus is sized for (None: arm_tokens)
    arm_lr: float = 1e-3
    warmup_frac: float = 0.02
    seeds: tuple[int, ...] = (0, 1)
    evals: int = 8  # held-out evaluations per arm run (besides the one at the start)
    heldout_bytes: int = 200_000  # text held out for evaluation (~65k tokens)
    stdlib: bool = True  # add the Python standard library's source files to the corpus
    manuals: bool = True  # add Perl's and Git's manuals (Debian's perl-doc and git-doc) to the corpus
    text_bytes: int | None = None  # cap on the corpus (smoke)
    device: str = "cpu"
    dtype: str = "fp32"
    jobs: int = 2  # arm runs at a time (processes)
    threads: int = 1  # torch threads per arm process
    parent_threads: int = 0  # torch threads for the parent's pretraining, which runs alone (0: every core)
    base: str | None = None  # a preset whose corpus, tokenizer, parent and converted models this one reuses


# <= 45 min on 2 idle cores (36 min measured, benchmarks/README.md): a 1.1M-parameter parent (0.59M outside the
# tied embedding) pretrained on 11.5M tokens, 10.3 per parameter; 1.5M tokens per arm run, 2 seeds. The corpus
# (~15.7M tokens) holds the pretraining and a 3.3M-token continuation part, so no phase repeats text.
CPU = Preset(
    intermediate=256, kv_heads=2, parent_tokens=11_500_000, continue_tokens=3_000_000, arm_tokens=1_500_000, evals=6
)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        hidden=32,
        layers=2,
        intermediate=64,
        heads=2,
        kv_heads=2,
        vocab=384,
        seq_len=64,
        micro_batch=4,
        parent_tokens=8192,
        arm_tokens=2048,
        seeds=(0,),
        evals=2,
        heldout_bytes=20_000,
        stdlib=False,
        manuals=False,
        text_bytes=300_000,
        jobs=1,
    ),
    "cpu": CPU,
    # longer (~1 hour on 2 idle cores once `cpu` has made the parent): cpu's corpus, parent and converted
    # models, 3 seeds and 3M tokens per arm run
    "cpu-long": replace(CPU, arm_tokens=3_000_000, seeds=(0, 1, 2), evals=8, base="cpu"),
    "gpu": Preset(
        parent="smollm2",
        seq_len=1024,
        micro_batch=32,
        arm_tokens=100_000_000,
        arm_lr=3e-4,
        evals=10,
        heldout_bytes=2_000_000,
        device="cuda",
        dtype="bf16",
        jobs=1,
        threads=8,
    ),
}

# fields only the arm runs read: a preset with a `base` may differ from it in these and nothing else
ARM_ONLY = {"arm_tokens", "arm_lr", "seeds", "evals", "jobs", "threads", "parent_threads", "base"}


def parent_settings(preset: Preset) -> dict[str, Any]:
    """The fields the corpus, tokenizer and parent are made from (as JSON holds them: tuples become lists)."""
    return {k: v for k, v in json.loads(json.dumps(asdict(preset))).items() if k not in ARM_ONLY}


def base_mismatch(name: str) -> list[str]:
    """Fields in which preset NAME differs from its base where it must not (it would reuse the wrong parent)."""
    preset = PRESETS[name]
    if preset.base is None:
        return []
    mine, base = parent_settings(preset), parent_settings(PRESETS[preset.base])
    return [k for k, v in mine.items() if v != base[k]]


# --- text -----------------------------------------------------------------------------------------------


def cache_root() -> Path:
    root = os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "upcycle"
    )
    return Path(root)


class TextUnavailable(RuntimeError):
    """apt-get could not provide a Debian text package (no apt, no network): the study cannot build its corpus."""


TEXT_CACHE: list[Path] = []  # --text-cache, when given


def debian_package(name: str) -> Path:
    """The extracted package under the cache (apt-get download + dpkg-deb -x, once)."""
    root = (TEXT_CACHE[0] if TEXT_CACHE else cache_root() / "realtext" / "debian") / name
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        for attempt in range(2):
            try:
                proc = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
            except OSError as exc:
                raise TextUnavailable(f"apt-get download {name}: {exc}") from None
            if proc.returncode == 0:
                break
            if attempt == 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        else:
            raise TextUnavailable(f"apt-get download {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        deb = sorted(Path(tmp).glob(f"{name}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        (Path(tmp) / "x" / ".complete").write_text(deb.name)
        os.replace(Path(tmp) / "x", root)
    return root


def source_texts(preset: Preset) -> list[tuple[str, str]]:
    """(name, text) of every source file, in a fixed order."""
    import gzip

    out = []
    jargon = debian_package("jargon-text") / DEBIAN["jargon-text"]
    out.append(("jargon-text/jargon.txt", gzip.decompress(jargon.read_bytes()).decode("utf-8", "replace")))
    fortunes = debian_package("fortunes") / DEBIAN["fortunes"]
    for f in sorted(fortunes.rglob("*")):
        if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"):
            text = f.read_bytes().decode("utf-8", "replace").replace("\n%\n", "\n\n")  # records -> paragraphs
            out.append((f"fortunes/{f.relative_to(fortunes)}", text))
    for package, pattern in MANUALS.items() if preset.manuals else ():
        folder = debian_package(package) / DEBIAN[package]
        for f in sorted(folder.rglob(pattern)):
            if f.is_file() and not f.is_symlink():
                out.append((f"{package}/{f.relative_to(folder)}", f.read_bytes().decode("utf-8", "replace")))
    if preset.stdlib:
        import sysconfig

        lib = Path(sysconfig.get_paths()["stdlib"])
        for f in sorted(lib.rglob("*.py")):
            rel = f.relative_to(lib)
            if rel.parts[0] in ("site-packages", "dist-packages") or not f.is_file():
                continue
            out.append((f"python-stdlib/{rel}", f.read_bytes().decode("utf-8", "replace")))
    return out


def split_corpus(preset: Preset, folder: Path) -> dict[str, Any]:
    """Paragraph documents, shuffled once (seed 0), into heldout / pretrain / continue .txt files in FOLDER."""
    done = folder / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    docs, sources = [], []
    for name, text in source_texts(preset):
        sources.append(name)
        docs += [d.strip("\n") for d in re.split(r"\n\s*\n", text) if d.strip()]
    random.Random(0).shuffle(docs)
    if preset.text_bytes:
        kept, total = [], 0
        for d in docs:
            if total >= preset.text_bytes:
                break
            kept.append(d)
            total += len(d) + 2
        docs = kept
    heldout, i, size = [], 0, 0
    while i < len(docs) and size < preset.heldout_bytes:
        heldout.append(docs[i])
        size += len(docs[i]) + 2
        i += 1
    rest = docs[i:]
    # the continuation gets its share of the rest by the runs' token budgets (the parent's when pretrained)
    cont = preset.continue_tokens or preset.arm_tokens
    share = cont / (cont + (preset.parent_tokens if preset.parent == "scratch" else 0))
    cut = len(rest) - max(1, round(share * len(rest)))
    parts = {"heldout": heldout, "pretrain": rest[:cut], "continue": rest[cut:]}
    info: dict[str, Any] = {"sources": len(sources), "documents": len(docs), "parts": {}}
    for name, part in parts.items():
        (folder / name).mkdir()
        text = "\n\n".join(part) + "\n"
        (folder / name / f"{name}.txt").write_text(text)
        info["parts"][name] = {"documents": len(part), "bytes": len(text.encode())}
    info["source_groups"] = sorted({s.split("/")[0] for s in sources})
    done.write_text(json.dumps(info, indent=2))
    return info


def train_tokenizer(corpus: Path, vocab: int, out: Path):
    """Byte-level BPE of `vocab` tokens on the training parts (never the held-out one); EOS <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus / p / f"{p}.txt") for p in ("pretrain", "continue")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


# --- dense <-> one-expert Mixtral ----------------------------------------------------------------------


def llama_config(preset: Preset, tokenizer) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _shared_fields(cfg: Any) -> dict[str, Any]:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "hidden_act",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    )
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


def _check_same_logits(a, b, vocab: int, what: str) -> float:
    import torch

    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (a(ids).logits - b(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"{what}: logits differ by {diff}; the mapping is wrong")
    return diff


def dense_to_one_expert(dense: Path, out: Path) -> Path:
    """The dense Llama as a Mixtral with one expert, top-1 (exactly the same function)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    src = LlamaForCausalLM.from_pretrained(dense, dtype=torch.float32)
    cfg = MixtralConfig(
        **_shared_fields(src.config), num_local_experts=1, num_experts_per_tok=1, router_aux_loss_coef=0.0
    )
    moe = MixtralForCausalLM(cfg).to(torch.float32)
    state = {k: v for k, v in src.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(src.model.layers):
        m = layer.mlp
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([m.gate_proj.weight, m.up_proj.weight])[None]
        state[f"model.layers.{i}.mlp.experts.down_proj"] = m.down_proj.weight[None].clone()
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.zeros(1, cfg.hidden_size)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise SystemExit(f"one-expert mapping: missing {missing}, unexpected {unexpected}")
    moe.tie_weights()
    _check_same_logits(src, moe, cfg.vocab_size, "dense -> one-expert Mixtral")
    moe.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense).save_pretrained(out)
    return out


def one_expert_to_dense(moe_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

    moe = MixtralForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    dense = LlamaForCausalLM(LlamaConfig(**_shared_fields(moe.config))).to(torch.float32)
    state = {k: v for k, v in moe.state_dict().items() if ".mlp." not in k}
    h = moe.config.intermediate_size
    for i, layer in enumerate(moe.model.layers):
        gate_up, down = layer.mlp.experts.gate_up_proj[0], layer.mlp.experts.down_proj[0]  # (2I, H), (H, I)
        state[f"model.layers.{i}.mlp.gate_proj.weight"] = gate_up[:h].clone()
        state[f"model.layers.{i}.mlp.up_proj.weight"] = gate_up[h:].clone()
        state[f"model.layers.{i}.mlp.down_proj.weight"] = down.clone()
    dense.load_state_dict(state, strict=False)
    dense.tie_weights()
    _check_same_logits(moe, dense, moe.config.vocab_size, "one-expert Mixtral -> dense")
    dense.save_pretrained(out)
    AutoTokenizer.from_pretrained(moe_dir).save_pretrained(out)
    return out


# --- counting ------------------------------------------------------------------------------------------


def active_params(folder: Path) -> tuple[int, int]:
    """(total, active per token): routed expert tensors count top_k/E of their size; embeddings count once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 1
    top_k = getattr(cfg, "num_experts_per_tok", 1)
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        routed = ".experts." in name and "shared" not in name
        active += p.numel() * top_k // experts if routed else p.numel()
    return total, active


# --- one run (in a worker process) ----------------------------------------------------------------------


def heldout_loss(model_dir: Path, data: dict[str, str], preset: Preset) -> float:
    """Mean next-token loss of MODEL over the held-out blocks before any training (the curves' first point)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.source import cache_dir
    from upcycle.train.data import prepare

    tok = AutoTokenizer.from_pretrained(model_dir)
    _, heldout, _ = prepare(
        data["continue"], tok, preset.seq_len, eval_data=data["heldout"], cache_dir=cache_dir() / "tokens"
    )
    device = torch.device(preset.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(preset, device):
        for start in range(0, heldout.n_blocks, preset.micro_batch):
            ids = heldout.blocks(range(start, min(start + preset.micro_batch, heldout.n_blocks))).to(device)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += model(input_ids=ids, labels=ids).loss.double().item() * n
            count += n
    return total / count


def _autocast(preset: Preset, device):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if preset.dtype == "bf16" else contextlib.nullcontext()


def train_run(job: dict[str, Any]) -> dict[str, Any]:
    """Train job["model"] with upcycle's training loop; return its eval curve. Runs in a spawned process."""
    import torch

    from upcycle.train.loop import train
    from upcycle.train.metrics import read_metrics
    from upcycle.train.spec import TrainSpec

    preset = Preset(**job["preset"])
    torch.set_num_threads(job.get("threads") or preset.threads)
    start_loss = heldout_loss(Path(job["model"]), job["data"], preset) if job["eval_at_start"] else None
    steps = max(1, job["tokens"] // (preset.seq_len * preset.micro_batch))
    spec = TrainSpec(
        data=job["data"][job["phase"]],
        eval_data=job["data"]["heldout"],
        seq_len=preset.seq_len,
        micro_batch=preset.micro_batch,
        steps=steps,
        lr=job["lr"],
        warmup=max(1, round(preset.warmup_frac * steps)),
        eval_every=max(1, steps // job["evals"]),
        save_every=steps,
        keep_last=1,
        log_every=max(1, steps // 50),
        seed=job["seed"],
        aux_loss_coef=job["aux"],
        z_loss_coef=job["z"],
        dtype=preset.dtype,
    )
    t0 = time.perf_counter()
    result = train(job["model"], Path(job["run_dir"]), spec, force=True)
    wall = time.perf_counter() - t0
    records = read_metrics(Path(job["run_dir"]))
    evals = [{"tokens": 0, "eval_loss": start_loss}] if start_loss is not None else []
    evals += [{"tokens": r["tokens"], "eval_loss": r["eval_loss"]} for r in records if r["kind"] == "eval"]
    train_loss = [{"tokens": r["tokens"], "lm": r["lm"]} for r in records if r["kind"] == "train"]
    return {
        "arm": job["arm"],
        "seed": job["seed"],
        "steps": steps,
        "tokens": steps * preset.seq_len * preset.micro_batch,
        "wall_s": wall,
        "tokens_per_s": result.summary.get("tokens_per_s"),
        "evals": evals,
        "train_lm": train_loss,
        "final": result.summary.get("final"),
    }


# --- the study ------------------------------------------------------------------------------------------


def upcycle_exe() -> str:
    return str(Path(sys.executable).parent / "upcycle")


def convert(parent: Path, out: Path, flags: list[str], seed: int, log: Path) -> None:
    cmd = [upcycle_exe(), "convert", str(parent), str(out), *flags, "--seed", str(seed), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise SystemExit(f"upcycle convert failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def make_parent(preset: Preset, work: Path, data: dict[str, str], log: Path, record: dict[str, Any]) -> Path:
    """The dense parent: SmolLM2 (gpu), or a Llama pretrained from scratch through a one-expert Mixtral."""
    if preset.parent != "scratch":
        from upcycle.source import resolve

        return resolve(preset.parent).folder
    parent = work / "parent"
    if (parent / ".complete").is_file():
        record["parent"] = json.loads((parent / ".complete").read_text())
        return parent
    import torch
    from transformers import LlamaForCausalLM

    tok = train_tokenizer(work / "corpus", preset.vocab, work / "tokenizer")
    init = work / "parent-init"
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(preset, tok)).save_pretrained(init)
    tok.save_pretrained(init)
    one = dense_to_one_expert(init, work / "parent-init-e1")
    job = {
        "arm": "parent",
        "seed": 0,
        "model": str(one),
        "run_dir": str(work / "runs" / "parent"),
        "data": data,
        "phase": "pretrain",
        "tokens": preset.parent_tokens,
        "lr": preset.parent_lr,
        "evals": 4,
        "aux": 0.0,
        "z": 0.0,
        "eval_at_start": False,
        # every core: alone on an idle machine two threads train 1.8x as fast as one (on a loaded machine they
        # ran at half the speed of one; pass --parent-threads 1 there)
        "threads": preset.parent_threads or os.cpu_count() or 1,
        "preset": asdict(preset),
    }
    print(f"pretraining the parent: {preset.parent_tokens:,} tokens", flush=True)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        res = pool.submit(train_run, job).result()
    tmp = work / "parent.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    one_expert_to_dense(Path(res["final"]), tmp)
    total, _ = active_params(tmp)
    info = {
        "params": total,
        "tokens": res["tokens"],
        "tokens_per_param": res["tokens"] / total,
        "wall_s": res["wall_s"],
        "tokens_per_s": res["tokens_per_s"],
        "evals": res["evals"],
    }
    (tmp / ".complete").write_text(json.dumps(info))
    shutil.rmtree(parent, ignore_errors=True)
    os.replace(tmp, parent)
    shutil.rmtree(work / "runs" / "parent" / "checkpoints", ignore_errors=True)
    record["parent"] = info
    return parent


def arm_model(arm: str, seed: int, parent: Path, work: Path, log: Path) -> Path:
    out = work / "models" / f"{arm}-s{seed}"
    if arm == "dense":
        if not (out / "config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            dense_to_one_expert(parent, out)
        return out
    convert(parent, out, ARMS[arm] or [], seed, log)
    return out


def summarise(runs: list[dict[str, Any]], last: int = 2) -> dict[str, Any]:
    """Per arm: perplexity of the mean of the last `last` evals, mean/sd/min/max over seeds; paired Δ vs dense."""
    per: dict[str, dict[int, float]] = {}
    for r in runs:
        tail = [e["eval_loss"] for e in r["evals"] if e["tokens"] > 0][-last:]
        if tail:
            per.setdefault(r["arm"], {})[r["seed"]] = math.exp(statistics.fmean(tail))
    out = {}
    dense = per.get("dense", {})
    for arm, by_seed in per.items():
        ppl = list(by_seed.values())
        row: dict[str, Any] = {
            "seeds": sorted(by_seed),
            "ppl_mean": statistics.fmean(ppl),
            "ppl_sd": statistics.stdev(ppl) if len(ppl) > 1 else None,
            "ppl_min": min(ppl),
            "ppl_max": max(ppl),
            "ppl_by_seed": {str(s): v for s, v in by_seed.items()},
        }
        paired = [100 * (v / dense[s] - 1) for s, v in by_seed.items() if s in dense]
        if arm != "dense" and paired:
            row["vs_dense_pct_by_seed"] = paired
            row["vs_dense_pct_mean"] = statistics.fmean(paired)
        out[arm] = row
    seeds_dense = list(dense.values())
    if len(seeds_dense) > 1:
        out["_noise"] = {"dense_seed_spread_pct": 100 * (max(seeds_dense) / min(seeds_dense) - 1)}
    return out


def curves(record: dict[str, Any], arm: str, axis: str) -> dict[int, list[tuple[float, float]]]:
    """seed -> [(x, perplexity)] of ARM's runs; x is tokens, or training FLOPs (6 x active parameters x tokens)."""
    runs = [r for r in record["runs"] if r["arm"] == arm]
    scale = 6 * record["active_params"][arm] if axis == "flops" and runs else 1
    return {r["seed"]: [(e["tokens"] * scale, math.exp(e["eval_loss"])) for e in r["evals"]] for r in runs}


def vs_dense(record: dict[str, Any], arm: str, axis: str) -> dict[float, list[float]]:
    """x -> ARM's perplexity against dense's at the same x (tokens or FLOPs), in %, one value per paired seed.
    Dense's curve is interpolated linearly between its evals; points past its last eval are left out, and so are
    the runs' starting points (x = 0)."""
    dense, out = curves(record, "dense", axis), {}
    for seed, points in curves(record, arm, axis).items():
        if seed not in dense:
            continue
        xd, yd = zip(*dense[seed], strict=True)
        for x, ppl in points:
            if 0 < x <= xd[-1]:
                i = next(j for j in range(1, len(xd)) if xd[j] >= x)
                ref = yd[i - 1] + (yd[i] - yd[i - 1]) * (x - xd[i - 1]) / (xd[i] - xd[i - 1])
                out.setdefault(x, []).append(100 * (ppl / ref - 1))
    return out


def plot(record: dict[str, Any], stem: Path) -> list[str]:
    """One PNG per x axis (tokens, FLOPs): perplexity per arm, and beside it each arm against dense (paired)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, label in (
        ("tokens", "training tokens (continuation)"),
        ("flops", "training FLOPs (6 × active × tokens)"),
    ):
        fig, (ax, rel) = plt.subplots(1, 2, figsize=(13, 4.8))
        shown: list[float] = []
        for arm in ARMS:
            per_seed = curves(record, arm, axis)
            if not per_seed:
                continue
            per_x: dict[float, list[float]] = {}
            for points in per_seed.values():
                for x, ppl in points:
                    per_x.setdefault(x, []).append(ppl)
            xs = sorted(per_x)
            mean = [statistics.fmean(per_x[x]) for x in xs]
            n = len(per_seed)
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{ARM_LABELS[arm]} ({n} seed{'s' * (n > 1)})")
            if n > 1:
                ax.fill_between(
                    xs, [min(per_x[x]) for x in xs], [max(per_x[x]) for x in xs], color=line.get_color(), alpha=0.2
                )
            diff = vs_dense(record, arm, axis) if arm != "dense" else {}
            if diff:
                dx = sorted(diff)
                rel.plot(dx, [statistics.fmean(diff[x]) for x in dx], marker="o", ms=3, color=line.get_color())
                lo, hi = [min(diff[x]) for x in dx], [max(diff[x]) for x in dx]
                rel.fill_between(dx, lo, hi, color=line.get_color(), alpha=0.2)
                shown += lo + hi
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.set_title(f"upcycle vs dense, preset {record['preset_name']} (band: min-max over seeds)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        rel.axhline(0, color="black", lw=1, label="dense")
        rel.set_xlabel(label)
        rel.set_ylabel("perplexity vs dense at the same x, % (paired by seed)")
        rel.set_title("against dense (below 0: better than dense)", fontsize=10)
        if shown:  # the converted models' starting points are left out: Drop-Upcycling's would flatten the rest
            span = max(shown) - min(shown)
            rel.set_ylim(min(min(shown), 0) - 0.1 * span, max(max(shown), 0) + 0.1 * span)
        rel.grid(True, alpha=0.3)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def write(record: dict[str, Any], path: Path) -> None:
    record["summary"] = summarise(record["runs"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine(preset: Preset) -> dict[str, Any]:
    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if preset.device == "cuda" and torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "gpu": gpu,
        "os": platform.platform(),
        "versions": {k: _pkg(k) for k in ("torch", "transformers", "tokenizers", "upcycle")}
        | {"python": platform.python_version()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the preset's)")
    parser.add_argument("--arm-tokens", type=int, help="tokens per arm run (default: the preset's)")
    parser.add_argument("--parent-threads", type=int, help="torch threads for the parent (default: every core)")
    parser.add_argument("--work", type=Path, help="default benchmarks/_work/upcycle_vs_dense/<preset>")
    parser.add_argument(
        "--results", type=Path, help="JSON path (default benchmarks/results/upcycle_vs_dense_<preset>.json)"
    )
    parser.add_argument("--text-cache", type=Path, help="where Debian's packages are kept (default: in the cache)")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the PNGs of a saved results file")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        for png in plot(saved, args.replot.with_suffix("")):
            print(f"wrote {_public(png)}")
        return saved
    if args.text_cache:
        TEXT_CACHE[:] = [args.text_cache]

    if base_mismatch(args.preset):
        parser.error(f"preset {args.preset} differs from its base in {base_mismatch(args.preset)}")
    preset = PRESETS[args.preset]
    if args.seeds:
        preset = replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.jobs:
        preset = replace(preset, jobs=args.jobs)
    if args.arm_tokens:  # the corpus split and the parent stay the preset's, so they are reused
        cont = preset.continue_tokens or preset.arm_tokens
        preset = replace(preset, continue_tokens=cont, arm_tokens=args.arm_tokens)
    if args.parent_threads:
        preset = replace(preset, parent_threads=args.parent_threads)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    work = (args.work or HERE / "_work" / "upcycle_vs_dense" / (preset.base or args.preset)).resolve()
    made_for = parent_settings(preset)
    stamp = work / "made_for.json"  # what the corpus and parent in WORK were made with
    if stamp.is_file() and json.loads(stamp.read_text()) != made_for:
        parser.error(
            f"{_public(str(work))} holds a corpus and parent made with other settings: remove it or pass --work"
        )
    (work / "runs" / args.preset).mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(made_for, indent=2))
    log = work / "log.txt"
    path = (args.results or HERE / "results" / f"upcycle_vs_dense_{args.preset}.json").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    record: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/upcycle_vs_dense.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset_name": args.preset,
        "preset": asdict(preset),
        "machine": machine(preset),
        "arms": {a: {"label": ARM_LABELS[a], "flags": " ".join(_public(f) for f in ARMS[a] or [])} for a in arms},
        "runs": [],
        "complete": False,
    }
    corpus = split_corpus(preset, work / "corpus")
    record["corpus"] = corpus
    data = {p: str(work / "corpus" / p) for p in ("heldout", "pretrain", "continue")}
    parent = make_parent(preset, work, data, log, record)
    record["data_tokens"] = count_tokens(parent, data, preset)
    record["arm_epochs"] = preset.arm_tokens / record["data_tokens"]["continue"]  # above 1: the arms repeat text
    print(f"parent ready ({time.perf_counter() - t_start:.0f} s); tokens: {record['data_tokens']}", flush=True)

    jobs, record["active_params"], record["total_params"] = [], {}, {}
    # dense and the every-layer MoE first, both seeds, so that a study cut short still has the main comparison
    first = [a for a in arms if a in ("dense", "moe-all")]
    order = [(a, s) for pair in (first, [a for a in arms if a not in first]) for s in preset.seeds for a in pair]
    for arm, seed in order:
        model = arm_model(arm, seed, parent, work, log)
        total, active = active_params(model)
        if arm == "dense":  # the one-expert router is not part of the dense model
            total -= preset.hidden * preset.layers
            active -= preset.hidden * preset.layers
        record["total_params"][arm], record["active_params"][arm] = total, active
        jobs.append(
            {
                "arm": arm,
                "seed": seed,
                "model": str(model),
                "run_dir": str(work / "runs" / args.preset / f"{arm}-s{seed}"),
                "data": data,
                "phase": "continue",
                "tokens": preset.arm_tokens,
                "lr": preset.arm_lr,
                "evals": preset.evals,
                "aux": 0.0 if arm == "dense" else 0.01,
                "z": 0.0 if arm == "dense" else 0.001,
                "eval_at_start": True,
                "preset": asdict(preset),
            }
        )
    write(record, path)
    with ProcessPoolExecutor(preset.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_run, job): job for job in jobs}
        for fut in as_completed(futures):
            res = fut.result()
            shutil.rmtree(Path(futures[fut]["run_dir"]) / "checkpoints", ignore_errors=True)
            record["runs"].append(res)
            write(record, path)
            record["pngs"] = [_public(p) for p in plot(record, path.with_suffix(""))]
            last = math.exp(res["evals"][-1]["eval_loss"])
            print(
                f"done {res['arm']} seed {res['seed']}: ppl {last:.2f}, {res['wall_s']:.0f} s "
                f"({res['tokens_per_s'] or 0:.0f} tokens/s); {time.perf_counter() - t_start:.0f} s in all",
                flush=True,
            )
    record["complete"] = True
    record["wall_s"] = time.perf_counter() - t_start
    write(record, path)
    record["pngs"] = [_public(p) for p in plot(record, path.with_suffix(""))]
    write(record, path)
    print_table(record)
    print(f"wrote {_public(str(path))}")
    return record


def count_tokens(parent: Path, data: dict[str, str], preset: Preset) -> dict[str, int]:
    """Tokens of each part with the parent's tokenizer (through the training loop's own cache)."""
    from transformers import AutoTokenizer

    from upcycle.source import cache_dir
    from upcycle.train.data import prepare

    tok = AutoTokenizer.from_pretrained(parent)
    out = {}
    for phase in ("pretrain", "continue"):
        if phase == "pretrain" and preset.parent != "scratch":
            continue
        train_blocks, heldout, _ = prepare(
            data[phase], tok, preset.seq_len, eval_data=data["heldout"], cache_dir=cache_dir() / "tokens"
        )
        out[phase] = train_blocks.n_tokens
        out["heldout"] = heldout.n_tokens
    return out


def print_table(record: dict[str, Any]) -> None:
    print("\n| arm | active params | final ppl (mean of last 2 evals) | sd over seeds | vs dense (paired) |")
    print("|---|---|---|---|---|")
    for arm, row in record["summary"].items():
        if arm.startswith("_"):
            continue
        sd = f"{row['ppl_sd']:.2f}" if row["ppl_sd"] is not None else "-"
        vs = f"{row['vs_dense_pct_mean']:+.2f}%" if "vs_dense_pct_mean" in row else "-"
        print(f"| {ARM_LABELS[arm]} | {record['active_params'][arm]:,} | {row['ppl_mean']:.2f} | {sd} | {vs} |")


def _public(arg: str) -> str:
    return os.path.relpath(arg, ROOT) if str(arg).startswith(str(ROOT)) else str(arg)


if __name__ == "__main__":
    main()
