"""The state of one trial's loop (:class:`Run`) and the :class:`Hooks` a variant supplies.

The loop owns the bookkeeping: every validation curve, best score, best checkpoint and the
early-stopping decision live in :class:`Run`. A variant states only its difference through
:class:`Hooks`: what a step trains (nested: a drawn rank), how the adapter starts (EVA), and
which *views* of the adapter are evaluated. A view is named by the rank it evaluates: a plain
trial has one, its whole adapter at ``spec.rank``; a nested run has one per truncation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from rankwise.records import COMPLETE, FAILED, TrialResult, TrialSpec
from rankwise.training.adapter import TrialContext
from rankwise.training.evaluate import grouped, measure

# A view of the adapter: entering it makes the model compute as that view (a no-op for the
# whole adapter, an active-rank mask for a truncation).
View = Callable[[], AbstractContextManager]


@dataclass
class Curve:
    """What the loop keeps of one view: its validation curve and its best checkpoint."""

    val_curve: list[tuple[int, float]] = field(default_factory=list)
    scores: list[tuple[int, dict]] = field(default_factory=list)
    best: tuple[float, int] | None = None  # (objective, step)
    best_scores: dict = field(default_factory=dict)
    best_state: dict | None = None
    best_blocks: list[float] = field(default_factory=list)  # per-block losses at the best
    last_blocks: list[float] = field(default_factory=list)  # ... at the latest evaluation
    own_seconds: float = 0.0  # spent on this view alone: its evaluations (and a nested save)

    def record(self, step, loss: float, scores: dict | None, checkpoint, blocks=()) -> bool:
        """Add a point; keep ``checkpoint()`` (and the per-block losses) if it is the best
        so far (lower is better)."""
        self.val_curve.append((step, loss))
        self.last_blocks = grouped(list(blocks))
        if scores:
            self.scores.append((step, scores))
        if math.isfinite(loss) and (self.best is None or loss < self.best[0]):
            self.best = (loss, step)
            self.best_scores = dict(scores or {})
            self.best_blocks = grouped(list(blocks))
            # The adapter delivered is the best checkpoint, so it reproduces the score.
            self.best_state = checkpoint()
            return True
        return False


@dataclass
class Run:
    """Mutable state of one training run (the lifecycle fills it; hooks read it)."""

    spec: TrialSpec
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    curves: dict[int, Curve] = field(default_factory=dict)  # by view (a rank)
    tokens: int = 0
    step: int = 0
    trainable: int | None = None
    time_limited: bool = False
    early_stopped: bool = False
    cut: object = None  # a rankwise.core.cutoff.Verdict: stopped, it cannot change the answer
    first_step_at: float | None = None
    last_step_at: float | None = None
    started_at: float = field(default_factory=time.perf_counter)
    status: str = COMPLETE
    reason: str = ""
    peak_bytes: int | None = None

    def curve(self, view: int | None = None) -> Curve:
        """The curve of ``view`` (default: the plain trial's, ``spec.rank``)."""
        return self.curves.setdefault(self.spec.rank if view is None else view, Curve())

    def record_eval(self, view: int, loss, scores: dict | None, checkpoint, blocks=()) -> bool:
        """Add a validation point of ``view``: ``loss`` is the objective (lower is better:
        the loss, or 1 - metric); ``scores``, when the task has more than a loss, every
        metric measured (rankwise.core.metrics); ``checkpoint()`` the state to keep if it
        is the view's best."""
        return self.curve(view).record(self.step, loss, scores, checkpoint, blocks)

    def drop_checkpoints(self) -> None:
        for curve in self.curves.values():
            curve.best_state = None

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started_at

    @property
    def step_seconds(self) -> float | None:
        """Seconds per optimizer step, the first (warm-up) step not counted."""
        if not self.first_step_at or self.step < 2:
            return None
        return (self.last_step_at - self.first_step_at) / (self.step - 1)


def trainable_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}


