"""Time left: the search's estimate (``rankwise.core.eta``) against the time it then took.

After each trial the progress line says "at most ~X left": the trials the strategy may still
ask for (``rankwise.study.session.max_trials``, less those settled) at the wall seconds per
token the trials so far took. This benchmark makes that estimate again after every trial of
finished searches and compares it with what the search actually still ran:

- **run folders** (read-only): every finished search under ``bench/.cache/runs/`` (its
  ``trials.sqlite`` and ``recommendation.json``). Actual = the last trial's end minus this
  trial's end (the overhead between trials included). The bound is the one the search
  stored (``time_left`` in its store) or, for a run older than the estimate, the one its
  options give.
- **ladder replays**: the stability pools (``bench/.cache/stability/<task>.json``) replayed
  by the CLI's default ladder (``bench.stability.replay``, "new default", outer seeds 1-5):
  the trials that search would have run, each taking its pool trial's wall seconds (so no
  overhead between trials). A ladder usually stops well before its bound: this is where
  "at most" is loosest.
- **a real search** run here (skipped with ``--no-search``; ``--smoke``: a smaller one).

Per source: how often the estimate held as an upper bound (estimate >= actual), the median
and the smallest ratio estimate / actual, and the ratio after the first trial (the first
estimate a person sees). Sequential searches only: ``--executor ray`` runs trials side by
side, which the estimate does not model.

Usage::

    .venv/bin/python -m bench.eta             # replays + one tiny real search (~1-2 min)
    .venv/bin/python -m bench.eta --report    # the table from bench/results/eta.json
    .venv/bin/python -m bench.eta --smoke --results /tmp/x   # seconds, tests/test_bench_eta.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if not __package__:  # run as a file (bench/eta.py): make `bench` importable
    sys.path.insert(0, str(ROOT.parent))

from bench import harness  # noqa: E402
from rankwise.core.eta import TimeLeft, clock_seconds  # noqa: E402

NAME = "eta"
RUNS = ROOT / ".cache" / "runs"
POOLS = ROOT / ".cache" / "stability"
HEADER = ["source", "strategy", "trials", "search (s)", "estimates", "held (est >= actual)",
          "est / actual: median", "min", "after trial 1"]  # fmt: skip


# -- the estimate after each trial -----------------------------------------------------------
def estimates(bound: int, trial_tokens: int, trials: list[dict], max_time=None) -> list[dict]:
    """The estimate after each trial of ``trials`` (dicts of ``tokens``, ``seconds``, ``end``:
    the trial's end, in seconds from the search's start) against the time the search ran on."""
    left, end, spent, out = TimeLeft(bound, trial_tokens), trials[-1]["end"], 0.0, []
    for i, t in enumerate(trials, 1):
        left.tell(t["tokens"], t["seconds"])
        spent += t["seconds"]
        guess = left.estimate(budget_left=None if max_time is None else max_time - spent)
        actual = end - t["end"]
        if guess is not None and actual > 0:
            out.append({"after": i, "estimate": guess, "actual": actual})
    return out


def summarise(source: str, strategy: str, runs: list[list[dict]], trials: list[int],
              seconds: list[float]) -> dict:  # fmt: skip
    """One row: every estimate of ``runs`` (one list per search) pooled."""
    pooled = [e for run in runs for e in run]
    ratios = [e["estimate"] / e["actual"] for e in pooled]
    first = [run[0]["estimate"] / run[0]["actual"] for run in runs if run and run[0]["after"] == 1]
    return {
        "source": source,
        "strategy": strategy,
        "searches": len(runs),
        "trials": trials,
        "search_seconds": seconds,
        "estimates": len(pooled),
        "held": sum(r >= 1 for r in ratios),
        "median_ratio": statistics.median(ratios) if ratios else None,
        "min_ratio": min(ratios, default=None),
        "first_ratios": first,
        "per_trial": runs,
    }


# -- sources ---------------------------------------------------------------------------------
def _plan(options: dict, stored: dict | None) -> tuple[int, int, list[str], bool]:
    """(bound, tokens of a full trial, keys outside the bound, whether the search stored it)."""
    from rankwise.config import Options
    from rankwise.study.session import max_trials

    opts = Options.from_flat(dict(options), "bench.eta")
    tc = opts.train
    tokens = tc.max_steps * tc.batch_size * tc.grad_accum * opts.data.seq_len
    if stored:
        return stored["trials"], stored["trial_tokens"], stored.get("uncounted", []), True
    return max_trials(opts, opts.search.ranks), tokens, [], False


def run_trials(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """A finished search's options, its trials in the order they finished (tokens, seconds,
    end) and its stored plan; read-only."""
    from rankwise.records import TrialKind, TrialResult
    from rankwise.storage.store import RunStore

    store = RunStore(run_dir, readonly=True)
    try:
        options, plan = store.get_meta("options") or {}, store.get_meta("time_left")
        rows = store.db.execute(
            "SELECT started_at, finished_at, result FROM trials WHERE status != 'running' "
            "ORDER BY finished_at, seq"
        ).fetchall()
    finally:
        store.close()
    results = [(TrialResult.from_json(r["result"]), r) for r in rows]
    results = [(t, r) for t, r in results if t.kind != TrialKind.BASE]
    start = min((r["started_at"] for _, r in results), default=0.0)
    trials, previous = [], None
    for t, r in results:  # each on the search's clock, as its progress line counted it
        own = t.wall_seconds + t.retain_seconds
        seconds = clock_seconds(r["started_at"], r["finished_at"], previous, own)
        trials.append({"key": t.key, "tokens": t.train_tokens, "seconds": seconds,
                       "end": r["finished_at"] - start})  # fmt: skip
        previous = r["finished_at"]
    return options, trials, plan


def replay_run(run_dir: Path) -> dict | None:
    """The row of one finished search's folder (None when it is not one)."""
    if not (run_dir / "recommendation.json").exists():
        return None
    options, trials, stored = run_trials(run_dir)
    bound, tokens, uncounted, own = _plan(options, stored)
    trials = [t for t in trials if t["key"] not in uncounted]
    if len(trials) < 2:
        return None
    strategy = options.get("strategy", "ladder") + ("" if own else " (bound from its options)")
    runs = [estimates(bound, tokens, trials, options.get("max_time"))]
    if not runs[0]:  # e.g. every trial failed: nothing was estimated
        return None
    try:
        source = str(run_dir.relative_to(ROOT.parent))
    except ValueError:
        source = run_dir.name
    return summarise(source, strategy, runs, [len(trials)], [trials[-1]["end"]])


