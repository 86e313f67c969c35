"""recommendation.json: the one document that says what a search recommends, and why.

Written once at the end of a search (:func:`write_recommendation`) from plain inputs; read
back by ``show``, ``report`` and ``export``. Its keys are the public schema: add, never
rename.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rankwise.config import serve_round_up
from rankwise.core import metrics
from rankwise.core.criteria import Criterion, Recommendation
from rankwise.core.scores import RankScore, improvement_share
from rankwise.records import TrialResult
from rankwise.report.view import excluded_by_forgetting, forgetting_by_rank, with_drift
from rankwise.storage.rundir import ADAPTER_DIR

__all__ = ["TRIAL_KEYS", "RecommendationInputs", "recommendation_doc", "max_lora_rank"]

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
    budget: dict = field(default_factory=dict)  # run.setup.apply_budget: which budget it holds for


def recommendation_doc(x: RecommendationInputs) -> dict:
    """The document as a dict (JSON-ready)."""
    o, rec = x.opts, x.rec
    return {
        **asdict(rec),
        "reason": with_drift(rec.reason, rec, x.trials, o.search.max_forgetting),
        "forgetting": _forgetting(x),
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
            **x.budget,
        },
        "trials": [{k: getattr(t, k) for k in TRIAL_KEYS} for t in x.trials],
        "scores": _scores(x.scores, x.base_loss, rec.best_loss, forgetting_by_rank(x.trials)),
        "alpha_policy": o.lora.alpha_policy,
        "precision": x.precision,
        "task": o.model.task,
        "quantize": o.model.quantize,
        "quantization_config": x.quantization_config,
        **_metric_fields(o, rec, x.labels),
        **_serve_fields(o, x.lora),
        **_recipe_fields(o),
        "warnings": x.warnings,
        **x.extras,
    }


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


def max_lora_rank(lora: dict) -> int:
    """The --max-lora-rank vLLM needs for an adapter: its largest rank (r or a rank_pattern
    value), rounded up to a rank vLLM loads.

    >>> max_lora_rank({"r": 8, "rank_pattern": {"layers.0.q_proj": 20}})
    32
    """
    ranks = [lora["r"], *(lora.get("rank_pattern") or {}).values()]
    return serve_round_up(max(ranks))


def _serve_fields(opts, lora: dict | None) -> dict:
    """``serve``: the server the answer is for and the --max-lora-rank to start it with."""
    if not opts.search.serve:
        return {}
    cap = opts.search.max_lora_rank
    need = max_lora_rank(lora) if lora else None
    out = {"engine": "vllm", "max_lora_rank": need, "serve_cap": cap}
    if need is not None:
        out["command"] = f"vllm serve {opts.model.model} --enable-lora --max-lora-rank {need}"
    if need is not None and need > cap:
        out["warning"] = f"the adapter needs --max-lora-rank {need}, above --serve {cap}"
    return {"serve": out}


def _forgetting(x: RecommendationInputs) -> dict | None:
    """What the ranks cost the base model (rankwise.training.retain): the retain-loss
    increase and KL per rank, the recommended and the best rank's, and the ranks
    ``--max-forgetting`` excluded; None when no trial was measured."""
    by_rank = forgetting_by_rank(x.trials)
    if not by_rank:
        return None
    retain = x.opts.data.retain
    return {
        "retain": "self-sampled" if retain is None else retain,
        "max_forgetting": x.opts.search.max_forgetting,
        "by_rank": [{"rank": r, **v} for r, v in by_rank.items()],
        "recommended": by_rank.get(x.rec.rank),
        "best": by_rank.get(x.rec.best_rank),
        "excluded": [
            {"rank": r.rank, "seed": r.seed, "forgetting": r.forgetting}
            for r in excluded_by_forgetting(x.trials)
        ],
    }


def _recipe_fields(opts) -> dict:
    """``recipe``: the --from file the search read, and which tool's config it is."""
    if not opts.run.recipe:
        return {}
    from rankwise.io.recipes import detect_tool, load_recipe_file

    tool = detect_tool(load_recipe_file(opts.run.recipe), opts.run.recipe)
    return {"recipe": {"path": str(opts.run.recipe), "tool": tool}}
