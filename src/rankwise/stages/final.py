"""The final trial after a nested curve (``--strategy nested --final``): an ordinary trial at
the curve's choice, from a fresh adapter or warm-started from the nested truncation
(``--final-init``), for ``--final-steps`` of the steps. Of it and the truncation, the better
is delivered, with the matching ``lora_alpha``.
"""

from __future__ import annotations

import dataclasses

from rankwise.records import TrialKind, Variant
from rankwise.stages.base import Answer, StageContext, StageOutcome

__all__ = ["FinalTrial"]


class FinalTrial:
    name = "final"

    def applies(self, opts, answer: Answer) -> bool:
        s = opts.search
        return s.strategy == "nested" and bool(s.final) and answer.rec.rank is not None

    def run(self, ctx: StageContext, answer: Answer) -> StageOutcome:
        runner, rec = ctx.runner, answer.rec
        s = runner.opts.search
        point = next(
            (r for r in ctx.curve.results if r.rank == rec.rank and r.ok and r.seed == 0), None
        )
        steps = max(1, round(s.final_steps * runner.opts.train.max_steps))
        variant = Variant(TrialKind.FINAL, "final", max_steps=steps)
        if s.final_init == "nested" and point is not None:
            variant = dataclasses.replace(
                variant,
                lora=(("lora_alpha", point.lora_alpha),),
                init_adapter=str(runner.dir.trial_adapter(point.key)),
            )
        final = runner.run(rec.rank, 0, variant)
        section = {
            "rank": rec.rank,
            "status": final.status,
            "init": "nested" if variant.init_adapter else "fresh",
            "steps": steps,
            "train_tokens": final.train_tokens,
            "final_val_loss": final.best_val_loss,
            "nested_val_loss": point.best_val_loss if point else None,
        }
        if final.ok and point:
            section["difference"] = final.best_val_loss - point.best_val_loss
        if not final.ok:
            return StageOutcome(self.name, section, answer)
        if point is not None and point.best_val_loss < final.best_val_loss:
            # The truncation is better than the trial that started from it: deliver it.
            section["delivered"] = "nested"
            overrides = (("lora_alpha", point.lora_alpha),)
            lora = runner.lora_config(rec.rank, overrides=overrides)
            return StageOutcome(self.name, section, Answer(rec, lora, [point]))
        section["delivered"] = "final"
        lora = runner.lora_config(rec.rank, overrides=variant.lora) if variant.lora else answer.lora
        return StageOutcome(self.name, section, Answer(rec, lora, [final]))
