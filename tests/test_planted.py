"""bench/planted.py: smoke-size planted-rank tasks are deterministic, cached and sound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import planted

SMALL = {"n_train": 24, "n_val": 8, "seq_chars": 16}


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return planted.make_task(2, tmp_path_factory.mktemp("a") / "planted-k2", **SMALL)


def test_layout(task):
    names = {p.name for p in task.iterdir()}
    assert names == {"model", "train.jsonl", "val.jsonl", "task.json", "planted.safetensors"}
    assert (task / "model" / "model.safetensors").exists()
    assert (task / "model" / "tokenizer.json").exists()
    meta = json.loads((task / "task.json").read_text())
    assert meta["k"] == 2 and meta["sizes"] == {"train": 24, "val": 8, "seq_chars": 16}
    assert meta["params"]["hidden"] == 64 and meta["params"]["gain"] == 8.0


def test_same_bytes_twice(task, tmp_path):
    again = planted.make_task(2, tmp_path / "planted-k2", **SMALL)
    assert _files(again) == _files(task)


def test_round_trip(task):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    for split, n in (("train", 24), ("val", 8)):
        texts = [json.loads(line)["text"] for line in (task / f"{split}.jsonl").open()]
        assert len(texts) == n
        for text in texts:
            ids = tokenizer(text).input_ids
            assert ids == [planted.CHARS.index(c) + 4 for c in text]
            assert len(ids) == 16 and all(4 <= i < 100 for i in ids)


def test_round_trip_matches_sampled_ids():
    p = planted.PlantedParams(k=2, **SMALL)
    teacher, _ = planted.plant(planted.build_base(p), p)
    ids = planted.sample(teacher, 6, p.seq_chars, seed=5, temperature=p.temperature)
    texts = planted.decode(ids)
    planted.check_round_trip(planted.make_tokenizer(), texts, ids)


def test_teacher_beats_base(task):
    loss = json.loads((task / "task.json").read_text())["losses"]
    assert loss["teacher_val"] < loss["base_val"] - 0.3
    # The bias channel keeps non-character ids other than EOS at ~zero mass, and EOS near
    # 1/(seq_chars + 1): the masked teacher (what generated the data) is nearly the
    # full-vocabulary teacher that a LoRA student can match.
    assert loss["teacher_val_full_vocab"] == pytest.approx(loss["teacher_val"], abs=0.03)
    assert loss["teacher_val_with_eos"] < loss["base_val_with_eos"] - 0.3


def test_cache_reused_and_invalidated(tmp_path):
    task = planted.make_task(2, tmp_path / "planted-k2", **SMALL)
    stamp = (task / "train.jsonl").stat().st_mtime_ns
    assert planted.make_task(2, task, **SMALL) == task
    assert (task / "train.jsonl").stat().st_mtime_ns == stamp
    planted.make_task(2, task, **(SMALL | {"data_seed": 9}))
    meta = json.loads((task / "task.json").read_text())
    assert meta["params"]["data_seed"] == 9


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="--hidden"):
        planted.PlantedParams(k=200)  # more than the largest automatic hidden size (128)
    assert planted.PlantedParams(k=32).hidden == 128
    assert planted.PlantedParams(k=32).gain == 4.0
    with pytest.raises(ValueError, match="--k"):
        planted.PlantedParams(k=0)


def test_only_the_named_module_types_get_the_update():
    p = planted.PlantedParams(k=2, modules="up_proj+down_proj", **SMALL)
    _, factors = planted.plant(planted.build_base(p), p)
    assert {name.rsplit(".", 1)[-1] for name in factors} == {"up_proj", "down_proj"}
    assert "modules" in p.key() and "modules" not in planted.PlantedParams(k=2).key()
    assert planted.task_name(8, p.modules) == "planted-k8-up_proj-down_proj"
    with pytest.raises(ValueError, match="--modules"):
        planted.PlantedParams(k=2, modules="o_proj")
