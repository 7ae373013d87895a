"""RouterTap on tiny upcycled MoEs (Mixtral, and Qwen2-MoE with every other layer MoE) written by `upcycle convert`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycle.arch import target_for_model_type, targets
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.train.losses import dropped_fraction, router_losses
from upcycle.train.routing_hooks import RouterTap, capacity, capacity_keep, find_routers, tap_model

KINDS = {"mixtral": dict(experts=4, top_k=2), "qwen2_moe": dict(experts=4, top_k=2, every=2)}
MOE_LAYERS = {"mixtral": [0, 1, 2, 3], "qwen2_moe": [1, 3]}
IMPLS = ("grouped_mm", "eager")


@pytest.fixture(scope="session")
def moe_store(dense_store, tmp_path_factory):
    """moe_store(kind) -> folder of a tiny MoE converted from a tiny random Llama (cached per session)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            out = tmp_path_factory.mktemp("moe") / kind
            assert convert(str(dense_store("llama")), out, build_spec(**KINDS[kind])).plan.target == kind
            made[kind] = out
        return made[kind]

    return get


def load(folder, impl: str = "grouped_mm", dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation=impl)
    assert model.get_experts_implementation()[""] == impl
    return model


def tap(model, **options) -> RouterTap:
    return tap_model(model, target_for_model_type(model.config.model_type), **options)


