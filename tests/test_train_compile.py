"""`upcycle train --compile` on a CPU: the compiled model, RouterTap's hooks included, traces as one graph (a graph
break per router would split the model into pieces and run the hooks eagerly between them, on a GPU the cost that
--compile is there to remove), and a compiled run repeats the eager run's losses and routing."""

from __future__ import annotations

import pytest
import torch
from test_train import text, train, train_records  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from upcycle.arch import target_for_model_type
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.train.expert_dropout import add_expert_dropout
from upcycle.train.routing_hooks import tap_model


@pytest.fixture(scope="module")
def moe(dense_store, tmp_path_factory):
    """A 2-layer 4-expert top-2 Mixtral: compiling it (forward and backward) takes half the 4-layer one's time."""
    out = tmp_path_factory.mktemp("compile") / "mixtral"
    convert(str(dense_store("llama", num_hidden_layers=2)), out, build_spec(experts=4, top_k=2))
    return out


@pytest.mark.parametrize(
    "options",
    [{}, {"capacity_factor": 1.0}, {"selection_bias": True}, {"expert_dropout": 0.1}, {"jitter": 0.01},
     {"noise": True}],
    ids=["defaults", "capacity", "selection-bias", "expert-dropout", "jitter", "noise"],
)  # fmt: skip
def test_the_tapped_model_traces_as_one_graph(options, moe):
    """torch._dynamo.explain of a training forward through the hooks: one graph, no break (jitter and noise, which
    draw from the tap's own generators in an eager run, draw from the global RNG while traced)."""
    model = AutoModelForCausalLM.from_pretrained(moe)
    model.train()
    target = target_for_model_type(model.config.model_type)
    options = dict(options)  # the parameter is shared between runs
    dropout = options.pop("expert_dropout", 0.0)
    tap = tap_model(model, target, **options, generator=torch.Generator().manual_seed(0))  # as upcycle train
    assert add_expert_dropout(model, target, tap.layers, dropout) == (len(tap.layers) if dropout else 0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, labels=ids)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
    records = tap.pop()  # the hooks ran inside the trace and recorded every layer
    assert sorted(records) == list(range(model.config.num_hidden_layers))
    assert all(r.indices.shape == (2 * 16, model.config.num_experts_per_tok) for r in records.values())


@pytest.mark.parametrize("options", [{}, {"jitter": 0.01, "noise": True}], ids=["defaults", "jitter-noise"])
def test_with_activation_checkpointing_the_model_still_traces_as_one_graph(options, moe):
    """--compile --grad-checkpointing: each checkpointed layer changes Python state in its forward (the attention's
    kernels context variable, RouterTap's records), which dynamo refuses inside a checkpoint unless told not to replay
    it in the recompute (compat.trace_checkpointed_side_effects): without that, a graph per layer and a break
    between; with it, one graph, and the hooks record each layer once."""
    from upcycle.compat import enable_activation_checkpointing, trace_checkpointed_side_effects

    model = AutoModelForCausalLM.from_pretrained(moe)
    model.train()
    tap = tap_model(model, target_for_model_type(model.config.model_type), **options, generator=torch.Generator())
    enable_activation_checkpointing(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        torch._dynamo.reset()
        before = torch._dynamo.explain(model)(ids, labels=ids, use_cache=False)
        tap.pop()
        assert before.graph_break_count >= model.config.num_hidden_layers  # what the setting removes
        trace_checkpointed_side_effects()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids, labels=ids, use_cache=False)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
    records = tap.pop()
    assert sorted(records) == list(range(model.config.num_hidden_layers))
    assert all(r.indices.shape == (2 * 16, model.config.num_experts_per_tok) for r in records.values())


def test_a_compiled_checkpointed_model_gives_the_eager_checkpointed_numbers(moe):
    """The recompute in a compiled backward is the forward's, and skipping the forward's side effects there loses
    nothing: loss, router losses and every gradient of the eager checkpointed model, through dynamo and AOT
    autograd's checkpoint handling (backend aot_eager: the same graphs as inductor, without its code generation,
    which the compiled runs below cover)."""
    from upcycle.compat import enable_activation_checkpointing, trace_checkpointed_side_effects
    from upcycle.train.losses import router_losses

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(compiled: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(moe)
        model.train()
        tap = tap_model(model, target_for_model_type(model.config.model_type))
        enable_activation_checkpointing(model)
        if compiled:
            trace_checkpointed_side_effects()
            torch._dynamo.reset()
            model.compile(backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
        lm = model(ids, labels=ids, use_cache=False).loss
        records = tap.pop()
        assert sorted(records) == [0, 1]  # each layer recorded once, in the forward
        balance, z = router_losses(records)
        (lm + 0.01 * balance + 0.001 * z).backward()
        assert not tap.pop()  # the recompute recorded nothing
        return [lm, balance, z], [p.grad for p in model.parameters()]

    (eager_terms, eager_grads), (terms, grads) = step(False), step(True)
    for a, b in zip(eager_terms, terms, strict=True):
        assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-7) for g, e in zip(grads, eager_grads, strict=True))


@pytest.mark.slow
def test_a_compiled_run_repeats_the_eager_losses_with_no_graph_break(moe, text, tmp_path):  # noqa: F811
    options = dict(data=str(text), steps=2, micro_batch=2, save_every=2, eval_every=2)
    train(moe, tmp_path / "eager", **options)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(moe, tmp_path / "compiled", **options, compile=True)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    eager, compiled = train_records(tmp_path / "eager"), train_records(tmp_path / "compiled")
    for a, b in zip(eager, compiled, strict=True):  # inductor's fused kernels round differently: 1e-7 seen
        assert b["lm"] == pytest.approx(a["lm"], rel=1e-5) and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert [layer["load"] for layer in compiled[0]["layers"]] == [layer["load"] for layer in eager[0]["layers"]]


@pytest.mark.slow
def test_a_compiled_run_with_jitter_and_noise_resumes_with_the_same_draws(moe, text, tmp_path):  # noqa: F811
    """Traced, jitter and noise draw from the global RNG (inductor's seeds), which a checkpoint saves: a compiled run
    resumed from step 2 repeats the uninterrupted compiled run's step-3 forward bit for bit (its losses and loads:
    the same draws). Its gradients may differ in the last bits: a fresh compilation's backward kernels are not
    always the same (a gradient norm 1.4586251 against 1.4586250 in 2 runs of 4 here), so the rest is compared to
    1e-6."""
    import shutil

    from upcycle.train import loop
    from upcycle.train.spec import build_train_spec

    options = dict(data=str(text), steps=4, micro_batch=2, save_every=2, eval_every=4, jitter=0.01, router_noise=True)
    options |= dict(compile=True, seq_len=32, log_every=1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    whole = tmp_path / "whole"
    train(moe, whole, **options)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step-4")
    shutil.rmtree(part / "final")
    torch._dynamo.reset()
    result = loop.train(str(moe), part, build_train_spec(**options), resume=True)
    assert result.summary["resumed_from"] == 2
    a, b = train_records(whole), train_records(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a[0]["lm"] != a[1]["lm"]
    assert [a[2][k] for k in ("loss", "lm", "balance", "z", "layers")] == [
        b[2][k] for k in ("loss", "lm", "balance", "z", "layers")
    ]  # the first step after the resume: the same draws
    for r, q in zip(a[2:], b[2:], strict=True):
        for k in ("loss", "lm", "balance", "z", "grad_norm"):
            assert q[k] == pytest.approx(r[k], rel=1e-6), (r["step"], k)
