"""The search loop: a strategy asks, a trial runs, the store records, until done; then the
stages after the curve, and the recommendation.

Opening a run (model, data, store, runner, rank plan) is :mod:`rankwise.study.session`; the
learning rate :mod:`rankwise.run.calibrate`; running and recording one trial
:mod:`rankwise.run.runner`; the stages :mod:`rankwise.stages`; the document
:mod:`rankwise.report.recommendation`. This module is the loop around them.

Example (a real, if tiny, search: eight steps cannot tell r=1 from r=2. Two seeds of each
show the difference is too close to the bar for a third seed to settle it, so the search
stops racing and says so. The smaller rank cannot be shown within the 1% guarantee of the
best (its noise rests on one degree of freedom), so the answer is the larger):
    >>> import tempfile, json
    >>> from rankwise.testing import save_tiny_model
    >>> d = tempfile.mkdtemp()
    >>> model = save_tiny_model(f"{d}/model")
    >>> _ = open(f"{d}/train.txt", "w").write("\\n".join(f"line {i} of text" for i in range(40)))
    >>> result = search(model=str(model), train=f"{d}/train.txt", out=f"{d}/run", ranks=[1, 2],
    ...                 start_rank=1, max_steps=8, batch_size=2, seq_len=16, lr=1e-2, quiet=True)
    >>> [(s.rank, s.n) for s in result.scores]
    [(1, 2), (2, 2)]
    >>> rec = result.recommendation
    >>> rec.rank, rec.undecided.startswith("r=1 to r=2 are indistinguishable")
    (2, True)
    >>> rec.criterion_rank  # the knee's own pick; not shown within the 1% guarantee
    1
    >>> [r["not_raced"][:22] for r in json.load(open(f"{d}/run/recommendation.json"))["races"]
    ...  if r.get("not_raced")]
    ['r=1 vs r=2 not raced: ']
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

from rankwise.analysis.diagnose import diagnose_search
from rankwise.config import Options
from rankwise.core.criteria import Criterion, Recommendation
from rankwise.core.cutoff import stopped_early
from rankwise.core.eta import TimeLeft
from rankwise.core.over_steps import answer_by_step, moved
from rankwise.core.scores import RankScore, improvement_share, rank_scores
from rankwise.core.strategies import Grid, Ladder, Nested
from rankwise.errors import ConfigError
from rankwise.io.quantize import import_peft
from rankwise.io.recipes import with_recipe
from rankwise.records import TrialKind, TrialResult, Variant
from rankwise.report.document import RecommendationDoc
from rankwise.report.recommendation import (
    RecommendationInputs,
    build_document,
    recommend_run,
    trainable_params,
)
from rankwise.run import branching
from rankwise.run.calibrate import calibrate_lr
from rankwise.run.executor import LocalExecutor, make_executor
from rankwise.stages.base import Answer, StageContext
from rankwise.stages.cotune import Cotune
from rankwise.stages.final import FinalTrial
from rankwise.stages.per_layer import PerLayer
from rankwise.stages.targets import CompareTargets
from rankwise.storage.rundir import RunDir
from rankwise.study.quiet import third_party_quiet
from rankwise.study.session import fairness_warnings, max_trials, open_session
from rankwise.training.resources import current_rss

__all__ = ["Study", "SearchResult", "search", "run_dir_for", "STAGES"]

# The stages after the curve, in order; each may change the answer and says so.
STAGES = (CompareTargets(), Cotune(), FinalTrial(), PerLayer())


@dataclass
class SearchResult:
    """What a search returns: every trial, the per-rank scores, the recommendation."""

    run_dir: Path
    trials: list[TrialResult]
    scores: list[RankScore]
    recommendation: Recommendation
    lora_config: dict | None
    quantization_config: dict | None = None
    """``BitsAndBytesConfig`` keywords of the base the adapter was trained on (--quantize)."""

    def to_lora_config(self):
        """The recommended ``peft.LoraConfig``."""
        LoraConfig = import_peft().LoraConfig
        if self.lora_config is None:
            raise ValueError("no rank was recommended")
        return LoraConfig(**self.lora_config)

    @property
    def adapter_dir(self) -> Path:
        return RunDir(self.run_dir).adapter


def search(
    model: str | None = None,
    train: str | None = None,
    *,
    options: Options | None = None,
    **keywords,
) -> SearchResult:
    """Find the LoRA rank for ``model`` on ``train``.

    The options are a typed :class:`~rankwise.Options` (``options=``), the CLI's options as
    keywords, or both: keywords override the fields of ``options``, as flags override
    ``--config`` (``search(options=opts, seed=1)`` is ``opts`` with another seed).
    ``recipe=FILE`` (``--from``) reads an axolotl, LLaMA-Factory or TRL config under the
    other keywords; it is refused with ``options=``, whose every field is already set, so
    nothing of the recipe would be used.

    Example (no training: a bad value fails before the model is loaded, naming the flag):
        >>> from rankwise import Options
        >>> search(options=Options(), ranks=[0])
        Traceback (most recent call last):
        ...
        rankwise.errors.ConfigError: --ranks: every rank must be a positive integer, got 0
    """
    flat = dict(keywords)
    if model is not None:
        flat["model"] = model
    if train is not None:
        flat["train"] = train
    if options is None:
        return Study(Options.from_flat(with_recipe(flat), "search()")).run()
    if not isinstance(options, Options):
        raise TypeError(f"search(): options= expects a rankwise.Options, got {options!r}")
    if flat.get("recipe"):
        raise ConfigError(
            "search(): recipe= cannot be combined with options= (an Options sets every "
            "option, so the recipe would set none); give the other options as keywords"
        )
    return Study(options.updated(flat, "search()")).run()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(text)).stem).strip("-")[:40] or "run"


def run_dir_for(opts: Options) -> Path:
    if opts.run.out:
        return Path(opts.run.out)
    return Path("runs") / (opts.run.name or f"{_slug(opts.model.model)}-{_slug(opts.data.train)}")


class Study:
    """Runs a search for one :class:`~rankwise.config.Options`, persisting every trial."""

    def __init__(self, opts: Options, console=None):
        from rankwise.report.progress import Progress

        self.opts = opts
        self.dir = RunDir(run_dir_for(opts))
        self.progress = Progress(quiet=opts.run.quiet, console=console)
        self.elapsed_before, self.t0 = 0.0, time.perf_counter()
        self.lr_record: dict | None = None  # the learning-rate calibration, when it ran
        self.base_loss: float | None = None  # the base model's val loss (no adapter)
        self.executor = LocalExecutor()  # run() opens the one --executor names
        # Process memory before the model is loaded, with the libraries a trial needs already
        # imported: the floor of CPU memory predictions' baseline (each prediction measures
        # what is resident right before its trial: TrialRunner.predict).
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import_peft()

        self.baseline_bytes = current_rss()

    @property
    def criterion(self) -> Criterion:
        return self.opts.search.search_criterion()

    def judge(self, score: RankScore, best: RankScore) -> bool:
        """Whether ``score`` is as good as ``best`` under the search's criterion and the
        noise: the one rule for ranks, target sets, co-tuning and rank patterns."""
        return self.criterion.as_good(score, best, self.base_loss)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def strategy(self):
        """The strategy ``--strategy`` names, with the search's settings."""
        s = self.opts.search
        common = dict(criterion=self.criterion, base_loss=self.base_loss, seeds=s.seeds)
        if s.strategy == "grid":
            return Grid(ranks=self.session.ranks, **common, **self._noise())
        if s.strategy == "nested":
            return self._nested(common)
        return self.ladder()

    def _noise(self) -> dict:
        """Racing to --max-seeds; the first rank trained twice to measure the noise."""
        s = self.opts.search
        return dict(max_seeds=s.max_seeds, noise_seeds=min(2, s.max_seeds))

    def ladder(self) -> Ladder:
        """A fresh ladder with the search's settings (a target set's curve)."""
        s, session = self.opts.search, self.session
        return Ladder(
            ranks=session.ranks, start_rank=session.start_rank, patience=s.patience,
            criterion=self.criterion, base_loss=self.base_loss, seeds=s.seeds, **self._noise(),
        )  # fmt: skip

    def _nested(self, common: dict) -> Nested:
        """A nested strategy over the ranks whose adapter fits the budgets; the others are
        told as skipped (known before training from their predicted figures)."""
        from rankwise.training.nested import nested_key

        runner, s = self.session.runner, self.opts.search
        allowed, skipped = [], []
        for rank in self.session.ranks:
            skip, predicted = runner.budget_check(rank)
            if not skip:
                allowed.append(rank)
                continue
            for seed in range(s.seeds):
                key = nested_key(rank, seed)
                if (stored := runner.store.result(key)) is None:
                    spec = runner.spec_for(rank, seed, Variant(TrialKind.NESTED))
                    stored = runner.skipped(spec, skip, predicted, key)
                    runner.store.finish(stored, spec)
                skipped.append(stored)
        over = [r for r in self.session.ranks if r not in allowed]
        nested = Nested(ranks=allowed, distribution=s.nested_distribution, excluded=over, **common)
        for result in skipped:
            nested.tell(result)
        return nested

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> SearchResult:
        with (
            third_party_quiet(debug=self.opts.run.debug),
            self.dir.locked() as stale,
            make_executor(self.opts.executor, self.dir.path, self.progress) as self.executor,
        ):
            if stale:
                self.progress.log(
                    f"took over the lock of pid {stale.get('pid')} "
                    f"(started {stale.get('started')}), which is no longer running"
                )
            self.session = open_session(
                self.opts, self.dir, self.progress, self.executor,
                baseline_bytes=self.baseline_bytes, elapsed=self.elapsed,
            )  # fmt: skip
            return self._search()

    def _search(self) -> SearchResult:
        session, runner, tc = self.session, self.session.runner, self.opts.train
        self.t0 = time.perf_counter()
        # The first report.html is drawn 5 s in, not at the first trial: a search shorter
        # than that draws it once, at the end (drawing costs ~1 s of a tiny search's 5).
        self._drawn = (self.t0, 0.0)
        self.elapsed_before = sum(r.wall_seconds for r in session.store.results())
        total = max_trials(self.opts, session.ranks)
        self.progress.plan(total, self.opts.search.max_time, self.elapsed_before,
                           self._time_left(total))  # fmt: skip
        for warning in fairness_warnings(self.opts, session.ctx):
            self.progress.log(f"warning: {warning}")
        self.base_loss = runner.evaluate_base().best_val_loss
        if not session.ranks:  # every rank is over a budget known in advance
            nothing = Grid(ranks=[])
            nothing.stop_reason = "no rank fits the budgets"
            return self._finish(nothing)
        if tc.lr is None:
            self.lr_record = calibrate_lr(runner, session.start_rank)
        runner.lr = tc.lr or self.lr_record["lr"]
        if tc.lr is None and tc.lr_check_largest_rank:
            # Under a fixed alpha one rate should serve every rank ("LoRA Without Regret"):
            # calibrate again at the largest rank and report both.
            other = calibrate_lr(runner, session.ranks[-1], "lr_calibration_largest_rank")["lr"]
            same = "the same rate" if other == runner.lr else "a different rate"
            self.progress.log(
                f"calibration at r={session.ranks[-1]} picked {other:g}: {same} "
                f"as at r={session.start_rank} ({runner.lr:g}), which the search uses"
            )
        return self._finish(self.drive(self.strategy()))

    def _time_left(self, total: int) -> TimeLeft:
        """The time-left estimate (rankwise.core.eta), told the trials a resumed search
        already has. Its plan is stored, so `rankwise show` of the live run says the same."""
        session, tc = self.session, self.opts.train
        tokens = tc.max_steps * tc.batch_size * tc.grad_accum * self.opts.data.seq_len
        uncounted = sorted(r.key for r in session.excluded)  # not among max_trials' trials
        left = TimeLeft(total, tokens)
        for r in session.store.results():
            if r.kind != TrialKind.BASE and r.key not in uncounted:
                left.tell(r.train_tokens, r.wall_seconds + r.retain_seconds)
        plan = {"trials": total, "trial_tokens": tokens, "uncounted": uncounted}
        session.store.set_meta("time_left", plan)
        return left

    def drive(self, strategy, variant: Variant | None = None):
        """Ask/run/tell until the strategy is done; the report is refreshed after each trial
        (on Ray, trials run side by side and the strategy still decides as it would here)."""
        runner = self.session.runner
        return self.executor.drive(strategy, runner, variant or Variant(), self._refresh)

    def _finish(self, strategy) -> SearchResult:
        session = self.session
        # Ranks excluded before training are part of the answer's evidence: listed, skipped.
        trials = strategy.results + [r for r in session.excluded if r not in strategy.results]
        rec = self._recommend(strategy, trials)
        answer = Answer(rec, session.runner.lora_config(rec.rank) if rec.rank else None,
                        strategy.results)  # fmt: skip
        ctx = StageContext(session.runner, self.judge, self.drive, self.ladder, strategy)
        extras: dict = {}
        for stage in STAGES:
            if stage.applies(self.opts, answer):
                outcome = stage.run(ctx, answer)
                extras[outcome.name], answer = outcome.section, outcome.answer
        rec = answer.rec
        if rec.rank is not None:  # target sets or co-tuning may have moved the pick
            share = improvement_share(rec.loss, self.base_loss, rec.best_loss)
            rec = dataclasses.replace(rec, share=share)
            best = min((r for r in answer.source if r.rank == rec.rank and r.ok),
                       key=lambda r: r.best_val_loss)  # fmt: skip
            self.dir.deliver_adapter(best.key)
        extras.update(self._evidence(strategy, trials))
        doc = self._write(rec, answer.lora, trials, rank_scores(trials), extras)
        self._refresh(final=True)
        session.tracker.close()
        session.store.close()  # with gc.freeze() nothing else would: checkpoint the WAL now
        self.progress.done(doc, self.dir.path)
        return SearchResult(self.dir.path, trials, rank_scores(trials), rec, answer.lora,
                            self.quantization_config())  # fmt: skip

    def _recommend(self, strategy, trials: list[TrialResult]) -> Recommendation:
        scores = rank_scores(trials)
        stop = "; ".join([strategy.stop_reason, *self.session.plan_notes]).strip("; ")
        return recommend_run(scores, self.criterion, self.opts.train.metric, stop,
                             self.base_loss, trainable_params(trials))  # fmt: skip

    def _evidence(self, strategy, trials: list[TrialResult]) -> dict:
        """The diagnosis, the races and the answer over the training budget."""
        summary = diagnose_search(trials)
        by_step = answer_by_step([t for t in trials if t.on_curve], self.criterion, self.base_loss)
        races = []
        for race in getattr(strategy, "races", []):
            added = {tuple(a) for a in race["added"]}
            cost = [t for t in trials if (t.rank, t.seed) in added]
            races.append({**race, "train_tokens": sum(t.train_tokens for t in cost),
                          "wall_seconds": sum(t.wall_seconds for t in cost)})  # fmt: skip
        warning = moved(by_step)
        if warning:
            self.progress.log(f"warning: {warning}")
        return {
            "diagnosis": {"advice": summary["advice"], "counts": summary["counts"]},
            "races": races,
            "stopped_early": stopped_early(trials),
            "answer_by_step": by_step,
            "answer_moved": warning,
            "branches": branching.branches(trials),  # --branch-at: each branch's trunk, step
        }

    def quantization_config(self) -> dict | None:
        """``BitsAndBytesConfig`` keywords of the base (None when not quantized)."""
        m = self.opts.model
        if m.quantize == "none":
            return None
        from rankwise.io.models import pick_dtype
        from rankwise.io.quantize import bnb_config_kwargs

        dtype = str(pick_dtype(m.dtype, self.session.ctx.device)).rsplit(".", 1)[-1]
        return bnb_config_kwargs(m.quantize, dtype)

    def _write(self, rec, lora, trials, scores, extras) -> RecommendationDoc:
        runner, ctx = self.session.runner, self.session.ctx
        precision = (
            f"fp32 weights, {runner.autocast} autocast"
            if runner.autocast
            else str(ctx.model.dtype).rsplit(".", 1)[-1]
        )
        warnings = fairness_warnings(self.opts, ctx) + [
            w for w in [extras.get("answer_moved")] if w
        ]
        doc = build_document(
            RecommendationInputs(
                rec, lora, trials, scores, self.criterion, self.base_loss, self.opts.to_flat(),
                name=self.opts.run.name or self.dir.path.name,
                lr=runner.lr, lr_record=self.lr_record, precision=precision,
                quantization_config=self.quantization_config(),
                labels=ctx.data.info.get("labels"), warnings=warnings, extras=extras,
                budget=self.session.budget,
            )
        )  # fmt: skip
        self.dir.write_json(self.dir.recommendation, doc.to_dict())
        return doc

    def _refresh(self, final: bool = False) -> None:
        """Rewrite summary.md and report.html so a running search can be watched.

        summary.md after every trial; report.html too unless trials are so short that drawing
        it would dominate (then at most every 5 s and 5x its own drawing time), and at the end.
        """
        from rankwise.report.html import write_report
        from rankwise.report.summary import write_summary
        from rankwise.report.view import load_run

        view = load_run(self.dir.path)
        write_summary(view)
        now = time.perf_counter()
        last, cost = getattr(self, "_drawn", (None, 0.0))
        if final or last is None or now - last >= max(5.0, 5 * cost):
            write_report(view)
            self._drawn = (time.perf_counter(), time.perf_counter() - now)