def ids(seed: int = 0, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def router(model, layer: int):
    return model.model.layers[layer].mlp.gate


def capture_router_inputs(model, layers) -> tuple[dict, list]:
    """Pre-hooks registered after the tap's, so they see the router's input as the router receives it."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        router(model, layer).register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[0].detach()))
        for layer in layers
    ]
    return seen, handles


# --- finding routers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_find_routers(kind, moe_store):
    model = load(moe_store(kind))
    routers = find_routers(model, targets()[kind])
    assert list(routers) == MOE_LAYERS[kind]
    assert all(routers[layer] is router(model, layer) for layer in routers)


def test_find_routers_refuses_a_dense_model(dense_store):
    model = AutoModelForCausalLM.from_pretrained(dense_store("llama"))
    with pytest.raises(UpcycleError, match="no router module found"):
        find_routers(model, targets()["mixtral"])


def test_tap_refuses_a_router_of_the_wrong_shape(moe_store):
    model = load(moe_store("mixtral"))
    with pytest.raises(UpcycleError, match=r"expected \(8, 32\)"):
        RouterTap(find_routers(model, targets()["mixtral"]), num_experts=8, top_k=2, renormalize=True, hidden_size=32)


# --- exactness: the tap changes nothing and is the only source of router logits we need ----------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_plain_tap_is_exact_and_records_the_router_logits(kind, impl, moe_store):
    model = load(moe_store(kind), impl)
    model.train()
    x = ids()
    with torch.no_grad():
        reference = model(x, labels=x)
    t = tap(model)
    out = model(x, labels=x)
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.loss, reference.loss)  # the pure LM loss: no aux term without output_router_logits
    records = t.pop()
    assert list(records) == MOE_LAYERS[kind]

    with_router_logits = model(x, output_router_logits=True)
    assert t.pop().keys() == records.keys()
    assert len(with_router_logits.router_logits) == len(records)
    for r, theirs in zip(records.values(), with_router_logits.router_logits, strict=True):
        assert r.logits.shape == (x.numel(), 4) and r.logits.dtype == torch.float32 and r.logits.requires_grad
        assert torch.equal(r.logits, theirs)
        assert r.indices.dtype == torch.int64 and r.indices.shape == (x.numel(), 2)
        assert torch.equal(r.indices, torch.topk(theirs, 2, dim=-1).indices)
        assert r.keep.all()


@pytest.mark.parametrize(("kind", "score_dtype"), [("mixtral", torch.float32), ("qwen2_moe", torch.bfloat16)])
def test_records_are_float32_with_grad_and_scores_keep_the_class_dtype(kind, score_dtype, moe_store):
    """bf16 model: records upcast; with noise the replaced scores keep each class's dtype (Mixtral fp32, Qwen bf16)."""
    model = load(moe_store(kind), dtype=torch.bfloat16)
    model.train()
    layer = MOE_LAYERS[kind][0]
    seen = []
    handle = router(model, layer).register_forward_hook(lambda m, a, o: seen.append(o))
    model(ids())
    t = tap(model, noise=True)
    handle.remove()
    router(model, layer).register_forward_hook(lambda m, a, o: seen.append(o))  # runs after the tap's hook
    model(ids())
    (plain_logits, plain_scores, _), (noisy_logits, noisy_scores, _) = seen
    assert plain_scores.dtype == noisy_scores.dtype == score_dtype
    assert noisy_logits.dtype == plain_logits.dtype == torch.bfloat16
    r = t.pop()[layer]
    assert r.logits.dtype == torch.float32 and r.logits.requires_grad


def test_pop_concatenates_forwards_and_remove_detaches(moe_store):
    model = load(moe_store("qwen2_moe"))
    model.train()
    t = tap(model, jitter=0.1)
    model(ids(0))
    model(ids(1, seq=8))
    records = t.pop()
    assert [r.logits.shape[0] for r in records.values()] == [32 + 16, 32 + 16]
    assert t.pop() == {}
    t.remove()
    with torch.no_grad():
        jitter_gone = model(ids()).logits
    assert t.pop() == {}
    bare = load(moe_store("qwen2_moe"))
    bare.train()
    with torch.no_grad():
        assert torch.equal(jitter_gone, bare(ids()).logits)


# --- capacity -----------------------------------------------------------------------------------------------


def naive_keep(indices: torch.Tensor, num_experts: int, limit: int) -> torch.Tensor:
    """Switch's queue order written as loops: slot by slot, token by token."""
    keep = torch.zeros_like(indices, dtype=torch.bool)
    filled = [0] * num_experts
    for slot in range(indices.shape[1]):
        for token in range(indices.shape[0]):
            expert = int(indices[token, slot])
            keep[token, slot] = filled[expert] < limit
            filled[expert] += 1
    return keep


def test_capacity_keep_matches_the_queue_loop():
    gen = torch.Generator().manual_seed(0)
    for tokens, num_experts, top_k, factor in ((37, 8, 2, 1.0), (64, 4, 3, 1.25), (10, 11, 1, 1.1), (5, 4, 2, 0.5)):
        logits = torch.randn(tokens, num_experts, generator=gen) + torch.linspace(0, 2, num_experts)  # skewed
        indices = torch.topk(logits, top_k, dim=-1).indices  # (T, k)
        limit = capacity(factor, tokens, top_k, num_experts)
        assert torch.equal(capacity_keep(indices, num_experts, factor), naive_keep(indices, num_experts, limit))
    assert capacity(1.1, 10, 1, 11) == 1  # 1.1·10/11 is 1.0000000000000002 in floats
    assert capacity(1.25, 10, 2, 4) == 7  # ceil(6.25)


# Tokens are one-hot in the first 3 hidden dims (the rest random, which the hand-set router ignores):
# type A -> logits (3, 2, 0, 0), type B -> (2, 3, 0, 0), type C -> (0, 0, 3, 2).
# Sequence A A A B B A A C, T=8, k=2, E=4, factor 1: C = ceil(8·2/4) = 4 per expert.
# Expert 0's queue: top-1 slots of tokens 0,1,2,5,6, then top-2 slots of 3,4 -> keeps 0,1,2,5; drops 6, 3, 4.
# Expert 1's queue: top-1 slots of 3,4, then top-2 slots of 0,1,2,5,6 -> keeps 3,4,0,1; drops 2, 5, 6.
# Experts 2 and 3 get token 7 only.
TYPES = [0, 0, 0, 1, 1, 0, 0, 2]
ROUTER_COLUMNS = [[3.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0]]
EXPECTED_INDICES = [[0, 1], [0, 1], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1], [2, 3]]
EXPECTED_KEEP = [[1, 1], [1, 1], [1, 0], [1, 0], [1, 0], [1, 0], [0, 0], [1, 1]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_capacity_drops_in_switch_order_on_a_hand_made_router(kind, impl, moe_store):
    model = load(moe_store(kind), impl)
    layer = MOE_LAYERS[kind][0]
    block = model.model.layers[layer].mlp
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[:, :3] = torch.tensor(ROUTER_COLUMNS).t()  # (E, 3)
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    x[0, :, :3] = 0.0
    x[0, torch.arange(8), torch.tensor(TYPES)] = 1.0
    block.train()
    with torch.no_grad():
        reference = block(x)[0]  # (T, H)
        _, ref_scores, ref_indices = block.gate(x[0])

    t = RouterTap({layer: block.gate}, num_experts=4, top_k=2, renormalize=True, hidden_size=32, capacity_factor=1.0)
    with torch.no_grad():
        out = block(x)[0]  # (T, H)
        _, scores, indices = block.gate(x[0])
    r = t.pop()[layer]
    keep = torch.tensor(EXPECTED_KEEP, dtype=torch.bool)
    assert torch.equal(ref_indices, torch.tensor(EXPECTED_INDICES)) and torch.equal(indices, ref_indices)
    assert torch.equal(r.indices[:8], ref_indices) and torch.equal(r.keep[:8], keep)
    assert dropped_fraction(r) == 6 / 16
    assert torch.equal(scores, ref_scores * keep)  # kept weights unchanged (renormalised before dropping), dropped 0
    assert scores.dtype == ref_scores.dtype

    assert torch.equal(out[6], torch.zeros(32))  # both assignments dropped: the MoE adds nothing, only the residual
    for token in (0, 1, 7):  # both kept: exactly the output without capacity
        assert torch.equal(out[token], reference[token])
    for token in (2, 3, 4, 5):  # one kept: cloned experts and weights summing to 1 give w_kept · y
        torch.testing.assert_close(out[token], scores[token].sum() * reference[token], rtol=1e-6, atol=1e-7)

    block.eval()  # eval: no dropping
    with torch.no_grad():
        assert torch.equal(block(x)[0], reference)
    assert t.pop()[layer].keep.all()


# --- jitter ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_jitter_changes_only_the_router_input_in_training(kind, moe_store):
    model = load(moe_store(kind))
    model.train()
    first = MOE_LAYERS[kind][0]
    experts = model.model.layers[first].mlp.experts
    experts_seen: list = []
    experts.register_forward_hook(lambda m, a, o: experts_seen.append((a[0].detach(), o.detach())))
    clean, handles = capture_router_inputs(model, [first])
    with torch.no_grad():
        model(ids())
    clean_input = clean[first]
    clean_experts_in, clean_experts_out = experts_seen.pop()
    assert torch.equal(clean_experts_in, clean_input)
    for h in handles:
        h.remove()

    eps = 0.1
    t = tap(model, jitter=eps)
    seen, handles = capture_router_inputs(model, [first])
    jittered = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            model(ids())
        jittered.append(seen[first])
    ratio = jittered[0] / clean_input
    assert ratio.min() >= 1 - eps and ratio.max() <= 1 + eps and (ratio - 1).abs().max() > eps / 2
    assert not torch.equal(jittered[0], jittered[1])
    assert torch.equal(jittered[0], jittered[2])  # same seed, same jitter
    experts_in, experts_out = experts_seen[0]
    assert torch.equal(experts_in, clean_experts_in)  # the experts' input is never jittered
    # Cloned experts with weights summing to 1 give y whatever the routing; a jittered input would move it by ~ε.
    torch.testing.assert_close(experts_out, clean_experts_out, rtol=1e-5, atol=1e-6)

    model.eval()
    reference = load(moe_store(kind)).eval()
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)
    assert torch.equal(seen[first], clean_input)  # eval: router input as is
    t.remove()


