"""After the rank curve: co-tuning dropout/alpha around the choice, and comparing target sets.

Both run ordinary trials of their own kind and group (see :class:`~rankwise.runner.Variant`),
so they are stored, resumable and listed like any other trial, and both may change the
answer — which they then say in words, with the numbers. They run trials through a
:class:`~rankwise.runner.TrialRunner`; the loop that drives a ladder is passed in.
"""

from __future__ import annotations

import dataclasses

from .config import ConfigError
from .metrics import describe, shown
from .records import TrialKind, TrialResult
from .runner import Variant
from .search import RankScore, Recommendation, rank_scores

__all__ = ["cotune", "compare_targets", "target_set"]

DROPOUTS = (0.0, 0.05, 0.1)
ALPHA_RATIOS = (1, 2, 4)


# -- co-tuning --------------------------------------------------------------------------------
def _tune_variants(runner, rank: int):
    """(label, variant) for the one-factor-at-a-time grid at ``rank``."""
    lo, out = runner.opts.lora, []
    if "dropout" in runner.opts.search.tune:
        out += [(f"dropout={d:g}", (("lora_dropout", d),)) for d in DROPOUTS if d != lo.dropout]
    if "alpha" in runner.opts.search.tune:
        out += [
            (f"alpha={k}r", (("lora_alpha", float(k * rank)), ("use_rslora", False)))
            for k in ALPHA_RATIOS
        ]
        out.append((f"rslora alpha={lo.alpha:g}", (("lora_alpha", lo.alpha), ("use_rslora", True))))
    return [(label, Variant(TrialKind.COTUNE, f"tune:{label}", lora=lora)) for label, lora in out]


def _score(loss: float, rank: int) -> RankScore:
    return RankScore(rank, loss, 0.0, 1, "complete")


def cotune(runner, judge, rec: Recommendation, lora: dict, source: list[TrialResult]):
    """A small grid around the chosen rank (and the next one up). Returns
    (section, recommendation, lora_config, results holding the delivered adapter)."""
    tried = sorted({r.rank for r in source if r.ok})
    ranks = [rec.rank] + [r for r in tried if r > rec.rank][:1]
    rows, results = [], list(source)
    for rank in ranks:
        base = min((r for r in source if r.rank == rank and r.ok), key=lambda r: r.best_val_loss)
        rows.append(
            {
                "rank": rank,
                "variant": "as searched",
                "best_val_loss": base.best_val_loss,
                "key": base.key,
            }
        )
        for label, variant in _tune_variants(runner, rank):
            r = runner.run(rank, 0, variant)
            results.append(r)
            rows.append(
                {
                    "rank": rank,
                    "variant": label,
                    "best_val_loss": r.best_val_loss,
                    "status": r.status,
                    "key": r.key,
                }
            )
    ok = [row for row in rows if row["best_val_loss"] is not None]
    best = min(ok, key=lambda row: row["best_val_loss"])
    current = next(
        row for row in rows if row["rank"] == rec.rank and row["variant"] == "as searched"
    )
    metric = runner.opts.train.metric
    gain = (current["best_val_loss"] - best["best_val_loss"]) / abs(current["best_val_loss"])
    as_good = judge(
        _score(current["best_val_loss"], current["rank"]),
        _score(best["best_val_loss"], best["rank"]),
    )
    if best is current or as_good:
        verdict = (
            f"co-tuning does not change the choice: best variant {best['variant']} at "
            f"r={best['rank']} ({describe(metric, best['best_val_loss'])}) does not beat "
            f"r={rec.rank} as searched ({describe(metric, current['best_val_loss'])}) under the "
            "search's criterion"
        )
        return {"rows": rows, "verdict": verdict, "changed": False}, rec, lora, source
    overrides = next(
        v for lab, v in _tune_variants(runner, best["rank"]) if lab == best["variant"]
    ).lora
    lora = runner.lora_config(best["rank"], overrides=overrides)
    below = f"{gain:.1%} below" if metric == "loss" else f"with {gain:.1%} less error than"
    verdict = (
        f"co-tuning changes the choice: r={best['rank']} with {best['variant']} reaches "
        f"{describe(metric, best['best_val_loss'])}, {below} r={rec.rank} as searched "
        f"({describe(metric, current['best_val_loss'])})"
    )
    picked = [r for r in results if r.key == best["key"]]
    rec = dataclasses.replace(
        rec, rank=best["rank"], loss=best["best_val_loss"], reason=f"{rec.reason}; {verdict}"
    )
    return {"rows": rows, "verdict": verdict, "changed": True}, rec, lora, picked


