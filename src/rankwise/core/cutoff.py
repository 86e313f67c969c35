"""Stopping a trial once it cannot change the answer (``--stop-when-decided``).

A trial of the rank curve at (rank a, seed s) shares its data order and validation blocks
with every finished trial of seed s. At each evaluation its *paired gap* to such a partner
(rank b, the nearest finished rank of that seed) is known, ``g(t) = loss_a(t) - loss_b(t)``,
and if the gap kept its value the trial would end at ``P* + g(t)`` (``P*``: the partner's
best). How far a gap still moves after step t is bounded by :func:`band`: the largest late
move measured on the benchmark pools (bench/RESULTS.md, "Stopping a trial that cannot
change the answer"), or the largest this run has seen, whichever is larger.

The trial stops at an evaluation when every final loss in ``P* + g(t) ± band`` (:data:`POINTS`
of them, both ends and the middle included) leads the search to the same next decision: the
same recommended rank, undecided or not, and the same next trial asked for; and that rank
is not the trial's own (the delivered adapter is always a finished trial). The search is then
told the prediction, with the trial's per-block losses of that evaluation moved to it, which
is exactly what the check assumed, so the decision is the one checked.

Replayed on the five benchmark pools (no training), the rule never changed an answer (0 of
25 searches) and saved 0-13% of the training tokens: the trials it can stop are the clear-cut
ones, while a race trial sits near the bar by construction.

Example (a ladder told r=2 and r=4 of seed 0 asks for r=8; at step 60 of 100, r=8's val loss
is compared with r=4's at step 60):
    >>> from rankwise.records import TrialResult
    >>> from rankwise.core.criteria import Criterion
    >>> from rankwise.core.strategies import Ladder
    >>> t = lambda r, loss, curve: TrialResult(key=f"r{r}-s0", rank=r, seed=0,
    ...     status="complete", best_val_loss=loss, val_curve=curve)
    >>> ladder = Ladder([2, 4, 8, 16], start_rank=2, criterion=Criterion(), base_loss=4.0,
    ...                 max_seeds=1)
    >>> ladder.tell(t(2, 3.30, [(60, 3.6), (100, 3.30)])) if ladder.ask() else None
    >>> ladder.tell(t(4, 3.00, [(60, 3.3), (100, 3.00)])) if ladder.ask() else None
    >>> p = ladder.ask(); p.rank
    8
    >>> cut = Cutoff.for_proposal(ladder, p, ladder.results)
    >>> cut.partner.key, cut(30, 100, 3.9, []) is None   # before 40% of the steps: never
    ('r4-s0', True)
    >>> v = cut(60, 100, 3.45, [3.40, 3.50])   # 0.15 above r=4 at step 60: r=4 stays
    >>> round(v.predicted, 4), v.decision
    (3.15, 'r=4')
    >>> cut(60, 100, 3.31, []) is None    # predicts 3.01: in its band r=8 may still win
    True
    >>> cut(60, 100, 3.20, []) is None    # r=8 would be the answer: it always finishes
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from rankwise.core.criteria import recommend
from rankwise.records import COMPLETE, TrialKind, TrialResult

__all__ = ["Cutoff", "Verdict", "DRIFT", "POINTS", "band", "run_drift", "stopped_early"]

POINTS = 21  # final losses tried across the band: its ends, its middle and 18 between
# The largest late move of a paired gap |g(T) - g(t)| over every pair of ranks and seeds of
# the five stability pools, from this fraction of the steps on (bench/RESULTS.md, "Stopping
# a trial that cannot change the answer"). No trial stops before the first fraction.
DRIFT: tuple[tuple[float, float], ...] = ((0.4, 0.0418), (0.6, 0.0380), (0.8, 0.0111))


def _bucket(fraction: float, drift: Sequence[tuple[float, float]] = DRIFT) -> float | None:
    """The table's fraction that covers ``fraction`` (the last one at or below it)."""
    starts = [f for f, _ in drift if f <= fraction + 1e-9]
    return max(starts) if starts else None


def run_drift(
    results: Sequence[TrialResult], drift: Sequence[tuple[float, float]] = DRIFT
) -> dict[float, float]:
    """The largest late move of a paired gap this run has seen, per bucket of ``drift``:
    over every pair of finished, unstopped trials of one seed that were evaluated at the
    same steps, ``max |g(T) - g(t)|`` for t in the bucket."""
    done = [r for r in results if _finished(r)]
    out: dict[float, float] = {}
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            if a.seed != b.seed or a.rank == b.rank:
                continue
            A, B = dict(a.val_curve), dict(b.val_curve)
            end = max(A)
            if end != max(B) or end <= 0:
                continue
            final = A[end] - B[end]
            for t in A:
                bucket = _bucket(t / end, drift)
                if t < end and t in B and bucket is not None:
                    moved = abs(final - (A[t] - B[t]))
                    out[bucket] = max(out.get(bucket, 0.0), moved)
    return out


def band(
    fraction: float,
    seen: dict[float, float] | None = None,
    drift: Sequence[tuple[float, float]] = DRIFT,
) -> float | None:
    """How far a paired gap may still move after ``fraction`` of the steps: the pools'
    bound or this run's own (``seen``), whichever is larger; None before the first bucket.

    >>> band(0.3), band(0.5), band(0.8, {0.8: 0.02})
    (None, 0.0418, 0.02)
    """
    bucket = _bucket(fraction, drift)
    if bucket is None:
        return None
    return max(dict(drift)[bucket], (seen or {}).get(bucket, 0.0))


def _finished(r: TrialResult) -> bool:
    return (
        r.status == COMPLETE
        and r.kind == TrialKind.MAIN
        and r.best_val_loss is not None
        and bool(r.val_curve)
        and "stopped_early" not in r.extra
    )


