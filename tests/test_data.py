"""Reading every file type, the three record formats and their loss masks, bad input."""

from __future__ import annotations

import csv
import json

import pytest

from rankwise.config import DataConfig
from rankwise.errors import ConfigError
from rankwise.io.data import IGNORE, detect_format, prepare_data, split_records
from rankwise.io.formats import render_batch
from rankwise.io.readers import load_records
from rankwise.testing import make_tokenizer

from .conftest import sentences


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".csv"):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif name.endswith(".parquet"):
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".txt"):
        path.write_text("\n".join(r["text"] for r in rows) + "\n\n")
    return path


@pytest.mark.parametrize("name", ["a.jsonl", "a.json", "a.csv", "a.parquet", "a.txt"])
def test_every_file_type_reads_the_same_records(tmp_path, name):
    rows = [{"text": s} for s in sentences(5)]
    assert load_records(str(write(tmp_path, name, rows)), DataConfig()) == rows


def test_txt_one_example_per_file(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"doc {i}\nsecond line")
    records = load_records(str(tmp_path / "docs"), DataConfig(txt_per_file=True))
    assert [r["text"] for r in records] == [f"doc {i}\nsecond line" for i in range(3)]
    with pytest.raises(ConfigError, match="--txt-per-file"):
        load_records(str(tmp_path / "docs"), DataConfig())


def test_prompt_completion_masks_the_prompt(tok):
    cfg = DataConfig(format="auto")
    rec = [{"prompt": "Q: hi\nA:", "completion": " yes"}]
    assert detect_format(rec, cfg, "x") == "prompt_completion"
    ((ids, labels),) = render_batch(rec, "prompt_completion", tok, cfg)
    n_prompt = len(tok("Q: hi\nA:")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert tok.decode([t for t in labels if t != IGNORE]) == " yes</s>"


def test_messages_train_on_assistant_turns_only(tok):
    msgs = {
        "messages": [
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": "pong"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "pong2"},
        ]
    }
    ((ids, labels),) = render_batch([msgs], "messages", tok, DataConfig())
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert learned == "pong</s>\npong2</s>\n"
    assert "ping" not in learned and "again" not in learned


def test_custom_field_names(tmp_path):
    path = write(tmp_path, "a.jsonl", [{"body": "hello there"}])
    cfg = DataConfig(text_field="body")
    assert detect_format(load_records(str(path), cfg), cfg, str(path)) == "text"


def test_split_is_seeded_and_deterministic():
    records = [{"text": str(i)} for i in range(100)]
    cfg = DataConfig(val_fraction=0.1)
    a = split_records(records, cfg, seed=0)
    assert a == split_records(records, cfg, seed=0)
    assert a != split_records(records, cfg, seed=1)
    assert len(a[1]) == 10 and not set(map(str, a[0])) & set(map(str, a[1]))


def test_prepare_packs_and_reuses_cache(tmp_path, tok, text_jsonl):
    from rankwise.io.data import save_tokens

    cfg = DataConfig(train=str(text_jsonl), seq_len=32)
    data = prepare_data(cfg, tok, tmp_path / "run")
    assert data.train_ids.shape[1] == 32 and data.val_ids.shape[0] >= 1
    assert not (tmp_path / "run").exists()  # preparing writes nothing
    save_tokens(data, tmp_path / "run")
    again = prepare_data(cfg, tok, tmp_path / "run")
    assert again.info == data.info and bool((again.train_ids == data.train_ids).all())


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: str(p / "missing.jsonl"), "does not exist"),
        (
            lambda p: (
                (p / "empty.jsonl").write_text("")
                and str(p / "empty.jsonl")
                or str(p / "empty.jsonl")
            ),
            "holds no records",
        ),
        (
            lambda p: (
                (p / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
                and str(p / "bad.jsonl")
            ),
            r"bad.jsonl, line 2: malformed JSON",
        ),
        (
            lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and str(p / "bin.txt"),
            "not UTF-8",
        ),
        (lambda p: (p / "a.xml").write_text("<a/>") and str(p / "a.xml"), "unsupported file type"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, setup, message):
    with pytest.raises(ConfigError, match=message):
        load_records(setup(tmp_path), DataConfig())


def test_missing_field_lists_fields_found(tmp_path):
    path = write(tmp_path, "a.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(ConfigError, match="fields body, id"):
        detect_format(load_records(str(path), DataConfig()), DataConfig(), str(path))


def test_empty_validation_split_is_refused(tmp_path, tok):
    path = write(tmp_path, "a.jsonl", [{"text": s} for s in sentences(5)])
    with pytest.raises(ConfigError, match="validation set would be empty"):
        prepare_data(DataConfig(train=str(path), val_fraction=0.1), tok, tmp_path / "run")


def test_explicit_validation_file_is_used_whole(tmp_path, tok):
    train = write(tmp_path, "train.jsonl", [{"text": s} for s in sentences(40)])
    val = write(tmp_path, "val.csv", [{"text": "zeta zeta zeta"}] * 3)
    data = prepare_data(DataConfig(train=str(train), val=str(val), seq_len=16), tok, tmp_path / "r")
    assert data.info["train_records"] == 40 and data.info["val_records"] == 3
    assert "zeta zeta zeta" in tok.decode(data.val_ids[0].tolist())


def test_hub_dataset_records_are_read_in_batches(monkeypatch):
    import datasets

    rows = [{"text": s, "n": i} for i, s in enumerate(sentences(25))]
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows)
    )
    monkeypatch.setattr("rankwise.io.data.WRITE_BATCH", 10)
    assert load_records("someone/some-data", DataConfig()) == rows
