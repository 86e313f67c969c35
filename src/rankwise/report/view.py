"""A run directory read back: the trials, the scores and the recommendation (:class:`RunView`).

The recommendation is a :class:`~rankwise.report.document.RecommendationDoc`: the search's
recommendation.json once it has finished, else the provisional answer the trials so far
support, made by the same writer (:func:`~rankwise.report.recommendation.build_document`)
with the run's criterion and its scale.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwise.config import DEFAULT_RANKS, parse_serve
from rankwise.core.criteria import Criterion
from rankwise.core.eta import TimeLeft, clock_seconds
from rankwise.core.scores import RankScore, improvement_share, rank_scores
from rankwise.records import TrialKind, TrialResult
from rankwise.report.document import RecommendationDoc, read_document
from rankwise.report.forgetting import (  # noqa: F401  (the names the reports import from here)
    drift_sentence,
    excluded_by_forgetting,
    forgetting_by_rank,
    with_drift,
)
from rankwise.report.recommendation import (
    RecommendationInputs,
    build_document,
    criterion_of,
    recommend_run,
    trainable_params,
)
from rankwise.report.words import evidence, headline
from rankwise.storage.rundir import RECOMMENDATION_FILE, REPORT_FILE, SUMMARY_FILE  # noqa: F401
from rankwise.storage.store import RunStore


@dataclass(frozen=True)
class RunView:
    """Everything a report shows, read from a run directory."""

    run_dir: Path
    name: str
    options: dict[str, Any]
    results: list[TrialResult]
    running: list[dict[str, Any]]
    scores: list[RankScore]
    recommendation: RecommendationDoc
    finished: bool
    """True once ``recommendation.json`` exists (the search ended and wrote its verdict)."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the data loader recorded: format, record and block counts, seq_len."""
    side: list[TrialResult] = dataclasses.field(default_factory=list)
    """Trials outside the rank curve (learning-rate calibration, co-tuning, the final trial
    of a nested search, other target sets): listed, not pooled into scores."""
    retain: dict[str, Any] | None = None
    """The retain set forgetting is measured on (rankwise.training.retain), or None."""
    time_left: float | None = None
    """Seconds the unfinished search may still take at most (:mod:`rankwise.core.eta`, as its
    progress line says); None once finished, or before a trial has finished."""

    def forgetting(self) -> dict[int, dict[str, Any]]:
        """Each rank's mean forgetting over its measured trials (see :func:`forgetting_by_rank`)."""
        return forgetting_by_rank(self.results)

    @property
    def model(self) -> str:
        return str(self.recommendation.model or self.options.get("model") or "")

    @property
    def criterion(self) -> Criterion:
        """The run's criterion, its scale included, as the document records it."""
        return self.recommendation.run_criterion(self.options)

    @property
    def base_loss(self) -> float | None:
        """The base model's val loss (no adapter), when the run measured it."""
        base = next((r for r in self.side if r.kind == TrialKind.BASE and r.ok), None)
        return base.best_val_loss if base else self.recommendation.base_loss

    def good_limit(self) -> float | None:
        """The val loss at or below which a rank counts as good as the best (the band of the
        loss plot): the best plus the criterion's margin; None for the knee criterion,
        which has no such band."""
        ok = [s for s in self.scores if s.ok]
        c = self.criterion.resolve(self.base_loss)
        if not ok or c.kind == "knee":
            return None
        best = min(ok, key=lambda s: (s.mean, s.rank))
        return best.mean + c.margin(best, best, ok, self.base_loss)

    def share(self, loss: float | None) -> float | None:
        """A loss's share of the improvement over the base model that the best rank made."""
        best = min((s.mean for s in self.scores if s.ok), default=None)
        if loss is None or best is None:
            return None
        return improvement_share(loss, self.base_loss, best)

    @property
    def metric(self) -> str:
        """What the scores hold: ``loss``, or ``accuracy``/``f1`` as ``1 - metric``."""
        return str(self.options.get("metric") or "loss")

    @property
    def status(self) -> str:
        if self.finished:
            return "complete"
        if self.running:
            return f"in progress ({len(self.running)} trial(s) running)"
        return "in progress (or interrupted: no recommendation.json yet)"

    def ranks(self) -> list[int]:
        """Candidate and tried ranks, ascending: the x axis of every per-rank plot."""
        tried = {r.rank for r in self.results} | {int(t["rank"]) for t in self.running}
        return sorted(tried | set(self.options.get("ranks") or [])) or list(DEFAULT_RANKS)


