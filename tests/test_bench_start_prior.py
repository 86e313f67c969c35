"""bench/archive/start_prior.py: the start-rank priors and the replays that judge them.

Torch-free and deterministic: made-up curves and pools, and the one-seed curves the script
carries (copied from bench/RESULTS.md). The stored stability pools are not needed.
"""

from __future__ import annotations

import doctest

import pytest

from bench.archive import start_prior as sp
from rankwise.records import TrialResult

RANKS = (1, 2, 4, 8, 16, 32)


def test_doctests():
    assert doctest.testmod(sp, raise_on_error=False).failed == 0


def test_tinker_rule_smallest_rank_with_enough_parameters():
    smol = {r: 57_600 * r for r in RANKS}  # SmolLM2-135M, q/v
    assert sp.start_rank_prior(smol, 15_360) == 1  # one trial of 60 x 4 x 64
    assert sp.start_rank_prior(smol, 114_302) == 2  # the docstrings' training tokens
    assert sp.start_rank_prior(smol, 115_200) == 2  # exactly r=2's parameters: enough
    assert sp.start_rank_prior(smol, 115_201) == 4
    tiny = {r: 1_280 * r for r in RANKS}  # planted, hidden 64, q/v/up/down
    assert sp.start_rank_prior(tiny, 614_400) == 32  # none has enough: the largest
    assert sp.start_rank_prior(tiny, 614_400, c=1 / 30) == 16
    assert sp.start_rank_prior(tiny, 614_400, ranks=[2, 4, 8]) == 8
    with pytest.raises(ValueError):
        sp.start_rank_prior({}, 1)


def test_shapes_count_what_peft_counts():
    # PEFT's lora_param_count on the stored models and configs (--check-params), per rank
    assert sp.PLANTED_64.lora_per_rank(sp.QVUD) == 1_280
    assert sp.PLANTED_128.lora_per_rank(sp.QVUD) == 2_560
    assert sp.PLANTED2_96.lora_per_rank(sp.ALL7) == 5_472
    assert sp.PLANTED2_128.lora_per_rank(sp.ALL7) == 7_296
    assert sp.SMOLLM2.lora_per_rank(sp.QV) == 57_600
    assert all(sp.size_only(s, []) == 4 for s in sp.SETTINGS)  # every base is under 1B


def test_axolotl_and_snap():
    assert [sp.axolotl_rank(n) for n in (52, 999, 1_000, 2_048, 10_000, 100_000)] == [
        8, 8, 16, 16, 32, 64,
    ]  # fmt: skip
    assert sp.snap((4, 8, 16, 32, 64, 128), 2) == 4
    assert sp.snap(RANKS, 64) == 32
    assert sp.snap(RANKS, 2**2.5) == 4  # a tie between 4 and 8: the smaller


def test_fitted_constants():
    a = sp.SEARCH_COST[0]  # planted-k2, 614,400 tokens per trial, 1,280 per rank
    train = [sp.Known(a, 4), sp.Known(a, 16), sp.Known(a, 32)]  # c = answer x 1280 / 614400
    assert sp.fit_c(sp._trial)(train) == pytest.approx(16 * 1_280 / 614_400)
    assert sp.fit_constant(a, train) == 16  # the median in doublings
    assert sp.fitted_tinker(sp._trial)(a, train) == 16
    # fewest trials: the constant whose replays trained the fewest, summed over the tasks
    cheap_at_4 = {1: 6, 2: 4, 4: 3, 8: 4, 16: 5, 32: 6}
    cheap_at_8 = {1: 9, 2: 9, 4: 9, 8: 8, 16: 9, 32: 9}
    train = [sp.Known(a, 8, cheap_at_4), sp.Known(a, 8, cheap_at_8)]
    assert sp.fewest_target(train) == 4  # 3 + 9 at 4, 4 + 8 at 8: a tie goes to the smaller
    assert sp.fit_fewest(sp.SEARCH_COST[4], train) == 4  # snapped to ranks 4..128


