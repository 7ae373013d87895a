"""Benchmark `upcycle train` against the loops a user could write instead, on the same MoE, data and step.

Contenders (each in a fresh child process, alternated round by round; on a CPU one torch thread and fp32, on a GPU
(`--device cuda`) bf16 autocast over fp32 weights and AdamW, what `upcycle train` runs there):

- `upcycle`: `upcycle.train.train` itself (data pipeline, RouterTap, balance + z losses, clip, AdamW, schedule,
  logging); step times from its metrics.jsonl (`tokens_per_s` of each step, logged every step).
- `trainer`: transformers' `Trainer` with its defaults (AdamW fused on CPU, `adamw_torch_fused`), the same
  learning rate, warm-up, clip 1.0, micro-batch and blocks; the model's own load-balancing loss
  (`output_router_logits=True`, `router_aux_loss_coef` 0.01); step times from a callback.
- `hand`: a nanoGPT-style loop: forward with labels, RouterTap + balance and z losses, backward, clip, AdamW
  (fused, as the Trainer's), zero_grad.
- `hand-foreach`: the same loop with torch's default (foreach, unfused) AdamW, to show what fusing is worth.

On a GPU the `Trainer` runs with `bf16=True` (autocast over fp32 weights) and nothing else: transformers registers no
autocast rule for `grouped_mm` and casts the experts' input to their weights' dtype, so its experts run in fp32,
which is what a user of the Trainer gets. `hand` registers the rule that `upcycle train` registers
(`upcycle.compat.enable_grouped_mm_autocast`), so its experts run in bf16 as ours do.

Every contender trains the same 8-expert top-2 Mixtral (a random Llama written with `save_pretrained`, converted
by `upcycle convert`) on the same token blocks (this repository's Markdown, tokenised by a byte-level BPE trained on
it), W untimed steps then N timed ones. Reported: median tokens/s over rounds and the ratio to the Trainer.

    python benchmarks/train_loops.py                  # size small, 3 rounds
    python benchmarks/train_loops.py --sizes small,cpu --rounds 5 --steps 8
    python benchmarks/train_loops.py --device cuda --rounds 1       # size smollm2: upcycle, trainer, hand
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONTENDERS = ("upcycle", "trainer", "hand", "hand-foreach")

SIZES: dict[str, dict[str, int]] = {
    # hidden / FFN / layers / heads / kv heads / vocab, sequence length and micro-batch
    "tiny": dict(hidden=64, ffn=192, layers=2, heads=4, kv=2, vocab=512, seq=64, batch=4),
    "small": dict(hidden=256, ffn=768, layers=4, heads=4, kv=2, vocab=4096, seq=256, batch=4),
    "cpu": dict(hidden=512, ffn=1536, layers=8, heads=8, kv=4, vocab=8192, seq=256, batch=4),
    # SmolLM2-135M's shape (its MoE: 692M parameters), for one GPU
    # (8 sequences a step: the Trainer's experts run in fp32, 101 GB at 16 on an H200)
    "smollm2": dict(hidden=576, ffn=1536, layers=30, heads=9, kv=3, vocab=49152, seq=2048, batch=8),
}


def corpus() -> str:
    """This repository's Markdown, concatenated: real English text that travels with the clone."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), HERE / "README.md"]
    return "\n\n".join(f.read_text() for f in files if f.is_file())


def make_model(name: str, work: Path) -> Path:
    """A random dense Llama of size NAME with a BPE tokenizer trained on the corpus, and its 8x top-2 MoE."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec

    s = SIZES[name]
    dense, moe = work / f"dense-{name}", work / f"moe8x2-{name}"
    if (moe / "config.json").is_file():
        return moe
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=s["vocab"], special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([corpus()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
        max_position_embeddings=max(2048, s["seq"]), bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dense)
    fast.save_pretrained(dense)
    convert(str(dense), moe, build_spec(experts=8, top_k=2), force=True)
    return moe


def token_blocks(model: Path, seq: int) -> Any:
    """(blocks, seq) int64 tensor: the corpus tokenised by the model's tokenizer, cut into whole blocks."""
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(corpus())["input_ids"]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


# --- the children -------------------------------------------------------------------------------------------


