"""The SQLite store: round trip, interrupted trials, configuration refusal."""

from __future__ import annotations

import pytest

from rankwise.errors import ConfigError
from rankwise.records import TrialResult, TrialSpec
from rankwise.run.store import RunStore


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