def test_jitter_with_own_generators_is_reproducible_and_leaves_the_global_rng(moe_store):
    model = load(moe_store("mixtral"))
    model.train()
    runs = []
    for _ in range(2):
        t = tap(model, jitter=0.1, noise=True, generator=torch.Generator().manual_seed(5))
        before = torch.get_rng_state()
        with torch.no_grad():
            model(ids())
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(t.pop())
        t.remove()
    for a, b in zip(runs[0].values(), runs[1].values(), strict=True):
        assert torch.equal(a.logits, b.logits)

    t = tap(model, jitter=0.1, noise=True, generator=torch.Generator().manual_seed(5))
    state = t.rng_state()
    assert sorted(state) == MOE_LAYERS["mixtral"]
    with torch.no_grad():
        model(ids())
        first = t.pop()
        model(ids())
        second = t.pop()
        t.set_rng_state(state)
        model(ids())
        again = t.pop()
    assert not torch.equal(first[0].logits, second[0].logits)
    assert all(torch.equal(first[layer].logits, again[layer].logits) for layer in first)


# --- noisy top-k --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_noisy_top_k_routes_on_noisy_logits_and_trains_w_noise(kind, moe_store):
    model = load(moe_store(kind))
    model.train()
    with torch.no_grad():
        clean = model(ids(), output_router_logits=True).router_logits
    t = tap(model, noise=True)
    assert sorted(int(k) for k in t.noise_modules) == MOE_LAYERS[kind]
    first = MOE_LAYERS[kind][0]
    returned = []
    router(model, first).register_forward_hook(lambda m, a, o: returned.append(o))  # sees the tap's replacement
    torch.manual_seed(0)
    out = model(ids(), labels=ids())
    records = t.pop()
    for r, c in zip(records.values(), clean, strict=True):
        noise = r.logits.detach() - c
        assert noise.abs().max() > 0.1  # std starts at softplus(0) = log 2
    logits, scores, indices = returned[0]
    probs = torch.softmax(records[first].logits.detach(), dim=-1)  # (T, E) the stock routers' maths, written out
    assert torch.equal(indices, probs.argsort(dim=-1, descending=True)[:, :2])
    assert torch.equal(indices, records[first].indices)
    kept = probs.gather(1, indices)  # (T, k)
    torch.testing.assert_close(scores.detach(), kept / kept.sum(dim=-1, keepdim=True), rtol=1e-6, atol=1e-7)
    assert torch.equal(logits, records[first].logits)

    balance, z = router_losses(records)
    (out.loss + 0.01 * balance + 0.001 * z).backward()
    for w in t.noise_modules.values():
        assert w.weight.grad is not None and torch.isfinite(w.weight.grad).all() and w.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        evaluated = model(ids(), output_router_logits=True)
    for r, c, theirs in zip(t.pop().values(), clean, evaluated.router_logits, strict=True):
        assert torch.equal(r.logits, c) and torch.equal(theirs, c)  # eval: no noise