def replay_pool(path: Path) -> dict:
    """The row of one stability pool, its default ladder replayed on outer seeds 1-5."""
    from bench import stability
    from rankwise.config import Options, SearchConfig
    from rankwise.study.session import max_trials

    pool = stability.load_pool(path)
    wall = {(t["rank"], t["seed"]): t["wall_seconds"] for t in pool["trials"]}
    ranks = sorted(pool["ranks"])
    # --lr given, so no calibration runs: the stability pools trained at a fixed rate.
    opts = Options.from_flat({"ranks": ranks, "lr": 1e-3}, "bench.eta")
    bound = max_trials(opts, ranks)
    tokens = max(t["train_tokens"] for t in pool["trials"])
    criterion = SearchConfig().search_criterion()
    runs, counts, seconds = [], [], []
    for outer in stability.OUTER:
        perm = stability.permutation(outer, pool["seeds"])
        asked = stability.replay(pool, "new default", criterion, outer).asked
        trials, end = [], 0.0
        for r in asked:
            end += wall[(r.rank, perm[r.seed])]
            trials.append({"tokens": r.train_tokens, "seconds": wall[(r.rank, perm[r.seed])],
                           "end": end})  # fmt: skip
        runs.append(estimates(bound, tokens, trials))
        counts.append(len(trials))
        seconds.append(end)
    return summarise(f"pool {pool['task']}", "ladder replay (new default)", runs, counts, seconds)


def real_search(folder: Path, smoke: bool) -> Path:
    """A small real search (the tiny test model, a ladder with the default racing): its run
    folder. Sized so the trials, not the set-up, are most of its time."""
    from rankwise import search
    from rankwise.testing import save_tiny_model

    model = save_tiny_model(folder / "model")
    lines = [f"line {i}: an adapter of rank {i % 7} and loss {i % 5}" for i in range(400)]
    (folder / "train.txt").write_text("\n".join(lines))
    size = {"max_steps": 6, "ranks": [1, 2, 4]}
    if not smoke:  # ~1 min of one core: 4-8 trials of ~5 s, a second each of set-up between
        size = {"max_steps": 30, "ranks": [1, 2, 4, 8]}
    search(model=str(model), train=str(folder / "train.txt"), out=str(folder / "run"),
           start_rank=1, batch_size=4, seq_len=32, lr=3e-3, eval_every=3 if smoke else 10,
           warmup_steps=0, dtype="float32", quiet=True, **size)  # fmt: skip
    return folder / "run"


# -- the table -------------------------------------------------------------------------------
def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[dict]) -> str:
    def cells(r: dict) -> list:
        trials = "/".join(map(str, r["trials"]))
        seconds = "/".join(f"{s:.0f}" for s in r["search_seconds"])
        first = " / ".join(_ratio(x) for x in r["first_ratios"]) or "-"
        return [r["source"], r["strategy"], trials, seconds, r["estimates"],
                f"{r['held']}/{r['estimates']}", _ratio(r["median_ratio"]),
                _ratio(r["min_ratio"]), first]  # fmt: skip

    return harness.table(HEADER, [cells(r) for r in rows])


def measure(args) -> list[dict]:
    rows = []
    if not args.smoke:
        for db in sorted(Path(args.runs).rglob("trials.sqlite")):
            if (row := replay_run(db.parent)) is not None:
                rows.append(row)
        rows += [replay_pool(p) for p in sorted(Path(args.pools).glob("*.json"))]
    if args.search or args.smoke:
        with tempfile.TemporaryDirectory(prefix="rankwise-eta-") as tmp:
            row = replay_run(real_search(Path(tmp), args.smoke))
            if row is not None:
                rows.append({**row, "source": "tiny search (run here)"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=RUNS, help="run folders to replay (read-only)")
    p.add_argument("--pools", type=Path, default=POOLS, help="stability pools to replay")
    p.add_argument("--no-search", dest="search", action="store_false", help="replays only")
    p.add_argument("--results", type=Path, default=None, help="folder of eta.json")
    p.add_argument("--report", action="store_true", help="the table from the stored results")
    p.add_argument("--smoke", action="store_true", help="one tiny search only, seconds")
    args = p.parse_args(argv)
    folder = args.results or (None if not args.smoke else Path(tempfile.mkdtemp()))
    if args.report:
        rows = harness.read_results(NAME, folder)["results"]
    else:
        rows = measure(args)
        settings = {"runs": str(args.runs), "pools": str(args.pools), "smoke": args.smoke}
        path = harness.write_results(NAME, rows, folder, settings)
        print(f"wrote {path}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
