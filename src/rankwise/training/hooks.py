"""The state of one trial's loop (:class:`Run`) and the :class:`Hooks` a variant supplies."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from rankwise.records import COMPLETE, FAILED, TrialResult, TrialSpec
from rankwise.training.adapter import TrialContext, _is_seq_cls
from rankwise.training.evaluate import validation_loss, validation_scores


# -- the one training loop and its hooks ------------------------------------------------------
@dataclass
class Run:
    """Mutable state of one training run (the lifecycle fills it; hooks read it)."""

    spec: TrialSpec
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    best: tuple[float, int] | None = None
    best_state: dict | None = None
    tokens: int = 0
    step: int = 0
    trainable: int | None = None
    time_limited: bool = False
    early_stopped: bool = False
    first_step_at: float | None = None
    last_step_at: float | None = None
    started_at: float = field(default_factory=time.perf_counter)
    status: str = COMPLETE
    reason: str = ""
    peak_bytes: int | None = None
    scores: list[tuple[int, dict]] = field(default_factory=list)
    best_scores: dict = field(default_factory=dict)

    def record_eval(self, peft_model, loss: float, scores: dict | None = None) -> bool:
        """Add a validation point; keep the adapter's state if it is the best so far.

        ``loss`` is the objective (lower is better: the loss, or 1 - metric); ``scores``,
        when the task has more than a loss, every metric measured (rankwise.search.metrics)."""
        self.val_curve.append((self.step, loss))
        if scores:
            self.scores.append((self.step, scores))
        if math.isfinite(loss) and (self.best is None or loss < self.best[0]):
            self.best = (loss, self.step)
            self.best_scores = dict(scores or {})
            # The adapter delivered is the best checkpoint, so it reproduces the score.
            self.best_state = trainable_state(peft_model)
            return True
        return False

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

    The nested-rank run (:mod:`rankwise.training.nested`) overrides them to draw a rank per step,
    evaluate every truncation and save one adapter per rank.
    """

    def attached(self, peft_model, run: Run) -> None:
        """Called once the adapter is on the model, before the first step."""

    def step(self, peft_model, step: int):
        """A context manager around one step's forward and backward passes."""
        return nullcontext()

    def optimizer_step(self, peft_model, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def evaluate(self, peft_model, run: Run, ctx: TrialContext) -> None:
        if not _is_seq_cls(run.spec):
            run.record_eval(peft_model, validation_loss(peft_model, ctx, run.spec))
            return
        from rankwise.search.metrics import objective

        scores = validation_scores(peft_model, ctx, run.spec)
        run.record_eval(peft_model, objective(scores, run.spec.train.metric), scores)

    def save(self, peft_model, run: Run) -> None:
        """Write the best checkpoint as a PEFT adapter folder."""
        if run.best_state is None:
            return
        with torch.no_grad():
            named = dict(peft_model.named_parameters())
            for k, v in run.best_state.items():
                named[k].copy_(v)
        peft_model.save_pretrained(run.spec.adapter_dir)

    def results(self, run: Run) -> list[TrialResult]:
        return [trial_result(run)]


def trial_result(run: Run, **changes) -> TrialResult:
    """The record of a finished run (``changes`` override fields, e.g. for nested ranks)."""
    spec = run.spec
    status, reason = run.status, run.reason
    if status == COMPLETE and run.best is None:
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
        best_val_loss=run.best[0] if run.best else None,
        best_step=run.best[1] if run.best else None,
        final_train_loss=run.train_curve[-1][1] if run.train_curve else None,
        train_curve=list(run.train_curve),
        val_curve=list(run.val_curve),
        metric=spec.train.metric,
        val_metrics=dict(run.best_scores),
        val_loss_curve=[(s, m["loss"]) for s, m in run.scores]
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
    )
    return TrialResult(**{**fields, **changes})
