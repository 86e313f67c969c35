"""Terminal progress: a bar per trial (step, loss, ETA) and a line per finished trial.

Written to stderr with rich; ``quiet`` keeps only the per-trial log lines, which is
also what a non-interactive terminal (CI logs) gets.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rankwise.core import metrics
from rankwise.core.eta import TimeLeft, clock_seconds, left_text
from rankwise.records import COMPLETE, TrialResult, TrialSpec
from rankwise.storage.rundir import RunDir

__all__ = ["Progress", "trial_line", "score_text"]


def trial_line(r: TrialResult) -> str:
    """One log line for a finished trial."""
    head = f"r={r.rank:<4} seed={r.seed} {r.status:<8}"
    if r.status != COMPLETE:
        return f"{head} {r.reason}"
    mem = f"{r.peak_memory_bytes / 2**20:.0f} MiB" if r.peak_memory_bytes else "-"
    tps = f"{r.tokens_per_second:,.0f} tok/s" if r.tokens_per_second else "-"
    flag = " (stopped at --max-trial-time)" if r.time_limited else ""
    if r.early_stopped:
        flag = f" (early stopped at step {r.steps})"
    return (
        f"{head} best {score_text(r)} @ step {r.best_step}  "
        f"params {r.trainable_params:,}  {r.wall_seconds:.1f}s  {tps}  peak {mem}{flag}"
    )


def score_text(r: TrialResult) -> str:
    """'val loss 2.1000', or for a classifier 'accuracy 0.9000 (val loss 0.3100, macro-F1 0.8800)'."""
    main = metrics.describe(r.metric, r.best_val_loss)
    others = [f"{metrics.label(k)} {v:.4f}" for k, v in r.val_metrics.items() if k != r.metric]
    return main + (f" ({', '.join(others)})" if others else "")


class Progress:
    def __init__(self, quiet: bool = False, console=None):
        from rich.console import Console

        self.console = console or Console(file=sys.stderr, highlight=False)
        self.quiet = quiet or not self.console.is_terminal
        self.started = time.perf_counter()
        self.count = 0
        self.total: int | None = None
        self.budget: float | None = None
        self.before = 0.0
        self.left: TimeLeft | None = None
        self.running: dict[str, float] = {}  # trial key -> when it started (perf_counter)
        self.last_end: float | None = None  # when the last trial settled

    def plan(
        self,
        total: int,
        budget: float | None,
        elapsed_before: float = 0.0,
        left: TimeLeft | None = None,
    ) -> None:
        """At most ``total`` rank trials; ``budget`` seconds for the whole search (--max-time);
        ``left``: the time-left estimate, told the trials already stored (told each new one)."""
        self.total, self.budget, self.before, self.left = total, budget, elapsed_before, left

    def status(self) -> str:
        """'trial k of at most n, elapsed, time left, budget left' for the bar and the lines."""
        elapsed = self.before + time.perf_counter() - self.started
        text = f"trial {self.count}" + (f" of at most {self.total}" if self.total else "")
        text += f", {elapsed:.0f}s elapsed"
        budget_left = max(0.0, self.budget - elapsed) if self.budget else None
        if self.left is not None:
            now = time.perf_counter()
            running = [now - t for t in self.running.values()]
            if left := left_text(self.left.estimate(running, budget_left)):
                text += f", {left}"
        if budget_left is not None:
            text += f", {budget_left:.0f}s of --max-time left"
        return text

    def log(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def trial(self, spec: TrialSpec):
        """Yields the per-step callback ``(step, total, loss)`` for run_trial."""
        self.count += 1
        self.running[spec.key] = time.perf_counter()  # until trial_done tells its result
        if self.quiet:
            yield None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        label = f"r={spec.rank} seed={spec.seed} ({self.status()})"
        columns = [
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Bar(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(label, total=spec.train.max_steps, loss="-")

            def update(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, loss=f"{loss:.4f}")

            yield update

    def trial_started(self, worker: str, spec: TrialSpec, note: str = "") -> None:
        """A trial started on a worker (parallel search: no bar, one line per start)."""
        self.count += 1
        self.running[spec.key] = time.perf_counter()
        note = f" ({note})" if note else ""
        self.log(f"{worker}: started r={spec.rank} seed={spec.seed}{note}  ({self.status()})")

    def trial_done(self, result: TrialResult) -> None:
        now, started = time.perf_counter(), self.running.pop(result.key, None)
        if self.left is not None:  # a result never started here (a skip) counts its own
            own = result.wall_seconds + result.retain_seconds
            seconds = own if started is None else clock_seconds(started, now, self.last_end, own)
            self.left.tell(result.train_tokens, seconds)
        self.last_end = now
        group = f"[{result.group}] " if result.group else ""
        worker = f"{result.extra['worker']}: " if result.extra.get("worker") else ""
        ahead = " (speculative)" if result.extra.get("speculative") else ""
        self.log(f"{worker}{group}{trial_line(result)}{ahead}  ({self.status()})")

    def done(self, rec, run_dir) -> None:
        """The answer: its headline, then its evidence lines (``rec``: the
        :class:`~rankwise.report.document.RecommendationDoc`; a bare Recommendation has
        only its reason)."""
        self.log(f"recommendation: {getattr(rec, 'headline', '') or rec.reason}")
        for line in getattr(rec, "evidence", ()):
            self.log(f"  {line}")
        if rec.rank is not None:
            d = RunDir(run_dir)
            self.log(f"adapter: {d.adapter}   details: {d.summary}, {d.report}")
