"""upcycle.compat, train side: every private or renamed API that `upcycle train` relies on is still there, and
nothing outside compat.py reaches into one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_train import moe_store  # noqa: F401  (fixture)

from upcycle import compat

PACKAGE = Path(__file__).resolve().parent.parent / "upcycle"


@pytest.mark.parametrize("api", compat.TRAIN_PRIVATE_APIS, ids=lambda api: re.sub(r"\W+", "-", api.name)[:48])
def test_every_private_api_the_trainer_uses_is_present(api):
    import datasets
    import transformers

    installed = f"torch {torch.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}"
    assert api.present(), (
        f"{api.name} is gone with {installed} (checked on {api.checked_on}). It is used for {api.used_for}; "
        f"without it {api.without}. Update upcycle/compat.py for this version."
    )


def test_the_shims_do_what_they_say(moe_store):  # noqa: F811
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_store("mixtral"), experts_implementation="eager")
    assert compat.experts_implementation(model) == "eager"
    compat.enable_activation_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ds = Dataset.from_dict({"text": ["a", "b"]})
    assert compat.dataset_fingerprint(ds) == compat.dataset_fingerprint(Dataset.from_dict({"text": ["a", "b"]}))
    assert compat.dataset_fingerprint(ds) != compat.dataset_fingerprint(Dataset.from_dict({"text": ["a", "c"]}))
    assert not compat.in_backward()
    seen = []
    x = torch.ones(2, requires_grad=True)
    x.register_hook(lambda g: seen.append(compat.in_backward()))
    (x * 2).sum().backward()
    assert seen == [True]
    assert compat.enable_grouped_mm_autocast("cpu", torch.bfloat16) in ("dispatcher", "transformers")


# names of torch / transformers / datasets reached through an underscore, outside compat.py
PRIVATE = re.compile(
    r"torch\._C\.|(?<!\w)_experts_implementation|(?<!\w)_fingerprint\b|moe\._grouped_mm|aten::_grouped_mm|"
    r"gradient_checkpointing_enable|activation_checkpointing_enable"
)


@pytest.mark.parametrize("path", sorted((PACKAGE / "train").glob("*.py")), ids=lambda p: p.name)
def test_train_modules_reach_private_apis_only_through_compat(path):
    hits = [line.strip() for line in path.read_text().splitlines() if PRIVATE.search(line)]
    assert hits == [], f"{path.name} uses a private API directly; go through upcycle/compat.py: {hits}"
