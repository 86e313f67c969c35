"""Search cost: which strategy gives the grid's rank for the fewest training tokens?

Target: at most 1.5x one trial's tokens, the grid's rank on every task but at most one, and
a delivered adapter whose val loss is no worse than an ordinary trial at that rank (within
seed noise). The floor is 1.0x: the user must train the chosen adapter anyway.

For each task the grid (every rank, ordinary trials) is the reference. Each variant runs as
a real ``rankwise.search`` with exactly the grid's data, seed, steps, learning rate and
evaluation, in its own run folder:

- ``ladder``: rankwise's default strategy. A trial is a deterministic function of its spec,
  so the ladder is *replayed* on the grid's trials with ``rankwise.core.strategies.Ladder`` (it asks
  for exactly the trials a real run trains); it delivers the grid's trial at its answer.
- ``nested+final``: one nested-rank run (fixed-alpha scale per drawn rank, ranks drawn
  uniform over the list), then an ordinary final trial at the answer (``--strategy nested``).
- ``nested+warm½``: the same nested run; the final trial starts from the nested run's
  truncation at the answer and trains half the steps (``--final-init nested
  --final-steps 0.5``).
- ``nested-r+warm½``: as ``nested+warm½``, ranks drawn uniform in r (a listed rank's share
  of the steps grows with its width: half of them at r_max, ``--nested-distribution
  uniform-r``).
- ``shared+warm½``: as ``nested+warm½``, with one LoRA scale for every truncation (``--nested-scale
  shared``) so that a larger truncation only adds components.
- ``shared-r+warm½``: as above, ranks drawn uniform in r (weighted to large ranks,
  ``--nested-distribution uniform-r``).
- ``short-ladder¼``: the ladder replayed on a grid of short trials (a quarter of the steps),
  then one full ordinary trial at its answer (the grid's trial at that rank).

Delivered: what the search hands back (for nested variants the better of the final trial and
the truncation it started from). "vs grid" = delivered val loss - the grid's ordinary trial
at the same rank. Noise: the grid's trial at its own rank trained with a second seed.

Tasks: planted k = 2, 4, 8, 16, 32 of ``bench/planted.py``; planted k = 2, 8, 32 of the
second generator ``bench/planted2.py`` (another base, planting and data); SmolLM2-135M on the
stdlib docstrings and on installed packages' READMEs (``bench/corpora.py``).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.archive.search_cost --tasks planted-k2 planted-k8
    .venv/bin/python -m bench.archive.search_cost --report      # the table from saved JSON
    .venv/bin/python -m bench.archive.search_cost --smoke       # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench import planted
from rankwise import search
from rankwise.config import SearchConfig
from rankwise.core.criteria import recommend
from rankwise.core.strategies import Ladder
from rankwise.storage.store import RunStore

ROOT = Path(__file__).resolve().parents[1]  # bench/ (this file is in bench/archive/)

OUT = ROOT / ".cache" / "runs" / "search-cost"
PLANTED = {"max_steps": 300, "batch_size": 16, "eval_every": 50, "warmup_steps": 15}
SMOLLM2 = {
    "model": "smollm2",
    "seq_len": 64,
    "batch_size": 4,
    "max_steps": 60,
    "eval_every": 15,
    "warmup_steps": 3,
    "lr": 1e-3,
    "max_examples": 2000,
    "eval_batches": 16,
    "dtype": "auto",
}
NESTED = {"strategy": "nested"}
WARM = {**NESTED, "final_init": "nested", "final_steps": 0.5}
VARIANTS: dict[str, dict | None] = {
    "ladder": None,  # replayed on the grid
    "nested+final": NESTED,
    "nested+warm½": WARM,
    "nested-r+warm½": {**WARM, "nested_distribution": "uniform-r"},
    "shared+warm½": {**WARM, "nested_scale": "shared"},
    "shared-r+warm½": {**WARM, "nested_scale": "shared", "nested_distribution": "uniform-r"},
    "short-ladder¼": None,  # replayed on a grid of quarter-length trials
}
TASKS = [
    "planted-k2",
    "planted-k4",
    "planted-k8",
    "planted-k16",
    "planted-k32",
    "planted2-k2",
    "planted2-k8",
    "planted2-k32",
    "smollm2-docstrings",
    "smollm2-readmes",
]


def ranks_for(k: int, generator: str = "planted") -> list[int]:
    """Six doublings around k; planted2's k/v projections (GQA, 2 heads) have 64 outputs."""
    if k == 32 and generator == "planted2":
        return [2, 4, 8, 16, 32, 64]
    return {16: [2, 4, 8, 16, 32, 64], 32: [4, 8, 16, 32, 64, 128]}.get(k, [1, 2, 4, 8, 16, 32])


