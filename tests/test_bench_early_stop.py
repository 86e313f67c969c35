"""bench/archive/early_stop.py: stopping a trial once it cannot change the answer (torch-free replay)."""

from __future__ import annotations

from bench import stability
from bench.archive import early_stop
from rankwise.core.criteria import Criterion

CURVE = {1: 3.80, 2: 3.70, 4: 3.62, 8: 3.61, 16: 3.609, 32: 3.6085}
STEPS = (100, 200, 300, 400, 500)


def pool(drift: float = 0.0) -> dict:
    """Paired seeds; every rank's curve falls by the same 0.2 nats (its gap to any other rank
    is constant over training) except that rank 8's gap moves by ``drift`` at the end."""
    trials = []
    for r, final in CURVE.items():
        for s in range(6):
            end = final + 0.003 * s
            curve = [[t, end + 0.2 * (500 - t) / 400 + (drift if r == 8 and t < 500 else 0.0)]
                     for t in STEPS]  # fmt: skip
            trials.append({"rank": r, "seed": s, "status": "complete", "best_val_loss": end,
                           "val_blocks": [], "val_curve": curve, "train_tokens": 1000})  # fmt: skip
    return {"task": "fake", "k": 8, "ranks": sorted(CURVE), "seeds": 6, "base_loss": 4.3,
            "trials": trials}  # fmt: skip


def test_drift_bound_is_the_largest_late_move_of_a_paired_gap():
    bounds = early_stop.drift_bounds(pool(drift=0.01))
    assert set(bounds) == {0.2, 0.4, 0.6, 0.8}
    assert all(abs(b - 0.01) < 1e-12 for b in bounds.values())
    assert max(early_stop.drift_bounds(pool()).values()) < 1e-12


def test_a_trial_stops_only_where_no_final_loss_in_the_band_changes_the_decision():
    p, knee = pool(), Criterion()
    plain = [stability.replay(p, "new default", knee, o) for o in stability.OUTER]
    # Gaps that never move, no margin: every trial with a partner stops at 40% of its steps,
    # the search is told the exact final loss, and the answer is the one without stopping.
    exact = [early_stop.replay_stopping(p, o, knee, dict.fromkeys((0.2, 0.4, 0.6, 0.8), 0.0),
                                        0.4) for o in stability.OUTER]  # fmt: skip
    assert [a.rank for a in plain] == [rank for rank, _, _ in exact]
    assert all(stops > 0 and tokens < a.tokens for a, (_, tokens, stops)
               in zip(plain, exact, strict=True))  # fmt: skip
    # A margin wider than the whole curve: no final loss is safe to guess, nothing stops.
    wide = early_stop.replay_stopping(p, 1, knee, dict.fromkeys((0.2, 0.4, 0.6, 0.8), 1.0), 0.4)
    assert wide[2] == 0 and wide[1] == plain[0].tokens and wide[0] == plain[0].rank


def test_rankwise_own_rule_replayed_keeps_the_answer_and_stops_what_cannot_change_it():
    p, knee = pool(), Criterion()
    plain = [stability.replay(p, "new default", knee, o) for o in stability.OUTER]
    # rankwise's Cutoff with a zero band: gaps never move here, so trials stop at 40% and
    # the answers are those without stopping; the answer's own trials are never stopped.
    zero = ((0.4, 0.0), (0.6, 0.0), (0.8, 0.0))
    cut = [early_stop.replay_product(p, o, knee, zero) for o in stability.OUTER]
    assert [a.rank for a in plain] == [c[0] for c in cut]
    assert all(c[3] > 0 and c[2] < a.tokens for a, c in zip(plain, cut, strict=True))
    # a band wider than the curve: nothing is safe to stop
    wide = early_stop.replay_product(p, 1, knee, ((0.4, 1.0), (0.6, 1.0), (0.8, 1.0)))
    assert wide[3] == 0 and wide[2] == plain[0].tokens
