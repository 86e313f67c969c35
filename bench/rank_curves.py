"""Rank curves of the planted tasks: the grid over r = 1..64 and the base model ("r=0").

For each planted task (``bench/planted.py``, k = 2, 4, 8, 16, 32) this trains every rank
with ``rankwise.search(strategy="grid")`` and evaluates the base model, without an
adapter, on the same validation blocks with ``rankwise.training.evaluate.evaluate`` (the function every
trial's score comes from). The curve (rank -> best val loss, training tokens, trial wall
time) and the base loss are written to ``bench/.cache/curves/planted-k{k}.json``, which
``bench/criteria.py`` replays under each stopping criterion without training again.

Settings are those of ``bench/search_efficiency.py`` (q/v/up/down, fixed lora_alpha 8,
16 records x 128 tokens per step, linear schedule) with a larger learning rate and an
explicit step count: the calibration in "Alpha policy" (bench/RESULTS.md) picked 3e-2 for
the planted tasks in 8 of 9 runs, and a curve trained at a rate too small for its large
ranks keeps falling past k for want of steps, not of capacity.

Usage::

    .venv/bin/python -m bench.rank_curves                       # all five tasks
    .venv/bin/python -m bench.rank_curves --k 8 --steps 300     # one task, other budget
    .venv/bin/python -m bench.rank_curves --smoke               # seconds, for tests

Run folders go to ``bench/.cache/runs/criteria/``; a rerun resumes finished trials.
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
from rankwise.core.scores import rank_scores

ROOT = Path(__file__).resolve().parent

CURVES = planted.CACHE / "curves"
RUNS = planted.CACHE / "runs" / "criteria"
KS = [2, 4, 8, 16, 32]
RANKS = [1, 2, 4, 8, 16, 32, 64]


def options(task: Path, args) -> dict:
    """rankwise.search options for one planted task."""
    meta = json.loads((task / "task.json").read_text())
    return {
        "model": str(task / "model"),
        "train": str(task / "train.jsonl"),
        "val": str(task / "val.jsonl"),
        "seq_len": meta["usage"]["seq_len"],  # one record + EOS per block
        "target_modules": list(planted.TARGETS),
        "alpha": 8.0,
        "lr": args.lr,
        "batch_size": args.batch,
        "max_steps": args.steps,
        "eval_every": args.eval_every,
        "warmup_steps": max(1, args.steps // 20),
    }


def base_loss(run_dir: Path, model_dir: str, batch_size: int) -> float:
    """Val loss of the base model (no adapter) on the run's own validation blocks."""
    from safetensors.torch import load_file

    from rankwise.config import ModelConfig
    from rankwise.io.models import load_model
    from rankwise.training.evaluate import evaluate

    model, _, device = load_model(ModelConfig(model=model_dir))
    t = load_file(str(run_dir / "data" / "tokens.safetensors"))
    return evaluate(model, t["val_ids"], t["val_labels"], batch_size, device)


def collect(k: int, task: Path, args, runs: Path) -> dict:
    """Grid + base loss for one task; the curve as stored under ``bench/.cache/curves/``."""
    opts = options(task, args)
    run_dir = runs / f"planted-k{k}-s{args.steps}"
    t0 = time.perf_counter()
    result = search(out=str(run_dir), quiet=True, strategy="grid", ranks=args.ranks, **opts)
    wall = time.perf_counter() - t0
    base = base_loss(run_dir, opts["model"], opts["batch_size"])
    trials = {t.rank: t for t in result.trials}
    meta = json.loads((task / "task.json").read_text())
    return {
        "task": f"planted-k{k}",
        "k": k,
        "base_loss": base,
        "teacher_loss": meta["losses"]["teacher_val_with_eos"],
        "curve": {str(s.rank): s.mean for s in rank_scores(result.trials) if s.ok},
        "train_tokens": {str(r): t.train_tokens for r, t in trials.items()},
        "trainable_params": {str(r): t.trainable_params for r, t in trials.items()},
        "trial_wall": {str(r): t.wall_seconds for r, t in trials.items()},
        "search_wall": wall,
        "options": opts,
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=KS, help="planted ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps per trial")
    parser.add_argument("--batch", type=int, default=16, help="records per step")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--eval-every", type=int, default=100, help="steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=CURVES, help="folder of the curve JSONs")
    parser.add_argument("--smoke", action="store_true", help="tiny task, two ranks, seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = RUNS
    if args.smoke:
        args.k, args.ranks, args.steps, args.batch, args.eval_every = [2], [1, 2], 4, 4, 2
        if args.out == CURVES:  # a fresh folder unless --out names one
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-curves-"))
        runs = args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    for k in args.k:
        task = (
            planted.make_task(k, planted.CACHE / f"planted-k{k}-smoke", **planted.SMOKE)
            if args.smoke
            else planted.make_task(k)
        )
        body = collect(k, task, args, runs)
        (args.out / f"planted-k{k}.json").write_text(json.dumps(body, indent=2) + "\n")
        curve = " / ".join(f"{v:.4f}" for v in body["curve"].values())
        print(
            f"planted-k{k}: base {body['base_loss']:.4f}, r={','.join(body['curve'])}: {curve}"
            f" ({body['search_wall']:.0f} s)",
            flush=True,
        )
    print(f"curves in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