def task_options(name: str, smoke: bool = False) -> tuple[dict, list[int]]:
    """rankwise.search options (data, model, training) and ranks of a task."""
    if name.startswith("smollm2"):
        if name.endswith("readmes"):
            from bench import corpora

            train = str(corpora.package_readmes())
        else:
            train = "stdlib-docstrings"
        return {**SMOLLM2, "train": train}, [1, 2, 4, 8, 16, 32]
    gen, k = name.split("-k")
    k = int(k)
    if gen == "planted2":
        from bench import planted2 as module
    else:
        module = planted
    if smoke:
        task = module.make_task(k, module.CACHE / f"{gen}-k{k}-smoke", **module.SMOKE)
    else:
        task = module.make_task(k)
    meta = json.loads((task / "task.json").read_text())
    opts = {
        "model": str(task / "model"),
        "train": str(task / "train.jsonl"),
        "val": str(task / "val.jsonl"),
        "seq_len": meta["usage"]["seq_len"],
        "target_modules": list(meta.get("targets") or planted.TARGETS),
        "alpha": 8.0,
        "lr": 3e-3,
        "dtype": "float32",
        **PLANTED,
    }
    if smoke:
        opts.update(max_steps=8, batch_size=4, eval_every=4, warmup_steps=1, lr=3e-2)
    return opts, ([1, 2, 4] if smoke else ranks_for(k, gen))


def run(out: Path, opts: dict, ranks: list[int], **over):
    return search(out=str(out), ranks=ranks, quiet=True, **{**opts, **over})


def tokens(out: Path) -> int:
    return sum(r.train_tokens or 0 for r in RunStore(out).results())


def replay(trials, ranks: list[int], start: int, base_loss: float):
    """The ladder's asked trials and its recommendation on stored results of the same specs."""
    by_rank = {t.rank: t for t in trials if t.seed == 0}
    ladder = Ladder(ranks=ranks, start_rank=start, base_loss=base_loss)
    while (p := ladder.ask()) is not None:
        ladder.tell(by_rank[p.rank])
    rec = recommend(ladder.scores(), ladder.criterion, ladder.stop_reason, base_loss)
    return ladder.results, rec


