"""The stages after the rank curve, behind one protocol.

A stage receives the answer so far (:class:`Answer`: the recommendation, its LoraConfig and
the trials that hold the adapter to deliver) and what it needs to train trials
(:class:`StageContext`), and returns a :class:`StageOutcome`: its evidence (a section of
recommendation.json under the stage's ``name``) and the answer, changed or not. The study
runs the stages in order; each may change the answer, and says so in words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rankwise.core.criteria import Recommendation
from rankwise.core.scores import RankScore
from rankwise.records import TrialResult

__all__ = ["Answer", "StageContext", "StageOutcome", "Stage"]


@dataclass(frozen=True)
class Answer:
    """The search's answer at some point of the pipeline."""

    rec: Recommendation
    lora: dict | None
    """The ``LoraConfig`` keywords of the adapter to deliver."""
    source: list[TrialResult]
    """The trials the delivered adapter comes from (the best of them at ``rec.rank``)."""


@dataclass(frozen=True)
class StageContext:
    """What a stage may use: the trial runner, the one judge, and the loop."""

    runner: Any
    """A :class:`~rankwise.run.runner.TrialRunner`: specs, budgets, running, recording."""
    judge: Callable[[RankScore, RankScore], bool]
    """Whether a score is as good as another: the search's criterion and the noise."""
    drive: Callable[..., Any]
    """``drive(strategy, variant)``: ask/run/tell until the strategy is done."""
    make_ladder: Callable[[], Any]
    """A fresh ladder with the search's settings."""
    curve: Any
    """The strategy that produced the rank curve (its results and stop reason)."""


@dataclass(frozen=True)
class StageOutcome:
    """A stage's evidence and the answer after it."""

    name: str
    section: dict
    answer: Answer


class Stage(Protocol):
    """One step after the curve. ``applies`` decides from the options and the answer."""

    name: str

    def applies(self, opts, answer: Answer) -> bool: ...

    def run(self, ctx: StageContext, answer: Answer) -> StageOutcome: ...