def curve(losses: dict[int, float]) -> dict[int, TrialResult]:
    return {
        r: TrialResult(key=f"r{r}", rank=r, seed=0, status="complete", best_val_loss=v,
                       train_tokens=100)
        for r, v in losses.items()
    }  # fmt: skip


# Falls, then flattens after r = 4: the grid's answer (knee 1% of the base's improvement) is 4.
FLAT_AFTER_4 = {1: 3.0, 2: 2.6, 4: 2.5, 8: 2.499, 16: 2.498, 32: 2.4975}


def test_a_start_above_the_answer_probes_down_to_it():
    results = curve(FLAT_AFTER_4)
    low = sp.replay_curve(RANKS, results, 4.0, 4)
    high = sp.replay_curve(RANKS, results, 4.0, 16)
    top = sp.replay_curve(RANKS, results, 4.0, 32)
    assert (low.rank, low.trials) == (4, 3)  # 4, 8, then the probe to 2
    assert (high.rank, high.trials) == (4, 5)  # 16, 32, then 8, 4, 2
    assert (top.rank, top.trials) == (4, 5)  # 32, then 16, 8, 4, 2
    assert high.tokens == 5 * 100


def test_a_start_below_a_bump_stops_on_it():
    """smollm2-readmes: r = 2 is worse than r = 1, so a ladder from 1 stops at 1 where the
    grid (and the ladder from 4) says 8: the tinker priors' one changed answer."""
    readmes = next(s for s in sp.SEARCH_COST if s.name == "smollm2-readmes")
    results = sp.curve_results(readmes)
    assert sp.grid_answer(readmes, None) == 8
    assert sp.replay_curve(readmes.ranks, results, readmes.base_loss, 4).rank == 8
    assert sp.replay_curve(readmes.ranks, results, readmes.base_loss, 1).rank == 1


def fake_pool(losses: dict[int, float], seed_effect: list[float], base: float = 4.0) -> dict:
    trials = [
        {"rank": r, "seed": s, "status": "complete", "best_val_loss": v + e, "val_blocks": [],
         "val_curve": [], "train_tokens": 1000}
        for r, v in losses.items() for s, e in enumerate(seed_effect)
    ]  # fmt: skip
    return {"ranks": sorted(losses), "seeds": len(seed_effect), "base_loss": base,
            "trials": trials}  # fmt: skip


def test_new_default_from_above_descends_on_a_pool():
    pool = fake_pool(FLAT_AFTER_4, [0.0, 0.0004, -0.0003, 0.0002, -0.0001, 0.0003])
    for outer in sp.OUTER:
        low, high = sp.replay_pool(pool, 4, outer), sp.replay_pool(pool, 32, outer)
        assert low.rank == high.rank == 4
        assert high.trials > low.trials  # the probe down costs what the climb would not


def test_the_decision_on_the_one_seed_curves():
    """What the replay concludes on the 15 one-seed curves: no prior from pre-training
    features saves trials on average against the size-only start, and even a start at the
    grid's answer saves at most one trial on any curve and about half a trial on average."""
    rows = sp.measure(sp.SEARCH_COST + sp.CRITERION_CURVES, {})
    assert [r["answer"] for r in rows] == [8, 16, 16, 16, 16, 2, 4, 8, 4, 8, 2, 4, 8, 16, 16]
    summ = {x["prior"]: x for x in sp.summary(rows, "curves")}
    assert summ["size-only"]["above"] == 2 and summ["size-only"]["changed"] == 0
    for name in ("tinker/trial", "tinker/data", "axolotl", "fit: c x trial tokens",
                 "fit: c x data tokens"):  # fmt: skip
        assert summ[name]["saved"] <= 0, name
    assert summ["tinker/trial"]["above"] == 13
    assert summ["oracle"]["min_saved"] >= 0
    assert 0 < summ["oracle"]["saved"] <= 0.6
    assert all(
        r["replays"]["size-only"][0].trials - r["replays"]["oracle"][0].trials <= 1 for r in rows
    )
