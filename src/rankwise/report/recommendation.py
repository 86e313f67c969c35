"""recommendation.json: the one function that writes it (:func:`build_document`).

The search calls it once at the end, with what it found; ``show`` and the reports call it
for the provisional answer of a live or interrupted run, from the store alone, with the
run's criterion and its scale. Either way the result is a
:class:`~rankwise.report.document.RecommendationDoc`: the headline, the evidence lines and
every field (the record, the schema and the README's table say what each holds). The
recommendation itself comes from :func:`recommend_run`, the search core's
:func:`~rankwise.core.criteria.recommend` with the reason in the metric's terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from rankwise.config import parse_serve, serve_round_up
from rankwise.core import metrics
from rankwise.core.criteria import Criterion, Recommendation, recommend
from rankwise.core.scores import RankScore, improvement_share
from rankwise.errors import ConfigError
from rankwise.records import TrialResult
from rankwise.report.document import RecommendationDoc, criterion_of
from rankwise.report.forgetting import (
    drift_lines,
    excluded_by_forgetting,
    forgetting_by_rank,
    with_drift,
)
from rankwise.report.words import evidence, headline
from rankwise.storage.rundir import ADAPTER_DIR

__all__ = [
    "TRIAL_KEYS",
    "RecommendationInputs",
    "build_document",
    "recommend_run",
    "criterion_of",
    "max_lora_rank",
]

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
    "forgetting",
    "forgetting_kl",
    "retain_seconds",
)

# The sections of the search's evidence and of the stages after the curve (extras).
SECTIONS = (
    "diagnosis",
    "races",
    "stopped_early",
    "answer_by_step",
    "answer_moved",
    "targets",
    "tuning",
    "final",
    "per_layer",
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
    options: dict[str, Any]
    """The run's flat options (``Options.to_flat()``, as the store keeps them)."""
    name: str
    lr: float | None = None
    lr_record: dict | None = None
    precision: str = ""
    quantization_config: dict | None = None
    labels: list | None = None
    warnings: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    """The evidence sections (:data:`SECTIONS`) and anything else to write beside them."""
    budget: dict = field(default_factory=dict)  # study.session: which budget it holds for
    delivered: bool = True
    """Whether the adapter is in ``adapter/`` (a provisional answer's is not yet)."""


def trainable_params(trials: list[TrialResult]) -> dict[int, int]:
    """Trainable parameters per rank, from its completed trials."""
    return {t.rank: t.trainable_params for t in trials if t.ok and t.trainable_params}


def recommend_run(
    scores: list[RankScore],
    criterion: Criterion,
    metric: str = "loss",
    stop_reason: str = "",
    base_loss: float | None = None,
    params: dict[int, int] | None = None,
) -> Recommendation:
    """The search core's recommendation, its reason in the metric's terms."""
    rec = recommend(scores, criterion, stop_reason, base_loss, params)
    if metric != "loss":
        rec = dataclasses.replace(rec, reason=metrics.reason(rec, scores, criterion, metric))
    return rec


def build_document(x: RecommendationInputs) -> RecommendationDoc:
    """The document: the one writer of recommendation.json (and of a provisional answer)."""
    o, rec = x.options, x.rec
    metric = o.get("metric") or "loss"
    params = trainable_params(x.trials)
    drift = drift_lines(rec, x.trials, o.get("max_forgetting"))
    cap = served[1] if (served := parse_serve(o.get("serve"))) else None
    said = headline(rec, x.scores, metric, params, cap, _moved(x.extras))
    fields = {f.name for f in dataclasses.fields(RecommendationDoc)}
    core = {k: v for k, v in asdict(rec).items() if k != "criterion"}
    sections = {**x.extras}
    values = {
        **core,
        "headline": said,
        "evidence": tuple(evidence(rec, x.scores, x.criterion, metric, params, drift, cap)),
        "reason": with_drift(rec.reason, rec, x.trials, o.get("max_forgetting")),
        "criterion": {
            "kind": x.criterion.kind,
            "threshold": x.criterion.threshold,
            "scale": x.criterion.scale,
        },
        "forgetting": _forgetting(x),
        "strategy": o.get("strategy") or "",
        "lora_config": x.lora,
        "adapter_dir": ADAPTER_DIR if x.lora and x.delivered else None,
        "model": o.get("model") or "",
        "name": x.name,
        "learning_rate": {"lr": x.lr, "calibrated": x.lr_record is not None, **(x.lr_record or {})},
        "budget": {
            "max_steps": o.get("max_steps"),
            "batch_size": o.get("batch_size"),
            "seq_len": o.get("seq_len"),
            **x.budget,
        },
        "trials": tuple({k: getattr(t, k) for k in TRIAL_KEYS} for t in x.trials),
        "scores": tuple(
            _scores(x.scores, x.base_loss, rec.best_loss, forgetting_by_rank(x.trials))
        ),
        "alpha_policy": o.get("alpha_policy") or "",
        "precision": x.precision,
        "task": o.get("task"),
        "quantize": o.get("quantize"),
        "quantization_config": x.quantization_config,
        **_metric_fields(metric, o.get("task"), rec, x.labels),
        "serve": _serve_fields(o, x.lora),
        "recipe": _recipe_fields(o),
        "warnings": tuple(x.warnings),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in sections.items()},
    }
    known = {k: v for k, v in values.items() if k in fields}
    extra = {k: v for k, v in values.items() if k not in fields}
    return RecommendationDoc(**known, extra=extra)