@dataclass(frozen=True)
class Verdict:
    """Why a trial stopped: the prediction the search is told, and the evidence."""

    step: int
    max_steps: int
    measured: float  # the trial's val loss at ``step``
    predicted: float  # the partner's best + the paired gap at ``step``
    band: float  # ± nats the final loss may still move
    partner: str  # the key of the finished trial it was paired with
    decision: str  # what the search decides for every loss in the band
    blocks: list[float]

    def reason(self) -> str:
        lo, hi = self.predicted - self.band, self.predicted + self.band
        return (
            f"stopped early: cannot change the answer (step {self.step} of {self.max_steps}: "
            f"{self.measured:.4f}, paired with {self.partner} predicts {self.predicted:.4f}; "
            f"every final loss in {lo:.4f}..{hi:.4f} gives {self.decision})"
        )

    def record(self) -> dict:
        return {
            "step": self.step,
            "max_steps": self.max_steps,
            "measured": self.measured,
            "predicted": self.predicted,
            "band": self.band,
            "partner": self.partner,
            "decision": self.decision,
        }

    def apply(self, result: TrialResult) -> TrialResult:
        """The result the search is told: the prediction, with the evidence recorded."""
        return result.replace(
            best_val_loss=self.predicted,
            val_blocks=list(self.blocks),
            reason=self.reason(),
            extra={**result.extra, "stopped_early": self.record()},
        )


class Cutoff:
    """Decides, at each evaluation of one running trial, whether it can stop.

    Built in the driver when the strategy asks for the trial (:meth:`for_proposal`); it keeps
    a copy of the strategy as it stands then, so the check is the search's own decision.
    """

    def __init__(self, strategy, proposal, partner: TrialResult, seen: dict[float, float],
                 drift: Sequence[tuple[float, float]] = DRIFT):  # fmt: skip
        self.strategy = copy.deepcopy(strategy)
        self.proposal = proposal
        self.partner = partner
        self.partner_curve = dict(partner.val_curve)
        self.seen = seen
        self.drift = tuple(drift)

    @classmethod
    def for_proposal(
        cls, strategy, proposal, results: Sequence[TrialResult], drift=DRIFT
    ) -> Cutoff | None:
        """A cutoff for ``proposal``, or None when no finished trial of its seed pairs with it."""
        if getattr(proposal, "truncations", ()):
            return None
        partners = [
            r
            for r in results
            if _finished(r) and r.seed == proposal.seed and r.rank != proposal.rank
        ]
        if not partners:
            return None
        partner = min(partners, key=lambda r: (abs(r.rank - proposal.rank), r.rank))
        return cls(strategy, proposal, partner, run_drift(results, drift), drift)

    def decision(self, loss: float, blocks: Sequence[float]) -> tuple:
        """(recommended rank, undecided, next trial asked) had the trial ended at ``loss``."""
        s = copy.deepcopy(self.strategy)
        s.tell(self._told(loss, blocks))
        rec = recommend(s.scores(), s.criterion, s.stop_reason, s.base_loss)
        nxt = s.ask()
        return rec.rank, bool(rec.undecided), None if nxt is None else (nxt.rank, nxt.seed)

    def _told(self, loss: float, blocks: Sequence[float]) -> TrialResult:
        p = self.proposal
        return TrialResult(
            key=f"r{p.rank}-s{p.seed}", rank=p.rank, seed=p.seed, status=COMPLETE,
            best_val_loss=loss, val_blocks=list(blocks), extra={"stopped_early": {}},
        )  # fmt: skip

    def __call__(
        self, step: int, max_steps: int, loss: float, blocks: Sequence[float]
    ) -> Verdict | None:
        """A :class:`Verdict` if the trial can stop after this evaluation, else None."""
        if step >= max_steps or step not in self.partner_curve or loss != loss:
            return None
        width = band(step / max_steps, self.seen, self.drift)
        if width is None:
            return None
        guess = self.partner.best_val_loss + loss - self.partner_curve[step]
        shift = guess - loss
        decisions = set()
        for i in range(POINTS):
            x = guess + width * (2 * i / (POINTS - 1) - 1)
            decisions.add(self.decision(x, [b + shift + (x - guess) for b in blocks]))
            if len(decisions) > 1:
                return None
        ((rank, undecided, nxt),) = decisions
        if rank == self.proposal.rank:
            return None  # the answer's own trial always finishes: it is what is delivered
        text = "no answer" if rank is None else f"r={rank}" + (" (undecided)" if undecided else "")
        if nxt is not None:
            text += f", next r={nxt[0]} seed {nxt[1]}"
        return Verdict(
            step, max_steps, loss, guess, width, self.partner.key, text,
            [b + shift for b in blocks],
        )  # fmt: skip


def stopped_early(trials: Sequence[TrialResult]) -> list[dict]:
    """``recommendation.json``'s ``stopped_early``: each stopped trial's evidence and the
    tokens it did not train (its tokens per step × the steps left).

    >>> t = TrialResult(key="r8-s0", rank=8, seed=0, status="complete", steps=40,
    ...     train_tokens=4000, extra={"stopped_early": {"step": 40, "max_steps": 100}})
    >>> stopped_early([t])[0]["tokens_saved"]
    6000
    """
    out = []
    for t in trials:
        cut = t.extra.get("stopped_early")
        if not cut:
            continue
        per_step = (t.train_tokens or 0) / max(1, t.steps or cut.get("step") or 1)
        left = max(0, cut.get("max_steps", 0) - cut.get("step", 0))
        out.append({"key": t.key, "rank": t.rank, "seed": t.seed, **cut,
                    "tokens_saved": int(per_step * left)})  # fmt: skip
    return out
