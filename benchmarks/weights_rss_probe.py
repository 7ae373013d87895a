"""Where loaded weights live in RSS (issue 20, the memory plan's `mapped` term): a random Llama (hidden 1024, FFN
2816, 8 layers, vocab 32000: 168M parameters) saved in DTYPE, loaded in float32 by from_pretrained, then every
weight written, gradients made and freed; prints VmRSS, RssAnon and RssFile (MiB) after each.

    python benchmarks/weights_rss_probe.py --work /tmp/probe float32
    python benchmarks/weights_rss_probe.py --work /tmp/probe bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        rows = [line.split() for line in f if line.startswith(("VmRSS:", "RssAnon:", "RssFile:"))]
    return {row[0].rstrip(":"): int(row[1]) >> 10 for row in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = args.work / f"llama-{args.dtype}"
    if not (folder / "config.json").is_file():
        cfg = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=16, vocab_size=32000)  # fmt: skip
        AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype)).save_pretrained(folder)
    print("before loading", status())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    params = list(model.parameters())
    print(f"loaded ({sum(p.numel() for p in params) * 4 >> 20} MiB of fp32 weights)", status())
    with torch.no_grad():
        for p in params:
            p.add_(1e-3)
    print("every weight written", status())
    for p in params:
        p.grad = torch.zeros_like(p)
    print("with gradients", status())
    for p in params:
        p.grad = None
    print("gradients freed", status())


if __name__ == "__main__":
    main()
