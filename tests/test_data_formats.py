"""alpaca and ShareGPT records: detection, templates, loss masks, mixed files, the CLI."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rankwise.cli import main
from rankwise.config import DataConfig
from rankwise.errors import ConfigError
from rankwise.io.data import detect_format, prepare_data
from rankwise.io.formats import IGNORE, alpaca_prompt, record_format, render_batch
from rankwise.testing import make_tokenizer

from .conftest import search_argv, sentences


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def learned(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE])


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def alpaca_rows(n: int = 120) -> list[dict]:
    return [
        {"instruction": f"Repeat: {s}", "input": s if i % 2 else "", "output": s.split()[0]}
        for i, s in enumerate(sentences(n))
    ]


def sharegpt_rows(n: int = 120) -> list[dict]:
    return [
        {
            "conversations": [
                {"from": "system", "value": "echo the last word"},
                {"from": "human", "value": s},
                {"from": "gpt", "value": s.split()[-1]},
            ]
        }
        for s in sentences(n)
    ]


# -- detection --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record,fmt",
    [
        ({"text": "a"}, "text"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"messages": []}, "messages"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "output": "b", "text": "a b"}, "alpaca"),  # tatsu-lab/alpaca
        ({"conversations": []}, "sharegpt"),
        ({"body": "a"}, None),
    ],
)
def test_record_format(record, fmt):
    assert record_format(record, DataConfig()) == fmt


def test_conversations_field_is_a_flag(tok):
    rows = [{"turns": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    cfg = DataConfig(conversations_field="turns")
    assert detect_format(rows, cfg, "x") == "sharegpt"
    ((_, labels),) = render_batch(rows, "sharegpt", tok, cfg)
    assert learned(tok, labels) == "yo</s>\n"


# -- alpaca -----------------------------------------------------------------------------------
def test_alpaca_prompt_with_input():
    assert alpaca_prompt({"instruction": "Add", "input": "2 and 3", "output": "5"}) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


@pytest.mark.parametrize("given", [{"input": ""}, {"input": None}, {}])
def test_alpaca_prompt_without_input(given):
    assert alpaca_prompt({"instruction": "Greet", **given, "output": "hi"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nGreet\n\n### Response:\n"
    )


def test_alpaca_system_replaces_the_preamble():
    prompt = alpaca_prompt({"system": "You add.", "instruction": "Add", "input": "1 1"})
    assert prompt == "You add.\n\n### Instruction:\nAdd\n\n### Input:\n1 1\n\n### Response:\n"


def test_alpaca_loss_on_the_output_only(tok):
    record = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    ((ids, labels),) = render_batch([record], "alpaca", tok, DataConfig())
    assert tok.decode(ids) == alpaca_prompt(record) + "5</s>"
    assert learned(tok, labels) == "5</s>"
    assert labels[: len(alpaca_prompt(record))] == [IGNORE] * len(alpaca_prompt(record))


# -- ShareGPT ---------------------------------------------------------------------------------
def test_sharegpt_loss_on_gpt_turns_only(tok):
    record = {
        "conversations": [
            {"from": "system", "value": "terse"},
            {"from": "human", "value": "ping"},
            {"from": "gpt", "value": "pong"},
            {"from": "human", "value": "again"},
            {"from": "gpt", "value": "pong2"},
        ]
    }
    ((ids, labels),) = render_batch([record], "sharegpt", tok, DataConfig())
    assert tok.decode(ids).startswith("<system>terse</s>\n<user>ping</s>\n<assistant>pong")
    assert learned(tok, labels) == "pong</s>\npong2</s>\n"


def test_sharegpt_renders_as_the_same_messages(tok):
    turns = [("human", "user", "hi"), ("gpt", "assistant", "hello")]
    sharegpt = {"conversations": [{"from": f, "value": v} for f, _, v in turns]}
    spelled = {"conversations": [{"from": r, "value": v} for _, r, v in turns]}
    messages = {"messages": [{"role": r, "content": v} for _, r, v in turns]}
    cfg = DataConfig()
    assert (
        render_batch([sharegpt], "sharegpt", tok, cfg)
        == render_batch([spelled], "sharegpt", tok, cfg)
        == render_batch([messages], "messages", tok, cfg)
    )


# -- bad files --------------------------------------------------------------------------------
def test_a_file_mixing_formats_names_the_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "mixed.jsonl", alpaca_rows(2) + [{"text": "plain"}])
    with pytest.raises(ConfigError) as err:
        prepare_data(DataConfig(train=str(path)), tok, tmp_path / "run")
    msg = str(err.value)
    assert "mixed.jsonl, line 3: a text record" in msg and "line 1 is alpaca" in msg
    assert "expected fields instruction, output" in msg


def test_a_sharegpt_role_outside_human_gpt_system_names_the_record(tmp_path, tok):
    rows = sharegpt_rows(2)
    rows[1]["conversations"][2]["from"] = "tool"
    path = tmp_path / "s.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match=r"s.json, record 2: conversations\[2\]: from 'tool'; "):
        prepare_data(DataConfig(train=str(path)), tok, tmp_path / "run")


@pytest.mark.parametrize(
    "turns,problem",
    [
        ("hello", "expected a list of {from, value} turns, got str"),
        ([{"role": "user", "content": "x"}], "expected an object with 'from' and 'value'"),
        ([{"from": "human", "value": 3}], "value is int; expected a string"),
    ],
)
def test_malformed_conversations(turns, problem):
    with pytest.raises(ConfigError, match="record 1: conversations") as err:
        detect_format([{"conversations": turns}], DataConfig(), "f.jsonl")
    assert problem in str(err.value)


def test_explicit_format_with_missing_fields(tmp_path):
    with pytest.raises(ConfigError, match="f.jsonl, record 1 has no field instruction, output"):
        detect_format([{"text": "a"}], DataConfig(format="alpaca"), "f.jsonl")


def test_chat_formats_need_a_chat_template(tmp_path, tok):
    bare = make_tokenizer()
    bare.chat_template = None
    path = write_jsonl(tmp_path / "s.jsonl", sharegpt_rows(20))
    with pytest.raises(ConfigError, match="--format sharegpt: the tokenizer has no chat template"):
        prepare_data(DataConfig(train=str(path)), bare, tmp_path / "run")


# -- preparation stays inside its temporary directory -----------------------------------------
def test_preparation_writes_only_to_a_temporary_directory(tmp_path, tok, monkeypatch):
    import tempfile

    import datasets

    scratch, hf_cache = tmp_path / "scratch", tmp_path / "hf-cache"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    data = prepare_data(DataConfig(train=str(path), seq_len=64), tok, tmp_path / "run")
    assert data.info["format"] == "alpaca" and data.info["train_records"] == 108
    assert list(scratch.iterdir()) == [] and not hf_cache.exists()
    assert not (tmp_path / "run").exists()


# -- through the command line -----------------------------------------------------------------
@pytest.mark.parametrize("fmt,rows", [("alpaca", alpaca_rows), ("sharegpt", sharegpt_rows)])
def test_search_end_to_end(tmp_path, llama_dir, fmt, rows):
    out = tmp_path / "run"
    train = write_jsonl(tmp_path / f"{fmt}.jsonl", rows())
    # 128-token blocks: every batch holds an output (alpaca's prompt alone is ~190 tokens
    # here), as a batch without one has no loss to take the mean of.
    assert main(search_argv(llama_dir, train, out, ranks="1,2", seq_len=128)) == 0
    meta = sqlite3.connect(out / "trials.sqlite").execute(
        "SELECT value FROM meta WHERE key = 'data'"
    )
    assert json.loads(meta.fetchone()[0])["format"] == fmt
    assert json.loads((out / "recommendation.json").read_text())["rank"] in (1, 2)


def test_search_rejects_a_mixed_file_in_one_line(tmp_path, llama_dir, capsys):
    rows = sharegpt_rows(3)
    rows.insert(1, {"messages": [{"role": "user", "content": "x"}]})
    train = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(search_argv(llama_dir, train, out, ranks="1,2") + ["--format", "sharegpt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "--train: " in err and "mixed.jsonl, line 2 has no field conversations" in err
    assert not out.exists()
