"""What a trial is scored by: the validation loss, or a task metric (accuracy, macro-F1).

The search core compares "lower is better" numbers: it pools
``TrialResult.best_val_loss`` over seeds and asks whether one rank beats another by
``--tolerance`` of the worse value (:func:`rankwise.core.scores.beats`). So that it needs no
change, a trial scored by ``--metric accuracy`` or ``f1`` records the **error**
``1 − metric`` as its curve value:

- ``TrialResult.metric`` names what ``val_curve`` and ``best_val_loss`` hold: ``loss``
  (validation cross-entropy), or ``accuracy``/``f1`` stored as ``1 − metric``;
- ``TrialResult.val_metrics`` holds every metric at the best checkpoint as users read them
  (loss, accuracy, macro-F1; higher accuracy is better);
- ``TrialResult.val_loss_curve`` holds the validation cross-entropy at every evaluation when
  the curve holds an error: the diagnosis reads it, because overfitting, instability and
  "still improving" are judged on the loss (an error rate moves in steps of one example and
  cannot be set against the training loss).

Everything a user reads (progress lines, summary, report, ``show``) converts back with
:func:`shown`. A perfect score is recorded as the error ``1e-6``, not 0: the search divides
by the previous rank's value to report a relative gain. ``--criterion`` then judges the error: with 10% error,
``0.05`` asks a larger rank to bring it under 9.5%.

Macro-F1 is the unweighted mean of the per-class F1 over the classes present in the true
or the predicted labels (scikit-learn's ``f1_score(average="macro")``).

Example:
    >>> import torch
    >>> pred, true = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    >>> accuracy(pred, true), round(macro_f1(pred, true), 4)
    (0.75, 0.7778)
    >>> error = objective({"loss": 0.6, "accuracy": 0.75}, "accuracy")
    >>> error, shown("accuracy", error), describe("accuracy", error)
    (0.25, 0.75, 'accuracy 0.7500')
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "METRICS",
    "NAMES",
    "objective",
    "shown",
    "describe",
    "label",
    "accuracy",
    "macro_f1",
    "reason",
]

METRICS = ("loss", "accuracy", "f1")
ERROR_FLOOR = 1e-6  # shown as 1.0000; keeps the search's relative gains finite
NAMES = {"loss": "val loss", "accuracy": "accuracy", "f1": "macro-F1"}


def objective(scores: dict[str, float], metric: str) -> float:
    """The value the search minimises: the loss, or the error ``1 − metric``."""
    return scores["loss"] if metric == "loss" else max(1.0 - scores[metric], ERROR_FLOOR)


def shown(metric: str, value: float | None) -> float | None:
    """An objective value as users read it (the loss, or the metric itself)."""
    if value is None or metric == "loss":
        return value
    return 1.0 - value


def label(metric: str) -> str:
    return NAMES.get(metric, metric)


def describe(metric: str, value: float | None, se: float = 0.0, n: int = 1) -> str:
    """``'accuracy 0.9000'`` (``± se`` with several seeds) for an objective value."""
    if value is None:
        return f"{label(metric)} -"
    spread = f" ± {se:.4f}" if n > 1 else ""
    return f"{label(metric)} {shown(metric, value):.4f}{spread}"


# -- computed in torch (tensors of class indices) ------------------------------------------
def accuracy(pred, true) -> float:
    """Share of examples whose predicted class is the true one."""
    return float((pred == true).float().mean()) if true.numel() else 0.0


def macro_f1(pred, true) -> float:
    """Unweighted mean F1 over the classes present in ``true`` or ``pred``."""
    if not true.numel():
        return 0.0
    k = int(max(pred.max(), true.max())) + 1
    hits = true[pred == true].bincount(minlength=k).float()
    predicted = pred.bincount(minlength=k).float()
    actual = true.bincount(minlength=k).float()
    present = (predicted + actual) > 0
    f1 = 2 * hits[present] / (predicted[present] + actual[present])
    return float(f1.mean())


# -- the recommendation in the user's terms ------------------------------------------------
def reason(rec: Any, scores: list, criterion: Any, metric: str) -> str:
    """``Recommendation.reason`` (written by rankwise.search in loss terms) in metric terms."""
    from rankwise.core.scores import noise

    by_rank = {s.rank: s for s in scores if s.ok}
    pick, best = by_rank.get(rec.rank), by_rank.get(rec.best_rank)
    if pick is None or best is None:
        return rec.reason
    if pick.rank == best.rank:
        why = f"r={pick.rank}: best {describe(metric, pick.mean, pick.se, pick.n)}"
    else:
        why = (
            f"r={pick.rank}: {describe(metric, pick.mean, pick.se, pick.n)} (best "
            f"{shown(metric, best.mean):.4f} at r={best.rank}; as good by the criterion, "
            f"{criterion.describe()}{' or the noise' if noise(pick, best) else ''}); "
            f"{best.rank / pick.rank:.1f}x fewer trainable params"
        )
    if rec.stop_reason:
        why += f"; stopped: {rec.stop_reason}"
    return why