def _moved(extras: dict) -> str:
    """The verdict of the last stage after the curve that changed the answer ("" if none)."""
    for key in ("per_layer", "tuning", "targets"):
        s = extras.get(key)
        if not isinstance(s, dict):
            continue
        picked = (s.get("pick") or {}).get("targets") if key == "targets" else None
        if s.get("changed") or picked not in (None, "as searched"):
            return str(s.get("verdict") or "")
    return ""


def _scores(
    scores: list[RankScore], base: float | None, best: float | None, drift: dict | None = None
) -> list[dict]:
    def row(s: RankScore) -> dict:
        d = {k: v for k, v in asdict(s).items() if k not in ("noise", "label")}
        if best is not None:
            d["share"] = improvement_share(s.mean, base, best) if s.ok else None
        if drift:
            d |= {k: (drift.get(s.rank) or {}).get(k) for k in ("forgetting", "forgetting_kl")}
        return d

    return [row(s) for s in scores]


def _metric_fields(metric: str, task: str | None, rec: Recommendation, labels) -> dict:
    """A classifier's labels, and for a task metric the recommendation in its terms."""
    out: dict = {"metric": metric}
    if task == "seq-cls":
        out["labels"] = labels
    if metric != "loss":
        out["metric_value"] = metrics.shown(metric, rec.loss)
        out["best_metric_value"] = metrics.shown(metric, rec.best_loss)
    return out


def max_lora_rank(lora: dict) -> int:
    """The --max-lora-rank vLLM needs for an adapter: its largest rank (r or a rank_pattern
    value), rounded up to a rank vLLM loads.

    >>> max_lora_rank({"r": 8, "rank_pattern": {"layers.0.q_proj": 20}})
    32
    """
    ranks = [lora["r"], *(lora.get("rank_pattern") or {}).values()]
    return serve_round_up(max(ranks))


def _serve_fields(options: dict, lora: dict | None) -> dict | None:
    """``serve``: the server the answer is for and the --max-lora-rank to start it with."""
    served = parse_serve(options.get("serve"))
    if served is None:
        return None
    cap = served[1]
    need = max_lora_rank(lora) if lora else None
    out = {"engine": "vllm", "max_lora_rank": need, "serve_cap": cap}
    if need is not None:
        out["command"] = f"vllm serve {options.get('model')} --enable-lora --max-lora-rank {need}"
    if need is not None and need > cap:
        out["warning"] = f"the adapter needs --max-lora-rank {need}, above --serve {cap}"
    return out


def _forgetting(x: RecommendationInputs) -> dict | None:
    """What the ranks cost the base model (rankwise.training.retain): the retain-loss
    increase and KL per rank, the recommended and the best rank's, and the ranks
    ``--max-forgetting`` excluded; None when no trial was measured."""
    by_rank = forgetting_by_rank(x.trials)
    if not by_rank:
        return None
    retain = x.options.get("retain")
    return {
        "retain": "self-sampled" if retain is None else retain,
        "max_forgetting": x.options.get("max_forgetting"),
        "by_rank": [{"rank": r, **v} for r, v in by_rank.items()],
        "recommended": by_rank.get(x.rec.rank),
        "best": by_rank.get(x.rec.best_rank),
        "excluded": [
            {"rank": r.rank, "seed": r.seed, "forgetting": r.forgetting}
            for r in excluded_by_forgetting(x.trials)
        ],
    }


def _recipe_fields(options: dict) -> dict | None:
    """``recipe``: the --from file the search read, and which tool's config it is (None
    for the tool when the file can no longer be read)."""
    path = options.get("recipe")
    if not path:
        return None
    from rankwise.io.recipes import detect_tool, load_recipe_file

    try:
        tool = detect_tool(load_recipe_file(path), path)
    except (ConfigError, OSError):
        tool = None
    return {"path": str(path), "tool": tool}
