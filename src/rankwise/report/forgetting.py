"""What the ranks cost the base model, beside their gain (rankwise.training.retain): the
per-rank forgetting, the drift sentence, the ranks ``--max-forgetting`` excluded."""

from __future__ import annotations

from typing import Any

from rankwise.records import SKIPPED, TrialResult

# The recommended rank's drift is worth a sentence when it differs from the best rank's by a
# third of the larger (a ratio of 1.5) and by more than DRIFT_FLOOR nats per retain token.
DRIFT_FLOOR = 0.002


def forgetting_by_rank(trials: list[TrialResult]) -> dict[int, dict[str, Any]]:
    """Mean retain-loss increase (``forgetting``) and KL per rank of the curve, over the
    trials where it was measured, those ``--max-forgetting`` excluded included.

    >>> t = lambda r, f, k: TrialResult(key="", rank=r, seed=0, status="complete",
    ...                                 forgetting=f, forgetting_kl=k)
    >>> forgetting_by_rank([t(4, 0.01, 0.02), t(4, 0.03, 0.04), t(8, 0.05, None)])
    {4: {'forgetting': 0.02, 'forgetting_kl': 0.03, 'n': 2}, 8: {'forgetting': 0.05, 'forgetting_kl': None, 'n': 1}}
    """
    by: dict[int, list[TrialResult]] = {}
    for r in trials:
        if r.forgetting is not None and r.on_curve:
            by.setdefault(r.rank, []).append(r)

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 6) if values else None

    return {
        rank: {
            "forgetting": mean([r.forgetting for r in rs]),
            "forgetting_kl": mean([r.forgetting_kl for r in rs]),
            "n": len(rs),
        }
        for rank, rs in sorted(by.items())
    }


def drift_sentence(by_rank: dict[int, dict], pick: int | None, best: int | None) -> str:
    """The recommended rank's drift against the best rank's, when notably lower or higher.

    >>> by = {4: {"forgetting": 0.012, "forgetting_kl": 0.010},
    ...       64: {"forgetting": 0.034, "forgetting_kl": 0.029}}
    >>> drift_sentence(by, 4, 64)
    'r=4 drifts less from the base model than r=64: retain-loss increase 0.0120 vs 0.0340 nats (KL 0.0100 vs 0.0290)'
    >>> drift_sentence({4: {"forgetting": 0.030}, 64: {"forgetting": 0.034}}, 4, 64)
    ''
    """
    a, b = by_rank.get(pick) if pick else None, by_rank.get(best) if best else None
    if pick == best or not a or not b:
        return ""
    fa, fb = a["forgetting"], b["forgetting"]
    if abs(fa - fb) < max(DRIFT_FLOOR, max(abs(fa), abs(fb)) / 3):
        return ""
    ka, kb = a.get("forgetting_kl"), b.get("forgetting_kl")
    kl = f" (KL {ka:.4f} vs {kb:.4f})" if ka is not None and kb is not None else ""
    return (
        f"r={pick} drifts {'less' if fa < fb else 'more'} from the base model than r={best}: "
        f"retain-loss increase {fa:.4f} vs {fb:.4f} nats{kl}"
    )


def excluded_by_forgetting(trials: list[TrialResult]) -> list[TrialResult]:
    """The trials ``--max-forgetting`` excluded (skipped, with the figure measured)."""
    return [r for r in trials if r.status == SKIPPED and r.forgetting is not None]


def drift_lines(rec, trials: list[TrialResult], limit: float | None) -> list[str]:
    """The drift sentence and the ranks --max-forgetting excluded (those that apply)."""
    said = [drift_sentence(forgetting_by_rank(trials), rec.rank, rec.best_rank)]
    gone = excluded_by_forgetting(trials)
    if gone and limit is not None:
        ranks = ", ".join(f"r={r.rank} ({r.forgetting:.4f})" for r in gone)
        said.append(f"--max-forgetting {limit:g} excluded {ranks}")
    return [s for s in said if s]


def with_drift(reason: str, rec, trials: list[TrialResult], limit: float | None) -> str:
    """The recommendation's reason with the drift sentence and the ranks --max-forgetting
    excluded, placed before its ``stopped:`` clause."""
    extra = "; ".join(drift_lines(rec, trials, limit))
    if not extra:
        return reason
    stopped = f"; stopped: {rec.stop_reason}" if rec.stop_reason else ""
    if stopped and reason.endswith(stopped):
        return f"{reason[: -len(stopped)]}; {extra}{stopped}"
    return f"{reason}; {extra}"
