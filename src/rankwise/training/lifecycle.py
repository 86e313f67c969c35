"""One trial lifecycle: attach a fresh adapter → train → evaluate → keep the best → detach.

``run_trial(spec) -> TrialResult`` is a function of a serialisable
:class:`~rankwise.records.TrialSpec`; the loaded model and token blocks are a
per-process cache (:class:`TrialContext`), so the same call works in-process (the
search passes its context) or on a remote worker (which loads them from the spec).
Every training run of rankwise goes through :func:`run_lifecycle`: ordinary trials,
the nested-rank run (:mod:`rankwise.training.nested` plugs in through :class:`Hooks`) and the
timing runs of ``estimate --calibrate``.

Fairness: every rank sees the same token blocks in the same order (a generator
seeded with ``spec.train.seed``), the same schedule, steps and evaluation points, and
the adapter is initialised after ``torch.manual_seed(spec.train.seed)`` (``--seed`` + the seed index).

The base model is left exactly as it was (:func:`attached`): the modules PEFT wrapped
are put back, every base parameter the adapter made trainable (biases under
``bias="all"|"lora_only"``, ``modules_to_save``) and every base weight an init rewrote
(PiSSA, OLoRA) is restored bit for bit, and the train/eval modes and gradients are the
caller's again — also when injection or training fails half-way.

The loop owns the bookkeeping (:class:`Run`): each evaluated view's curve and best
checkpoint, and early stopping (:func:`_stalled`); a variant supplies only its difference
through :class:`Hooks`.

The loss of an optimizer step is the sum of the token losses of its micro-batches
divided by the number of loss tokens in all of them (transformers'
``num_items_in_batch``), so ``grad_accum=2 × batch 4`` is the same update as ``batch 8``
even when masks leave different numbers of loss tokens per micro-batch.
A classifier (``spec.model["task"] == "seq-cls"``) has one label per block instead of one
per token (:mod:`rankwise.training.classify`); its evaluations measure loss, accuracy and macro-F1,
and the trial is scored by the one ``spec.train.metric`` names (:mod:`rankwise.core.metrics`).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable

import torch

from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, FAILED, OUT_OF_MEMORY, TrialResult, TrialSpec
from rankwise.training.adapter import TrialContext, _is_seq_cls, _warm_start, attached
from rankwise.training.evaluate import _autocast, _Batches, _loss_items, _token_loss
from rankwise.training.hooks import Hooks, Run
from rankwise.training.neftune import neftune
from rankwise.training.resources import PeakMemory
from rankwise.training.schedule import Schedule

Progress = Callable[[int, int, float], None]
# (step, max_steps, val loss, per-block losses) -> a Verdict to stop, or None (search.cutoff)
Cutoff = Callable[[int, int, float, list], object]


def run_lifecycle(
    spec: TrialSpec,
    ctx: TrialContext,
    hooks: Hooks | None = None,
    progress: Progress | None = None,
    cutoff: Cutoff | None = None,
) -> list[TrialResult]:
    """Attach → train → evaluate → keep the best → save → detach. Failures (OOM, NaN,
    errors) become failed results; the base model is restored in every case.

    ``cutoff`` (``--stop-when-decided``, :mod:`rankwise.core.cutoff`): asked after each
    evaluation whether the trial can no longer change the search's answer; it then stops
    there and reports the predicted final loss."""
    hooks = hooks or Hooks()
    run = Run(spec)
    peak = PeakMemory(ctx.device)
    try:
        with peak, attached(ctx.model, spec) as peft_model:
            if spec.train.init_adapter:
                _warm_start(peft_model, spec.train.init_adapter)
            hooks.attached(peft_model, run)
            # Counted after the hook: a data-driven init (EVA) may change every module's rank.
            run.trainable = peft_model.get_nb_trainable_parameters()[0]
            with neftune(peft_model, spec.train.neftune_alpha):
                _fit(peft_model, run, ctx, hooks, progress, cutoff)
            if spec.adapter_dir:
                hooks.save(peft_model, run)
    except ConfigError:  # a bad pattern: the user's to fix, every trial would fail alike
        raise
    except Exception as exc:  # a failed trial is a record, not the end of the search
        run.status, run.reason = FAILED, failure_reason(exc, peak)
    finally:
        run.drop_checkpoints()
        if run.status != COMPLETE or ctx.device.startswith("cuda"):
            # A full collection costs ~0.5 s with a model loaded; refcounting frees a normal
            # trial's tensors, so collect only where memory must come back now.
            gc.collect()
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    run.peak_bytes = int(peak.bytes) if peak.bytes else None
    return hooks.results(run)


def _fit(
    peft_model,
    run: Run,
    ctx: TrialContext,
    hooks: Hooks,
    progress: Progress | None,
    cutoff: Cutoff | None = None,
):
    tc = run.spec.train
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = Schedule(opt, tc)
    batches = _Batches(ctx.data.train_ids.shape[0], tc.batch_size, tc.seed)
    loss_fn = _loss_fn(run.spec)
    done = hooks.resume(peft_model, opt, sched, batches)  # a branch: its trunk's steps
    peft_model.train()
    for step in range(done + 1, tc.max_steps + 1):
        with hooks.step(peft_model, step):
            loss, tokens = _train_step(peft_model, batches, ctx, tc, loss_fn)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        hooks.optimizer_step(peft_model, opt)
        sched.stepped()
        opt.zero_grad(set_to_none=True)
        run.step, run.tokens = step, run.tokens + tokens
        run.train_curve.append((step, loss))
        run.first_step_at = run.first_step_at or time.perf_counter()
        run.last_step_at = time.perf_counter()
        over = tc.max_trial_time is not None and run.wall_seconds > tc.max_trial_time
        evaluated = step % tc.eval_every == 0 or step == tc.max_steps or over
        if evaluated:
            hooks.evaluate(peft_model, run, ctx)
            sched.evaluated(_latest_objective(run))
        if progress:
            progress(step, tc.max_steps, loss)
        hooks.stepped(peft_model, step, opt, sched, batches)  # a trunk saves its state
        if over and step < tc.max_steps:
            run.time_limited = True
            break
        if evaluated and step < tc.max_steps and _stalled(run, tc):
            run.early_stopped = True
            break
        if evaluated and cutoff is not None and step < tc.max_steps:
            curve = run.curve()
            run.cut = cutoff(step, tc.max_steps, curve.val_curve[-1][1], curve.last_blocks)
            if run.cut is not None:
                break


def _latest_objective(run: Run) -> float:
    """The objective of the evaluation just made, for a schedule that follows it: the whole
    adapter's (a nested run's largest view, every truncation's training shares its rate)."""
    return run.curves[max(run.curves)].val_curve[-1][1]