class Hooks:
    """Where a variant of training plugs into the lifecycle; the defaults are a plain trial.

    A variant overrides what differs: :meth:`step` and :meth:`optimizer_step` (what a step
    trains), :meth:`attached` (how the adapter starts), :meth:`views` and :meth:`checkpoint`
    (what is evaluated and kept), :meth:`save` and :meth:`results` (what comes out). The
    nested-rank run (:mod:`rankwise.training.nested`) draws a rank per step and names one view
    per truncation; EVA (:mod:`rankwise.training.eva`) initialises the adapter.
    """

    def attached(self, peft_model, run: Run) -> None:
        """Called once the adapter is on the model, before the first step."""

    def step(self, peft_model, step: int):
        """A context manager around one step's forward and backward passes."""
        return nullcontext()

    def resume(self, peft_model, optimizer, schedule, batches) -> int:
        """Called once the optimizer, schedule and data order exist: the steps already
        trained (a branch starts from its trunk's state there, rankwise.training.branch)."""
        return 0

    def stepped(self, peft_model, step: int, optimizer, schedule, batches) -> None:
        """Called at the end of every step (a trunk saves its state at the branch step)."""

    def optimizer_step(self, peft_model, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def views(self, peft_model, run: Run) -> dict[int, View]:
        """The views of the adapter each evaluation measures: here the whole adapter."""
        return {run.spec.rank: nullcontext}

    def checkpoint(self, peft_model, view: int) -> dict[str, torch.Tensor]:
        """The state kept when ``view`` reaches its best: the trainable parameters."""
        return trainable_state(peft_model)

    def evaluate(self, peft_model, run: Run, ctx: TrialContext) -> None:
        """Measure every view and hand the numbers to the run, which keeps the curves and
        the bests. The loop calls it at each evaluation point; override it only to observe
        (and call it), a variant changes what is measured through :meth:`views`."""
        for name, view in self.views(peft_model, run).items():
            t, blocks = time.perf_counter(), []
            with view():
                loss, scores = measure(peft_model, ctx, run.spec, blocks)
            keep = lambda n=name: self.checkpoint(peft_model, n)  # noqa: E731
            run.record_eval(name, loss, scores, keep, blocks)
            run.curve(name).own_seconds += time.perf_counter() - t

    def save(self, peft_model, run: Run) -> None:
        """Write the best checkpoint as a PEFT adapter folder."""
        best = run.curve().best_state
        if best is None:
            return
        with torch.no_grad():
            named = dict(peft_model.named_parameters())
            for k, v in best.items():
                named[k].copy_(v)
        peft_model.save_pretrained(run.spec.adapter_dir)

    def results(self, run: Run) -> list[TrialResult]:
        return [trial_result(run)]


def trial_result(run: Run, view: int | None = None, **changes) -> TrialResult:
    """The record of a finished run as seen by ``view`` (default: the plain trial's);
    ``changes`` override fields, e.g. a nested rank's key and cost."""
    spec, curve = run.spec, run.curve(view)
    status, reason = run.status, run.reason
    if status == COMPLETE and curve.best is None:  # the one place this rule is written
        status, reason = FAILED, "no finite validation loss"
    wall = run.wall_seconds
    fields = dict(
        key=spec.key,
        rank=spec.rank,
        seed=spec.seed,
        status=status,
        reason=reason,
        kind=spec.kind,
        group=spec.group,
        lora_alpha=spec.lora.lora_alpha,
        best_val_loss=curve.best[0] if curve.best else None,
        best_step=curve.best[1] if curve.best else None,
        final_train_loss=run.train_curve[-1][1] if run.train_curve else None,
        train_curve=list(run.train_curve),
        val_curve=list(curve.val_curve),
        metric=spec.train.metric,
        val_metrics=dict(curve.best_scores),
        val_loss_curve=[(s, m["loss"]) for s, m in curve.scores]
        if spec.train.metric != "loss"
        else [],
        trainable_params=run.trainable,
        steps=run.step,
        train_tokens=run.tokens,
        wall_seconds=wall,
        setup_seconds=(run.first_step_at - run.started_at) if run.first_step_at else 0.0,
        step_seconds=run.step_seconds,
        tokens_per_second=run.tokens / wall if run.tokens else None,
        peak_memory_bytes=run.peak_bytes,
        time_limited=run.time_limited,
        early_stopped=run.early_stopped,
        val_blocks=list(curve.best_blocks),
        branch=spec.branch,
    )
    result = TrialResult(**{**fields, **changes})
    if run.cut is not None and result.status == COMPLETE:
        result = run.cut.apply(result)  # the search is told the prediction, with the evidence
    return result
