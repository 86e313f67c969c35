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
tasks and equal to k on at least three (issue 11); the last lines say which ones are.

Usage::

    .venv/bin/python -m bench.criteria                  # the tables, from bench/.cache/curves
    .venv/bin/python -m bench.criteria --smoke          # made-up curves, for tests

No torch: a replay takes milliseconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

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
    Criterion("knee", 0.01),
    Criterion("knee", 0.02),
    Criterion("knee", 0.05),
    Criterion("knee", 0.10),
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


def table(tasks: list[dict]) -> tuple[str, list[tuple[Criterion, str, tuple[int, int]]]]:
    ks = [t["k"] for t in tasks]
    head = " | ".join(f"k={k}" for k in ks)
    lines = [
        f"| criterion | how | {head} | within 2x of k | = k | ladder trials |",
        "|---|---|" + "---|" * len(ks) + "---|---|---|",
    ]
    scored = []
    for c in CANDIDATES:
        rows = [replay(t, c) for t in tasks]
        for how in ("grid", "ladder"):
            ranks = [r[how] for r in rows]
            cells = " | ".join(_cell(r[how], r[f"{how}_regret"]) for r in rows)
            within, equal = meets_target(ranks, ks)
            trials = (
                " / ".join(str(len(r["ladder_trials"])) for r in rows) if how == "ladder" else ""
            )
            name = f"{c.kind} {c.threshold:g}"
            lines.append(
                f"| {name} | {how} | {cells} | {within}/{len(ks)} | {equal}/{len(ks)} | {trials} |"
            )
            scored.append((c, how, (within, equal)))
    return "\n".join(lines), scored


def curves_table(tasks: list[dict]) -> str:
    ranks = sorted({r for t in tasks for r in t["curve"]})
    lines = [
        "| task | k | base | " + " | ".join(f"r={r}" for r in ranks) + " |",
        "|---|---|---|" + "---|" * len(ranks),
    ]
    for t in tasks:
        best = min(t["curve"].values())
        cells = []
        for r in ranks:
            v = t["curve"].get(r)
            share = (t["base_loss"] - v) / (t["base_loss"] - best) if v is not None else None
            cells.append("-" if v is None else f"{v:.4f} ({share:.1%})")
        lines.append(
            f"| {t['task']} | {t['k']} | {t['base_loss']:.4f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    tasks = smoke_curves() if args.smoke else load_curves(args.curves)
    if not tasks:
        parser.error(f"no curves in {args.curves}: run bench/rank_curves.py first")
    print(curves_table(tasks))
    print()
    text, scored = table(tasks)
    print(text)
    print()
    print("\n".join(verdict(scored, len(tasks))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