def run_task(name: str, out: Path, smoke: bool = False, variants=None) -> dict:
    opts, ranks = task_options(name, smoke)
    one = opts["max_steps"] * opts["batch_size"] * opts["seq_len"]
    t0 = time.perf_counter()
    grid = run(out / "grid", opts, ranks, strategy="grid")
    by_rank = {t.rank: t for t in grid.trials if t.ok}
    base = grid.recommendation.base_loss
    g_rank = grid.recommendation.rank
    # rankwise's own start rank for these bases (all under 1B parameters; SmolLM2: 135M).
    start = SearchConfig(ranks=ranks).start_rank_for(135_000_000)
    row = {
        "task": name,
        "ranks": ranks,
        "one_trial_tokens": one,
        "base": base,
        "grid_rank": g_rank,
        "grid_curve": {t.rank: t.best_val_loss for t in by_rank.values()},
        "grid_seconds": sum(t.wall_seconds for t in grid.trials),
        "variants": {},
    }
    noise = run(out / "noise", opts, [g_rank], strategy="grid", seeds=2)
    pair = [t.best_val_loss for t in noise.trials if t.ok]
    row["noise"] = abs(pair[0] - pair[1]) if len(pair) == 2 else None
    for variant, over in VARIANTS.items():
        if variants and variant not in variants:
            continue
        if variant == "ladder":
            asked, rec = replay(grid.trials, ranks, start, base)
            rank, used = rec.rank, sum(t.train_tokens for t in asked) / one
            delivered, curve = by_rank[rank].best_val_loss, None
        elif variant.startswith("short-ladder"):
            short = run(
                out / "grid-short",
                opts,
                ranks,
                strategy="grid",
                max_steps=max(2, opts["max_steps"] // 4),
                eval_every=max(1, opts["eval_every"] // 4),
            )
            asked, rec = replay(short.trials, ranks, start, base)
            rank = rec.rank
            used = sum(t.train_tokens for t in asked) / one + 1.0
            delivered = by_rank[rank].best_val_loss
            curve = {t.rank: t.best_val_loss for t in short.trials if t.ok}
        else:
            result = run(out / variant.replace("½", "-half"), opts, ranks, **over)
            rank = result.recommendation.rank
            rec_json = json.loads((result.run_dir / "recommendation.json").read_text())
            final = rec_json.get("final") or {}
            candidates = [final.get("final_val_loss"), final.get("nested_val_loss")]
            delivered = min(c for c in candidates if c is not None)
            used = tokens(result.run_dir) / one
            curve = {t.rank: t.best_val_loss for t in result.trials if t.ok}
        row["variants"][variant] = {
            "rank": rank,
            "tokens": used,
            "delivered": delivered,
            "vs_grid": delivered - by_rank[rank].best_val_loss if rank in by_rank else None,
            "curve": curve,
        }
    row["seconds"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| task | grid rank | noise | "
        + " | ".join(f"{v}: tokens / rank / vs grid" for v in VARIANTS)
        + " |",
        "|---|---|---|" + "---|" * len(VARIANTS),
    ]
    for row in rows:
        cells = []
        for v in VARIANTS:
            x = row["variants"].get(v)
            if x is None:
                cells.append("-")
                continue
            mark = "" if x["rank"] == row["grid_rank"] else " ✗"
            gap = f"{x['vs_grid']:+.4f}" if x["vs_grid"] is not None else "-"
            cells.append(f"{x['tokens']:.2f}× / r={x['rank']}{mark} / {gap}")
        noise = f"{row['noise']:.4f}" if row["noise"] is not None else "-"
        lines.append(
            f"| {row['task']} | {row['grid_rank']} | {noise} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    lines = [
        "| variant | max tokens ÷ one trial | same rank as the grid | worst delivered vs grid "
        "(nats) | worst (vs grid − noise) |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        xs = [(r, r["variants"][v]) for r in rows if v in r["variants"]]
        if not xs:
            continue
        same = sum(x["rank"] == r["grid_rank"] for r, x in xs)
        gaps = [x["vs_grid"] for _, x in xs if x["vs_grid"] is not None]
        over = [x["vs_grid"] - (r["noise"] or 0) for r, x in xs if x["vs_grid"] is not None]
        lines.append(
            f"| {v} | {max(x['tokens'] for _, x in xs):.2f} | {same} of {len(xs)} | "
            f"{max(gaps):+.4f} | {max(over):+.4f} |"
        )
    return "\n".join(lines)


def curves(rows: list[dict]) -> str:
    lines = ["| task | curve | val loss per rank |", "|---|---|---|"]
    for row in rows:
        fmt = lambda c: " / ".join(f"{c[k]:.4f}" for k in sorted(c, key=int))  # noqa: E731
        lines.append(
            f"| {row['task']} | grid (base {row['base']:.4f}) | {fmt(row['grid_curve'])} |"
        )
        for v, x in row["variants"].items():
            if x.get("curve"):
                lines.append(f"| {row['task']} | {v} | {fmt(x['curve'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="print the tables from saved JSON")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        if args.out == OUT:  # a fresh folder unless --out names one
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-search-cost-"))
        args.tasks = ["planted-k2"]
    rows = []
    for name in args.tasks:
        saved = args.out / name / "result.json"
        if args.report:
            if saved.exists():
                rows.append(json.loads(saved.read_text()))
            continue
        row = run_task(name, args.out / name, args.smoke, args.variants)
        saved.parent.mkdir(parents=True, exist_ok=True)
        if saved.exists() and args.variants:  # keep the variants measured before
            old = json.loads(saved.read_text())
            row["variants"] = {**old["variants"], **row["variants"]}
        saved.write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(table([row]), flush=True)
    print(table(rows))
    print()
    print(summary(rows))
    print()
    print(curves(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
