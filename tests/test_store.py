"""The SQLite store: round trip, interrupted trials, configuration refusal, and a file that
is not a usable store (damaged, foreign, another schema, newer) refused in one line."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from rankwise.errors import ConfigError
from rankwise.records import TrialResult, TrialSpec
from rankwise.storage.store import SCHEMA_VERSION, STORE_FILE, RunStore, UnreadableStore


def spec(rank, seed=0):
    return TrialSpec(
        key=f"r{rank}-s{seed}",
        rank=rank,
        seed=seed,
        lora={"r": rank, "lora_alpha": 16},
        train={"max_steps": 3},
        model={"model": "m"},
        data_dir="d",
    )


def result(rank, loss=1.0, **kw):
    return TrialResult(
        key=f"r{rank}-s0",
        rank=rank,
        seed=0,
        status="complete",
        best_val_loss=loss,
        train_curve=[(1, 2.0), (2, 1.5)],
        val_curve=[(2, loss)],
        **kw,
    )


def test_round_trip(tmp_path):
    store = RunStore(tmp_path)
    store.start(spec(4))
    r = result(4, 2.5, trainable_params=100, extra={"diagnosis": {"label": "converged"}})
    store.finish(r)
    again = RunStore(tmp_path).results()
    assert again == [r]
    assert again[0].train_curve == [(1, 2.0), (2, 1.5)]
    assert RunStore(tmp_path).spec("r4-s0") == spec(4)


def test_interrupted_trial_is_discarded_and_finished_ones_kept(tmp_path):
    store = RunStore(tmp_path)
    store.claim({"lr": 1})
    store.start(spec(4))
    store.finish(result(4))
    store.start(spec(8))  # never finished: a crash
    store.close()
    store = RunStore(tmp_path)
    assert [r["key"] for r in store.running()] == ["r8-s0"]
    store.claim({"lr": 1})
    assert store.running() == [] and [r.rank for r in store.results()] == [4]


def test_finished_trial_is_never_overwritten(tmp_path):
    store = RunStore(tmp_path)
    store.start(spec(4))
    store.finish(result(4))
    with pytest.raises(RuntimeError, match="already recorded"):
        store.finish(result(4, 0.1))
    assert store.results()[0].best_val_loss == 1.0


def test_different_configuration_is_refused_with_diff(tmp_path):
    store = RunStore(tmp_path)
    store.claim({"lr": 1, "ranks": [1, 2]})
    store.finish(result(4), spec(4))
    with pytest.raises(ConfigError, match=r"lr: 1 -> 2"):
        store.claim({"lr": 2, "ranks": [1, 2]})
    assert len(store.results()) == 1
    assert store.claim({"lr": 2, "ranks": [1, 2]}, force=True) is True
    assert store.results() == []


def test_readonly_missing_run(tmp_path):
    with pytest.raises(ConfigError, match="no rankwise run"):
        RunStore(tmp_path / "nope", readonly=True)


def test_a_changed_default_is_a_difference(tmp_path):
    """The whole resolved configuration is stored: an option a later version adds or whose
    default changed is refused like any other edit, so trials never mix settings."""
    store = RunStore(tmp_path)
    store.claim({"lr": 1, "alpha_policy": "fixed"})
    store.finish(result(4), spec(4))
    assert store.claim({"lr": 1, "alpha_policy": "fixed"}) is False
    with pytest.raises(ConfigError, match="alpha_policy: 'fixed' -> None"):
        store.claim({"lr": 1})
    with pytest.raises(ConfigError, match="alpha_policy: 'fixed' -> 'ratio'"):
        store.claim({"lr": 1, "alpha_policy": "ratio"})
    assert len(store.results()) == 1


# -- a file that is not a usable store -------------------------------------------------------
def _finished_store(path):
    store = RunStore(path)
    store.claim({"lr": 1})
    for rank in (1, 2, 4, 8):
        store.start(spec(rank))
        store.finish(result(rank))
    store.close()  # the last connection moves every page into the file and removes -wal
    return path / STORE_FILE


def _sqlite(path, script):
    path.unlink()
    db = sqlite3.connect(path)
    db.executescript(script)
    db.close()


def _overwrite_a_page(path):
    data = bytearray(path.read_bytes())
    data[4096:8192] = random.Random(0).randbytes(4096)  # page 2 of 4 KiB pages
    path.write_bytes(bytes(data))


def _newer(path):
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()


class Unusable(NamedTuple):
    spoil: Callable[[Path], object]
    problem: str
    """The start of what the message says of the file."""
    fix: str = "restore it from a backup"
    damaged: bool = True
    """SQLite finds it damaged, so no search can be using it: a read-only open removes the
    -wal/-shm it created. A sound database of another kind may be in use: they stay."""


UNUSABLE = {
    "random bytes": Unusable(
        lambda p: p.write_bytes(random.Random(0).randbytes(8192)),
        "not a readable rankwise store (file is not a database)",
    ),
    "a text file": Unusable(
        lambda p: p.write_text("rank,val_loss\n4,1.0\n"),
        "not a readable rankwise store (file is not a database)",
    ),
    "truncated to half": Unusable(
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "not a readable rankwise store (database disk image is malformed)",
    ),
    "a page overwritten": Unusable(_overwrite_a_page, "not a readable rankwise store ("),
    "another program's database": Unusable(
        lambda p: _sqlite(p, "CREATE TABLE things (a, b);"),
        "not a rankwise store (a database without a meta table)",
        damaged=False,
    ),
    "a store of another schema": Unusable(
        lambda p: _sqlite(p, "CREATE TABLE meta (key, value); CREATE TABLE trials (key);"),
        "not a rankwise store of this version (table trials has no column seq, rank, seed",
        damaged=False,
    ),
    "a store of a newer rankwise": Unusable(
        _newer,
        f"written by a newer rankwise (store schema {SCHEMA_VERSION + 1}; this one reads "
        f"{SCHEMA_VERSION} and older)",
        fix="upgrade rankwise",
        damaged=False,
    ),
}


@pytest.mark.parametrize("readonly", [True, False], ids=["read", "write"])
@pytest.mark.parametrize("case", list(UNUSABLE))
def test_an_unusable_store_is_refused_in_one_line_and_left_as_it_is(tmp_path, case, readonly):
    path = _finished_store(tmp_path)
    unusable = UNUSABLE[case]
    unusable.spoil(path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UnreadableStore) as caught:
        RunStore(tmp_path, readonly=readonly)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and "\n" not in message
    assert message.startswith(f"{path}: {unusable.problem}")
    assert message.endswith(f"; {unusable.fix}, or remove {tmp_path} to discard the run")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {name: after.get(name) for name in before} == before  # nothing written
    added = set(after) - set(before)
    assert added <= {"trials.sqlite-wal", "trials.sqlite-shm"}
    assert not added or (readonly and not unusable.damaged)


def test_a_store_from_before_schema_versions_opens_and_is_marked(tmp_path):
    path = _finished_store(tmp_path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 0")
    db.commit()
    db.close()
    assert len(RunStore(tmp_path, readonly=True).results()) == 4
    store = RunStore(tmp_path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert len(store.results()) == 4


def test_an_empty_file_is_a_new_store_to_a_search_but_no_run_to_show(tmp_path):
    (tmp_path / STORE_FILE).write_bytes(b"")
    with pytest.raises(UnreadableStore, match=r"not a rankwise store \(an empty database\)"):
        RunStore(tmp_path, readonly=True)
    assert RunStore(tmp_path).results() == []