# --- gradient checkpointing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_replays_jitter_and_noise_and_records_once(kind, moe_store):
    """With the global RNG, checkpointing's recompute draws the same jitter and noise: gradients match."""
    grads = []
    for checkpointing in (False, True):
        model = load(moe_store(kind))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        t = tap(model, jitter=0.1, noise=True)
        torch.manual_seed(3)
        out = model(ids(), labels=ids(), use_cache=False)
        records = t.pop()
        assert [r.logits.shape[0] for r in records.values()] == [32] * len(MOE_LAYERS[kind])
        balance, z = router_losses(records)
        (out.loss + 0.01 * balance + 0.001 * z).backward()
        assert t.pop() == {}  # the recompute during backward added no record
        grads.append(
            [router(model, layer).weight.grad for layer in MOE_LAYERS[kind]]
            + [w.weight.grad for w in t.noise_modules.values()]
        )
    for plain, checkpointed in zip(*grads, strict=True):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_replays_the_taps_own_generators(kind, moe_store):
    """With a generator of its own (what `upcycle train` uses), the recompute draws the same jitter and noise as
    the forward did, leaves the generators where the forward left them, and never touches the global RNG."""
    grads, states = [], []
    for checkpointing in (False, True):
        model = load(moe_store(kind))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        t = tap(model, jitter=0.1, noise=True, generator=torch.Generator().manual_seed(11))
        before = torch.get_rng_state()
        out = model(ids(), labels=ids(), use_cache=False)
        records = t.pop()
        balance, z = router_losses(records)
        (out.loss + 0.01 * balance + 0.001 * z).backward()
        assert t.pop() == {}
        assert torch.equal(torch.get_rng_state(), before)
        states.append(t.rng_state())
        grads.append(
            [router(model, layer).weight.grad for layer in MOE_LAYERS[kind]]
            + [w.weight.grad for w in t.noise_modules.values()]
        )
        t.remove()
    for plain, checkpointed in zip(*grads, strict=True):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(states[0][layer], states[1][layer]) for layer in states[0])
