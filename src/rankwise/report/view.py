"""A run directory read back: the trials, the scores and the recommendation (:class:`RunView`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwise.config import DEFAULT_RANKS
from rankwise.core import metrics
from rankwise.core.criteria import Criterion, recommend
from rankwise.core.scores import RankScore, improvement_share, rank_scores
from rankwise.errors import ConfigError
from rankwise.records import SKIPPED, TrialKind, TrialResult
from rankwise.storage.rundir import RECOMMENDATION_FILE, REPORT_FILE, SUMMARY_FILE  # noqa: F401
from rankwise.storage.store import RunStore

# Every key a recommendation has; recommendation.json may omit the optional ones.
_REC_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "loss": None,
    "best_rank": None,
    "best_loss": None,
    "reason": "",
    "stop_reason": "",
    "criterion": None,
    "base_val_loss": None,
    "strategy": "",
    "lora_config": {},
    "adapter_dir": None,
    "model": "",
    "confidence": None,
    "diagnosis": None,
}


@dataclass(frozen=True)
class RunView:
    """Everything a report shows, read from a run directory."""

    run_dir: Path
    name: str
    options: dict[str, Any]
    results: list[TrialResult]
    running: list[dict[str, Any]]
    scores: list[RankScore]
    recommendation: dict[str, Any]
    finished: bool
    """True once ``recommendation.json`` exists (the search ended and wrote its verdict)."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the data loader recorded: format, record and block counts, seq_len."""
    side: list[TrialResult] = dataclasses.field(default_factory=list)
    """Trials outside the rank curve (learning-rate calibration, co-tuning, the final trial
    of a nested search, other target sets): listed, not pooled into scores."""
    retain: dict[str, Any] | None = None
    """The retain set forgetting is measured on (rankwise.training.retain), or None."""

    def forgetting(self) -> dict[int, dict[str, Any]]:
        """Each rank's mean forgetting over its measured trials (see :func:`forgetting_by_rank`)."""
        return forgetting_by_rank(self.results)

    @property
    def model(self) -> str:
        return str(self.recommendation.get("model") or self.options.get("model") or "")

    @property
    def criterion(self) -> Criterion:
        c = self.recommendation.get("criterion") or {}
        if not isinstance(c, dict):
            c = {}
        return Criterion(
            c.get("kind") or self.options.get("criterion") or "share",
            c.get("threshold", self.options.get("threshold")),
        )

    @property
    def base_loss(self) -> float | None:
        """The base model's val loss (no adapter), when the run measured it."""
        base = next((r for r in self.side if r.kind == TrialKind.BASE and r.ok), None)
        return base.best_val_loss if base else self.recommendation.get("base_val_loss")

    def good_limit(self) -> float | None:
        """The val loss at or below which a rank counts as good as the best (the band of the
        loss plot); None for the knee criterion, which has no such band."""
        best = min((s.mean for s in self.scores if s.ok), default=None)
        c = self.criterion.resolve(self.base_loss)
        if best is None or c.kind == "knee":
            return None
        if c.kind == "share":
            return best + (1 - c.threshold) * max(0.0, self.base_loss - best)
        return best * (1 + c.threshold)

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
        final = _read_recommendation(run_dir)
        if final is None:
            scores = rank_scores(results)
            rec = _provisional(store, results, scores, options, side)
        else:
            scores = [_score_from_dict(s) for s in final.get("scores") or []] or rank_scores(
                results
            )
            rec = final
    finally:
        store.close()
    rec = {**_REC_DEFAULTS, **rec}
    finished = final is not None
    return RunView(
        run_dir, str(name), options, results, running, scores, rec, finished, data, side, retain
    )


def _read_recommendation(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RECOMMENDATION_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _score_from_dict(d: dict[str, Any]) -> RankScore:
    return RankScore(
        int(d["rank"]),
        d.get("mean"),
        float(d.get("se") or 0.0),
        int(d.get("n") or 0),
        str(d.get("status", "")),
        str(d.get("reason", "")),
    )


def _provisional(
    store: RunStore,
    results: list[TrialResult],
    scores: list[RankScore],
    options: dict[str, Any],
    side: list[TrialResult],
) -> dict[str, Any]:
    """The recommendation the trials finished so far support; its LoraConfig is the one
    the recommended rank's trial was built from."""
    criterion = Criterion(options.get("criterion") or "knee", options.get("threshold"))
    base = next((r.best_val_loss for r in side if r.kind == TrialKind.BASE and r.ok), None)
    found, metric = recommend(scores, criterion, base_loss=base), options.get("metric") or "loss"
    if metric != "loss":
        found = dataclasses.replace(found, reason=metrics.reason(found, scores, criterion, metric))
    rec = dataclasses.asdict(found)
    rec["reason"] = with_drift(rec["reason"], found, results, options.get("max_forgetting"))
    lora: dict[str, Any] = {}
    key = next((r.key for r in results if r.ok and r.rank == rec["rank"]), None)
    if key is not None and (spec := store.spec(key)) is not None:
        lora = spec.lora.kwargs()
    return {
        **rec,
        "criterion": {"kind": criterion.kind, "threshold": criterion.threshold},
        "base_val_loss": base,
        "strategy": options.get("strategy", ""),
        "lora_config": lora,
        "model": options.get("model", ""),
    }


def _view(run: str | Path | RunView) -> RunView:
    return run if isinstance(run, RunView) else load_run(run)


# -- forgetting beside the gain (rankwise.training.retain) -----------------------------------
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


def with_drift(reason: str, rec, trials: list[TrialResult], limit: float | None) -> str:
    """The recommendation's reason with the drift sentence and the ranks --max-forgetting
    excluded, placed before its ``stopped:`` clause."""
    said = [drift_sentence(forgetting_by_rank(trials), rec.rank, rec.best_rank)]
    gone = excluded_by_forgetting(trials)
    if gone and limit is not None:
        ranks = ", ".join(f"r={r.rank} ({r.forgetting:.4f})" for r in gone)
        said.append(f"--max-forgetting {limit:g} excluded {ranks}")
    extra = "; ".join(s for s in said if s)
    if not extra:
        return reason
    stopped = f"; stopped: {rec.stop_reason}" if rec.stop_reason else ""
    if stopped and reason.endswith(stopped):
        return f"{reason[: -len(stopped)]}; {extra}{stopped}"
    return f"{reason}; {extra}"
