"""The learning rate, when ``--lr`` is not given: short runs at each candidate rate.

Every rank of the curve trains with the one calibrated rate: under a fixed ``lora_alpha``
the best rate is nearly rank-independent ("LoRA Without Regret", 2025), so one rate keeps
the comparison about capacity, not step size. The calibration is recorded with the run
(``lr_calibration`` in the store, ``learning_rate`` in recommendation.json).
"""

from __future__ import annotations

import math

from rankwise.core import metrics
from rankwise.errors import ConfigError
from rankwise.records import TrialKind, TrialResult, Variant
from rankwise.run.runner import TrialRunner

__all__ = ["MAX_LR_EXTENSIONS", "calibrate_lr"]

# Extra calibration rates tried past each edge of --lr-candidates, at most: with the default
# half-decade spacing, 3 steps reach 30x beyond the range.
MAX_LR_EXTENSIONS = 3


def _fmt_rate(lr: float | None) -> str:
    return "?" if lr is None else f"{lr:g}"


def calibrate_lr(runner: TrialRunner, rank: int, meta_key: str = "lr_calibration") -> dict:
    """Short runs at each candidate rate at ``rank``; the lowest best val loss wins.

    A best rate at an edge of the candidates says the optimum may lie beyond it, so the
    range is extended that way (by the candidates' own spacing) until the best is
    interior — its neighbours both worse — or a rate fails (diverges), at most
    ``MAX_LR_EXTENSIONS`` times per side. Returns the record (also stored as ``meta_key``):
    the rate, the bracket, every loss.
    """
    tc, progress = runner.opts.train, runner.progress
    steps = max(1, math.ceil(tc.max_steps * tc.lr_calibration_fraction))
    rates = sorted(tc.lr_candidates)
    progress.log(
        f"calibrating the learning rate at r={rank}: {len(rates)} runs of "
        f"{steps} steps ({', '.join(f'{lr:g}' for lr in rates)})"
    )
    tried = {lr: _lr_trial(runner, rank, lr, steps) for lr in rates}
    if not any(r.ok for r in tried.values()):
        raise ConfigError(
            "--lr-candidates: every calibration run failed ("
            + "; ".join(f"{lr:g}: {r.reason}" for lr, r in tried.items())
            + "); give --lr or other candidates"
        )
    extended = _extend(runner, rank, steps, tried)
    best = min((r.best_val_loss, lr) for lr, r in tried.items() if r.ok)[1]
    order = sorted(tried)
    i = order.index(best)
    bracket = [order[i - 1] if i > 0 else None, order[i + 1] if i + 1 < len(order) else None]
    record = {
        "rank": rank,
        "steps": steps,
        "lr": best,
        "bracket": bracket,
        "extended": extended,
        "losses": {f"{lr:g}": tried[lr].best_val_loss for lr in order},
    }
    runner.store.set_meta(meta_key, record)
    edge = "" if None not in bracket else " (at the edge of what could be tried)"
    progress.log(
        f"learning rate: {best:g} (best {metrics.label(tc.metric)} at r={rank} in {steps} "
        f"steps; bracket {_fmt_rate(bracket[0])}..{_fmt_rate(bracket[1])}{edge})"
    )
    return record


def _lr_trial(runner: TrialRunner, rank: int, lr: float, steps: int) -> TrialResult:
    variant = Variant(TrialKind.CALIBRATION, f"lr-{lr:g}", lr=lr, max_steps=steps)
    return runner.run(rank, 0, variant)


def _extend(runner, rank: int, steps: int, tried: dict[float, TrialResult]) -> list[float]:
    """Try rates beyond the edge while the edge rate is the best (see calibrate_lr)."""
    extended: list[float] = []
    for side in (+1, -1):
        for _ in range(MAX_LR_EXTENSIONS):
            order = sorted(tried)
            best = min((r.best_val_loss, lr) for lr, r in tried.items() if r.ok)[1]
            edge = order[-1] if side > 0 else order[0]
            if best != edge or len(order) < 2:
                break
            inner = order[-2] if side > 0 else order[1]
            lr = float(f"{edge * edge / inner:.3g}")  # one more step of the same spacing
            runner.progress.log(f"best rate {edge:g} is at the edge: trying {lr:g}")
            tried[lr] = _lr_trial(runner, rank, lr, steps)
            extended.append(lr)
    return extended
