"""A trial's learning-rate schedule: stepped after every optimizer step, and, for the schedules
that follow the validation score, after every evaluation.

``linear`` is rankwise's own and has been since the first trial (the parity test against a
plain PEFT loop writes it out): linear warm-up, then HF's linear decay to 0; its warm-up
starts at 1/(warmup+1) of the peak where HF's starts at 0, so no step trains at rate 0.
Every other type is transformers' ``get_scheduler``, called as its Trainer calls it
(``num_warmup_steps``, ``num_training_steps``, ``scheduler_specific_kwargs``), so the rate
at each step is the one the user's own run will have.

Example (the rate of a 10-step cosine trial with 2 warm-up steps):
    >>> import torch
    >>> from rankwise.records import TrainSpec
    >>> opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> s = Schedule(opt, TrainSpec(max_steps=10, warmup_steps=2, lr_scheduler="cosine"))
    >>> seen = []
    >>> for _ in range(4):
    ...     seen.append(round(s.rate(), 3)); opt.step(); s.stepped()
    >>> seen
    [0.0, 0.5, 1.0, 0.962]
"""

from __future__ import annotations

import torch

from rankwise.config.schedules import ON_METRIC
from rankwise.records import TrainSpec

__all__ = ["Schedule", "linear_schedule", "rates", "drift_for"]


def linear_schedule(warmup: int, total: int):
    """rankwise's linear schedule: linear warm-up to the peak, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class Schedule:
    """The schedule of one trial's optimizer (``spec.lr_scheduler`` and its arguments)."""

    def __init__(self, optimizer: torch.optim.Optimizer, tc: TrainSpec):
        self.optimizer, self.name = optimizer, tc.lr_scheduler
        if tc.lr_scheduler == "linear":
            factor = linear_schedule(tc.warmup_steps, tc.max_steps)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            tc.lr_scheduler,
            optimizer,
            num_warmup_steps=tc.warmup_steps,
            num_training_steps=tc.max_steps,
            scheduler_specific_kwargs=dict(tc.lr_scheduler_kwargs),
        )

    @property
    def on_metric(self) -> bool:
        return self.name in ON_METRIC

    def stepped(self) -> None:
        """After an optimizer step (the metric-driven schedules wait for an evaluation)."""
        if not self.on_metric:
            self.scheduler.step()

    def evaluated(self, objective: float) -> None:
        """After an evaluation: the metric-driven schedules step on its objective (lower is
        better: the loss, or 1 - accuracy), as transformers' Trainer steps them on eval_loss."""
        if self.on_metric:
            self.scheduler.step(objective)

    def rate(self) -> float:
        """The learning rate the next optimizer step uses."""
        return float(self.optimizer.param_groups[0]["lr"])


def rates(tc: TrainSpec) -> list[float] | None:
    """The rate of each of the trial's steps as a share of the peak, or None where it is not
    known in advance (greedy may raise it). reduce_lr_on_plateau counts as constant: it
    only ever lowers the rate, so constant is its most learning still to come."""
    if tc.lr_scheduler == "greedy":
        return None
    if tc.lr_scheduler == "reduce_lr_on_plateau":
        return [1.0] * tc.max_steps
    peak = tc.lr or 1.0  # the trial's own: a floor given as min_lr is a rate, not a share
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    schedule, out = Schedule(opt, tc), []
    for _ in range(tc.max_steps):
        out.append(schedule.rate() / peak)
        opt.step()
        schedule.stepped()
    return out


def drift_for(tc: TrainSpec, table) -> tuple[tuple[float, float], ...] | None:
    """``--stop-when-decided``'s table of late gap moves (rankwise.core.cutoff.DRIFT, measured
    under linear decay) as this trial's schedule reads it, or None where it cannot be read.

    A paired gap moves with the training still to come, so each row's fraction of the steps
    moves to where this schedule has as small a share of its summed rate left as linear
    decay has there; never earlier than the row's own (cosine leaves less than linear at
    every fraction, so it keeps the table; constant rates push every row later).

    >>> from rankwise.core.cutoff import DRIFT
    >>> drift_for(TrainSpec(max_steps=100, lr_scheduler="cosine"), DRIFT) == DRIFT
    True
    >>> drift_for(TrainSpec(max_steps=100, lr_scheduler="constant"), DRIFT)
    ((0.62, 0.0418), (0.83, 0.038), (0.96, 0.0111))
    """
    table = tuple(table)
    if tc.lr_scheduler == "linear":
        return table
    mine = rates(tc)
    if mine is None:
        return None
    left, linear = _left(mine), _left(rates(tc.replace(lr_scheduler="linear")))
    n, rows = tc.max_steps, {}
    for fraction, width in table:
        at = min(n, max(1, round(fraction * n)))
        step = next(s for s in range(at, n + 1) if left[s - 1] <= linear[at - 1] + 1e-12)
        if step < n:
            rows[step / n] = max(width, rows.get(step / n, 0.0))
    return tuple(sorted(rows.items()))


def _left(per_step: list[float]) -> list[float]:
    """After each step, the share of the summed rate still to come."""
    total, out, spent = sum(per_step) or 1.0, [], 0.0
    for r in per_step:
        spent += r
        out.append(max(0.0, 1 - spent / total))
    return out
