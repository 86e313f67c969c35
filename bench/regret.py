"""An answer a user can act on: the guarantee, df-aware confidence, and what they cost.

Issue "An answer a user can act on". Replays (no torch, seconds) the default search on the
stability pools (``bench/stability.py``: per task a grid over r = 1..32 with 6 paired seeds,
every trial's best val loss and per-block val losses) under rules that differ only in the
criterion, and reports per task and rule:

- **answers** over the five outer seeds (``?``: the noise left a comparison open) and how
  many of them are stated with ``high`` confidence;
- **grid**: the answer of the grid over all 6 seeds under the same rule (the reference);
- **regret**: the answer's loss against the best rank the search trained, both as the
  pool's 6-seed means (the truth the search estimates), worst over the outer seeds;
- **flat**: where the 6-seed curve flattens (the smallest rank whose 6-seed mean is within
  the guarantee of the best 6-seed mean); the answer should be within 2x of it;
- **false high**: answers stated with high confidence that differ from the grid's (target 0);
- **cost**: training tokens ÷ one trial's.

Pools: ``planted-k4``, ``planted-k16``, ``planted2-k8``, ``far-off-k8``, ``hot-head-k8`` (the
five the earlier rules were tuned on) and ``far-off-k2``, ``far-off-k32`` (held out: built
for this issue, never seen by a rule before it was chosen). The raw pools are committed
gzipped under ``bench/results/pools/``; the replay's results go to
``bench/results/regret.json`` and the table is rendered from that file.

Usage::

    .venv/bin/python -m bench.regret            # replay, write results JSON, print the table
    .venv/bin/python -m bench.regret --render   # the table from the committed JSON only
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if not __package__:
    sys.path.insert(0, str(ROOT.parent))

from bench import stability  # noqa: E402
from rankwise.core.criteria import Criterion, recommend  # noqa: E402
from rankwise.core.scores import rank_scores  # noqa: E402

# Where a curve flattens: the smallest rank whose 6-seed mean is within 1% of the best one's
# (the same for every rule, so the rules are judged against one yardstick).
FLAT = 0.01
RESULTS = ROOT / "results"
POOLS = RESULTS / "pools"
OUT = RESULTS / "regret.json"
TUNED = ["planted-k4", "planted-k16", "planted2-k8", "far-off-k8", "hot-head-k8"]
HELD_OUT = ["far-off-k2", "far-off-k32"]

# The rules compared: (label, criterion). The first is what rankwise did before this issue
# (no guarantee: a regret of 99% never binds); the others carry the 1% guarantee.
RULES = {
    "knee 1% of base gap, no guarantee": Criterion("knee", 0.01, "base", max_regret=0.99),
    "knee 1% of base gap + 1% guarantee": Criterion("knee", 0.01, "base", max_regret=0.01),
    "knee 0.2% of loss + 1% guarantee": Criterion("knee", 0.002, "loss", max_regret=0.01),
    "knee 0.5% of loss + 1% guarantee": Criterion("knee", 0.005, "loss", max_regret=0.01),
    "knee 10% of range + 1% guarantee": Criterion("knee", 0.1, "range", max_regret=0.01),
}


def load_pools(names: list[str]) -> list[dict]:
    """The pools by name: the committed gzip, else the cache bench/stability.py writes (which
    is then committed gzipped)."""
    out = []
    for name in names:
        packed = POOLS / f"{name}.json.gz"
        cached = stability.POOLS / f"{name}.json"
        if not packed.exists() and cached.exists():
            POOLS.mkdir(parents=True, exist_ok=True)
            with cached.open("rb") as src, gzip.open(packed, "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
        if packed.exists():
            out.append(json.loads(gzip.decompress(packed.read_bytes())))
    return out


def means(pool: dict) -> dict[int, float]:
    """Each rank's mean best val loss over the pool's seeds (the 6-seed truth)."""
    by = {}
    for t in pool["trials"]:
        if t["best_val_loss"] is not None:
            by.setdefault(t["rank"], []).append(t["best_val_loss"])
    return {r: sum(v) / len(v) for r, v in by.items()}


def replay(pool: dict, criterion: Criterion, outer: int) -> dict:
    """One default search on the pool (seeds in outer seed's order): answer, confidence,
    the ranks it trained and its tokens."""
    answer = stability.replay(pool, "new default", criterion, outer)
    trials = list(answer.asked)
    scores = rank_scores(trials)
    rec = recommend(scores, criterion, "", pool["base_loss"])
    one_trial = max(t.train_tokens for t in trials)
    return {
        "rank": rec.rank,
        "undecided": bool(rec.undecided),
        "confidence": rec.confidence,
        "high": rec.confidence.startswith("high"),
        "trained": sorted({t.rank for t in trials}),
        "trials": len(trials),
        "cost": sum(t.train_tokens for t in trials) / one_trial,
    }


def measure(pool: dict, label: str, criterion: Criterion) -> dict:
    truth = means(pool)
    best6 = min(truth.values())
    flat = min(r for r, m in truth.items() if m - best6 <= FLAT * abs(best6))
    grid = stability.replay(pool, "grid, all N seeds", criterion, stability.OUTER[0]).rank
    runs = [replay(pool, criterion, o) for o in stability.OUTER]
    regrets = []
    for run in runs:
        if run["rank"] is None:
            continue
        best_trained = min(truth[r] for r in run["trained"])
        regrets.append((truth[run["rank"]] - best_trained) / abs(best_trained))
    return {
        "task": pool["task"],
        "k": pool["k"],
        "rule": label,
        "held_out": pool["task"] in HELD_OUT,
        "base_over_teacher": pool["base_loss"] / pool["teacher_loss"],
        "grid": grid,
        "flat": flat,
        "runs": runs,
        "worst_regret": max(regrets, default=None),
        "max_regret": criterion.max_regret,
    }


def run(names: list[str]) -> dict:
    pools = load_pools(names)
    rows = [measure(p, label, c) for label, c in RULES.items() for p in pools]
    return {"rules": {k: _crit(c) for k, c in RULES.items()}, "rows": rows}


def _crit(c: Criterion) -> dict:
    return {"kind": c.kind, "threshold": c.threshold, "scale": c.scale, "max_regret": c.max_regret}


def _answers(runs: list[dict]) -> str:
    def one(r):
        rank = "none" if r["rank"] is None else str(r["rank"])
        return rank + ("?" if r["undecided"] else "") + ("!" if r["high"] else "")

    return " / ".join(one(r) for r in runs)


def render(results: dict) -> str:
    """The markdown table of a results file (bench/results/regret.json)."""
    lines = [
        "| rule | task | k | base ÷ teacher | answers (seeds 1-5; ? open, ! high) | same as grid | "
        "grid (6 seeds) | flat | worst regret | within 2x of flat | false high | cost ÷ one trial |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        runs = row["runs"]
        same = sum(r["rank"] == row["grid"] for r in runs)
        false_high = sum(r["high"] and r["rank"] != row["grid"] for r in runs)
        within = sum(r["rank"] is not None and row["flat"] / 2 <= r["rank"] <= 2 * row["flat"]
                     for r in runs)  # fmt: skip
        costs = [r["cost"] for r in runs]
        regret = "-" if row["worst_regret"] is None else f"{row['worst_regret']:.2%}"
        task = row["task"] + (" (held out)" if row["held_out"] else "")
        lines.append(
            f"| {row['rule']} | {task} | {row['k']} | {row['base_over_teacher']:.2f} | "
            f"{_answers(runs)} | {same}/5 | {row['grid']} | {row['flat']} | {regret} | "
            f"{within}/5 | {false_high} | {sum(costs) / len(costs):.2f} "
            f"({min(costs):.1f}-{max(costs):.1f}) |"
        )
    return "\n".join(lines)


def summary(results: dict) -> str:
    """Per rule, the issue's targets over the tasks."""
    out = ["| rule | tasks | same as grid | false high | worst regret | within 2x of flat | "
           "stable (>= 4/5) | mean cost |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label in results["rules"]:
        for part, keep in (("tuned", False), ("held out", True)):
            rows = [r for r in results["rows"] if r["rule"] == label and r["held_out"] == keep]
            if not rows:
                continue
            runs = [(r, x) for r in rows for x in r["runs"]]
            same = sum(x["rank"] == r["grid"] for r, x in runs)
            false_high = sum(x["high"] and x["rank"] != r["grid"] for r, x in runs)
            worst = max((r["worst_regret"] or 0.0) for r in rows)
            within = sum(x["rank"] is not None and r["flat"] / 2 <= x["rank"] <= 2 * r["flat"]
                         for r, x in runs)  # fmt: skip
            stable = sum(
                max(sum(x["rank"] == y["rank"] for y in r["runs"]) for x in r["runs"]) >= 4
                for r in rows
            )
            cost = sum(x["cost"] for _, x in runs) / len(runs)
            out.append(
                f"| {label} | {part} ({len(rows)}) | {same}/{len(runs)} | {false_high} | "
                f"{worst:.2%} | {within}/{len(runs)} | {stable}/{len(rows)} | {cost:.2f}x |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TUNED + HELD_OUT)
    parser.add_argument("--render", action="store_true", help="only render the committed JSON")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not args.render:
        results = run(args.tasks)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    results = json.loads(args.out.read_text())
    print(summary(results) + "\n\n" + render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
