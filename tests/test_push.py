"""Publishing: the model card, and `upcycle push` at the huggingface_hub boundary (HfApi replaced)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.report.verify import verify
from upcycle_cli.main import run


class FakeHub:
    """Records what upcycle asks of the Hub; nothing leaves the machine."""

    def __init__(self, monkeypatch, token: str | None = "hf_test_token_never_shown"):
        self.calls: list[tuple[str, dict]] = []
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(HfApi, name, self._recorder(name))

    def _recorder(self, name):
        def call(api, *args, **kwargs):
            if args:
                kwargs["repo_id"] = args[0]
            self.calls.append((name, kwargs))
            if name == "create_repo":
                return f"https://huggingface.co/{kwargs['repo_id']}"
            if name == "upload_folder":
                return huggingface_hub.CommitInfo(
                    commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc",
                    commit_message=kwargs.get("commit_message", ""),
                    commit_description="",
                    oid="abc",
                    pr_url="https://huggingface.co/x/discussions/1" if kwargs.get("create_pr") else None,
                )
            return None

        return call

    def named(self, name: str) -> list[dict]:
        return [kw for n, kw in self.calls if n == name]


@pytest.fixture
def moe(dense_store, tmp_path) -> Path:
    src = dense_store("llama")
    out = tmp_path / "tiny-moe"
    convert(str(src), out, build_spec(experts=4, every=2))
    return out


def _run(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# --- the card ----------------------------------------------------------------------------------------


def test_card_metadata_after_convert(dense, tmp_path):
    src = dense("qwen3")
    (src / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny qwen3\n")
    out = tmp_path / "moe"
    convert(str(src), out, build_spec(experts=4))
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit"  # carried from the source card
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"moe", "upcycled", "qwen3_moe"} <= set(data["tags"])
    assert "base_model" not in data  # a local folder is not a Hub id
    assert "Qwen3MoeForCausalLM" in card.text and "top-2" in card.text and "all 4 layers" in card.text
    assert "upcycle convert" in card.text
    recipe = json.loads((out / "upcycle.json").read_text())
    assert len(recipe["card_sha256"]) == 64


def test_card_records_verify_unless_edited(moe, dense_store):
    report = verify(str(dense_store("llama")), str(moe), record=True)
    assert report.passed
    recipe = json.loads((moe / "upcycle.json").read_text())
    assert recipe["verify"]["passed"] and recipe["verify"]["max_abs_diff"] == report.max_abs_diff
    text = (moe / "README.md").read_text()
    assert "upcycle verify` checked this on 256 tokens" in text and "| pass |" in text
    ModelCard.load(moe / "README.md")  # still parses

    (moe / "README.md").write_text(text + "\nMy own notes.\n")  # a hand edit is never overwritten
    verify(str(dense_store("llama")), str(moe), record=True, seed=3)
    assert (moe / "README.md").read_text().endswith("My own notes.\n")
    assert json.loads((moe / "upcycle.json").read_text())["verify"]["input"] == "random:3"


def test_card_loading_snippet_runs(moe):
    """The code block of the card works as written, from the folder that holds the model."""
    text = (moe / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'from_pretrained("{moe.name}")' in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=moe.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()  # it generated and decoded something


# --- push --------------------------------------------------------------------------------------------


def test_push_uploads_the_model(moe, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    code, out, err = _run(
        capsys,
        ["push", moe, "me/tiny-moe", "--private", "--branch", "dev", "--commit-message", "first", "--json", "-"],
    )
    assert code == 0, err
    assert hub.named("create_repo") == [
        {"repo_id": "me/tiny-moe", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    assert hub.named("create_branch")[0]["branch"] == "dev"
    (upload,) = hub.named("upload_folder")
    assert Path(upload["folder_path"]) == moe and upload["revision"] == "dev"
    assert upload["commit_message"] == "first" and upload["create_pr"] is False
    on_disk = {p.name for p in moe.iterdir()}
    assert set(upload["allow_patterns"]) == on_disk
    assert {"config.json", "model.safetensors.index.json", "README.md", "upcycle.json", "tokenizer.json"} <= on_disk
    report = json.loads(out[out.index("{") :])
    assert report["total_bytes"] == sum(p.stat().st_size for p in moe.iterdir())
    assert "hf_test_token_never_shown" not in out + err
    card = (moe / "README.md").read_text()  # the card now names the repo it lives in
    assert 'from_pretrained("me/tiny-moe")' in card
    assert json.loads((moe / "upcycle.json").read_text())["hub_repo"] == "me/tiny-moe"


def test_push_pull_request(moe, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    code, out, _ = _run(capsys, ["push", moe, "me/tiny-moe", "--create-pr"])
    assert code == 0
    (upload,) = hub.named("upload_folder")
    assert upload["create_pr"] is True and not hub.named("create_branch")
    assert "discussions/1" in out


def test_push_run_directory_leaves_out_optimizer_states(moe, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    moe.rename(run_dir / "final")
    step = run_dir / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (step / name).write_bytes(b"x" * 10)
    hub = FakeHub(monkeypatch)
    assert _run(capsys, ["push", run_dir, "me/run"])[0] == 0
    (upload,) = hub.named("upload_folder")
    assert Path(upload["folder_path"]) == run_dir / "final"
    assert not any("checkpoints" in p for p in upload["allow_patterns"])

    hub.calls.clear()
    code, out, _ = _run(capsys, ["push", run_dir, "me/run", "--include-checkpoints", "--dry-run", "--json", "-"])
    assert code == 0 and hub.calls == []
    report = json.loads(out[out.index("{") :])
    paths = {f["path"] for f in report["files"]}
    assert {"checkpoints/step-10/model.safetensors", "checkpoints/step-10/config.json"} <= paths
    assert not any(s in p for p in paths for s in ("optimizer", "scheduler", "rng_state"))
    assert "checkpoints/step-10/optimizer.pt" in report["skipped"]

    assert _run(capsys, ["push", run_dir, "me/run", "--include-checkpoints"])[0] == 0
    final, ckpt = hub.named("upload_folder")
    assert Path(final["folder_path"]) == run_dir / "final"
    assert ckpt["path_in_repo"] == "checkpoints"
    assert sorted(ckpt["allow_patterns"]) == ["step-10/config.json", "step-10/model.safetensors"]


def test_dry_run_uploads_nothing_and_needs_no_token(moe, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, token=None)
    before = (moe / "README.md").read_text()
    code, out, err = _run(capsys, ["push", moe, "me/tiny-moe", "--dry-run"])
    assert code == 0, err
    assert hub.calls == []
    assert "Would upload" in out and "config.json" in out and "total" in out
    assert (moe / "README.md").read_text() == before


def test_missing_token_is_one_line(moe, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, token=None)
    code, out, err = _run(capsys, ["push", moe, "me/tiny-moe"])
    assert code == 2 and hub.calls == [] and not out
    assert err.count("\n") == 1 and err.startswith("error: ") and "hf auth login" in err


def test_refused_upload_never_shows_the_token(moe, monkeypatch, capsys):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    FakeHub(monkeypatch, token="hf_SECRET")

    def refuse(api, **kwargs):
        response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api"))
        raise HfHubHTTPError("403 Forbidden: token hf_SECRET cannot write", response=response)

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    code, out, err = _run(capsys, ["push", moe, "me/tiny-moe"])
    assert code == 2 and "write access" in err and "hf_SECRET" not in out + err


@pytest.mark.parametrize("damage", ["missing-shard", "truncated-shard", "no-card", "bad-card", "no-config"])
def test_incomplete_folder_is_refused(moe, monkeypatch, capsys, damage):
    hub = FakeHub(monkeypatch)
    shard = next(moe.glob("model-*.safetensors"))
    if damage == "missing-shard":
        shard.unlink()
    elif damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-64])
    elif damage == "no-card":
        (moe / "README.md").unlink()
    elif damage == "bad-card":
        (moe / "README.md").write_text("---\nlicense: [unclosed\n---\n# card\n")
    else:
        (moe / "config.json").unlink()
    code, out, err = _run(capsys, ["push", moe, "me/tiny-moe"])
    assert code == 2 and hub.calls == []
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in out + err


def test_bad_repo_id(moe, monkeypatch, capsys):
    FakeHub(monkeypatch)
    code, _, err = _run(capsys, ["push", moe, "not a repo id!"])
    assert code == 2 and "repo id" in err


def test_convert_push_to_hub(dense_store, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "pushed"
    code, stdout, err = _run(
        capsys, ["convert", dense_store("mistral"), out, "--experts", "2", "--push-to-hub", "me/pushed", "--private"]
    )
    assert code == 0, err
    assert hub.named("create_repo")[0]["private"] is True
    assert Path(hub.named("upload_folder")[0]["folder_path"]) == out
    assert "Pushed" in stdout and "me/pushed" in stdout


def test_convert_push_to_hub_without_token_fails_before_writing(dense_store, tmp_path, monkeypatch, capsys):
    FakeHub(monkeypatch, token=None)
    out = tmp_path / "never"
    code, _, err = _run(capsys, ["convert", dense_store("llama"), out, "--push-to-hub", "me/x"])
    assert code == 2 and "hf auth login" in err and not out.exists()


def test_card_after_training_record(moe):
    """What `upcycle train` will add to upcycle.json shows in the card and its metadata."""
    from upcycle.publish.card import update_recipe

    training = {
        "datasets": ["debian/jargon-text"],
        "steps": 30,
        "tokens": 122880,
        "seq_len": 256,
        "recipe": {"lr": 1e-4, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
        "final_eval": {"loss": 3.2109, "perplexity": 24.8},
        "expert_load": [{"layer": 1, "cv": 0.12, "max": 0.31, "min": 0.19}],
        "command": "upcycle train tiny-moe --data jargon.txt --out run --steps 30",
    }
    assert update_recipe(moe, training=training)  # the card was generated, so it is rendered again
    card = ModelCard.load(moe / "README.md")
    assert card.data.datasets == ["debian/jargon-text"]
    text = card.text
    assert "## Training" in text and "30 steps, 122880 tokens" in text
    assert "loss 3.2109, perplexity 24.80" in text and "| 1 | 0.120 | 0.310 / 0.190 |" in text
    assert "upcycle train tiny-moe" in text and "The router is untrained" not in text


def test_verify_on_a_read_only_folder_still_reports(moe, dense_store, monkeypatch):
    import upcycle.publish.card

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(upcycle.publish.card, "update_recipe", read_only)
    report = verify(str(dense_store("llama")), str(moe), record=True)
    assert report.passed and report.recorded == "not recorded (Permission denied)"
    assert "verify" not in json.loads((moe / "upcycle.json").read_text())
