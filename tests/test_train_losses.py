"""Router losses: hand computations, naive loops, gradients, and a short optimisation on a tiny upcycled MoE."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycle.arch import targets
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.train.losses import (
    balance_loss,
    dropped_fraction,
    expert_counts,
    load_stats,
    router_losses,
    z_loss,
)
from upcycle.train.routing_hooks import LayerRouting, find_routers, tap_model


def routing(logits: torch.Tensor, top_k: int = 2, keep: torch.Tensor | None = None) -> LayerRouting:
    indices = torch.topk(logits, top_k, dim=-1).indices
    return LayerRouting(logits, indices, torch.ones_like(indices, dtype=torch.bool) if keep is None else keep)


def naive_balance(logits: torch.Tensor, indices: torch.Tensor) -> float:
    """Switch's formula with loops: E · Σ_i (share of assignments to i) · (mean probability of i)."""
    tokens, num_experts = logits.shape
    assignments = [int(e) for row in indices for e in row]
    total = 0.0
    for i in range(num_experts):
        f = assignments.count(i) / len(assignments)
        p = sum(math.exp(logits[t, i]) / sum(math.exp(v) for v in logits[t].tolist()) for t in range(tokens)) / tokens
        total += f * p
    return num_experts * total


# --- balance ------------------------------------------------------------------------------------------------


def test_balance_of_a_uniform_router_is_one():
    logits = torch.zeros(12, 4)  # a zero router: P = 1/4 for every expert
    counts = torch.tensor([3.0, 3.0, 3.0, 3.0])
    assert balance_loss(logits, counts).item() == 1.0
    assert balance_loss(logits, torch.tensor([12.0, 0.0, 0.0, 12.0])).item() == 1.0  # P uniform: f does not matter


def test_balance_on_a_skewed_hand_case():
    # Token 1: softmax(ln 3, 0) = (3/4, 1/4); token 2: (1/2, 1/2) -> P = (5/8, 3/8).
    # Counts (3, 1) -> f = (3/4, 1/4). Loss = 2 · (3/4·5/8 + 1/4·3/8) = 2 · 18/32 = 9/8.
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert balance_loss(logits, torch.tensor([3.0, 1.0])).item() == pytest.approx(9 / 8, abs=1e-7)


def test_balance_matches_the_loop_formula():
    gen = torch.Generator().manual_seed(0)
    for tokens, num_experts, top_k in ((7, 4, 2), (20, 8, 1), (13, 6, 3)):
        logits = torch.randn(tokens, num_experts, generator=gen) * 2
        r = routing(logits, top_k)
        got = balance_loss(r.logits, expert_counts(r, num_experts)).item()
        assert got == pytest.approx(naive_balance(logits, r.indices), rel=1e-6)


