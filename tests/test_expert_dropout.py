"""`--expert-dropout P`: dropout inside the experts only, in training mode only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycle.arch import target_for_config
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.train.expert_dropout import DroppedActivation, add_expert_dropout
from upcycle.train.routing_hooks import find_routers


@pytest.fixture(scope="module")
def moes(dense_store, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moes")
    out = {"mixtral": root / "mixtral", "qwen2_moe": root / "qwen2_moe"}
    convert(str(dense_store("llama")), out["mixtral"], build_spec(experts=4, top_k=2, noise=0.05))
    convert(str(dense_store("llama")), out["qwen2_moe"], build_spec(experts=4, top_k=2, every=2, noise=0.05))
    return out


def load(folder: Path, impl: str):
    return AutoModelForCausalLM.from_pretrained(folder, experts_implementation=impl)


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_expert_dropout_acts_in_training_only_and_inside_the_experts_only(name, impl, moes):
    plain, dropped = load(moes[name], impl), load(moes[name], impl)
    target = target_for_config(dropped.config)
    layers = sorted(find_routers(dropped, target))  # Qwen2-MoE every 2: layers 1 and 3
    assert add_expert_dropout(dropped, target, layers, 0.5) == len(layers)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(model, train: bool, seed: int = 0):
        model.train(train)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        return out.logits, out.router_logits

    # eval mode: the same output, bit for bit
    assert torch.equal(logits(dropped, False)[0], logits(plain, False)[0])
    # training mode: the plain model has no dropout anywhere (its train and eval outputs are equal), the dropped one
    # differs, draws from torch's RNG (same seed, same output), and its first router sees what the plain one sees
    assert torch.equal(logits(plain, True)[0], logits(plain, False)[0])
    a, routers_a = logits(dropped, True, seed=1)
    b, _ = logits(dropped, True, seed=1)
    c, _ = logits(dropped, True, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - logits(plain, True)[0]).abs().max() > 1e-3
    assert torch.equal(routers_a[0], logits(plain, True)[1][0])  # before any expert: untouched
    assert not torch.equal(routers_a[-1], logits(plain, True)[1][-1])  # after dropped experts: changed


def test_no_weights_and_p_zero_changes_nothing(moes):
    model = load(moes["mixtral"], "grouped_mm")
    target = target_for_config(model.config)
    before = dict(model.state_dict())
    assert add_expert_dropout(model, target, [0, 1, 2, 3], 0.0) == 0
    assert not any(isinstance(m, DroppedActivation) for m in model.modules())
    add_expert_dropout(model, target, [0, 1, 2, 3], 0.3)
    add_expert_dropout(model, target, [0, 1, 2, 3], 0.4)  # a second call replaces, never stacks
    wrapped = [m for m in model.modules() if isinstance(m, DroppedActivation)]
    assert len(wrapped) == 4 and {m.p for m in wrapped} == {0.4}
    assert not any(isinstance(m.act, DroppedActivation) for m in wrapped)
    assert model.state_dict().keys() == before.keys()  # nothing added to what final/ writes


def test_experts_without_an_activation_are_refused(moes):
    model = load(moes["mixtral"], "grouped_mm")
    target = target_for_config(model.config)
    del model.model.layers[0].mlp.experts.act_fn
    with pytest.raises(UpcycleError, match=r"--expert-dropout: the experts at model\.layers\.0\.mlp\.experts"):
        add_expert_dropout(model, target, [0], 0.1)
