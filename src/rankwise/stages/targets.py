"""Comparing target-module sets (``--compare-targets``): one rank curve per set, judged alike."""

from __future__ import annotations

import dataclasses

from rankwise.core.metrics import describe, shown
from rankwise.core.scores import paired_scores, rank_scores
from rankwise.errors import ConfigError
from rankwise.records import TrialKind, TrialResult, Variant
from rankwise.stages.base import Answer, StageContext, StageOutcome

# -- target sets ------------------------------------------------------------------------------
_ATTENTION = ("attn", "attention")


_MLP = ("mlp", "feed_forward", "ffn")


def target_set(runner, name: str) -> list[str]:
    """``target_modules`` of a named or explicit set, checked against the model."""
    from rankwise.io.models import check_targets, linear_module_names

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


class CompareTargets:
    """``--compare-targets``: one ladder per target set, the fewest parameters that hold."""

    name = "targets"

    def applies(self, opts, answer: Answer) -> bool:
        return bool(opts.search.compare_targets) and answer.rec.rank is not None

    def run(self, ctx: StageContext, answer: Answer) -> StageOutcome:
        return compare_targets(ctx.runner, ctx.make_ladder, ctx.drive, ctx.judge, answer)


def compare_targets(runner, make_ladder, drive, judge, answer: Answer) -> StageOutcome:
    """A ladder per target set (``make_ladder()`` builds one, ``drive(ladder, variant)`` runs
    it); the answer is the fewest trainable parameters whose score is as good as the overall
    best's (``judge(score, best)``: the search's criterion and the noise, paired by seed)."""
    rec, lora, source = answer.rec, answer.lora, answer.source
    sets = {"as searched": (lora["target_modules"], source)}
    for name in runner.opts.search.compare_targets:
        targets, ladder = _ladder_for(runner, make_ladder, drive, name)
        sets[name] = (targets, ladder.results)
    groups = {
        f"{name}/r{r.rank}": [t for t in results if t.rank == r.rank]
        for name, (_, results) in sets.items()
        for r in results
    }
    paired = paired_scores(groups)  # every set at every rank, paired by seed
    points = []  # (params, score, set name)
    for name, (_, results) in sets.items():
        for score in rank_scores(results):
            if score.ok:
                points.append((_params(results, score.rank), paired[f"{name}/r{score.rank}"], name))
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
        return StageOutcome(CompareTargets.name, section, answer)
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
    return StageOutcome(CompareTargets.name, section, Answer(rec, lora, results))
