"""Nested-rank curve vs grid: does one nested run (+ a final trial) pick the grid's rank?

For each task, ``rankwise.search(strategy="nested")`` (one DyLoRA-style run at the largest
rank, every truncation evaluated, then by default an ordinary *final* trial at the
recommended rank) is set beside ``strategy="grid"`` (every rank trained separately), with
exactly the training settings of ``bench/search_efficiency.py`` for that task (its
``planted_options`` / ``smollm2_options`` and ``RANKS``; planted-k4, which that benchmark
does not run, uses the k = 2 / k = 8 rank list).

Reported per task:

- the two curves (best val loss per rank) and each one's recommendation at rankwise's
  default tolerance (1%); whether they agree;
- regret: grid best val at the nested recommendation's rank - at the grid's own;
- compute: training tokens of the nested run (summed over its records, see
  ``rankwise.training.nested``) + the final trial's, ÷ one grid trial at r_max and ÷ the whole grid;
  the same for trial wall seconds; end-to-end wall time of the nested search.

Grids are not re-run when ``bench/search_efficiency.py`` already ran them: its run folder
is opened read-only, and used only if its stored configuration identity equals this
script's grid options (so the settings are provably the same) and every rank has finished;
if that benchmark is still training the folder, this script waits for it (``--wait``).
Otherwise the grid runs here, in ``bench/.cache/runs/nested-vs-grid/<task>-grid``. The
nested searches run there too; re-running resumes finished work.

Usage::

    .venv/bin/python -m bench.nested_vs_grid                         # all five tasks
    .venv/bin/python -m bench.nested_vs_grid --tasks planted-k2 smollm2
    .venv/bin/python -m bench.nested_vs_grid --tasks planted-k2 --nested-steps 1000 --no-final
                                     # variant: 2x nested steps, no final trial (same tokens)
    .venv/bin/python -m bench.nested_vs_grid --report                # tables from saved JSON
    .venv/bin/python -m bench.nested_vs_grid --smoke                 # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import harness, planted
from bench import search_efficiency as se
from rankwise import search
from rankwise.config import Options
from rankwise.core.criteria import recommend
from rankwise.core.scores import rank_scores
from rankwise.records import COMPLETE
from rankwise.storage.store import RunStore

ROOT = Path(__file__).resolve().parent

OUT = ROOT / ".cache" / "runs" / "nested-vs-grid"
TOLERANCE = se.TOLERANCE  # rankwise's default, 1%
TASKS = {"planted-k2": 2, "planted-k8": 8, "smollm2": None, "planted-k4": 4, "planted-k32": 32}
RANKS = {**se.RANKS, "planted-k4": se.RANKS["planted-k8"]}
# search_efficiency.py's command-line defaults for planted tasks (--steps, --batch,
# --eval-every); the identity check below proves they still match its stored grids.
PLANTED_ARGS = SimpleNamespace(steps=500, batch=16, eval_every=100)
SMOKE_ARGS = SimpleNamespace(steps=8, batch=4, eval_every=4)


def task_options(name: str, smoke: bool = False) -> dict:
    k = TASKS[name]
    if k is None:
        return se.smollm2_options()
    if smoke:
        return se.planted_options(k, SMOKE_ARGS, smoke=True)
    planted.make_task(k)  # cached for 2, 8, 32; generates planted-k4 (~30 s) once
    return se.planted_options(k, PLANTED_ARGS)


def identity_diff(stored: dict, opts: Options) -> list[str]:
    """Options whose stored value differs from ``opts``'s (the data and retain-set
    fingerprints aside: the same options make the same token blocks and retain set)."""
    from rankwise.storage.store import identity_diff as diff

    derived = ("data_sha256", "retain_sha256")
    return diff({k: v for k, v in stored.items() if k not in derived}, opts.identity())


def _complete_grid(run_dir: Path, flat: dict, ranks: list[int]) -> tuple[str, list | None]:
    """(state, trials) of an existing grid folder: 'absent', 'different settings',
    'running' (someone is training it), 'incomplete', or 'complete' with its trials."""
    if not (run_dir / "trials.sqlite").exists():
        return "absent", None
    store = RunStore(run_dir, readonly=True)
    try:
        differs = identity_diff(store.get_meta("identity"), Options.from_flat(flat))
        if differs:
            return f"different settings: {differs}", None
        trials = [store.result(f"r{r}-s0") for r in ranks]
        if all(t is not None for t in trials):
            return "complete", trials
        return ("running" if store.running() else "incomplete"), None
    finally:
        store.close()


def grid_for(name: str, options: dict, ranks: list[int], args) -> dict:
    """The grid's trials: reused read-only from search_efficiency.py's folder when its
    settings are identical, else run (or resumed) in this benchmark's own folder."""
    flat = dict(options, strategy="grid", ranks=ranks)
    theirs = args.grid_source / f"{name}-grid"
    deadline = time.monotonic() + args.wait
    while True:
        state, trials = _complete_grid(theirs, flat, ranks)
        if state != "running" or time.monotonic() > deadline:
            break
        print(f"{name}: waiting for search_efficiency.py's grid in {theirs}", flush=True)
        time.sleep(30)
    if trials is not None:
        return {"trials": trials, "source": f"reused {theirs}", "e2e": None}
    ours = args.out / f"{name}-grid"
    own_state, own = _complete_grid(ours, flat, ranks)
    if own is not None:  # run here earlier (by this script)
        return {
            "trials": own,
            "source": f"run here ({theirs.name}: {state.split(':')[0]})",
            "e2e": None,
        }
    print(f"{name}: grid here ({theirs.name}: {state.split(':')[0]})", flush=True)
    t0 = time.perf_counter()
    result = search(out=str(ours), quiet=True, **flat)
    return {
        "trials": result.trials,
        "source": f"run here ({theirs.name}: {state.split(':')[0]})",
        "e2e": time.perf_counter() - t0,
    }


