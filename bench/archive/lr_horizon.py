"""The learning rate's horizon: does a quarter-length calibration pick the rate a full-length
trial wants?

For each task, at the search's start rank (4), two sweeps over ``--lr-candidates``:

- **calibration**: what rankwise does without ``--lr``: each candidate trains
  ``--lr-calibration-fraction`` (0.25, and 0.5 for comparison) of the steps, schedule
  compressed to that horizon; the lowest best val loss wins;
- **full length**: each candidate trains every step; the lowest best val loss wins.

The bias is the ratio of the calibrated rate to the full-length best, and the cost of it is
the full-length loss at the calibrated rate minus the full-length best.

    .venv/bin/python -m bench.archive.lr_horizon              # the two planted tasks (minutes)
    .venv/bin/python -m bench.archive.lr_horizon --smoke      # tests: a tiny task, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import planted, planted2, rank_curves
from rankwise import search

CANDIDATES = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
OUT = planted.CACHE / "lr_horizon"


def options(task: Path, steps: int, batch: int) -> dict:
    """The planted task's search options (bench/rank_curves.py's), one seed per run."""
    every = max(1, steps // 5)
    args = SimpleNamespace(lr=None, batch=batch, steps=steps, eval_every=every)
    return {**rank_curves.options(task, args), "quiet": True, "max_seeds": 1}


def sweep(
    opts: dict, rank: int, fraction: float, runs: Path, rates=CANDIDATES
) -> dict[float, float | None]:
    """Best val loss per candidate rate, each trained ``fraction`` of the steps."""
    steps = max(1, round(opts["max_steps"] * fraction))
    losses = {}
    for lr in rates:
        out = runs / f"f{fraction:g}-lr{lr:g}"
        short = {**opts, "lr": lr, "max_steps": steps, "eval_every": max(1, steps // 5)}
        r = search(out=str(out), strategy="grid", ranks=[rank], **short)
        trial = next(t for t in r.trials if t.rank == rank)
        losses[lr] = trial.best_val_loss if trial.ok else None
    return losses


def best(losses: dict[float, float | None]) -> float:
    return min((v, lr) for lr, v in losses.items() if v is not None)[1]


def measure(name: str, task: Path, steps: int, batch: int, runs: Path, rates=CANDIDATES) -> dict:
    opts = options(task, steps, batch)
    t0 = time.perf_counter()
    full, half, quarter = (sweep(opts, 4, f, runs / name, rates) for f in (1.0, 0.5, 0.25))
    row = {"task": name, "steps": steps, "full": full, "quarter": quarter, "half": half}
    for key in ("quarter", "half"):
        pick = best(row[key])
        row[f"{key}_pick"] = pick
        row[f"{key}_ratio"] = pick / best(full)
        row[f"{key}_cost"] = full[pick] - full[best(full)] if full[pick] is not None else None
    row["full_pick"] = best(full)
    row["wall"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    head = "| task | steps | full-length best | quarter picks (x) | cost | half picks (x) | cost |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = lambda c: "diverged" if c is None else f"{c:+.4f}"  # noqa: E731
        lines.append(
            f"| {r['task']} | {r['steps']} | {r['full_pick']:g} | {r['quarter_pick']:g} "
            f"({r['quarter_ratio']:g}x) | {cost(r['quarter_cost'])} | {r['half_pick']:g} "
            f"({r['half_ratio']:g}x) | {cost(r['half_cost'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="a tiny task, seconds")
    parser.add_argument("--out", type=Path, default=None, help="folder of the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or OUT
    if args.smoke:
        out = args.out or Path(tempfile.mkdtemp(prefix="rankwise-lr-"))
        tasks = {"planted-k2-smoke": planted.make_task(2, out / "task", **planted.SMOKE)}
        args.steps, args.batch = 8, 4
    else:
        tasks = {"planted-k8": planted.make_task(8), "planted2-k8": planted2.make_task(8)}
    rows = [
        measure(name, task, args.steps, args.batch, out / "runs") for name, task in tasks.items()
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_horizon.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
