"""The search loop: a strategy asks, a trial runs, the store records, until done.

The run directory (paths, lock, identity, delivery) is :mod:`rankwise.run.rundir`; running and
recording one trial is :mod:`rankwise.run.runner`; this module is the loop around them.

Example (a real, if tiny, search):
    >>> import tempfile, json
    >>> from rankwise.testing import save_tiny_model
    >>> d = tempfile.mkdtemp()
    >>> model = save_tiny_model(f"{d}/model")
    >>> _ = open(f"{d}/train.txt", "w").write("\\n".join(f"line {i} of text" for i in range(40)))
    >>> result = search(model=str(model), train=f"{d}/train.txt", out=f"{d}/run", ranks=[1, 2],
    ...                 start_rank=1, max_steps=8, batch_size=2, seq_len=16, lr=1e-2, quiet=True)
    >>> result.recommendation.rank in (1, 2), result.recommendation.loss < result.recommendation.base_loss
    (True, True)
"""

from __future__ import annotations

import dataclasses
import gc
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rankwise.analysis.diagnose import diagnose_search
from rankwise.config import DEFAULT_RANKS, Options
from rankwise.errors import ConfigError
from rankwise.records import SKIPPED, TrialKind, TrialResult
from rankwise.run.executor import LocalExecutor, make_executor
from rankwise.run.rundir import RunDir, data_fingerprint
from rankwise.run.runner import TrialRunner, Variant
from rankwise.search import metrics
from rankwise.search.criteria import Criterion, Recommendation, recommend
from rankwise.search.scores import RankScore, improvement_share, rank_scores
from rankwise.search.strategies import Grid, Ladder, plan_ranks
from rankwise.training.resources import current_rss

__all__ = ["Study", "SearchResult", "search", "run_dir_for"]

# Extra calibration rates tried past each edge of --lr-candidates, at most: with the default
# half-decade spacing, 3 steps reach 30x beyond the range.
MAX_LR_EXTENSIONS = 3


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
        from peft import LoraConfig

        if self.lora_config is None:
            raise ValueError("no rank was recommended")
        return LoraConfig(**self.lora_config)

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"


def search(model: str | None = None, train: str | None = None, **options) -> SearchResult:
    """Find the LoRA rank for ``model`` on ``train``. Options are the CLI's, as keywords."""
    flat = dict(options)
    if model is not None:
        flat["model"] = model
    if train is not None:
        flat["train"] = train
    return Study(Options.from_flat(flat, "search()")).run()


