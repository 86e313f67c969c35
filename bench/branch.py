"""Branched trials (``--branch-at F``): does a branch reach what a fresh trial of its rank and
seed reaches, is its seed-to-seed spread that of fresh trials, and for how many tokens?

Issue 29, item 3. Nothing is trained afresh here: the stability pools
(``bench/stability.py``: ``bench/.cache/stability/<task>.json``, one real grid search over
r = 1..32 with 6 paired seeds per task, run folders ``bench/.cache/runs/stability/<task>/``)
hold the fresh trials. They are only read. For each task, seed s and share F:

1. **Trunk.** The pool's own spec of ``r4-s{s}`` (the ladder's start rank on these ranks:
   ``stability.start_rank``), read from its ``trials.sqlite``, planned as a trunk by
   ``rankwise.run.branching.plan`` (the code ``--branch-at`` runs) and trained by
   ``run_trial``; it saves its state at step round(F · max_steps) under
   ``bench/.cache/branch/states/``. Check: its best val loss is the pool's r4-s{s}, to the
   bit (saving the state changes nothing).
2. **Branches.** Every other rank r of the pool: the pool's spec of ``r{r}-s{s}`` planned as
   a branch of that trunk (grown above r=4, shrunk below), trained by ``run_trial``: steps
   t+1..max_steps of the same schedule, data order and seed.
3. **Measures** (``summarize``): each branch's best val loss minus the fresh trial of the same
   rank and seed (the pool's); the spread of the branch seeds against the same seeds' fresh
   trials and against the pool's 6 seeds (per rank, pooled over ranks), for the losses and
   for the paired differences to the trunk rank (what racing reads); the curve's tokens ÷
   one trial (trunk 1 + each branch 1 - F; the grid trains 6 trials); and the default
   criterion's answer on the branched curve (each seed alone, both seeds together) against
   the fresh curve of the same seeds and the 6-seed grid.

Every seed has its own trunk (``rankwise.run.branching``: seed 1 never branches from seed
0's trunk), so the seeds' spread is comparable with fresh trials'.

Usage::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python -m bench.branch   # planted-k4, planted-k16, far-off-k8
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.branch --tasks hot-head-k8 --seeds 0 1 2
    .venv/bin/python -m bench.branch --render     # bench/results/branch.md from branch.json
    .venv/bin/python -m bench.branch --smoke      # < 1 min: a tiny pool, for tests

A task whose pool file does not exist yet is skipped (said so). Measurements go to
``bench/.cache/branch/<task>.json`` after each trial, so a rerun resumes; the summaries to
``bench/results/branch.json`` and the table rendered from it to ``bench/results/branch.md``.
About 4-5 minutes of one core per task for 2 seeds and both shares.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if not __package__:  # run as a file (bench/branch.py): make `bench` importable
    sys.path.insert(0, str(ROOT.parent))

from bench import stability  # noqa: E402
from rankwise.core.criteria import Criterion, recommend  # noqa: E402
from rankwise.core.strategies import Grid  # noqa: E402
from rankwise.records import TrialResult  # noqa: E402
from rankwise.run.branching import branch_step  # noqa: E402

CACHE = ROOT / ".cache" / "branch"
RESULTS = ROOT / "results"
DEFAULT_TASKS = ["planted-k4", "planted-k16", "far-off-k8"]
SHARES = (0.25, 0.5)
SEEDS = (0, 1)


# -- measuring ------------------------------------------------------------------------------
def pool_spec(pool: dict, rank: int, seed: int):
    """The pool's own spec of trial (rank, seed), read-only: no adapter is written."""
    spec = stability.stored_spec(pool["run_dir"], rank, seed)
    return spec.replace(adapter_dir=None)


def entry(result: TrialResult) -> dict:
    keep = ("status", "reason", "best_val_loss", "best_step", "steps", "train_tokens")
    out = {k: getattr(result, k) for k in keep}
    return out | {"wall_seconds": round(result.wall_seconds, 2), "val_blocks": result.val_blocks,
                  "role": result.branch.role if result.branch else None}  # fmt: skip