def _stalled(run: Run, tc) -> bool:
    """Early stopping over every evaluated view: stop once none of them has improved for
    ``early_stopping_patience`` evaluations (a plain trial has one view, so this is
    :func:`_patience_spent` of its curve).

    A nested run keeps training while any truncation still improves: its ranks peak at
    different steps (a small truncation can plateau while a larger one still gains, or a
    larger one overfit first), so stopping at the first stalled one, or watching r_max
    alone, would cut some ranks' curves short of their best and bias the rank comparison.
    Each rank keeps its own best checkpoint, so training on past one rank's best costs it
    nothing but compute.
    """
    curves = run.curves.values()
    return bool(curves) and all(_patience_spent(c.val_curve, tc) for c in curves)


def _patience_spent(val: list[tuple[int, float]], tc) -> bool:
    """Early stopping (as transformers' EarlyStoppingCallback): the last
    ``early_stopping_patience`` evaluations did not beat the best before them by more than
    ``early_stopping_threshold``.

    Example:
        >>> from rankwise.records import TrainSpec
        >>> tc = TrainSpec(early_stopping_patience=2)
        >>> _patience_spent([(10, 3.0), (20, 2.9), (30, 2.95), (40, 2.91)], tc)
        True
        >>> _patience_spent([(10, 3.0), (20, 2.9), (30, 2.95), (40, 2.89)], tc)
        False
    """
    n = tc.early_stopping_patience
    if not n or len(val) <= n:
        return False
    before = min(loss for _, loss in val[:-n])
    recent = min(loss for _, loss in val[-n:])
    return not (math.isfinite(before) and recent < before - tc.early_stopping_threshold)


def _loss_fn(spec: TrialSpec):
    """(model, ids, labels) -> (summed loss, loss terms) for the spec's task."""
    if _is_seq_cls(spec):
        from rankwise.training.classify import class_loss

        return class_loss
    return _token_loss


def _train_step(
    model, batches: _Batches, ctx: TrialContext, tc, loss_fn=_token_loss
) -> tuple[float, int]:
    """Forward/backward over ``grad_accum`` micro-batches, weighted by loss tokens.

    Returns (the step's mean loss per loss token, tokens processed)."""
    data = ctx.data
    micro = [batches.next() for _ in range(tc.grad_accum)]
    n_loss = sum(_loss_items(data.train_labels[idx]) for idx in micro)
    total, tokens = 0.0, 0
    for idx in micro:
        x, y = data.train_ids[idx].to(ctx.device), data.train_labels[idx].to(ctx.device)
        with _autocast(ctx.device, tc.autocast):
            loss_sum, _ = loss_fn(model, x, y)
        (loss_sum / max(n_loss, 1)).backward()
        total += float(loss_sum.detach())
        tokens += x.numel()
    return total / max(n_loss, 1), tokens


def failure_reason(exc: BaseException, peak: PeakMemory) -> str:
    """The recorded reason of a failed trial: out of memory, unstable, or the error."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return f"{OUT_OF_MEMORY} (peak {peak.poll()} bytes)"
    if isinstance(exc, FloatingPointError):
        return f"unstable: {exc}"
    return f"{type(exc).__name__}: {exc}"
