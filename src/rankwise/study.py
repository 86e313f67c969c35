"""The convenience loop: a strategy asks, a trial runs, the store records, until done.

Example (a real, if tiny, search):
    >>> import tempfile, json
    >>> from rankwise.testing import save_tiny_model
    >>> d = tempfile.mkdtemp()
    >>> model = save_tiny_model(f"{d}/model")
    >>> _ = open(f"{d}/train.txt", "w").write("\\n".join(f"line {i} of text" for i in range(40)))
    >>> result = search(model=str(model), train=f"{d}/train.txt", out=f"{d}/run", ranks=[1, 2],
    ...                 start_rank=1, max_steps=2, batch_size=2, seq_len=16, quiet=True)
    >>> result.recommendation.rank in (1, 2)
    True
"""

from __future__ import annotations

import gc
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import DEFAULT_RANKS, ConfigError, Options, format_bytes
from .diagnose import diagnose, diagnose_search
from .records import SKIPPED, TrialResult, TrialSpec
from .resources import current_rss
from .search import Grid, Ladder, RankScore, Recommendation, recommend

__all__ = ["Study", "SearchResult", "Variant", "search", "run_dir_for"]

CALIBRATION = "lr"


@dataclass(frozen=True)
class Variant:
    """A departure from the run's settings for some trials: learning-rate calibration,
    co-tuning, another target set. Trials of a variant are stored under its ``group``;
    the rank curve is made of group "" only."""

    group: str = ""
    lr: float | None = None
    max_steps: int | None = None
    lora: tuple = ()


MAIN = Variant()


@dataclass
class SearchResult:
    """What a search returns: every trial, the per-rank scores, the recommendation."""

    run_dir: Path
    trials: list[TrialResult]
    scores: list[RankScore]
    recommendation: Recommendation
    lora_config: dict | None

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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(text)).stem).strip("-")[:40] or "run"


def run_dir_for(opts: Options) -> Path:
    if opts.run.out:
        return Path(opts.run.out)
    return Path("runs") / (opts.run.name or f"{_slug(opts.model.model)}-{_slug(opts.data.train)}")