def _curve(trials) -> dict[int, float]:
    return {s.rank: s.mean for s in rank_scores(trials) if s.ok}


def _finished_nested(run_dir: Path, flat: dict, ranks: list[int], final: bool):
    """(nested records, final trial or None, recommendation.json) of a finished nested
    search with these settings in ``run_dir``, read-only; None if there is none."""
    doc_path = run_dir / "recommendation.json"
    if not (run_dir / "trials.sqlite").exists() or not doc_path.exists():
        return None
    store = RunStore(run_dir, readonly=True)
    try:
        if identity_diff(store.get_meta("identity"), Options.from_flat(flat)):
            return None
        results = store.results()
    finally:
        store.close()
    records = [t for t in results if t.kind == "nested"]
    finals = [t for t in results if t.kind == "final"]
    doc = json.loads(doc_path.read_text())
    # No final trial when nothing was recommended (LoRA did not help at this budget).
    if sorted(t.rank for t in records) != sorted(ranks) or (final and doc["rank"] and not finals):
        return None
    return records, (finals[0] if finals else None), doc


def variant_label(args) -> str:
    """'' for the default nested search, else e.g. '-s1000-nofinal' (folder and JSON suffix)."""
    return (f"-s{args.nested_steps}" if args.nested_steps else "") + (
        "" if args.final else "-nofinal"
    )


def run_task(name: str, args) -> dict:
    options = task_options(name, args.smoke)
    ranks = [1, 2, 4] if args.smoke else RANKS[name]
    r_max = max(ranks)
    variant = variant_label(args)
    nested_opts = dict(options, final=args.final)
    if args.nested_steps:
        nested_opts["max_steps"] = args.nested_steps
    run_dir = args.out / f"{name}-nested{variant}"
    flat = dict(nested_opts, strategy="nested", ranks=ranks)
    done = _finished_nested(run_dir, flat, ranks, args.final)
    nested_e2e = None
    if done is None:
        t0 = time.perf_counter()
        search(out=str(run_dir), quiet=True, **flat)
        nested_e2e = time.perf_counter() - t0
        done = _finished_nested(run_dir, flat, ranks, args.final)
    else:  # finished earlier: keep that run's end-to-end time
        saved = args.out / "results" / f"{name}{variant}.json"
        if saved.exists():
            nested_e2e = json.loads(saved.read_text())["end_to_end_seconds"]["nested"]
    records, final, doc = done
    grid = grid_for(name, options, ranks, args)
    by_rank = {t.rank: t for t in grid["trials"] if t.status == COMPLETE}
    n_rec = recommend(rank_scores(records), TOLERANCE, base_loss=doc.get("base_val_loss"))
    g_rec = recommend(rank_scores(grid["trials"]), TOLERANCE, base_loss=doc.get("base_val_loss"))
    assert n_rec.rank == doc["rank"], (n_rec, doc["rank"])
    tokens = {
        "nested": sum(t.train_tokens for t in records),
        "final": final.train_tokens if final else 0,
        "one_trial_r_max": by_rank[r_max].train_tokens,
        "grid": sum(t.train_tokens for t in grid["trials"]),
    }
    wall = {
        "nested": sum(t.wall_seconds for t in records),
        "final": final.wall_seconds if final else 0.0,
        "one_trial_r_max": by_rank[r_max].wall_seconds,
        "grid": sum(t.wall_seconds for t in grid["trials"]),
    }
    spent_t, spent_w = tokens["nested"] + tokens["final"], wall["nested"] + wall["final"]
    return {
        "task": name,
        "variant": variant,
        "k": TASKS[name],
        "ranks": ranks,
        "options": options,
        "grid_source": grid["source"],
        "nested_curve": _curve(records),
        "grid_curve": _curve(grid["trials"]),
        "steps_at_rank": {t.rank: t.extra.get("steps_at_rank") for t in records},
        "nested_rank": n_rec.rank,
        "grid_rank": g_rec.rank,
        "same_rank": n_rec.rank == g_rec.rank,
        "regret": by_rank[n_rec.rank].best_val_loss - by_rank[g_rec.rank].best_val_loss,
        "final": doc.get("final"),
        "tokens": tokens,
        "wall": wall,
        "tokens_vs_one_trial": spent_t / tokens["one_trial_r_max"],
        "tokens_vs_grid": spent_t / tokens["grid"],
        "nested_only_tokens_vs_one_trial": tokens["nested"] / tokens["one_trial_r_max"],
        "wall_vs_one_trial": spent_w / wall["one_trial_r_max"],
        "wall_vs_grid": spent_w / wall["grid"],
        "grid_trials": len(grid["trials"]),
        "end_to_end_seconds": {"nested": nested_e2e, "grid": grid["e2e"]},
    }


