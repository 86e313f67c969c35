"""The search's time left (rankwise.core.eta): fake timings first (no torch, milliseconds),
then the progress line and ``rankwise show`` of one tiny real search."""

from __future__ import annotations

import io

import pytest

from rankwise.core.eta import TimeLeft, duration, left_text
from rankwise.records import TrialResult


def trial(key: str, tokens: int, seconds: float, status: str = "complete") -> TrialResult:
    return TrialResult(key=key, rank=1, seed=0, status=status, train_tokens=tokens,
                       wall_seconds=seconds, best_val_loss=3.0, best_step=6,
                       trainable_params=512)  # fmt: skip


@pytest.mark.parametrize(
    "told, trials, expected",
    [
        ([], 5, None),  # nothing measured
        ([(0, 0.0)], 5, None),  # only a skipped trial: still nothing measured
        ([(1000, 10.0)], 5, 4 * 10.0),  # four more full trials of 10 s
        ([(250, 5.0), (1000, 10.0)], 5, 3 * 1000 * 15 / 1250),  # per token: a short run counts
        ([(1000, 10.0)] * 5, 5, None),  # the bound is used up: no claim
        ([(1000, 10.0)] * 6, 5, None),  # ... or exceeded
    ],
)
def test_the_estimate_is_the_trials_left_at_the_measured_seconds_per_token(told, trials, expected):
    left = TimeLeft(trials=trials, trial_tokens=1000)
    for tokens, seconds in told:
        left.tell(tokens, seconds)
    assert left.estimate() == (None if expected is None else pytest.approx(expected))


def test_running_trials_and_the_time_budget_lower_it():
    left = TimeLeft(trials=4, trial_tokens=1000)
    left.tell(1000, 10.0)
    assert left.estimate() == pytest.approx(30.0)
    assert left.estimate(running=[4.0]) == pytest.approx(26.0)
    assert left.estimate(running=[40.0]) == pytest.approx(20.0)  # a slow one: done at most
    assert left.estimate(budget_left=12.0) == pytest.approx(12.0)  # --max-time skips the rest
    assert left.estimate(budget_left=-3.0) == 0.0


def test_the_words():
    assert [duration(s) for s in (5, 99, 100, 5999, 6000)] == [
        "~5s", "~99s", "~2 min", "~100 min", "~1.7 h",
    ]  # fmt: skip
    assert left_text(None) == "" and left_text(840.0) == "at most ~14 min left"


def test_the_progress_line_says_the_time_left(monkeypatch):
    """The line after each trial: trial k of at most n, elapsed, then at most ~X left once a
    trial has finished. A trial counts the search's clock since the previous one ended (the
    work between trials included); one not started here (a skip, a resumed one) its own
    seconds, retain pass included."""
    from rich.console import Console

    from rankwise.report import progress as progress_module
    from rankwise.report.progress import Progress

    from .conftest import make_spec

    now = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    p = Progress(quiet=True, console=Console(file=out, width=300))
    p.plan(12, None, 0.0, TimeLeft(12, 4096))
    assert "left" not in p.status()  # no trial finished: no estimate
    p.count += 1
    p.trial_done(trial("r1-s0", 4096, 50.0).replace(retain_seconds=10.0))
    assert "trial 1 of at most 12" in out.getvalue()
    assert "at most ~11 min left" in out.getvalue()  # 11 trials x 60 s
    now[0] = 10.0  # 10 s of work between the trials, then a trial of 80 s
    with p.trial(make_spec(2, key="r2-s0")):
        assert p.status().endswith("at most ~11 min left")  # 11 x 60 s, the one running 0 s
        now[0] = 40.0
        assert p.status().endswith("at most ~10 min left")  # ... it has run 30 s
        now[0] = 90.0
    p.trial_done(trial("r2-s0", 4096, 80.0))
    assert p.left.seconds == 60.0 + 90.0  # its own 80 s and the 10 s before it
    assert p.status().endswith("at most ~12 min left")  # 10 trials x 75 s
    p.plan(12, 100.0, 0.0, TimeLeft(12, 4096))
    p.trial_done(trial("r1-s0", 4096, 60.0))
    assert p.status().endswith("at most ~10s left, 10s of --max-time left")  # the budget caps it


def test_a_tiny_search_reports_its_time_left(llama_dir, text_jsonl, tmp_path, capsys):
    """The progress lines of a real search carry the estimate after its first trial, and
    `rankwise show` of the unfinished run (its recommendation.json removed) gives the one
    the stored plan and trials make."""
    from rankwise import search
    from rankwise.report.summary import summary_markdown
    from rankwise.report.view import load_run

    from .conftest import fast_args

    out = tmp_path / "run"
    search(model=str(llama_dir), train=str(text_jsonl), out=str(out), ranks=[1, 2],
           start_rank=1, **fast_args())  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if "of at most" in line]
    # At most 2 trials (r=1, r=2 at the given --lr): after the first, one is left; after
    # the second, none, and the line makes no claim.
    assert [("at most ~" in line) for line in lines] == [True, False], lines
    assert load_run(out).time_left is None  # finished: nothing left
    # The same run as if it were live with 3 trials to go: no recommendation.json yet, a
    # bound of 5 trials in the plan the search stored.
    from rankwise.storage.store import RunStore

    (out / "recommendation.json").unlink()
    store = RunStore(out)
    plan = store.get_meta("time_left")
    assert plan == {"trials": 2, "trial_tokens": 6 * 4 * 32, "uncounted": []}  # steps·batch·seq
    store.set_meta("time_left", {**plan, "trials": 5})
    times = store.times()
    store.close()
    view = load_run(out)
    first, second = sorted((r for r in view.results if r.kind != "base"), key=lambda r: r.rank)
    # The first trial counts its own seconds (retain pass included), the second the clock
    # from the first one's end to its own.
    seconds = first.wall_seconds + first.retain_seconds + times["r2-s0"][1] - times["r1-s0"][1]
    per_token = seconds / (first.train_tokens + second.train_tokens)
    assert view.time_left == pytest.approx(3 * per_token * plan["trial_tokens"])
    assert f"- **time left**: at most {duration(view.time_left)}\n" in summary_markdown(out)
