"""Fine-grained upcycling: scale only down_proj by G (exact) or gate, up and down each by G^(1/3) (Megatron-Core)?

A short, CPU-sized answer on real text (the Jargon File, as the tests use it):
1. a small dense Llama (character-level tokenizer of tests/tiny.py, hidden 128, intermediate 512, 4 layers) is
   pretrained from scratch for --pretrain-steps on the first 90 % of the text (plain AdamW loop), so that its
   FFNs hold something worth keeping;
2. it is upcycled with `--init fine-grained --granularity 4 --experts 8 --top-k 4` twice, once per
   `--fine-grained-scale`, and each MoE is compared with the dense model at step 0 (`verify`, whole mode);
3. each MoE is trained with `upcycle train` (the library call) for --steps on the same 90 %, evaluated every
   --eval-every steps on the last 10 %; the same seed, data order and settings for both.

    OMP_NUM_THREADS=1 python benchmarks/fine_grained_scale.py            # ~10 min of one core
    python benchmarks/fine_grained_scale.py --seeds 0,1 --steps 300

Writes benchmarks/results/fine_grained_scale_<yyyymm>.json (curves, final eval losses, step-0 closeness).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py (tokenizer), realtext.py (the Jargon File)

DENSE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(init="fine-grained", granularity=4, experts=8, top_k=4)
SEQ, BATCH = 128, 8


def pretrain(folder: Path, train_text: str, steps: int, seed: int) -> list[float]:
    """A dense model trained from scratch with a plain AdamW loop; returns its loss every 50 steps."""
    import torch
    from tiny import save_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = tiny_config("llama", max_position_embeddings=SEQ, **DENSE)
    model = AutoModelForCausalLM.from_config(config)
    save_tokenizer(folder, config.vocab_size)
    ids = torch.tensor(AutoTokenizer.from_pretrained(folder)(train_text)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - SEQ, (BATCH,), generator=gen)
        batch = torch.stack([ids[s : s + SEQ] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append(round(loss.item(), 4))
            print(f"dense step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(folder)
    return curve


def eval_loss(folder: Path, text: str) -> float:
    """Mean next-token loss over the text's non-overlapping SEQ-token blocks (as `upcycle train` evaluates)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor(AutoTokenizer.from_pretrained(folder)(text)["input_ids"])
    blocks = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(BATCH)]
    sizes = [len(b) for b in blocks.split(BATCH)]
    return round(sum(x * n for x, n in zip(losses, sizes, strict=True)) / sum(sizes), 4)


def curves(run_dir: Path) -> tuple[list[list[float]], list[list[float]]]:
    """(step, train loss) and (step, eval loss) pairs from RUN_DIR/metrics.jsonl."""
    train, evals = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train" and "loss" in rec:
            train.append([rec["step"], round(rec["loss"], 4)])
        if rec.get("kind") == "eval" and "eval_loss" in rec:
            evals.append([rec["step"], round(rec["eval_loss"], 4)])
    return train, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "fine_grained_scale")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (the dense model is the same)")
    args = ap.parse_args()
    from realtext import cache_root, jargon_file

    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec
    from upcycle.report.verify import verify
    from upcycle.train.loop import train
    from upcycle.train.spec import build_train_spec

    start = time.process_time()
    text = jargon_file(cache_root(os.environ.get("UPCYCLE_CACHE"))).read_text()
    cut = int(0.9 * len(text))
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    (args.work / "train.txt").write_text(text[:cut])
    (args.work / "eval.txt").write_text(text[cut : cut + 60_000])
    dense = args.work / "dense"
    dense_curve = pretrain(dense, text[:cut], args.pretrain_steps, seed=0)
    held_out = (args.work / "eval.txt").read_text()
    dense_eval = eval_loss(dense, held_out)
    rows = []
    for mode in ("down", "cube-root"):
        out = args.work / f"moe-{mode}"
        plan = convert(str(dense), out, build_spec(**MOE, fine_grained_scale=mode)).plan
        rep = verify(str(dense), str(out), text=args.work / "eval.txt", tokens=4096, mode="whole")
        step0 = eval_loss(out, held_out)
        for seed in (int(s) for s in args.seeds.split(",")):
            spec = build_train_spec(
                data=str(args.work / "train.txt"),
                eval_data=str(args.work / "eval.txt"),
                seq_len=SEQ,
                micro_batch=BATCH,
                steps=args.steps,
                lr=args.lr,
                warmup=10,
                eval_every=args.eval_every,
                save_every=args.steps,
                keep_last=1,
                log_every=10,
                dtype="fp32",
                seed=seed,
            )
            run_dir = args.work / f"run-{mode}-{seed}"
            result = train(str(out), run_dir, spec, force=True)
            train_curve, eval_curve = curves(run_dir)
            rows.append(
                dict(
                    scale=mode,
                    seed=seed,
                    exact_at_init=plan.exact,
                    step0_max_abs_diff=rep.max_abs_diff,
                    step0_mean_kl=rep.mean_kl,
                    step0_top1=rep.top1_agreement,
                    step0_eval_loss=step0,
                    final_eval_loss=result.summary["eval_loss"],
                    train_curve=train_curve,
                    eval_curve=eval_curve,
                )
            )
            print(
                f"| {mode} | {seed} | {rep.max_abs_diff:.3g} | {rep.mean_kl:.3g} | "
                f"{step0:.4f} | {result.summary['eval_loss']:.4f} |",
                flush=True,
            )
    record = dict(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        dense=DENSE
        | dict(vocab="tests/tiny.py characters", pretrain_steps=args.pretrain_steps, curve=dense_curve)
        | dict(eval_loss=dense_eval),
        moe=MOE,
        train=dict(steps=args.steps, seq_len=SEQ, micro_batch=BATCH, lr=args.lr, warmup=10, dtype="fp32"),
        text="Jargon File (Debian jargon-text): first 90 % train, next 60 000 characters eval",
        torch_threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        cpu_seconds=round(time.process_time() - start, 1),
        rows=rows,
    )
    path = HERE / "results" / f"fine_grained_scale_{datetime.now(UTC):%Y%m}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({record['cpu_seconds']} CPU s)")


if __name__ == "__main__":
    main()
