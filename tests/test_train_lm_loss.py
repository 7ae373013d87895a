"""The LM loss in chunks (upcycle/train/lm_loss.py, `--lm-loss chunked`): on every model type it is offered for,
the model's own loss and gradients to float32 rounding, in fp32 and under bf16 autocast, with ignored labels, tied
and untied heads, several chunks and a partial last one; the model is as it was afterwards; types it is not checked
for are refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_attention import MOE_CONFIGS, _config

from upcycle.errors import UpcycleError
from upcycle.train.lm_loss import (
    CHUNKED_TYPES,
    IGNORE,
    check_chunked,
    chunk_tokens,
    chunked_causal_lm_loss,
    lm_loss_in_chunks,
)

SEQ = 24


def _model(model_type: str, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(model_type, **overrides)).float()


def _step(model, ids: torch.Tensor, labels: torch.Tensor, chunk: int | None, autocast: bool = False):
    """(loss, {name: grad}) of one forward and backward on ids' device, with the model's own loss (chunk None) or
    in chunks; `autocast`: under bf16 autocast."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        if chunk is None:
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        else:
            with lm_loss_in_chunks(model, chunk):
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, rtol: float, atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("model_type", sorted(CHUNKED_TYPES))
def test_chunks_give_the_models_own_loss_and_gradients(model_type):
    """fp32: 3 × 24 tokens in chunks of 16 (five chunks, the last of 8), some labels ignored (a chat's prompt)."""
    model = _model(model_type)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (3, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = IGNORE
    labels[2, 10:] = IGNORE
    own = _step(model, ids, labels, None)
    chunked = _step(model, ids, labels, 16)
    assert own[0] > 0 and torch.isfinite(own[0])
    _close(chunked, own, rtol=1e-5, atol=1e-6)
    assert not torch.equal(own[0], torch.zeros(()))  # a real loss, compared above
    # afterwards the model is itself again: real logits, its own loss function
    out = model(input_ids=ids, use_cache=False)
    assert out.logits.shape == (3, SEQ, vocab)
    assert "forward" not in vars(model.get_output_embeddings()) and "_loss_function" not in vars(model)


@pytest.mark.parametrize("tied", [False, True])
def test_under_bf16_autocast_the_chunks_follow_the_models_dtypes(tied):
    """bf16 autocast over fp32 weights (upcycle train's GPU recipe, here on CPU): the head multiplies in bf16 and
    the loss is taken in float32, as the model's own; gradients agree to bf16 rounding, tied head or not."""
    model = _model("mixtral", tie_word_embeddings=tied)
    ids = torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(2))
    own = _step(model, ids, ids, None, autocast=True)
    chunked = _step(model, ids, ids, 8, autocast=True)
    assert own[0].dtype == chunked[0].dtype == torch.float32
    _close(chunked, own, rtol=2e-2, atol=2e-3)
    # and the chunked loss in bf16 is not the fp32 loss: the head really multiplied in bf16
    fp32 = _step(model, ids, ids, 8)
    assert not torch.equal(fp32[0], chunked[0])


