"""Which criterion tracks the rank a task needs: replay every criterion on stored curves.

``bench/rank_curves.py`` stores, per planted task (k = 2, 4, 8, 16, 32), the grid's best
val loss at r = 1..64 and the base model's. This script replays each criterion and
threshold on those curves with rankwise's own code, no training:

- grid: ``rankwise.core.criteria.recommend`` over every rank;
- ladder: ``rankwise.core.strategies.Ladder`` from the default start rank (4, for a model under 1B
  parameters), each proposal answered with the stored score of that rank (a trial is a
  deterministic function of its spec, so this is the run a ladder would have made; see
  "Search efficiency" in bench/RESULTS.md).

For each it prints the recommended rank per task, the regret (val loss at the recommended
rank − the best val loss of the grid, nats) and, for the ladder, the trials it trained. The
default should be the criterion whose recommendation is within a factor 2 of k on all five
tasks and equal to k on at least three (issue 11); the last lines say which ones are. The
rows are written to ``bench/results/criteria.json`` (``bench/harness.py``).

Usage::

    .venv/bin/python -m bench.criteria                  # the tables, from bench/.cache/curves
    .venv/bin/python -m bench.criteria --smoke --results DIR   # made-up curves, for tests

No torch: a replay takes milliseconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench import harness
from rankwise.core.criteria import Criterion, recommend
from rankwise.core.scores import rank_scores
from rankwise.core.strategies import Ladder
from rankwise.records import COMPLETE, TrialResult

ROOT = Path(__file__).resolve().parent

CURVES = ROOT / ".cache" / "curves"
START_RANK = 4  # rankwise's default start for a model under 1B parameters
CANDIDATES = [
    Criterion("relative", 0.005),
    Criterion("relative", 0.01),
    Criterion("relative", 0.02),
    Criterion("share", 0.90),
    Criterion("share", 0.95),
    Criterion("share", 0.98),
    Criterion("share", 0.99),
    Criterion("knee", 0.01, "base"),
    Criterion("knee", 0.02, "base"),
    Criterion("knee", 0.05, "base"),
    Criterion("knee", 0.10, "base"),
]


def smoke_curves() -> list[dict]:
    """Two made-up tasks shaped like the planted ones (falls to k, then flat)."""
    out = []
    for k in (2, 8):
        curve = {r: 3.6 + 0.4 * 2 ** -(math.log2(min(r, k)) + 1) for r in (1, 2, 4, 8, 16, 32)}
        out.append({"task": f"smoke-k{k}", "k": k, "base_loss": 4.3, "curve": curve})
    return out


def load_curves(folder: Path) -> list[dict]:
    tasks = []
    for path in sorted(
        folder.glob("planted-k*.json"), key=lambda p: json.loads(p.read_text())["k"]
    ):
        body = json.loads(path.read_text())
        body["curve"] = {int(r): v for r, v in body["curve"].items()}
        tasks.append(body)
    return tasks


def _results(curve: dict[int, float]) -> dict[int, TrialResult]:
    return {
        r: TrialResult(key=f"r{r}", rank=r, seed=0, status=COMPLETE, best_val_loss=v)
        for r, v in curve.items()
    }


def replay(task: dict, criterion: Criterion) -> dict:
    """The grid's and the ladder's recommendation for one task under one criterion."""
    curve, base = task["curve"], task["base_loss"]
    trials = _results(curve)
    best = min(curve.values())
    grid = recommend(rank_scores(list(trials.values())), criterion, base_loss=base)
    ladder = Ladder(sorted(curve), START_RANK, criterion, base_loss=base)
    while (p := ladder.ask()) is not None:
        ladder.tell(trials[p.rank])
    lad = recommend(ladder.scores(), criterion, ladder.stop_reason, base_loss=base)
    return {
        "grid": grid.rank,
        "ladder": lad.rank,
        "grid_regret": None if grid.rank is None else curve[grid.rank] - best,
        "ladder_regret": None if lad.rank is None else curve[lad.rank] - best,
        "ladder_trials": [r.rank for r in ladder.results],
    }


def meets_target(ranks: list[int | None], ks: list[int]) -> tuple[int, int]:
    """(tasks within a factor 2 of k, tasks equal to k)."""
    within = sum(r is not None and k / 2 <= r <= 2 * k for r, k in zip(ranks, ks, strict=True))
    equal = sum(r == k for r, k in zip(ranks, ks, strict=True))
    return within, equal


def _cell(rank, regret) -> str:
    return "none" if rank is None else f"{rank} ({regret:+.4f})"


def criteria_rows(tasks: list[dict]) -> list[dict]:
    """Per criterion and way of searching (grid, ladder): the rank and regret per task, and
    how many tasks it meets the target on."""
    ks, out = [t["k"] for t in tasks], []
    for c in CANDIDATES:
        replays = [replay(t, c) for t in tasks]
        for how in ("grid", "ladder"):
            ranks = [r[how] for r in replays]
            within, equal = meets_target(ranks, ks)
            out.append({
                "criterion": f"{c.kind} {c.threshold:g}", "kind": c.kind,
                "threshold": c.threshold, "how": how, "tasks": [t["task"] for t in tasks],
                "k": ks, "ranks": ranks, "regrets": [r[f"{how}_regret"] for r in replays],
                "ladder_trials": [r["ladder_trials"] for r in replays] if how == "ladder" else None,
                "within_2x": within, "equal": equal,
            })  # fmt: skip
    return out


def table(tasks: list[dict]) -> tuple[str, list[tuple[Criterion, str, tuple[int, int]]]]:
    """The table of :func:`criteria_rows`, and (criterion, how, (within, equal)) per row."""
    rows, n = criteria_rows(tasks), len(tasks)
    header = ["criterion", "how", *(f"k={k}" for k in rows[0]["k"]), "within 2x of k", "= k",
              "ladder trials"]  # fmt: skip
    cells = [
        [r["criterion"], r["how"], *map(_cell, r["ranks"], r["regrets"]),
         f"{r['within_2x']}/{n}", f"{r['equal']}/{n}",
         " / ".join(str(len(t)) for t in r["ladder_trials"]) if r["ladder_trials"] else ""]
        for r in rows
    ]  # fmt: skip
    scored = [(Criterion(r["kind"], r["threshold"], "base" if r["kind"] == "knee" else None), r["how"], (r["within_2x"], r["equal"]))
              for r in rows]  # fmt: skip
    return harness.table(header, cells), scored


def curves_table(tasks: list[dict]) -> str:
    ranks = sorted({r for t in tasks for r in t["curve"]})
    rows = []
    for t in tasks:
        best = min(t["curve"].values())
        cells = []
        for r in ranks:
            v = t["curve"].get(r)
            share = (t["base_loss"] - v) / (t["base_loss"] - best) if v is not None else None
            cells.append("-" if v is None else f"{v:.4f} ({share:.1%})")
        rows.append([t["task"], t["k"], f"{t['base_loss']:.4f}", *cells])
    return harness.table(["task", "k", "base", *(f"r={r}" for r in ranks)], rows)


def verdict(scored, n: int) -> list[str]:
    """Which criteria meet the issue's target, on the grid and on the ladder."""
    need_equal = min(3, n)
    lines = []
    for how in ("grid", "ladder"):
        ok = [c for c, h, (w, e) in scored if h == how and w == n and e >= need_equal]
        best = max((s for s in scored if s[1] == how), key=lambda s: (s[2][0], s[2][1]))
        lines.append(
            f"{how}: meets the target (within 2x of k on all {n}, = k on >= {need_equal}): "
            + (", ".join(f"{c.kind} {c.threshold:g}" for c in ok) or "none")
            + f"; best: {best[0].kind} {best[0].threshold:g} ({best[2][0]}/{n} within 2x, "
            f"{best[2][1]}/{n} = k)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", type=Path, default=CURVES, help="folder of curve JSONs")
    parser.add_argument("--smoke", action="store_true", help="made-up curves, milliseconds")
    parser.add_argument("--results", type=Path, help="folder of criteria.json (--smoke: none)")
    args = parser.parse_args(argv)
    tasks = smoke_curves() if args.smoke else load_curves(args.curves)
    if not tasks:
        parser.error(f"no curves in {args.curves}: run bench/rank_curves.py first")
    if args.results or not args.smoke:
        curves = [{**t, "curve": {str(r): v for r, v in t["curve"].items()}} for t in tasks]
        settings = {"curves": curves, "start_rank": START_RANK}
        harness.write_results("criteria", criteria_rows(tasks), args.results, settings)
    print(curves_table(tasks))
    print()
    text, scored = table(tasks)
    print(text)
    print()
    print("\n".join(verdict(scored, len(tasks))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