def measure(pool: dict, shares, seeds, cache: Path, states: Path) -> dict:
    """Train the trunks and branches of ``pool``'s task not measured yet (saved after each)."""
    from rankwise.run import branching
    from rankwise.storage.rundir import RunDir
    from rankwise.training.trial import run_trial

    data = json.loads(cache.read_text()) if cache.exists() else {"task": pool["task"]}
    data.setdefault("entries", {})
    trunk_rank = data["trunk_rank"] = stability.start_rank(pool["ranks"])
    for share in shares:
        for seed in seeds:
            run_dir = RunDir(states / pool["task"] / f"f{share:g}-s{seed}")
            for rank in [trunk_rank] + [r for r in pool["ranks"] if r != trunk_rank]:
                name = f"f{share:g}/s{seed}/r{rank}"
                spec = branching.plan(pool_spec(pool, rank, seed), run_dir, share)
                if spec.branch.is_trunk != (rank == trunk_rank):  # its state went missing
                    raise SystemExit(f"{name}: planned as a {spec.branch.role}; remove {cache}")
                trunk_saved = branching.saved_trunk(run_dir, seed) is not None
                if name in data["entries"] and (trunk_saved or rank != trunk_rank):
                    continue
                t0 = time.perf_counter()
                result = run_trial(spec)
                data["entries"][name] = entry(result)
                cache.write_text(json.dumps(data))
                print(f"{pool['task']} {name} {spec.branch.role}: {result.best_val_loss:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return data


# -- summaries ------------------------------------------------------------------------------
def pooled_sd(groups: list[list[float]]) -> float | None:
    """The within-group standard deviation pooled over groups (each of >= 2 values)."""
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return None
    return math.sqrt(statistics.mean(statistics.variance(g) for g in groups))


def answer(results: list[TrialResult], pool: dict, seeds: int) -> stability.Answer:
    """The default criterion's answer on ``results`` told to a grid."""
    by = {(t.rank, t.seed): t for t in results}
    grid = Grid(ranks=sorted({t.rank for t in results}), seeds=seeds, criterion=Criterion(),
                base_loss=pool["base_loss"])  # fmt: skip
    asked = []
    while (p := grid.ask()) is not None:
        asked.append(by[(p.rank, p.seed)])
        grid.tell(asked[-1])
    rec = recommend(grid.scores(), Criterion(), grid.stop_reason, pool["base_loss"])
    return stability.Answer(rec.rank, bool(rec.undecided), tuple(asked))


def curve(data: dict, pool: dict, share: float, seeds, branched: bool) -> list[TrialResult]:
    """The rank curve of ``seeds`` (strategy seeds 0..n-1): branches (the trunk itself at its
    rank), or the pool's fresh trials."""
    fresh = stability.pool_results(pool)
    out = []
    for i, s in enumerate(seeds):
        for r in pool["ranks"]:
            t = fresh[(r, s)]
            e = data["entries"].get(f"f{share:g}/s{s}/r{r}") if branched else None
            if e is not None:
                t = t.replace(best_val_loss=e["best_val_loss"], val_blocks=list(e["val_blocks"]),
                              train_tokens=e["train_tokens"], status=e["status"])  # fmt: skip
            out.append(t.replace(seed=i, key=f"r{r}-s{i}"))
    return out


def summarize_share(data: dict, pool: dict, share: float, seeds: list[int]) -> dict:
    """One task at one share: per rank and pooled."""
    fresh = stability.pool_results(pool)
    trunk, entries = data["trunk_rank"], data["entries"]
    got = lambda r, s: entries[f"f{share:g}/s{s}/r{r}"]["best_val_loss"]  # noqa: E731
    others = [r for r in pool["ranks"] if r != trunk]
    ranks = {}
    for r in others:
        ranks[str(r)] = {
            "branch": [got(r, s) for s in seeds],
            "fresh": [fresh[(r, s)].best_val_loss for s in seeds],
            "minus_fresh": [got(r, s) - fresh[(r, s)].best_val_loss for s in seeds],
            "fresh_sd6": statistics.stdev(fresh[(r, s)].best_val_loss for s in range(pool["seeds"])),
        }  # fmt: skip
    diffs = [d for v in ranks.values() for d in v["minus_fresh"]]
    one = fresh[(trunk, seeds[0])].train_tokens
    tokens = [sum(entries[f"f{share:g}/s{s}/r{r}"]["train_tokens"] for r in pool["ranks"]) / one
              for s in seeds]  # fmt: skip
    paired = lambda f: [[f(r, s) - f(trunk, s) for s in seeds] for r in others]  # noqa: E731
    fresh_loss = lambda r, s: fresh[(r, s)].best_val_loss  # noqa: E731
    all6 = list(range(pool["seeds"]))
    answers = {
        "branched, each seed": [answer(curve(data, pool, share, [s], True), pool, 1).label() for s in seeds],
        "fresh, each seed": [answer(curve(data, pool, share, [s], False), pool, 1).label() for s in seeds],
        "branched, seeds together": answer(curve(data, pool, share, seeds, True), pool, len(seeds)).label(),
        "fresh, the same seeds": answer(curve(data, pool, share, seeds, False), pool, len(seeds)).label(),
        "fresh grid, 6 seeds": answer(curve(data, pool, share, all6, False), pool, len(all6)).label(),
    }  # fmt: skip
    return {
        "share": share,
        "step": branch_step(share, pool["options"]["max_steps"]),
        "trunk_check": max(abs(got(trunk, s) - fresh[(trunk, s)].best_val_loss) for s in seeds),
        "ranks": ranks,
        "minus_fresh": {
            "mean": statistics.mean(diffs),
            "min": min(diffs),
            "max": max(diffs),
            "mean_abs": statistics.mean(abs(d) for d in diffs),
        },  # fmt: skip
        "spread": {
            "branch_sd": pooled_sd([v["branch"] for v in ranks.values()]),
            "fresh_sd": pooled_sd([v["fresh"] for v in ranks.values()]),
            "fresh_sd6": math.sqrt(statistics.mean(v["fresh_sd6"] ** 2 for v in ranks.values())),
            "branch_paired_sd": pooled_sd(paired(got)),
            "fresh_paired_sd": pooled_sd(paired(fresh_loss)),
        },
        "tokens_per_trial": statistics.mean(tokens),
        "grid_tokens_per_trial": float(len(pool["ranks"])),
        "answers": answers,
    }


def summarize(data: dict, pool: dict) -> dict:
    seeds = sorted({int(k.split("/")[1][1:]) for k in data["entries"]})
    shares = sorted({float(k.split("/")[0][1:]) for k in data["entries"]})
    complete = [
        s for s in shares
        if all(f"f{s:g}/s{x}/r{r}" in data["entries"] for x in seeds for r in pool["ranks"])
    ]  # fmt: skip
    return {
        "task": pool["task"], "k": pool["k"], "ranks": pool["ranks"], "seeds": seeds,
        "trunk_rank": data["trunk_rank"], "max_steps": pool["options"]["max_steps"],
        "base_loss": pool["base_loss"],
        "shares": [summarize_share(data, pool, s, seeds) for s in complete],
    }  # fmt: skip


# -- the table ------------------------------------------------------------------------------
def render(doc: dict) -> str:
    """bench/results/branch.md: every table from ``branch.json`` alone."""
    lines = [
        "Branched trials (`--branch-at F`) on the stability pools: each branch against the "
        "fresh trial of its rank and seed (best val loss, nats).",
        "",
        "| task | F (step) | trunk check | branch − fresh per rank (seeds " + ", ".join(
            map(str, doc["tasks"][0]["seeds"])) + ") | mean ± range | seed sd: branch / "
        "fresh (same seeds) / fresh (6) | paired sd vs trunk rank: branch / fresh | tokens ÷ "
        "trial (grid) | answers: branched per seed / fresh per seed / branched 2 seeds / "
        "fresh 2 seeds / grid 6 seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ] if doc["tasks"] else ["(no task measured)"]  # fmt: skip
    for t in doc["tasks"]:
        for s in t["shares"]:
            per = "; ".join(
                f"r={r}: " + " ".join(f"{d:+.4f}" for d in v["minus_fresh"]) for r, v in s["ranks"].items()
            )  # fmt: skip
            m, sp, a = s["minus_fresh"], s["spread"], s["answers"]
            sd = " / ".join("-" if x is None else f"{x:.4f}" for x in
                            (sp["branch_sd"], sp["fresh_sd"], sp["fresh_sd6"]))  # fmt: skip
            psd = " / ".join("-" if x is None else f"{x:.4f}" for x in
                             (sp["branch_paired_sd"], sp["fresh_paired_sd"]))  # fmt: skip
            ans = " / ".join([" ".join(a["branched, each seed"]), " ".join(a["fresh, each seed"]),
                              a["branched, seeds together"], a["fresh, the same seeds"],
                              a["fresh grid, 6 seeds"]])  # fmt: skip
            lines.append(
                f"| {t['task']} (k={t['k']}) | {s['share']:g} ({s['step']}) | "
                f"{s['trunk_check']:.1e} | {per} | {m['mean']:+.4f} [{m['min']:+.4f}, "
                f"{m['max']:+.4f}] | {sd} | {psd} | {s['tokens_per_trial']:.2f} "
                f"({s['grid_tokens_per_trial']:.0f}) | {ans} |"
            )
    lines += [
        "",
        f"Trunk: r={doc['tasks'][0]['trunk_rank'] if doc['tasks'] else '-'} (the ladder's "
        "start rank), one per seed; the trunk check is |trunk − the pool's trial of its rank "
        "and seed| (0: saving the state changes nothing). Seed sd: the seeds' standard "
        "deviation per rank, pooled over the branched ranks; paired: of each rank's "
        "difference to the trunk rank (what racing reads). Tokens: the whole curve (trunk + "
        "branches) per seed ÷ one trial. Answers: the default criterion on the curve "
        "('?': the noise left it open). Generated by `python -m bench.branch --render` from "
        "bench/results/branch.json.",
    ]
    return "\n".join(lines) + "\n"


def write_results(pools: dict, out: Path, cache: Path = CACHE) -> dict:
    """Summaries of every task measured in ``cache`` whose pool is in ``pools``, as
    ``out/branch.json``, and the table rendered from it, ``out/branch.md``."""
    docs = []
    for task, pool in pools.items():
        measured = cache / f"{task}.json"
        if measured.exists():
            summary = summarize(json.loads(measured.read_text()), pool)
            if summary["shares"]:
                docs.append(summary)
    doc = {"benchmark": "bench/branch.py", "tasks": docs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "branch.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "branch.md").write_text(render(doc))
    return doc


# -- entry point ----------------------------------------------------------------------------
def smoke(out: Path) -> dict:
    """The whole benchmark on a tiny pool (r = 1, 2 x 3 seeds, 6 steps): trunk r=2, branch
    r=1, both shares; results under ``out``."""
    pool = stability.smoke_pool(out)
    cache = out / "branch"
    cache.mkdir(parents=True, exist_ok=True)
    measure(pool, SHARES, SEEDS, cache / f"{pool['task']}.json", cache / "states")
    return write_results({pool["task"]: pool}, out / "results", cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(stability.TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--shares", nargs="+", type=float, default=list(SHARES))
    parser.add_argument("--render", action="store_true", help="the table from branch.json only")
    parser.add_argument("--smoke", action="store_true", help="a tiny pool, < 1 min")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads((RESULTS / "branch.json").read_text())))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    if args.smoke:
        out = Path(tempfile.mkdtemp(prefix="rankwise-branch-"))
        print(render(smoke(out)) + f"\nresults: {out / 'results'}")
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    # Every task measured before stays in the results, beside the ones asked for now.
    tasks = [t for t in stability.TASKS if t in args.tasks or (CACHE / f"{t}.json").exists()]
    pools = {}
    for task in tasks:
        path = stability.POOLS / f"{task}.json"
        if not path.exists():
            print(f"{task}: no pool yet ({path}); skipped", flush=True)
            continue
        pools[task] = stability.load_pool(path)
        if task in args.tasks:
            measure(pools[task], args.shares, args.seeds, CACHE / f"{task}.json", CACHE / "states")
            write_results(pools, RESULTS)  # after each task: a partial table is a table
    print(render(write_results(pools, RESULTS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