def test_balance_gradient_flows_through_p_only():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, 4, generator=gen) * 2).requires_grad_()
    counts = torch.tensor([5.0, 1.0, 8.0, 4.0], requires_grad=True)
    balance_loss(logits, counts).backward()
    assert counts.grad is None  # f is a constant
    # d/dz_tj of E·Σ_i f_i·mean_t p_ti = (E/T)·p_tj·(f_j - Σ_i f_i·p_ti)
    f = counts.detach() / counts.detach().sum()
    p = torch.softmax(logits.detach(), dim=-1)  # (T, E)
    expected = 4 / 9 * p * (f - (p * f).sum(dim=-1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


# --- z ------------------------------------------------------------------------------------------------------


def test_z_loss_by_hand_and_growing_with_the_logits():
    # logsumexp(0, 0) = ln 2; logsumexp(ln 3, ln 1) = ln 4 = 2 ln 2 -> mean of squares = (1 + 4)/2 · ln² 2.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(16, 8, generator=gen).abs()
    values = [z_loss(base * scale).item() for scale in (1.0, 2.0, 4.0)]
    assert values[0] < values[1] < values[2]
    assert z_loss(base.bfloat16()).dtype == torch.float32


# --- per-layer averaging, counts, figures -------------------------------------------------------------------


def test_router_losses_average_the_layers_and_take_global_counts():
    gen = torch.Generator().manual_seed(3)
    records = {1: routing(torch.randn(10, 4, generator=gen)), 3: routing(torch.randn(6, 4, generator=gen) * 3)}
    balance, z = router_losses(records)
    per_layer = [balance_loss(r.logits, expert_counts(r, 4)) for r in records.values()]
    assert balance.item() == pytest.approx((per_layer[0].item() + per_layer[1].item()) / 2, rel=1e-7)
    assert z.item() == pytest.approx((z_loss(records[1].logits) + z_loss(records[3].logits)).item() / 2, rel=1e-7)

    glob = {1: torch.tensor([10.0, 0.0, 0.0, 10.0]), 3: torch.tensor([1.0, 1.0, 1.0, 1.0])}
    balance_g, z_g = router_losses(records, glob)
    expected = (balance_loss(records[1].logits, glob[1]) + balance_loss(records[3].logits, glob[3])) / 2
    assert balance_g.item() == pytest.approx(expected.item(), rel=1e-7)
    assert balance_g.item() != pytest.approx(balance.item(), rel=1e-3)
    assert z_g.item() == z.item()
    with pytest.raises(ValueError, match="no router records"):
        router_losses({})


def test_counts_include_dropped_assignments_and_dropped_fraction():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep = torch.tensor([[True, True], [True, True], [False, True], [False, False]])
    r = LayerRouting(torch.zeros(4, 4), indices, keep)
    assert expert_counts(r, 5).tolist() == [4.0, 2.0, 1.0, 1.0, 0.0]
    assert expert_counts(r, 5).dtype == torch.float32
    assert dropped_fraction(r) == 3 / 8


def test_load_stats():
    balanced = load_stats(torch.tensor([5.0, 5.0, 5.0, 5.0]))
    assert balanced == {"load": [0.25] * 4, "cv": 0.0, "max": 0.25, "min": 0.25}
    collapsed = load_stats(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    assert collapsed["load"] == [1.0, 0.0, 0.0, 0.0]
    assert collapsed["cv"] == pytest.approx(math.sqrt(3))  # population std of (1,0,0,0) is √3/4, mean 1/4
    mixed = load_stats(torch.tensor([6.0, 2.0]))
    assert mixed["cv"] == pytest.approx(0.5) and mixed["max"] == 0.75 and mixed["min"] == 0.25


# --- the losses at work on a tiny upcycled MoE --------------------------------------------------------------


@pytest.fixture(scope="session")
def skewed_moe(dense_store, tmp_path_factory):
    """A tiny Mixtral (4 experts, top-2) upcycled from a random Llama; router row 0 made large in every layer."""
    out = tmp_path_factory.mktemp("moe") / "mixtral"
    convert(str(dense_store("llama")), out, build_spec(experts=4, top_k=2))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    routers = find_routers(model, targets()["mixtral"])
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        r.register_forward_pre_hook(lambda m, a, layer=layer: inputs.__setitem__(layer, a[0].detach()))
        for layer, r in routers.items()
    ]
    with torch.no_grad():
        model(batch())
        for layer, r in routers.items():  # expert 0's logit goes up by 8 on average over the tokens
            mean = inputs[layer].mean(dim=0)  # (H,)
            r.weight[0] += 8 * mean / mean.square().sum()
    for h in handles:
        h.remove()
    return {k: v.clone() for k, v in model.state_dict().items()}, out


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def train(skewed_moe, *, alpha: float, beta: float, lm: bool, steps: int = 20) -> dict[str, float]:
    """`steps` Adam steps on lm·LM + α·balance + β·z; then the mean over layers of load CV, |logit|, logsumexp, max."""
    state, folder = skewed_moe
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(state)
    model.train()
    tap = tap_model(model, targets()["mixtral"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        out = model(batch(), labels=batch())
        balance, z = router_losses(tap.pop())
        loss = alpha * balance + beta * z + (out.loss if lm else 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model(batch())
    records = tap.pop()
    return {
        "cv": sum(load_stats(expert_counts(r, 4))["cv"] for r in records.values()) / len(records),
        "abs": sum(r.logits.abs().mean().item() for r in records.values()) / len(records),
        "lse": sum(torch.logsumexp(r.logits, -1).mean().item() for r in records.values()) / len(records),
        "max": sum(r.logits.max(-1).values.mean().item() for r in records.values()) / len(records),
    }


def test_a_zero_router_in_a_model_gives_balance_one_and_z_ln_e_squared(skewed_moe):
    model = AutoModelForCausalLM.from_pretrained(skewed_moe[1], dtype=torch.float32)
    model.train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    tap = tap_model(model, targets()["mixtral"])
    model(batch())
    balance, z = router_losses(tap.pop())
    assert balance.item() == 1.0
    assert z.item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)


def test_balance_loss_evens_out_a_skewed_router(skewed_moe):
    before = train(skewed_moe, alpha=0.01, beta=0.0, lm=False, steps=0)
    after = train(skewed_moe, alpha=0.01, beta=0.0, lm=False)
    assert before["cv"] > 0.4  # expert 0 takes far more than its share
    assert after["cv"] < before["cv"] / 4


def test_z_loss_pulls_the_largest_logits_down(skewed_moe):
    """z = logsumexp² has its minimum at logsumexp 0, not at logits 0: it lowers the top logit (and logsumexp)
    and may push the others negative, so it is the max logit, not the mean |logit|, that must fall."""
    plain = train(skewed_moe, alpha=0.0, beta=0.0, lm=True)
    with_z = train(skewed_moe, alpha=0.0, beta=0.1, lm=True)
    assert with_z["lse"] < plain["lse"] / 2
    assert with_z["max"] < plain["max"] - 2
