"""Search efficiency: the ladder against the grid over the same ranks, on the same trials.

For each task the grid trains every rank; the ladder (rankwise's default strategy, default
start rank and tolerance) climbs from its start rank until the gain drops below 1%. The
question is how much of the grid's compute the ladder spends and what that costs in quality:

- compute ratio: training tokens (sum of the trials' ``train_tokens``) and trial wall time of
  the ladder ÷ the grid's;
- ladder compute ÷ one trial at the recommended rank (the floor: you must train that one);
- regret: best val loss at the ladder's recommended rank − at the grid's;
- whether both recommend the same rank, and, on planted tasks, the recommendation against k.

Tasks: the planted-rank tasks of ``bench/planted.py`` (k = 2, 8, 32; the answer is known)
and a real one (SmolLM2-135M-Instruct on the stdlib docstrings, the ``make demo`` setting).

A trial is a deterministic function of its spec (same seed, data, thread count -> same
result), so the ladder can be *replayed* on the grid's per-rank results with
``rankwise.core.strategies.Ladder`` ask/tell: it asks for exactly the trials a real ladder run would
train, and their tokens and wall times are summed. ``--replay`` picks the tasks where that
is done (default: the planted ones); the others run a real ladder search next to the grid,
and the table shows the largest loss difference between the two runs' shared ranks (0 when
the determinism holds).

Results go to ``bench/.cache/runs/search-efficiency/`` (one run folder per search, one JSON
per task); re-running resumes finished trials. ``--report`` prints the tables from the JSON.

Usage::

    .venv/bin/python -m bench.search_efficiency                      # all four tasks
    .venv/bin/python -m bench.search_efficiency --tasks planted-k8 --policies fixed rslora ratio
    .venv/bin/python -m bench.search_efficiency --report             # tables only
    .venv/bin/python -m bench.search_efficiency --smoke              # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench import harness, planted
from rankwise import search
from rankwise.config import SearchConfig
from rankwise.core.criteria import recommend
from rankwise.core.scores import rank_scores
from rankwise.core.strategies import Ladder
from rankwise.records import COMPLETE, TrialResult

ROOT = Path(__file__).resolve().parent

OUT = ROOT / ".cache" / "runs" / "search-efficiency"
TOLERANCE = 0.01  # the relative criterion at 1%: the rule these results were measured with
# Ranks per task: the same list for ladder and grid, reaching at least 4k on planted tasks.
RANKS = {
    "planted-k2": [1, 2, 4, 8, 16, 32],
    "planted-k8": [1, 2, 4, 8, 16, 32],
    "planted-k32": [4, 8, 16, 32, 64, 128],
    "smollm2": [1, 2, 4, 8, 16, 32],
}
ALPHA = {"fixed": {}, "rslora": {"alpha_policy": "rslora"}, "ratio": {"alpha_policy": "ratio"}}


def planted_options(k: int, args, smoke: bool = False) -> dict:
    """rankwise.search options for a planted task (bench/planted_check.py's settings:
    q/v/up/down, lr 3e-3, fixed lora_alpha 8)."""
    task = (
        planted.make_task(k, planted.CACHE / f"planted-k{k}-smoke", **planted.SMOKE)
        if smoke
        else planted.CACHE / f"planted-k{k}"
    )
    meta = json.loads((task / "task.json").read_text())
    return {
        "model": str(task / "model"),
        "train": str(task / "train.jsonl"),
        "val": str(task / "val.jsonl"),
        "seq_len": meta["usage"]["seq_len"],  # one record + EOS per block
        "target_modules": list(planted.TARGETS),
        "alpha": 8.0,
        "lr": 3e-2 if smoke else 3e-3,  # smoke: a few steps must beat the base model by > 1%
        "criterion": "relative",  # the rule these results were measured with (TOLERANCE)
        "batch_size": args.batch,
        "max_steps": args.steps,
        "eval_every": args.eval_every,
        "warmup_steps": max(1, args.steps // 20),
    }


def smollm2_options(smoke: bool = False) -> dict:
    """The ``make demo`` setting, CPU-sized."""
    return {
        "model": "smollm2",
        "train": "stdlib-docstrings",
        "seq_len": 64,
        "batch_size": 4,
        "max_steps": 40,
        "eval_every": 20,
        "warmup_steps": 4,
        "lr": 1e-3,
        "max_examples": 2000,
        "eval_batches": 16,
        "criterion": "relative",  # the rule these results were measured with (TOLERANCE)
    }


def default_start_rank(ranks: list[int], n_params: int) -> int:
    """The ladder's start rank as rankwise chooses it (by model size, snapped to ``ranks``)."""
    return SearchConfig(ranks=ranks).start_rank_for(n_params)