# -- target sets ------------------------------------------------------------------------------
_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn")


def target_set(runner, name: str) -> list[str]:
    """``target_modules`` of a named or explicit set, checked against the model."""
    from .models import check_targets, linear_module_names

    model = runner.ctx.model
    if name in ("attention", "mlp"):
        keys = _ATTENTION if name == "attention" else _MLP
        names = [
            n
            for n in linear_module_names(model)
            if any(k in part for part in n.split(".")[:-1] for k in keys)
        ]
        if not names:
            raise ConfigError(f"--compare-targets: the model has no {name} linear modules")
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    else:
        targets = [t for t in name.split("+") if t]
    check_targets(model, targets, runner.ranks)
    return targets


def _ladder_for(runner, make_ladder, drive, name: str):
    targets = target_set(runner, name)
    peft_targets = "all-linear" if targets == ["all-linear"] else targets
    lora = (("target_modules", peft_targets),)
    ladder = make_ladder()
    drive(ladder, Variant(TrialKind.TARGETS, f"targets={name}", lora=lora))
    return targets, ladder


def _params(results: list[TrialResult], rank: int) -> int:
    """What PEFT counted for a trial at ``rank`` (recorded with every trial)."""
    return next(t.trainable_params for t in results if t.rank == rank and t.ok)


def compare_targets(
    runner, make_ladder, drive, judge, rec: Recommendation, lora: dict, source: list[TrialResult]
):
    """A ladder per target set (``make_ladder()`` builds one, ``drive(ladder, variant)`` runs
    it); the answer is the fewest trainable parameters whose score is as good as the overall
    best's (``judge(score, best)``: the search's criterion and the noise)."""
    sets = {"as searched": (lora["target_modules"], source)}
    for name in runner.opts.search.compare_targets:
        targets, ladder = _ladder_for(runner, make_ladder, drive, name)
        sets[name] = (targets, ladder.results)
    points = []  # (params, score, set name)
    for name, (_, results) in sets.items():
        for score in rank_scores(results):
            if score.ok:
                points.append((_params(results, score.rank), score, name))
    best = min(points, key=lambda p: p[1].mean)
    good = [p for p in points if judge(p[1], best[1])]
    params, score, name = min(good, key=lambda p: (p[0], p[1].mean))
    rows = [
        {"targets": n, "rank": s.rank, "trainable_params": p, "mean": s.mean, "se": s.se, "n": s.n}
        for p, s, n in sorted(points, key=lambda p: (p[2], p[1].rank))
    ]
    metric = runner.opts.train.metric
    verdict = (
        f"best per trainable parameter: {name} at r={score.rank} ({params:,} params, "
        f"{describe(metric, score.mean)}; best overall {shown(metric, best[1].mean):.4f} with "
        f"{best[2]} at r={best[1].rank})"
    )
    section = {"rows": rows, "verdict": verdict, "pick": {"targets": name, "rank": score.rank}}
    if name == "as searched":
        return section, rec, lora, source
    targets, results = sets[name]
    lora = runner.lora_config(score.rank, targets)
    rec = dataclasses.replace(
        rec,
        rank=score.rank,
        loss=score.mean,
        best_rank=best[1].rank,
        best_loss=best[1].mean,
        reason=f"{verdict}; with the searched targets: {rec.reason}",
    )
    return section, rec, lora, results
