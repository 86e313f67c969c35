"""bench/planted2.py and bench/corpora.py: smoke-size tasks and the README corpus are
deterministic and in the layout the benchmarks read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench import corpora, planted2


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return planted2.make_task(2, tmp_path_factory.mktemp("a") / "planted2-k2", **planted2.SMOKE)


def test_layout(task):
    names = {p.name for p in task.iterdir()}
    assert names == {"model", "train.jsonl", "val.jsonl", "task.json", "planted.safetensors"}
    meta = json.loads((task / "task.json").read_text())
    assert {"k", "params", "targets", "model", "sizes", "usage", "losses", "sha256"} <= set(meta)
    smoke = planted2.SMOKE
    sizes = {"train": smoke["n_train"], "val": smoke["n_val"], "seq_chars": smoke["seq_chars"]}
    assert meta["k"] == 2 and meta["sizes"] == sizes
    assert meta["usage"]["seq_len"] == smoke["seq_chars"] + 1
    assert meta["targets"] == list(planted2.TARGETS)
    for split, n in (("train", smoke["n_train"]), ("val", smoke["n_val"])):
        texts = [json.loads(line)["text"] for line in (task / f"{split}.jsonl").open()]
        assert len(texts) == n and {len(t) for t in texts} == {smoke["seq_chars"]}


def test_same_bytes_twice(task, tmp_path):
    again = planted2.make_task(2, tmp_path / "planted2-k2", **planted2.SMOKE)
    assert _digests(again) == _digests(task)


def test_model_loads_and_targets_exist(task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(task / "model")
    assert type(model).__name__ == "Qwen3ForCausalLM"
    meta = json.loads((task / "task.json").read_text())
    types = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(meta["targets"]) <= types
    # The tokenizer a trainer loads gives back the sampled characters, whitespace included.
    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    assert tokenizer("a\nb c", add_special_tokens=False).input_ids == [14, 99, 15, 98, 16]


def test_teacher_beats_base(task):
    loss = json.loads((task / "task.json").read_text())["losses"]
    assert loss["teacher_val"] < loss["base_val"] - 0.3
    assert loss["teacher_val_full_vocab"] == pytest.approx(loss["teacher_val"], abs=0.03)
    assert loss["teacher_val_with_eos"] < loss["base_val_with_eos"] - 0.3


def test_planted_spectrum_decays():
    s = planted2.spectrum(8, 0.25)
    assert float(s.norm()) == pytest.approx(1.0)
    assert float(s[-1] / s[0]) == pytest.approx(0.25)
    assert all(a > b for a, b in zip(s.tolist(), s[1:].tolist(), strict=False))
    assert planted2.spectrum(1, 0.25).tolist() == [1.0]


def test_parameters_are_checked():
    assert planted2.Planted2Params(k=8).hidden == 96
    assert planted2.Planted2Params(k=32).hidden == 128  # k/v maps of 64: ranks up to 2k
    with pytest.raises(ValueError, match="--hidden"):
        planted2.Planted2Params(k=80)
    with pytest.raises(ValueError, match="--modules"):
        planted2.Planted2Params(k=2, modules="lm_head")
    with pytest.raises(ValueError, match="--k"):
        planted2.Planted2Params(k=0)


def test_package_readmes(tmp_path):
    path = corpora.package_readmes(tmp_path / "a.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records and all(set(r) == {"text"} and r["text"].strip() for r in records)
    assert all(len(r["text"]) <= corpora.MAX_CHARS for r in records)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["records"] == len(records)
    again = corpora.package_readmes(tmp_path / "b.jsonl")
    assert again.read_bytes() == path.read_bytes()
    first = corpora.package_readmes(tmp_path / "c.jsonl", max_records=3)
    assert first.read_text().splitlines() == path.read_text().splitlines()[:3]


def test_unreachable_gap_is_an_error():
    p = planted2.Planted2Params(k=2, **(planted2.SMOKE | {"hidden": 32, "gap": 3.0}))
    base = planted2.build_base(p)
    with pytest.raises(ValueError, match="--gap 3.0"):
        planted2.calibrate_gain(base, p, planted2.directions(base, p))