def run_upcycle(job: dict[str, Any]) -> list[float]:
    from upcycle.train.loop import train
    from upcycle.train.spec import TrainSpec

    steps = job["warmup"] + job["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.txt"
        data.write_text(corpus())
        run_dir = Path(tmp) / "run"
        # dtype auto: fp32 on a CPU, bf16 autocast on a GPU
        spec = TrainSpec(
            data=str(data), seq_len=job["seq"], micro_batch=job["batch"], steps=steps, lr=job["lr"],
            warmup=job["lr_warmup"], log_every=1, eval_every=steps, save_every=steps, seed=0,
        )  # fmt: skip
        train(job["model"], run_dir, spec)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = job["seq"] * job["batch"]
    train_records = [r for r in records if r.get("kind") == "train"]
    return [tokens / r["tokens_per_s"] for r in train_records if r["step"] > job["warmup"]]


def run_trainer(job: dict[str, Any]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    blocks = token_blocks(Path(job["model"]), job["seq"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    gpu = job.get("device") == "cuda"
    model.config.output_router_logits = True  # the Mixtral class's own load-balancing loss
    model.config.router_aux_loss_coef = 0.01
    rows = [{"input_ids": b, "labels": b} for b in blocks]
    times: list[float] = []

    class Clock(TrainerCallback):  # on a GPU each step's kernels are waited for, as float(loss) does in `hand`
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=job["batch"], max_steps=job["warmup"] + job["steps"],
            learning_rate=job["lr"], warmup_steps=job["lr_warmup"], lr_scheduler_type="cosine", weight_decay=0.1,
            adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=not gpu,
            bf16=gpu, disable_tqdm=True, seed=0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    return times[job["warmup"] :]


def run_hand(job: dict[str, Any], fused: bool) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    from upcycle.arch import target_for_model_type
    from upcycle.train.losses import router_losses
    from upcycle.train.routing_hooks import tap_model

    torch.manual_seed(0)
    device = torch.device(job.get("device", "cpu"))
    blocks = token_blocks(Path(job["model"]), job["seq"]).to(device)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).to(device)
    model.train()
    tap = tap_model(model, target_for_model_type(model.config.model_type))
    opt = torch.optim.AdamW(model.parameters(), lr=job["lr"], betas=(0.9, 0.95), weight_decay=0.1, fused=fused or None)
    # on a GPU: bf16 autocast over the fp32 weights, the experts' grouped_mm included (as upcycle train)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        from upcycle.compat import enable_grouped_mm_autocast

        enable_grouped_mm_autocast("cuda", torch.bfloat16)
    times = []
    for step in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        start = (step * job["batch"]) % (len(blocks) - job["batch"])
        ids = blocks[start : start + job["batch"]]
        with autocast:
            loss = model(ids, labels=ids).loss
        balance, z = router_losses(tap.pop())
        (loss + 0.01 * balance + 0.001 * z).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # the host sync every loop makes to log its loss
        times.append(time.perf_counter() - t0)
    return times[job["warmup"] :]


def child(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    name = job["contender"]
    if name == "upcycle":
        times = run_upcycle(job)
    elif name == "trainer":
        times = run_trainer(job)
    else:
        times = run_hand(job, fused=name == "hand")
    tokens = job["seq"] * job["batch"]
    return {"step_s": times, "tokens_per_s": tokens * len(times) / sum(times)}


# --- the parent ---------------------------------------------------------------------------------------------


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if job["threads"]:
        env["OMP_NUM_THREADS"] = str(job["threads"])
    if job["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run stays on the CPU where there is a GPU (upcycle train picks it)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env=env)  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{job['contender']} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| size | contender | tokens/s (median) | rounds (tokens/s) | × Trainer |", "|---|---|---|---|---|"]
    for size, by in summary.items():
        ref = by.get("trainer", {}).get("median")
        for name, row in by.items():
            ratio = f"{row['median'] / ref:.2f}" if ref else "–"
            rounds = ", ".join(f"{v:,.0f}" for v in row["rounds"])
            lines.append(f"| {size} | {name} | {row['median']:,.0f} | {rounds} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SIZES)} (default: small / smollm2)")
    p.add_argument("--contenders", default=None, help="default: all four / upcycle,trainer,hand on a GPU")
    p.add_argument("--rounds", type=int, default=3, help="each contender once per round, in turn")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 on a CPU, torch's own on a GPU)"
    )
    p.add_argument("--work", type=Path, default=HERE / "_work")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    gpu = args.device == "cuda"
    args.sizes = args.sizes or ("smollm2" if gpu else "small")
    args.contenders = args.contenders or ("upcycle,trainer,hand" if gpu else ",".join(CONTENDERS))
    args.threads = args.threads if args.threads is not None else (None if gpu else 1)
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.results or HERE / "results" / f"train_loops_{args.device}_{datetime.now(UTC):%Y%m}.json"
    contenders = args.contenders.split(",")
    runs: list[dict[str, Any]] = []
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for size in args.sizes.split(","):
        model = make_model(size, args.work)
        s = SIZES[size]
        for rnd in range(args.rounds):
            order = contenders[rnd % len(contenders) :] + contenders[: rnd % len(contenders)]  # rotate the order
            for name in order:
                job = dict(contender=name, model=str(model), seq=s["seq"], batch=s["batch"], steps=args.steps,
                           warmup=args.warmup, threads=args.threads, lr=1e-3, lr_warmup=2,
                           device=args.device)  # fmt: skip
                res = run_child(job)
                runs.append({"size": size, "round": rnd, "contender": name, **res})
                print(f"{size:6s} round {rnd} {name:13s} {res['tokens_per_s']:9,.0f} tokens/s", flush=True)
        for name in contenders:
            tps = [r["tokens_per_s"] for r in runs if r["size"] == size and r["contender"] == name]
            summary.setdefault(size, {})[name] = {"median": statistics.median(tps), "rounds": tps}
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "precision": "bf16 autocast over fp32 weights and AdamW" if gpu else "fp32",
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "load_avg_at_end": os.getloadavg(),
        "sizes": {k: SIZES[k] for k in args.sizes.split(",")},
        "summary": summary,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print()
    print(table(summary))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
