"""Causal attention without a mask (upcycle/train/attention.py): on every model type it is used for, the same
logits, loss and gradients to the bit as transformers' SDPA path; never used where a sliding window would cut the
block; and no read of the device in the forward."""

from __future__ import annotations

import pytest
import torch
from test_train_syncs import SyncCounter
from tiny import BASE, FAMILIES, GENERIC_FAMILIES, tiny_config

from upcycle.train.attention import CAUSAL_SDPA, PLAIN_CAUSAL_TYPES, causal_attention_without_mask, plain_causal

SEQ = 24
_MOE = dict(BASE, head_dim=16, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MOE_CONFIGS = {  # tiny configs of the MoE targets: 4 experts, top-2
    "mixtral": dict(_MOE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(_MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "granitemoe": dict(_MOE, num_local_experts=4, num_experts_per_tok=2),
    "flex_olmo": dict(_MOE, num_experts=4, num_experts_per_tok=2),
    "ernie4_5_moe": dict(_MOE, moe_num_experts=4, moe_k=2, moe_intermediate_size=32),
    "hunyuan_v1_moe": dict(_MOE, num_experts=4, moe_topk=2, moe_intermediate_size=32),
}
WINDOWS = {"gemma3_text": dict(sliding_window=SEQ + 1)}  # its tiny config's window (8) would cut the block


def _config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type in MOE_CONFIGS:
        return AutoConfig.for_model(model_type, **{**MOE_CONFIGS[model_type], **overrides})
    return tiny_config(model_type, **overrides)


def _run(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws (GPT-2's attention and residual dropout)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _both(config) -> tuple[str, tuple, tuple]:
    """(implementation chosen, SDPA's results, the chosen implementation's results) on one random model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    ids = torch.randint(3, config.get_text_config().vocab_size, (3, SEQ))
    before = _run(model, ids)
    chosen = causal_attention_without_mask(model, SEQ)
    return chosen, before, _run(model, ids)


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and all(map(torch.equal, a[2], b[2]))


@pytest.mark.parametrize("model_type", sorted(PLAIN_CAUSAL_TYPES))
def test_no_mask_gives_sdpas_numbers_to_the_bit(model_type):
    chosen, sdpa, causal = _both(_config(model_type, **WINDOWS.get(model_type, {})))
    assert chosen == CAUSAL_SDPA
    assert _same(sdpa, causal), model_type


def test_every_supported_model_type_is_checked():
    """The MoE targets and every dense family: those the rule covers are all in the parametrised test above;
    the rest keep SDPA's masks (they are plain causal too, but nothing here has checked them bit for bit)."""
    import json
    from pathlib import Path

    import upcycle

    root = Path(upcycle.__file__).parent
    targets = {json.loads(p.read_text())["model_type"] for p in (root / "targets").glob("*.json")}
    families = {t for p in (root / "families").glob("*.json") for t in json.loads(p.read_text())["model_types"]}
    assert targets <= PLAIN_CAUSAL_TYPES
    assert set(MOE_CONFIGS) == targets
    assert targets | families >= PLAIN_CAUSAL_TYPES
    assert set(FAMILIES | GENERIC_FAMILIES) >= PLAIN_CAUSAL_TYPES - targets


@pytest.mark.parametrize(("window", "switched"), [(8, False), (SEQ, False), (SEQ + 1, True), (None, True)])
def test_a_sliding_window_shorter_than_the_block_keeps_the_mask(window, switched):
    """Mistral's one window for every layer: a window that covers the block is no limit (the numbers are SDPA's to
    the bit); one shorter than the block keeps SDPA and its banded mask."""
    chosen, sdpa, after = _both(_config("mistral", sliding_window=window))
    assert chosen == (CAUSAL_SDPA if switched else "sdpa")
    assert _same(sdpa, after)


def test_the_rule_matters_where_a_window_cuts_the_block():
    """What the rule prevents: a window of 8 over 24 tokens, forced through the unmasked path, changes the logits."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = _config("mistral", sliding_window=8)
    assert not plain_causal(config, SEQ)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.randint(3, 128, (2, SEQ))
    banded = _run(model, ids)
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(CAUSAL_SDPA)
    assert not torch.allclose(banded[1], _run(model, ids)[1], atol=1e-3)


def test_per_layer_windows_follow_the_layer_types():
    """Qwen2-MoE with sliding layers (layer_types): switched only when each window covers the block."""
    on = dict(use_sliding_window=True, max_window_layers=4)
    assert not plain_causal(_config("qwen2_moe", sliding_window=8, **on), SEQ)
    assert plain_causal(_config("qwen2_moe", sliding_window=SEQ + 1, **on), SEQ)
    assert plain_causal(_config("qwen2_moe"), SEQ)  # no sliding layers: sliding_window is 0
    chosen, sdpa, after = _both(_config("qwen2_moe", sliding_window=SEQ + 1, **on))
    assert chosen == CAUSAL_SDPA and _same(sdpa, after)


def test_other_implementations_and_types_are_left_alone():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="eager")
    assert causal_attention_without_mask(model, SEQ) == "eager"  # eager needs its mask: None means no mask at all
    assert model.config._attn_implementation == "eager"
    assert not plain_causal(_config("gemma2", sliding_window=None), SEQ)  # not in PLAIN_CAUSAL_TYPES (no SDPA)
    assert not plain_causal(_config("gemma3_text", use_bidirectional_attention=True), SEQ)


def test_the_forward_reads_nothing_back():
    """SDPA's path reads the device once per forward (the packed-sequence check); the switched model, never."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("mixtral"), attn_implementation="sdpa")
    ids = torch.randint(3, 128, (2, SEQ))
    reads = []
    for _ in range(2):
        with SyncCounter() as counter:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        reads.append(dict(counter.reads.get("setup", {})))
        causal_attention_without_mask(model, SEQ)
    assert reads == [{"item in transformers/masking_utils.py": 1}, {}]
