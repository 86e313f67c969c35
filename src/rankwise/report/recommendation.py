"""recommendation.json: the one document that says what a search recommends, and why.

Written once at the end of a search (:func:`write_recommendation`) from plain inputs; read
back by ``show``, ``report`` and ``export``. Its keys are the public schema: add, never
rename.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rankwise.records import TrialResult
from rankwise.run.rundir import ADAPTER_DIR
from rankwise.search import metrics
from rankwise.search.criteria import Criterion, Recommendation
from rankwise.search.scores import RankScore, improvement_share

__all__ = ["TRIAL_KEYS", "RecommendationInputs", "recommendation_doc"]

# The fields of each trial the document lists (the store holds the rest).
TRIAL_KEYS = (
    "rank",
    "seed",
    "status",
    "reason",
    "best_val_loss",
    "best_step",
    "lora_alpha",
    "trainable_params",
    "peak_memory_bytes",
    "tokens_per_second",
    "wall_seconds",
    "time_limited",
    "early_stopped",
    "extra",
    "predicted",
)


@dataclass
class RecommendationInputs:
    """Everything the document is made of, named."""

    rec: Recommendation
    lora: dict | None
    trials: list[TrialResult]
    scores: list[RankScore]
    criterion: Criterion
    base_loss: float | None
    opts: Any
    name: str
    lr: float | None
    lr_record: dict | None
    precision: str
    quantization_config: dict | None
    labels: list | None = None
    warnings: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)


def recommendation_doc(x: RecommendationInputs) -> dict:
    """The document as a dict (JSON-ready)."""
    o, rec = x.opts, x.rec
    return {
        **asdict(rec),
        "criterion": {
            "kind": x.criterion.kind,
            "threshold": x.criterion.threshold,
            "scale": x.criterion.scale,
        },
        "base_val_loss": x.base_loss,
        "strategy": o.search.strategy,
        "lora_config": x.lora,
        "adapter_dir": ADAPTER_DIR if x.lora else None,
        "model": o.model.model,
        "name": x.name,
        "learning_rate": {"lr": x.lr, "calibrated": x.lr_record is not None, **(x.lr_record or {})},
        "budget": {
            "max_steps": o.train.max_steps,
            "batch_size": o.train.batch_size,
            "seq_len": o.data.seq_len,
            "lr": x.lr,
        },
        "trials": [{k: getattr(t, k) for k in TRIAL_KEYS} for t in x.trials],
        "scores": _scores(x.scores, x.base_loss, rec.best_loss),
        "alpha_policy": o.lora.alpha_policy,
        "precision": x.precision,
        "task": o.model.task,
        "quantize": o.model.quantize,
        "quantization_config": x.quantization_config,
        **_metric_fields(o, rec, x.labels),
        "warnings": x.warnings,
        **x.extras,
    }


def _scores(scores: list[RankScore], base: float | None, best: float | None) -> list[dict]:
    def row(s: RankScore) -> dict:
        d = {k: v for k, v in asdict(s).items() if k not in ("noise", "label")}
        if best is not None:
            d["share"] = improvement_share(s.mean, base, best) if s.ok else None
        return d

    return [row(s) for s in scores]


def _metric_fields(opts, rec: Recommendation, labels: list | None) -> dict:
    """The metric, and for a classifier its labels and the recommendation in its terms."""
    metric = opts.train.metric
    out: dict = {"metric": metric}
    if opts.model.task == "seq-cls":
        out["labels"] = labels
    if metric != "loss":
        out["metric_value"] = metrics.shown(metric, rec.loss)
        out["best_metric_value"] = metrics.shown(metric, rec.best_loss)
    return out