def test_it_traces_into_one_graph_with_the_eager_numbers():
    """torch.compile (fullgraph, aot_eager: the graphs inductor would get) of a model whose loss is chunked: no
    graph break, and the eager chunked loss and gradients to the bit."""
    model = _model("mixtral")
    ids = torch.randint(3, 128, (3, SEQ), generator=torch.Generator().manual_seed(1))

    def run(module):
        model.zero_grad(set_to_none=True)
        with lm_loss_in_chunks(model, 16):
            loss = module(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = run(model)
    torch._dynamo.reset()
    compiled = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert torch.equal(eager[0], compiled[0]) and all(map(torch.equal, eager[1], compiled[1]))


def test_the_loss_is_the_mean_over_the_predicted_tokens():
    """Direct: hidden states, a head and labels against -log softmax computed by hand; all ignored gives nan."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 2] = IGNORE
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk=3)
    logp = torch.log_softmax(head(hidden).float(), dim=-1)  # (2, 5, 11)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)
    loss.backward()
    expected = torch.autograd.grad(torch.stack(terms).mean(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)
    nothing = torch.full_like(labels, IGNORE)
    assert torch.isnan(chunked_causal_lm_loss(hidden, head, nothing, chunk=3))
    # what is not asked for is not computed: no gradients under no_grad (an evaluation), none for a frozen head
    with torch.no_grad():
        assert torch.equal(chunked_causal_lm_loss(hidden, head, labels, chunk=3), loss.detach())
    head.weight.requires_grad_(False)
    hidden.grad = head.weight.grad = None
    chunked_causal_lm_loss(hidden, head, labels, chunk=3).backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6)


def test_chunk_sizes_and_refusals():
    assert chunk_tokens(49152) == 1024 and chunk_tokens(151936) == 256 and chunk_tokens(1 << 30) == 64
    assert all(chunk_tokens(v) * v <= 1 << 26 for v in (2048, 32000, 49152, 128256, 151936))
    assert set(MOE_CONFIGS) <= CHUNKED_TYPES  # every MoE target
    for model_type in sorted(CHUNKED_TYPES):
        check_chunked({"model_type": model_type})
    with pytest.raises(UpcycleError, match=r"not available for model type 'gemma2'.*--lm-loss model"):
        check_chunked({"model_type": "gemma2"})  # its forward soft-caps the logits before the loss
    head = torch.nn.Linear(4, 6, bias=True)
    with pytest.raises(UpcycleError, match="bias"):
        chunked_causal_lm_loss(torch.zeros(1, 2, 4), head, torch.zeros(1, 2, dtype=torch.long), chunk=2)


# --- upcycle train --lm-loss chunked ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe(dense_store, tmp_path_factory):
    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec

    out = tmp_path_factory.mktemp("lm-loss") / "mixtral"
    convert(str(dense_store("llama")), out, build_spec(experts=4, top_k=2))
    return out


@pytest.fixture(scope="module")
def short_text(jargon_text, tmp_path_factory):
    head = jargon_text.read_text()[:30_000]
    path = tmp_path_factory.mktemp("lm-loss-text") / "jargon.txt"
    path.write_text(head[: head.rindex("\n\n")] + "\n")
    return path


def _train(model, out, text, **options):
    from upcycle.train import loop
    from upcycle.train.spec import build_train_spec

    spec = build_train_spec(
        data=str(text), seq_len=32, micro_batch=4, steps=6, lr=3e-3, log_every=1, eval_every=3, save_every=3, **options
    )
    return loop.train(str(model), out, spec)


def test_a_chunked_run_follows_the_models_own_loss(tiny_moe, short_text, tmp_path, monkeypatch):
    """Six steps of 2 micro-batches of 4 × 32 tokens, in chunks of 64 tokens (the tiny vocabulary would fit a
    micro-batch in one), with the same seed: the losses, router terms, gradient norms and evaluations follow the
    model's own loss to float32 rounding; final/ loads, its head its own again."""
    from transformers import AutoModelForCausalLM

    import upcycle.train.lm_loss as lm_loss_module
    from upcycle.train.metrics import read_metrics

    monkeypatch.setattr(lm_loss_module, "CHUNK_ELEMENTS", 64 * 128)
    assert chunk_tokens(128) == 64

    runs = {}
    for lm_loss in ("model", "chunked"):
        out = tmp_path / lm_loss
        result = _train(tiny_moe, out, short_text, lm_loss=lm_loss, grad_accum=2)
        runs[lm_loss] = [r for r in read_metrics(out) if r["kind"] in ("train", "eval")]
        assert result.summary["steps"] == 6
    model, chunked = runs["model"], runs["chunked"]
    assert [(r["kind"], r["step"]) for r in model] == [(r["kind"], r["step"]) for r in chunked]
    for a, b in zip(model, chunked, strict=True):
        for key in ("loss", "lm", "balance", "z", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-4), (a["step"], key)
    assert model[0]["lm"] == pytest.approx(chunked[0]["lm"], rel=1e-6)  # before any update: rounding only
    assert model[-1]["eval_loss"] < next(r for r in model if r["kind"] == "eval")["eval_loss"] + 1.0
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "chunked" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "forward" not in vars(loaded.get_output_embeddings())
    recipe = json.loads((tmp_path / "chunked" / "final" / "upcycle.json").read_text())
    assert "--lm-loss chunked" in recipe["training"]["command"]  # how it was run; the loss itself is the model's


def test_the_plan_counts_one_chunk_and_offers_it_when_the_run_does_not_fit(tiny_moe, short_text, tmp_path, capsys):
    """--dry-run: the LM loss's memory is one chunk's logits plus the head's gradients, not V floats per token; a
    run that does not fit is told that --lm-loss chunked would make it fit."""
    from upcycle_cli.main import run

    base = ["train", str(tiny_moe), "--data", str(short_text), "--steps", "2", "--dry-run", "--json", "-"]
    base += ["--seq-len", "64", "--micro-batch", "32"]
    plans = {}
    for lm_loss in ("model", "chunked"):
        capsys.readouterr()
        assert run([*base, "--lm-loss", lm_loss]) == 0
        plans[lm_loss] = json.loads(capsys.readouterr().out)["memory"]
    tokens, vocab, hidden = 64 * 32, 128, 32
    assert plans["model"]["logits"] == tokens * vocab * (4 + 4 + 8)  # fp32 on CPU
    chunk = min(tokens, chunk_tokens(vocab))
    assert plans["chunked"]["logits"] == chunk * vocab * 4 + tokens * hidden * 4 + vocab * hidden * 8
    assert plans["chunked"]["total"] < plans["model"]["total"]
    between = (plans["chunked"]["total"] + plans["model"]["total"]) / 2 / (1 << 30)
    capsys.readouterr()
    real = [a for a in base if a not in ("--dry-run", "--json", "-")] + ["--out", str(tmp_path / "run")]
    code = run([*real, "--gpu-mem", f"{between:.9f}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: this run needs") and err.count("\n") == 1, err
    assert "it fits with " in err and "--lm-loss chunked (" in err and not (tmp_path / "run").exists()


def test_a_model_type_without_the_check_is_refused(dense, short_text, tmp_path, capsys):
    from upcycle_cli.main import run

    args = ["train", str(dense("gpt2")), "--data", str(short_text), "--steps", "2", "--out", str(tmp_path / "r")]
    capsys.readouterr()  # what building the model printed
    assert run([*args, "--lm-loss", "chunked"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lm-loss chunked is not available for model type 'gpt2'") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