def replay_ladder(grid_trials: list, ranks: list[int], start_rank: int, tolerance=TOLERANCE):
    """Run the Ladder state machine on the grid's results; returns (trials, recommendation)."""
    by_rank = {t.rank: t for t in grid_trials}
    ladder = Ladder(ranks=ranks, start_rank=start_rank, tolerance=tolerance)
    while (p := ladder.ask()) is not None:
        ladder.tell(by_rank[p.rank])
    return ladder.results, recommend(ladder.scores(), tolerance, ladder.stop_reason)


def ranks_at(curve: dict, start_rank: int, tolerance: float) -> tuple[int, int]:
    """(ladder, grid) recommendations had the tolerance been ``tolerance`` (from the curve)."""
    fake = [
        TrialResult(key="", rank=int(r), seed=0, status=COMPLETE, best_val_loss=v)
        for r, v in curve.items()
    ]
    ranks = sorted(t.rank for t in fake)
    ladder = replay_ladder(fake, ranks, start_rank, tolerance)[1].rank
    return ladder, recommend(rank_scores(fake), tolerance).rank


def timed_search(out: Path, **options):
    t0 = time.perf_counter()
    result = search(out=str(out), quiet=True, **options)
    return result, time.perf_counter() - t0


def _curve(trials) -> dict[int, float]:
    return {s.rank: s.mean for s in rank_scores(trials) if s.ok}


def _totals(trials) -> dict:
    return {
        "trials": len(trials),
        "ranks": [t.rank for t in trials],
        "tokens": sum(t.train_tokens for t in trials),
        "wall": sum(t.wall_seconds for t in trials),
    }


def run_task(name: str, options: dict, ranks: list[int], k: int | None, replay: bool, out: Path):
    """Grid (and a real ladder unless ``replay``) for one task and alpha policy."""
    grid, grid_e2e = timed_search(out / f"{name}-grid", strategy="grid", ranks=ranks, **options)
    n_params = 0 if k is not None else 135_000_000  # every model here is < 1B parameters
    start = default_start_rank(ranks, n_params)
    if replay:
        ladder_trials, ladder_rec = replay_ladder(grid.trials, ranks, start)
        ladder_e2e, mismatch = None, None
    else:
        ladder, ladder_e2e = timed_search(out / f"{name}-ladder", ranks=ranks, **options)
        ladder_trials, ladder_rec = ladder.trials, ladder.recommendation
        g, lad = _curve(grid.trials), _curve(ladder_trials)
        mismatch = max(abs(g[r] - lad[r]) for r in lad if r in g)
    by_rank = {t.rank: t for t in grid.trials}
    rec_l, rec_g = ladder_rec.rank, grid.recommendation.rank
    lt, gt = _totals(ladder_trials), _totals(grid.trials)
    return {
        "task": name,
        "k": k,
        "ranks": ranks,
        "start_rank": start,
        "replayed": replay,
        "options": options,
        "grid_curve": _curve(grid.trials),
        "grid_trial_wall": {t.rank: t.wall_seconds for t in grid.trials},
        "ladder": lt | {"rank": rec_l, "loss": ladder_rec.loss, "stop": ladder_rec.stop_reason},
        "grid": gt | {"rank": rec_g, "loss": grid.recommendation.loss},
        "tokens_ratio": lt["tokens"] / gt["tokens"],
        "wall_ratio": lt["wall"] / gt["wall"],
        "ladder_vs_one_trial_tokens": lt["tokens"] / by_rank[rec_l].train_tokens,
        "ladder_vs_one_trial_wall": lt["wall"] / by_rank[rec_l].wall_seconds,
        "regret": ladder_rec.loss - grid.recommendation.loss,
        "same_rank": rec_l == rec_g,
        "end_to_end_seconds": {"grid": grid_e2e, "ladder": ladder_e2e},
        "ladder_grid_max_loss_diff": mismatch,
    }


def _fmt_curve(curve: dict) -> str:
    return " / ".join(f"{v:.4f}" for _, v in sorted(curve.items(), key=lambda kv: int(kv[0])))


