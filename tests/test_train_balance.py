"""Aux-loss-free balancing (--balance bias|both): the update rule, the routing with the bias, a skewed router
balanced without any aux term, exact resume, and where final/ keeps the bias (or what dropping it costs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import CLOCK, SMALL, cli, moe_store, tensors, text, train, train_records  # noqa: F401  (fixtures)
from test_train import _skewed as skewed
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.arch import target_for_config
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.train import loop
from upcycle.train.balance import bias_update
from upcycle.train.metrics import read_metrics
from upcycle.train.routing_hooks import route_topk, tap_model
from upcycle.train.spec import build_train_spec

# --- the maths --------------------------------------------------------------------------------------------------


def test_bias_update_moves_against_the_load_with_zero_mean():
    counts = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5: expert 0 over, the rest under
    delta = bias_update(counts, 0.1)
    # sign(5 - c) · 0.1 = [-0.1, 0.1, 0.1, 0.1], mean 0.05, shifted: [-0.15, 0.05, 0.05, 0.05]
    assert torch.allclose(delta, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert abs(float(delta.sum())) < 1e-7
    assert torch.equal(bias_update(torch.full((4,), 3.0), 0.1), torch.zeros(4))  # balanced: nothing moves


def test_the_bias_chooses_the_experts_and_the_probabilities_weigh_them():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    logits = probs.log()  # softmax gives probs back
    scores, indices = route_topk(logits, 1, False, torch.float32, torch.tensor([-0.4, 0.0, 0.0]))
    assert indices.tolist() == [[1]]  # 0.5 - 0.4 < 0.3
    assert scores.item() == pytest.approx(0.3)  # the unbiased probability of expert 1, not 0.3 + 0
    scores, indices = route_topk(logits, 2, True, torch.float32, torch.tensor([0.0, -0.2, 0.0]))
    assert indices.tolist() == [[0, 2]]  # 0.3 - 0.2 < 0.2
    assert scores[0].tolist() == pytest.approx([0.5 / 0.7, 0.2 / 0.7])  # renormalised over the chosen, unbiased


def test_a_zero_bias_routes_bit_for_bit_as_the_model(moe_store, text):  # noqa: F811
    src = moe_store("mixtral")
    model = AutoModelForCausalLM.from_pretrained(src)
    ids = AutoTokenizer.from_pretrained(src)(text.read_text()[:1500], return_tensors="pt").input_ids[:, :128]
    target = target_for_config(model.config)
    with torch.no_grad():
        plain = model(ids).logits
        with tap_model(model, target, selection_bias=True) as tap:
            zero = model(ids).logits
            tap.pop()
            for layer in tap.bias:
                tap.bias[layer][1] = 1.0  # expert 1 first for every token
            biased = model(ids).logits
            records = tap.pop()
    assert torch.equal(plain, zero)
    assert not torch.equal(plain, biased)
    assert all(bool((r.indices[:, 0] == 1).all()) for r in records.values())


# --- training -----------------------------------------------------------------------------------------------------


def _cv(record: dict) -> float:
    """Mean over the MoE layers of the load CV of a metrics record."""
    return sum(row["cv"] for row in record["layers"]) / len(record["layers"])


def _skewed(src: Path, out: Path, corpus: Path, boost: float = 3.0) -> Path:
    """A copy of `src` whose routers lean to expert 0 and still vary from token to token: random rows scaled so that
    each expert's logit has std 1 over the tokens of a stretch of text, plus `boost` along the mean router input on
    row 0 (its logit is `boost` higher on average). A router with no spread (the tiny models' std-0.02 one) would
    flip all its tokens at once as the bias moves; real routers have spread."""
    generator = torch.Generator().manual_seed(0)

    def rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        mean = x.mean(0)  # (H,)
        w = torch.randn(weight.shape, generator=generator)  # (E, H)
        w /= ((x - mean) @ w.t()).std(0)[:, None]  # each expert's logit: std 1 over the tokens
        w[0] += boost * mean / mean.square().sum()
        return w

    return skewed(src, out, corpus, rows)


def test_bias_balances_a_skewed_router_without_any_aux_term(moe_store, text, tmp_path):  # noqa: F811
    src = _skewed(moe_store("mixtral"), tmp_path / "skewed", text)
    # routers only, z off: with cloned experts the LM loss is blind to routing, so only the bias can move the load
    common = dict(data=str(text), steps=40, z_loss_coef=0.0, save_every=40, eval_every=10, train="router")
    train(src, tmp_path / "aux0", aux_loss_coef=0.0, **common)
    result = train(src, tmp_path / "bias", balance="bias", balance_rate=0.02, **common)
    off, on = train_records(tmp_path / "aux0"), train_records(tmp_path / "bias")
    assert all(r["loss"] == r["lm"] for r in on)  # α (0.01 by default) adds nothing with --balance bias
    assert on[0]["balance"] > 0  # the balance term is still computed and logged
    assert _cv(off[0]) == pytest.approx(_cv(on[0]))  # step 1 routes with a zero bias: the skewed router as it is
    # the held-out load at steps 20, 30 and 40 (the same tokens in both runs, routed with the bias in the second):
    # seen 0.30 without the bias, 0.12-0.26 with it (the sign update keeps the biases moving by ±rate)
    held = {d: [_cv(r) for r in read_metrics(tmp_path / d) if r["kind"] == "eval"][-3:] for d in ("aux0", "bias")}
    assert sum(held["bias"]) < 0.7 * sum(held["aux0"]), held
    # the steps of the second half (the same data in both runs): seen 0.39 -> 0.26. A step's 128 tokens are four
    # stretches of text, so its load is noisy: about 0.2 even for a balanced router
    cv_off = sum(_cv(r) for r in off[20:]) / 20
    cv_on = sum(_cv(r) for r in on[20:]) / 20
    assert cv_off > 0.3  # the skew stays (0.58 is expert 0 in every token's top-2)
    assert cv_on < 0.8 * cv_off, (_cv(on[0]), cv_off, cv_on)
    # Mixtral has no place for the bias: final/ drops it, and the run measured what that changes
    drop = result.summary["balance_bias"]
    assert drop["exported"] == "dropped" and drop["text"] == "held-out"
    assert min(drop["top1_agreement"].values()) < 0.9  # the bias had moved many first choices off expert 0
    assert all(0 <= v <= 1 for v in [*drop["top1_agreement"].values(), *drop["topk_kept"].values()])
    # the experts are still clones of one MLP, so the routing cannot show in the output
    assert drop["max_abs_dlogits"] < 1e-4 and drop["loss_with"] == pytest.approx(drop["loss_without"], abs=1e-5)


def test_bias_resumes_exactly(moe_store, text, tmp_path):  # noqa: F811
    src = moe_store("mixtral")
    options = dict(data=str(text), steps=6, save_every=3, eval_every=6, keep_last=3, balance="both", balance_rate=0.01)
    first = train(src, tmp_path / "a", **options)
    records = train_records(tmp_path / "a")
    state = load_file(tmp_path / "a" / "checkpoints" / "step-3" / "trainer_state.safetensors")
    assert sorted(state) == [f"balance_bias.{i}" for i in range(4)]
    assert all(v.abs().max() > 0 and abs(float(v.sum())) < 1e-6 for v in state.values())

    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints" / "step-6")
    shutil.rmtree(b / "final")
    second = loop.train(str(src), b, build_train_spec(**{**SMALL, **options}), resume=True)
    assert second.summary["resumed_from"] == 3
    resumed = train_records(b)
    for r, s in zip(records, resumed, strict=True):  # every figure of steps 4-6 again, bit for bit
        assert {**r, **CLOCK} == {**s, **CLOCK}
    last = "checkpoints/step-6/trainer_state.safetensors"
    a6, b6 = load_file(tmp_path / "a" / last), load_file(b / last)
    assert all(torch.equal(a6[k], b6[k]) for k in a6)
    a_final, b_final = tensors(tmp_path / "a" / "final"), tensors(b / "final")
    assert a_final.keys() == tensors(src).keys()  # Mixtral has no slot: final/ is the plain model
    assert all(torch.equal(a_final[k], b_final[k]) for k in a_final)
    assert first.summary["balance_bias"] == second.summary["balance_bias"]


def test_resume_refuses_another_balance(moe_store, text, tmp_path, capsys):  # noqa: F811
    src = moe_store("mixtral")
    args = ["train", str(src), "--data", str(text), "--out", str(tmp_path / "r"), "--seq-len", "32", "--steps", "2"]
    assert cli([*args, "--balance", "bias"], capsys)[0] == 0
    code, _, err = cli([*args, "--steps", "3", "--balance", "aux", "--resume"], capsys)
    assert code == 2
    assert "--balance is 'aux' but the run" in " ".join(err.split())


def test_refuse_stops_a_run_whose_target_cannot_keep_the_bias(moe_store, text, tmp_path, capsys):  # noqa: F811
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(tmp_path / "r"), "--steps", "2"]
    code, _, err = cli([*args, "--balance", "bias", "--bias-export", "refuse"], capsys)
    assert code == 2
    assert err.count("error:") == 1 and "MixtralForCausalLM has no place for" in " ".join(err.split())
    assert not (tmp_path / "r").exists()


# --- targets with a slot: final/ routes as the run did -------------------------------------------------------------


@pytest.fixture(scope="module")
def slot_store(dense_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("slot")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            dense, spec = {
                "ernie4_5_moe": ("ernie4_5", build_spec(experts=4, top_k=2)),
                "generic": ("llama", build_spec(target="generic", experts=4, top_k=2)),
            }[name]
            made[name] = root / name
            convert(str(dense_store(dense)), made[name], spec)
        return made[name]

    return get


def _routing(model, target, ids, bias: dict[int, torch.Tensor] | None = None):
    """(logits, {layer: indices}) of a forward: the model's own routing, or the tap's with `bias`."""
    with torch.no_grad(), tap_model(model, target, selection_bias=bias is not None) as tap:
        for layer, b in (bias or {}).items():
            tap.bias[layer].copy_(b)
        logits = model(ids).logits
        return logits, {layer: r.indices for layer, r in tap.pop().items()}


@pytest.mark.parametrize("name", ["ernie4_5_moe", "generic"])
def test_a_target_with_a_slot_routes_as_the_run(name, slot_store, text, tmp_path):  # noqa: F811
    src = slot_store(name)
    result = train(
        src, tmp_path / "run", data=str(text), steps=6, save_every=6, eval_every=6, balance="bias", balance_rate=0.02
    )
    assert result.summary["balance_bias"]["exported"] == "slot"
    final = tmp_path / "run" / "final"
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-6" / "trainer_state.safetensors")
    bias = {int(k.rsplit(".", 1)[1]): v for k, v in saved.items()}
    config = json.loads((final / "config.json").read_text())
    target = target_for_config(config)
    slots = {layer: target.modules["router_bias"].format(layer=layer) for layer in bias}
    ids = AutoTokenizer.from_pretrained(final)(text.read_text()[-3000:], return_tensors="pt").input_ids[:, :256]
    native = AutoModelForCausalLM.from_pretrained(final)  # routes with its slot
    for layer, key in slots.items():  # written as trained, kept in float32
        param = native.get_parameter(key)
        assert param.dtype == torch.float32 and torch.equal(param.reshape(-1), bias[layer])
    logits_native, chosen_native = _routing(native, target, ids)
    as_trained = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        for key in slots.values():
            as_trained.get_parameter(key).zero_()  # the slot off: the bias comes from the run's router hook only
    logits_run, chosen_run = _routing(as_trained, target, ids, bias)
    _, chosen_plain = _routing(as_trained, target, ids)
    assert all(torch.equal(chosen_native[i], chosen_run[i]) for i in bias)
    assert torch.equal(logits_native, logits_run)
    assert any(not torch.equal(chosen_plain[i], chosen_run[i]) for i in bias)  # the bias does change the routing


def test_the_generic_slot_is_off_until_a_bias_run_adds_it(slot_store):
    src = slot_store("generic")
    config = json.loads((src / "config.json").read_text())
    assert not config.get("router_bias")
    assert not any("e_score_correction_bias" in k for k in tensors(src))
    with safe_open(next(src.glob("*.safetensors")), "pt") as fh:
        assert all(not k.endswith("e_score_correction_bias") for k in fh.keys())
