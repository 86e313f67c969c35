"""Per-layer ranks: uniform r against the spectral pattern and EVA (``--per-layer``).

For each task one search with ``--strategy grid --ranks R --per-layer``: the uniform
adapter at rank R, then the two proposals rankwise trains after it (the spectral pattern
of the uniform adapter, keeping 90% of every module's update energy; PEFT's EVA at that
pattern's rank budget), each with the same data, steps and seed. Reported per row: the
LoRA ``r`` and mean rank per module type, trainable parameters (PEFT's count), best val
loss, training tokens, and whether rankwise lets the proposal replace the uniform rank.
Also: the uniform adapter's effective rank at 90% energy by module type
(``rankwise inspect``).

Tasks (all-linear adapters, fixed alpha 8, lr 3e-3 on the planted tasks):

- ``planted-mlp``: the tiny planted Llama (``bench/planted.py``) with a rank-8 update on
  up_proj and down_proj only, nothing on q/v. Records of 31 characters (seq_len 32).
- ``planted-qv``: the same with the rank-8 update on q_proj and v_proj only.
- ``smollm2``: SmolLM2-135M-Instruct on the stdlib docstrings (the ``make demo`` setting,
  all-linear, r=16).

Results go to ``bench/.cache/runs/per-layer/`` (one run folder and one JSON per task);
re-running resumes finished trials. ``--report`` prints the table from the JSON.

Usage::

    .venv/bin/python -m bench.archive.per_layer                   # all three tasks (~20 min, 2 cores)
    .venv/bin/python -m bench.archive.per_layer --tasks planted-mlp --energies 0.9 0.95  # + 2 trials
    .venv/bin/python -m bench.archive.per_layer --report
    .venv/bin/python -m bench.archive.per_layer --smoke           # seconds, for tests
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
from rankwise.analysis.spectra import inspect_adapter

ROOT = Path(__file__).resolve().parents[1]  # bench/ (this file is in bench/archive/)

OUT = ROOT / ".cache" / "runs" / "per-layer"
# Planted tasks: short records (seq_len 32) so that an r=32 all-linear trial takes about a
# minute on 2 cores; data_seed 6: the seed whose samples all round-trip the tokenizer.
PLANTED = {
    "planted-mlp": {"k": 8, "modules": "up_proj+down_proj"},
    "planted-qv": {"k": 8, "modules": "q_proj+v_proj"},
}
PLANTED_SIZES = {"seq_chars": 31, "n_train": 4096, "n_val": 256, "data_seed": 6}
TASKS = [*PLANTED, "smollm2"]


def task_options(task: str, args) -> dict:
    """``rankwise.search`` options for one task (``args.smoke``: a tiny task, seconds)."""
    if task == "smollm2":
        return {
            "model": "smollm2",
            "train": "stdlib-docstrings",
            "seq_len": 64,
            "batch_size": 4,
            "max_steps": args.smollm2_steps,
            "eval_every": 10,
            "warmup_steps": 4,
            "lr": 1e-3,
            "max_examples": 2000,
            "eval_batches": 16,
            "ranks": [16],
        }
    spec = PLANTED[task]
    sizes = planted.SMOKE if args.smoke else PLANTED_SIZES
    name = planted.task_name(spec["k"], spec["modules"]) + "-s31" + ("-smoke" if args.smoke else "")
    folder = planted.make_task(spec["k"], planted.CACHE / name, modules=spec["modules"], **sizes)
    meta = json.loads((folder / "task.json").read_text())
    return {
        "model": str(folder / "model"),
        "train": str(folder / "train.jsonl"),
        "val": str(folder / "val.jsonl"),
        "seq_len": meta["usage"]["seq_len"],
        "alpha": 8.0,
        "lr": 3e-3,
        "batch_size": args.batch,
        "max_steps": args.steps,
        "eval_every": args.eval_every,
        "warmup_steps": max(1, args.steps // 20),
        "ranks": [args.rank],
    }


def run(task: str, args) -> dict:
    options = task_options(task, args)
    ranks = options.pop("ranks")
    out = args.out / task
    start = time.perf_counter()
    # Smoke: 6 steps leave a near-full-rank update, of which the default energy share keeps
    # every component; at 0.9 the spectra propose a pattern and both proposals are trained.
    energy = {"per_layer_energy": 0.9} if args.smoke else {}
    result = search(
        strategy="grid",
        start_rank=ranks[0],
        target_modules=["all-linear"],
        per_layer=True,
        **energy,
        out=str(out),
        quiet=True,
        **options,
        ranks=ranks,
    )
    rec = json.loads((out / "recommendation.json").read_text())
    uniform = inspect_adapter(out / "trials" / rec["per_layer"]["rows"][0]["key"] / "adapter")
    by_type: dict[str, list[int]] = {}
    for m in uniform.modules:
        by_type.setdefault(m.kind, []).append(m.effective_rank(0.9))
    row = {
        "task": task,
        "rank": ranks[0],
        "steps": options["max_steps"],
        "wall_seconds": time.perf_counter() - start,
        "effective_rank_90": {k: sum(v) / len(v) for k, v in by_type.items()},
        "per_layer": rec["per_layer"],
        "delivered": json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"],
    }
    if not args.smoke:
        (args.out / f"{task}.json").write_text(json.dumps(row, indent=2))
    return row


def energy_sweep(task: str, energies: list[float], args) -> list[dict]:
    """The spectral pattern at other energy shares, trained from the same uniform adapter
    with the same spec (what ``--per-layer --per-layer-energy E`` would train)."""
    from rankwise.storage.store import RunStore
    from rankwise.training.patterns import pattern_spec
    from rankwise.training.trial import run_trial

    out = args.out / task
    rec = json.loads((out / "recommendation.json").read_text())
    uniform = rec["per_layer"]["rows"][0]
    spec = RunStore(out, readonly=True).spec(uniform["key"])
    rows = []
    for energy in energies:
        proposal = inspect_adapter(out / "trials" / uniform["key"] / "adapter").proposal(energy)
        lora = pattern_spec(spec.lora, proposal.ranks, "fixed")
        trial = run_trial(spec.replace(key=f"energy-{energy:g}", lora=lora, adapter_dir=None))
        rows.append(
            {
                "energy": energy,
                "trainable_params": trial.trainable_params,
                "params_share": trial.trainable_params / uniform["trainable_params"],
                "val_loss": trial.best_val_loss,
                "change": (trial.best_val_loss - uniform["mean"]) / uniform["mean"],
            }
        )
    if not args.smoke:
        (args.out / f"{task}-energies.json").write_text(json.dumps(rows, indent=2))
    return rows


def energy_table(task: str, rows: list[dict]) -> str:
    lines = [
        "| task | energy kept | trainable params | val loss | vs uniform |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {task} | {r['energy']:g} | {r['trainable_params']:,} ({r['params_share']:.0%}) | "
            f"{r['val_loss']:.4f} | {r['change']:+.2%} |"
        )
    return "\n".join(lines)


def _pattern(row: dict) -> str:
    if row["proposal"] == "uniform":
        return f"r={row['lora_r']} everywhere"
    if row.get("mean") is None:
        return f"not trained: {row.get('reason', '')}"
    types = ", ".join(f"{k.removesuffix('_proj')} {v:.3g}" for k, v in row["ranks_by_type"].items())
    return f"r={row['lora_r']}; mean rank: {types}"


def table(rows: list[dict]) -> str:
    lines = [
        "| task | proposal | ranks | trainable params | val loss | vs uniform | tokens | "
        "replaces uniform |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        section = r["per_layer"]
        for p in section["rows"]:
            loss = f"{p['mean']:.4f}" if p.get("mean") is not None else "-"
            params = (
                f"{p['trainable_params']:,} ({p['params_share']:.0%})"
                if p.get("trainable_params")
                else "-"
            )
            change = f"{p['change']:+.2%}" if p.get("change") is not None else ""
            picked = "yes" if section["pick"] == p["proposal"] else ""
            if p["proposal"] == "uniform":
                picked = "kept" if section["pick"] == "uniform" else ""
            tokens = f"{p['train_tokens']:,}" if p.get("train_tokens") else "-"
            lines.append(
                f"| {r['task']} | {p['proposal']} | {_pattern(p)} | {params} | {loss} | "
                f"{change} | {tokens} | {picked} |"
            )
    return "\n".join(lines)


def inspect_table(rows: list[dict]) -> str:
    kinds = list(dict.fromkeys(k for r in rows for k in r["effective_rank_90"]))
    lines = [
        "| task | uniform r | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for r in rows:
        cells = [f"{r['effective_rank_90'].get(k, float('nan')):.3g}" for k in kinds]
        lines.append(f"| {r['task']} | {r['rank']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--rank", type=int, default=32, help="planted: the uniform rank")
    parser.add_argument("--steps", type=int, default=600, help="planted: steps per trial")
    parser.add_argument("--batch", type=int, default=32, help="planted: records per step")
    parser.add_argument("--eval-every", type=int, default=100, help="planted: steps")
    parser.add_argument("--smollm2-steps", type=int, default=40, help="smollm2: steps per trial")
    parser.add_argument(
        "--energies",
        type=float,
        nargs="*",
        default=[],
        help="also train the spectral pattern at these energy shares (first task only)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="print the tables from saved JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny planted task, seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.tasks, args.rank, args.steps, args.batch, args.eval_every = ["planted-mlp"], 4, 6, 4, 3
        if args.out == OUT:  # a fresh folder unless --out names one
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-per-layer-"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = [
            json.loads((args.out / f"{t}.json").read_text())
            for t in args.tasks
            if (args.out / f"{t}.json").exists()
        ]
    else:
        rows = []
        for task in args.tasks:
            rows.append(run(task, args))
            print(f"{task}: {rows[-1]['wall_seconds']:.0f} s", flush=True)
    print(table(rows))
    print()
    print("Effective rank at 90% energy of the uniform adapter, mean over layers:\n")
    print(inspect_table(rows))
    saved = args.out / f"{args.tasks[0]}-energies.json"
    if args.energies and not args.report:
        sweep = energy_sweep(args.tasks[0], args.energies, args)
    elif saved.exists():
        sweep = json.loads(saved.read_text())
    else:
        return 0
    print("\nThe spectral pattern at other energy shares (same uniform adapter and spec):\n")
    print(energy_table(args.tasks[0], sweep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
