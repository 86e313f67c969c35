"""Precision: does ``--dtype auto`` (bf16 autocast where the CPU has it) change the answer?

For each task the grid trains every rank twice, once with fp32 throughout (``--dtype
float32``) and once with ``--dtype auto`` (fp32 weights, bf16 autocast on a CPU with
avx512_bf16), same seeds, data, steps and evaluation. The table gives both curves, the
largest loss difference between them, the seed-to-seed noise of the fp32 curve (the same
rank trained with a second seed), the recommended rank under each precision (the default
criterion), and the wall time of each grid.

Tasks: two planted-rank tasks of ``bench/planted.py`` (k = 2 and 8) and SmolLM2-135M on the
stdlib docstrings (the ``make demo`` setting, shortened).

Usage::

    .venv/bin/python -m bench.archive.precision                  # all three tasks (one thread)
    .venv/bin/python -m bench.archive.precision --smoke          # seconds, for tests
    .venv/bin/python -m bench.archive.precision --planted-cache DIR   # reuse generated tasks
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench import planted
from rankwise import search
from rankwise.core.scores import rank_scores
from rankwise.io import models
from rankwise.io.models import cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]  # bench/ (this file is in bench/archive/)

OUT = ROOT / ".cache" / "runs" / "precision"
PLANTED = {"steps": 200, "batch": 8, "eval_every": 50}


def task_options(name: str, cache: Path, smoke: bool) -> tuple[dict, list[int]]:
    if name == "smollm2":
        opts = {
            "model": "smollm2",
            "train": "stdlib-docstrings",
            "seq_len": 64,
            "batch_size": 4,
            "max_steps": 30,
            "eval_every": 10,
            "warmup_steps": 3,
            "lr": 1e-3,
            "max_examples": 1000,
            "eval_batches": 8,
        }
        return opts, [1, 4, 16]
    k = int(name.split("k")[-1])
    if smoke:
        task = planted.make_task(k, planted.CACHE / f"planted-k{k}-smoke", **planted.SMOKE)
        steps, batch, every = 6, 4, 3
    else:
        task = cache / f"planted-k{k}"
        if not (task / "task.json").exists():
            task = planted.make_task(k, task)
        steps, batch, every = PLANTED["steps"], PLANTED["batch"], PLANTED["eval_every"]
    meta = json.loads((task / "task.json").read_text())
    opts = {
        "model": str(task / "model"),
        "train": str(task / "train.jsonl"),
        "val": str(task / "val.jsonl"),
        "seq_len": meta["usage"]["seq_len"],
        "target_modules": list(planted.TARGETS),
        "alpha": 8.0,
        "lr": 3e-3,
        "batch_size": batch,
        "max_steps": steps,
        "eval_every": every,
        "warmup_steps": max(1, steps // 20),
    }
    return opts, ([1, 2] if smoke else [1, 2, 4, 8])


def grid(opts: dict, ranks: list[int], dtype: str, out: Path, seeds: int = 1):
    """The grid's result and its trials' wall time (model loading and set-up excluded)."""
    result = search(
        out=str(out), strategy="grid", ranks=ranks, dtype=dtype, seeds=seeds, quiet=True, **opts
    )
    return result, sum(t.wall_seconds for t in result.trials)


def run_task(name: str, args) -> dict:
    opts, ranks = task_options(name, args.planted_cache, args.smoke)
    runs = args.out / name
    fp32, t32 = grid(opts, ranks, "float32", runs / "fp32")
    auto, tauto = grid(opts, ranks, "auto", runs / "auto")
    # Seed-to-seed noise of fp32 at the middle rank: the same trial with a second seed.
    mid = ranks[len(ranks) // 2]
    seeded, _ = grid(opts, [mid], "float32", runs / "fp32-seeds", seeds=2)
    noise = [t.best_val_loss for t in seeded.trials if t.ok]
    c32 = {s.rank: s.mean for s in rank_scores(fp32.trials) if s.ok}
    cau = {s.rank: s.mean for s in rank_scores(auto.trials) if s.ok}
    return {
        "task": name,
        "ranks": ranks,
        "fp32": c32,
        "auto": cau,
        "max_diff": max(abs(c32[r] - cau[r]) for r in c32 if r in cau),
        "seed_noise": abs(noise[0] - noise[1]) if len(noise) == 2 else None,
        "rank_fp32": fp32.recommendation.rank,
        "rank_auto": auto.recommendation.rank,
        "seconds_fp32": t32,
        "seconds_auto": tauto,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| task | ranks | val loss fp32 | val loss auto (bf16 autocast) | max diff | seed noise |"
        " rank fp32 / auto | trials' wall fp32 / auto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = lambda c: " / ".join(f"{c[k]:.4f}" for k in sorted(c, key=int))  # noqa: E731
        noise = f"{r['seed_noise']:.4f}" if r["seed_noise"] is not None else "-"
        lines.append(
            f"| {r['task']} | {','.join(map(str, r['ranks']))} | {curve(r['fp32'])} | "
            f"{curve(r['auto'])} | {r['max_diff']:.4f} | {noise} | "
            f"{r['rank_fp32']} / {r['rank_auto']} | "
            f"{r['seconds_fp32']:.0f} s / {r['seconds_auto']:.0f} s "
            f"({r['seconds_fp32'] / r['seconds_auto']:.2f}x) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["planted-k2", "planted-k8", "smollm2"])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--planted-cache", type=Path, default=planted.CACHE)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The comparison is fp32 against bf16 autocast on every task: --dtype auto keeps bases
    # under AUTOCAST_MIN_PARAMS_CPU in fp32 (this benchmark's planted models are why).
    models.AUTOCAST_MIN_PARAMS_CPU = 0
    if args.smoke:
        args.tasks = ["planted-k2"]
        if args.out == OUT:  # a fresh folder unless --out names one
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-precision-"))
    print(f"bf16 on this CPU: {cpu_has_bf16()}", file=sys.stderr)
    rows = [run_task(name, args) for name in args.tasks]
    if not args.smoke:
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