def _fmt_rate(lr: float | None) -> str:
    return "?" if lr is None else f"{lr:g}"


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
        self.elapsed_before = 0.0
        self.t0 = time.perf_counter()
        self.lr_record: dict | None = None  # the learning-rate calibration, when it ran
        self.base_loss: float | None = None  # the base model's val loss (no adapter)
        self.executor = LocalExecutor()  # run() opens the one --executor names
        # Process memory before the model is loaded, with the libraries a trial needs already
        # imported: the baseline of CPU memory predictions.
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        self.baseline_bytes = current_rss()

    # -- set-up --------------------------------------------------------------------------
    def max_trials(self) -> int:
        """An upper bound on the trials this search may train (for progress)."""
        s, tc = self.opts.search, self.opts.train
        curves = 1 + len(s.compare_targets or [])
        n = len(self.ranks) * s.seeds * curves
        if tc.lr is None:
            n += (len(tc.lr_candidates) + 2 * MAX_LR_EXTENSIONS) * (
                2 if tc.lr_check_largest_rank else 1
            )
        if s.tune:
            n += 2 * (2 * ("dropout" in s.tune) + 4 * ("alpha" in s.tune))
        return n + (s.strategy == "nested" and s.final) + 2 * s.seeds * s.per_layer

    def warnings(self) -> list[str]:
        """Settings that make the rank comparison unfair, said before the search spends time."""
        out = []
        if self.opts.lora.alpha_policy == "ratio":
            out.append(
                f"--alpha-policy ratio: lora_alpha = {self.opts.lora.alpha_ratio:g}*r, so under "
                "Adam a higher rank also acts like a larger learning rate; gains on the curve mix "
                "capacity with step size (--alpha-policy fixed compares capacity)"
            )
        n_val = self.ctx.data.val_ids.shape[0] if hasattr(self, "ctx") else None
        if self.opts.train.metric != "loss" and n_val and n_val < 200:
            out.append(
                f"--metric {self.opts.train.metric}: {n_val} validation examples, so the score "
                f"moves in steps of about {1 / n_val:.1%}; a larger --val set makes the rank "
                "curve finer"
            )
        return out

    def _setup(self) -> None:
        from rankwise.io.data import prepare_data, save_tokens
        from rankwise.io.models import check_targets, load_model, param_count, pick_autocast
        from rankwise.report.tracking import make_tracker
        from rankwise.run.store import RunStore
        from rankwise.training.adapter import TrialContext

        identity = self.opts.identity()
        if not self.opts.run.force:  # refuse a mismatch before loading anything
            self.dir.check_identity(identity, ignore=("data_sha256",))
        labelled = None
        if self.opts.model.task == "seq-cls":  # labels first: they size the model's head
            from rankwise.training.classify import read_labelled

            labelled = read_labelled(self.opts.data, self.opts.train.seed)
        model, tokenizer, device = load_model(self.opts.model, labelled and labelled.labels)
        self.ranks = self._fit_ranks(model)
        n_params = param_count(model)
        self.start_rank = self.opts.search.start_rank_for(n_params)
        targets = check_targets(model, self.opts.lora.target_modules, self.ranks)
        if labelled:
            from rankwise.training.classify import encode

            data = encode(labelled, tokenizer, self.opts.data.seq_len)
        else:
            data = prepare_data(self.opts.data, tokenizer, self.dir.path, self.opts.train.seed)
        identity["data_sha256"] = data_fingerprint(data)
        if not self.opts.run.force:
            self.dir.check_identity(identity)
        self.tracker = make_tracker(self.opts.run.report_to, self.dir.path)
        try:
            self.store = RunStore(self.dir.path)
        except OSError as exc:
            raise ConfigError(f"--out: cannot write to {self.dir.path} ({exc})") from None
        if self.store.claim(identity, force=self.opts.run.force):
            self.dir.clear_outputs()
        self.store.set_meta("options", self.opts.to_flat())
        self.store.set_meta("name", self.opts.run.name or self.dir.path.name)
        self.store.set_meta("data", data.info)
        save_tokens(data, self.dir.path)
        self.ctx = TrialContext(model, tokenizer, device, data)
        gc.freeze()  # the model's objects are permanent: keep them out of every collection
        self.runner = TrialRunner(
            self.opts,
            self.dir,
            self.store,
            self.ctx,
            self.progress,
            self.tracker,
            ranks=self.ranks,
            targets=targets,
            baseline_bytes=self.baseline_bytes,
            elapsed=self.elapsed,
            autocast=pick_autocast(self.opts.model.dtype, device, n_params),
            execute=self.executor.execute,
        )
        self._plan_ranks()

    def _plan_ranks(self) -> None:
        """Drop the ranks budgets known in advance exclude; clamp the start rank (and say so)."""
        excluded = self.runner.exclude_before_training(self.ranks)
        allowed, self.start_rank, self.plan_notes = plan_ranks(
            self.ranks, self.start_rank, excluded
        )
        for note in self.plan_notes:
            self.progress.log(note)
        self.excluded = [
            r for r in self.store.results() if r.kind == TrialKind.MAIN and r.rank in excluded
        ]
        self.ranks = self.runner.ranks = allowed

    def _fit_ranks(self, model) -> list[int]:
        """Default rank list: drop ranks the model's layers cannot hold; explicit: check them."""
        from rankwise.io.models import check_targets, linear_module_names

        ranks = self.opts.search.ranks
        if ranks == DEFAULT_RANKS:
            matched = check_targets(model, self.opts.lora.target_modules, [1])
            sizes = linear_module_names(model)
            cap = min(min(sizes[n]) for n in matched)
            ranks = [r for r in ranks if r <= cap]
        return ranks

    def _strategy(self):
        s = self.opts.search
        if s.strategy == "grid":
            return Grid(ranks=self.ranks, seeds=s.seeds)
        return self.ladder()

    def ladder(self) -> Ladder:
        s = self.opts.search
        return Ladder(
            ranks=self.ranks,
            start_rank=self.start_rank,
            criterion=self.criterion,
            patience=s.patience,
            seeds=s.seeds,
            base_loss=self.base_loss,
        )

    @property
    def criterion(self) -> Criterion:
        return self.opts.search.search_criterion()

    def judge(self, score: RankScore, best: RankScore) -> bool:
        """Whether ``score`` is as good as ``best`` under the search's criterion (and noise):
        the one rule for ranks, target sets and co-tuning."""
        return self.criterion.as_good(score, best, self.base_loss)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    # -- the learning rate ---------------------------------------------------------------
    def calibrate_lr(self, rank: int, meta_key: str = "lr_calibration") -> float:
        """Short runs at each candidate rate at ``rank``; the lowest best val loss wins.

        A best rate at an edge of the candidates says the optimum may lie beyond it, so the
        range is extended that way (by the candidates' own spacing) until the best is
        interior — its neighbours both worse — or a rate fails (diverges), at most
        ``MAX_LR_EXTENSIONS`` times per side. The bracket is recorded with the choice.
        """
        tc = self.opts.train
        steps = max(1, math.ceil(tc.max_steps * tc.lr_calibration_fraction))
        rates = sorted(tc.lr_candidates)
        self.progress.log(
            f"calibrating the learning rate at r={rank}: {len(rates)} runs of "
            f"{steps} steps ({', '.join(f'{lr:g}' for lr in rates)})"
        )
        tried = {lr: self._lr_trial(rank, lr, steps) for lr in rates}
        if not any(r.ok for r in tried.values()):
            raise ConfigError(
                "--lr-candidates: every calibration run failed ("
                + "; ".join(f"{lr:g}: {r.reason}" for lr, r in tried.items())
                + "); give --lr or other candidates"
            )
        extended = self._extend_lr(rank, steps, tried)
        ok = sorted((r.best_val_loss, lr) for lr, r in tried.items() if r.ok)
        best = ok[0][1]
        order = sorted(tried)
        i = order.index(best)
        bracket = [order[i - 1] if i > 0 else None, order[i + 1] if i + 1 < len(order) else None]
        record = {
            "rank": rank,
            "steps": steps,
            "lr": best,
            "bracket": bracket,
            "extended": extended,
            "losses": {f"{lr:g}": tried[lr].best_val_loss for lr in order},
        }
        self.store.set_meta(meta_key, record)
        self.lr_record = record if meta_key == "lr_calibration" else self.lr_record
        edge = "" if None not in bracket else " (at the edge of what could be tried)"
        score = metrics.label(self.opts.train.metric)
        self.progress.log(
            f"learning rate: {best:g} (best {score} at r={rank} in {steps} steps; bracket "
            f"{_fmt_rate(bracket[0])}..{_fmt_rate(bracket[1])}{edge})"
        )
        return best

    def _lr_trial(self, rank: int, lr: float, steps: int) -> TrialResult:
        variant = Variant(TrialKind.CALIBRATION, f"lr-{lr:g}", lr=lr, max_steps=steps)
        return self.runner.run(rank, 0, variant)

    def _extend_lr(self, rank: int, steps: int, tried: dict[float, TrialResult]) -> list[float]:
        """Try rates beyond the edge while the edge rate is the best (see calibrate_lr)."""
        extended: list[float] = []
        for side in (+1, -1):
            for _ in range(MAX_LR_EXTENSIONS):
                order = sorted(tried)
                best = min((r.best_val_loss, lr) for lr, r in tried.items() if r.ok)[1]
                edge = order[-1] if side > 0 else order[0]
                if best != edge or len(order) < 2:
                    break
                inner = order[-2] if side > 0 else order[1]
                lr = float(f"{edge * edge / inner:.3g}")  # one more step of the same spacing
                self.progress.log(f"best rate {edge:g} is at the edge: trying {lr:g}")
                tried[lr] = self._lr_trial(rank, lr, steps)
                extended.append(lr)
        return extended

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> SearchResult:
        with (
            self.dir.locked() as stale,
            make_executor(self.opts.executor, self.dir.path, self.progress) as self.executor,
        ):
            if stale:
                self.progress.log(
                    f"took over the lock of pid {stale.get('pid')} "
                    f"(started {stale.get('started')}), which is no longer running"
                )
            self._setup()
            return self._search()

    def _search(self) -> SearchResult:
        self.t0 = time.perf_counter()
        self.elapsed_before = sum(r.wall_seconds for r in self.store.results())
        s = self.opts.search
        self.progress.plan(self.max_trials(), s.max_time, self.elapsed_before)
        for warning in self.warnings():
            self.progress.log(f"warning: {warning}")
        self.base_loss = self.runner.evaluate_base().best_val_loss
        if not self.ranks:  # every rank is over a budget known in advance
            nothing = Grid(ranks=[], seeds=s.seeds)
            nothing.stop_reason = "no rank fits the budgets"
            return self._finish(nothing)
        self.runner.lr = self.opts.train.lr or self.calibrate_lr(self.start_rank)
        if self.opts.train.lr is None and self.opts.train.lr_check_largest_rank:
            # Under a fixed alpha one rate should serve every rank ("LoRA Without Regret"):
            # calibrate again at the largest rank and report both.
            other = self.calibrate_lr(self.ranks[-1], "lr_calibration_largest_rank")
            same = "the same rate" if other == self.runner.lr else "a different rate"
            self.progress.log(
                f"calibration at r={self.ranks[-1]} picked {other:g}: {same} "
                f"as at r={self.start_rank} ({self.runner.lr:g}), which the search uses"
            )
        if s.strategy == "nested":
            return self._finish(self.nested_curve())
        strategy = self._strategy()
        self.drive(strategy)
        return self._finish(strategy)

    def drive(self, strategy, variant: Variant | None = None):
        """Ask/run/tell until the strategy is done; the report is refreshed after each trial
        (on Ray, trials run side by side and the strategy still decides as it would here)."""
        return self.executor.drive(strategy, self.runner, variant or Variant(), self._refresh)

    def nested_curve(self) -> Grid:
        """The whole rank curve from one nested-rank run per seed (rankwise.training.nested)."""
        from rankwise.training.nested import nested_key

        s, runner = self.opts.search, self.runner
        nested = Variant(TrialKind.NESTED)
        curve = Grid(ranks=self.ranks, seeds=s.seeds)
        allowed = []
        for rank in self.ranks:
            skip, predicted = runner.budget_check(rank)
            if not skip:
                allowed.append(rank)
                continue
            for seed in range(s.seeds):
                key = nested_key(rank, seed)
                if self.store.result(key) is None:
                    spec = runner.spec_for(rank, seed, nested)
                    self.store.finish(runner.skipped(spec, skip, predicted, key), spec)
        if not allowed:
            curve.stop_reason = "no rank fits the budgets"
            curve.results = [r for r in self.store.results() if r.on_curve]
            return curve
        r_max = allowed[-1]
        for seed in range(s.seeds):
            stored = [self.store.result(nested_key(r, seed)) for r in allowed]
            if any(r is None for r in stored):
                spec = runner.spec_for(r_max, seed, nested).replace(key=nested_key(r_max, seed))
                self.store.start(spec)
                with self.progress.trial(spec) as bar:
                    stored = self.executor.nested(
                        spec,
                        allowed,
                        self.ctx,
                        self.nested_scale(allowed),
                        s.nested_distribution,
                        bar,
                    )
                stored = [runner.record(r, spec) for r in stored]
            for r in stored:
                curve.tell(r)
        for r in self.store.results():
            if r.status == SKIPPED and r.kind == TrialKind.NESTED:
                curve.tell(r)
        over = (
            f"; r={self.ranks[len(allowed)]} and above over budget"
            if len(allowed) < len(self.ranks)
            else ""
        )
        curve.stop_reason = (
            f"one nested run per seed at r_max={r_max}, ranks {','.join(map(str, allowed))} "
            f"drawn {s.nested_distribution}{over}"
        )
        self._refresh()
        return curve

    def nested_scale(self, ranks: list[int]):
        """The LoRA scale of each drawn rank of a nested run (``--nested-scale``)."""
        from rankwise.training.nested import SharedScale

        scaling = self.opts.lora.scaling
        if self.opts.search.nested_scale == "shared":
            return SharedScale.middle(ranks, scaling)
        return scaling

    def final_trial(self, rec: Recommendation, curve) -> tuple[dict, list[TrialResult], tuple]:
        """An ordinary trial at the nested curve's choice (``--final-steps`` of the steps,
        from a fresh adapter or the curve's truncation), compared with the curve's point.
        Returns its section, the results to deliver from, and its LoraConfig overrides."""
        s = self.opts.search
        point = next(
            (r for r in curve.results if r.rank == rec.rank and r.ok and r.seed == 0), None
        )
        steps = max(1, round(s.final_steps * self.opts.train.max_steps))
        variant = Variant(TrialKind.FINAL, "final", max_steps=steps)
        if s.final_init == "nested" and point is not None:
            variant = dataclasses.replace(
                variant,
                lora=(("lora_alpha", point.lora_alpha),),
                init_adapter=str(self.dir.trial_adapter(point.key)),
            )
        final = self.runner.run(rec.rank, 0, variant)
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
            return section, curve.results, ()
        if point is not None and point.best_val_loss < final.best_val_loss:
            # The truncation is better than the trial that started from it: deliver it.
            section["delivered"] = "nested"
            return section, [point], (("lora_alpha", point.lora_alpha),)
        section["delivered"] = "final"
        return section, [final], variant.lora

    def _finish(self, strategy) -> SearchResult:
        from rankwise.stages.cotune import cotune
        from rankwise.stages.per_layer import per_layer
        from rankwise.stages.targets import compare_targets

        s, runner = self.opts.search, self.runner
        # Ranks excluded before training are part of the answer's evidence: listed, skipped.
        trials = strategy.results + [r for r in self.excluded if r not in strategy.results]
        scores = rank_scores(trials)
        params = {r.rank: r.trainable_params for r in trials if r.ok}
        stop = "; ".join([strategy.stop_reason, *self.plan_notes]).strip("; ")
        rec = recommend(scores, self.criterion, stop, self.base_loss, params)
        if self.opts.train.metric != "loss":  # the reason in the metric's terms
            rec = dataclasses.replace(
                rec, reason=metrics.reason(rec, scores, self.criterion, self.opts.train.metric)
            )
        extras: dict = {}
        lora, source = None, strategy.results
        if rec.rank is not None:
            lora = runner.lora_config(rec.rank)
        if s.compare_targets and rec.rank is not None:
            extras["targets"], rec, lora, source = compare_targets(
                runner, self.ladder, self.drive, self.judge, rec, lora, source
            )
        if s.tune and rec.rank is not None:
            extras["tuning"], rec, lora, source = cotune(runner, self.judge, rec, lora, source)
        if rec.rank is not None:  # target sets or co-tuning may have moved the pick
            rec = dataclasses.replace(
                rec, share=improvement_share(rec.loss, self.base_loss, rec.best_loss)
            )
        if s.strategy == "nested" and s.final and rec.rank is not None:
            extras["final"], source, overrides = self.final_trial(rec, strategy)
            lora = runner.lora_config(rec.rank, overrides=overrides) if overrides else lora
        if s.per_layer and rec.rank is not None:
            extras["per_layer"], rec, lora, source = per_layer(
                runner, self.judge, rec, lora, source
            )
        if rec.rank is not None:
            best = min(
                (r for r in source if r.rank == rec.rank and r.ok), key=lambda r: r.best_val_loss
            )
            self.dir.deliver_adapter(best.key)
        summary = diagnose_search(trials)
        extras["diagnosis"] = {"advice": summary["advice"], "counts": summary["counts"]}
        self._write_recommendation(rec, lora, trials, scores, extras)
        self._refresh(final=True)
        self.tracker.close()
        self.progress.done(rec, self.dir.path)
        quantization = self.quantization_config()
        return SearchResult(self.dir.path, trials, scores, rec, lora, quantization)

    def quantization_config(self) -> dict | None:
        """``BitsAndBytesConfig`` keywords of the base (None when not quantized)."""
        m = self.opts.model
        if m.quantize == "none":
            return None
        from rankwise.io.models import pick_dtype
        from rankwise.io.quantize import bnb_config_kwargs

        dtype = str(pick_dtype(m.dtype, self.ctx.device)).rsplit(".", 1)[-1]
        return bnb_config_kwargs(m.quantize, dtype)

    def _write_recommendation(self, rec, lora, trials, scores, extras=None) -> None:
        keys = (
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
        )
        doc = {
            **asdict(rec),
            "criterion": {"kind": self.criterion.kind, "threshold": self.criterion.threshold},
            "base_val_loss": self.base_loss,
            "strategy": self.opts.search.strategy,
            "lora_config": lora,
            "adapter_dir": "adapter" if lora else None,
            "model": self.opts.model.model,
            "name": self.opts.run.name or self.dir.path.name,
            "learning_rate": {
                "lr": self.runner.lr,
                "calibrated": self.lr_record is not None,
                **(self.lr_record or {}),
            },
            "trials": [{k: getattr(t, k) for k in keys} for t in trials],
            "scores": [
                {
                    **asdict(s),
                    "share": improvement_share(s.mean, self.base_loss, best) if s.ok else None,
                }
                for s in scores
            ]
            if (best := rec.best_loss) is not None
            else [asdict(s) for s in scores],
            "alpha_policy": self.opts.lora.alpha_policy,
            "precision": (
                f"fp32 weights, {self.runner.autocast} autocast"
                if self.runner.autocast
                else str(self.ctx.model.dtype).rsplit(".", 1)[-1]
            ),
            "task": self.opts.model.task,
            "quantize": self.opts.model.quantize,
            "quantization_config": self.quantization_config(),
            **self._metric_fields(rec),
            "warnings": self.warnings(),
            **(extras or {}),
        }
        self.dir.write_json("recommendation.json", doc)

    def _metric_fields(self, rec) -> dict:
        """The metric, and for a classifier its labels and the recommendation in its terms."""
        metric = self.opts.train.metric
        out: dict = {"metric": metric}
        if self.opts.model.task == "seq-cls":
            out["labels"] = self.ctx.data.info.get("labels")
        if metric != "loss":
            out["metric_value"] = metrics.shown(metric, rec.loss)
            out["best_metric_value"] = metrics.shown(metric, rec.best_loss)
        return out

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
