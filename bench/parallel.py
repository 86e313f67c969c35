"""Parallel trials: the grid and the ladder on 2 Ray workers against the local executor.

The same search (same model, data, ranks, settings, so the same trial specs) runs four
times in this process:

- grid, ``--executor local``: one trial after another, one torch thread;
- grid, ``--executor ray --workers 2``: two workers, one torch thread each;
- ladder, local and on 2 workers: the parallel ladder also runs the ranks it may need
  next (speculation); it must make the same trials decide and recommend the same rank.

Reported: the search's wall time (Ray's own start, once per process, is shown apart:
``ray start``; each Ray search still pays for starting its workers and loading the model
in each), the speed-up, and for the ladder the tokens trained by speculative trials that
the search did not need, as a share of the needed ones. The losses of the trials both
executors ran are checked equal (a trial is a function of its spec).

The model is a tiny Llama built from a config (``rankwise.testing``), large enough that a
trial takes seconds; the data is random words. The machine is shared: the load average
during the run is printed with the table.

Usage::

    .venv/bin/python -m bench.parallel            # a few minutes; bench/results/parallel.json
    .venv/bin/python -m bench.parallel --smoke    # seconds of training
    .venv/bin/python -m bench.parallel --smoke --strategies ladder --results DIR   # tests
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_worker_niceness", "0")  # as rankwise's own local Ray (executor.py)

import torch  # noqa: E402

from bench import harness  # noqa: E402
from rankwise.storage.store import RunStore  # noqa: E402
from rankwise.testing import save_tiny_model  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()
FULL = {
    "hidden": 192,
    "layers": 3,
    "ranks": "1,2,4,8,16,32",
    "steps": 150,
    "seq_len": 96,
    "batch": 8,
    "records": 600,
}
SMOKE = {"hidden": 64, "layers": 2, "ranks": "1,2,4", "steps": 4, "seq_len": 32, "batch": 4}
SMOKE["records"] = 120


def make_task(folder: Path, p: dict) -> tuple[Path, Path]:
    model = save_tiny_model(folder / "model", "llama", hidden=p["hidden"], layers=p["layers"])
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(p["records"])]
    train = folder / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": s}) for s in lines))
    return model, train


def run(model: Path, train: Path, out: Path, p: dict, strategy: str, executor: str) -> dict:
    from rankwise import search

    kw = {"executor": executor} if executor == "local" else {"executor": "ray", "workers": 2}
    t0 = time.perf_counter()
    result = search(
        model=str(model),
        train=str(train),
        out=str(out),
        ranks=p["ranks"],
        start_rank=1,
        strategy=strategy,
        max_steps=p["steps"],
        batch_size=p["batch"],
        seq_len=p["seq_len"],
        eval_every=p["steps"],
        lr=3e-3,
        warmup_steps=0,
        quiet=True,
        **kw,
    )
    wall = time.perf_counter() - t0
    store = RunStore(out, readonly=True)
    trials = store.results()
    store.close()
    spec = [t for t in trials if t.extra.get("speculative")]
    return {
        "wall": wall,
        "rank": result.recommendation.rank,
        "decided": [t.key for t in result.trials],
        "losses": {t.key: t.best_val_loss for t in trials},
        "tokens": sum(t.train_tokens for t in trials if t not in spec),
        "extra_tokens": sum(t.train_tokens for t in spec),
        "speculative": [t.key for t in spec],
    }


HEADER = ["search", "trials (decided + speculative)", "local s", "ray 2 workers s", "speed-up",
          "speculative tokens", "same decisions", "same losses"]  # fmt: skip


def table(rows: list[dict]) -> str:
    """The table, from the rows main() stores (one per strategy: both searches)."""

    def cells(row: dict) -> list:
        local, par = row["local"], row["ray"]
        extra = f"{par['extra_tokens'] / par['tokens']:.0%}" if par["tokens"] else "-"
        return [row["strategy"], f"{len(par['decided'])} + {len(par['speculative'])}",
                f"{local['wall']:.1f}", f"{par['wall']:.1f}", f"{local['wall'] / par['wall']:.2f}x",
                f"{par['extra_tokens']:,} ({extra})", f"yes (r={par['rank']})",
                "yes" if row["same_losses"] else "NO"]  # fmt: skip

    return harness.table(HEADER, map(cells, rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model and few steps")
    ap.add_argument(
        "--strategies", nargs="+", default=["grid", "ladder"], choices=["grid", "ladder"]
    )
    ap.add_argument("--results", type=Path, help="folder of parallel.json (--smoke: none)")
    args = ap.parse_args(argv)
    p = SMOKE if args.smoke else FULL
    import ray

    torch.set_num_threads(1)  # the local executor gets what one worker gets
    t0 = time.perf_counter()
    own = not ray.is_initialized()  # else join the Ray this process runs (the tests')
    if own:
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
        )
    ray_start = time.perf_counter() - t0
    load = [os.getloadavg()[0]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, train = make_task(Path(tmp), p)
        for strategy in args.strategies:
            local = run(model, train, Path(tmp) / f"{strategy}-local", p, strategy, "local")
            load.append(os.getloadavg()[0])
            par = run(model, train, Path(tmp) / f"{strategy}-ray", p, strategy, "ray")
            load.append(os.getloadavg()[0])
            same = all(par["losses"][k] == v for k, v in local["losses"].items())
            assert local["decided"] == par["decided"] and local["rank"] == par["rank"]
            rows.append({"strategy": strategy, "local": local, "ray": par, "same_losses": same})
    if own:
        ray.shutdown()
    if args.results or not args.smoke:
        settings = {**p, "ray_start_seconds": ray_start, "load_average": [min(load), max(load)]}
        harness.write_results("parallel", rows, args.results, settings)
    print(
        f"ray start: {ray_start:.1f} s; load average (1 min) during the run: "
        f"{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