def _fmt_gains(curve: dict) -> str:
    """Relative gain of each step up the rank list (the ladder's test against the tolerance)."""
    v = [x for _, x in sorted(curve.items(), key=lambda kv: int(kv[0]))]
    return " / ".join(f"{(a - b) / a:+.2%}" for a, b in zip(v, v[1:], strict=False))


MAIN_COLUMNS = [
    "task", "k", "ranks", "ladder trials (ranks)", "grid trials", "tokens ladder÷grid",
    "trial wall ladder÷grid", "ladder ÷ one trial at its rank (tokens / wall)", "ladder rank",
    "grid rank", "same?", "regret (nats)", "ladder run",
]  # fmt: skip
CURVE_COLUMNS = [
    "task", "policy", "best val loss per rank (grid)", "gain per step up", "grid rank",
    "ladder rank", "k", "ladder / grid rank at tolerance 0.5%", "at 0.25%",
]  # fmt: skip


def _main_cells(r: dict) -> list:
    lad, grid = r["ladder"], r["grid"]
    how = (
        "replayed on grid trials"
        if r["replayed"]
        else (f"real (max loss diff vs grid {r['ladder_grid_max_loss_diff']:.1e})")
    )
    return [
        r["task"], r["k"] or "-", ",".join(map(str, r["ranks"])),
        f"{lad['trials']} ({','.join(map(str, lad['ranks']))})", grid["trials"],
        f"{r['tokens_ratio']:.2f}", f"{r['wall_ratio']:.2f}",
        f"{r['ladder_vs_one_trial_tokens']:.2f} / {r['ladder_vs_one_trial_wall']:.2f}",
        lad["rank"], grid["rank"], "yes" if r["same_rank"] else "no", f"{r['regret']:+.4f}", how,
    ]  # fmt: skip


def _curve_cells(r: dict) -> list:
    ranks = ",".join(str(x) for x in sorted(map(int, r["grid_curve"])))
    at = ["{} / {}".format(*ranks_at(r["grid_curve"], r["start_rank"], t)) for t in (0.005, 0.0025)]
    return [r["task"], r.get("policy", "fixed"), f"r={ranks}: {_fmt_curve(r['grid_curve'])}",
            _fmt_gains(r["grid_curve"]), r["grid"]["rank"], r["ladder"]["rank"], r["k"] or "-",
            *at]  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown tables RESULTS.md shows, rendered from the stored rows."""
    main = [r for r in rows if r.get("policy", "fixed") == "fixed"]
    return (harness.table(MAIN_COLUMNS, map(_main_cells, main)) + "\n\n"
            + harness.table(CURVE_COLUMNS, map(_curve_cells, rows)))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(RANKS), choices=list(RANKS))
    parser.add_argument(
        "--replay",
        nargs="*",
        default=["planted-k2", "planted-k8", "planted-k32"],
        help="tasks whose ladder is replayed on the grid's trials",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["fixed"],
        choices=list(ALPHA),
        help="alpha policies (planted tasks; fixed is the main table)",
    )
    parser.add_argument("--steps", type=int, default=500, help="planted: steps per trial")
    parser.add_argument("--batch", type=int, default=16, help="planted: records per step")
    parser.add_argument("--eval-every", type=int, default=100, help="planted: steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="print the tables from saved JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny planted task, seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.tasks, args.replay, args.policies = ["planted-k2"], [], ["fixed"]
        args.steps, args.batch, args.eval_every = 8, 4, 4
        if args.out == OUT:  # a fresh folder unless --out names one
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-search-eff-"))
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for name in args.tasks:
            k = int(name.split("-k")[1]) if name.startswith("planted") else None
            ranks = [1, 2, 4] if args.smoke else RANKS[name]
            for policy in args.policies if k else ["fixed"]:
                opts = planted_options(k, args, args.smoke) if k else smollm2_options()
                opts |= ALPHA[policy]
                label = name if policy == "fixed" else f"{name}-{policy}"
                t0 = time.perf_counter()
                row = run_task(label, opts, ranks, k, name in args.replay, args.out)
                row |= {"task": name, "policy": policy}
                (results / f"{label}.json").write_text(json.dumps(row, indent=2) + "\n")
                print(f"{label}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    order = {n: i for i, n in enumerate(RANKS)}
    rows.sort(key=lambda r: (order[r["task"]], list(ALPHA).index(r.get("policy", "fixed"))))
    if not args.smoke:  # every stored row, with the environment: bench/results/
        harness.write_results("search_efficiency", rows, settings={"out": str(args.out)})
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