def load_run(run_dir: str | Path) -> RunView:
    """Read a run directory: its trials, options and (final or provisional) recommendation."""
    run_dir = Path(run_dir)
    store = RunStore(run_dir, readonly=True)
    try:
        options = store.get_meta("options") or {}
        name = store.get_meta("name") or options.get("name") or run_dir.name
        everything, running = store.results(), store.running()
        # A trial a parallel search ran ahead and never needed is listed, not on the curve.
        curve = [r.on_curve and not r.extra.get("speculative") for r in everything]
        results = [r for r, c in zip(everything, curve, strict=True) if c]
        side = [r for r, c in zip(everything, curve, strict=True) if not c]
        data = store.get_meta("data") or {}
        retain = store.get_meta("retain")
        path = run_dir / RECOMMENDATION_FILE
        final = read_document(path) if path.exists() else None
        left = None
        if final is None:
            doc = _provisional(store, results, options, side, str(name), data)
            scores = rank_scores(results)
            left = _time_left(store.get_meta("time_left"), store, everything, running, options)
        else:
            doc = _with_words(final, results, options)
            scores = final.rank_scores() or rank_scores(results)
    finally:
        store.close()
    finished = final is not None
    return RunView(
        run_dir, str(name), options, results, running, scores, doc, finished, data, side, retain,
        left,
    )  # fmt: skip


def _time_left(plan: dict | None, store: RunStore, trials: list[TrialResult], running, options):
    """The search's own estimate (Study._time_left stored its plan), from the store: the
    trials settled so far on the search's clock, and how long the running ones have run."""
    if not plan:
        return None
    left, previous = TimeLeft(plan["trials"], plan["trial_tokens"]), None
    times = store.times()
    for r in trials:
        if r.kind != TrialKind.BASE and r.key not in plan.get("uncounted", ()):
            started, finished = times.get(r.key, (None, None))
            own = r.wall_seconds + r.retain_seconds
            if started is None or finished is None:
                left.tell(r.train_tokens, own)
                continue
            left.tell(r.train_tokens, clock_seconds(started, finished, previous, own))
            previous = finished
    now = time.time()
    ran = [now - t["started_at"] for t in running]
    budget = options.get("max_time")
    spent = sum(r.wall_seconds for r in trials) + sum(ran)
    return left.estimate(ran, None if budget is None else budget - spent)


def _with_words(doc: RecommendationDoc, results: list[TrialResult], options) -> RecommendationDoc:
    """A version-1 document with the headline and evidence it lacks, from the store's trials
    (their noise model pairs the differences, as the search did)."""
    if doc.headline:
        return doc
    scores = rank_scores(results) if results else doc.rank_scores()
    rec, metric = doc.recommendation(), doc.metric or options.get("metric") or "loss"
    params = trainable_params(results)
    criterion = doc.run_criterion(options)
    cap = served[1] if (served := parse_serve(options.get("serve"))) else None
    said = headline(rec, scores, metric, params, cap)
    lines = evidence(rec, scores, criterion, metric, params, serve_cap=cap)
    return dataclasses.replace(doc, headline=said, evidence=tuple(lines))


def _provisional(
    store: RunStore,
    results: list[TrialResult],
    options: dict[str, Any],
    side: list[TrialResult],
    name: str,
    data: dict[str, Any],
) -> RecommendationDoc:
    """The recommendation the trials finished so far support, by the search's own writer
    and criterion (its scale included); its LoraConfig is the one the recommended rank's
    trial was built from."""
    criterion = criterion_of(options)
    base = next((r.best_val_loss for r in side if r.kind == TrialKind.BASE and r.ok), None)
    scores, metric = rank_scores(results), options.get("metric") or "loss"
    rec = recommend_run(scores, criterion, metric, "", base, trainable_params(results))
    lora = None
    key = next((r.key for r in results if r.ok and r.rank == rec.rank), None)
    if key is not None and (spec := store.spec(key)) is not None:
        lora = spec.lora.kwargs()
    calibration = store.get_meta("lr_calibration")
    lr = options.get("lr") or (calibration or {}).get("lr")
    x = RecommendationInputs(
        rec, lora, results, scores, criterion, base, options, name,
        lr=lr, lr_record=calibration if options.get("lr") is None else None,
        labels=data.get("labels"), delivered=False,
    )  # fmt: skip
    return build_document(x)


def _view(run: str | Path | RunView) -> RunView:
    return run if isinstance(run, RunView) else load_run(run)
