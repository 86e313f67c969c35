"""A damaged ``trials.sqlite`` through the CLI: ``show``, ``report`` and a resumed ``search``
exit 2 with one line naming the file and the way out, and touch nothing in the run directory
(the damaged file included, for a backup to replace it); ``search --force`` starts the run
again."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from rankwise.cli import main
from rankwise.storage.store import SCHEMA_VERSION, STORE_FILE, RunStore

from .conftest import search_argv, sentences

RANKS = "1,2"


def _not_a_database(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(8192))


def _text_file(path: Path) -> None:
    path.write_text("rank,val_loss\n1,3.2\n2,3.1\n")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # how the file was damaged -> what SQLite says of it
    "random bytes": (_not_a_database, "file is not a database"),
    "a text file": (_text_file, "file is not a database"),
    "truncated to half": (_truncated, "database disk image is malformed"),
}
WAY_OUT = {
    "show": "restore it from a backup, or remove {out} to discard the run",
    "report": "restore it from a backup, or remove {out} to discard the run",
    "search": "restore it from a backup, or pass --force to start the run again",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, llama_dir):
    """A tiny finished search (store, trials/, adapter/, summary.md, recommendation.json)
    and its trials' losses; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("finished")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": s}) for s in sentences(120)))
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:  # conftest's autouse fixture is per test
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("RANKWISE_CACHE", str(tmp_path_factory.getbasetemp() / "rw-cache"))
        assert main(search_argv(llama_dir, train, out, ranks=RANKS)) == 0
    # The search may still hold its connection in this process: move every page into the
    # file itself, as the end of a search process does, so a copy of it is the whole store.
    db = sqlite3.connect(out / STORE_FILE)
    assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    db.close()
    store = RunStore(out, readonly=True)
    losses = {r.key: r.best_val_loss for r in store.results()}
    store.close()
    assert {"trials", "adapter", "summary.md", "recommendation.json"} <= {
        p.name for p in out.iterdir()
    }
    return out, train, losses


def _copy(finished_run, tmp_path) -> tuple[Path, Path]:
    src, train, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    return out, train


def _snapshot(out: Path, companions: bool = True) -> dict[str, bytes]:
    """Every file under ``out`` (the damaged store included), by relative path; without
    ``companions``, less the -wal/-shm SQLite adds beside a sound database it reads."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return {k: v for k, v in files.items() if companions or not k.endswith(("-wal", "-shm"))}


def _argv(command: str, out: Path, train: Path, llama_dir) -> list[str]:
    if command == "search":
        return search_argv(llama_dir, train, out, ranks=RANKS)
    return [command, str(out)]


@pytest.mark.parametrize("command", list(WAY_OUT))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_exits_2_with_one_line_and_touches_nothing(
    finished_run, tmp_path, llama_dir, capsys, damage, command
):
    out, train = _copy(finished_run, tmp_path)
    spoil, sqlite_says = DAMAGE[damage]
    spoil(out / STORE_FILE)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_argv(command, out, train, llama_dir)) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"rankwise {command}: error: {out / STORE_FILE}: not a readable rankwise store "
        f"({sqlite_says}); {WAY_OUT[command].format(out=out)}\n"
    )
    assert "Traceback" not in captured.err and captured.out == ""
    after = _snapshot(out)
    assert sorted(after) == sorted(before)  # no file added (-wal, -shm, lock) or removed
    assert after == before  # summary.md, recommendation.json, trials/..., the store itself


@pytest.mark.parametrize("command", list(WAY_OUT))
def test_a_store_from_a_newer_rankwise_says_upgrade(
    finished_run, tmp_path, llama_dir, capsys, command
):
    out, train = _copy(finished_run, tmp_path)
    db = sqlite3.connect(out / STORE_FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_argv(command, out, train, llama_dir)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{out / STORE_FILE}: written by a newer rankwise (store schema " in err
    assert f"upgrade rankwise, or {WAY_OUT[command].split(', or ')[1].format(out=out)}" in err
    assert _snapshot(out, companions=False) == before  # the store is sound: it may be in use


def test_force_starts_a_damaged_run_again(finished_run, tmp_path, llama_dir, capsys):
    """--force removes the damaged store and what it recorded, then reruns every trial:
    the same configuration and seeds give the same trials as the original run."""
    out, train = _copy(finished_run, tmp_path)
    original = finished_run[2]
    _truncated(out / STORE_FILE)
    stray = out / "trials" / "r64-s0" / "adapter"  # an output the damaged store recorded
    stray.mkdir(parents=True)
    (stray / "adapter_config.json").write_text("{}")
    assert main(search_argv(llama_dir, train, out, ranks=RANKS) + ["--force"]) == 0
    store = RunStore(out, readonly=True)
    redone = {r.key: r.best_val_loss for r in store.results()}
    assert redone == original and not store.running()
    assert not stray.parent.exists()
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["rank"] in (1, 2) and (out / "adapter" / "adapter_config.json").exists()
    assert main(["show", str(out)]) == 0  # the restarted run reads back
