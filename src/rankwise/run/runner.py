"""Running and recording one trial of a search: its spec, its budget check, its record.

A :class:`~rankwise.records.Variant` describes trials that depart from the run's settings (a calibration
learning rate, a co-tuned dropout or alpha, another target set, the final trial of a
nested curve); its :class:`~rankwise.records.TrialKind` says which, and its ``group``
labels it. :class:`TrialRunner` turns ``(rank, seed, variant)`` into a
:class:`~rankwise.records.TrialSpec`, skips it when a budget excludes it, runs it through
the one trial lifecycle, diagnoses it, and writes it to the store the moment it ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from rankwise.analysis.diagnose import diagnose
from rankwise.config import Options, format_bytes
from rankwise.records import (
    MAIN,
    SKIPPED,
    LoraSpec,
    TrainSpec,
    TrialKind,
    TrialResult,
    TrialSpec,
    Variant,
)
from rankwise.run import branching
from rankwise.storage.rundir import RunDir

__all__ = ["TrialRunner"]


class TrialRunner:
    """Runs one trial at a time for a search and records it (the Study's loop calls it)."""

    def __init__(self, opts: Options, run_dir: RunDir, store, ctx, progress, tracker, **state):
        self.opts, self.dir, self.store, self.ctx = opts, run_dir, store, ctx
        self.progress, self.tracker = progress, tracker
        self.ranks: list[int] = state["ranks"]
        self.targets: list[str] = state["targets"]
        # target_parameters as PEFT takes them (``experts`` resolved; rankwise.io.experts)
        self.parameters: list[str] | None = state.get("parameters")
        self.lr: float | None = state.get("lr")
        self.autocast: str | None = state.get("autocast")
        self.baseline_bytes: int = state["baseline_bytes"]
        self.elapsed: Callable[[], float] = state["elapsed"]
        if state.get("execute"):  # where trials train: this process unless an executor says
            self.execute = state["execute"]
        # What a trial will start from, besides the weights (None: this process, measured).
        self.resident: Callable[[str], int | None] | None = state.get("resident")
        self.nested = state.get("nested")  # where a nested-rank run trains (an executor's)
        self.nested_scale = state.get("nested_scale")  # the LoRA scale of each drawn rank
        self.forgetting = state.get("forgetting")  # rankwise.training.retain.Forgetting, or None

    # -- specs ----------------------------------------------------------------------------
    def lora_spec(self, rank: int, target_modules: list[str] | str | None = None) -> LoraSpec:
        lo = self.opts.lora
        targets = target_modules or lo.target_modules
        if targets in (["all-linear"], "all-linear"):
            targets = "all-linear"
        elif targets is None:
            targets = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
        return LoraSpec(
            r=rank,
            lora_alpha=lo.alpha_for(rank),
            target_modules=targets,
            lora_dropout=lo.dropout,
            bias=lo.bias,
            use_rslora=lo.alpha_policy == "rslora",
            use_dora=lo.use_dora,
            target_parameters=self.parameters,
        )

    def lora_config(self, rank: int, target_modules=None, overrides: tuple = ()) -> dict:
        """The recommended ``LoraConfig`` kwargs (what the delivered adapter was trained with)."""
        spec = self.lora_spec(rank, target_modules).replace(**dict(overrides))
        from rankwise.training.adapter import task_type

        # shown only when set
        optional = ("rank_pattern", "alpha_pattern", "eva_config", "target_parameters")
        kw = {k: v for k, v in spec.kwargs().items() if k not in optional or v}
        return {**kw, "task_type": task_type(self.opts.model.task)}

    def train_spec(self, seed: int, variant: Variant) -> TrainSpec:
        tc = self.opts.train
        fields = {f.name for f in dataclasses.fields(TrainSpec)}
        train = {k: v for k, v in dataclasses.asdict(tc).items() if k in fields}
        return TrainSpec(
            **{
                **train,
                "seed": tc.seed + seed,
                "lr": variant.lr or self.lr,
                "max_steps": variant.max_steps or tc.max_steps,
                "max_trial_time": self.opts.search.max_trial_time,
                "autocast": self.autocast,
                "init_adapter": variant.init_adapter,
                "lr_scheduler_kwargs": tc.schedule_kwargs(),
            }
        )

    def spec_for(self, rank: int, seed: int, variant: Variant = MAIN) -> TrialSpec:
        """The trial's spec; with ``--branch-at``, a trial of the rank curve is its seed's
        trunk or a branch of it (:func:`rankwise.run.branching.plan`)."""
        key = f"{variant.group}/r{rank}-s{seed}" if variant.group else f"r{rank}-s{seed}"
        spec = TrialSpec(
            key=key,
            rank=rank,
            seed=seed,
            kind=variant.kind,
            group=variant.group,
            lora=self.lora_spec(rank).replace(**dict(variant.lora)),
            train=self.train_spec(seed, variant),
            model=dataclasses.asdict(self.opts.model),
            data_dir=str(self.dir.data),
            adapter_dir=str(self.dir.trial_adapter(key)),
        )
        return branching.plan(spec, self.dir, self.opts.search.branch_at)

    # -- budgets --------------------------------------------------------------------------
    def predict(self, rank: int, variant: Variant = MAIN) -> dict:
        """What a trial at ``rank`` will cost, before it runs (rankwise.estimate).

        The memory baseline is what will be resident besides the model's weights when the
        trial starts: where trials train in this process, its memory now
        (:func:`~rankwise.training.resources.resident_bytes`: the data, the retain set, the
        tokenizer, the touched weights; freed heap returned first, as the trial's own
        measurement does) less the predicted weights; on Ray, what the workers reported
        after their last trial (the executor's ``resident_bytes``), the driver's baseline
        until one has. On CPU never below the process before the model was loaded (the
        Study's)."""
        from rankwise.analysis.estimate import estimate
        from rankwise.training import resources

        lora = self.lora_spec(rank).replace(**dict(variant.lora))
        e = estimate(
            self.ctx.model,
            ranks=[rank],
            target_modules=lora.target_modules,
            target_parameters=lora.target_parameters,
            use_dora=lora.use_dora,
            batch_size=self.opts.train.batch_size,
            seq_len=self.opts.data.seq_len,
            dtype=str(self.ctx.model.dtype).rsplit(".", 1)[-1],
            quantize=self.opts.model.quantize,
            bias=self.opts.lora.bias,
            device=self.ctx.device,
            baseline_bytes=0,
        )[0]
        floor = 0 if str(self.ctx.device).startswith("cuda") else self.baseline_bytes
        resident = (self.resident or resources.resident_bytes)(self.ctx.device)
        baseline = floor if resident is None else max(floor, resident - e.weights_bytes)
        return {
            "trainable_params": e.trainable_params,
            "adapter_bytes": e.adapter_bytes,
            "peak_memory_bytes": e.peak_memory_bytes + baseline,
            "baseline_bytes": baseline,
        }

    def static_limit(self, rank: int, predicted: dict) -> str | None:
        """Why a budget known before any training excludes ``rank`` (or None)."""
        s = self.opts.search
        if s.max_rank is not None and rank > s.max_rank:
            return f"r={rank} > --max-rank {s.max_rank}"
        params = predicted["trainable_params"]
        if s.max_trainable_params is not None and params > s.max_trainable_params:
            return (
                f"{params:,} trainable params > --max-trainable-params {s.max_trainable_params:,}"
            )
        if s.max_memory is not None and predicted["peak_memory_bytes"] > s.max_memory:
            return (
                f"predicted peak memory {format_bytes(predicted['peak_memory_bytes'])} > "
                f"--max-memory {format_bytes(s.max_memory)}"
            )
        if s.max_adapter_size is not None and predicted["adapter_bytes"] > s.max_adapter_size:
            return (
                f"adapter size {format_bytes(predicted['adapter_bytes'])} > "
                f"--max-adapter-size {format_bytes(s.max_adapter_size)}"
            )
        return None

    def budget_check(self, rank: int, variant: Variant = MAIN) -> tuple[str | None, dict]:
        """Why a rank must be skipped before training (or None), and the predicted figures."""
        predicted = self.predict(rank, variant)
        done = [r for r in self.store.results() if r.ok and r.kind == TrialKind.MAIN]
        if done:
            predicted["wall_seconds"] = sum(r.wall_seconds for r in done) / len(done)
        reason = self.static_limit(rank, predicted)
        max_time = self.opts.search.max_time
        if reason is None and max_time is not None and "wall_seconds" in predicted:
            spent = self.elapsed()
            if spent + predicted["wall_seconds"] > max_time:
                reason = (
                    f"time budget: {spent:.0f}s spent + ~{predicted['wall_seconds']:.0f}s "
                    f"for this trial > --max-time {max_time:.0f}s"
                )
        return reason, predicted

    def skipped(self, spec: TrialSpec, reason: str, predicted: dict, key: str | None = None):
        return TrialResult.of(
            spec,
            SKIPPED,
            reason,
            key=key or spec.key,
            predicted=predicted,
            trainable_params=predicted["trainable_params"],
            extra={"diagnosis": {"label": "n/a", "advice": "", "evidence": reason}},
        )

    def exclude_before_training(self, ranks: list[int]) -> dict[int, str]:
        """The ranks budgets known in advance exclude (rank -> reason), each recorded as a
        ``skipped`` trial of the curve so the report shows why it was never trained."""
        excluded = {}
        for rank in ranks:
            predicted = self.predict(rank)
            reason = self.static_limit(rank, predicted)
            if reason is None:
                continue
            excluded[rank] = reason
            for seed in range(self.opts.search.seeds):
                spec = self.spec_for(rank, seed)
                stored = self.store.result(spec.key)
                if stored is not None and stored.status == SKIPPED:
                    self.store.forget(spec.key)
                if stored is None or stored.status == SKIPPED:
                    self.store.finish(self.skipped(spec, reason, predicted), spec)
        return excluded

    # -- running --------------------------------------------------------------------------
    def evaluate_base(self) -> TrialResult:
        """The base model's val loss on the same blocks (no adapter): the curve's r=0 point.

        Stored once per run as a ``base`` record (resume keeps it)."""
        import time

        from rankwise.core.metrics import objective
        from rankwise.training.evaluate import validation_loss, validation_scores

        spec = self.spec_for(0, 0, Variant(TrialKind.BASE)).replace(key="base", adapter_dir=None)
        stored = self.store.result(spec.key)
        if stored is not None:
            return stored
        t0 = time.perf_counter()
        metric, scores = spec.train.metric, {}
        if self.opts.model.task == "seq-cls":  # the same objective the trials are scored by
            scores = validation_scores(self.ctx.model, self.ctx, spec)
            loss = objective(scores, metric)
        else:
            loss = validation_loss(self.ctx.model, self.ctx, spec)
        result = TrialResult.of(
            spec,
            "complete",
            lora_alpha=None,
            best_val_loss=loss,
            best_step=0,
            val_curve=[(0, loss)],
            trainable_params=0,
            wall_seconds=time.perf_counter() - t0,
            metric=metric,
            val_metrics=scores,
        )
        self.store.finish(result, spec)
        from rankwise.core.metrics import describe

        self.progress.log(f"base model (no adapter): {describe(metric, loss)}")
        return result

    def run(self, rank: int, seed: int, variant: Variant = MAIN, cutoff=None) -> TrialResult:
        """The trial's stored result, or run it now (unless a budget skips it). ``cutoff``
        (:mod:`rankwise.core.cutoff`) may stop it once it cannot change the answer."""
        spec, settled, predicted = self.prepare(rank, seed, variant)
        if settled is not None:
            return settled
        self.store.start(spec)
        with self.progress.trial(spec) as bar:
            result = self.execute(spec, bar) if cutoff is None else self.execute(spec, bar, cutoff)
        return self.record(result.replace(predicted=predicted), spec)

    def run_proposal(self, p, variant: Variant = MAIN, cutoff=None) -> list[TrialResult]:
        """The results of a strategy's proposal: one trial, or a nested run's truncations."""
        if not p.truncations:
            return [self.run(p.rank, p.seed, variant, cutoff)]
        return self.run_nested(p.rank, p.seed, list(p.truncations), variant)

    def cutoff_for(self, strategy, p, variant: Variant = MAIN):
        """``--stop-when-decided``: the check that may stop this trial of the rank curve
        (None when off, for other kinds of trial, with no finished trial to pair with, or
        under a schedule whose rates are not known in advance). Its table of late gap
        moves is read on the trials' own schedule (rankwise.training.schedule.drift_for)."""
        if not self.opts.search.stop_when_decided or variant != MAIN:
            return None
        from rankwise.core.cutoff import DRIFT, Cutoff
        from rankwise.training.schedule import drift_for

        drift = drift_for(self.train_spec(0, MAIN), DRIFT)
        return None if drift is None else Cutoff.for_proposal(strategy, p, strategy.results, drift)

    def run_nested(self, r_max: int, seed: int, ranks: list[int], variant: Variant = MAIN):
        """One nested-rank run at ``r_max`` (its stored truncations, or train it now)."""
        from rankwise.training.nested import nested_key, with_nested

        stored = [self.store.result(nested_key(r, seed, variant.group)) for r in ranks]
        if all(r is not None for r in stored):
            return stored
        spec = self.spec_for(r_max, seed, variant)
        spec = spec.replace(key=nested_key(r_max, seed, variant.group), kind=TrialKind.NESTED)
        spec = with_nested(
            spec, ranks, self.nested_scale(ranks), self.opts.search.nested_distribution
        )
        self.store.start(spec)
        with self.progress.trial(spec) as bar:
            results = self.nested(spec, self.ctx, bar)
        return [self.record(r, spec) for r in results]

    def prepare(
        self, rank: int, seed: int, variant: Variant = MAIN, record: bool = True
    ) -> tuple[TrialSpec, TrialResult | None, dict]:
        """(spec, the result if nothing is left to train, predicted figures).

        The result is the stored one, or a budget skip (written to the store unless
        ``record`` is False: a speculative look-ahead must not decide anything)."""
        spec = self.spec_for(rank, seed, variant)
        stored = self.store.result(spec.key)
        if stored is not None and stored.status != SKIPPED:
            return spec, stored, stored.predicted
        if stored is not None and record:
            self.store.forget(spec.key)  # budgets may have changed: decide again
        skip, predicted = self.budget_check(rank, variant)
        if not skip:
            return spec, None, predicted
        result = self.skipped(spec, skip, predicted)
        if record:
            self.store.finish(result, spec)
            self.progress.trial_done(result)
        return spec, result, predicted

    def execute(self, spec: TrialSpec, progress=None, cutoff=None) -> TrialResult:
        """Train one trial; an executor (rankwise.run.executor) may run it elsewhere instead."""
        from rankwise.training.trial import run_trial

        return run_trial(spec, self.ctx, progress=progress, cutoff=cutoff)

    def record(self, result: TrialResult, spec: TrialSpec) -> TrialResult:
        """Diagnose a finished trial and write it (one transaction), then tell the world."""
        if self.forgetting is not None:  # its forgetting at the best checkpoint; a budget
            result = self.forgetting(result, spec)
        diagnosis = diagnose(result).to_dict()
        result = result.replace(extra={**result.extra, "diagnosis": diagnosis})
        self.store.finish(result, spec)
        self.tracker.log_trial(result, spec)
        self.progress.trial_done(result)
        return result
