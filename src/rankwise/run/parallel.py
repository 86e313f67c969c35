"""The parallel search, torch-free: the trial the strategy asks for first, then the ones it may
ask for next, told back in the order a sequential search would ask for them."""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from rankwise.records import COMPLETE, FAILED, TrialResult, TrialSpec

RETRIES = 1  # a trial whose worker died is run once more on a fresh worker


def needed(runner, result: TrialResult) -> TrialResult:
    """A stored result the strategy asked for: no longer speculative (if it was)."""
    if result.extra.get("speculative"):
        return runner.store.annotate(result.key, speculative=None)
    return result


# -- pools: where submitted trials run ------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    """A trial that ended on a worker: its results, or (``results is None``) why the
    worker was lost on the way."""

    key: str
    worker: str
    results: list[TrialResult] | None
    lost: str = ""
    info: dict = field(default_factory=dict)  # where it ran: host, pid


class Pool(Protocol):
    """Worker slots that train submitted specs (:class:`RayPool`; :class:`FakePool` in tests)."""

    def free(self) -> int: ...  # idle slots

    def submit(self, spec: TrialSpec, task: tuple = ()) -> str: ...  # -> the worker's id

    def wait(self) -> Arrival: ...  # the next trial to end (blocks)

    def cancel(self, key: str) -> None: ...  # stop a running trial (its worker is replaced)


# -- the parallel search --------------------------------------------------------------------
@dataclass
class _Job:
    spec: TrialSpec
    predicted: dict
    speculative: bool
    worker: str | None = None  # None: waiting for a free slot
    attempts: list[dict] = field(default_factory=list)


def lost_result(spec: TrialSpec, reason: str) -> TrialResult:
    return TrialResult.of(spec, FAILED, reason)


class _Scheduler:
    """Keeps the pool busy for one strategy: the trial it asks for first, then look-ahead."""

    def __init__(self, runner, variant, pool: Pool):
        self.runner, self.variant, self.pool = runner, variant, pool
        self.log = runner.progress.log
        self.jobs: dict[str, _Job] = {}  # submitted or queued, not yet recorded
        self.asked: set[str] = set()

    def key(self, p) -> str:
        return self.runner.spec_for(p.rank, p.seed, self.variant).key

    def result(self, p, strategy) -> TrialResult:
        """The result of the proposal ``p`` the strategy asked for (run it, or wait for it)."""
        key = self.key(p)
        self.asked.add(key)
        self.waiting_for = p
        if key in self.jobs:
            self.jobs[key].speculative = False
        else:
            spec, settled, predicted = self.runner.prepare(p.rank, p.seed, self.variant)
            if settled is not None:
                return needed(self.runner, settled)
            self.jobs[key] = _Job(spec, predicted, speculative=False)
        while key in self.jobs:
            self._fill(strategy)
            self._arrive(self.pool.wait())
        return needed(self.runner, self.runner.store.result(key))

    def _fill(self, strategy) -> None:
        queued = [j for j in self.jobs.values() if j.worker is None]
        for job in sorted(queued, key=lambda j: j.speculative):
            if self.pool.free() <= 0:
                return
            self._submit(job)
        if self.pool.free() <= 0:
            return
        busy, memo = set(self.jobs), {}

        def known(q) -> TrialResult | None:
            key = self.key(q)
            if key not in memo:
                memo[key] = None if key in busy else self._known(q)
            return memo[key]

        free = self.pool.free()
        for q in lookahead(strategy, self.waiting_for, known, lambda q: self.key(q) in busy, free):
            spec, settled, predicted = self.runner.prepare(q.rank, q.seed, self.variant, False)
            # --branch-at: a trunk runs only when asked, so each seed's trunk is the first of
            # its trials the search asks for, as sequentially (rankwise.run.branching).
            trunk = spec.branch is not None and spec.branch.is_trunk
            if settled is None and not trunk:
                self.jobs[spec.key] = job = _Job(spec, predicted, speculative=True)
                self._submit(job)

    def _known(self, q) -> TrialResult | None:
        """A result the look-ahead can take as given: stored, or a budget skip."""
        return self.runner.prepare(q.rank, q.seed, self.variant, False)[1]

    def _submit(self, job: _Job) -> None:
        job.worker = self.pool.submit(job.spec)
        self.runner.store.start(job.spec)
        note = ["ahead"] if job.speculative else []
        note += ["retry"] if job.attempts else []
        self.runner.progress.trial_started(job.worker, job.spec, ", ".join(note))

    def _arrive(self, a: Arrival) -> None:
        job = self.jobs[a.key]
        if a.results is None:
            job.attempts.append({"worker": a.worker, "status": FAILED, "reason": a.lost})
            if len(job.attempts) <= RETRIES:
                self.log(f"{a.worker}: lost during {a.key} ({a.lost}); retrying on a fresh worker")
                job.worker = None
                return
            result = lost_result(job.spec, f"worker lost {len(job.attempts)} times: {a.lost}")
        else:
            result = a.results[0]
        del self.jobs[a.key]
        self.runner.record(annotated(result, job, a), job.spec)

    def stop(self) -> None:
        """Stop look-ahead trials still running when the search has its answer."""
        for key, job in list(self.jobs.items()):
            if job.worker is not None:
                self.pool.cancel(key)
                self.log(f"{job.worker}: stopped {key} (not needed)")
        if self.jobs:
            self.runner.store.discard_interrupted()
        self.jobs.clear()


def annotated(result: TrialResult, job: _Job, a: Arrival) -> TrialResult:
    """Where the trial ran, earlier lost attempts, and whether it was run ahead."""
    extra = {**result.extra, "worker": a.worker, **a.info}
    if job.attempts:
        extra["attempts"] = job.attempts
    if job.speculative:
        extra["speculative"] = True
    return result.replace(predicted=job.predicted or result.predicted, extra=extra)


def drive_parallel(
    strategy,
    runner,
    variant=None,
    pool: Pool | None = None,
    on_result: Callable[[], None] | None = None,
):
    """Run ``strategy`` on ``pool``, deciding exactly as the sequential loop would.

    The strategy is told results in the order it asks for them; while it waits, free slots
    run what :func:`lookahead` says it may ask for next.
    """
    sched = _Scheduler(runner, variant, pool)
    try:
        while (p := strategy.ask()) is not None:
            if p.truncations:  # a nested run holds the whole pool's attention: no look-ahead
                for result in runner.run_proposal(p, variant):
                    strategy.tell(result)
            else:
                strategy.tell(sched.result(p, strategy))
            if on_result:
                on_result()
    finally:
        sched.stop()
    return strategy


def lookahead(strategy, waiting_for, known, busy, limit: int, max_states: int = 64) -> list:
    """Up to ``limit`` proposals ``strategy`` may ask after ``waiting_for`` (asked, its
    result not told yet), nearest first; ``busy(q)`` ones (running already) are left out.

    A copy of the strategy is told, for every trial whose result is not ``known(q)``, a
    hypothetical result (a rank is "better" than every loss so far, or "flat": the last
    loss again); the proposals of both futures are collected breadth first. A ladder thus
    runs the next rank up and, where a plateau would send it down, the next rank down.
    The real strategy is never touched.
    """
    out: list = []
    frontier = deque([(copy.deepcopy(strategy), waiting_for, {})])
    states = 0
    while frontier and len(out) < limit and states < max_states:
        sim, q, outcomes = frontier.popleft()
        states += 1
        futures = _futures(sim, q, known, outcomes)
        for i, (result, oc) in enumerate(futures):
            s = sim if i == len(futures) - 1 else copy.deepcopy(sim)
            if result is not None:
                s.tell(result)
            nxt = s.ask()
            if nxt is None:
                continue
            if known(nxt) is None and not busy(nxt) and nxt not in out:
                out.append(nxt)
            frontier.append((s, nxt, oc))
    return out[:limit]


_OUTCOMES = ("better", "flat")


def _futures(sim, q, known, outcomes: dict) -> list[tuple[TrialResult | None, dict]]:
    if q is None:
        return [(None, outcomes)]
    result = known(q)
    if result is not None:
        return [(result, outcomes)]
    if q.rank in outcomes:  # the other seeds of a rank share its outcome
        return [(_hypothetical(sim, q, outcomes[q.rank]), outcomes)]
    return [(_hypothetical(sim, q, o), {**outcomes, q.rank: o}) for o in _OUTCOMES]


def _hypothetical(sim, q, outcome: str) -> TrialResult:
    losses = [r.best_val_loss for r in sim.results if r.ok]
    if not losses:
        loss = 1.0
    elif outcome == "flat":
        loss = losses[-1]
    else:
        low = min(losses)
        loss = low * 1e-3 if low > 0 else low - 1e3  # beats any tolerance below 99.9%
    return TrialResult(key="", rank=q.rank, seed=q.seed, status=COMPLETE, best_val_loss=loss)
