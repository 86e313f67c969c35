"""Which alpha policy puts the knee of the rank curve at the planted rank k?

For each planted task and each policy (fixed alpha 8, rsLoRA alpha 8, ratio alpha = 2r), a
grid over the task's ranks at the learning rate rankwise's own calibration picks for that
policy (no ``lr`` given: a sweep of ``--lr-candidates`` at the start rank, 20% of the steps
each). Same training settings as ``bench/search_efficiency.py`` otherwise. Prints and saves
the curves, the calibrated rates, and the rank recommended at 1%, 0.5% and 0.25% tolerance.

Usage::

    .venv/bin/python -m bench.archive.alpha_policies --tasks planted-k2 planted-k8
    .venv/bin/python -m bench.archive.alpha_policies --tasks planted-k32
    .venv/bin/python -m bench.archive.alpha_policies --report
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from pathlib import Path

import rankwise
from bench import search_efficiency as se
from rankwise.core.criteria import recommend
from rankwise.core.scores import rank_scores

OUT = Path(__file__).resolve().parents[1] / ".cache" / "runs" / "alpha-policies"  # bench/.cache
POLICIES = {
    "fixed": {},
    "rslora": {"alpha_policy": "rslora"},
    "ratio": {"alpha_policy": "ratio", "alpha_ratio": 2.0},
}
CANDIDATES = [1e-3, 3e-3, 1e-2, 3e-2]


def run(task: str, policy: str, args) -> dict:
    k = int(task.split("-k")[1])
    options = se.planted_options(k, args, args.smoke)
    options.pop("lr")
    out = args.out / f"{task}-{policy}"
    result = rankwise.search(
        strategy="grid",
        ranks=[1, 2, 4] if args.smoke else se.RANKS[task],
        out=str(out),
        quiet=True,
        lr_candidates=CANDIDATES,
        lr_calibration_fraction=0.2,
        **POLICIES[policy],
        **options,
    )
    meta = dict(sqlite3.connect(out / "trials.sqlite").execute("SELECT key, value FROM meta"))
    cal = json.loads(meta["lr_calibration"])
    curve = {t.rank: t.best_val_loss for t in result.trials if t.ok}
    scores = rank_scores(result.trials)
    row = {
        "task": task,
        "k": k,
        "policy": policy,
        "lr": cal["lr"],
        "lr_losses": cal["losses"],
        "curve": curve,
        "rank": {str(t): recommend(scores, t).rank for t in (0.01, 0.005, 0.0025)},
    }
    if not args.smoke:
        (args.out / f"{task}-{policy}.json").write_text(json.dumps(row, indent=2))
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| task | k | policy | calibrated lr | best val loss at r = ranks | rank at 1% | "
        "at 0.5% | at 0.25% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = " / ".join(
            f"{v:.4f}" for _, v in sorted(r["curve"].items(), key=lambda x: int(x[0]))
        )
        ranks = ",".join(str(x) for x in sorted(map(int, r["curve"])))
        lines.append(
            f"| {r['task']} | {r['k']} | {r['policy']} | {r['lr']:g} | r={ranks}: {curve} "
            f"| {r['rank']['0.01']} | {r['rank']['0.005']} | {r['rank']['0.0025']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["planted-k2", "planted-k8", "planted-k32"])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny planted task, seconds (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tasks, args.policies = ["planted-k2"], ["fixed", "ratio"]
        args.steps, args.batch, args.eval_every = 10, 4, 5
        if args.out == OUT:  # a fresh folder unless --out names one
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-alpha-"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
        print(table(rows))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for task in args.tasks:
        for policy in args.policies:
            rows.append(run(task, policy, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
