"""Diagnosis: fabricated curves for each label and edge case, the search summary, two real runs."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.analysis.diagnose import Diagnosis, Thresholds, diagnose, diagnose_search
from rankwise.io.data import TokenData
from rankwise.records import TrialResult
from rankwise.testing import tiny_model
from rankwise.training.adapter import TrialContext
from rankwise.training.trial import run_trial

from .conftest import make_spec


def result(val, train=None, rank=8, seed=0, status="complete", reason="", **kw) -> TrialResult:
    """A trial whose val curve is ``val`` [(step, loss)] and train curve ``train`` (or a
    gently falling one over the same steps)."""
    last = val[-1][0] if val else 100
    if train is None:
        train = [(s, 3.0 - 0.002 * s) for s in range(1, last + 1)]
    finite = [v for _, v in val if math.isfinite(v)]
    best = min(finite) if finite else None
    return TrialResult(
        key=f"r{rank}-s{seed}",
        rank=rank,
        seed=seed,
        status=status,
        reason=reason,
        best_val_loss=best,
        best_step=next((s for s, v in val if v == best), None),
        final_train_loss=train[-1][1] if train else None,
        train_curve=train,
        val_curve=val,
        steps=last,
        **kw,
    )


def falling_then_rising(rise=0.043, train_from=1.95, train_to=1.52):
    """Val min 2.31 at step 80, then up to 2.31*(1+rise) at 200; train falls throughout."""
    val = [(40, 2.5), (80, 2.31), (120, 2.33), (160, 2.37), (200, 2.31 * (1 + rise))]
    train = [(s, 2.4 - (2.4 - train_from) * s / 80) for s in range(1, 81)]
    train += [(s, train_from - (train_from - train_to) * (s - 80) / 120) for s in range(81, 201)]
    return result(val, train)


# -- one trial, fabricated curves ----------------------------------------------------------
def test_overfitting_reports_the_rise_the_train_fall_and_the_gap():
    d = diagnose(falling_then_rising())
    assert d.label == "overfitting" and "lower the rank or raise dropout" in d.advice
    n = d.numbers
    assert (n["val_min"], n["val_min_step"], n["val_final_step"]) == (2.31, 80, 200)
    assert n["val_rise"] == pytest.approx(0.043)
    # train loss is the mean over one eval interval (40 steps) ending at each eval
    assert n["train_at_min"] == pytest.approx(1.95 + 0.45 * 19.5 / 80)
    assert n["train_final"] == pytest.approx(1.52 + 0.43 * 19.5 / 120)
    assert n["train_change"] < -0.15 and n["gap"] == pytest.approx(
        n["val_final"] - n["train_final"]
    )
    assert "val loss 2.409 at step 200 vs min 2.31 at step 80 (+4.3%)" in d.evidence
    assert "train loss" in d.evidence and "→" in d.evidence and "best checkpoint" in d.evidence


def test_rise_threshold_is_a_parameter():
    r = falling_then_rising(rise=0.015)
    assert diagnose(r).label == "converged"  # +1.5% < the default 2%
    assert diagnose(r, overfit_rise=0.01).label == "overfitting"
    with pytest.raises(TypeError):
        diagnose(r, overfit=0.01)  # an unknown threshold is an error, not ignored
    with pytest.raises(ValueError, match="overfit_rise"):
        Thresholds(overfit_rise=-1)


def test_val_rising_while_train_does_not_fall_is_divergence_not_overfitting():
    val = [(50, 2.5), (100, 2.4), (150, 2.5), (200, 2.6)]
    train = [(s, 2.3 + 0.001 * s) for s in range(1, 201)]
    d = diagnose(result(val, train))
    assert d.label == "unstable" and d.numbers["kind"] == "val rise"
    assert "lower the learning rate" in d.advice and "diverging" in d.evidence


def test_still_improving():
    val = [(25, 3.0), (50, 2.8), (75, 2.7), (100, 2.65)]
    d = diagnose(result(val))
    assert d.label == "still improving" and d.advice.startswith("train longer (raise --max-steps)")
    assert d.numbers["val_gain"] == pytest.approx(0.05 / 2.7)
    assert "val loss 2.7 at step 75 → 2.65 at step 100 (−1.9%)" in d.evidence


def test_still_improving_when_time_limited_names_the_limit():
    d = diagnose(result([(25, 3.0), (50, 2.8)], time_limited=True))
    assert d.label == "still improving" and "--max-trial-time" in d.advice


@pytest.mark.parametrize(
    "val,why",
    [
        ([(25, 3.0), (50, 2.8), (75, 2.7), (100, 2.699)], "last drop under the threshold"),
        ([(25, 3.0), (50, 2.7), (75, 2.71), (100, 2.705)], "last eval is not the minimum"),
        ([(25, 2.7), (50, 2.7), (75, 2.7), (100, 2.7)], "flat"),
    ],
)
def test_converged(val, why):
    d = diagnose(result(val))
    assert d.label == "converged", why
    assert d.advice == "" and d.evidence.startswith("min 2.")


def test_train_spike_after_warmup_is_unstable_but_early_noise_and_tiny_losses_are_not():
    steps = range(1, 101)
    base = [(s, 3.0 - 0.01 * s) for s in steps]
    spiked = [(s, 8.0 if s == 60 else v) for s, v in base]
    d = diagnose(result([(50, 2.6), (100, 2.2)], spiked))
    assert d.label == "unstable" and d.numbers["kind"] == "train spike"
    assert d.numbers["step"] == 60 and d.numbers["ratio"] > 2 and "step 60" in d.evidence
    early = [(s, 8.0 if s == 5 else v) for s, v in base]  # within the warm-up
    assert diagnose(result([(50, 2.6), (100, 2.2)], early)).label == "still improving"
    # a memorised loss near 0 wobbling 0.05 -> 0.12 is 2.4x, but not 0.25 nats: not a spike
    tiny = [(s, 0.12 if s == 60 else 0.05) for s in steps]
    assert diagnose(result([(50, 2.6), (100, 2.6)], tiny)).label == "converged"


def test_val_jump_is_unstable_unless_train_fell():
    val = [(25, 3.0), (50, 2.5), (75, 3.1), (100, 2.4)]
    flat = [(s, 2.4) for s in range(1, 101)]
    d = diagnose(result(val, flat))
    assert d.label == "unstable" and d.numbers["kind"] == "val jump" and d.numbers["step"] == 75
    assert "2.5 → 3.1 (+24.0%)" in d.evidence


@pytest.mark.parametrize(
    "status,reason,val,label",
    [
        ("failed", "unstable: non-finite training loss at step 3", [(2, 4.8)], "unstable"),
        ("complete", "", [(25, float("nan")), (50, float("nan"))], "unstable"),  # all NaN
        ("complete", "", [(25, 2.5), (50, float("inf"))], "unstable"),
        ("failed", "out of memory (peak 10 bytes)", [], "n/a"),
        ("skipped", "above the memory ceiling", [], "n/a"),
        ("complete", "", [(100, 2.5)], "n/a"),  # one evaluation: no curve to read
        ("complete", "", [], "n/a"),
    ],
)
def test_failures_and_edge_cases(status, reason, val, label):
    d = diagnose(result(val, status=status, reason=reason))
    assert d.label == label
    if label == "n/a":
        assert d.advice == "" and d.evidence
    if reason:
        assert reason in d.evidence


def test_all_nan_train_curve_is_unstable():
    train = [(s, float("nan")) for s in range(1, 51)]
    d = diagnose(result([(25, 2.5), (50, 2.4)], train))
    assert d.label == "unstable" and d.numbers["count"] == 50


def test_diagnosis_round_trips_as_a_dict():
    d = diagnose(falling_then_rising())
    assert Diagnosis(**d.to_dict()) == d
    assert set(d.to_dict()) == {"label", "advice", "evidence", "numbers"}


# -- across a search -----------------------------------------------------------------------
def shaped(rank, val_final, kind, steps=200):
    """A trial of a given shape whose best val loss is about ``val_final``."""
    if kind == "improving":
        val = [(50, val_final + 0.3), (100, val_final + 0.15), (150, val_final + 0.05)]
        val.append((200, val_final))
        train = [(s, val_final + 0.5 - 0.002 * s) for s in range(1, steps + 1)]
    elif kind == "overfit":
        val = [(50, val_final + 0.1), (100, val_final), (150, val_final + 0.05)]
        val.append((200, val_final * 1.041))
        train = [(s, val_final + 0.2 - 0.004 * s) for s in range(1, steps + 1)]
    else:  # converged on a plateau: train flat and no lower than val
        val = [(50, val_final + 0.1), (100, val_final + 0.001), (150, val_final)]
        val.append((200, val_final + 0.0005))
        train = [(s, val_final + 0.02 + 0.5 * math.exp(-s / 10)) for s in range(1, steps + 1)]
    return result(val, train, rank=rank)


def test_search_summary_counts_ranks_and_advice():
    results = [
        shaped(1, 3.0, "improving"),
        shaped(4, 2.8, "converged"),
        shaped(32, 2.7, "overfit"),
        shaped(64, 2.7, "overfit"),
        result([], rank=128, status="failed", reason="out of memory (peak 9 bytes)"),
    ]
    s = diagnose_search(results)
    assert s["counts"] == {"still improving": 1, "converged": 1, "overfitting": 2, "n/a": 1}
    assert s["overfit_ranks"] == [32, 64] and s["improving_ranks"] == [1]
    assert (s["smallest_rank"], s["largest_rank"]) == (1, 128)
    assert s["smallest_underfits"] and not s["largest_underfits"] and s["raise_rank"] is None
    assert [t["label"] for t in s["trials"]][:2] == ["still improving", "converged"]
    advice = s["advice"]
    assert "r=32 and r=64 overfit (val rose 4.1% above its minimum while train loss fell" in advice
    assert "lower the rank or raise dropout" in advice
    assert "r=1 was still improving" in advice and "raise --max-steps" in advice
    assert "r=128: not diagnosed (failed: out of memory" in advice


def test_search_says_raise_the_rank_when_the_largest_rank_is_short_of_capacity():
    # every rank converged on a flat train loss no lower than val, and r=16 still beats r=8
    results = [shaped(r, v, "converged") for r, v in [(4, 3.2), (8, 3.0), (16, 2.85)]]
    s = diagnose_search(results)
    assert s["counts"] == {"converged": 3}
    assert s["largest_underfits"] and not s["smallest_underfits"]
    cap = s["raise_rank"]
    assert (cap["rank"], cap["next_rank"]) == (16, 8)
    assert cap["rank_gain"] == pytest.approx(0.05) and abs(cap["train_tail_change"]) < 0.01
    assert "r=16 still beats r=8 by 5.0%" in s["advice"] and "raise the rank" in s["advice"]
    # a plateau across the top ranks: the comparison stands
    plateau = [shaped(r, v, "converged") for r, v in [(4, 3.2), (8, 3.0), (16, 2.999)]]
    s = diagnose_search(plateau)
    assert s["raise_rank"] is None and s["advice"].startswith("All 3 trials converged")
    # a train loss well below val is memorising, not short of capacity
    low = shaped(16, 2.85, "converged")
    low = low.replace(final_train_loss=2.0, train_curve=[(s, 2.0) for s in range(1, 201)])
    assert diagnose_search(results[:2] + [low])["raise_rank"] is None


def test_search_with_unstable_and_empty():
    nan = result([(2, 4.8)], rank=64, status="failed", reason="unstable: non-finite loss")
    s = diagnose_search([shaped(4, 2.8, "converged"), nan])
    assert s["unstable_ranks"] == [64] and "r=64 was unstable" in s["advice"]
    assert "lower the learning rate" in s["advice"]
    empty = diagnose_search([])
    assert empty["counts"] == {} and empty["advice"] == "No trials to diagnose."


# -- two real tiny-model runs ----------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    # One thread: on 2 shared cores, torch's thread pool costs ~10x on these tiny matmuls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A random tiny Llama is near-uniform and an adapter barely moves it; embeddings and head
    # x10 make its outputs responsive (see FIELD.md, "planted-rank tasks").
    m = tiny_model("llama").requires_grad_(False)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(10)
        m.lm_head.weight.mul_(10)
    yield m
    torch.set_num_threads(threads)


def test_real_run_that_memorises_four_blocks_overfits(model):
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(4, 100, (4, 16), generator=gen)  # 4 blocks of random tokens
    val = torch.randint(4, 100, (8, 16), generator=gen)
    ctx = TrialContext(model, None, "cpu", TokenData(train, train.clone(), val, val.clone(), {}))
    r = run_trial(make_spec(32, lora_alpha=64, max_steps=40, eval_every=4), ctx)
    assert r.status == "complete", r.reason
    d = diagnose(r)
    assert d.label == "overfitting", d.evidence
    # it first learned what generalises (token frequencies), then memorised the 4 blocks
    assert 0 < d.numbers["val_min_step"] < r.steps and d.numbers["train_change"] < -0.5
    assert d.numbers["val_rise"] > 0.03  # +4.2% here: well clear of the 2% threshold
    assert d.numbers["val_min"] == r.best_val_loss  # the score stays the best checkpoint


def test_real_run_stopped_early_is_still_improving(model):
    # a learnable task (runs of consecutive tokens), stopped after a few low-lr steps
    start = torch.randint(4, 100, (64, 1), generator=torch.Generator().manual_seed(0))
    blocks = 4 + (start - 4 + torch.arange(16)) % 96
    train, val = blocks[:48], blocks[48:]
    ctx = TrialContext(model, None, "cpu", TokenData(train, train.clone(), val, val.clone(), {}))
    s = make_spec(4, lora_alpha=64, max_steps=9, lr=3e-3, eval_every=3, batch_size=8)
    r = run_trial(s, ctx)
    assert r.status == "complete", r.reason
    d = diagnose(r)
    assert d.label == "still improving", d.evidence
    assert d.numbers["val_gain"] > 2 * Thresholds().improving  # 0.61% here, threshold 0.2%
    assert run_trial(s, ctx).val_curve == r.val_curve  # deterministic
