"""After the rank curve: co-tuning dropout/alpha around the choice, and comparing target sets.

Both run ordinary trials of their own kind and group (see :class:`~rankwise.run.runner.Variant`),
so they are stored, resumable and listed like any other trial, and both may change the
answer — which they then say in words, with the numbers. They run trials through a
:class:`~rankwise.run.runner.TrialRunner`; the loop that drives a ladder is passed in.
"""

from __future__ import annotations

import dataclasses

from rankwise.core.metrics import describe
from rankwise.core.scores import paired_scores
from rankwise.records import TrialKind, TrialResult, Variant
from rankwise.stages.base import Answer, StageContext, StageOutcome

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


class Cotune:
    """``--tune dropout,alpha``: a small grid around the chosen rank (and the next one up)."""

    name = "tuning"

    def applies(self, opts, answer: Answer) -> bool:
        return bool(opts.search.tune) and answer.rec.rank is not None

    def run(self, ctx: StageContext, answer: Answer) -> StageOutcome:
        return cotune(ctx.runner, ctx.judge, answer)


def cotune(runner, judge, answer: Answer) -> StageOutcome:
    """A small grid around the chosen rank (and the next one up), judged paired by seed."""
    rec, lora, source = answer.rec, answer.lora, answer.source
    rows, results = _train_variants(runner, rec.rank, source)
    ok = [row for row in rows if row["best_val_loss"] is not None]
    best = min(ok, key=lambda row: row["best_val_loss"])
    current = next(
        row for row in rows if row["rank"] == rec.rank and row["variant"] == "as searched"
    )
    metric = runner.opts.train.metric
    gain = (current["best_val_loss"] - best["best_val_loss"]) / abs(current["best_val_loss"])
    scores = paired_scores(
        {
            "current": _trials(results, current, len(source)),
            "best": _trials(results, best, len(source)),
        }
    )
    as_good = judge(scores["current"], scores["best"])
    if best is current or as_good:
        verdict = (
            f"co-tuning does not change the choice: best variant {best['variant']} at "
            f"r={best['rank']} ({describe(metric, best['best_val_loss'])}) does not beat "
            f"r={rec.rank} as searched ({describe(metric, current['best_val_loss'])}) under the "
            "search's criterion"
        )
        section = {"rows": rows, "verdict": verdict, "changed": False}
        return StageOutcome(Cotune.name, section, answer)
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
    section = {"rows": rows, "verdict": verdict, "changed": True}
    return StageOutcome(Cotune.name, section, Answer(rec, lora, picked))


def _train_variants(runner, rank: int, source: list[TrialResult]):
    """Every variant at the chosen rank and the next one up: (rows, all results)."""
    tried = sorted({r.rank for r in source if r.ok})
    rows, results = [], list(source)
    for r_ in [rank] + [r for r in tried if r > rank][:1]:
        base = min((r for r in source if r.rank == r_ and r.ok), key=lambda r: r.best_val_loss)
        rows.append({"rank": r_, "variant": "as searched", "best_val_loss": base.best_val_loss,
                     "key": base.key})  # fmt: skip
        for label, variant in _tune_variants(runner, r_):
            r = runner.run(r_, 0, variant)
            results.append(r)
            rows.append({"rank": r_, "variant": label, "best_val_loss": r.best_val_loss,
                         "status": r.status, "key": r.key})  # fmt: skip
    return rows, results


def _trials(results: list[TrialResult], row: dict, searched: int) -> list[TrialResult]:
    """The trials behind a row: every seed of the rank as searched, or the variant's trial."""
    if row["variant"] == "as searched":  # every seed of the curve at that rank
        return [r for r in results[:searched] if r.rank == row["rank"] and r.ok]
    return [r for r in results if r.key == row["key"]]
