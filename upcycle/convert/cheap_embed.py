"""`--router-init cheap_embed` (mergekit-moe's gate mode of that name): router row e of every MoE layer is the
direction of the summed token embeddings of expert e's prompts; no forward pass, only the embedding is read.

As mergekit does: each prompt is tokenized with the BOS token in front (when the tokenizer has one) and no other
special tokens, the embeddings of all tokens of all of an expert's prompts are summed and the sum normalised,
and the same rows serve every layer. Then, as upcycle's other router inits, each row is scaled to the norm a
random row has (router_std * sqrt(hidden)); mergekit leaves it at norm 1 (router_std = 1/sqrt(hidden) gives
exactly mergekit's rows).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UpcycleError
from .ops import Router
from .prompts import read_expert_prompts

if TYPE_CHECKING:
    import torch

    from ..source import Checkpoint
    from .ops import Plan
    from .spec import ConvertSpec


def embedding_key(ckpt: Checkpoint, vocab: int, hidden: int) -> str:
    """The input embedding's key: the [vocab, hidden] tensor named like an embedding."""
    found = [n for n, t in ckpt.tensors.items() if "embed" in n and tuple(t.shape) == (vocab, hidden)]
    if not found:
        raise UpcycleError(f"--router-init cheap_embed found no [{vocab}, {hidden}] token embedding in the checkpoint")
    return sorted(found, key=lambda n: ("embed_tokens" not in n, n))[0]


def prompt_directions(embed: torch.Tensor, prompts: list[list[str]], tok) -> tuple[torch.Tensor, int]:
    """Unit rows [E, H]: the normalised sum of the prompts' token embeddings, per expert; and the tokens used."""
    import torch

    rows, tokens = [], 0
    for e, texts in enumerate(prompts):
        total = torch.zeros(embed.shape[1], dtype=torch.float64)
        for text in texts:
            ids = tok((tok.bos_token or "") + text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise UpcycleError(f"--expert-prompts: a prompt of expert {e} gives no tokens; give some text")
            total += embed[torch.tensor(ids)].double().sum(0)
            tokens += len(ids)
        rows.append(total / total.norm().clamp_min(1e-8))
    return torch.stack(rows).float(), tokens


def cheap_embed_rows(folder: Path, ckpt: Checkpoint, plan: Plan, spec: ConvertSpec) -> tuple[dict, dict]:
    """Router rows (layer -> [E, H] float32) and what upcycle.json records about the prompts."""
    from transformers import AutoTokenizer

    groups = {op.layer: op.group for op in plan.ops if isinstance(op, Router)}
    group = max(groups.values(), default=1)
    what = f"replica rows (--experts / --granularity = {spec.experts // group})" if group > 1 else "experts"
    prompts = read_expert_prompts(Path(spec.expert_prompts), spec.experts // group, what, len(spec.expert_from))
    hidden, vocab = int(plan.config.get("hidden_size")), int(plan.config.get("vocab_size"))
    embed = ckpt.load(embedding_key(ckpt, vocab, hidden))
    unit, tokens = prompt_directions(embed, prompts, AutoTokenizer.from_pretrained(folder))
    del embed
    rows = unit * spec.router_std * math.sqrt(hidden)
    made = {layer: rows.repeat_interleave(g, dim=0) for layer, g in groups.items()}
    record = {"expert_prompts": {"file": Path(spec.expert_prompts).name, "prompts": sum(map(len, prompts)),
                                 "tokens": tokens}}  # fmt: skip
    return made, record