def _fmt_curve(curve: dict) -> str:
    return " / ".join(f"{v:.4f}" for _, v in sorted(curve.items(), key=lambda kv: int(kv[0])))


def _fmt_gains(curve: dict) -> str:
    v = [x for _, x in sorted(curve.items(), key=lambda kv: int(kv[0]))]
    return " / ".join(f"{(a - b) / a:+.2%}" for a, b in zip(v, v[1:], strict=False))


COLUMNS = [
    "task", "k", "ranks", "nested rank", "grid rank", "same?", "regret (nats)",
    "nested+final tokens ÷ one r_max trial", "÷ grid (N trials)",
    "trial wall: nested+final ÷ one r_max trial", "÷ grid",
    "wall s: nested + final / grid trials (nested e2e)", "final − nested val at its rank",
]  # fmt: skip
HEADER = "| " + " | ".join(COLUMNS) + " |"


def _label(row: dict) -> str:
    variant = row.get("variant", "")
    return f"{row['task']} [nested {variant.lstrip('-')}]" if variant else row["task"]


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"


def _cells(r: dict) -> list:
    w, fin = r["wall"], r.get("final") or {}
    diff = fin.get("difference")
    return [
        _label(r), r["k"] or "-", ",".join(map(str, r["ranks"])), r["nested_rank"],
        r["grid_rank"], "yes" if r["same_rank"] else "NO", f"{r['regret']:+.4f}",
        f"{r['tokens_vs_one_trial']:.2f}", f"{r['tokens_vs_grid']:.2f} ({r['grid_trials']})",
        f"{r['wall_vs_one_trial']:.2f}", f"{r['wall_vs_grid']:.2f}",
        f"{_s(w['nested'])} + {_s(w['final'])} / {_s(w['grid'])} "
        f"({_s(r['end_to_end_seconds']['nested'])})",
        "-" if diff is None else f"{diff:+.4f}",
    ]  # fmt: skip


def table(rows: list[dict]) -> str:
    """Both tables, rendered from the stored rows (``results/<task>.json``)."""
    curves = []
    for r in rows:
        ranks = ",".join(str(x) for x in sorted(map(int, r["grid_curve"])))
        for kind in ("nested", "grid"):
            c = r[f"{kind}_curve"]
            curves.append([_label(r), kind, f"r={ranks}: {_fmt_curve(c)}", _fmt_gains(c),
                           r[f"{kind}_rank"]])  # fmt: skip
    head = ["task", "curve", "best val loss per rank", "gain per step up", "rank at 1%"]
    return harness.table(COLUMNS, map(_cells, rows)) + "\n\n" + harness.table(head, curves)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (as se.py)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--grid-source", type=Path, default=se.OUT, help="grids to reuse")
    parser.add_argument(
        "--wait", type=float, default=1800, help="seconds to wait for a grid being trained there"
    )
    parser.add_argument("--report", action="store_true", help="print the tables from saved JSON")
    parser.add_argument(
        "--nested-steps", type=int, help="variant: the nested run's max_steps (grid unchanged)"
    )
    parser.add_argument(
        "--no-final", dest="final", action="store_false", help="variant: no final trial"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny planted-k2 task, seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cleanup = None
    if args.smoke:
        args.tasks = ["planted-k2"]
        if args.out == OUT:  # a fresh folder unless --out names one (then it is kept)
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-nested-vs-grid-"))
            cleanup = args.out
        args.grid_source = args.out / "no-reuse"
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for name in args.tasks:
            t0 = time.perf_counter()
            row = run_task(name, args)
            (results / f"{name}{variant_label(args)}.json").write_text(
                json.dumps(row, indent=2) + "\n"
            )
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [json.loads(p.read_text()) for p in results.glob("*.json")]
    order = {n: i for i, n in enumerate(["planted-k2", "planted-k4", "planted-k8", "planted-k32"])}
    rows.sort(key=lambda r: (r.get("variant", ""), order.get(r["task"], 9)))
    if not args.smoke:  # every stored row, with the environment: bench/results/
        harness.write_results("nested_vs_grid", rows, settings={"out": str(args.out)})
    print(table(rows))
    if cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
