"""upcycle.compat, convert side: every private API of transformers that convert, verify --layerwise and the GGUF
reader rely on is still there, and nothing outside compat.py reaches into one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from upcycle import compat

PACKAGE = Path(__file__).resolve().parent.parent / "upcycle"


@pytest.mark.parametrize("api", compat.CONVERT_PRIVATE_APIS, ids=lambda api: re.sub(r"\W+", "-", api.name)[:48])
def test_every_private_api_convert_and_verify_use_is_present(api):
    import torch
    import transformers

    installed = f"torch {torch.__version__}, transformers {transformers.__version__}"
    assert api.present(), (
        f"{api.name} is gone with {installed} (checked on {api.checked_on}). It is used for {api.used_for}; "
        f"without it {api.without}. Update upcycle/compat.py for this version."
    )


def test_the_shims_do_what_they_say():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    assert compat.file_size("5GB") == 5_000_000_000 and compat.file_size("500MB") == 500_000_000
    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    rotary = model.model.rotary_emb
    rotary.inv_freq.zero_()
    compat.init_weights(model, rotary)  # recomputes the non-persistent rotary table
    assert rotary.inv_freq.abs().sum() > 0
    loader = compat.weight_loader()
    assert loader is not None
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config)
    mapping = loader.conversion_mapping(empty)
    loader.load_state_dict(empty, state, loader.load_config(dtype=torch.float32, weight_mapping=mapping))
    assert all(not p.is_meta and bool((p == 1).all()) for p in empty.parameters())


# private transformers names, outside compat.py (the generic wrapper's remote code is listed in compat, not routed)
PRIVATE = re.compile(
    r"transformers\.conversion_mapping|core_model_loading|LoadStateDictConfig|\._init_weights|all_tied_weights_keys|"
    r"convert_file_size_to_int|hf_quantizer"
)
CHECKED = [*sorted(p for d in ("convert", "report") for p in (PACKAGE / d).rglob("*.py")), PACKAGE / "source.py"]


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_convert_modules_reach_private_apis_only_through_compat(path):
    hits = [line.strip() for line in path.read_text().splitlines() if PRIVATE.search(line)]
    assert hits == [], f"{path.name} uses a private API directly; go through upcycle/compat.py: {hits}"
