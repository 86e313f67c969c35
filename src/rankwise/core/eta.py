"""How long a search may still take: the trials it may still run, each as long as the
trials so far say a trial takes. Plain numbers in and out; no torch.

The bound on trials is the strategy's most (``rankwise.study.session.max_trials``: every
rank, seed, race and calibration run it could still ask for), so the estimate is an upper
bound whenever the trials so far are typical: a ladder that stops early, or trials that stop
early, finish sooner. A trial's time is its planned tokens (max_steps x batch x grad_accum x
seq_len) at the seconds per token the settled trials took on the search's clock: each from
the previous trial's end (:func:`clock_seconds`), so the work between trials (diagnosis,
the report) counts, and trials on parallel workers count their share of the wall. Per token
rather than per trial: the learning-rate calibration's runs are a fraction of a rank trial,
and a nested run's truncations train no tokens of their own. How far it is from the time
searches then took: ``bench/eta.py`` (bench/RESULTS.md, "Time left").

    >>> left = TimeLeft(trials=12, trial_tokens=4096)
    >>> left.estimate() is None   # nothing measured yet
    True
    >>> left.tell(train_tokens=1024, wall_seconds=15.0)  # a quarter-length calibration run
    >>> left.estimate()            # 11 more trials of 4096 tokens at 15/1024 s per token
    660.0
    >>> left_text(left.estimate())
    'at most ~11 min left'
    >>> left.estimate(running=[20.0])  # one of them has run for 20 s
    640.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TimeLeft", "clock_seconds", "duration", "left_text", "RESUME_GAP"]

RESUME_GAP = 60.0
"""Seconds between one trial's end and the next one's start beyond which the search was
stopped in between (a resumed run): the trial then counts its own seconds, not the gap."""


def clock_seconds(started: float, finished: float, previous_end: float | None, own: float) -> float:
    """A settled trial's share of the search's clock: the time since the previous trial
    ended (on parallel workers, less than its own wall), or its ``own`` seconds when it is
    the first or follows a stop.

    >>> clock_seconds(101.0, 111.0, 100.0, own=10.0)  # 1 s of work between the trials
    11.0
    >>> clock_seconds(5000.0, 5010.0, 100.0, own=10.0)  # the search was resumed
    10.0
    """
    if previous_end is None or started - previous_end > RESUME_GAP:
        return own
    return max(0.0, finished - previous_end)


@dataclass
class TimeLeft:
    """The search's time left, told each trial as it finishes (or is skipped)."""

    trials: int
    """At most this many trials in the whole search, those already settled included."""
    trial_tokens: int
    """Tokens one full trial trains (a trial that stops early trains fewer)."""
    settled: int = 0
    """Trials finished, failed or skipped so far."""
    tokens: int = 0
    """Tokens those trials trained."""
    seconds: float = 0.0
    """Their wall seconds."""

    def tell(self, train_tokens: int, wall_seconds: float) -> None:
        """One more trial settled (a skipped one trained 0 tokens in 0 s)."""
        self.settled += 1
        self.tokens += max(0, int(train_tokens or 0))
        self.seconds += max(0.0, float(wall_seconds or 0.0))

    def seconds_per_token(self) -> float | None:
        """Measured wall seconds per trained token; None before any trial trained one."""
        return self.seconds / self.tokens if self.tokens > 0 else None

    def trial_seconds(self) -> float | None:
        """A full trial's predicted wall seconds."""
        per_token = self.seconds_per_token()
        return None if per_token is None else per_token * self.trial_tokens

    def estimate(
        self, running: Sequence[float] = (), budget_left: float | None = None
    ) -> float | None:
        """Seconds left at most: every trial not yet settled at a full trial's time, less what
        the ``running`` ones have already run (their seconds so far), and never past what
        ``--max-time`` leaves (``budget_left``: a trial that would not fit is skipped). None
        before anything was measured, and once the bound is used up (it then says nothing)."""
        trial = self.trial_seconds()
        left = self.trials - self.settled
        if trial is None or left <= 0:
            return None
        seconds = left * trial - sum(min(trial, max(0.0, s)) for s in list(running)[:left])
        if budget_left is not None:
            seconds = min(seconds, max(0.0, budget_left))
        return max(0.0, seconds)


def duration(seconds: float) -> str:
    """A rough duration for a person: seconds below 100 s, minutes below 100 min, then hours.

    >>> duration(42.4), duration(840), duration(3 * 3600 + 1200)
    ('~42s', '~14 min', '~3.3 h')
    """
    if seconds < 100:
        return f"~{seconds:.0f}s"
    if seconds < 6000:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def left_text(seconds: float | None) -> str:
    """'at most ~14 min left', or '' when there is no estimate."""
    return "" if seconds is None else f"at most {duration(seconds)} left"