class Study:
    """Runs a search for one :class:`~rankwise.config.Options`, persisting every trial."""

    def __init__(self, opts: Options, console=None):
        from .progress import Progress

        self.opts = opts
        self.dir = run_dir_for(opts)
        self.progress = Progress(quiet=opts.run.quiet, console=console)
        self.elapsed_before = 0.0
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
            n += len(tc.lr_candidates) * (2 if tc.lr_check_largest_rank else 1)
        if s.tune:
            n += 2 * (2 * ("dropout" in s.tune) + 4 * ("alpha" in s.tune))
        return n + (s.strategy == "nested" and s.final)

    def warnings(self) -> list[str]:
        """Settings that make the rank comparison unfair, said before the search spends time."""
        out = []
        if self.opts.lora.alpha_policy == "ratio":
            out.append(
                f"--alpha-policy ratio: lora_alpha = {self.opts.lora.alpha_ratio:g}*r, so under "
                "Adam a higher rank also acts like a larger learning rate; gains on the curve mix "
                "capacity with step size (--alpha-policy fixed compares capacity)"
            )
        return out

    def _check_out_dir(self) -> None:
        d = self.dir
        if d.exists() and not d.is_dir():
            raise ConfigError(f"--out: {d} exists and is not a directory")
        probe = d if d.exists() else next(p for p in d.absolute().parents if p.exists())
        import os

        if not probe.is_dir():
            raise ConfigError(f"--out: cannot create {d}: {probe} is not a directory")
        if not os.access(probe, os.W_OK):
            raise ConfigError(f"--out: cannot write to {d} (permission denied on {probe})")
        if (d / "trials.sqlite").exists():  # refuse a mismatch before touching anything
            from .store import RunStore

            ro = RunStore(d, readonly=True)
            stored = ro.get_meta("identity")
            ro.close()
            if stored is not None and not self.opts.run.force:
                RunStore.check_identity(
                    d, stored, self.opts.identity(), Options.identity_defaults()
                )

    def _setup(self):
        from .data import prepare_data, save_tokens
        from .models import check_targets, load_model
        from .store import RunStore
        from .trial import TrialContext

        self._check_out_dir()
        from .tracking import make_tracker

        self.tracker = make_tracker(self.opts.run.report_to, self.dir)
        model, tokenizer, device = load_model(self.opts.model)
        self.ranks = self._fit_ranks(model)
        n_params = sum(p.numel() for p in model.parameters())
        start = self.opts.search.start_rank_for(n_params)
        self.start_rank = (
            start if start in self.ranks else min(self.ranks, key=lambda r: abs(r - start))
        )
        self.targets = check_targets(model, self.opts.lora.target_modules, self.ranks)
        data = prepare_data(self.opts.data, tokenizer, self.dir, self.opts.train.seed)
        try:
            self.store = RunStore(self.dir)
        except OSError as exc:
            raise ConfigError(f"--out: cannot write to {self.dir} ({exc})") from None
        if self.store.claim(
            self.opts.identity(), force=self.opts.run.force, defaults=Options.identity_defaults()
        ):
            for stale in ("adapter", "trials", "recommendation.json", "report.html", "summary.md"):
                path = self.dir / stale
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.store.set_meta("options", self.opts.to_flat())
        self.store.set_meta("name", self.opts.run.name or self.dir.name)
        self.store.set_meta("data", data.info)
        save_tokens(data, self.dir)
        self.ctx = TrialContext(model, tokenizer, device, data)
        gc.freeze()  # the model's objects are permanent: keep them out of every collection
        self.device = device

    def _fit_ranks(self, model) -> list[int]:
        """Default rank list: drop ranks the model's layers cannot hold; explicit: check them."""
        from .models import check_targets, linear_module_names

        ranks = self.opts.search.ranks
        if ranks == DEFAULT_RANKS:
            matched = check_targets(model, self.opts.lora.target_modules, [1])
            sizes = linear_module_names(model)
            cap = min(min(sizes[n]) for n in matched)
            ranks = [r for r in ranks if r <= cap]
        return ranks

    def _strategy(self):
        s = self.opts.search
        seeds = s.seeds
        if s.strategy == "grid":
            return Grid(ranks=self.ranks, seeds=seeds)
        return Ladder(
            ranks=self.ranks,
            start_rank=self.start_rank,
            tolerance=s.tolerance,
            patience=s.patience,
            seeds=seeds,
        )

    # -- trials --------------------------------------------------------------------------
    def lora_kwargs(self, rank: int, target_modules: list[str] | None = None) -> dict:
        lo = self.opts.lora
        targets = target_modules or lo.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        elif targets is None:
            targets = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
        return {
            "r": rank,
            "lora_alpha": lo.alpha_for(rank),
            "target_modules": targets,
            "lora_dropout": lo.dropout,
            "bias": lo.bias,
            "use_rslora": lo.alpha_policy == "rslora",
        }

    def spec_for(self, rank: int, seed: int, variant: Variant | None = None) -> TrialSpec:
        v = variant or MAIN
        key = f"{v.group}/r{rank}-s{seed}" if v.group else f"r{rank}-s{seed}"
        train = asdict(self.opts.train)
        train["seed"] = self.opts.train.seed + seed
        train["max_trial_time"] = self.opts.search.max_trial_time
        train["lr"] = v.lr or self.lr
        if v.max_steps:
            train["max_steps"] = v.max_steps
        return TrialSpec(
            key=key,
            rank=rank,
            seed=seed,
            lora={**self.lora_kwargs(rank), **dict(v.lora)},
            train=train,
            model=asdict(self.opts.model),
            data_dir=str(self.dir / "data"),
            group=v.group,
            adapter_dir=str(self.dir / "trials" / key.replace("/", "_") / "adapter"),
        )

    def budget_check(self, rank: int, variant: Variant | None = None) -> tuple[str | None, dict]:
        """Why a rank must be skipped before training (or None), and the predicted figures."""
        s = self.opts.search
        predicted = self.predict(rank, variant)
        done = [
            r for r in self.store.results() if r.ok and not r.group and not r.extra.get("nested")
        ]
        if done:
            predicted["wall_seconds"] = sum(r.wall_seconds for r in done) / len(done)
        if s.max_rank is not None and rank > s.max_rank:
            return f"r={rank} > --max-rank {s.max_rank}", predicted
        if (
            s.max_trainable_params is not None
            and predicted["trainable_params"] > s.max_trainable_params
        ):
            return (
                f"{predicted['trainable_params']:,} trainable params > "
                f"--max-trainable-params {s.max_trainable_params:,}"
            ), predicted
        if s.max_memory is not None and predicted["peak_memory_bytes"] > s.max_memory:
            return (
                f"predicted peak memory {format_bytes(predicted['peak_memory_bytes'])} > "
                f"--max-memory {format_bytes(s.max_memory)}"
            ), predicted
        if s.max_adapter_size is not None and predicted["adapter_bytes"] > s.max_adapter_size:
            return (
                f"adapter size {format_bytes(predicted['adapter_bytes'])} > "
                f"--max-adapter-size {format_bytes(s.max_adapter_size)}"
            ), predicted
        if s.max_time is not None and "wall_seconds" in predicted:
            spent = self.elapsed()
            if spent + predicted["wall_seconds"] > s.max_time:
                return (
                    f"time budget: {spent:.0f}s spent + ~{predicted['wall_seconds']:.0f}s "
                    f"for this trial > --max-time {s.max_time:.0f}s"
                ), predicted
        return None, predicted

    def predict(self, rank: int, variant: Variant | None = None) -> dict:
        """What a trial at ``rank`` will cost, before it runs (rankwise.estimate)."""
        from .estimate import estimate

        lora = {**self.lora_kwargs(rank), **dict(variant.lora if variant else ())}
        e = estimate(
            self.ctx.model,
            ranks=[rank],
            target_modules=lora["target_modules"],
            batch_size=self.opts.train.batch_size,
            seq_len=self.opts.data.seq_len,
            dtype=str(self.ctx.model.dtype).rsplit(".", 1)[-1],
            bias=self.opts.lora.bias,
            device=self.device,
            baseline_bytes=self.baseline_bytes,
        )[0]
        return {
            "trainable_params": e.trainable_params,
            "adapter_bytes": e.adapter_bytes,
            "peak_memory_bytes": e.peak_memory_bytes,
        }

    def _skipped(
        self, spec: TrialSpec, reason: str, predicted: dict, key: str | None = None
    ) -> TrialResult:
        return TrialResult(
            key=key or spec.key,
            rank=spec.rank,
            seed=spec.seed,
            group=spec.group,
            status=SKIPPED,
            reason=reason,
            lora_alpha=spec.lora["lora_alpha"],
            predicted=predicted,
            trainable_params=predicted["trainable_params"],
            extra={"diagnosis": {"label": "n/a", "advice": "", "evidence": reason}},
        )

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def run_one(self, rank: int, seed: int, variant: Variant | None = None) -> TrialResult:
        from .trial import run_trial

        spec = self.spec_for(rank, seed, variant)
        stored = self.store.result(spec.key)
        if stored is not None and stored.status != SKIPPED:
            return stored
        if stored is not None:
            self.store.forget(spec.key)  # budgets may have changed: decide again
        skip, predicted = self.budget_check(rank, variant)
        if skip:
            result = self._skipped(spec, skip, predicted)
            self.store.finish(result, spec)
            self.progress.trial_done(result)
            return result
        self.store.start(spec)
        with self.progress.trial(spec) as bar:
            result = run_trial(spec, self.ctx, progress=bar)
        diagnosis = diagnose(result).to_dict()
        result = result.replace(predicted=predicted, extra={**result.extra, "diagnosis": diagnosis})
        self.store.finish(result)
        self.tracker.log_trial(result, spec)
        self.progress.trial_done(result)
        return result

    def calibrate_lr(self, rank: int, meta_key: str = "lr_calibration") -> float:
        """Short runs at each candidate rate at ``rank``; the lowest best val loss wins."""
        tc = self.opts.train
        steps = max(1, math.ceil(tc.max_steps * tc.lr_calibration_fraction))
        self.progress.log(
            f"calibrating the learning rate at r={rank}: {len(tc.lr_candidates)} runs of "
            f"{steps} steps ({', '.join(f'{lr:g}' for lr in tc.lr_candidates)})"
        )
        tried = []
        for lr in tc.lr_candidates:
            variant = Variant(group=f"{CALIBRATION}-{lr:g}", lr=lr, max_steps=steps)
            tried.append((lr, self.run_one(rank, 0, variant)))
        ok = [(r.best_val_loss, lr) for lr, r in tried if r.ok]
        if not ok:
            raise ConfigError(
                "--lr-candidates: every calibration run failed ("
                + "; ".join(f"{lr:g}: {r.reason}" for lr, r in tried)
                + "); give --lr or other candidates"
            )
        best = min(ok)[1]
        table = {f"{lr:g}": r.best_val_loss for lr, r in tried}
        self.store.set_meta(meta_key, {"rank": rank, "steps": steps, "lr": best, "losses": table})
        self.progress.log(f"learning rate: {best:g} (best val loss at r={rank} in {steps} steps)")
        return best

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> SearchResult:
        self._setup()
        self.t0 = time.perf_counter()
        self.elapsed_before = sum(r.wall_seconds for r in self.store.results())
        s = self.opts.search
        self.progress.plan(self.max_trials(), s.max_time, self.elapsed_before)
        for warning in self.warnings():
            self.progress.log(f"warning: {warning}")
        self.lr = self.opts.train.lr or self.calibrate_lr(self.start_rank)
        if self.opts.train.lr is None and self.opts.train.lr_check_largest_rank:
            # Under a fixed alpha one rate should serve every rank ("LoRA Without Regret"):
            # calibrate again at the largest rank and report both.
            other = self.calibrate_lr(self.ranks[-1], "lr_calibration_largest_rank")
            same = "the same rate" if other == self.lr else "a different rate"
            self.progress.log(
                f"calibration at r={self.ranks[-1]} picked {other:g}: {same} "
                f"as at r={self.start_rank} ({self.lr:g}), which the search uses"
            )
        if self.opts.search.strategy == "nested":
            return self._finish(self.nested_curve())
        strategy = self._strategy()
        self.drive(strategy)
        return self._finish(strategy)

    def nested_curve(self) -> Grid:
        """The whole rank curve from one nested-rank run per seed (rankwise.nested)."""
        from .nested import nested_key, run_nested

        s = self.opts.search
        curve = Grid(ranks=self.ranks, seeds=s.seeds)
        allowed = []
        for rank in self.ranks:
            skip, predicted = self.budget_check(rank)
            if not skip:
                allowed.append(rank)
                continue
            for seed in range(s.seeds):
                key = nested_key(rank, seed)
                if self.store.result(key) is None:
                    spec = self.spec_for(rank, seed)
                    self.store.finish(self._skipped(spec, skip, predicted, key), spec)
        if not allowed:
            curve.stop_reason = "no rank fits the budgets"
            curve.results = self.store.results()
            return curve
        r_max = allowed[-1]
        for seed in range(s.seeds):
            stored = [self.store.result(nested_key(r, seed)) for r in allowed]
            if any(r is None for r in stored):
                spec = self.spec_for(r_max, seed)
                spec = TrialSpec(**{**asdict(spec), "key": nested_key(r_max, seed)})
                self.store.start(spec)
                with self.progress.trial(spec) as bar:
                    stored = run_nested(
                        spec,
                        allowed,
                        self.ctx,
                        self.opts.lora.scaling,
                        s.nested_distribution,
                        progress=bar,
                    )
                stored = [self._record(r, spec) for r in stored]
            for r in stored:
                curve.tell(r)
        for r in self.store.results():
            if r.status == SKIPPED and not r.group:
                curve.tell(r)
        curve.stop_reason = (
            f"one nested run per seed at r_max={r_max}, ranks {','.join(map(str, allowed))} "
            f"drawn {s.nested_distribution}"
            + (
                f"; r={self.ranks[len(allowed)]} and above over budget"
                if len(allowed) < len(self.ranks)
                else ""
            )
        )
        self._refresh()
        return curve

    def _record(self, result: TrialResult, spec: TrialSpec) -> TrialResult:
        diagnosis = diagnose(result).to_dict()
        result = result.replace(extra={**result.extra, "diagnosis": diagnosis})
        self.store.finish(result, spec)
        self.tracker.log_trial(result, spec)
        self.progress.trial_done(result)
        return result

    def final_trial(self, rec: Recommendation, curve) -> tuple[dict, list[TrialResult]]:
        """An ordinary trial at the nested curve's choice, compared with the curve's point."""
        final = self.run_one(rec.rank, 0, Variant(group="final"))
        point = next(
            (r for r in curve.results if r.rank == rec.rank and r.ok and r.seed == 0), None
        )
        section = {
            "rank": rec.rank,
            "status": final.status,
            "final_val_loss": final.best_val_loss,
            "nested_val_loss": point.best_val_loss if point else None,
        }
        if final.ok and point:
            section["difference"] = final.best_val_loss - point.best_val_loss
        return section, [final] if final.ok else curve.results

    def drive(self, strategy, variant: Variant | None = None):
        """Ask/run/tell until the strategy is done; the report is refreshed after each trial."""
        while (p := strategy.ask()) is not None:
            strategy.tell(self.run_one(p.rank, p.seed, variant))
            self._refresh()
        return strategy

    def _finish(self, strategy) -> SearchResult:
        from . import compare

        scores = strategy.scores()
        rec = recommend(scores, self.opts.search.tolerance, strategy.stop_reason)
        extras: dict = {}
        lora, source = None, strategy.results
        if rec.rank is not None:
            lora = {**self.lora_kwargs(rec.rank), "task_type": "CAUSAL_LM"}
        if self.opts.search.compare_targets and rec.rank is not None:
            extras["targets"], rec, lora, source = compare.compare_targets(self, rec, lora, source)
        if self.opts.search.tune and rec.rank is not None:
            extras["tuning"], rec, lora, source = compare.cotune(self, rec, lora, source)
        if (
            self.opts.search.strategy == "nested"
            and self.opts.search.final
            and rec.rank is not None
        ):
            extras["final"], source = self.final_trial(rec, strategy)
        if rec.rank is not None:
            self._deliver_adapter(rec.rank, source)
        summary = diagnose_search(strategy.results)
        extras["diagnosis"] = {"advice": summary["advice"], "counts": summary["counts"]}
        self._write_recommendation(rec, lora, strategy.results, scores, extras)
        self._refresh(final=True)
        self.tracker.close()
        self.progress.done(rec, self.dir)
        return SearchResult(self.dir, strategy.results, scores, rec, lora)

    def _deliver_adapter(self, rank: int, results: list[TrialResult]) -> None:
        best = min((r for r in results if r.rank == rank and r.ok), key=lambda r: r.best_val_loss)
        src = self.dir / "trials" / best.key.replace("/", "_") / "adapter"
        dst = self.dir / "adapter"
        tmp = self.dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)

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
            "extra",
            "predicted",
        )
        doc = {
            **asdict(rec),
            "tolerance": self.opts.search.tolerance,
            "strategy": self.opts.search.strategy,
            "lora_config": lora,
            "adapter_dir": "adapter" if lora else None,
            "model": self.opts.model.model,
            "name": self.opts.run.name or self.dir.name,
            "trials": [{k: getattr(t, k) for k in keys} for t in trials],
            "scores": [asdict(s) for s in scores],
            "alpha_policy": self.opts.lora.alpha_policy,
            "warnings": self.warnings(),
            **(extras or {}),
        }
        tmp = self.dir / "recommendation.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.dir / "recommendation.json")

    def _refresh(self, final: bool = False) -> None:
        """Rewrite summary.md and report.html so a running search can be watched.

        summary.md after every trial; report.html too unless trials are so short that drawing
        it would dominate (then at most every 5 s and 5x its own drawing time), and at the end.
        """
        from . import report

        view = report.load_run(self.dir)
        report.write_summary(view)
        now = time.perf_counter()
        last, cost = getattr(self, "_drawn", (None, 0.0))
        if final or last is None or now - last >= max(5.0, 5 * cost):
            report.write_report(view)
            self._drawn = (time.perf_counter(), time.perf_counter() - now)
