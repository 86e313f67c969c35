"""``--stop-when-decided``: a trial stops once it cannot change the answer (rankwise.core.cutoff).

The decisions protected: a stopped trial never changes the answer against the same search
without stopping; the answer's own trial always finishes; the search is told exactly the
result the check assumed; and the record of the stop is visible in ``show``.
"""

from __future__ import annotations

import json

import pytest

from rankwise.core.criteria import Criterion
from rankwise.core.cutoff import DRIFT, Cutoff, band, run_drift
from rankwise.core.strategies import Ladder
from rankwise.records import TrialResult
from tests.conftest import check_error, search_argv


def _trial(rank, loss, curve, seed=0, **kw) -> TrialResult:
    return TrialResult(key=f"r{rank}-s{seed}", rank=rank, seed=seed, status="complete",
                       best_val_loss=loss, val_curve=curve, **kw)  # fmt: skip


def _ladder_at_r8() -> tuple[Ladder, object]:
    ladder = Ladder([2, 4, 8, 16], start_rank=2, criterion=Criterion(), base_loss=4.0,
                    max_seeds=1)  # fmt: skip
    for rank, loss in ((2, 3.30), (4, 3.00)):
        assert ladder.ask().rank == rank
        ladder.tell(_trial(rank, loss, [(60, loss + 0.3), (100, loss)]))
    return ladder, ladder.ask()


def test_the_search_is_told_exactly_what_the_check_assumed():
    ladder, p = _ladder_at_r8()
    cut = Cutoff.for_proposal(ladder, p, ladder.results)
    blocks = [3.40, 3.45, 3.50]
    verdict = cut(60, 100, 3.45, blocks)
    assert verdict is not None and verdict.partner == "r4-s0"
    told = verdict.apply(_trial(8, 3.45, [(60, 3.45)], trainable_params=64))
    # the partner's best + the paired gap at step 60; the blocks moved with it
    assert told.best_val_loss == pytest.approx(3.00 + 3.45 - 3.30)
    assert told.val_blocks == pytest.approx([b - 0.30 for b in blocks])
    assert told.extra["stopped_early"]["partner"] == "r4-s0"
    assert told.reason.startswith("stopped early: cannot change the answer (step 60 of 100")
    # telling it gives the decision the check made for every loss in the band
    ladder.tell(told)
    assert ladder.ask() is None
    assert cut.decision(told.best_val_loss, told.val_blocks)[0] == 4


def test_a_trial_that_may_become_the_answer_finishes():
    ladder, p = _ladder_at_r8()
    cut = Cutoff.for_proposal(ladder, p, ladder.results)
    assert cut(60, 100, 3.31, []) is None  # predicted 3.01: within the band r=8 may win
    assert cut(60, 100, 3.00, []) is None  # r=8 would be the answer: never stopped
    assert cut(30, 100, 3.90, []) is None  # before 40% of the steps no band is known
    assert cut(50, 100, 3.90, []) is None  # the partner was not evaluated at step 50


def test_the_band_is_the_larger_of_the_benchmarks_and_this_run():
    # r=2 and r=4 of seed 0 evaluated at 40, 80, 100: the gap moved 0.10 after step 40
    a = _trial(2, 3.3, [(40, 3.5), (80, 3.32), (100, 3.3)])
    b = _trial(4, 3.0, [(40, 3.3), (80, 3.01), (100, 3.0)])
    seen = run_drift([a, b, _trial(8, 2.9, [(40, 3.2), (100, 2.9)], seed=1)])
    assert seen == {0.4: pytest.approx(0.10), 0.8: pytest.approx(0.01)}
    assert band(0.4, seen) == pytest.approx(0.10)  # the run's own move is larger
    assert band(0.8, seen) == dict(DRIFT)[0.8]  # the benchmarks' is larger
    # a trial told as a prediction is no evidence of how gaps move
    stopped = _trial(2, 3.3, [(40, 3.9)], extra={"stopped_early": {"step": 40}})
    assert run_drift([stopped, b]) == {}


def _search(llama_dir, text_jsonl, out, *extra) -> dict:
    from rankwise.cli import main

    argv = search_argv(llama_dir, text_jsonl, out, ranks="1,2,4,8,16", max_steps=10,
                       eval_every=2) + list(extra)  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "recommendation.json").read_text())


def test_stopping_keeps_the_answer_and_show_lists_the_evidence(
    llama_dir, text_jsonl, tmp_path, capsys
):
    from rankwise.cli import main
    from rankwise.storage.store import RunStore

    plain = _search(llama_dir, text_jsonl, tmp_path / "plain")
    cut = _search(llama_dir, text_jsonl, tmp_path / "cut", "--stop-when-decided")
    assert cut["rank"] == plain["rank"]

    store = RunStore(tmp_path / "cut", readonly=True)
    stopped = [r for r in store.results() if "stopped_early" in r.extra]
    store.close()
    assert stopped, "no trial stopped: the test no longer exercises the rule"
    for r in stopped:
        assert r.rank != cut["rank"]  # the delivered adapter is a finished trial
        assert r.steps < 10 and r.extra["stopped_early"]["step"] == r.steps
        assert r.extra["diagnosis"]["label"] == "n/a"

    def tokens(name):
        s = RunStore(tmp_path / name, readonly=True)
        n = sum(r.train_tokens or 0 for r in s.results())
        s.close()
        return n

    assert tokens("cut") < tokens("plain")
    capsys.readouterr()
    assert main(["show", str(tmp_path / "cut")]) == 0
    shown = capsys.readouterr().out
    assert "stopped early: cannot change the answer" in shown
    rec = json.loads((tmp_path / "cut" / "recommendation.json").read_text())
    assert [c["key"] for c in rec["stopped_early"]] == [r.key for r in stopped]
    assert rec["stopped_early"][0]["tokens_saved"] > 0
    assert f"stopped early (--stop-when-decided): {len(stopped)} trial" in shown
    assert f"paired with {stopped[0].extra['stopped_early']['partner']}" in shown


def test_stopping_needs_the_local_executor(capsys, llama_dir, text_jsonl, tmp_path):
    argv = search_argv(llama_dir, text_jsonl, tmp_path / "out")
    check_error(capsys, argv + ["--stop-when-decided", "--executor", "ray"],
                "--stop-when-decided", "--executor local")  # fmt: skip
