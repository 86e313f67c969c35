"""The streaming preparation packs exactly the token blocks the list-based one did.

The digests below were computed with ``prepare_data`` as of commit 9887486 (every record
tokenised into Python lists, then packed). Reprint them with::

    python -m tests.test_data_parity --commit 9887486
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import pytest

from rankwise.config import DataConfig
from rankwise.io.data import prepare_data
from rankwise.testing import make_tokenizer

from .conftest import sentences

# Awkward text on purpose: newlines inside records, a form feed (str.splitlines splits at
# it), non-ASCII (the character tokenizer's <unk>), quotes for CSV.
ODD = ["two\nlines", "form\x0cfeed", "café ünïcode", 'a "quoted", comma', "  padded  "]


def _texts(n: int, seed: int = 0) -> list[str]:
    return [s if i % 7 else f"{s} {ODD[i % len(ODD)]}" for i, s in enumerate(sentences(n, seed))]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return str(path)


def _chat(s: str, i: int) -> dict:
    turns = [{"role": "user", "content": s}, {"role": "assistant", "content": s.split()[-1]}]
    if i % 3 == 0:
        turns = [{"role": "system", "content": "be brief"}, *turns, *turns]
    return {"messages": turns}


def _case(name: str, d: Path) -> dict:
    """DataConfig keywords (and seed) of one parity case; its files are written to ``d``."""
    texts = _texts(300)
    if name == "text-jsonl":
        return {"train": _write_jsonl(d / "t.jsonl", [{"text": t} for t in texts])}
    if name == "prompt-completion-json":
        rows = [{"prompt": f"Q: {t}\nA:", "completion": " " + t.split()[0]} for t in texts]
        (d / "pc.json").write_text(json.dumps(rows))
        return {"train": str(d / "pc.json"), "seq_len": 48}
    if name == "messages-jsonl":
        rows = [_chat(t, i) for i, t in enumerate(texts[:120])]
        return {"train": _write_jsonl(d / "c.jsonl", rows), "val_fraction": 0.2}
    if name == "txt":
        lines = [t.replace("\n", " ") for t in texts]
        (d / "t.txt").write_text("\n".join(lines[:150]) + "\n\n\r\n" + "\r\n".join(lines[150:]))
        return {"train": str(d / "t.txt"), "seq_len": 64}
    if name == "csv":
        with (d / "t.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "id"])
            w.writeheader()
            w.writerows({"text": t, "id": i} for i, t in enumerate(texts))
        return {"train": str(d / "t.csv"), "seq_len": 16}
    if name == "parquet":
        from datasets import Dataset

        Dataset.from_list([{"text": t, "n": i} for i, t in enumerate(texts)]).to_parquet(
            str(d / "t.parquet")
        )
        return {"train": str(d / "t.parquet"), "_seed": 3}
    if name == "max-examples-val-file":
        val = [{"text": t} for t in _texts(40, seed=1)]
        return {
            "train": _write_jsonl(d / "t.jsonl", [{"text": t} for t in texts]),
            "val": _write_jsonl(d / "v.jsonl", val),
            "max_examples": 123,
        }
    raise KeyError(name)


def digest(data) -> str:
    h = hashlib.sha256()
    for t in (data.train_ids, data.train_labels, data.val_ids, data.val_labels):
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    keys = ("format", "train_records", "val_records", "train_blocks", "val_blocks", "seq_len")
    h.update(json.dumps({k: data.info[k] for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:20]


EXPECTED = {
    "text-jsonl": "31ae449beeb5200081c5",
    "prompt-completion-json": "82566f1d80cde576703c",
    "messages-jsonl": "af96c2b238c7a51cb023",
    "txt": "13d2e5706005002a5d5f",
    "csv": "34f553ee050e7b3bef04",
    "parquet": "6ba9001f48c5f482737b",
    "max-examples-val-file": "8b8159886d5a5bf69618",
}


def _prepare(name: str, d: Path, prepare=prepare_data, **over):
    kw = {"seq_len": 32, **_case(name, d), **over}
    seed = kw.pop("_seed", 0)
    return prepare(DataConfig(**kw), make_tokenizer(), d / "run", seed)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tokens_match_the_list_based_implementation(tmp_path, name):
    assert digest(_prepare(name, tmp_path)) == EXPECTED[name]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_worker_processes_do_not_change_the_tokens(tmp_path, num_proc):
    data = _prepare("messages-jsonl", tmp_path, num_proc=num_proc)
    assert digest(data) == EXPECTED["messages-jsonl"]


if __name__ == "__main__":
    import tempfile

    from bench.archive.data_prep import old_prepare

    commit = sys.argv[sys.argv.index("--commit") + 1] if "--commit" in sys.argv else None
    prepare = old_prepare(commit) if commit else prepare_data
    for name in EXPECTED:
        with tempfile.TemporaryDirectory() as d:
            print(f'    "{name}": "{digest(_prepare(name, Path(d), prepare))}",')
