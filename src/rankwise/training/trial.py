"""A trial as a pure function of its spec: ``run_trial(TrialSpec) -> TrialResult``."""

from __future__ import annotations

from rankwise.records import TrialResult, TrialSpec
from rankwise.training.adapter import TrialContext
from rankwise.training.lifecycle import Cutoff, Progress, run_lifecycle


def run_trial(
    spec: TrialSpec,
    ctx: TrialContext | None = None,
    progress: Progress | None = None,
    cutoff: Cutoff | None = None,
) -> TrialResult:
    """Train and evaluate one adapter: the plain lifecycle, with EVA's data-driven
    initialisation when the spec asks for ``init_lora_weights="eva"``, or as a trunk or a
    branch of one (``spec.branch``, ``--branch-at``: rankwise.training.branch)."""
    ctx = ctx or TrialContext.for_spec(spec)
    hooks = None
    if spec.lora.init_lora_weights == "eva":
        from rankwise.training.eva import EvaInit

        hooks = EvaInit(ctx)
    elif spec.branch is not None:  # --branch-at: a trunk saves its state, a branch starts there
        from rankwise.training.branch import Branching

        hooks = Branching(spec)
    return run_lifecycle(spec, ctx, hooks, progress, cutoff)[0]
